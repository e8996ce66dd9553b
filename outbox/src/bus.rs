//! The bus port.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tektree_domain::EventEnvelope;
use tektree_event_store::StoreIdentity;

/// Errors of a [`Bus`].
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus URL is not understood.
    #[error(
        "invalid bus url {0:?}: expected `memory`, `redis://host:port[/db]` or `nats://host:port`"
    )]
    InvalidUrl(String),
    /// The transport failed (connection refused, server error). Retryable.
    #[error("bus transport: {0}")]
    Transport(String),
    /// The bus's server-side setup cannot work with this adapter (e.g. a JetStream stream that
    /// exists with other subjects or retention), or a name given to the adapter is invalid.
    /// Not retryable: an operator must fix it.
    #[error("bus configuration: {0}")]
    Config(String),
    /// [`Bus::publish_after`] refused: the bus ends at `last`, below the position it had to
    /// hold (it lost events; see [`crate::recovery`]). Nothing was published.
    #[error("the bus ends at position {last}, below the {floor} it must hold: it lost events")]
    Behind {
        /// The bus's last position.
        last: u64,
        /// The position it had to hold.
        floor: u64,
    },
    /// A message on the bus is not a valid envelope.
    #[error("undecodable bus message {id}: {reason}")]
    Decode {
        /// Bus message id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// Options of one consumer's subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    /// Consumer group (one per projection or policy, e.g. `projection.xp`).
    pub group: String,
    /// This consumer's name, unique within the group (e.g. `worker-<pid>`).
    pub consumer: String,
    /// How long a delivery must stay unacknowledged before it is handed out again, to this
    /// consumer or another one of the group. Default 30 s.
    pub min_idle: Duration,
}

impl SubscriptionOptions {
    /// Options with the default `min_idle` of 30 s.
    pub fn new(group: impl Into<String>, consumer: impl Into<String>) -> Self {
        SubscriptionOptions {
            group: group.into(),
            consumer: consumer.into(),
            min_idle: Duration::from_secs(30),
        }
    }
}

/// One message handed to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Bus message id, used to acknowledge.
    pub id: String,
    /// The committed event.
    pub envelope: EventEnvelope,
    /// How many times this message has been handed out, including this time (1 = first).
    pub delivery_count: u64,
}

/// A delivery a consumer group gave up on (it failed `max_deliver` times), set aside on the bus
/// until an operator re-drives or removes it (`tektree-replay dead-letters`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Id of the dead letter on the bus (pass it to [`Bus::remove_dead_letter`]).
    pub id: String,
    /// The consumer group that gave up.
    pub group: String,
    /// Why (the last error).
    pub reason: String,
    /// How many times processing had failed.
    pub delivery_count: u64,
    /// The event.
    pub envelope: EventEnvelope,
}

