//! `amqps://` and `rediss://` against the machine's RabbitMQ and Redis behind a TLS
//! terminator (`socat`) with certificates made at test time: a consumer and the publisher
//! end to end, mutual TLS, and the errors for a wrong CA, a wrong host name, an expired
//! certificate, a TLS/plain-text port mismatch and a refused login.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reliable_mq::dedup::{DedupStore, RedisStore};
use reliable_mq::{App, Config, ConsumerConfig, Error, HandlerError, Publisher, handler_fn};
use reliable_mq_tests::tls::{Certs, ClientAuth, TlsProxy, free_port};
use reliable_mq_tests::{Cleanup, eventually, init_tracing, test_config, unique};

const WAIT: Duration = Duration::from_secs(15);

/// The amqps URL of the broker behind `proxy`, with `query` (TLS parameters).
fn amqps(proxy: &TlsProxy, query: &str) -> String {
    format!("amqps://guest:guest@127.0.0.1:{}/%2f?{query}", proxy.port)
}

/// `cacertfile` (the test CA) plus the client certificate.
fn mutual(certs: &Certs) -> String {
    format!(
        "cacertfile={}&certfile={}&keyfile={}",
        certs.path("ca.pem"),
        certs.path("client.pem"),
        certs.path("client.key")
    )
}

fn counting(counter: &Arc<AtomicUsize>) -> impl reliable_mq::Handler {
    let counter = Arc::clone(counter);
    handler_fn(move |_n: u64| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(())
        }
    })
}

