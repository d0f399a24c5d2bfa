//! The topology export: `RELIABLE_MQ_EXPORT=asyncapi|asyncapi-yaml` makes `run()` print an
//! AsyncAPI 3.0 document and exit 0 without touching the broker, and `App::asyncapi` gives
//! the same from code. Every document is validated against the official AsyncAPI 3.0.0
//! JSON Schema (`tests/schemas/asyncapi-3.0.0.json`, from the npm package
//! `@asyncapi/specs` 6.11.1, Apache-2.0: see `tests/schemas/README.md`).

use std::process::{Command, Output};

use reliable_mq::{
    App, Config, ConsumerConfig, ExchangeKind, ExportFormat, HandlerError, handler_fn,
};
use serde_json::Value;

const APP: &str = env!("CARGO_BIN_EXE_operate_app");

fn validator() -> jsonschema::Validator {
    let text = include_str!("schemas/asyncapi-3.0.0.json");
    let schema: Value = serde_json::from_str(text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn assert_valid(doc: &Value) {
    let v = validator();
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "not valid AsyncAPI 3.0:\n{}",
        errors.join("\n")
    );
}

/// Run the demo service with `RELIABLE_MQ_EXPORT=format`, its broker on a closed port.
fn export(format: &str) -> Output {
    Command::new(APP)
        .env("RELIABLE_MQ_EXPORT", format)
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
        .env_remove("REDIS_URL")
        .output()
        .expect("run the demo service")
}

#[test]
fn the_validator_rejects_a_broken_document() {
    let broken = serde_json::json!({ "asyncapi": "3.0.0", "channels": { "x": { "address": 7 } } });
    assert!(!validator().is_valid(&broken));
}

#[test]
fn run_prints_json_and_exits_0_without_the_broker() {
    let out = export("asyncapi");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {:?}, stderr:\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("REDIS_URL"),
        "export must not start anything:\n{stderr}"
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_valid(&doc);
    println!(
        "{}",
        serde_json::to_string_pretty(&doc["operations"]["consume.operate_app.reserve_stock"])
            .unwrap_or_default()
    );

    let channels = doc["channels"].as_object().expect("channels");
    for id in [
        "exchange.operate-demo.shop.order.created",
        "queue.operate-demo.orders",
        "queue.operate-demo.orders.dlq",
        "exchange.operate-demo.orders.dlx.operate-demo.orders",
        "queue.operate-demo.orders.retry.5s",
        "queue.operate-demo.orders.retry.10s",
        "queue.operate-demo.emails",
        "queue.operate-demo.emails.dlq",
    ] {
        assert!(
            channels.contains_key(id),
            "no channel {id}: {:?}",
            channels.keys().collect::<Vec<_>>()
        );
    }
    let shop = &doc["channels"]["exchange.operate-demo.shop.order.created"]["bindings"]["amqp"];
    assert_eq!(shop["exchange"]["type"], "topic");
    let orders = &doc["channels"]["queue.operate-demo.orders"]["x-reliable-mq"];
    assert_eq!(
        orders["arguments"]["x-dead-letter-exchange"],
        "operate-demo.orders.dlx"
    );
    assert_eq!(orders["bindings"][0]["routingKey"], "order.created");
    let tier =
        &doc["channels"]["queue.operate-demo.orders.retry.10s"]["x-reliable-mq"]["arguments"];
    assert_eq!(tier["x-message-ttl"], 10_000);
    let emails = &doc["channels"]["queue.operate-demo.emails"]["x-reliable-mq"]["arguments"];
    assert_eq!(emails["x-queue-type"], "quorum");

    let ops = doc["operations"].as_object().expect("operations");
    let reserve = ops
        .values()
        .find(|o| o["x-reliable-mq"]["queue"] == "operate-demo.orders")
        .expect("an operation for the orders consumer");
    let s = &reserve["x-reliable-mq"];
    assert_eq!(reserve["action"], "receive");
    assert_eq!(
        (
            s["prefetch"].as_u64(),
            s["concurrency"].as_u64(),
            s["maxRetries"].as_u64()
        ),
        (Some(16), Some(4), Some(2))
    );
    assert_eq!(
        (
            s["idempotent"].as_bool(),
            s["dedupTtl"].as_str(),
            s["retryDelay"].as_str()
        ),
        (Some(true), Some("12h"), Some("5s"))
    );
    let emails_op = ops
        .values()
        .find(|o| o["x-reliable-mq"]["queue"] == "operate-demo.emails")
        .expect("an operation for the emails consumer");
    assert_eq!(
        emails_op["x-reliable-mq"]["deliveryLimit"], 8,
        "quorum: max_retries + 5"
    );
}

#[test]
fn run_prints_yaml_that_reads_back_as_the_same_document() {
    let json = export("asyncapi");
    let yaml = export("asyncapi-yaml");
    assert!(
        yaml.status.success(),
        "{}",
        String::from_utf8_lossy(&yaml.stderr)
    );
    let text = String::from_utf8_lossy(&yaml.stdout);
    assert!(text.starts_with("asyncapi: \"3.0.0\""), "{text}");
    let from_yaml: Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    let from_json: Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(from_yaml, from_json);
    assert_valid(&from_yaml);
}

#[test]
fn an_unknown_export_format_is_an_error_not_a_silent_start() {
    let out = export("openapi");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("asyncapi-yaml"),
        "names the valid choices:\n{stderr}"
    );
}

