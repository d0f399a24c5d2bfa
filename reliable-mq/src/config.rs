//! Runtime configuration: read from the environment by [`Config::from_env`], changed with
//! the builder methods.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `AMQP_URL` | broker URL, `amqp://` or `amqps://` (TLS, see below); several comma-separated URLs (cluster nodes) are tried in turn | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `REDIS_URL` | dedup store: `redis://host:port` or `rediss://host:port` (TLS) for one node, or `redis+cluster://host1:port1,host2:port2` (`rediss+cluster://` with TLS; Redis Cluster seed nodes; cargo feature `redis-cluster`); unset = in-process store (single instance only) | unset |
//! | `RELIABLE_MQ_SHUTDOWN_GRACE` | how long in-flight handlers may finish after SIGINT/SIGTERM | `30s` |
//! | `RELIABLE_MQ_CONFIRM_TIMEOUT` | how long a publish waits for the broker's confirm | `10s` |
//! | `RELIABLE_MQ_HEARTBEAT` | AMQP heartbeat interval | `20s` |
//! | `RELIABLE_MQ_DEDUP_PREFIX` | namespace of dedup keys in Redis | `reliable-mq` |
//! | `RELIABLE_MQ_DEDUP_NAMESPACE` | extra dedup key scope (an environment's name), after the prefix | unset |
//! | `RELIABLE_MQ_CONSUMER_TIMEOUT` | the broker's `consumer_timeout`: how long it lets a delivery stay unacked | `30m` |
//! | `RELIABLE_MQ_CONSUMER_CONNECTIONS` | connections the consumers' channels are spread over (publishing has its own); raised at start-up to keep each within 2047 channels | `1` |
//!
//! # TLS
//!
//! `amqps://` and `rediss://` (cargo feature `tls`, on by default: rustls) verify the
//! server against the system's root certificates, or against the CAs of a `cacertfile`
//! query parameter. RabbitMQ's URI parameters are read from the query of either URL:
//!
//! | parameter | meaning |
//! |---|---|
//! | `cacertfile` | PEM file of the CAs to trust instead of the system roots |
//! | `certfile`, `keyfile` | PEM client certificate chain and key (mutual TLS); both or neither |
//! | `server_name_indication` | name sent (SNI) and verified instead of the host (AMQP only) |
//!
//! There is no fall-back to plain text: a failed handshake is an
//! [`Error::Tls`] naming the URL and the reason. TLS parameters on a
//! plain-text URL are a configuration error.
//!
//! # Secrets
//!
//! `Debug` of [`Config`] (and of everything holding one) and every error show URLs through
//! [`redact_url`]: the password becomes `***`.

use std::time::Duration;

use crate::Error;

