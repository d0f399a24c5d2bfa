//! The DLQ tool behind the `reliable-mq` binary (feature `cli`): list, show, replay and
//! purge dead letters. The functions here are what the binary runs, so programs and tests
//! can call them too.
//!
//! # Reading a queue without losing messages
//!
//! A queue cannot be read without taking messages off it, so every command walks the DLQ
//! once with `basic.get` *without* auto-ack, up to the number of messages it held when the
//! walk began (dead letters arriving meanwhile wait for the next run, and a replayed
//! message that fails again cannot be met twice). A message the command acts on is acked
//! only once its action is durable (a replay: after the broker confirmed the republished
//! copy; a purge: at once). Every other message stays unacked until the end, then all of
//! them go back with one `basic.nack(requeue)`. If the tool dies, the broker requeues
//! whatever it held: nothing is lost. A classic queue puts requeued messages back in their
//! original positions; a quorum queue puts them at its back, so the order of a quorum DLQ
//! changes each time it is read.
//!
//! Replay is an at-least-once move: killed between a copy's confirm and the dead letter's
//! ack, the dead letter stays and a second run republishes it with the same `message_id`
//! (an `idempotent` consumer drops the duplicate). Each replay increments `x-replays`;
//! past [`ReplayOptions::max_replays`] a dead letter is refused, so a message that keeps
//! failing cannot go round forever.

use std::collections::BTreeMap;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use serde_json::{Value, json};

use crate::failure::{self, header};
use crate::publisher::Publisher;
use crate::{Config, Error};

/// The header a replay increments on the message it republishes.
pub const REPLAYS: &str = "x-replays";

/// How many replays a dead letter may have had before [`replay`] refuses it (default).
pub const DEFAULT_MAX_REPLAYS: i64 = 3;

/// Replayed copies awaiting their confirm at once.
const IN_FLIGHT: usize = 64;

/// One dead letter as the tool shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The AMQP `message_id`.
    pub message_id: Option<String>,
    /// `x-error-kind`.
    pub error_kind: Option<String>,
    /// `x-exception-message`.
    pub exception_message: Option<String>,
    /// `x-attempts`.
    pub attempts: Option<i64>,
    /// `x-first-failure`, Unix milliseconds.
    pub first_failure: Option<i64>,
    /// `x-last-failure`, Unix milliseconds.
    pub last_failure: Option<i64>,
    /// `x-replays` (0 when never replayed).
    pub replays: i64,
    /// `x-original-exchange`.
    pub original_exchange: Option<String>,
    /// `x-original-routing-key`.
    pub original_routing_key: Option<String>,
    /// `x-original-queue`.
    pub original_queue: Option<String>,
}

impl DeadLetter {
    fn of(properties: &BasicProperties) -> Self {
        let h = properties.headers().as_ref();
        let s = |k| failure::header_str(h, k).map(str::to_owned);
        Self {
            message_id: properties.message_id().as_ref().map(|m| m.to_string()),
            error_kind: s(header::ERROR_KIND),
            exception_message: s(header::EXCEPTION_MESSAGE),
            attempts: failure::header_int(h, header::ATTEMPTS),
            first_failure: failure::header_int(h, header::FIRST_FAILURE),
            last_failure: failure::header_int(h, header::LAST_FAILURE),
            replays: failure::header_int(h, REPLAYS).unwrap_or(0),
            original_exchange: s(header::ORIGINAL_EXCHANGE).or_else(|| first_death(h, "exchange")),
            original_routing_key: s(header::ORIGINAL_ROUTING_KEY)
                .or_else(|| first_death(h, "routing-keys")),
            original_queue: s(header::ORIGINAL_QUEUE).or_else(|| first_death(h, "queue")),
        }
    }
}

/// A field of the broker's oldest `x-death` entry: a message dead-lettered by the broker
/// itself (a quorum queue's delivery limit, a plain reject) has no `x-original-*` headers,
/// but `x-death` says where it came from. `routing-keys` gives its first key.
fn first_death(headers: Option<&FieldTable>, field: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    // The broker keeps the most recent death first.
    let AMQPValue::FieldTable(oldest) = deaths.as_slice().last()? else {
        return None;
    };
    let value = match oldest.inner().get(field)? {
        AMQPValue::FieldArray(a) => a.as_slice().first()?.clone(),
        v => v.clone(),
    };
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Which dead letters a command acts on; empty parts match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these `message_id`s.
    pub ids: Vec<String>,
    /// Only these `x-error-kind`s.
    pub kinds: Vec<String>,
    /// Only dead letters whose last failure is at or after this (Unix ms).
    pub since: Option<i64>,
    /// Only dead letters whose last failure is before this (Unix ms).
    pub before: Option<i64>,
}

