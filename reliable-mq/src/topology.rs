//! Declaring what a consumer needs, all durable: its exchange and binding, the work queue
//! (dead-lettering to the DLX), the DLX and DLQ, and the retry tiers. Plus the start-up
//! checks: one consumer's settings ([`validate`]) and consumers against each other
//! ([`check_conflicts`]).
//!
//! A broker object that already exists with other arguments makes the broker answer
//! PRECONDITION_FAILED; that stops start-up with [`Error::TopologyMismatch`] naming the
//! object and the argument. Nothing is ever deleted to "fix" it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ErrorKind};

use crate::Error;
use crate::retry::RetryLadder;
use crate::spec::{ConsumerConfig, ExchangeKind, QueueKind};

/// Everything one consumer declares, with derived names resolved.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Work queue.
    pub queue: String,
    /// Exchange and binding key, if bound to one.
    pub exchange: Option<(String, ExchangeKind, String)>,
    /// Dead-letter exchange (direct; the DLQ is bound with the work queue's name).
    pub dlx: String,
    /// Dead-letter queue.
    pub dlq: String,
    /// Queue type of the work queue (and of its DLQ and tiers).
    pub queue_type: QueueKind,
    /// `x-delivery-limit`, quorum only.
    pub delivery_limit: Option<u32>,
    /// Retry ladder (its tiers are declared).
    pub ladder: RetryLadder,
    /// The tier a message goes to when another instance holds its dedup claim.
    pub requeue_tier: Option<(String, std::time::Duration)>,
}

impl Topology {
    /// Resolve the names of `config` (the model derives them).
    pub fn of(config: &ConsumerConfig) -> Self {
        let m = &config.model;
        Self {
            queue: m.queue().to_owned(),
            exchange: m
                .exchange()
                .map(|e| (e.to_owned(), m.exchange_kind(), m.binding_key().to_owned())),
            dlx: m.dlx().to_owned(),
            dlq: m.dlq_name(),
            queue_type: m.queue_kind(),
            delivery_limit: m.effective_delivery_limit(),
            ladder: m.ladder(),
            requeue_tier: m.requeue_tier(),
        }
    }

    /// Every wait queue to declare: the ladder's tiers plus the dedup requeue tier.
    pub fn wait_queues(&self) -> Vec<(String, std::time::Duration)> {
        let mut tiers = self.ladder.tiers();
        if let Some(t) = &self.requeue_tier
            && !tiers.iter().any(|(name, _)| name == &t.0)
        {
            tiers.push(t.clone());
        }
        tiers
    }

