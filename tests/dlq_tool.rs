//! The DLQ tool (`reliable-mq dlq ...`, feature `cli`) on the real broker: a replay killed
//! halfway loses nothing; filters, dry run, list/show/purge leave untouched messages in
//! place and in order; the replay limit stops a message that keeps failing.

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use reliable_mq::dlq::{self, Filter, ReplayOptions};
use reliable_mq::{App, ConsumerConfig, HandlerError, handler_fn, headers};
use reliable_mq_tests::{Broker, Cleanup, amqp_url, eventually, test_config, unique};

const CLI: &str = env!("CARGO_BIN_EXE_reliable-mq-cli");

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn declare(broker: &Broker, queue: &str) {
    broker
        .fresh_channel()
        .await
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
}

/// Put a dead letter into `dlq` as the runtime writes one: failure record plus origin.
async fn dead_letter(
    broker: &Broker,
    dlq: &str,
    id: &str,
    kind: &str,
    last_failure: i64,
    origin_queue: &str,
    replays: Option<i64>,
) {
    let mut h = FieldTable::default();
    headers::set_str(&mut h, headers::ERROR_KIND, kind);
    headers::set_str(
        &mut h,
        headers::EXCEPTION_MESSAGE,
        &format!("{kind}: something went wrong with {id}"),
    );
    headers::set_int(&mut h, headers::ATTEMPTS, 4);
    headers::set_int(&mut h, headers::FIRST_FAILURE, last_failure - 7000);
    headers::set_int(&mut h, headers::LAST_FAILURE, last_failure);
    headers::set_str(&mut h, headers::ORIGINAL_EXCHANGE, "");
    headers::set_str(&mut h, headers::ORIGINAL_ROUTING_KEY, origin_queue);
    headers::set_str(&mut h, headers::ORIGINAL_QUEUE, origin_queue);
    h.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    if let Some(n) = replays {
        headers::set_int(&mut h, dlq::REPLAYS, n);
    }
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_headers(h);
    let body = serde_json::to_vec(&serde_json::json!({ "order": id, "qty": 2 })).expect("json");
    broker.publish_raw("", dlq, &body, props).await;
}

