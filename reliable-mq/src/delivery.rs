//! The message a handler sees: body, properties, and where it is in its retry ladder.
//! Acknowledgement stays with the runtime; a handler cannot ack or nack.

use lapin::BasicProperties;
use lapin::types::FieldTable;

use std::sync::Arc;

use crate::failure::{header, header_int, header_str};
use crate::publisher::Publisher;
use crate::state::{StateMap, StateValue};

/// One received message, as passed to `async fn(T, &Delivery)` handlers.
#[derive(Debug)]
pub struct Delivery {
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) queue: String,
    pub(crate) redelivered: bool,
    pub(crate) delivery_tag: u64,
    pub(crate) publisher: Option<Publisher>,
    pub(crate) states: Arc<StateMap>,
}

impl Delivery {
    /// Build a delivery by hand, for unit-testing handlers without a broker (cargo
    /// feature `testing`).
    ///
    /// ```
    /// # use reliable_mq::Delivery;
    /// let d = Delivery::for_test(br#"{"id":1}"#.to_vec()).with_message_id("order-1");
    /// assert_eq!(d.message_id(), Some("order-1"));
    /// assert_eq!(d.attempt(), 1);
    /// ```
    #[cfg(any(test, feature = "testing"))]
    pub fn for_test(body: Vec<u8>) -> Self {
        Self {
            body,
            properties: BasicProperties::default().with_content_type("application/json".into()),
            exchange: String::new(),
            routing_key: String::new(),
            queue: String::new(),
            redelivered: false,
            delivery_tag: 0,
            publisher: None,
            states: Arc::default(),
        }
    }

    /// Add state the handler takes as `State<T>` (builder for [`Delivery::for_test`]).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_state<T: StateValue>(mut self, value: T) -> Self {
        Arc::make_mut(&mut self.states).insert(value);
        self
    }

    /// Set the `message_id` (builder for [`Delivery::for_test`]).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_message_id(mut self, id: &str) -> Self {
        self.properties = self.properties.with_message_id(id.into());
        self
    }

    /// Set the headers (builder for [`Delivery::for_test`]).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_headers(mut self, headers: FieldTable) -> Self {
        self.properties = self.properties.with_headers(headers);
        self
    }

    /// The raw body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The AMQP `message_id` property (the dedup key of idempotent consumers).
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|s| s.as_str())
    }

    /// The AMQP `content_type` property.
    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(|s| s.as_str())
    }

    /// The message headers.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// A string header, if present and a string.
    pub fn header(&self, key: &str) -> Option<&str> {
        header_str(self.headers(), key)
    }

    /// All AMQP properties.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// Which attempt this is: 1 for the first delivery, 2 for the first retry, ...
    /// Counted in reliable-mq's own `x-attempts` header, not in `x-death`.
    pub fn attempt(&self) -> u32 {
        let failed = header_int(self.headers(), header::ATTEMPTS).unwrap_or(0);
        u32::try_from(failed.max(0))
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// Whether the broker flagged this as a redelivery (an earlier copy was not acked,
    /// e.g. a consumer crashed or a connection dropped mid-handler).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// The exchange the message was published to (for retried messages, the original
    /// one, from `x-original-exchange`).
    pub fn exchange(&self) -> &str {
        self.header(header::ORIGINAL_EXCHANGE)
            .unwrap_or(&self.exchange)
    }

    /// The routing key it was published with (the original one for retried messages).
    pub fn routing_key(&self) -> &str {
        self.header(header::ORIGINAL_ROUTING_KEY)
            .unwrap_or(&self.routing_key)
    }

    /// The queue it was consumed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The broker's delivery tag on the consumer's channel (for logs).
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }

    /// A clone of the state of type `T` registered with the app, for handlers built by
    /// hand (`#[consumer]` handlers take `State<T>` parameters instead).
    pub fn state<T: StateValue>(&self) -> Option<T> {
        self.states.get::<T>()
    }

    /// A confirmed publisher sharing the app's publishing connection, to emit events
    /// from a handler. `None` for deliveries built with `Delivery::for_test`.
    pub fn publisher(&self) -> Option<&Publisher> {
        self.publisher.as_ref()
    }
}
