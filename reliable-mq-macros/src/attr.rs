//! Parsing `#[consumer(key = value, ...)]` into typed settings that remember where they
//! were written, so later checks can point at the offending token.
//!
//! This module checks the form of each value (a string where a string belongs, a
//! duration that parses); rules that relate keys to each other live in `check.rs`.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, Meta, Token, UnOp};

use crate::ctxt::Ctxt;
use crate::suggest;

/// Every key the attribute accepts, with the example shown in error messages.
pub const KEYS: &[(&str, &str)] = &[
    ("queue", r#"queue = "orders""#),
    ("exchange", r#"exchange = "shop""#),
    ("exchange_type", r#"exchange_type = "topic""#),
    ("routing_key", r#"routing_key = "order.created""#),
    ("dlx", r#"dlx = "orders.dlx""#),
    ("dlq", r#"dlq = "orders.dlq""#),
    ("queue_type", r#"queue_type = "quorum""#),
    ("delivery_limit", "delivery_limit = 10"),
    ("prefetch", "prefetch = 32"),
    ("concurrency", "concurrency = 4"),
    ("max_retries", "max_retries = 3"),
    ("retry_delay", r#"retry_delay = "1s""#),
    ("retry_backoff", r#"retry_backoff = "exponential""#),
    ("timeout", r#"timeout = "30s""#),
    ("idempotent", "idempotent"),
    ("dedup_ttl", r#"dedup_ttl = "24h""#),
];

/// Names people reach for from other libraries or the RabbitMQ docs, and our key for each.
const ALIASES: &[(&str, &str)] = &[
    ("name", "queue"),
    ("queue_name", "queue"),
    ("exchange_name", "exchange"),
    ("kind", "exchange_type"),
    ("binding_key", "routing_key"),
    ("dead_letter_exchange", "dlx"),
    ("x_dead_letter_exchange", "dlx"),
    ("dead_letter_queue", "dlq"),
    ("x_queue_type", "queue_type"),
    ("x_delivery_limit", "delivery_limit"),
    ("prefetch_count", "prefetch"),
    ("qos", "prefetch"),
    ("workers", "concurrency"),
    ("parallelism", "concurrency"),
    ("retries", "max_retries"),
    ("max_attempts", "max_retries"),
    ("backoff", "retry_backoff"),
    ("dedup", "idempotent"),
    ("deduplicate", "idempotent"),
];

/// Exchange types, as written in the attribute.
pub const EXCHANGE_TYPES: &[&str] = &["direct", "topic", "fanout", "headers"];

/// Queue types, as written in the attribute.
pub const QUEUE_TYPES: &[&str] = &["classic", "quorum"];

/// Duration units and their length in milliseconds.
const UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// A value from the attribute and the tokens it was written as.
pub struct Setting<T> {
    pub value: T,
    /// The value's tokens: errors about the value underline exactly these.
    pub tokens: TokenStream,
}

impl<T> ToTokens for Setting<T> {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        self.tokens.to_tokens(tokens);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Topic,
    Fanout,
    Headers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    Fixed,
    Exponential { factor: u32 },
}

/// The attribute's settings, each `None` when absent or when its value was invalid (an
/// error is already reported then; [`Args::has`] tells the two apart).
#[derive(Default)]
pub struct Args {
    /// Every key written, valid value or not, in order (duplicates excluded).
    pub keys: Vec<Ident>,
    /// Keys suggested for unknown ones (`dead_letter_exchange` → `dlx`): the "did you
    /// mean" error already covers them, so they are not also reported missing.
    pub suggested: Vec<&'static str>,
    pub queue: Option<Setting<String>>,
    pub exchange: Option<Setting<String>>,
    pub exchange_type: Option<Setting<ExchangeType>>,
    pub routing_key: Option<Setting<String>>,
    pub dlx: Option<Setting<String>>,
    pub dlq: Option<Setting<String>>,
    pub queue_type: Option<Setting<QueueType>>,
    pub delivery_limit: Option<Setting<u64>>,
    pub prefetch: Option<Setting<u64>>,
    pub concurrency: Option<Setting<u64>>,
    pub max_retries: Option<Setting<u64>>,
    /// Durations are in milliseconds.
    pub retry_delay: Option<Setting<u64>>,
    pub retry_backoff: Option<Setting<Backoff>>,
    pub timeout: Option<Setting<u64>>,
    pub idempotent: Option<Setting<()>>,
    pub dedup_ttl: Option<Setting<u64>>,
}

impl Args {
    /// The key as written, if it was written (even with an invalid value).
    pub fn key(&self, name: &str) -> Option<&Ident> {
        self.keys.iter().find(|key| *key == name)
    }

    /// Whether the key was written, even with an invalid value: a rule about a key that
    /// is present must not fire just because its value had its own error.
    pub fn has(&self, name: &str) -> bool {
        self.key(name).is_some()
    }
}

/// Parse the attribute's arguments. `None` when they are not even a comma-separated list
/// of `key = value` (the syntax error is reported; key rules would only add noise).
pub fn parse(cx: &mut Ctxt, tokens: TokenStream) -> Option<Args> {
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(metas) => metas,
        Err(error) => {
            cx.syn_error(error);
            return None;
        }
    };
    let mut args = Args::default();
    for meta in metas {
        parse_entry(cx, &mut args, &meta);
    }
    Some(args)
}

fn parse_entry(cx: &mut Ctxt, args: &mut Args, meta: &Meta) {
    let Some(key) = meta.path().get_ident() else {
        cx.error_spanned_by(
            meta.path(),
            format!("expected a key such as `queue`; valid keys: {}", key_list()),
        );
        return;
    };
    let name = key.to_string();
    if !KEYS.iter().any(|(known, _)| *known == name) {
        let suggestion = suggest_key(&name);
        args.suggested.extend(suggestion);
        cx.error_spanned_by(key, unknown_key_message(&name, suggestion));
        return;
    }
    if args.has(&name) {
        cx.error_spanned_by(
            key,
            format!(
                "duplicate key `{name}`: it is already set earlier in this attribute; keep one"
            ),
        );
        return;
    }
    args.keys.push(key.clone());

    if name == "idempotent" {
        args.idempotent = flag(cx, key, meta);
        return;
    }
    let Some(value) = value_of(cx, &name, meta) else {
        return;
    };
    match name.as_str() {
        "queue" => args.queue = string(cx, &name, value),
        "exchange" => args.exchange = string(cx, &name, value),
        "routing_key" => args.routing_key = string(cx, &name, value),
        "dlx" => args.dlx = string(cx, &name, value),
        "dlq" => args.dlq = string(cx, &name, value),
        "exchange_type" => args.exchange_type = choice(cx, &name, value, exchange_type),
        "queue_type" => args.queue_type = choice(cx, &name, value, queue_type),
        "retry_backoff" => args.retry_backoff = choice(cx, &name, value, backoff),
        "delivery_limit" => args.delivery_limit = integer(cx, &name, value),
        "prefetch" => args.prefetch = integer(cx, &name, value),
        "concurrency" => args.concurrency = integer(cx, &name, value),
        "max_retries" => args.max_retries = integer(cx, &name, value),
        "retry_delay" => args.retry_delay = duration(cx, &name, value),
        "timeout" => args.timeout = duration(cx, &name, value),
        "dedup_ttl" => args.dedup_ttl = duration(cx, &name, value),
        _ => {}
    }
}

fn key_list() -> String {
    let names: Vec<&str> = KEYS.iter().map(|(name, _)| *name).collect();
    names.join(", ")
}

fn example(name: &str) -> &'static str {
    KEYS.iter()
        .find(|(known, _)| *known == name)
        .map_or("", |(_, example)| example)
}

/// The key the user probably meant: a known alias, else the closest by edit distance.
fn suggest_key(name: &str) -> Option<&'static str> {
    let names: Vec<&'static str> = KEYS.iter().map(|(name, _)| *name).collect();
    let lower = name.to_lowercase();
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == lower)
        .map(|(_, key)| *key)
        .or_else(|| suggest::closest(name, &names))
}

fn unknown_key_message(name: &str, suggestion: Option<&str>) -> String {
    match suggestion {
        Some(key) => format!(
            "unknown key `{name}`; did you mean `{key}`? valid keys: {}",
            key_list()
        ),
        None => format!("unknown key `{name}`; valid keys: {}", key_list()),
    }
}

/// `idempotent` is a bare flag: a value would suggest `idempotent = false` turns it off.
fn flag(cx: &mut Ctxt, key: &Ident, meta: &Meta) -> Option<Setting<()>> {
    match meta {
        Meta::Path(_) => Some(Setting {
            value: (),
            tokens: key.to_token_stream(),
        }),
        Meta::NameValue(nv) if is_false(&nv.value) => {
            cx.error_spanned_by(
                meta,
                "`idempotent` is a flag and takes no value: remove it to turn deduplication off",
            );
            None
        }
        _ => {
            cx.error_spanned_by(
                meta,
                "`idempotent` is a flag and takes no value: write just `idempotent`",
            );
            None
        }
    }
}

fn is_false(expr: &Expr) -> bool {
    matches!(unwrap_group(expr), Expr::Lit(lit) if matches!(&lit.lit, Lit::Bool(b) if !b.value))
}

/// The value of `key = value`; `key` alone and `key(...)` are errors for valued keys.
fn value_of<'a>(cx: &mut Ctxt, name: &str, meta: &'a Meta) -> Option<&'a Expr> {
    match meta {
        Meta::NameValue(nv) => Some(unwrap_group(&nv.value)),
        Meta::Path(_) => {
            cx.error_spanned_by(
                meta,
                format!("`{name}` needs a value: write `{}`", example(name)),
            );
            None
        }
        Meta::List(_) => {
            cx.error_spanned_by(meta, format!("write `{}`, with `=`", example(name)));
            None
        }
    }
}

/// Values passed through a `macro_rules!` arrive wrapped in invisible groups.
fn unwrap_group(expr: &Expr) -> &Expr {
    match expr {
        Expr::Group(group) => unwrap_group(&group.expr),
        other => other,
    }
}

fn setting<T>(value: T, expr: &Expr) -> Option<Setting<T>> {
    Some(Setting {
        value,
        tokens: expr.to_token_stream(),
    })
}

/// What kind of thing the user wrote instead, for "expects X, found Y" messages.
fn describe(expr: &Expr) -> &'static str {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Str(_) => "a string",
            Lit::Int(_) => "an integer",
            Lit::Float(_) => "a float",
            Lit::Bool(_) => "a boolean",
            Lit::ByteStr(_) | Lit::CStr(_) => "a byte string",
            Lit::Byte(_) | Lit::Char(_) => "a character",
            _ => "a literal",
        },
        Expr::Unary(_) => "an expression",
        Expr::Path(_) => "a path",
        Expr::Macro(_) => "a macro call",
        _ => "an expression",
    }
}

/// Non-literal values (constants, macros) cannot be checked at compile time.
fn not_a_literal(cx: &mut Ctxt, name: &str, expr: &Expr, expected: &str) {
    cx.error_spanned_by(
        expr,
        format!(
            "`{name}` expects {expected} literal, found {}: the macro checks values at \
             compile time, so it needs the literal itself (`{}`); for settings decided at \
             run time, build a `reliable_mq::ConsumerConfig` instead",
            describe(expr),
            example(name)
        ),
    );
}

fn string(cx: &mut Ctxt, name: &str, expr: &Expr) -> Option<Setting<String>> {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Str(s) => return setting(s.value(), expr),
            Lit::Int(_) | Lit::Float(_) | Lit::Bool(_) => {
                let text = lit.lit.to_token_stream().to_string();
                cx.error_spanned_by(
                    expr,
                    format!(
                        "`{name}` expects a string, found {}: write `{name} = \"{text}\"`",
                        describe(expr)
                    ),
                );
            }
            _ => cx.error_spanned_by(
                expr,
                format!(
                    "`{name}` expects a string, found {}: write `{}`",
                    describe(expr),
                    example(name)
                ),
            ),
        },
        _ => not_a_literal(cx, name, expr, "a string"),
    }
    None
}

