//! Rule tests on token streams: fast, and they pin which errors each input produces.
//! What the errors look like in rustc's output is pinned by the trybuild cases in
//! `tests/ui/fail`.

use proc_macro2::TokenStream;

use crate::expand::analyze;

const HANDLER: &str = "async fn handle(order: Order) -> Result<(), HandlerError> { Ok(()) }";

fn tokens(text: &str) -> TokenStream {
    match text.parse() {
        Ok(tokens) => tokens,
        Err(e) => panic!("test input {text:?} does not lex: {e}"),
    }
}

/// Every error message for `#[consumer(args)] item`, in order.
fn errors_for(args: &str, item: &str) -> Vec<String> {
    match analyze(tokens(args), tokens(item)) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.into_iter().map(|e| e.to_string()).collect(),
    }
}

fn errors(args: &str) -> Vec<String> {
    errors_for(args, HANDLER)
}

/// Exactly one error, containing every one of `parts`.
#[track_caller]
fn assert_one_error(args: &str, parts: &[&str]) {
    assert_one_error_for(args, HANDLER, parts);
}

#[track_caller]
fn assert_one_error_for(args: &str, item: &str, parts: &[&str]) {
    let errors = errors_for(args, item);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    for part in parts {
        assert!(
            errors[0].contains(part),
            "{:?} does not contain {part:?}",
            errors[0]
        );
    }
}

const OK: &str = r#"queue = "orders", dlx = "orders.dlx""#;

#[test]
fn minimal_and_full_attributes_are_accepted() {
    assert_eq!(errors(OK), Vec::<String>::new());
    let all = r#"queue = "orders", exchange = "shop", exchange_type = "direct",
        routing_key = "order.created", dlx = "orders.dlx", dlq = "orders.dead",
        queue_type = "quorum", delivery_limit = 10, prefetch = 64, concurrency = 64,
        max_retries = 5, retry_delay = "500ms", retry_backoff = "exponential:3",
        timeout = "2m", idempotent, dedup_ttl = "7d""#;
    assert_eq!(errors(all), Vec::<String>::new());
    assert_eq!(errors(&format!("{OK},")), Vec::<String>::new());
}