#[test]
fn app_asyncapi_from_code_names_the_payload_type() {
    #[derive(serde::Deserialize)]
    struct Invoice {
        #[allow(dead_code)]
        id: u64,
    }
    let app = App::new(Config::default()).consumer(
        ConsumerConfig::new(
            "billing",
            "billing.dlx",
            handler_fn(|_: Invoice| async { Ok::<_, HandlerError>(()) }),
        )
        .with_exchange("finance", ExchangeKind::Direct, "invoice.due")
        .with_retries(
            4,
            std::time::Duration::from_secs(2),
            reliable_mq::RetryBackoff::Fixed,
        )
        .quorum(Some(12)),
    );
    let doc: Value = serde_json::from_str(&app.asyncapi(ExportFormat::Json)).expect("JSON");
    assert_valid(&doc);
    let op = &doc["operations"]["consume.billing"]["x-reliable-mq"];
    assert!(
        op["payloadType"]
            .as_str()
            .is_some_and(|t| t.ends_with("Invoice")),
        "{op}"
    );
    assert_eq!(op["deliveryLimit"], 12);
    let msg = doc["components"]["messages"].as_object().expect("messages");
    assert!(
        msg.contains_key("Invoice.billing"),
        "{:?}",
        msg.keys().collect::<Vec<_>>()
    );
    let yaml: Value = serde_yaml_ng::from_str(&app.asyncapi(ExportFormat::Yaml)).expect("YAML");
    assert_eq!(yaml, doc);
}

/// Every consumer option that changes delivery shows in the export, as the macro wrote
/// it: single active consumer (a queue argument too), priority (a consume argument),
/// exclusive, timeout, the broker's `consumer_timeout`, and `inbox`.
#[test]
fn the_export_shows_every_consumer_option() {
    let out = export("asyncapi");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_valid(&doc);
    let op = |queue: &str| {
        doc["operations"]
            .as_object()
            .and_then(|ops| {
                ops.values()
                    .find(|o| o["x-reliable-mq"]["queue"] == queue)
                    .map(|o| o["x-reliable-mq"].clone())
            })
            .unwrap_or_else(|| panic!("an operation for {queue}"))
    };
    let audit = op("operate-demo.audit");
    assert_eq!(audit["singleActiveConsumer"], true, "{audit}");
    assert_eq!(audit["priority"], 7, "{audit}");
    assert_eq!(audit["consumeArguments"]["x-priority"], 7, "{audit}");
    assert_eq!(audit["exclusive"], false, "{audit}");
    assert_eq!(audit["timeout"], "2m", "{audit}");
    assert_eq!(audit["brokerConsumerTimeout"], "30m", "{audit}");
    assert_eq!(audit["inbox"], false, "{audit}");
    assert_eq!(
        doc["channels"]["queue.operate-demo.audit"]["x-reliable-mq"]["arguments"]["x-single-active-consumer"],
        true
    );
    let reports = op("operate-demo.reports");
    assert_eq!(
        (
            &reports["exclusive"],
            &reports["singleActiveConsumer"],
            &reports["priority"]
        ),
        (&Value::from(true), &Value::from(false), &Value::from(0)),
        "{reports}"
    );
    assert_eq!(reports["consumeArguments"], serde_json::json!({}));

    let inbox =
        App::new(Config::default().with_consumer_timeout(std::time::Duration::from_secs(600)))
            .consumer(
                ConsumerConfig::new(
                    "ledger",
                    "ledger.dlx",
                    handler_fn(|_: u64| async { Ok::<_, HandlerError>(()) }),
                )
                .inbox(std::time::Duration::from_secs(7 * 24 * 3600)),
            );
    let doc: Value = serde_json::from_str(&inbox.asyncapi(ExportFormat::Json)).expect("JSON");
    assert_valid(&doc);
    let s = &doc["operations"]["consume.ledger"]["x-reliable-mq"];
    assert_eq!(
        (
            &s["inbox"],
            &s["idempotent"],
            &s["dedupTtl"],
            &s["brokerConsumerTimeout"]
        ),
        (
            &Value::from(true),
            &Value::from(false),
            &Value::from("168h"),
            &Value::from("10m")
        ),
        "{s}"
    );
}