fn integer(cx: &mut Ctxt, name: &str, expr: &Expr) -> Option<Setting<u64>> {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            // `-1` may arrive as one literal token (as opposed to `-` then `1`).
            Lit::Int(int) if int.base10_digits().starts_with('-') => cx.error_spanned_by(
                expr,
                format!("`{name}` cannot be negative: write `{}`", example(name)),
            ),
            Lit::Int(int) => match int.base10_parse::<u64>() {
                Ok(value) => return setting(value, expr),
                Err(_) => cx.error_spanned_by(
                    expr,
                    format!("`{name}` is far too large: write e.g. `{}`", example(name)),
                ),
            },
            Lit::Str(s) if s.value().trim().parse::<u64>().is_ok() => cx.error_spanned_by(
                expr,
                format!(
                    "`{name}` expects an integer, not a string: remove the quotes, `{name} = {}`",
                    s.value().trim()
                ),
            ),
            _ => cx.error_spanned_by(
                expr,
                format!(
                    "`{name}` expects an integer, found {}: write `{}`",
                    describe(expr),
                    example(name)
                ),
            ),
        },
        Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => cx.error_spanned_by(
            expr,
            format!("`{name}` cannot be negative: write `{}`", example(name)),
        ),
        _ => not_a_literal(cx, name, expr, "an integer"),
    }
    None
}

