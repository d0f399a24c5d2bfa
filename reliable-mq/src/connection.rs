//! Opening connections: heartbeat and connection name applied, TLS for `amqps://`, errors
//! that name the URL without its password and say what to do (a TLS problem, a TLS/plain
//! port mismatch and a refused login each get their own), and the capped backoff every
//! reconnect loop shares.
//!
//! `amqps://` goes through our own rustls connector rather than lapin's: lapin's adds a
//! `cacertfile` to the system roots instead of trusting only it, and cannot send a
//! `server_name_indication` other than the host it dials.
//!
//! We do not use lapin's auto-recovery: each consumer owns its channel's lifecycle (declare,
//! consume; on any error drop the channel and start over, reopening the shared connection
//! if that is what broke: [`ConnectionSet`]) and the publisher its connection, so a
//! delivery tag can never outlive the channel it belongs to.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, ErrorKind};

use crate::config::{redact_url, split_tls_params};
use crate::{Config, Error};

/// Rotates the starting address across calls, so reconnects spread over a cluster's
/// nodes instead of always hammering the first one.
static NEXT_ADDRESS: AtomicUsize = AtomicUsize::new(0);

/// Open a connection for `role` (`consumer orders`, `publisher`), with the configured
/// heartbeat and a connection name the broker's tools show.
///
/// `AMQP_URL` may list several comma-separated addresses (the nodes of a cluster); they are
/// tried in turn, starting from a different one at each call, and the first that accepts
/// wins.
pub(crate) async fn open(config: &Config, role: &str) -> Result<Connection, Error> {
    let urls = config.amqp_urls();
    let start = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed);
    let mut last_error = None;
    for i in 0..urls.len() {
        let url = urls[(start + i) % urls.len()];
        match open_one(config, url, role).await {
            Ok(conn) => return Ok(conn),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        Error::Config("AMQP_URL is empty; set it to amqp://user:password@host:5672/vhost".into())
    }))
}

async fn open_one(config: &Config, raw_url: &str, role: &str) -> Result<Connection, Error> {
    let url = redact_url(raw_url);
    // lapin ignores query keys it does not know; the TLS ones are ours to apply.
    let (plain_url, tls) = split_tls_params(raw_url, "AMQP_URL")?;
    let mut uri: AMQPUri = plain_url.parse().map_err(|e: String| {
        Error::Config(format!(
            "AMQP_URL {url} is not a valid AMQP URL ({e}); expected amqp://user:password@host:5672/vhost \
             or amqps://user:password@host:5671/vhost"
        ))
    })?;
    // Round up: a sub-second heartbeat must not become 0, which disables heartbeats.
    let secs = config.heartbeat.as_millis().div_ceil(1000);
    let heartbeat = u16::try_from(secs).unwrap_or(u16::MAX);
    uri.query.heartbeat = Some(heartbeat);
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{} ({role})", config.connection_name).into());
    let scheme = uri.scheme.clone();
    let port = uri.authority.port;
    let connecting = async {
        match scheme {
            AMQPScheme::AMQP => Ok(Connection::connect_uri(uri, props).await?),
            AMQPScheme::AMQPS => tls::connect(uri, &plain_url, &url, &tls, props).await,
        }
    };
    match tokio::time::timeout(config.connect_timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(ConnectError::Setup(e))) => Err(e),
        Ok(Err(ConnectError::Lapin(source))) => Err(classify(url, &scheme, port, source)),
        Err(_) => Err(Error::ConnectTimeout {
            url,
            timeout: config.connect_timeout,
        }),
    }
}

/// Why opening a connection failed: before any byte was sent (bad TLS files), or on the wire.
enum ConnectError {
    Setup(Error),
    Lapin(lapin::Error),
}

impl From<lapin::Error> for ConnectError {
    fn from(e: lapin::Error) -> Self {
        Self::Lapin(e)
    }
}