/// A publish/subscribe log with consumer groups.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes `events` (in ascending position order) if the bus holds every position up to
    /// `floor` (its last position is `floor` or more), checked atomically with the publish, so
    /// that events never land above a hole the broker made by losing data (the relay passes
    /// the position before its first record; see [`crate::recovery`]). Events whose position is
    /// not above the highest already published are dropped. Returns once the bus has accepted
    /// them.
    ///
    /// # Errors
    /// [`BusError::Behind`] (nothing published) when the bus ends below `floor`;
    /// [`BusError::Transport`]: some prefix of `events` may have been published, which a retry
    /// deduplicates.
    async fn publish_after(&self, floor: u64, events: &[EventEnvelope]) -> Result<(), BusError>;

    /// [`Bus::publish_after`] with no floor.
    ///
    /// # Errors
    /// [`BusError::Transport`].
    async fn publish(&self, events: &[EventEnvelope]) -> Result<(), BusError> {
        self.publish_after(0, events).await
    }

    /// Joins consumer group `options.group` as `options.consumer`, creating the group if needed.
    /// A new group starts at the beginning of the log.
    async fn subscribe(
        &self,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError>;

    /// Highest position published so far (0 if none).
    async fn last_published(&self) -> Result<u64, BusError>;

    /// The store this bus is bound to (issue #12; see [`crate::binding`]), `None` while no
    /// store has bound it.
    ///
    /// # Errors
    /// [`BusError::Transport`]; [`BusError::Decode`] for a binding this build cannot read.
    async fn bound_store(&self) -> Result<Option<StoreIdentity>, BusError>;

    /// Binds the bus to `identity` if no store has bound it yet, atomically (of two processes
    /// binding at once, one wins); returns the identity the bus is bound to afterwards —
    /// `identity`, or the one bound before. Never replaces a binding.
    ///
    /// # Errors
    /// [`BusError::Transport`].
    async fn bind_store(&self, identity: &StoreIdentity) -> Result<StoreIdentity, BusError>;

    /// For a store restored from a backup (its epoch raised, see [`crate::binding`]): if the
    /// bus is bound to `from`, deletes every published event, consumer group and dead letter
    /// and binds the bus to `to`; returns `false` (changing nothing) when the bus is not bound
    /// to `from` (another process did it first). The events of `from`'s epoch must go: the
    /// restored store gives their positions to other events.
    ///
    /// Redis does it atomically (one script); NATS deletes the streams, then replaces the
    /// binding only if it is still `from` (a compare-and-set on its revision). The default
    /// refuses, for buses that cannot empty themselves.
    ///
    /// # Errors
    /// [`BusError::Transport`]; [`BusError::Config`] from the default.
    async fn empty_and_rebind(
        &self,
        from: &StoreIdentity,
        to: &StoreIdentity,
    ) -> Result<bool, BusError> {
        let _ = (from, to);
        Err(BusError::Config(
            "this bus cannot be emptied for a restored store".into(),
        ))
    }

    /// The event at the highest published position (`None` when nothing is published).
    ///
    /// # Errors
    /// [`BusError::Transport`]; [`BusError::Decode`] when that message is not an envelope.
    async fn last_event(&self) -> Result<Option<EventEnvelope>, BusError>;

    /// Sets `delivery` aside as a dead letter of `group` with `reason`. The caller then
    /// acknowledges the delivery. Durable as the bus itself (in-process: lost with the process).
    async fn dead_letter(
        &self,
        group: &str,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError>;

    /// Up to `limit` dead letters, oldest first, of `group` or of every group.
    async fn dead_letters(
        &self,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError>;

    /// Removes the dead letter `id`; `false` when there is none.
    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError>;
}

/// One consumer's view of its group.
#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` deliveries: first pending ones idle for `min_idle` (reclaimed from any
    /// consumer of the group, including this one's own before a restart), then new ones in
    /// position order. Waits up to `block` when there is nothing; returns an empty vector then.
    async fn next_batch(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>, BusError>;

    /// Acknowledges deliveries by [`Delivery::id`]; they are never handed out again.
    async fn ack(&mut self, ids: &[String]) -> Result<(), BusError>;
}

/// Opens the bus named by `url`: `memory` (a new in-process bus), `redis://…` (Redis Streams,
/// [`crate::RedisBus::connect`]) or `nats://…` (NATS JetStream, [`crate::NatsBus::connect`]).
///
/// # Errors
/// [`BusError::InvalidUrl`] for any other scheme; [`BusError::Transport`] when the server is
/// unreachable; [`BusError::Config`] when a JetStream stream exists with an unusable
/// configuration.
pub async fn open_bus(url: &str) -> Result<Arc<dyn Bus>, BusError> {
    if url == "memory" {
        Ok(Arc::new(crate::MemoryBus::new()))
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        Ok(Arc::new(crate::RedisBus::connect(url).await?))
    } else if url.starts_with("nats://") {
        Ok(Arc::new(crate::NatsBus::connect(url).await?))
    } else {
        Err(BusError::InvalidUrl(url.into()))
    }
}