impl Filter {
    /// Whether `d` passes.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let when = d.last_failure.or(d.first_failure);
        (self.ids.is_empty() || d.message_id.as_ref().is_some_and(|m| self.ids.contains(m)))
            && (self.kinds.is_empty()
                || d.error_kind
                    .as_ref()
                    .is_some_and(|k| self.kinds.contains(k)))
            && self.since.is_none_or(|s| when.is_some_and(|w| w >= s))
            && self.before.is_none_or(|b| when.is_some_and(|w| w < b))
    }
}

/// One walk over a DLQ: see the module docs.
struct Walk {
    connection: Connection,
    channel: Channel,
    queue: String,
    left: u32,
    last_tag: Option<u64>,
}

impl Walk {
    async fn open(config: &Config, queue: &str) -> Result<Self, Error> {
        let connection = crate::connection::open(config, "dlq tool").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("opening a channel", e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let left = match channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => q.message_count(),
            Err(e) => {
                let _ = connection.close(200, "no such queue".into()).await;
                return Err(Error::Config(format!(
                    "cannot open queue '{queue}' (does it exist on this vhost?): {e}"
                )));
            }
        };
        Ok(Self {
            connection,
            channel,
            queue: queue.to_owned(),
            left,
            last_tag: None,
        })
    }

    /// The next message, unacked; `None` at the end of the walk.
    async fn next(&mut self) -> Result<Option<lapin::message::Delivery>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| Error::amqp(format!("reading queue '{}'", self.queue), e))?;
        Ok(got.map(|m| {
            self.last_tag = Some(m.delivery.delivery_tag);
            m.delivery
        }))
    }

    async fn ack(&self, tag: u64) -> Result<(), Error> {
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| Error::amqp("acking a dead letter", e))
    }

    /// Put back every message still held (one nack for all), then close.
    async fn finish(self) -> Result<(), Error> {
        let requeued = match self.last_tag {
            Some(tag) => self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| Error::amqp("returning messages to the queue", e)),
            None => Ok(()),
        };
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
        requeued
    }
}

/// The dead letters of `dlq` that pass `filter`, in queue order. The queue is unchanged.
pub async fn list(config: &Config, dlq: &str, filter: &Filter) -> Result<Vec<DeadLetter>, Error> {
    let mut walk = Walk::open(config, dlq).await?;
    let mut out = Vec::new();
    let result: Result<(), Error> = async {
        while let Some(d) = walk.next().await? {
            let letter = DeadLetter::of(&d.properties);
            if filter.matches(&letter) {
                out.push(letter);
            }
        }
        Ok(())
    }
    .await;
    let finished = walk.finish().await;
    result.and(finished).map(|()| out)
}

/// One dead letter in full: its properties, headers and body (pretty JSON when the body
/// is JSON). `None` when no message of `dlq` has `message_id`. The queue is unchanged.
pub async fn show(config: &Config, dlq: &str, message_id: &str) -> Result<Option<Value>, Error> {
    let mut walk = Walk::open(config, dlq).await?;
    let result: Result<Option<Value>, Error> = async {
        while let Some(d) = walk.next().await? {
            if d.properties.message_id().as_ref().map(|m| m.as_str()) == Some(message_id) {
                return Ok(Some(describe(&d)));
            }
        }
        Ok(None)
    }
    .await;
    let finished = walk.finish().await;
    let found = result?;
    finished.map(|()| found)
}

fn describe(d: &lapin::message::Delivery) -> Value {
    let p = &d.properties;
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.to_string());
    let body = match serde_json::from_slice::<Value>(&d.data) {
        Ok(v) => v,
        Err(_) => match std::str::from_utf8(&d.data) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::String(format!("<{} bytes, not UTF-8>", d.data.len())),
        },
    };
    json!({
        "properties": {
            "message_id": text(p.message_id()),
            "correlation_id": text(p.correlation_id()),
            "content_type": text(p.content_type()),
            "type": text(p.kind()),
            "app_id": text(p.app_id()),
            "timestamp": p.timestamp(),
            "delivery_mode": p.delivery_mode(),
        },
        "headers": p.headers().as_ref().map(crate::asyncapi::field_table).unwrap_or_else(|| json!({})),
        "body": body,
    })
}

