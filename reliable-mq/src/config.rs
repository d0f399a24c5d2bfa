//! Runtime configuration: read from the environment by [`Config::from_env`], changed with
//! the builder methods.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `AMQP_URL` | broker URL; several comma-separated URLs (cluster nodes) are tried in turn | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `REDIS_URL` | dedup store: `redis://host:port` (one node), or `redis+cluster://host1:port1,host2:port2` (Redis Cluster seed nodes; cargo feature `redis-cluster`); unset = in-process store (single instance only) | unset |
//! | `RELIABLE_MQ_SHUTDOWN_GRACE` | how long in-flight handlers may finish after SIGINT/SIGTERM | `30s` |
//! | `RELIABLE_MQ_CONFIRM_TIMEOUT` | how long a publish waits for the broker's confirm | `10s` |
//! | `RELIABLE_MQ_HEARTBEAT` | AMQP heartbeat interval | `20s` |
//! | `RELIABLE_MQ_DEDUP_PREFIX` | namespace of dedup keys in Redis | `reliable-mq` |
//! | `RELIABLE_MQ_DEDUP_NAMESPACE` | extra dedup key scope (an environment's name), after the prefix | unset |
//! | `RELIABLE_MQ_CONSUMER_TIMEOUT` | the broker's `consumer_timeout`: how long it lets a delivery stay unacked | `30m` |

use std::time::Duration;

use crate::Error;

/// Default broker URL.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Settings shared by consumers and publishers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Broker URL.
    pub amqp_url: String,
    /// Redis URL for the dedup store; `None` = in-process store.
    pub redis_url: Option<String>,
    /// Grace period for in-flight handlers at shutdown.
    pub shutdown_grace: Duration,
    /// How long a publish waits for its confirm before it counts as lost.
    pub confirm_timeout: Duration,
    /// Extra attempts a publish gets after a nack, timeout or lost connection.
    pub publish_retries: u32,
    /// Largest body a publish accepts (checked before sending).
    pub max_body_size: usize,
    /// AMQP heartbeat (rounded up to whole seconds; zero disables heartbeats).
    pub heartbeat: Duration,
    /// How long opening one connection may take before the next address is tried.
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_reconnect_delay: Duration,
    /// Prefix of dedup keys (`{prefix}:{vhost}:{queue}:{message_id}`).
    pub dedup_prefix: String,
    /// How long publishes wait while the broker blocks the connection (memory or disk alarm)
    /// before failing.
    pub blocked_timeout: Duration,
    /// Connection name shown in the broker's management tools.
    pub connection_name: String,
    /// An extra scope for dedup keys, after the prefix (e.g. the environment's name), so
    /// apps sharing one Redis, prefix and vhost can still keep their dedup marks apart.
    pub dedup_namespace: Option<String>,
    /// The broker's `consumer_timeout` (RabbitMQ's default: 30 minutes): a delivery left
    /// unacked longer makes the broker close the channel. A delivery held back by the
    /// consumer (dedup store down, a settle copy refused) is handed back before then.
    pub consumer_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            redis_url: None,
            shutdown_grace: Duration::from_secs(30),
            confirm_timeout: Duration::from_secs(10),
            publish_retries: 5,
            max_body_size: 16 * 1024 * 1024,
            heartbeat: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            max_reconnect_delay: Duration::from_secs(30),
            dedup_prefix: "reliable-mq".to_owned(),
            blocked_timeout: Duration::from_secs(30),
            connection_name: std::env::args()
                .next()
                .and_then(|p| {
                    std::path::Path::new(&p)
                        .file_name()
                        .map(|s| s.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| "reliable-mq".to_owned()),
            dedup_namespace: None,
            consumer_timeout: Duration::from_secs(30 * 60),
        }
    }
}

impl Config {
    /// Read the environment (see the module docs), defaults for what is unset.
    pub fn from_env() -> Result<Self, Error> {
        let mut c = Self::default();
        if let Some(url) = env("AMQP_URL") {
            c.amqp_url = url;
        }
        c.redis_url = env("REDIS_URL");
        if let Some(v) = env("RELIABLE_MQ_SHUTDOWN_GRACE") {
            c.shutdown_grace = parse_env_duration("RELIABLE_MQ_SHUTDOWN_GRACE", &v)?;
        }
        if let Some(v) = env("RELIABLE_MQ_CONFIRM_TIMEOUT") {
            c.confirm_timeout = parse_env_duration("RELIABLE_MQ_CONFIRM_TIMEOUT", &v)?;
        }
        if let Some(v) = env("RELIABLE_MQ_HEARTBEAT") {
            c.heartbeat = parse_env_duration("RELIABLE_MQ_HEARTBEAT", &v)?;
        }
        if let Some(v) = env("RELIABLE_MQ_DEDUP_PREFIX") {
            c.dedup_prefix = v;
        }
        c.dedup_namespace = env("RELIABLE_MQ_DEDUP_NAMESPACE");
        if let Some(v) = env("RELIABLE_MQ_CONSUMER_TIMEOUT") {
            c.consumer_timeout = parse_env_duration("RELIABLE_MQ_CONSUMER_TIMEOUT", &v)?;
        }
        Ok(c)
    }

    /// Use this broker URL.
    pub fn with_amqp_url(mut self, url: impl Into<String>) -> Self {
        self.amqp_url = url.into();
        self
    }

    /// Use Redis at `url` for dedup (`None`: in-process store).
    pub fn with_redis_url(mut self, url: Option<String>) -> Self {
        self.redis_url = url;
        self
    }

    /// Set the shutdown grace period.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Set the publish confirm timeout.
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Set how many times a publish is retried after a nack, timeout or lost connection.
    pub fn with_publish_retries(mut self, retries: u32) -> Self {
        self.publish_retries = retries;
        self
    }

    /// Set the largest body a publish accepts.
    pub fn with_max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }

    /// Set the AMQP heartbeat interval.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Set how long opening one connection may take.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Set the dedup key prefix.
    pub fn with_dedup_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.dedup_prefix = prefix.into();
        self
    }

    /// Scope dedup keys further by `namespace` (`None`: prefix and vhost only).
    pub fn with_dedup_namespace(mut self, namespace: Option<String>) -> Self {
        self.dedup_namespace = namespace;
        self
    }

    /// Set the broker's `consumer_timeout`, as configured on the broker.
    pub fn with_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// Set the connection name shown by the broker (`rabbitmqctl list_connections`).
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// The broker URL with its password replaced by `***`, for logs and errors.
    pub fn redacted_amqp_url(&self) -> String {
        self.amqp_urls()
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The broker addresses: `amqp_url` split on commas (several nodes of a cluster to
    /// fail over between), blanks dropped.
    pub fn amqp_urls(&self) -> Vec<&str> {
        self.amqp_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

fn parse_env_duration(key: &str, value: &str) -> Result<Duration, Error> {
    parse_duration(value).ok_or_else(|| {
        Error::Config(format!(
            "{key}={value:?} is not a duration; write it like \"500ms\", \"30s\", \"5m\" or \"24h\""
        ))
    })
}

/// Parse `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"` (one number, one unit).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(ms)?))
}

/// Replace the password of `user:password@` in a URL by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[test]
    fn several_addresses() {
        let c = Config::default().with_amqp_url("amqp://u:p@a:5672/%2f, amqp://u:p@b:5673/%2f,");
        assert_eq!(
            c.amqp_urls(),
            ["amqp://u:p@a:5672/%2f", "amqp://u:p@b:5673/%2f"]
        );
        assert_eq!(
            c.redacted_amqp_url(),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5673/%2f"
        );
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }
}