/// Durations are strings (`"500ms"`), so that the unit is always written out.
fn duration(cx: &mut Ctxt, name: &str, expr: &Expr) -> Option<Setting<u64>> {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Str(s) => match parse_duration(&s.value()) {
                Ok(millis) => return setting(millis, expr),
                Err(why) => cx.error_spanned_by(expr, format!("invalid `{name}`: {why}")),
            },
            Lit::Int(int) => cx.error_spanned_by(
                expr,
                format!(
                    "`{name}` expects a duration string with a unit: write `{name} = \"{}s\"` \
                     (units: ms, s, m, h, d)",
                    int.base10_digits()
                ),
            ),
            _ => cx.error_spanned_by(
                expr,
                format!(
                    "`{name}` expects a duration string, found {}: write `{}` \
                     (units: ms, s, m, h, d)",
                    describe(expr),
                    example(name)
                ),
            ),
        },
        _ => not_a_literal(cx, name, expr, "a duration string"),
    }
    None
}

/// A string value from a fixed set (`exchange_type`, `queue_type`, `retry_backoff`).
fn choice<T>(
    cx: &mut Ctxt,
    name: &str,
    expr: &Expr,
    parse: fn(&str) -> Result<T, String>,
) -> Option<Setting<T>> {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Str(s) => match parse(&s.value()) {
                Ok(value) => return setting(value, expr),
                Err(why) => cx.error_spanned_by(expr, why),
            },
            _ => cx.error_spanned_by(
                expr,
                format!(
                    "`{name}` expects a string, found {}: write `{}`",
                    describe(expr),
                    example(name)
                ),
            ),
        },
        // `exchange_type = fanout`: a bare word, probably meant as the string.
        Expr::Path(path) if path.path.get_ident().is_some() => {
            let word = path.to_token_stream().to_string();
            cx.error_spanned_by(
                expr,
                format!("`{name}` expects a string: write `{name} = \"{word}\"`"),
            );
        }
        _ => not_a_literal(cx, name, expr, "a string"),
    }
    None
}

