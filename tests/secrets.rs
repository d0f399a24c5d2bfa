//! No password in any `Debug`/`Display` of `Config`, `App`, `RunningApp`, `Publisher` or an
//! error, with a real broker user whose password has every awkward character; and no
//! message body in the logs once the documented lapin directives are applied.
//!
//! No `init_tracing()` here: one test installs the process-wide subscriber it captures with.

use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::dedup::{DedupStore, RedisStore};
use reliable_mq::{App, Config, ConsumerConfig, HandlerError, Publisher, handler_fn};
use reliable_mq_tests::tls::free_port;
use reliable_mq_tests::{Cleanup, sh, test_config, unique};
use tracing_subscriber::util::SubscriberInitExt as _;

/// The password, raw: `:`, `/`, `@`, `%` and `#` all in it.
const PASSWORD: &str = "S3cr:t/p@ss%w0rd#x";
/// The same, percent-encoded for a URL's user info.
const ENCODED: &str = "S3cr%3At%2Fp%40ss%25w0rd%23x";

/// Pieces that must never be shown, in any encoding.
fn leaks(text: &str) -> Option<&'static str> {
    ["S3cr", "p@ss", "p%40ss", "w0rd"]
        .into_iter()
        .find(|piece| text.contains(piece))
}

fn assert_hidden(what: &str, text: &str) {
    assert!(leaks(text).is_none(), "{what} shows the password: {text}");
}

/// A RabbitMQ user with [`PASSWORD`], deleted on drop.
struct BrokerUser(String);

impl BrokerUser {
    fn create() -> Self {
        let name = unique("rmq-secret");
        assert!(
            sh(&format!(
                "rabbitmqctl -q add_user '{name}' '{PASSWORD}' >/dev/null"
            )),
            "add_user"
        );
        let user = Self(name);
        assert!(
            sh(&format!(
                "rabbitmqctl -q set_permissions -p / '{}' '.*' '.*' '.*' >/dev/null",
                user.0
            )),
            "set_permissions"
        );
        user
    }

