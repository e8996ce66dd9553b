//! # tektree-outbox
//!
//! The bus port ([`Bus`], [`Subscription`]), its adapters ([`MemoryBus`] for the embedded
//! single-process mode, [`RedisBus`] on Redis Streams, [`NatsBus`] on NATS JetStream), the
//! outbox [`relay`], the store [`binding`] of a bus and the [`recovery`] of a bus that lost
//! events. The [`conformance`] suite checks an adapter against the contract below;
//! [`test_support`] starts real servers for tests (also used by other crates' tests).
//!
//! Delivery contract every adapter gives:
//! - **At least once.** A delivery stays pending until acknowledged; pending deliveries of a
//!   consumer that stopped acknowledging are handed again (to any consumer of the group) once
//!   they have been idle for `min_idle`.
//! - **Published in position order, deduplicated by position.** [`Bus::publish`] drops events
//!   whose position is not above the highest position already published, so a relay that
//!   crashed after publishing but before marking its outbox rows resumes without duplicates.
//! - **Order.** Each consumer sees new deliveries in position order, hence per-aggregate order.
//!   Several consumers of one group may see an aggregate's events interleaved with each other;
//!   consumers restore per-aggregate order with the sequence guard of the read-model store.

#![deny(missing_docs)]

pub mod binding;
mod bus;
#[cfg(any(test, feature = "testkit"))]
pub mod conformance;
#[cfg(any(test, feature = "testkit"))]
pub mod faulty;
mod memory;
mod nats_bus;
pub mod recovery;
mod redis_bus;
pub mod relay;
#[cfg(any(test, feature = "testkit"))]
pub mod test_support;

pub use bus::{open_bus, Bus, BusError, DeadLetter, Delivery, Subscription, SubscriptionOptions};
pub use memory::MemoryBus;
pub use nats_bus::{
    NatsBus, NatsDeadLetter, DEFAULT_DEAD_LETTER_PREFIX, DEFAULT_DEAD_LETTER_STREAM,
    DEFAULT_NATS_STREAM, DEFAULT_SUBJECT_PREFIX, DUPLICATE_WINDOW, HEADER_DELIVERY_COUNT,
    HEADER_GROUP, HEADER_POSITION, HEADER_REASON, MAX_ACK_PENDING,
};
pub use redis_bus::{RedisBus, DEFAULT_STREAM};
pub use relay::{relay_once, RelayConfig, RelayError};