fn one_of(name: &str, value: &str, valid: &[&str]) -> String {
    let list: Vec<String> = valid.iter().map(|v| format!("\"{v}\"")).collect();
    let list = list.join(", ");
    match suggest::closest(value, valid) {
        Some(close) => {
            format!("unknown {name} \"{value}\"; did you mean \"{close}\"? valid choices: {list}")
        }
        None => format!("unknown {name} \"{value}\"; valid choices: {list}"),
    }
}

fn exchange_type(value: &str) -> Result<ExchangeType, String> {
    match value {
        "direct" => Ok(ExchangeType::Direct),
        "topic" => Ok(ExchangeType::Topic),
        "fanout" => Ok(ExchangeType::Fanout),
        "headers" => Ok(ExchangeType::Headers),
        _ => Err(one_of("exchange_type", value, EXCHANGE_TYPES)),
    }
}

fn queue_type(value: &str) -> Result<QueueType, String> {
    match value {
        "classic" => Ok(QueueType::Classic),
        "quorum" => Ok(QueueType::Quorum),
        "stream" => Err(
            "stream queues are not supported: a stream keeps messages after they are \
             acked, so acks cannot drive retries and dead-lettering; valid choices: \
             \"classic\", \"quorum\""
                .to_owned(),
        ),
        _ => Err(one_of("queue_type", value, QUEUE_TYPES)),
    }
}