    /// Declare everything on a fresh channel of `connection`. A failed declaration closes
    /// its channel, so each step runs on a channel of its own once one has failed.
    pub async fn declare(&self, connection: &Connection) -> Result<(), Error> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("opening a channel to declare topology", e))?;
        let result = self.declare_on(&channel).await;
        let _ = channel.close(200, "topology declared".into()).await;
        result
    }

    async fn declare_on(&self, ch: &Channel) -> Result<(), Error> {
        for step in self.plan() {
            match step {
                Declaration::Exchange { name, kind } => declare_exchange(ch, &name, kind).await?,
                Declaration::Queue { name, args } => declare_queue(ch, &name, args).await?,
                Declaration::Bind {
                    queue,
                    exchange,
                    key,
                } => bind(ch, &queue, &exchange, &key).await?,
            }
        }
        Ok(())
    }

    /// Every object to declare, in order, with its arguments: the one description both
    /// transports (RabbitMQ and the in-memory broker of feature `testing`) declare from.
    pub(crate) fn plan(&self) -> Vec<Declaration> {
        let mut plan = Vec::new();
        if let Some((exchange, kind, _)) = &self.exchange {
            plan.push(Declaration::Exchange {
                name: exchange.clone(),
                kind: *kind,
            });
        }
        plan.push(Declaration::Exchange {
            name: self.dlx.clone(),
            kind: ExchangeKind::Direct,
        });
        plan.push(Declaration::Queue {
            name: self.dlq.clone(),
            args: self.dlq_arguments(),
        });
        plan.push(Declaration::Bind {
            queue: self.dlq.clone(),
            exchange: self.dlx.clone(),
            key: self.queue.clone(),
        });
        plan.push(Declaration::Queue {
            name: self.queue.clone(),
            args: self.queue_arguments(),
        });
        if let Some((exchange, _, key)) = &self.exchange {
            plan.push(Declaration::Bind {
                queue: self.queue.clone(),
                exchange: exchange.clone(),
                key: key.clone(),
            });
        }
        for (tier, delay) in self.wait_queues() {
            plan.push(Declaration::Queue {
                args: self.tier_arguments(delay),
                name: tier,
            });
        }
        plan
    }

    /// The DLQ's declaration arguments.
    pub(crate) fn dlq_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        put_str(&mut args, "x-queue-type", self.queue_type.as_str());
        args
    }

    /// The work queue's declaration arguments (the AsyncAPI export shows these too).
    pub(crate) fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        put_str(&mut args, "x-queue-type", self.queue_type.as_str());
        put_str(&mut args, "x-dead-letter-exchange", &self.dlx);
        // Broker-side dead-lettering (delivery limit, a manual reject) lands in our DLQ too.
        put_str(&mut args, "x-dead-letter-routing-key", &self.queue);
        self.at_least_once(&mut args);
        if let Some(limit) = self.delivery_limit {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
        args
    }

    /// A wait queue's declaration arguments: hold for `delay`, then back to the work queue.
    pub(crate) fn tier_arguments(&self, delay: std::time::Duration) -> FieldTable {
        let mut args = FieldTable::default();
        put_str(&mut args, "x-queue-type", self.queue_type.as_str());
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        );
        put_str(&mut args, "x-dead-letter-exchange", "");
        put_str(&mut args, "x-dead-letter-routing-key", &self.queue);
        self.at_least_once(&mut args);
        args
    }
}

/// One object of a [`Topology`], as declared on the broker.
#[derive(Debug, Clone)]
pub(crate) enum Declaration {
    /// A durable exchange.
    Exchange { name: String, kind: ExchangeKind },
    /// A durable queue with its arguments.
    Queue { name: String, args: FieldTable },
    /// A binding of `queue` to `exchange` with `key`.
    Bind {
        queue: String,
        exchange: String,
        key: String,
    },
}

impl Topology {
    /// Quorum queues dead-letter at most once by default: a message expiring from a retry
    /// tier while its target is unavailable would be dropped. At-least-once dead-lettering
    /// (which the broker allows only with `reject-publish` overflow; no length limit is set,
    /// so it never triggers) keeps it until the target confirms.
    fn at_least_once(&self, args: &mut FieldTable) {
        if self.queue_type == QueueKind::Quorum {
            put_str(args, "x-dead-letter-strategy", "at-least-once");
            put_str(args, "x-overflow", "reject-publish");
        }
    }
}

fn put_str(args: &mut FieldTable, key: &str, value: &str) {
    args.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), Error> {
    let lapin_kind = match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
    };
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(name.into(), lapin_kind, options, FieldTable::default())
        .await
        .map_err(|e| declare_error(format!("exchange '{name}'"), e))
}

async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), Error> {
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(|e| declare_error(format!("queue '{name}'"), e))
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), Error> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| declare_error(format!("binding of queue '{queue}' to '{exchange}'"), e))
}

/// PRECONDITION_FAILED becomes a [`Error::TopologyMismatch`] with the broker's text (which
/// names the differing argument); anything else a plain declaration error.
fn declare_error(object: String, e: lapin::Error) -> Error {
    if let ErrorKind::ProtocolError(amqp) = e.kind()
        && *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    {
        return Error::TopologyMismatch {
            object,
            reason: amqp.get_message().to_string(),
        };
    }
    Error::Declare { object, source: e }
}

/// Check one consumer's settings against the shared model's rules (the ones the macro
/// applies at compile time), with the broker's `consumer_timeout`.
pub fn validate(c: &ConsumerConfig, consumer_timeout: std::time::Duration) -> Result<(), Error> {
    let problems = c.problems(consumer_timeout);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidConsumer {
            consumer: c.name().to_owned(),
            problems: problems.join("; "),
        })
    }
}

