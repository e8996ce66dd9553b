//! A broker that lost its data (issue #12 §3).
//!
//! The relay marks an outbox record published only after the bus accepted it, so the store
//! knows a **published floor**: every position up to it is on the bus (see
//! [`published_through`]). A bus whose last position is below that floor lost events: Redis
//! restarted without persistence or was flushed, a NATS stream was deleted, a broker restored
//! from an older snapshot. Its consumers would never see the lost events, and the relay would
//! never send them again (they are marked published) — silently.
//!
//! So the relay compares the two before every publish and once a second while idle
//! ([`check`]; `relay::run`), and when the bus is behind it **recovers** ([`recover`]):
//! 1. it checks the bus's store binding again ([`crate::binding::bind`]), since a wiped bus
//!    lost that too (a bus another store bound meanwhile is refused, and the relay stops);
//! 2. it republishes from the store's log, upcast like every publish, the events after
//!    `max(bus end, lowest consumer checkpoint)` up to the floor — what some consumer has not
//!    applied — and at least the event at the floor, so the bus ends where the store's outbox
//!    says it does;
//! 3. it logs an error naming the bus end, the floor and what it republished, and counts
//!    [`METRIC_BUS_LOSSES`] and [`METRIC_REPUBLISHED`].
//!
//! Consumers recreate their lost group (Redis) or durable consumer and stream (NATS) at the
//! start of the stream ([`METRIC_BUS_RECREATED`]) and drop what they had applied already
//! (sequence guard), so nothing is lost and nothing is applied twice. Consumer checkpoints
//! come from the read-model store through [`ConsumerCheckpoints`]; without it the relay
//! republishes everything after the bus's end.

use async_trait::async_trait;
use tektree_event_store::EventStore;

use crate::binding::{bind, BindError};
use crate::bus::{Bus, BusError};
use crate::relay::{for_publishing, RelayError};

/// Counter of detected broker losses (a bus found behind the store's published floor).
pub const METRIC_BUS_LOSSES: &str = "tektree_bus_losses_total";
/// Counter of events republished from the store after a broker loss.
pub const METRIC_REPUBLISHED: &str = "tektree_relay_republished_total";
/// Counter of consumer groups or streams found missing and recreated (label `what`: `group`
/// on Redis; `stream` or `consumer` on NATS).
pub const METRIC_BUS_RECREATED: &str = "tektree_bus_recreated_total";

/// Where the consumers stand, for [`recover`].
#[async_trait]
pub trait ConsumerCheckpoints: Send + Sync {
    /// The lowest checkpoint of every consumer of the bus: every consumer has applied every
    /// event at or below it (0 when some consumer has applied nothing yet).
    ///
    /// # Errors
    /// A description of the failure (the read-model store could not be read).
    async fn lowest_checkpoint(&self) -> Result<u64, String>;
}

/// What [`recover`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusLoss {
    /// The bus's last position when the loss was found.
    pub bus_last: u64,
    /// The store's published floor ([`published_through`]).
    pub published_through: u64,
    /// Events after this position were republished.
    pub republished_after: u64,
    /// How many events were republished.
    pub republished: u64,
}

/// The store's published floor: the highest position `p` such that every event at or below
/// `p` is marked published (so is on the bus, unless the bus lost it).
///
/// The head is read before the outbox, so an event appended in between cannot be counted as
/// published.
///
/// # Errors
/// [`RelayError::Store`].
pub async fn published_through(store: &dyn EventStore) -> Result<u64, RelayError> {
    let head = store.last_position().await?;
    Ok(match store.outbox_pending(1).await?.first() {
        Some(first) => first.position.saturating_sub(1).min(head),
        None => head,
    })
}

/// `Ok(())` when the bus holds everything the store marked published, else
/// [`RelayError::BusBehind`].
///
/// # Errors
/// [`RelayError::BusBehind`]; [`RelayError::Store`] / [`RelayError::Bus`] when either cannot
/// be read.
pub async fn check(store: &dyn EventStore, bus: &dyn Bus) -> Result<(), RelayError> {
    let through = published_through(store).await?;
    behind(bus, through).await
}