/// `"fixed"`, `"exponential"` (factor 2) or `"exponential:N"` with N in 2..=10.
pub fn backoff(value: &str) -> Result<Backoff, String> {
    const FORMS: &str =
        "\"fixed\", \"exponential\" (factor 2) or \"exponential:N\" with N from 2 to 10";
    match value.split_once(':') {
        None if value == "fixed" => Ok(Backoff::Fixed),
        None if value == "exponential" => Ok(Backoff::Exponential { factor: 2 }),
        Some(("exponential", factor)) => match factor.trim().parse::<u32>() {
            Ok(1) => Err(format!(
                "retry_backoff \"{value}\" does not grow: use \"fixed\" for a constant delay, \
                 or a factor from 2 to 10"
            )),
            Ok(factor @ 2..=10) => Ok(Backoff::Exponential { factor }),
            Ok(_) => Err(format!(
                "retry_backoff factor must be from 2 to 10 (delays are capped at one hour \
                 anyway), found \"{value}\"; write e.g. \"exponential:3\""
            )),
            Err(_) => Err(format!(
                "retry_backoff \"{value}\" has no valid factor: write e.g. \"exponential:3\" \
                 (a whole number from 2 to 10)"
            )),
        },
        _ => {
            let head = value.split(':').next().unwrap_or(value);
            match suggest::closest(head, &["fixed", "exponential"]) {
                Some(close) => Err(format!(
                    "unknown retry_backoff \"{value}\"; did you mean \"{close}\"? valid forms: {FORMS}"
                )),
                None => Err(format!(
                    "unknown retry_backoff \"{value}\"; valid forms: {FORMS}"
                )),
            }
        }
    }
}

/// Parse `"<integer><unit>"` (units `ms`, `s`, `m`, `h`, `d`) into milliseconds.
/// The error says how to write it right.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    const FORM: &str =
        "write one integer and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"2h\", \"1d\"";
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(format!("\"{text}\" is not a duration: {FORM}"));
    }
    let Some(&(_, unit_millis)) = UNITS.iter().find(|(known, _)| *known == unit) else {
        return Err(unit_error(text, number, unit, FORM));
    };
    let count: u64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is too long a duration"))?;
    if count == 0 {
        return Err(format!(
            "\"{text}\" is zero; a duration must be greater than zero"
        ));
    }
    count
        .checked_mul(unit_millis)
        .ok_or_else(|| format!("\"{text}\" is too long a duration"))
}

