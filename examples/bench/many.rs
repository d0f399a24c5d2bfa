//! `many`: an app with `--n` hand-built consumers (default 200), one queue each: the
//! connections it opens, its start-up time, the process's RSS, the broker's memory for
//! connections, and the time until every consumer has resumed after its connections were
//! closed from the broker side.
//!
//! The broker is shared, so by default it is never restarted: the "restart" is this process's
//! connections (found by their connection name) closed by the broker with one
//! `rabbitmqctl eval` of `rabbit_networking:close_connection/2`, which is what a node
//! going down does to them from the client's side. The broker's connection memory is the
//! sum of `connection_readers`, `connection_writers`, `connection_channels` and
//! `connection_other` in `rabbitmq-diagnostics memory_breakdown`, before start-up and with
//! the app running: the difference is this app's (other users of the broker add noise).
//!
//! `BENCH_RESTART='<stop and start command>'` restarts a real node instead, e.g. a private
//! node of `scripts/rabbitmq-cluster.sh` (with `AMQP_URL`, `HOME` and `RABBITMQ_NODENAME`
//! pointing at it, so the `rabbitmqctl` calls here ask that node); the resume clock then
//! starts when the command returns, with the node back.

use std::time::{Duration, Instant};

use reliable_mq::{App, Config, ConsumerConfig, HandlerError, RunningApp, handler_fn};

use crate::common::{Args, Raw, unique};

fn consumer_config(queue: &str) -> ConsumerConfig {
    let handler = handler_fn(|_m: serde_json::Value| async move { Ok::<_, HandlerError>(()) });
    ConsumerConfig::new(queue, format!("{queue}.dlx"), handler)
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn command(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The broker's memory for connections, in kB.
fn broker_connection_memory_kb() -> u64 {
    let out = command(
        "rabbitmq-diagnostics",
        &["-q", "memory_breakdown", "--unit", "kb"],
    );
    out.lines()
        .filter(|l| l.starts_with("connection_"))
        .filter_map(|l| {
            let value = l.split(':').nth(1)?.split_whitespace().next()?;
            value.parse::<f64>().ok()
        })
        .sum::<f64>() as u64
}

fn connections_named(name: &str) -> usize {
    command(
        "rabbitmqctl",
        &["-q", "list_connections", "client_properties"],
    )
    .lines()
    .filter(|l| l.contains(name))
    .count()
}

/// Close every connection whose name contains `name`, from the broker side, in one call.
fn close_connections_named(name: &str) -> String {
    let expr = format!(
        "N = <<\"{name}\">>, \
         Ps = [proplists:get_value(pid, I) || I <- rabbit_networking:connection_info_all([pid, client_properties]), \
               case lists:keyfind(<<\"connection_name\">>, 1, proplists:get_value(client_properties, I)) of \
                 {{_, _, V}} -> binary:match(V, N) =/= nomatch; _ -> false end], \
         [rabbit_networking:close_connection(P, \"bench: forced close\") || P <- Ps], length(Ps)."
    );
    command("rabbitmqctl", &["-q", "eval", &expr])
        .trim()
        .to_owned()
}

fn all_sessions_at_least(app: &RunningApp, queues: &[String], n: u64) -> bool {
    queues
        .iter()
        .all(|q| app.stats(q).is_some_and(|s| s.sessions >= n))
}

pub async fn run(args: &Args) -> Result<(), String> {
    let n = args.n_or(200);
    let name = unique("bench-many");
    let queues: Vec<String> = (0..n).map(|i| format!("{name}-q{i}")).collect();
    let raw = Raw::connect(&args.amqp_url).await?;
    let result = measure(args, &name, &queues).await;
    for q in &queues {
        raw.delete_consumer_topology(&consumer_config(q)).await;
    }
    let _ = raw.connection.close(200, "bench done".into()).await;
    result
}

async fn measure(args: &Args, name: &str, queues: &[String]) -> Result<(), String> {
    let n = queues.len();
    let rss_before = status_kb("VmRSS");
    let broker_before = broker_connection_memory_kb();
    let config = Config::default()
        .with_amqp_url(args.amqp_url.clone())
        .with_connection_name(name.to_owned())
        .with_shutdown_grace(Duration::from_secs(5));
    let mut app = App::new(config);
    for q in queues {
        app = app.consumer(consumer_config(q));
    }
    let start = Instant::now();
    let running = app.start().await.map_err(|e| e.to_string())?;
    let startup = start.elapsed();
    // Let the broker's statistics catch up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open = connections_named(name);
    let rss = status_kb("VmRSS");
    let broker = broker_connection_memory_kb();

    // With BENCH_RESTART (a shell command that stops the node and starts it again), the
    // node itself restarts; the clock then starts when the node is back. Otherwise this
    // process's connections are closed from the broker side (a shared broker).
    let restart = std::env::var("BENCH_RESTART")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let restart_began = Instant::now();
    let closed = match &restart {
        Some(cmd) => {
            let ok = std::process::Command::new("sh")
                .args(["-c", cmd])
                .status()
                .is_ok_and(|s| s.success());
            format!(
                "(node restarted by BENCH_RESTART: {}, took {:.2} s)",
                if ok { "ok" } else { "FAILED" },
                restart_began.elapsed().as_secs_f64()
            )
        }
        None => close_connections_named(name),
    };
    let cut = Instant::now();
    let mut resumed = None;
    while cut.elapsed() < Duration::from_secs(120) {
        if all_sessions_at_least(&running, queues, 2) {
            resumed = Some(cut.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let open_after = connections_named(name);
    running.shutdown().await.map_err(|e| e.to_string())?;

    println!("many: {n} hand-built consumers, one queue each, connection name {name}");
    println!("  connections open                      {open}");
    println!(
        "  start-up (App::start until attached)  {:.2} s",
        startup.as_secs_f64()
    );
    println!("  process VmRSS                         {rss} kB (before start-up {rss_before} kB)");
    println!(
        "  broker connection memory              {broker} kB (before start-up {broker_before} kB, +{} kB)",
        broker.saturating_sub(broker_before)
    );
    println!("  connections closed by the broker      {closed}");
    match resumed {
        Some(t) => println!(
            "  every consumer resumed after          {:.2} s",
            t.as_secs_f64()
        ),
        None => println!("  every consumer resumed after          (not within 120 s)"),
    }
    println!("  connections open after resuming       {open_after}");
    Ok(())
}
