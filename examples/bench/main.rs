//! Benchmarks of reliable-mq against raw lapin, in one process run, on the same broker,
//! queues and message sizes. Ratios matter, not absolute numbers: the machine is shared.
//!
//! ```text
//! cargo run --release --example bench -- all        # every mode, a few minutes
//! cargo run --release --example bench -- publish [--n 20000] [--reps 5] [--window 1000]
//!                                               [--one-by-one-n 2000] [--concurrency 1000]
//! cargo run --release --example bench -- publish-cancelled [--n 100000] [--window 1000]
//! cargo run --release --example bench -- consume [--n 50000] [--reps 3]
//! cargo run --release --example bench --features postgres -- inbox [--n 20000] [--reps 3]
//! cargo run --release --example bench --features postgres -- relay [--n 20000] [--reps 5]
//! cargo run --release --example bench -- latency [--rate 1000] [--seconds 10]
//! cargo run --release --example bench -- rss [--depth-small 100000] [--depth-large 1000000]
//!                                           [--rss-seconds 5]
//! ```
//!
//! Each mode is a module with `run(&Args)` and a line in `main`'s dispatch.
//! Results are written up in BENCHMARKS.md.

mod common;
mod consume;
#[cfg(feature = "postgres")]
mod inbox;
mod latency;
mod many;
mod publish;
mod rss;
mod tracer;

use common::Args;

#[tokio::main]
async fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\n\n{}", common::USAGE);
            std::process::exit(2);
        }
    };
    if let Err(e) = tracer::install(&args.tracer) {
        eprintln!("{e}\n\n{}", common::USAGE);
        std::process::exit(2);
    }
    let result = match args.mode.as_str() {
        "help" | "--help" | "-h" => {
            println!("{}", common::USAGE);
            Ok(())
        }
        "publish" => publish::run(&args).await,
        "publish-cancelled" => publish::run_cancelled(&args).await,
        "consume" => consume::run(&args).await,
        #[cfg(feature = "postgres")]
        "inbox" => inbox::run(&args).await,
        #[cfg(feature = "postgres")]
        "relay" => inbox::run_relay(&args).await,
        "latency" => latency::run(&args).await,
        "many" => many::run(&args).await,
        "rss" => rss::run(&args).await,
        "rss-child" => rss::run_child(&args).await,
        "prefill" => consume::prefill(&args).await,
        "drain" => consume::drain_only(&args).await,
        "cleanup" => consume::cleanup(&args).await,
        "all" => all(&args).await,
        other => Err(format!("unknown mode {other:?}\n\n{}", common::USAGE)),
    };
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

/// Every mode, one after the other, with each mode's defaults (or the given options).
async fn all(args: &Args) -> Result<(), String> {
    publish::run(args).await?;
    consume::run(args).await?;
    latency::run(args).await?;
    rss::run(args).await
}
