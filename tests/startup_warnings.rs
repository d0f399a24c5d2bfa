//! Start-up warnings reach the user even when the application installed no tracing
//! subscriber (the README's minimal `main`): `run()` with `REDIS_URL` unset and an
//! idempotent consumer must say, on stderr, that dedup is per process only.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const APP: &str = env!("CARGO_BIN_EXE_operate_app");
const REDIS_WARNING: &str = "REDIS_URL is not set";

/// Run the demo service with `env` until it exits (it cannot reach the broker on a closed
/// port) or 20 s pass; returns its stderr.
fn stderr_of(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(APP);
    cmd.env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .env_remove("RELIABLE_MQ_LOG")
        .env_remove("RELIABLE_MQ_EXPORT")
        // Nothing listens on port 9: start-up stops at the first connection.
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start the demo service");
    let stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines.join("\n")
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap_or_default()
}

#[test]
fn redis_warning_is_on_stderr_without_a_subscriber() {
    let err = stderr_of(&[]);
    assert!(err.contains(REDIS_WARNING), "stderr was:\n{err}");
    assert!(err.contains("WARN reliable_mq"), "stderr was:\n{err}");
    assert!(
        err.contains("RELIABLE_MQ_LOG=off"),
        "says how to silence it:\n{err}"
    );
}

#[test]
fn the_fallback_can_be_silenced() {
    let err = stderr_of(&[("RELIABLE_MQ_LOG", "off")]);
    assert!(!err.contains(REDIS_WARNING), "stderr was:\n{err}");
}

#[test]
fn with_a_subscriber_the_warning_goes_through_it_once() {
    let err = stderr_of(&[("OPERATE_TRACING", "1")]);
    assert_eq!(err.matches(REDIS_WARNING).count(), 1, "stderr was:\n{err}");
    assert!(
        !err.contains("WARN reliable_mq:"),
        "no fallback line:\n{err}"
    );
}