fn unit_error(text: &str, number: &str, unit: &str, form: &str) -> String {
    if unit.is_empty() {
        return format!(
            "\"{text}\" has no unit: write \"{number}s\" for seconds (units: ms, s, m, h, d)"
        );
    }
    if unit.starts_with('.') || unit.starts_with(',') {
        return format!(
            "\"{text}\" is not a whole number: use a smaller unit (\"1500ms\" rather than \"1.5s\"); {form}"
        );
    }
    let trimmed = unit.trim();
    let canonical = match trimmed.to_lowercase().as_str() {
        "ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => Some("ms"),
        "s" | "sec" | "secs" | "second" | "seconds" => Some("s"),
        "m" | "min" | "mins" | "minute" | "minutes" => Some("m"),
        "h" | "hr" | "hrs" | "hour" | "hours" => Some("h"),
        "d" | "day" | "days" => Some("d"),
        _ => None,
    };
    match canonical {
        Some(short) => format!("write \"{text}\" as \"{number}{short}\" (units: ms, s, m, h, d)"),
        None if matches!(trimmed, "us" | "µs" | "ns") => {
            format!("\"{text}\" is below a millisecond, the smallest unit; {form}")
        }
        None => format!("unknown unit \"{unit}\" in \"{text}\"; {form}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("1s"), Ok(1_000));
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("5m"), Ok(300_000));
        assert_eq!(parse_duration("2h"), Ok(7_200_000));
        assert_eq!(parse_duration("1d"), Ok(86_400_000));
        assert_eq!(parse_duration("24h"), Ok(86_400_000));
        assert_eq!(parse_duration("007s"), Ok(7_000));
    }

    fn error(text: &str) -> String {
        match parse_duration(text) {
            Ok(millis) => panic!("{text:?} parsed as {millis}ms"),
            Err(why) => why,
        }
    }

    #[test]
    fn zero_is_rejected() {
        assert!(error("0s").contains("greater than zero"));
        assert!(error("0ms").contains("greater than zero"));
    }

    #[test]
    fn malformed_durations_say_how_to_write_them() {
        assert!(error("").contains("not a duration"));
        assert!(error("s").contains("not a duration"));
        assert!(error("-1s").contains("not a duration"));
        assert!(error(" 1s").contains("not a duration"));
        assert!(error("30").contains("write \"30s\""));
        assert!(error("1.5s").contains("\"1500ms\""));
        assert!(error("5min").contains("\"5m\""));
        assert!(error("10 s").contains("\"10s\""));
        assert!(error("2Hours").contains("\"2h\""));
        assert!(error("10us").contains("below a millisecond"));
        assert!(error("3w").contains("unknown unit \"w\""));
        assert!(error("1s30ms").contains("unknown unit"));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert!(error("99999999999999999999s").contains("too long"));
        assert!(error("18446744073709551615d").contains("too long"));
        assert_eq!(parse_duration("18446744073709551615ms"), Ok(u64::MAX));
    }

    #[test]
    fn backoffs() {
        assert_eq!(backoff("fixed"), Ok(Backoff::Fixed));
        assert_eq!(
            backoff("exponential"),
            Ok(Backoff::Exponential { factor: 2 })
        );
        assert_eq!(
            backoff("exponential:3"),
            Ok(Backoff::Exponential { factor: 3 })
        );
        assert_eq!(
            backoff("exponential:10"),
            Ok(Backoff::Exponential { factor: 10 })
        );
        assert!(backoff("exponential:1").is_err_and(|e| e.contains("\"fixed\"")));
        assert!(backoff("exponential:11").is_err_and(|e| e.contains("from 2 to 10")));
        assert!(backoff("exponential:x").is_err_and(|e| e.contains("no valid factor")));
        assert!(backoff("exponentail").is_err_and(|e| e.contains("did you mean \"exponential\"")));
        assert!(backoff("fixed:2").is_err_and(|e| e.contains("did you mean \"fixed\"")));
        assert!(backoff("linear").is_err_and(|e| !e.contains("did you mean")));
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        assert_eq!(suggest_key("prefech"), Some("prefetch"));
        assert_eq!(suggest_key("dead_letter_exchange"), Some("dlx"));
        assert_eq!(suggest_key("Dead_Letter_Exchange"), Some("dlx"));
        assert_eq!(suggest_key("retries"), Some("max_retries"));
        assert_eq!(suggest_key("colour"), None);
        let typo = unknown_key_message("prefech", Some("prefetch"));
        assert!(typo.contains("did you mean `prefetch`?"), "{typo}");
        let unrelated = unknown_key_message("colour", None);
        assert!(!unrelated.contains("did you mean"));
        assert!(unrelated.contains("valid keys: queue, exchange, exchange_type"));
    }
}