/// Start an app with one counting consumer on `config`, expecting an error.
async fn start_error(config: Config) -> Error {
    let q = unique("tls-fail");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let handled = Arc::new(AtomicUsize::new(0));
    let started = App::new(config.with_connect_timeout(Duration::from_secs(5)))
        .consumer(ConsumerConfig::new(
            &q,
            format!("{q}.dlx"),
            counting(&handled),
        ))
        .start()
        .await;
    match started {
        Ok(app) => {
            let _ = app.shutdown().await;
            panic!("the app started although the connection should have failed")
        }
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_and_publisher_work_over_amqps_and_rediss_with_client_certificates() {
    init_tracing();
    let certs = Certs::generate();
    let amqp_proxy = TlsProxy::start(&certs, "server", ClientAuth::Required, 5672);
    let redis_proxy = TlsProxy::start(&certs, "server", ClientAuth::Required, 6379);
    let q = unique("tls-e2e");
    let prefix = format!("rmq-test:{q}");
    let _cleanup = Cleanup::consumer(&q, &[], &[]).redis_keys(&prefix);

    let redis_url = format!(
        "rediss://127.0.0.1:{}/?{}",
        redis_proxy.port,
        mutual(&certs)
    );
    let config = test_config(&q)
        .with_amqp_url(amqps(&amqp_proxy, &mutual(&certs)))
        .with_redis_url(Some(redis_url));
    let handled = Arc::new(AtomicUsize::new(0));
    let app = App::new(config.clone())
        .consumer(
            ConsumerConfig::new(&q, format!("{q}.dlx"), counting(&handled))
                .idempotent(Duration::from_secs(60)),
        )
        .start()
        .await
        .expect("the app starts over amqps and rediss");

    let publisher = Publisher::from_config(&config)
        .await
        .expect("the publisher connects over amqps");
    let options = || reliable_mq::PublishOptions::with_message_id("tls-m-1");
    publisher
        .publish_with("", &q, &1u64, options())
        .await
        .expect("confirmed over amqps");
    assert!(eventually(WAIT, || async { handled.load(Ordering::SeqCst) == 1 }).await);

    // The dedup store behind the TLS proxy is the machine's Redis: the `done` mark is
    // there, and a second copy of the message is recognised as a duplicate.
    assert!(
        eventually(WAIT, || async {
            reliable_mq_tests::sh(&format!(
                "redis-cli -h 127.0.0.1 -p 6379 --scan --pattern '{prefix}:*' | grep -q ."
            ))
        })
        .await,
        "the dedup key was written through rediss"
    );
    publisher
        .publish_with("", &q, &1u64, options())
        .await
        .expect("second copy confirmed");
    assert!(
        eventually(WAIT, || async {
            app.stats(&q).is_some_and(|s| s.duplicates == 1)
        })
        .await,
        "the copy was acked as a duplicate: {:?}",
        app.stats(&q)
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    drop(publisher);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_client_certificate_that_is_missing_fails_clearly() {
    init_tracing();
    let certs = Certs::generate();
    let proxy = TlsProxy::start(&certs, "server", ClientAuth::Required, 5672);
    let url = amqps(&proxy, &format!("cacertfile={}", certs.path("ca.pem")));
    let e = start_error(test_config("tls").with_amqp_url(url)).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("TLS handshake failed"), "{text}");
    assert!(text.contains("certfile and keyfile"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{text}"
    );

    let redis_proxy = TlsProxy::start(&certs, "server", ClientAuth::Required, 6379);
    let redis = RedisStore::new(
        &format!(
            "rediss://127.0.0.1:{}/?cacertfile={}",
            redis_proxy.port,
            certs.path("ca.pem")
        ),
        1,
    )
    .expect("store");
    let e = redis.ping().await.expect_err("no client certificate");
    assert!(e.to_string().contains("certfile and keyfile"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_an_untrusted_ca_fails_clearly() {
    init_tracing();
    let certs = Certs::generate();
    let proxy = TlsProxy::start(&certs, "server", ClientAuth::None, 5672);
    let url = amqps(
        &proxy,
        &format!("cacertfile={}", certs.path("other-ca.pem")),
    );
    let e = start_error(test_config("tls").with_amqp_url(url.clone())).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(
        text.contains("not signed by a CA this client trusts"),
        "{text}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{text}"
    );
    // Never a fall-back to plain text: the publisher fails the same way.
    let e = Publisher::from_config(&test_config("tls").with_amqp_url(url))
        .await
        .expect_err("untrusted CA");
    assert!(e.to_string().contains("not signed by a CA"), "{e}");

    // Without cacertfile the system roots are used, and they do not know the test CA.
    let e = start_error(test_config("tls").with_amqp_url(amqps(&proxy, ""))).await;
    assert!(e.to_string().contains("not signed by a CA"), "{e}");

    let redis_proxy = TlsProxy::start(&certs, "server", ClientAuth::None, 6379);
    let store = RedisStore::new(
        &format!(
            "rediss://127.0.0.1:{}/?cacertfile={}",
            redis_proxy.port,
            certs.path("other-ca.pem")
        ),
        1,
    )
    .expect("store");
    let e = store.ping().await.expect_err("untrusted CA");
    let text = e.to_string();
    assert!(text.contains("not signed by a CA"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", redis_proxy.port)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_name_fails_clearly_and_server_name_indication_fixes_it() {
    init_tracing();
    let certs = Certs::generate();
    let proxy = TlsProxy::start(&certs, "elsewhere", ClientAuth::None, 5672);
    let ca = format!("cacertfile={}", certs.path("ca.pem"));
    let e = start_error(test_config("tls").with_amqp_url(amqps(&proxy, &ca))).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("not valid for the name"), "{text}");
    assert!(text.contains("elsewhere.example"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{text}"
    );

    // The name the certificate lists, sent and verified instead of the host.
    let url = amqps(
        &proxy,
        &format!("{ca}&server_name_indication=elsewhere.example"),
    );
    let publisher = Publisher::from_config(&test_config("tls").with_amqp_url(url))
        .await
        .expect("server_name_indication names the certificate's host");
    let q = unique("tls-sni");
    let _cleanup = Cleanup::consumer(&q, &[], &[]);
    let broker = reliable_mq_tests::Broker::connect().await;
    broker
        .channel
        .queue_declare(
            q.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare");
    publisher
        .publish("", &q, &7u64)
        .await
        .expect("confirmed through SNI");
    assert!(
        broker.get_within(&q, WAIT).await.is_some(),
        "the message arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_fails_clearly() {
    init_tracing();
    let certs = Certs::generate();
    let proxy = TlsProxy::start(&certs, "expired", ClientAuth::None, 5672);
    let url = amqps(&proxy, &format!("cacertfile={}", certs.path("ca.pem")));
    let e = start_error(test_config("tls").with_amqp_url(url)).await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(text.contains("expired"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_against_a_plain_port_and_plain_against_a_tls_port_say_so() {
    init_tracing();
    let e = start_error(test_config("tls").with_amqp_url("amqps://guest:guest@127.0.0.1:5672/%2f"))
        .await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(
        text.contains("TLS handshake failed: is port 5672 a TLS listener?"),
        "{text}"
    );

    let certs = Certs::generate();
    let proxy = TlsProxy::start(&certs, "server", ClientAuth::None, 5672);
    let e = start_error(
        test_config("tls")
            .with_amqp_url(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port)),
    )
    .await;
    let text = e.to_string();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert!(
        text.contains(&format!(
            "if port {} is a TLS listener, use amqps://",
            proxy.port
        )),
        "{text}"
    );

    // The same for Redis.
    let store = RedisStore::new("rediss://127.0.0.1:6379", 1).expect("store");
    let e = store.ping().await.expect_err("plain port");
    assert!(
        e.to_string().contains("is port 6379 a TLS listener?"),
        "{e}"
    );
    let redis_proxy = TlsProxy::start(&certs, "server", ClientAuth::None, 6379);
    let store =
        RedisStore::new(&format!("redis://127.0.0.1:{}", redis_proxy.port), 1).expect("store");
    let e = store.ping().await.expect_err("TLS port");
    assert!(
        e.to_string().contains(&format!(
            "if port {} is a TLS listener, use rediss://",
            redis_proxy.port
        )),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_says_to_check_the_credentials() {
    init_tracing();
    let e = start_error(
        test_config("tls").with_amqp_url("amqp://guest:not-the-password@127.0.0.1:5672/%2f"),
    )
    .await;
    let text = e.to_string();
    assert!(matches!(e, Error::AccessRefused { .. }), "{e:?}");
    assert!(text.contains("check the user name and password"), "{text}");
    assert!(!text.contains("is the broker running"), "{text}");
    assert!(
        !format!("{text} {e:?}").contains("not-the-password"),
        "{text}"
    );

    let vhost = unique("no-such-vhost");
    let e = start_error(
        test_config("tls").with_amqp_url(format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")),
    )
    .await;
    let text = e.to_string();
    assert!(matches!(e, Error::AccessRefused { .. }), "{e:?}");
    assert!(
        text.contains(&vhost) && text.contains("the vhost exists"),
        "{text}"
    );
    assert!(!text.contains("is the broker running"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_still_says_is_the_broker_running() {
    init_tracing();
    let port = free_port();
    let e = start_error(
        test_config("tls").with_amqp_url(format!("amqps://guest:guest@127.0.0.1:{port}/%2f")),
    )
    .await;
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("is the broker running"), "{e}");

    // A listener that never answers the TLS handshake: a timeout that says to check it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let e = start_error(
        test_config("tls").with_amqp_url(format!("amqps://guest:guest@127.0.0.1:{port}/%2f")),
    )
    .await;
    assert!(matches!(e, Error::ConnectTimeout { .. }), "{e:?}");
    assert!(e.to_string().contains("is a TLS listener"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_over_tls_with_client_certificates() {
    use reliable_mq::dedup::{Claim, RedisClusterStore};
    use reliable_mq_tests::tls::TlsRedisCluster;

    init_tracing();
    let certs = Certs::generate();
    let cluster = tokio::task::block_in_place(|| TlsRedisCluster::start(&certs));
    let hosts: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let url = format!("rediss+cluster://{}/?{}", hosts.join(","), mutual(&certs));
    let nodes = reliable_mq::dedup::cluster_nodes(&url).expect("a cluster URL");
    let store = RedisClusterStore::new(&nodes, 2).expect("store");
    store.ping().await.expect("every primary answers over TLS");
    // Keys spread over the three primaries: the scripts run on each over TLS.
    let prefix = unique("rmq-test:tls-cluster");
    for i in 0..16 {
        let key = reliable_mq::dedup::KeyScope::new(&prefix, "/").key("q", &format!("m-{i}"));
        assert_eq!(
            store
                .claim(&key, "t", Duration::from_secs(30))
                .await
                .expect("claim"),
            Claim::Acquired
        );
        assert!(
            store
                .complete(&key, "t", Duration::from_secs(60))
                .await
                .expect("complete")
        );
        assert_eq!(
            store
                .claim(&key, "t2", Duration::from_secs(30))
                .await
                .expect("claim"),
            Claim::Done
        );
        assert!(
            cluster
                .cli(cluster.ports[0], &["get", &key])
                .contains("done"),
            "{key}"
        );
    }

    // Without the client certificate the nodes refuse, and the error says so.
    let url = format!(
        "rediss+cluster://{}/?cacertfile={}",
        hosts.join(","),
        certs.path("ca.pem")
    );
    let nodes = reliable_mq::dedup::cluster_nodes(&url).expect("a cluster URL");
    let store = RedisClusterStore::new(&nodes, 2).expect("store");
    let e = store.ping().await.expect_err("no client certificate");
    assert!(e.to_string().contains("certfile and keyfile"), "{e}");
}