/// Check consumers against each other: a queue consumed twice must be declared the same
/// way; an exchange must have one type; no queue may be another's DLQ or retry tier.
pub fn check_conflicts(consumers: &[ConsumerConfig]) -> Result<(), Error> {
    for (i, a) in consumers.iter().enumerate() {
        for b in &consumers[i + 1..] {
            let conflict = |detail: String| Error::ConflictingConsumers {
                first: a.name().to_owned(),
                second: b.name().to_owned(),
                detail,
            };
            if a.queue() == b.queue() {
                let (ta, tb) = (Topology::of(a), Topology::of(b));
                let same = ta.exchange == tb.exchange
                    && ta.dlx == tb.dlx
                    && ta.dlq == tb.dlq
                    && ta.queue_type == tb.queue_type
                    && ta.delivery_limit == tb.delivery_limit
                    && ta.ladder == tb.ladder
                    && a.is_idempotent() == b.is_idempotent();
                if !same {
                    return Err(conflict(format!(
                        "both consume queue '{}' with different settings; give them the same attribute or separate queues",
                        a.queue()
                    )));
                }
            }
            if let (Some(ea), Some(eb)) = (a.model.exchange(), b.model.exchange())
                && ea == eb
                && a.model.exchange_kind() != b.model.exchange_kind()
            {
                return Err(conflict(format!(
                    "exchange '{ea}' is declared as {} and as {}; use one exchange_type",
                    a.model.exchange_kind().as_str(),
                    b.model.exchange_kind().as_str()
                )));
            }
            let derived_a: Vec<String> = derived_queues(a);
            let derived_b: Vec<String> = derived_queues(b);
            if derived_b.iter().any(|n| n == a.queue()) || derived_a.iter().any(|n| n == b.queue())
            {
                return Err(conflict(
                    "one consumer's queue is the other's dead-letter or retry queue; rename one"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

fn derived_queues(c: &ConsumerConfig) -> Vec<String> {
    let t = Topology::of(c);
    let mut names: Vec<String> = t.wait_queues().into_iter().map(|(n, _)| n).collect();
    names.push(t.dlq);
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler_fn;

    fn consumer(queue: &str) -> ConsumerConfig {
        ConsumerConfig::new(
            queue,
            format!("{queue}.dlx"),
            handler_fn(|_: serde_json::Value| async { Ok::<_, crate::HandlerError>(()) }),
        )
    }

    #[test]
    fn derived_names() {
        let t = Topology::of(&consumer("orders").idempotent(std::time::Duration::from_secs(60)));
        assert_eq!(t.dlq, "orders.dlq");
        let names: Vec<_> = t.wait_queues().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["orders.retry.1s", "orders.retry.2s", "orders.retry.4s"]
        );
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = consumer("amq.bad").with_prefetch(4).with_concurrency(8);
        c.model.routing_key = Some("x".into());
        let Err(Error::InvalidConsumer { problems, .. }) =
            validate(&c, crate::spec::defaults::BROKER_CONSUMER_TIMEOUT)
        else {
            panic!("expected invalid");
        };
        assert!(problems.contains("amq."), "{problems}");
        assert!(problems.contains("concurrency"), "{problems}");
        assert!(
            problems.contains("`routing_key` needs `exchange`"),
            "{problems}"
        );
    }

    #[test]
    fn same_queue_different_settings_conflicts() {
        let a = consumer("q");
        let b = consumer("q").quorum(None);
        assert!(matches!(
            check_conflicts(&[a.clone(), b]),
            Err(Error::ConflictingConsumers { .. })
        ));
        assert!(check_conflicts(&[a.clone(), a]).is_ok());
    }

    #[test]
    fn queue_that_is_another_dlq_conflicts() {
        let a = consumer("q");
        let b = consumer("q.dlq");
        assert!(check_conflicts(&[a, b]).is_err());
    }
}