/// Where a property's `$ref` points: draft 7 ignores siblings of `$ref`, so schemars
/// wraps a reference with a description in `allOf`.
fn reference(property: &Value) -> Option<&str> {
    property["$ref"]
        .as_str()
        .or_else(|| property["allOf"][0]["$ref"].as_str())
}

/// `#[consumer(schema)]`: the payload's JSON Schema is the message payload, its nested
/// types are components the `$ref`s point to, and the document stays valid AsyncAPI 3.0.
#[test]
fn the_export_carries_the_payload_json_schema() {
    for format in ["asyncapi", "asyncapi-yaml"] {
        let out = export(format);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = if format == "asyncapi" {
            serde_json::from_slice(&out.stdout).expect("JSON")
        } else {
            serde_yaml_ng::from_slice(&out.stdout).expect("YAML")
        };
        assert_valid(&doc);
        let msg = &doc["components"]["messages"]["AuditEvent.operate-demo.audit"];
        let payload = &msg["payload"];
        println!(
            "{}",
            serde_json::to_string_pretty(payload).unwrap_or_default()
        );
        assert_eq!(payload["title"], "AuditEvent", "{payload}");
        assert_eq!(payload["type"], "object", "{payload}");
        assert_eq!(
            payload["required"],
            serde_json::json!(["actor", "target"]),
            "{payload}"
        );
        assert_eq!(payload["properties"]["actor"]["type"], "string");
        assert_eq!(
            payload["properties"]["actor"]["description"], "Who did it.",
            "doc comments become descriptions"
        );
        let target = reference(&payload["properties"]["target"]).expect("a reference");
        let target = target
            .strip_prefix("#/components/schemas/")
            .expect("to a component");
        let schema = &doc["components"]["schemas"][target];
        assert_eq!(schema["properties"]["id"]["type"], "integer", "{schema}");
        assert!(
            payload.get("$schema").is_none() && payload.get("components").is_none(),
            "{payload}"
        );
        // A consumer without `schema` keeps the type-name description.
        let order = &doc["components"]["messages"]["Order.operate-demo.orders"]["payload"];
        assert!(order.get("properties").is_none(), "{order}");
    }
}

/// Two payload types whose nested types share a name but not a shape: each keeps its
/// own component, and each payload's reference points at its own.
#[test]
fn clashing_schema_names_get_their_own_components() {
    // Only their schemas are read.
    #[allow(dead_code)]
    mod a {
        #[derive(schemars::JsonSchema)]
        pub struct Item {
            pub sku: String,
        }
        #[derive(schemars::JsonSchema)]
        pub struct Cart {
            pub item: Item,
        }
    }
    #[allow(dead_code)]
    mod b {
        #[derive(schemars::JsonSchema)]
        pub struct Item {
            pub weight: u32,
        }
        #[derive(schemars::JsonSchema)]
        pub struct Parcel {
            pub item: Item,
        }
    }
    let h = || handler_fn(|_: u64| async { Ok::<_, HandlerError>(()) });
    let app = App::new(Config::default())
        .consumer(ConsumerConfig::new("carts", "carts.dlx", h()).with_payload_schema::<a::Cart>())
        .consumer(
            ConsumerConfig::new("parcels", "parcels.dlx", h()).with_payload_schema::<b::Parcel>(),
        );
    let doc: Value = serde_json::from_str(&app.asyncapi(ExportFormat::Json)).expect("JSON");
    assert_valid(&doc);
    let target = |queue: &str, field: &str| {
        let r = reference(
            &doc["components"]["messages"][format!("u64.{queue}")]["payload"]["properties"]["item"],
        )
        .unwrap_or_default()
        .trim_start_matches("#/components/schemas/")
        .to_owned();
        let schema = &doc["components"]["schemas"][&r];
        assert!(
            schema["properties"].get(field).is_some(),
            "{queue}: {r} is {schema}"
        );
        r
    };
    assert_ne!(target("carts", "sku"), target("parcels", "weight"));
}

/// `RELIABLE_MQ_EXPORT=asyncapi ./service | head -3`: a reader that stops reading is the
/// shell's normal way to end a writer. The export then exits 0 with nothing on stderr,
/// not with a config error. The pipe's read end is closed before the service writes, so
/// every write hits the broken pipe.
#[test]
fn a_closed_stdout_ends_the_export_quietly() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(APP)
        .env("RELIABLE_MQ_EXPORT", "asyncapi")
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
        .env_remove("REDIS_URL")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run the demo service");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {:?}, stderr:\n{stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "stderr:\n{stderr}");
}