/// Default broker URL.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Settings shared by consumers and publishers.
///
/// `Debug` shows the URLs with their passwords replaced by `***`.
#[derive(Clone)]
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
    /// Largest body a publish accepts (checked before sending), and the largest a consumer
    /// hands to its handler: a bigger delivery is dead-lettered (kind `decode`).
    pub max_body_size: usize,
    /// AMQP heartbeat (rounded up to whole seconds; zero disables heartbeats).
    pub heartbeat: Duration,
    /// How long opening one connection may take before the next address is tried.
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts (default 5 s). It bounds how long after
    /// a broker comes back its consumers resume: the delay doubles from 100 ms while the
    /// broker is away, so with a 30 s cap a 20 s restart was followed by up to 30 s more of
    /// waiting (measured: 25 s for 200 consumers). Jitter keeps a fleet from reconnecting
    /// in lockstep; raise it for very large fleets.
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
    /// How many connections the consumers share: each consumer gets a channel of its own
    /// on one of them (consumer `i` on connection `i % n`); publishing has its own
    /// connection. RabbitMQ allows 2047 channels per connection by default and a consumer
    /// may hold two at once (its own, and one to redeclare its topology on), so start-up
    /// raises this to fit 1023 consumers a connection at most; a broker negotiating a
    /// lower `channel_max` makes start-up fail with the number to set.
    pub consumer_connections: usize,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so a new field cannot be added without deciding how it is shown.
        let Self {
            amqp_url: _,
            redis_url,
            shutdown_grace,
            confirm_timeout,
            publish_retries,
            max_body_size,
            heartbeat,
            connect_timeout,
            max_reconnect_delay,
            dedup_prefix,
            blocked_timeout,
            connection_name,
            dedup_namespace,
            consumer_timeout,
            consumer_connections,
        } = self;
        f.debug_struct("Config")
            .field("amqp_url", &self.redacted_amqp_url())
            .field("redis_url", &redis_url.as_deref().map(redact_url))
            .field("shutdown_grace", shutdown_grace)
            .field("confirm_timeout", confirm_timeout)
            .field("publish_retries", publish_retries)
            .field("max_body_size", max_body_size)
            .field("heartbeat", heartbeat)
            .field("connect_timeout", connect_timeout)
            .field("max_reconnect_delay", max_reconnect_delay)
            .field("dedup_prefix", dedup_prefix)
            .field("blocked_timeout", blocked_timeout)
            .field("connection_name", connection_name)
            .field("dedup_namespace", dedup_namespace)
            .field("consumer_timeout", consumer_timeout)
            .field("consumer_connections", consumer_connections)
            .finish()
    }
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
            max_reconnect_delay: Duration::from_secs(5),
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
            consumer_connections: 1,
        }
    }
}