fn cli(args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .env("AMQP_URL", amqp_url())
        .output()
        .expect("run the reliable-mq binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_out(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

/// Every message of `queue`, taken off it: (message_id, x-replays, has failure record).
async fn drain(broker: &Broker, queue: &str) -> Vec<(String, Option<i64>, bool)> {
    let mut out = Vec::new();
    while let Some(m) = broker.get(queue).await {
        out.push((
            m.message_id().unwrap_or_default(),
            m.header_int(dlq::REPLAYS),
            m.header(headers::ERROR_KIND).is_some() || m.header(headers::ATTEMPTS).is_some(),
        ));
        if m.message_id().as_deref() != Some("broker-dead") {
            assert_eq!(
                m.header("tenant").as_deref(),
                Some("acme"),
                "own headers kept"
            );
        }
    }
    out
}

fn ids(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["message_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn replay_of_1000_killed_halfway_then_run_again_loses_nothing() {
    let target = unique("dlqtool-kill");
    let dlq = format!("{target}.dlq");
    let _cleanup = Cleanup::consumer(&target, &[], &[]);
    let broker = Broker::connect().await;
    declare(&broker, &target).await;
    declare(&broker, &dlq).await;
    let now = now_ms();
    let all: Vec<String> = (0..1000).map(|i| format!("m-{i:04}")).collect();
    for id in &all {
        dead_letter(&broker, &dlq, id, "retries-exhausted", now, &target, None).await;
    }

    let mut child = Command::new(CLI)
        .args(["dlq", "replay", &dlq])
        .env("AMQP_URL", amqp_url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the reliable-mq binary");
    let started = eventually(Duration::from_secs(60), || async {
        broker.ready_count(&target).await.unwrap_or(0) >= 150
    })
    .await;
    let still_running = child.try_wait().expect("child status").is_none();
    child.kill().expect("SIGKILL the tool");
    let _ = child.wait();
    assert!(started, "the replay never got going");
    assert!(
        still_running,
        "the tool finished before it could be killed; nothing was interrupted"
    );
    // The broker requeues what the killed tool held (unacked): every message is in one
    // queue or the other (or both: confirmed, not yet acked).
    let settled = eventually(Duration::from_secs(30), || async {
        let (t, d) = (
            broker.ready_count(&target).await.unwrap_or(0),
            broker.ready_count(&dlq).await.unwrap_or(0),
        );
        t + d >= 1000 && d > 0
    })
    .await;
    let after_kill = (
        broker.ready_count(&target).await,
        broker.ready_count(&dlq).await,
    );
    assert!(settled, "after the kill: target, dlq = {after_kill:?}");

    let summary = json_out(&cli(&["dlq", "replay", &dlq, "--json"]));
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(broker.ready_count(&dlq).await, Some(0), "DLQ emptied");

    let got = drain(&broker, &target).await;
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, replays, has_record) in &got {
        *per_id.entry(id.as_str()).or_default() += 1;
        assert_eq!(*replays, Some(1), "{id}: x-replays set");
        assert!(!has_record, "{id}: failure record stripped");
    }
    let lost: Vec<&String> = all
        .iter()
        .filter(|id| !per_id.contains_key(id.as_str()))
        .collect();
    let duplicates = got.len() - per_id.len();
    println!(
        "killed with target={:?} dlq={:?}; second run: {summary}; delivered {} for 1000 ids, {duplicates} duplicate(s), {} lost",
        after_kill.0,
        after_kill.1,
        got.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(per_id.len(), 1000);
    assert!(per_id.keys().all(|id| all.iter().any(|a| a == id)));
}

#[tokio::test]
async fn list_show_filters_dry_run_and_purge_leave_the_rest_in_place() {
    let target = unique("dlqtool-filter");
    let dlq = format!("{target}.dlq");
    let other = format!("{target}.other");
    let _cleanup = Cleanup::consumer(&target, &[], &[]);
    let _cleanup_other = Cleanup::consumer(&other, &[], &[]);
    let broker = Broker::connect().await;
    for q in [&target, &dlq, &other] {
        declare(&broker, q).await;
    }
    let now = now_ms();
    let three_hours_ago = now - 3 * 3_600_000;
    for i in 0..3 {
        dead_letter(
            &broker,
            &dlq,
            &format!("old-{i}"),
            "decode",
            three_hours_ago,
            &target,
            None,
        )
        .await;
        dead_letter(
            &broker,
            &dlq,
            &format!("new-{i}"),
            "rejected",
            now,
            &target,
            None,
        )
        .await;
    }
    let in_order = ["old-0", "new-0", "old-1", "new-1", "old-2", "new-2"];

    // list: the table, and the JSON with each filter; the queue is unchanged and in order.
    let table = cli(&["dlq", "list", &dlq]);
    let text = stdout(&table);
    println!("{text}");
    assert!(table.status.success(), "{text}");
    assert!(text.starts_with("MESSAGE_ID"), "{text}");
    assert!(
        text.contains("retries") || text.contains("decode"),
        "{text}"
    );
    assert!(text.contains("6 dead letter(s)"), "{text}");
    assert_eq!(
        ids(&json_out(&cli(&["dlq", "list", &dlq, "--json"]))),
        in_order
    );
    assert_eq!(
        ids(&json_out(&cli(&[
            "dlq", "list", &dlq, "--json", "--kind", "decode"
        ]))),
        ["old-0", "old-1", "old-2"]
    );
    assert_eq!(
        ids(&json_out(&cli(&[
            "dlq", "list", &dlq, "--json", "--since", "1h"
        ]))),
        ["new-0", "new-1", "new-2"]
    );
    assert_eq!(broker.ready_count(&dlq).await, Some(6));

    // show: headers and the body as JSON.
    let shown = json_out(&cli(&["dlq", "show", &dlq, "new-1"]));
    assert_eq!(shown["body"]["order"], "new-1", "{shown}");
    assert_eq!(shown["headers"][headers::ERROR_KIND], "rejected", "{shown}");
    assert!(!cli(&["dlq", "show", &dlq, "nope"]).status.success());

    // dry run: counts, moves nothing.
    let dry = json_out(&cli(&[
        "dlq",
        "replay",
        &dlq,
        "--dry-run",
        "--json",
        "--kind",
        "decode",
    ]));
    assert_eq!(
        (
            dry["matched"].as_u64(),
            dry["would_replay"].as_u64(),
            dry["replayed"].as_u64()
        ),
        (Some(3), Some(3), Some(0)),
        "{dry}"
    );
    assert_eq!(broker.ready_count(&dlq).await, Some(6));
    assert_eq!(broker.ready_count(&target).await, Some(0));

    // --kind with --limit: two of the three decode failures, to their origin.
    let some = json_out(&cli(&[
        "dlq", "replay", &dlq, "--json", "--kind", "decode", "--limit", "2",
    ]));
    assert_eq!(some["replayed"], 2, "{some}");
    let replayed: Vec<String> = drain(&broker, &target)
        .await
        .into_iter()
        .map(|g| g.0)
        .collect();
    assert_eq!(replayed, ["old-0", "old-1"]);

    // --id with --to: one message to another queue.
    let one = json_out(&cli(&[
        "dlq",
        "replay",
        &dlq,
        "--json",
        "--id",
        "new-2",
        "--to",
        &format!(":{other}"),
    ]));
    assert_eq!(one["replayed"], 1, "{one}");
    let moved: Vec<String> = drain(&broker, &other)
        .await
        .into_iter()
        .map(|g| g.0)
        .collect();
    assert_eq!(moved, ["new-2"]);
    assert_eq!(
        ids(&json_out(&cli(&["dlq", "list", &dlq, "--json"]))),
        ["new-0", "new-1", "old-2"],
        "untouched dead letters stay, in order"
    );

    // An unroutable target: the copy is returned, the dead letter stays, exit status 1.
    let nowhere = cli(&[
        "dlq",
        "replay",
        &dlq,
        "--json",
        "--id",
        "old-2",
        "--to",
        &format!(":{target}.missing"),
    ]);
    assert!(!nowhere.status.success(), "{}", stdout(&nowhere));
    let s: serde_json::Value = serde_json::from_slice(&nowhere.stdout).expect("JSON summary");
    assert_eq!(
        (s["failed"].as_u64(), s["replayed"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
    assert_eq!(broker.ready_count(&dlq).await, Some(3));

    // purge: refused without --yes; then only the matching kind.
    let refused = cli(&["dlq", "purge", &dlq, "--kind", "rejected"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(broker.ready_count(&dlq).await, Some(3));
    let purged = cli(&["dlq", "purge", &dlq, "--kind", "rejected", "--yes"]);
    assert!(stdout(&purged).contains("purged 2"), "{}", stdout(&purged));
    assert_eq!(
        ids(&json_out(&cli(&["dlq", "list", &dlq, "--json"]))),
        ["old-2"]
    );

    // A missing queue is a clear error, not a crash.
    let missing = cli(&["dlq", "list", &format!("{target}.nope")]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open queue"));
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_replayed_at_most_max_replays_times() {
    let queue = unique("dlqtool-loop");
    let dlq = format!("{queue}.dlq");
    let _cleanup = Cleanup::consumer(&queue, &[], &[]);
    let broker = Broker::connect().await;
    let config = test_config(&queue);
    // A real consumer that rejects everything: each replay comes straight back.
    let app = App::new(config.clone())
        .consumer(ConsumerConfig::new(
            queue.clone(),
            format!("{queue}.dlx"),
            handler_fn(|_: serde_json::Value| async {
                Err::<(), _>(HandlerError::reject("still broken"))
            }),
        ))
        .start()
        .await
        .expect("start");
    dead_letter(&broker, &dlq, "poison", "rejected", now_ms(), &queue, None).await;

    let options = ReplayOptions {
        max_replays: 2,
        ..ReplayOptions::default()
    };
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    for round in 1..=2 {
        let s = dlq::replay(&config, &dlq, &options, |_| {})
            .await
            .expect("replay");
        assert_eq!(s.replayed, 1, "round {round}: {s:?}");
        let back = eventually(Duration::from_secs(20), || async {
            broker.ready_count(&dlq).await == Some(1)
        })
        .await;
        assert!(
            back,
            "round {round}: the rejected replay came back to the DLQ"
        );
        let listed = dlq::list(&config, &dlq, &Filter::default())
            .await
            .expect("list");
        seen.lock().map(|mut v| v.push(listed[0].replays)).ok();
        assert_eq!(
            listed[0].replays, round,
            "x-replays survives the consumer's dead-letter copy"
        );
        assert_eq!(listed[0].error_kind.as_deref(), Some("rejected"));
    }
    let third = dlq::replay(&config, &dlq, &options, |_| {})
        .await
        .expect("replay");
    assert_eq!(
        (third.replayed, third.refused_replay_limit),
        (0, 1),
        "{third:?}"
    );
    // The binary says so too, and why.
    let text = stdout(&cli(&["dlq", "replay", &dlq, "--max-replays", "2"]));
    println!("{text}");
    assert!(text.contains("0 replayed"), "{text}");
    assert!(
        text.contains("1 left in the DLQ: already replayed 2 times"),
        "{text}"
    );
    assert_eq!(
        broker.ready_count(&dlq).await,
        Some(1),
        "refused, kept in the DLQ"
    );
    app.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_dead_letter_written_by_the_broker_is_replayed_to_its_origin_from_x_death() {
    let queue = unique("dlqtool-xdeath");
    let dlq = format!("{queue}.dlq");
    let _cleanup = Cleanup::consumer(&queue, &[], &[]);
    let broker = Broker::connect().await;
    declare(&broker, &dlq).await;
    // A queue that dead-letters to the DLQ through the broker (no reliable-mq headers).
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dlq.as_str())),
    );
    broker
        .fresh_channel()
        .await
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("declare");
    broker
        .publish_json("", &queue, &serde_json::json!({"n": 1}), "broker-dead")
        .await;
    let ch = broker.fresh_channel().await;
    let got = ch
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("get")
        .expect("a message");
    got.delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.ready_count(&dlq).await == Some(1)
        })
        .await
    );

    let summary = json_out(&cli(&["dlq", "replay", &dlq, "--json"]));
    assert_eq!(summary["replayed"], 1, "{summary}");
    let back = drain(&broker, &queue).await;
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].0.as_str(), back[0].1), ("broker-dead", Some(1)));
}