/// [`RelayError::BusBehind`] when the bus ends below `through`.
async fn behind(bus: &dyn Bus, through: u64) -> Result<(), RelayError> {
    let bus_last = bus.last_published().await?;
    if bus_last < through {
        return Err(RelayError::BusBehind {
            bus_last,
            published_through: through,
        });
    }
    Ok(())
}

/// `e` as a relay error: [`BusError::Behind`] (the bus ends below `through`, which the store
/// marked published) becomes [`RelayError::BusBehind`].
pub(crate) fn behind_error(e: BusError, through: u64) -> RelayError {
    match e {
        BusError::Behind { last, .. } => RelayError::BusBehind {
            bus_last: last,
            published_through: through,
        },
        other => RelayError::Bus(other),
    }
}

/// Recovers a bus that ends at `bus_last`, below the store's published floor `through` (see
/// the [module docs](self)); `batch` events are read and published at a time.
///
/// # Errors
/// [`RelayError::Refused`] when the bus is now bound to another store (not retryable);
/// [`RelayError::Store`], [`RelayError::Bus`] or [`RelayError::Consumers`] otherwise (retry:
/// every step is idempotent).
pub async fn recover(
    store: &dyn EventStore,
    bus: &dyn Bus,
    checkpoints: Option<&dyn ConsumerCheckpoints>,
    (bus_last, through): (u64, u64),
    batch: usize,
) -> Result<BusLoss, RelayError> {
    match bind(store, bus).await {
        Ok(_) => {}
        Err(BindError::Bus(e)) => return Err(RelayError::Bus(e)),
        Err(BindError::Store(e)) => return Err(RelayError::Store(e)),
        Err(refused) => return Err(RelayError::Refused(refused.to_string())),
    }
    let lowest = match checkpoints {
        Some(c) => c.lowest_checkpoint().await.map_err(RelayError::Consumers)?,
        None => 0,
    };
    // At least the event at the floor goes out again, so that the bus ends at the floor.
    let after = bus_last.max(lowest).min(through.saturating_sub(1));
    tracing::error!(
        bus_last,
        published_through = through,
        lowest_checkpoint = lowest,
        republish_after = after,
        "the bus lost events: it ends below what the store marked published (broker restarted \
         without persistence, flushed, or its stream deleted); republishing from the store what \
         the consumers have not applied"
    );
    metrics::counter!(METRIC_BUS_LOSSES).increment(1);
    let republished = republish(store, bus, (after, bus_last), through, batch).await?;
    metrics::counter!(METRIC_REPUBLISHED).increment(republished);
    tracing::warn!(republished, after, through, "republished the lost events");
    Ok(BusLoss {
        bus_last,
        published_through: through,
        republished_after: after,
        republished,
    })
}

/// Publishes the stored events with positions in `(after, through]` in position order, upcast
/// like the relay publishes ([`for_publishing`]), `batch` at a time; returns how many were
/// read and published (the bus drops those it already holds). The bus must hold `floor` for
/// the first page (pass the bus's end as found) and each page's last position for the next
/// ([`Bus::publish_after`]), so losing data again meanwhile is found, not papered over.
///
/// # Errors
/// [`RelayError::BusBehind`] when the bus lost events again; [`RelayError::Store`] /
/// [`RelayError::Bus`]; what was published stays published.
pub async fn republish(
    store: &dyn EventStore,
    bus: &dyn Bus,
    (mut after, mut floor): (u64, u64),
    through: u64,
    batch: usize,
) -> Result<u64, RelayError> {
    let mut count = 0;
    while after < through {
        let limit = batch.max(1).min((through - after) as usize);
        let page = store.read_all(after, limit).await?;
        let page: Vec<_> = page
            .into_iter()
            .filter(|e| e.position <= through)
            .map(for_publishing)
            .collect();
        let Some(last) = page.last() else { break };
        let last = last.position;
        bus.publish_after(floor, &page)
            .await
            .map_err(|e| behind_error(e, through))?;
        (after, floor) = (last, last);
        count += page.len() as u64;
    }
    Ok(count)
}