/// What [`replay`] does.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Which dead letters.
    pub filter: Filter,
    /// Replay at most this many.
    pub limit: Option<u64>,
    /// Publish to this exchange and routing key instead of `x-original-*`.
    pub to: Option<(String, String)>,
    /// Only count what would be replayed.
    pub dry_run: bool,
    /// Refuse dead letters already replayed this many times.
    pub max_replays: i64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            filter: Filter::default(),
            limit: None,
            to: None,
            dry_run: false,
            max_replays: DEFAULT_MAX_REPLAYS,
        }
    }
}

/// What a [`replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    /// Dead letters looked at.
    pub seen: u64,
    /// That passed the filter (up to the limit).
    pub matched: u64,
    /// Republished, confirmed and removed from the DLQ.
    pub replayed: u64,
    /// Dry run: would have been replayed.
    pub would_replay: u64,
    /// Left in the DLQ: already replayed `max_replays` times.
    pub refused_replay_limit: u64,
    /// Left in the DLQ: no `x-original-exchange`/`x-original-routing-key` and no `--to`.
    pub no_origin: u64,
    /// Left in the DLQ: the republish failed (nacked, unroutable, timed out).
    pub failed: u64,
    /// Why the first failure happened, if any.
    pub first_error: Option<String>,
}

/// Replay dead letters of `dlq` (see the module docs); `progress` is called after each
/// dead letter is settled, with the summary so far.
pub async fn replay(
    config: &Config,
    dlq: &str,
    options: &ReplayOptions,
    mut progress: impl FnMut(&ReplaySummary),
) -> Result<ReplaySummary, Error> {
    let mut walk = Walk::open(config, dlq).await?;
    let publisher = if options.dry_run {
        None
    } else {
        match Publisher::from_config(config).await {
            Ok(p) => Some(p),
            Err(e) => {
                let _ = walk.finish().await;
                return Err(e);
            }
        }
    };
    let mut sum = ReplaySummary::default();
    let mut in_flight = FuturesUnordered::new();
    let result: Result<(), Error> = async {
        while let Some(d) = walk.next().await? {
            sum.seen += 1;
            let letter = DeadLetter::of(&d.properties);
            if !options.filter.matches(&letter) || options.limit.is_some_and(|l| sum.matched >= l) {
                continue;
            }
            sum.matched += 1;
            if letter.replays >= options.max_replays {
                sum.refused_replay_limit += 1;
                progress(&sum);
                continue;
            }
            let target = options.to.clone().or_else(|| {
                Some((
                    letter.original_exchange.clone()?,
                    letter.original_routing_key.clone()?,
                ))
            });
            let Some((exchange, routing_key)) = target else {
                sum.no_origin += 1;
                progress(&sum);
                continue;
            };
            let Some(publisher) = &publisher else {
                sum.would_replay += 1;
                progress(&sum);
                continue;
            };
            let mut headers = d.properties.headers().clone().unwrap_or_default();
            failure::strip_failure_headers(&mut headers);
            failure::set_int(&mut headers, REPLAYS, letter.replays.saturating_add(1));
            let properties = crate::consumer::settle::copy_properties(&d.properties, headers);
            let tag = d.delivery_tag;
            let body = d.data;
            in_flight.push(async move {
                let published = publisher
                    .publish_copy(&exchange, &routing_key, body, properties)
                    .await;
                (tag, published)
            });
            while in_flight.len() >= IN_FLIGHT {
                if let Some(done) = in_flight.next().await {
                    settle(&walk, done, &mut sum).await?;
                    progress(&sum);
                }
            }
        }
        while let Some(done) = in_flight.next().await {
            settle(&walk, done, &mut sum).await?;
            progress(&sum);
        }
        Ok(())
    }
    .await;
    drop(in_flight);
    let finished = walk.finish().await;
    if let Some(p) = publisher {
        p.close().await;
    }
    result.and(finished).map(|()| sum)
}

/// Ack the dead letter once its copy is confirmed; otherwise keep it.
async fn settle(
    walk: &Walk,
    (tag, published): (u64, Result<(), crate::PublishError>),
    sum: &mut ReplaySummary,
) -> Result<(), Error> {
    match published {
        Ok(()) => {
            walk.ack(tag).await?;
            sum.replayed += 1;
        }
        Err(e) => {
            sum.failed += 1;
            if sum.first_error.is_none() {
                sum.first_error = Some(e.to_string());
            }
        }
    }
    Ok(())
}