/// Turn lapin's error into one that says what is wrong: a TLS problem, a TLS/plain-text
/// port mismatch, a refused login, or (anything else) an unreachable broker.
fn classify(url: String, scheme: &AMQPScheme, port: u16, source: lapin::Error) -> Error {
    if let Some(reason) = access_refused(&source) {
        return Error::AccessRefused { url, reason };
    }
    if let Some(io) = io_error(&source) {
        if let Some(reason) = tls::describe(io, port) {
            return Error::Tls { url, reason };
        }
        let closed = matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
        );
        if closed && *scheme == AMQPScheme::AMQP {
            return Error::Tls {
                url,
                reason: format!(
                    "the server closed the connection before the AMQP handshake ({io}); \
                     if port {port} is a TLS listener, use amqps://"
                ),
            };
        }
    }
    if *scheme == AMQPScheme::AMQP && matches!(source.kind(), ErrorKind::ParsingError(_)) {
        return Error::Tls {
            url,
            reason: format!(
                "the server did not answer in AMQP ({source}); if port {port} is a TLS \
                 listener, use amqps://"
            ),
        };
    }
    Error::Connect { url, source }
}

/// The broker's reply text when it refused the login: ACCESS_REFUSED (403) after
/// connection.start-ok (wrong user or password), or NOT_ALLOWED (530) at connection.open
/// (no such vhost, or no permission on it).
fn access_refused(e: &lapin::Error) -> Option<String> {
    let ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    // 403 is a "soft" code in the AMQP spec, also when it closes the connection; a vhost
    // that does not exist or that the user may not use is 530 at connection.open.
    matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
    )
    .then(|| amqp.to_string())
}

/// The I/O error inside a lapin error, if that is what it is.
fn io_error(e: &lapin::Error) -> Option<&std::io::Error> {
    match e.kind() {
        ErrorKind::IOError(io) => Some(io),
        _ => None,
    }
}

/// TLS with rustls (cargo feature `tls`).
#[cfg(feature = "tls")]
pub(crate) mod tls {
    use std::sync::Arc;

    use lapin::tcp::{AMQPUriTcpExt, RustlsConnector, TLSConfig};
    use lapin::uri::{AMQPScheme, AMQPUri};
    use lapin::{Connection, ConnectionProperties};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{ClientConfig, RootCertStore};

    use super::ConnectError;
    use crate::Error;
    use crate::config::TlsParams;