impl Config {
    /// Log filter directives that keep message bodies out of the logs. lapin logs every
    /// message the broker returns (an unroutable `mandatory` publish), body included, at
    /// `warn` on the `lapin::returned_messages` target, and every frame (bodies too) at
    /// `trace` on `lapin::channels` and `lapin::frames`. reliable-mq reports returns itself
    /// (`PublishError::Unroutable`, without the body). Add these to your subscriber's filter;
    /// being more specific than a plain level or `lapin=trace`, they win over both:
    ///
    /// ```
    /// # use tracing_subscriber::EnvFilter;
    /// let mut filter = EnvFilter::new("info");
    /// for d in reliable_mq::Config::QUIET_LAPIN_DIRECTIVES {
    ///     filter = filter.add_directive(d.parse().expect("a valid directive"));
    /// }
    /// ```
    pub const QUIET_LAPIN_DIRECTIVES: [&str; 3] = [
        "lapin::returned_messages=error",
        "lapin::channels=info",
        "lapin::frames=info",
    ];

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
        if let Some(v) = env("RELIABLE_MQ_CONSUMER_CONNECTIONS") {
            c.consumer_connections = match v.trim().parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(Error::Config(format!(
                        "RELIABLE_MQ_CONSUMER_CONNECTIONS={v:?} is not a whole number of at \
                         least 1 (the connections consumers share; default 1)"
                    )));
                }
            };
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

    /// Set the largest body a publish accepts and a consumer hands to its handler.
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

    /// Spread the consumers' channels over `n` connections (at least 1).
    pub fn with_consumer_connections(mut self, n: usize) -> Self {
        self.consumer_connections = n.max(1);
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

    /// The Redis URL with its password replaced by `***`, for logs and errors.
    pub fn redacted_redis_url(&self) -> Option<String> {
        self.redis_url.as_deref().map(redact_url)
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

/// The URL (or comma-separated list of URLs) with every password replaced by `***`, for
/// logs, errors and `Debug`.
///
/// Parsed with a real URL parser, so a password with `:`, `@` or percent-escapes is found
/// whole. What the parser cannot read (a `redis+cluster://u:p@h1:1,h2:2` host list, an
/// unescaped `/` in a password) is redacted from the first `:` after the scheme up to the
/// last `@`: wrongly hiding a host is better than showing a password.
pub fn redact_url(url: &str) -> String {
    split_url_list(url)
        .into_iter()
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

/// Split on the commas that start another URL (`amqp://a,amqp://b`); a comma inside one
/// URL's host list (`redis+cluster://h1:1,h2:2`) stays in it.
fn split_url_list(list: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        let next = list[i + 1..].trim_start();
        let starts_url = next
            .find("://")
            .is_some_and(|end| !next[..end].contains([',', '/', '@', ':']));
        if starts_url {
            parts.push(&list[start..i]);
            start = i + 1;
        }
    }
    parts.push(&list[start..]);
    parts
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    if let Ok(mut parsed) = url::Url::parse(url)
        && parsed.password().is_some()
        && parsed.set_password(Some("***")).is_ok()
    {
        return parsed.to_string();
    }
    // No password the parser could see. An `@` anywhere may still end one it misread: with
    // a raw `/`, `?` or `#` in the password (`u:5672/pw@h`), a parser takes `u:5672` for
    // host and port.
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// TLS settings read from a URL's query (RabbitMQ's URI parameters, also accepted on
/// `rediss://`): `cacertfile` (PEM file of the CAs to trust instead of the system roots),
/// `certfile` and `keyfile` (PEM client certificate chain and key, for mutual TLS),
/// `server_name_indication` (the name sent and verified, when it differs from the host).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// PEM file of the CA certificates to trust.
    pub cacertfile: Option<String>,
    /// PEM file of the client certificate (chain).
    pub certfile: Option<String>,
    /// PEM file of the client's private key.
    pub keyfile: Option<String>,
    /// Server name to send (SNI) and verify the certificate against.
    pub server_name_indication: Option<String>,
}

impl TlsParams {
    /// Whether any parameter is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Split a URL into the URL without the TLS query parameters (for clients that reject
/// unknown ones) and those parameters. `certfile` without `keyfile` (or the reverse) is an
/// error, so is a TLS parameter on a plain-text URL: it would silently not be used.
pub fn split_tls_params(url: &str, what: &str) -> Result<(String, TlsParams), Error> {
    let Some(q) = url.find('?') else {
        return Ok((url.to_owned(), TlsParams::default()));
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let (query, fragment) = match query.find('#') {
        Some(h) => (&query[..h], &query[h..]),
        None => (query, ""),
    };
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || {
            url::form_urlencoded::parse(format!("v={value}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let slot = match key {
            "cacertfile" => &mut params.cacertfile,
            "certfile" => &mut params.certfile,
            "keyfile" => &mut params.keyfile,
            "server_name_indication" => &mut params.server_name_indication,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        *slot = Some(decoded()).filter(|v| !v.is_empty());
    }
    let redacted = redact_url(url);
    if params.certfile.is_some() != params.keyfile.is_some() {
        return Err(Error::Config(format!(
            "{what} {redacted}: certfile and keyfile go together (a client certificate needs its key)"
        )));
    }
    let scheme = base.split("://").next().unwrap_or("");
    if !params.is_empty() && !scheme.starts_with("amqps") && !scheme.starts_with("rediss") {
        return Err(Error::Config(format!(
            "{what} {redacted} has TLS parameters but a plain-text scheme ({scheme}://);              use amqps:// or rediss:// so they are used"
        )));
    }
    let stripped = if kept.is_empty() {
        format!("{base}{fragment}")
    } else {
        format!("{base}?{}{fragment}", kept.join("&"))
    };
    Ok((stripped, params))
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

    /// Every form a password can take in a URL, and the forms with several hosts.
    #[test]
    fn redacts_nasty_passwords() {
        let cases = [
            ("amqp://user:p%40ss%3Aw%2Frd%25@host:5672/%2f", "p%40ss"),
            ("amqp://user:pa@ss:w@host:5672/%2f", "pa@ss"),
            ("amqp://user:pa:ss@host/%2f", "pa:ss"),
            ("amqp://user:5672/secret@host:5672/%2f", "secret"),
            ("amqp://user:sec/ret@host:5672/%2f", "sec/ret"),
            ("amqp://user:se#cret@host/%2f", "se#cret"),
            ("amqp://user:se?cret@host/%2f", "se?cret"),
            (
                "amqps://user:secret@host:5671/%2f?cacertfile=/ca.pem",
                "secret",
            ),
            ("redis://:secret@127.0.0.1:6379", "secret"),
            ("rediss://default:secret@cache.example:6380/0", "secret"),
            ("redis+cluster://u:secret@h1:7000,h2:7001", "secret"),
            ("rediss+cluster://u:sec@ret@h1:7000,h2:7001/0", "sec@ret"),
            (
                "redis+sentinel://u:secret@h1:26379,h2:26379/mymaster",
                "secret",
            ),
            (
                "amqp://u:secret1@a:5672/%2f,amqps://u:secret2@b:5671/%2f",
                "secret",
            ),
        ];
        for (url, secret) in cases {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} shown as {shown}");
            assert!(shown.contains("***"), "{url} shown as {shown}");
        }
        // What is not secret stays readable.
        assert_eq!(
            redact_url("redis+cluster://u:secret@h1:7000,h2:7001"),
            "redis+cluster://u:***@h1:7000,h2:7001"
        );
        assert_eq!(
            redact_url("amqp://u:s1@a:5672/%2f,amqps://u:s2@b:5671/%2f"),
            "amqp://u:***@a:5672/%2f,amqps://u:***@b:5671/%2f"
        );
        assert_eq!(
            redact_url("amqp://user:p%40ss@host:5672/%2f?heartbeat=5"),
            "amqp://user:***@host:5672/%2f?heartbeat=5"
        );
        assert_eq!(
            redact_url("redis://user@host:6379"),
            "redis://user@host:6379"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn debug_of_config_hides_passwords() {
        let c = Config::default()
            .with_amqp_url("amqp://u:amqp%2Fsecret@a:5672/%2f,amqp://u:amqp%2Fsecret@b:5672/%2f")
            .with_redis_url(Some("redis://:redis@secret@r:6379".into()));
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("a:5672") && shown.contains("r:6379"),
            "{shown}"
        );
    }

    #[test]
    fn tls_params_are_split_off() {
        let (url, p) = split_tls_params(
            "amqps://u:p@h:5671/%2f?heartbeat=5&cacertfile=/etc/ca%20x.pem&certfile=/c.pem&keyfile=/k.pem&server_name_indication=broker.example",
            "AMQP_URL",
        )
        .unwrap();
        assert_eq!(url, "amqps://u:p@h:5671/%2f?heartbeat=5");
        assert_eq!(p.cacertfile.as_deref(), Some("/etc/ca x.pem"));
        assert_eq!(p.certfile.as_deref(), Some("/c.pem"));
        assert_eq!(p.keyfile.as_deref(), Some("/k.pem"));
        assert_eq!(p.server_name_indication.as_deref(), Some("broker.example"));

        let (url, p) = split_tls_params("rediss://h:6380?cacertfile=/ca.pem", "REDIS_URL").unwrap();
        assert_eq!(url, "rediss://h:6380");
        assert_eq!(p.cacertfile.as_deref(), Some("/ca.pem"));

        let (url, p) = split_tls_params("amqp://h/%2f", "AMQP_URL").unwrap();
        assert_eq!((url.as_str(), p.is_empty()), ("amqp://h/%2f", true));

        let half = split_tls_params("amqps://u:secret@h?certfile=/c.pem", "AMQP_URL").unwrap_err();
        assert!(half.to_string().contains("keyfile"), "{half}");
        assert!(!format!("{half} {half:?}").contains("secret"));
        let plain = split_tls_params("amqp://h?cacertfile=/ca.pem", "AMQP_URL").unwrap_err();
        assert!(plain.to_string().contains("amqps://"), "{plain}");
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