/// Delete the dead letters of `dlq` that pass `filter`; returns how many.
pub async fn purge(config: &Config, dlq: &str, filter: &Filter) -> Result<u64, Error> {
    let mut walk = Walk::open(config, dlq).await?;
    let mut purged = 0;
    let result: Result<(), Error> = async {
        while let Some(d) = walk.next().await? {
            if filter.matches(&DeadLetter::of(&d.properties)) {
                walk.ack(d.delivery_tag).await?;
                purged += 1;
            }
        }
        Ok(())
    }
    .await;
    let finished = walk.finish().await;
    result.and(finished).map(|()| purged)
}

/// Parse a point in time given on the command line: a duration ago (`30m`, `2h`, `7d`),
/// an RFC 3339 UTC time (`2026-11-30T04:00:00Z`, or a date `2026-11-30`), or Unix
/// milliseconds. Returns Unix milliseconds.
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    let t = text.trim();
    if let Some(days) = t.strip_suffix('d').and_then(|d| d.parse::<i64>().ok()) {
        return Ok(now_ms - days * 86_400_000);
    }
    if let Ok(d) = reliable_mq_model::parse_duration(t) {
        return Ok(now_ms - i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    }
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    parse_rfc3339(t).ok_or_else(|| {
        format!(
            "`{text}` is not a time: use a duration ago (30m, 2h, 7d), a UTC time (2026-11-30T04:00:00Z) or Unix milliseconds"
        )
    })
}

fn parse_rfc3339(t: &str) -> Option<i64> {
    let t = t.strip_suffix('Z').unwrap_or(t);
    let (date, time) = t.split_once(['T', ' ']).unwrap_or((t, "00:00:00"));
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut h = time.splitn(3, ':').map(|p| p.parse::<f64>().ok());
    let (hh, mm, ss) = (
        h.next()??,
        h.next()?.unwrap_or(0.0),
        h.next().flatten().unwrap_or(0.0),
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let secs = days_from_civil(y, m, day) * 86_400 + (hh * 3600.0 + mm * 60.0) as i64;
    Some(secs * 1000 + (ss * 1000.0) as i64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-30 04:12:03Z` for Unix milliseconds.
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `42s`, `17m`, `5h`, `3d`.
pub fn format_age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The `dlq list` table.
pub fn table(letters: &[DeadLetter], now_ms: i64) -> String {
    let header = [
        "MESSAGE_ID",
        "KIND",
        "ERROR",
        "ATTEMPTS",
        "FIRST FAILURE",
        "LAST FAILURE",
        "AGE",
    ];
    let time = |t: Option<i64>| t.map(format_time).unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 7]> = letters
        .iter()
        .map(|d| {
            [
                d.message_id.clone().unwrap_or_else(|| "-".into()),
                d.error_kind.clone().unwrap_or_else(|| "-".into()),
                trim(d.exception_message.as_deref().unwrap_or("-"), 40),
                d.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
                time(d.first_failure),
                time(d.last_failure),
                d.last_failure
                    .map_or_else(|| "-".into(), |t| format_age(now_ms - t)),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// One line, at most `max` characters, marked when cut.
fn trim(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut t: String = one_line.chars().take(max.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

/// How many dead letters of each kind a list holds (for the summary line).
pub fn count_by_kind(letters: &[DeadLetter]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in letters {
        *m.entry(d.error_kind.clone().unwrap_or_else(|| "-".into()))
            .or_insert(0) += 1;
    }
    m
}

#[doc(hidden)]
pub mod cli;

/// Run the `reliable-mq` command line (what the binary's `main` calls).
pub fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let ms = parse_time("2026-11-30T04:12:03Z", 0).unwrap_or_default();
        assert_eq!(format_time(ms), "2026-11-30 04:12:03Z");
        assert_eq!(parse_time("2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        assert_eq!(parse_time("1d", 86_400_000), Ok(0));
        assert!(parse_time("yesterday", 0).is_err());
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
    }

    #[test]
    fn filter_by_kind_and_time() {
        let mut d = DeadLetter::of(&BasicProperties::default());
        d.error_kind = Some("decode".into());
        d.last_failure = Some(1000);
        let f = Filter {
            kinds: vec!["decode".into()],
            since: Some(500),
            ..Filter::default()
        };
        assert!(f.matches(&d));
        assert!(
            !Filter {
                before: Some(1000),
                ..f.clone()
            }
            .matches(&d)
        );
        assert!(
            !Filter {
                kinds: vec!["panic".into()],
                ..f
            }
            .matches(&d)
        );
    }
}
