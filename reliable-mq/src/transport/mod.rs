//! The seam between the delivery pipeline and the broker it runs on.
//!
//! The driver, claim, invoke and settle code, the retry ladder, the dead-letter headers
//! and the publisher's retry and error classification are written once. What differs
//! between RabbitMQ (lapin) and the in-memory broker of feature `testing` is small and
//! lives here, as enums rather than trait objects: a match on a two-variant enum is all
//! the production path pays, and without feature `testing` each enum has a single variant
//! that the compiler sees through.
//!
//! - [`Acker`]: ack, nack (requeue or not), and whether the delivery's channel is still up;
//! - [`Link`]: the session's connection, to declare the topology on;
//! - [`Session`] (in the driver): the subscription's deliveries and a link-lost signal;
//! - the publisher's one confirmed publish, answered with the ledger's `Outcome`
//!   (`Confirmed`, `Nacked`, `Returned`, `Failed`), in `publisher::Publisher::hand_over`;
//!   `Publisher::attempt` then counts and judges it the same way for both.

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use crate::Error;
use crate::topology::Topology;

#[cfg(feature = "testing")]
pub mod memory;

/// Where an app's consumers and publisher talk to.
#[derive(Clone, Default)]
pub(crate) enum Transport {
    /// RabbitMQ over lapin, from the app's `Config`.
    #[default]
    Lapin,
    /// The in-memory broker of feature `testing`.
    #[cfg(feature = "testing")]
    Memory(Arc<memory::MemoryBroker>),
}

/// The session's connection: what a held settle copy redeclares the topology on.
pub(crate) enum Link {
    Lapin(Arc<lapin::Connection>),
    #[cfg(feature = "testing")]
    Memory(Arc<memory::MemoryBroker>),
}

impl Link {
    /// Declare `topology` (every object, idempotently).
    pub(crate) async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        match self {
            Self::Lapin(conn) => topology.declare(conn).await,
            #[cfg(feature = "testing")]
            Self::Memory(broker) => broker.declare(topology),
        }
    }
}

/// Settles one delivery on the channel it came from.
#[derive(Clone)]
pub(crate) enum Acker {
    Lapin(lapin::Acker),
    #[cfg(feature = "testing")]
    Memory(memory::MemoryAcker),
}

impl Acker {
    /// Ack; `Ok(false)` when the channel is gone (the broker redelivers).
    pub(crate) async fn ack(&self) -> Result<bool, String> {
        match self {
            Self::Lapin(a) => a
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| e.to_string()),
            #[cfg(feature = "testing")]
            Self::Memory(a) => Ok(a.ack()),
        }
    }

    /// Nack, requeueing or not (not: the queue's dead-letter exchange gets it).
    pub(crate) async fn nack(&self, requeue: bool) -> Result<bool, String> {
        match self {
            Self::Lapin(a) => a
                .nack(BasicNackOptions {
                    requeue,
                    ..BasicNackOptions::default()
                })
                .await
                .map_err(|e| e.to_string()),
            #[cfg(feature = "testing")]
            Self::Memory(a) => Ok(a.nack(requeue)),
        }
    }

    /// Whether the delivery's channel is still up (an ack can still reach the broker).
    pub(crate) fn usable(&self) -> bool {
        match self {
            Self::Lapin(a) => a.usable(),
            #[cfg(feature = "testing")]
            Self::Memory(a) => a.usable(),
        }
    }
}

/// One delivery as the driver receives it, whatever the transport.
pub(crate) struct RawDelivery {
    pub(crate) delivery_tag: u64,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) properties: BasicProperties,
    pub(crate) data: Vec<u8>,
    pub(crate) acker: Acker,
}

impl From<lapin::message::Delivery> for RawDelivery {
    fn from(d: lapin::message::Delivery) -> Self {
        Self {
            delivery_tag: d.delivery_tag,
            exchange: d.exchange.to_string(),
            routing_key: d.routing_key.to_string(),
            redelivered: d.redelivered,
            properties: d.properties,
            data: d.data,
            acker: Acker::Lapin(d.acker),
        }
    }
}