#[test]
fn required_keys() {
    assert_one_error(r#"dlx = "x""#, &["missing `queue`"]);
    assert_one_error(
        r#"queue = "orders""#,
        &["missing `dlx`", r#"dlx = "orders.dlx""#],
    );
    let both = errors("");
    assert_eq!(both.len(), 2, "{both:#?}");
    assert!(both[1].contains(r#"dlx = "<queue>.dlx""#));
    // A misspelled key is reported as such, not also as missing.
    assert_one_error(
        r#"queue = "orders", dead_letter_exchange = "x""#,
        &["did you mean `dlx`?"],
    );
    assert_one_error(r#"qeue = "orders", dlx = "x""#, &["did you mean `queue`?"]);
    // An empty queue name is no base for a suggestion.
    let empty = errors(r#"queue = """#);
    assert!(
        empty.iter().any(|e| e.contains(r#"dlx = "<queue>.dlx""#)),
        "{empty:#?}"
    );
    // A queue with a wrong value is reported as such, not also as missing.
    assert_one_error(r#"queue = 5, dlx = "x""#, &[r#"write `queue = "5"`"#]);
}

#[test]
fn max_retries_without_dlx_is_one_error() {
    assert_one_error(
        r#"queue = "orders", max_retries = 5"#,
        &["missing `dlx`", "max_retries = 5", r#"dlx = "orders.dlx""#],
    );
    assert_one_error(r#"queue = "orders", max_retries = 0"#, &["max_retries = 0"]);
}

#[test]
fn unknown_and_duplicate_keys() {
    assert_one_error(
        &format!("{OK}, prefech = 10"),
        &[
            "unknown key `prefech`; did you mean `prefetch`?",
            "valid keys: queue, exchange",
        ],
    );
    assert_one_error(
        &format!("{OK}, colour = 1"),
        &["unknown key `colour`; valid keys"],
    );
    assert_one_error(&format!("{OK}, a::b = 1"), &["expected a key"]);
    assert_one_error(
        &format!("{OK}, prefetch = 1, prefetch = 2"),
        &["duplicate key `prefetch`"],
    );
    assert_one_error(&format!("{OK}, queue = \"b\""), &["duplicate key `queue`"]);
}

#[test]
fn value_types() {
    assert_one_error(
        &format!("{OK}, prefetch = \"10\""),
        &["remove the quotes, `prefetch = 10`"],
    );
    assert_one_error(
        &format!("{OK}, prefetch = true"),
        &["expects an integer, found a boolean"],
    );
    assert_one_error(&format!("{OK}, prefetch = -1"), &["cannot be negative"]);
    assert_one_error(
        &format!("{OK}, prefetch = PREFETCH"),
        &["needs the literal itself"],
    );
    assert_one_error(&format!("{OK}, prefetch"), &["`prefetch` needs a value"]);
    assert_one_error(
        &format!("{OK}, prefetch(3)"),
        &["write `prefetch = 32`, with `=`"],
    );
    assert_one_error(
        &format!("{OK}, exchange = SHOP"),
        &["expects a string literal"],
    );
    assert_one_error(
        &format!("{OK}, timeout = 30"),
        &[
            r#"`timeout = "30ms"` for milliseconds"#,
            r#"`timeout = "30s"` for seconds"#,
        ],
    );
    assert_one_error(
        &format!("{OK}, exchange = \"x\", exchange_type = fanout"),
        &[r#"write `exchange_type = "fanout"`"#],
    );
}

#[test]
fn names() {
    assert_one_error(r#"queue = "", dlx = "x""#, &["`queue` cannot be empty"]);
    assert_one_error(&format!("{OK}, exchange = \"\""), &["remove `exchange`"]);
    let long = "q".repeat(256);
    assert_one_error(
        &format!("queue = \"{long}\", dlx = \"x\""),
        &["256 bytes long; AMQP allows at most 255"],
    );
    // The longest queue whose derived names (`.dlq`, `.retry.4s`) still fit.
    assert_eq!(
        errors(&format!("queue = \"{}\", dlx = \"x\"", "q".repeat(246))),
        Vec::<String>::new()
    );
    let errors_255 = errors(&format!("queue = \"{}\", dlx = \"x\"", "q".repeat(255)));
    assert_eq!(errors_255.len(), 2, "{errors_255:#?}");
    assert!(errors_255[0].contains("`{queue}.dlq` would be 259 bytes"));
    assert!(errors_255[1].contains("retry queue name"));
    assert_eq!(
        errors(&format!(
            "queue = \"{}\", dlx = \"x\", dlq = \"d\", max_retries = 0",
            "q".repeat(255)
        )),
        Vec::<String>::new()
    );
    assert_one_error(
        &format!("{OK}, exchange = \"amq.topic\""),
        &["reserved by RabbitMQ", r#"`exchange = "events"`"#],
    );
    assert_one_error(
        r#"queue = "orders", dlx = "amq.dlx""#,
        &["reserved by RabbitMQ", r#"`dlx = "orders.dlx"`"#],
    );
    assert_one_error(
        &format!("{OK}, dlq = \"amq.dlq\""),
        &["reserved by RabbitMQ", r#"`dlq = "orders.dlq"`"#],
    );
    assert_one_error(
        r#"queue = "amq.orders", dlx = "x""#,
        &[r#"reserved by RabbitMQ"#, r#"e.g. `queue = "orders"`"#],
    );
}

#[test]
fn dead_letter_loops() {
    assert_one_error(
        r#"queue = "orders", exchange = "shop", dlx = "shop""#,
        &["`dlx` is the same exchange as `exchange`"],
    );
    assert_one_error(
        &format!("{OK}, dlq = \"orders\""),
        &["`dlq` is the consumed queue"],
    );
}

#[test]
fn routing_rules() {
    assert_one_error(
        &format!("{OK}, routing_key = \"a\""),
        &["`routing_key` needs `exchange`"],
    );
    assert_one_error(
        &format!("{OK}, exchange_type = \"direct\""),
        &["`exchange_type` needs `exchange`"],
    );
    assert_one_error(
        &format!("{OK}, exchange = \"e\", exchange_type = \"fanout\", routing_key = \"a\""),
        &["`fanout` exchange ignores routing keys"],
    );
    assert_one_error(
        &format!("{OK}, exchange = \"e\", exchange_type = \"headers\", routing_key = \"a\""),
        &["`headers` exchange"],
    );
    assert_one_error(
        &format!("{OK}, exchange = \"e\", exchange_type = \"fanuot\""),
        &[
            r#"did you mean "fanout"?"#,
            r#""direct", "topic", "fanout", "headers""#,
        ],
    );
    assert_one_error(
        &format!("{OK}, queue_type = \"qourum\""),
        &[r#"did you mean "quorum"?"#],
    );
    assert_one_error(
        &format!("{OK}, queue_type = \"stream\""),
        &["stream queues are not supported"],
    );
}

#[test]
fn numeric_ranges() {
    assert_one_error(&format!("{OK}, prefetch = 0"), &["0 means unlimited"]);
    assert_one_error(&format!("{OK}, prefetch = 65536"), &["from 1 to 65535"]);
    assert_one_error(&format!("{OK}, concurrency = 0"), &["at least 1"]);
    assert_one_error(
        &format!("{OK}, concurrency = 33"),
        &[
            "exceeds the default `prefetch = 32`",
            "raise `prefetch` to at least 33",
        ],
    );
    assert_one_error(
        &format!("{OK}, prefetch = 8, concurrency = 9"),
        &["exceeds `prefetch = 8`"],
    );
    // A bad prefetch is not compared with concurrency: one error, not two.
    assert_one_error(
        &format!("{OK}, prefetch = 0, concurrency = 4"),
        &["0 means unlimited"],
    );
    assert_one_error(
        &format!("{OK}, max_retries = 4294967296"),
        &["at most 4294967295"],
    );
    assert_one_error(
        &format!("{OK}, queue_type = \"quorum\", delivery_limit = 0"),
        &["`delivery_limit` must be at least 1"],
    );
    assert_one_error(
        &format!("{OK}, prefetch = 99999999999999999999"),
        &["far too large"],
    );
}

#[test]
fn flag_and_dependent_keys() {
    assert_one_error(
        &format!("{OK}, delivery_limit = 5"),
        &["add `queue_type = \"quorum\"`"],
    );
    assert_one_error(
        &format!("{OK}, queue_type = \"classic\", delivery_limit = 5"),
        &["this one is classic"],
    );
    assert_one_error(&format!("{OK}, dedup_ttl = \"1h\""), &["add `idempotent`"]);
    assert_one_error(
        &format!("{OK}, idempotent = true"),
        &["write just `idempotent`"],
    );
    assert_one_error(
        &format!("{OK}, idempotent = false"),
        &["remove it to turn deduplication off"],
    );
}

#[test]
fn durations_and_backoff() {
    assert_one_error(
        &format!("{OK}, timeout = \"0s\""),
        &["`timeout` is zero", "greater than zero"],
    );
    assert_one_error(
        &format!("{OK}, retry_delay = \"fast\""),
        &["invalid `retry_delay`"],
    );
    assert_one_error(
        &format!("{OK}, retry_backoff = \"linear\""),
        &["valid forms"],
    );
}

#[test]
fn all_errors_at_once() {
    let errors = errors_for(
        r#"prefech = 1, queue = "", concurrency = 0, timeout = "1.5s""#,
        "fn handle(a: A, b: B, c: C) {}",
    );
    assert_eq!(errors.len(), 9, "{errors:#?}");
}

#[test]
fn signatures() {
    assert_one_error_for(
        OK,
        "fn handle(o: Order) -> Result<(), E> { Ok(()) }",
        &["must be an `async fn`"],
    );
    assert_one_error_for(
        OK,
        "async unsafe fn handle(o: Order) -> Result<(), E> { Ok(()) }",
        &["`unsafe`"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(&self, o: Order) -> Result<(), E> { Ok(()) }",
        &["cannot take `self`"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(&self) -> Result<(), E> { Ok(()) }",
        &["cannot take `self`"],
    );
    assert_one_error_for(
        OK,
        "async fn handle<T>(o: T) -> Result<(), E> { Ok(()) }",
        &["cannot be generic"],
    );
    assert_one_error_for(
        OK,
        "async fn handle<'a>(o: Order) -> Result<(), E> { Ok(()) }",
        &["cannot be generic"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: impl Trait) -> Result<(), E> { Ok(()) }",
        &["`impl Trait`"],
    );
    assert_one_error_for(
        OK,
        "async fn handle() -> Result<(), E> { Ok(()) }",
        &["takes the decoded message"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: Order, d: &Delivery, x: u8) -> Result<(), E> { Ok(()) }",
        &["`&Delivery` and `State<S>` extractors", "State<u8>"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: Order, d: Delivery) -> Result<(), E> { Ok(()) }",
        &["take `&Delivery`"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: Order, d: &mut Delivery) -> Result<(), E> { Ok(()) }",
        &["not mutable"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: Order, d: u32) -> Result<(), E> { Ok(()) }",
        &["`u32` is neither"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: Order, a: &Delivery, b: &Delivery) -> Result<(), E> { Ok(()) }",
        &["at most once"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: Order, s: &State<Db>) -> Result<(), E> { Ok(()) }",
        &["by value"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(s: State<Db>, o: Order) -> Result<(), E> { Ok(()) }",
        &["extractors come after it"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: &str) -> Result<(), E> { Ok(()) }",
        &["take `String` instead"],
    );
    assert_one_error_for(
        OK,
        "async fn handle(o: Order) { }",
        &["add `-> Result<(), HandlerError>`"],
    );
    assert_one_error_for(OK, "struct Order;", &["not on a struct"]);
    assert_one_error_for(
        OK,
        "#[reliable_mq::consumer(queue = \"b\", dlx = \"b.dlx\")] async fn handle(o: Order) -> Result<(), E> { Ok(()) }",
        &["one `#[consumer]` per function"],
    );
    for ok in [
        "async fn handle(o: Order, d: &Delivery) -> Result<(), E> { Ok(()) }",
        "async fn handle(o: Order, d: &reliable_mq::Delivery) -> Result<(), E> { Ok(()) }",
        "pub(crate) async fn handle(mut o: Order, _: &'_ Delivery) -> Result<(), E> { Ok(()) }",
        "async fn handle(o: Order, State(db): State<Db>, d: &Delivery, s: State<S>) -> Result<(), E> { Ok(()) }",
        "async fn handle(o: Order, reliable_mq::State(db): reliable_mq::State<Db>) -> Result<(), E> { Ok(()) }",
    ] {
        assert_eq!(errors_for(OK, ok), Vec::<String>::new(), "{ok}");
    }
}

#[test]
fn expansion_names_only_private_paths() {
    let out = crate::expand::consumer(tokens(OK), tokens(HANDLER)).to_string();
    assert!(out.contains("struct handle { }"), "{out}");
    assert!(
        out.contains("static __RELIABLE_MQ_CONSUMER_HANDLE"),
        "{out}"
    );
    assert!(!out.contains("super"), "{out}");
    assert!(out.contains("ConsumerSpec :: new"), "{out}");
    let custom = crate::expand::consumer(
        tokens(&format!(
            "{OK}, prefetch = 7, timeout = \"2m\", retry_backoff = \"fixed\", idempotent"
        )),
        tokens(HANDLER),
    )
    .to_string();
    assert!(
        custom.contains(r#"Setting :: int ("prefetch" , 7u64)"#),
        "{custom}"
    );
    assert!(
        custom.contains(r#"Setting :: str ("timeout" , "2m")"#),
        "{custom}"
    );
    assert!(
        custom.contains(r#"Setting :: str ("retry_backoff" , "fixed")"#),
        "{custom}"
    );
    assert!(
        custom.contains(r#"Setting :: flag ("idempotent")"#),
        "{custom}"
    );
    let renamed =
        crate::expand::consumer(tokens(&format!("{OK}, crate = \"::rmq\"")), tokens(HANDLER))
            .to_string();
    assert!(
        renamed.contains(":: rmq :: __private :: ConsumerSpec"),
        "{renamed}"
    );
    assert!(!renamed.contains(":: reliable_mq ::"), "{renamed}");
}

#[test]
fn errors_keep_the_original_function() {
    let out = crate::expand::consumer(tokens("prefetch = 0"), tokens(HANDLER)).to_string();
    assert!(out.starts_with("async fn handle"), "{out}");
    assert!(out.contains("compile_error"), "{out}");
    assert!(!out.contains("struct handle"), "{out}");
}
