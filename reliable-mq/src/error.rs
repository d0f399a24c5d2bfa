//! Errors: [`HandlerError`] is what user code returns; [`Error`] is what the runtime
//! returns to `main`. Every message says what to do about it.

use std::fmt;

use crate::failure::FailureKind;

/// Why a handler did not succeed, and whether a later attempt could.
///
/// - [`HandlerError::retry`]: transient (a database blip); the message is retried after a
///   delay, then dead-lettered once `max_retries` are spent.
/// - [`HandlerError::reject`]: permanent (invalid order); straight to the DLQ.
/// - `?` on any `std::error::Error` is a retry.
///
/// ```
/// use reliable_mq::HandlerError;
///
/// fn check(qty: u32) -> Result<(), HandlerError> {
///     if qty == 0 {
///         return Err(HandlerError::reject("quantity must be positive"));
///     }
///     let _n: u32 = "42".parse()?; // a ParseIntError here would be retried
///     Ok(())
/// }
/// assert!(check(0).unwrap_err().is_reject());
/// ```
pub struct HandlerError {
    kind: FailureKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    /// A transient failure: retry after a delay.
    pub fn retry(e: impl fmt::Display) -> Self {
        Self::new(FailureKind::Error, e.to_string())
    }

    /// A permanent failure: dead-letter now, no retry.
    pub fn reject(e: impl fmt::Display) -> Self {
        Self::new(FailureKind::Rejected, e.to_string())
    }

    /// The body could not be decoded into the handler's type (dead-lettered at once).
    pub fn decode(e: impl fmt::Display) -> Self {
        Self::new(FailureKind::Decode, e.to_string())
    }

    pub(crate) fn new(kind: FailureKind, message: String) -> Self {
        Self {
            kind,
            message,
            source: None,
        }
    }

    /// Whether this error asks for a retry.
    pub fn is_retry(&self) -> bool {
        self.kind.is_retryable()
    }

    /// Whether this error sends the message straight to the DLQ.
    pub fn is_reject(&self) -> bool {
        !self.kind.is_retryable()
    }

    /// The failure kind, as written in `x-error-kind`.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The message, as written in `x-exception-message`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The underlying error, when it came from `?`.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.as_str())
    }
}

/// `?` on any error is a retryable failure.
#[cfg(not(feature = "anyhow"))]
impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        Self {
            kind: FailureKind::Error,
            message,
            source: Some(Box::new(e)),
        }
    }
}

/// `?` on any error, or on an `anyhow::Error`, is a retryable failure. (With the `anyhow`
/// feature the conversion goes through `anyhow::Error`, which every `std::error::Error +
/// Send + Sync + 'static` converts into, so nothing that worked without it stops working.)
#[cfg(feature = "anyhow")]
impl<E: Into<anyhow::Error>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let e: anyhow::Error = e.into();
        // Kept as itself, not boxed inside anyhow (which hides it from `downcast_ref`):
        // the inbox tells a lost race or an unreachable database from other failures by it.
        #[cfg(feature = "postgres")]
        let e = match e.downcast::<sqlx::Error>() {
            Ok(db) => {
                return Self {
                    kind: FailureKind::Error,
                    message: sqlx_message(&db),
                    source: Some(Box::new(db)),
                };
            }
            Err(e) => e,
        };
        Self {
            kind: FailureKind::Error,
            // `{:#}` prints the whole cause chain, as the std conversion does.
            message: format!("{e:#}"),
            source: Some(e.into()),
        }
    }
}