    /// Connect over TLS: TCP to the URL's host, then a rustls handshake that sends and
    /// verifies `server_name_indication` (default: the host).
    pub(super) async fn connect(
        uri: AMQPUri,
        raw_url: &str,
        redacted: &str,
        params: &TlsParams,
        props: ConnectionProperties,
    ) -> Result<Connection, ConnectError> {
        // lapin reads the host with `Url::domain`, which is empty for an IP address; the
        // TCP target and the name to verify come from the URL as written.
        let host = url::Url::parse(raw_url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()))
            .unwrap_or_else(|| uri.authority.host.clone());
        let server_name = params
            .server_name_indication
            .clone()
            .unwrap_or_else(|| host.clone());
        let config = client_config(params, "AMQP_URL", redacted).map_err(ConnectError::Setup)?;
        let connector = RustlsConnector::from(Arc::new(config));
        let mut tcp_uri = uri.clone();
        tcp_uri.scheme = AMQPScheme::AMQP;
        tcp_uri.authority.host = host;
        // Only the address is needed to dial; keep the credentials out of the closure.
        tcp_uri.authority.userinfo = Default::default();
        let runtime = lapin::runtime::default_runtime()?;
        let conn = Connection::connector(
            uri,
            runtime,
            async move |_uri, runtime| {
                let tcp = tcp_uri
                    .connect_with_config_async(TLSConfig::default(), &runtime)
                    .await?;
                Ok(tcp.into_rustls(&connector, &server_name).await?)
            },
            props,
        )
        .await?;
        Ok(conn)
    }

    /// A rustls client configuration from RabbitMQ's URI parameters: the CAs of
    /// `cacertfile` (else the system's roots) and the client certificate of
    /// `certfile`/`keyfile`. `what` names the setting in errors (`AMQP_URL`).
    pub(crate) fn client_config(
        params: &TlsParams,
        what: &str,
        redacted: &str,
    ) -> Result<ClientConfig, Error> {
        let bad = |detail: String| Error::Config(format!("{what} {redacted}: {detail}"));
        let mut roots = RootCertStore::empty();
        match &params.cacertfile {
            Some(path) => {
                for cert in read_certs(path, "cacertfile").map_err(bad)? {
                    roots.add(cert).map_err(|e| {
                        bad(format!(
                            "cacertfile {path} holds an unusable CA certificate: {e}"
                        ))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(bad(format!(
                        "no system root certificates found ({} errors); set cacertfile=<PEM file of the CA>",
                        found.errors.len()
                    )));
                }
            }
        }
        // An explicit provider: a process where another crate also enabled aws-lc-rs
        // would otherwise have no single default and rustls would refuse to build.
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(format!("TLS set-up failed: {e}")))?
                .with_root_certificates(roots);
        match (&params.certfile, &params.keyfile) {
            (Some(certfile), Some(keyfile)) => {
                let chain = read_certs(certfile, "certfile").map_err(bad)?;
                let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|e| {
                    bad(format!(
                        "keyfile {keyfile} has no usable PEM private key: {e}"
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    bad(format!(
                        "certfile {certfile} and keyfile {keyfile} do not make a client certificate: {e}"
                    ))
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    fn read_certs(path: &str, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{key} {path} cannot be read as PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{key} {path} holds no PEM certificate"));
        }
        Ok(certs)
    }

    /// What a TLS failure means, for the user, when `io` carries one; `port` is the port
    /// dialled.
    pub(crate) fn describe(io: &std::io::Error, port: u16) -> Option<String> {
        let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
        let text = tls.to_string();
        Some(describe_text(&text, port).unwrap_or_else(|| format!("TLS handshake failed: {text}")))
    }

    /// [`describe`] for the first TLS error in `e`'s chain of sources, read from the
    /// messages: the Redis client keeps the rustls error behind a shared pointer that
    /// hides its type, but not its words.
    pub(crate) fn describe_chain(
        e: &(dyn std::error::Error + 'static),
        port: u16,
    ) -> Option<String> {
        let mut next = Some(e);
        while let Some(e) = next {
            if let Some(found) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| describe(io, port))
                .or_else(|| describe_text(&e.to_string(), port))
            {
                return Some(found);
            }
            next = e.source();
        }
        None
    }

    /// The advice for a rustls error message (`rustls::Error`'s `Display`), `None` when
    /// `text` is not one.
    fn describe_text(text: &str, port: u16) -> Option<String> {
        let why = if let Some(at) = text.find("invalid peer certificate: ") {
            let detail = &text[at + "invalid peer certificate: ".len()..];
            if detail.contains("UnknownIssuer") {
                "the server's certificate is not signed by a CA this client trusts; set \
                 cacertfile=<PEM file of the CA that signed it>, or check this is the right server"
                    .to_owned()
            } else if detail.contains("not valid for name") || detail.contains("NotValidForName") {
                format!(
                    "the server's certificate is not valid for the name connected to ({detail}); \
                     connect by a name the certificate lists, or set server_name_indication=<that name>"
                )
            } else if detail.contains("expired") || detail.contains("Expired") {
                format!("the server's certificate has expired ({detail}); renew it on the server")
            } else if detail.contains("not valid yet") || detail.contains("NotValidYet") {
                format!("the server's certificate is not valid yet ({detail}); check the clocks")
            } else {
                format!("the server's certificate is not acceptable: {detail}")
            }
        } else if text.contains("received corrupt message") || text.contains("InappropriateMessage")
        {
            format!(
                "is port {port} a TLS listener? The server did not answer in TLS ({text}); \
                 a plain-text port takes the URL without the `s` (amqp://, redis://)"
            )
        } else if let Some(at) = text.find("received fatal alert: ") {
            let alert = &text[at + "received fatal alert: ".len()..];
            let client_cert = [
                "CertificateRequired",
                "BadCertificate",
                "UnknownCA",
                "CertificateUnknown",
                "AccessDenied",
                "HandshakeFailure",
            ]
            .iter()
            .any(|a| alert.starts_with(a));
            if client_cert {
                format!(
                    "the server refused the connection ({alert}); it may require a client \
                     certificate: set certfile and keyfile to one its CA trusts"
                )
            } else {
                format!("the server ended the handshake ({alert})")
            }
        } else if text.contains("peer is incompatible") || text.contains("peer misbehaved") {
            text.to_owned()
        } else {
            return None;
        };
        Some(format!("TLS handshake failed: {why}"))
    }
}

/// Without the `tls` feature, `amqps://` is a configuration error: never plain text.
#[cfg(not(feature = "tls"))]
pub(crate) mod tls {
    use lapin::uri::AMQPUri;
    use lapin::{Connection, ConnectionProperties};

    use super::ConnectError;
    use crate::Error;
    use crate::config::TlsParams;

    pub(super) async fn connect(
        _uri: AMQPUri,
        _raw_url: &str,
        redacted: &str,
        _params: &TlsParams,
        _props: ConnectionProperties,
    ) -> Result<Connection, ConnectError> {
        Err(ConnectError::Setup(Error::Config(format!(
            "AMQP_URL {redacted} is amqps://, but reliable-mq was built without its `tls` \
             feature: enable it (it is a default feature)"
        ))))
    }

    pub(crate) fn describe(_io: &std::io::Error, _port: u16) -> Option<String> {
        None
    }

    pub(crate) fn describe_chain(
        _e: &(dyn std::error::Error + 'static),
        _port: u16,
    ) -> Option<String> {
        None
    }
}

/// Capped exponential backoff with jitter: about 100ms, 200ms, 400ms, ... up to `max`.
///
/// The jitter (each delay drawn between the nominal one and twice it, capped) keeps a fleet
/// of instances from reconnecting in lockstep after a broker restart. Built on `backon`.
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub(crate) const FIRST: Duration = Duration::from_millis(100);

    pub(crate) fn new(max: Duration) -> Self {
        use backon::BackoffBuilder as _;
        let max = max.max(Self::FIRST);
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(Self::FIRST)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The delay to wait now; the next one doubles, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    pub(crate) fn reset(&mut self) {
        use backon::BackoffBuilder as _;
        self.delays = self.builder.build();
    }
}

/// The connections consumers share: each slot holds a connection opened on first use and
/// reopened by the first consumer that finds it broken. A consumer's session is a channel
/// on its slot's connection, so a channel-level error ends that session alone; a lost
/// connection ends the sessions of every consumer on it, and each starts a new one on the
/// reopened connection. Deliveries of a closed channel cannot be acked on its successor:
/// each lapin channel poisons its own ackers when it closes (a generation per channel),
/// and the broker redelivers what they held.
pub(crate) struct ConnectionSet {
    config: std::sync::Arc<Config>,
    slots: Vec<tokio::sync::Mutex<Option<std::sync::Arc<Connection>>>>,
    /// How many consumers there are (consumer `i` is on slot `i % slots`).
    consumers: usize,
}

/// RabbitMQ's default `channel_max`: the channels one connection may carry.
pub(crate) const DEFAULT_CHANNEL_MAX: usize = 2047;

/// The channels one consumer may hold open at once on its connection: its session's
/// channel, and the short-lived one its topology is (re)declared on while that is open (a
/// held settle copy redeclares before it tries again).
pub(crate) const CHANNELS_PER_CONSUMER: usize = 2;

/// How many connections `consumers` consumers get: `configured`, or more when that many
/// would put more than `channel_max` channels on one of them (the broker would refuse the
/// channels past it, and those consumers would never attach).
pub(crate) fn consumer_connections(
    configured: usize,
    consumers: usize,
    channel_max: usize,
) -> usize {
    let per_connection = (channel_max / CHANNELS_PER_CONSUMER).max(1);
    configured.max(1).max(consumers.div_ceil(per_connection))
}

/// How many of `consumers` consumers sit on slot `slot` of `slots` (consumer `i` on
/// `i % slots`).
fn consumers_on(slot: usize, slots: usize, consumers: usize) -> usize {
    (0..consumers).filter(|i| i % slots == slot).count()
}

/// The error when the broker allows fewer channels per connection (its negotiated
/// `channel_max`) than the consumers on one connection may need.
fn too_few_channels(channel_max: usize, on_connection: usize, consumers: usize) -> Option<Error> {
    let needed = on_connection * CHANNELS_PER_CONSUMER;
    if needed <= channel_max {
        return None;
    }
    let enough = consumer_connections(1, consumers, channel_max);
    Some(Error::Config(format!(
        "the broker allows {channel_max} channels per connection (channel_max), but \
         {on_connection} consumers share one and may need {needed} (up to \
         {CHANNELS_PER_CONSUMER} each): set RELIABLE_MQ_CONSUMER_CONNECTIONS \
         (Config::with_consumer_connections) to at least {enough}"
    )))
}

impl ConnectionSet {
    /// Slots for `consumers` consumers, none open yet: `config.consumer_connections`, or
    /// more so that no connection carries more channels than RabbitMQ allows by default.
    pub(crate) fn new(config: std::sync::Arc<Config>, consumers: usize) -> Self {
        let n = consumer_connections(config.consumer_connections, consumers, DEFAULT_CHANNEL_MAX);
        if n > config.consumer_connections.max(1) {
            tracing::info!(
                consumers,
                configured = config.consumer_connections,
                connections = n,
                "spreading the consumers over more connections than configured: a connection \
                 carries at most {DEFAULT_CHANNEL_MAX} channels, {CHANNELS_PER_CONSUMER} a consumer"
            );
        }
        let slots = (0..n).map(|_| tokio::sync::Mutex::new(None)).collect();
        Self {
            config,
            slots,
            consumers,
        }
    }

    /// The open connection of the slot for consumer `index`, opening it if it is not.
    pub(crate) async fn get(&self, index: usize) -> Result<std::sync::Arc<Connection>, Error> {
        let n = self.slots.len();
        let slot = index % n;
        // Consumers that find the connection broken at once wait here for the first
        // one's reconnect instead of opening one each.
        let mut guard = self.slots[slot].lock().await;
        if let Some(conn) = guard.as_ref()
            && conn.status().connected()
        {
            return Ok(std::sync::Arc::clone(conn));
        }
        let role = if n == 1 {
            "consumers".to_owned()
        } else {
            format!("consumers {}/{n}", slot + 1)
        };
        let conn = open(&self.config, &role).await?;
        // A broker configured below the default `channel_max` would refuse the channels
        // past it: say so at once rather than leave those consumers retrying forever.
        let channel_max = match conn.configuration().channel_max() {
            0 => usize::from(u16::MAX),
            max => usize::from(max),
        };
        if let Some(e) = too_few_channels(
            channel_max,
            consumers_on(slot, n, self.consumers),
            self.consumers,
        ) {
            let _ = conn.close(200, "too few channels allowed".into()).await;
            return Err(e);
        }
        let conn = std::sync::Arc::new(conn);
        *guard = Some(std::sync::Arc::clone(&conn));
        Ok(conn)
    }

    /// Close every open connection (at shutdown, once the consumers have stopped).
    pub(crate) async fn close(&self) {
        for slot in &self.slots {
            let conn = slot.lock().await.take();
            if let Some(conn) = conn
                && conn.status().connected()
            {
                let _ = conn.close(200, "consumers stopping".into()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let seen: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        // Each delay lies between the nominal one (100, 200, 400, then the cap) and twice
        // it, never above the cap.
        for (delay, nominal) in seen.iter().zip([100, 200, 400, 500, 500, 500]) {
            assert!(
                (nominal..=(2 * nominal).min(500)).contains(delay),
                "{seen:?}"
            );
        }
        b.reset();
        assert!((100..200).contains(&b.next_delay().as_millis()));
    }

    #[test]
    fn consumers_are_spread_so_no_connection_exceeds_its_channels() {
        // 1023 consumers (2046 channels) fit on one connection; the next needs a second.
        assert_eq!(consumer_connections(1, 1023, DEFAULT_CHANNEL_MAX), 1);
        assert_eq!(consumer_connections(1, 1024, DEFAULT_CHANNEL_MAX), 2);
        assert_eq!(consumer_connections(1, 5000, DEFAULT_CHANNEL_MAX), 5);
        // More configured than needed: kept; zero means one.
        assert_eq!(consumer_connections(8, 10, DEFAULT_CHANNEL_MAX), 8);
        assert_eq!(consumer_connections(0, 10, DEFAULT_CHANNEL_MAX), 1);
        // Whatever the count, each connection's share stays within channel_max.
        for consumers in [1, 1023, 1024, 2047, 2048, 4093, 10_000] {
            let n = consumer_connections(1, consumers, DEFAULT_CHANNEL_MAX);
            let busiest = (0..n).map(|slot| consumers_on(slot, n, consumers)).max();
            assert!(
                busiest.is_some_and(|c| c * CHANNELS_PER_CONSUMER <= DEFAULT_CHANNEL_MAX),
                "{consumers} consumers on {n} connections"
            );
        }
    }

    #[test]
    fn a_broker_allowing_fewer_channels_is_a_clear_start_up_error() {
        assert!(too_few_channels(2047, 1023, 1023).is_none());
        let e = too_few_channels(100, 60, 60).map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("allows 100 channels"), "{e}");
        assert!(e.contains("60 consumers share one and may need 120"), "{e}");
        assert!(e.contains("RELIABLE_MQ_CONSUMER_CONNECTIONS"), "{e}");
        assert!(e.contains("at least 2"), "{e}");
        assert!(!e.contains("  "), "one line, single spaces: {e:?}");
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let firsts: std::collections::BTreeSet<_> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(30)).next_delay())
            .collect();
        assert!(firsts.len() > 1, "twenty instances all waited {firsts:?}");
    }
}