    fn url(&self, password: &str) -> String {
        format!("amqp://{}:{password}@127.0.0.1:5672/%2f", self.0)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        sh(&format!(
            "rabbitmqctl -q delete_user '{}' >/dev/null",
            self.0
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_of_config_app_and_publisher_never_shows_the_password() {
    let user = BrokerUser::create();
    let q = unique("secret");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    // Two addresses (a cluster's nodes), both with the password, and a Redis password.
    let config = test_config(&q)
        .with_amqp_url(format!("{},{}", user.url(ENCODED), user.url(ENCODED)))
        .with_redis_url(Some(format!("redis://:{ENCODED}@127.0.0.1:6379")));
    assert_hidden("Config", &format!("{config:?} {config:#?}"));

    let app = App::new(config.clone()).consumer(ConsumerConfig::new(
        &q,
        format!("{q}.dlx"),
        handler_fn(|_n: u64| async { Ok::<_, HandlerError>(()) }),
    ));
    let shown = format!("{app:?} {app:#?}");
    assert_hidden("App", &shown);
    assert!(
        shown.contains("127.0.0.1:5672"),
        "the host stays visible: {shown}"
    );

    // Running for real: the password is right, the user logs in.
    let running = app.start().await.expect("the user logs in");
    assert_hidden("RunningApp", &format!("{running:?} {running:#?}"));
    let publisher = Publisher::from_config(&config).await.expect("publisher");
    assert_hidden("Publisher", &format!("{publisher:?} {publisher:#?}"));
    assert_hidden("Publisher::config", &format!("{:?}", publisher.config()));
    drop(publisher);
    running.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_error_with_a_url_shows_the_password() {
    let mut shown = Vec::new();
    let with = |url: String| {
        test_config("secret")
            .with_amqp_url(url)
            .with_connect_timeout(Duration::from_millis(500))
    };
    let start = |config: Config| async move {
        let q = unique("secret-err");
        let _cleanup = Cleanup::consumer(&q, &[], &[]);
        App::new(config)
            .consumer(ConsumerConfig::new(
                &q,
                format!("{q}.dlx"),
                handler_fn(|_n: u64| async { Ok::<_, HandlerError>(()) }),
            ))
            .start()
            .await
            .map(|_| ())
            .expect_err("must not start")
    };

    // Connect: nothing listens.
    let e = start(with(format!(
        "amqp://u:{ENCODED}@127.0.0.1:{}/%2f",
        free_port()
    )))
    .await;
    assert!(matches!(e, reliable_mq::Error::Connect { .. }), "{e:?}");
    shown.push(format!("{e} {e:?}"));

    // ConnectTimeout: a listener that never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let e = start(with(format!("amqp://u:{ENCODED}@127.0.0.1:{port}/%2f"))).await;
    assert!(
        matches!(e, reliable_mq::Error::ConnectTimeout { .. }),
        "{e:?}"
    );
    shown.push(format!("{e} {e:?}"));
    drop(silent);

    // Tls: amqps:// against the plain port.
    let e = start(with(format!("amqps://u:{ENCODED}@127.0.0.1:5672/%2f"))).await;
    assert!(matches!(e, reliable_mq::Error::Tls { .. }), "{e:?}");
    shown.push(format!("{e} {e:?}"));

    // AccessRefused: the password is the wrong one (and still secret).
    let e = start(with(format!("amqp://guest:{ENCODED}@127.0.0.1:5672/%2f"))).await;
    assert!(
        matches!(e, reliable_mq::Error::AccessRefused { .. }),
        "{e:?}"
    );
    shown.push(format!("{e} {e:?}"));

    // Config: a URL that does not parse, and TLS files with a plain-text scheme.
    for url in [
        format!("amqp://u:{PASSWORD}@127.0.0.1:notaport/%2f"),
        format!("amqp://u:{ENCODED}@127.0.0.1:5672/%2f?cacertfile=/ca.pem"),
        format!("amqps://u:{ENCODED}@127.0.0.1:5671/%2f?cacertfile=/no/such/ca.pem"),
    ] {
        let e = start(with(url)).await;
        assert!(matches!(e, reliable_mq::Error::Config(_)), "{e:?}");
        shown.push(format!("{e} {e:?}"));
    }

    // Dedup: a Redis with a password that is not there, and one that does not parse.
    let store = RedisStore::new(&format!("redis://:{ENCODED}@127.0.0.1:{}", free_port()), 1)
        .expect("lazy store");
    shown.push(format!("{store:?}"));
    let e = store.ping().await.expect_err("nothing listens");
    shown.push(format!("{e} {e:?}"));
    // The raw password does not make a valid URL: refused at once or at the first call.
    match RedisStore::new(&format!("redis://:{PASSWORD}@127.0.0.1:6379"), 1) {
        Err(e) => shown.push(format!("{e} {e:?}")),
        Ok(store) => {
            shown.push(format!("{store:?}"));
            let e = store.ping().await.expect_err("not a usable URL");
            shown.push(format!("{e} {e:?}"));
        }
    }

    for text in &shown {
        assert_hidden("an error", text);
    }
}

/// Captured log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn the_documented_directives_keep_returned_bodies_out_of_the_logs() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};

    // lapin logs from its own I/O thread: capture process-wide, once with a plain `warn`
    // filter (lapin's own warning shows the body: this test can fail) and once at `trace`
    // with the documented directives added.
    let (plain, quiet) = (Captured::default(), Captured::default());
    let mut filter = EnvFilter::new("trace");
    for d in reliable_mq::Config::QUIET_LAPIN_DIRECTIVES {
        filter = filter.add_directive(d.parse().expect("directive"));
    }
    let (w1, w2) = (plain.clone(), quiet.clone());
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || w1.clone())
                .with_filter(EnvFilter::new("warn")),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || w2.clone())
                .with_filter(filter),
        );
    subscriber
        .try_init()
        .expect("this test binary's only global subscriber");

    let marker = unique("4111-1111");
    let publisher = Publisher::from_config(&test_config("secret"))
        .await
        .expect("publisher");
    let e = publisher
        .publish(
            "",
            &unique("nobody-here"),
            &serde_json::json!({ "card": marker }),
        )
        .await
        .expect_err("unroutable");
    assert!(
        !format!("{e} {e:?}").contains(&marker),
        "the error shows the body: {e}"
    );
    drop(publisher);

    // lapin prints the body as a list of byte values.
    let as_bytes = marker
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let shows_body = |logs: &str| logs.contains(&marker) || logs.contains(&as_bytes);
    let plain = plain.text();
    assert!(
        shows_body(&plain),
        "expected lapin's own warning with the body; the capture saw: {plain}"
    );
    let quiet = quiet.text();
    assert!(!shows_body(&quiet), "a body reached the logs: {quiet}");
    assert!(!quiet.is_empty(), "the capture works at trace level");
}