/// `e`'s message with its causes, as the conversions above write it.
#[cfg(all(feature = "anyhow", feature = "postgres"))]
fn sqlx_message(e: &sqlx::Error) -> String {
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

/// An error raised by the runtime: at start-up (configuration, topology, connection) or
/// while running (a consumer that cannot recover).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached.
    #[error(
        "cannot connect to RabbitMQ at {url}: {source}; is the broker running and is AMQP_URL right?"
    )]
    Connect {
        /// The URL, password removed.
        url: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// A TLS problem: the handshake failed (untrusted CA, wrong host name, expired
    /// certificate, client certificate refused), or one side of the connection speaks TLS
    /// and the other does not. Never retried in plain text.
    #[error("cannot connect to {url}: {reason}")]
    Tls {
        /// The URL, password removed.
        url: String,
        /// What failed and what to do about it.
        reason: String,
    },
    /// The broker refused the login: wrong user or password (ACCESS_REFUSED), or a vhost
    /// that does not exist or the user may not use (NOT_ALLOWED).
    #[error(
        "RabbitMQ at {url} refused the login: {reason}; check the user name and password in AMQP_URL, and that the vhost exists and the user may access it"
    )]
    AccessRefused {
        /// The URL, password removed.
        url: String,
        /// The broker's reply.
        reason: String,
    },
    /// The broker did not complete the connection in time.
    #[error(
        "connecting to RabbitMQ at {url} took longer than {timeout:?}; is the address reachable (a firewall dropping packets looks like this)?{}",
        timeout_hint(.url)
    )]
    ConnectTimeout {
        /// The URL, password removed.
        url: String,
        /// The configured connect timeout.
        timeout: std::time::Duration,
    },
    /// An existing broker object was declared with other arguments.
    #[error(
        "{object} already exists on the broker with different settings: {reason}. \
         reliable-mq never deletes broker objects: change the attribute to match, or delete \
         or rename the {object} yourself (`rabbitmqctl delete_queue` / a new name)"
    )]
    TopologyMismatch {
        /// e.g. `queue 'orders'`.
        object: String,
        /// The broker's PRECONDITION_FAILED text, naming the argument.
        reason: String,
    },
    /// Declaring topology failed for another reason.
    #[error("cannot declare {object}: {source}")]
    Declare {
        /// e.g. `exchange 'shop'`.
        object: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// A consumer's settings are invalid (hand-built consumers; the macro checks at compile time).
    #[error("consumer `{consumer}` is misconfigured: {problems}")]
    InvalidConsumer {
        /// The consumer's name.
        consumer: String,
        /// Every problem found, `; `-separated.
        problems: String,
    },
    /// Two consumers disagree about a shared queue or exchange.
    #[error("consumers `{first}` and `{second}` conflict: {detail}")]
    ConflictingConsumers {
        /// One consumer.
        first: String,
        /// The other.
        second: String,
        /// What differs and how to fix it.
        detail: String,
    },
    /// A consumer takes `State<T>` and no state of that type was registered.
    #[error(
        "consumer `{consumer}` takes `State<{type_name}>`, but no `{type_name}` is registered: add it with App::with_state(value) (or reliable_mq::run_with(value))"
    )]
    MissingState {
        /// The consumer's name.
        consumer: String,
        /// The state type.
        type_name: &'static str,
    },
    /// A consumer's task panicked: a bug in reliable-mq, reported rather than hidden.
    #[error("the task running consumer `{consumer}` panicked: {detail}; please report it")]
    ConsumerPanicked {
        /// The consumer's queue.
        consumer: String,
        /// The panic or cancellation.
        detail: String,
    },
    /// Invalid configuration (environment or builder).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No consumer was registered.
    #[error(
        "no consumers to run: annotate an async fn with #[reliable_mq::consumer(...)] or add one with App::consumer"
    )]
    NoConsumers,
    /// An AMQP operation failed.
    #[error("AMQP error during {context}: {source}")]
    Amqp {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// A publish failed.
    #[error(transparent)]
    Publish(#[from] crate::publisher::PublishError),
    /// The dedup store failed.
    #[error(transparent)]
    Dedup(#[from] crate::dedup::DedupError),
    /// Waiting for the signal handler failed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
}

/// A TLS handshake with a server that waits for something else stalls rather than fails.
fn timeout_hint(url: &str) -> &'static str {
    if url.starts_with("amqps://") {
        " With amqps://, also check that the port is a TLS listener."
    } else {
        ""
    }
}

impl Error {
    pub(crate) fn amqp(context: impl Into<String>, source: lapin::Error) -> Self {
        Self::Amqp {
            context: context.into(),
            source,
        }
    }
}
