//! A bus bound to one store (issue #12).
//!
//! Positions are the store's: position `p` on a bus means "the event at `p` in *this* store".
//! A second store on the same bus (two deployments pointed at one Redis by mistake, a SQLite
//! file deleted and re-created) has its own positions `1..n`, which the bus already holds for
//! the first store, so the relay would count them as published and nothing would reach the
//! consumers — silently. So every bus records the [`StoreIdentity`] it carries
//! ([`Bus::bind_store`]: Redis key `<stream>:store`, NATS bucket `<stream>_STORE`), and every
//! process checks it when it opens the store and the bus ([`bind`]) and refuses a bus bound to
//! another store, naming both, before it publishes or consumes anything.
//!
//! A bus with no binding is bound by the first process that opens it: when it is empty, at
//! once; when it already holds events (published by a build before store identities), only if
//! its last event is this store's event at that position (same event id), else it is refused.

use tektree_event_store::{EventStore, StoreError, StoreIdentity};

use crate::bus::{Bus, BusError};

/// Counter of refused bindings (label `reason`: `foreign_store`, `restored_store`,
/// `unbound_events`). Each refusal is also logged at error level.
pub const METRIC_BINDING_REFUSED: &str = "tektree_bus_binding_refusals_total";

/// Why a bus and a store may not be used together.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The bus carries another store's events.
    #[error(
        "the bus is bound to {bound}, but this is {ours}: two stores must not share a bus (their \
         positions collide, so events would be taken for published and never reach the \
         consumers). Nothing was published or consumed. Point this deployment at the store that \
         bus belongs to, or give it a bus of its own (another Redis server or database number, \
         another NATS server or account); see docs/operations.md"
    )]
    ForeignStore {
        /// The identity the bus is bound to.
        bound: StoreIdentity,
        /// This store's identity.
        ours: StoreIdentity,
    },
    /// The bus carries this store's events from another epoch: the store was restored from a
    /// backup (or the bus outlived a restore), so the bus may hold events the store no longer
    /// has.
    #[error(
        "the bus is bound to {bound}, but this store is at epoch {}: it was restored from a \
         backup, and the bus (and read models fed from it) may hold events the restored store \
         no longer has. Nothing was published or consumed; see docs/operations.md",
        ours.epoch
    )]
    RestoredStore {
        /// The identity the bus is bound to.
        bound: StoreIdentity,
        /// This store's identity.
        ours: StoreIdentity,
    },
    /// The bus holds events but no binding, and its last event is not this store's.
    #[error(
        "the bus holds events up to position {last_published} but is bound to no store, and \
         {detail}: they are not this store's ({ours}). Nothing was published or consumed; see \
         docs/operations.md"
    )]
    UnboundEvents {
        /// The bus's highest position.
        last_published: u64,
        /// What differs.
        detail: String,
        /// This store's identity.
        ours: StoreIdentity,
    },
    /// The bus could not be read or written.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BindError {
    /// The `reason` label of [`METRIC_BINDING_REFUSED`], `None` for transport errors.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            BindError::ForeignStore { .. } => Some("foreign_store"),
            BindError::RestoredStore { .. } => Some("restored_store"),
            BindError::UnboundEvents { .. } => Some("unbound_events"),
            BindError::Bus(_) | BindError::Store(_) => None,
        }
    }
}

/// Checks that `bus` carries `store`'s events, binding an unbound bus to it (see the module
/// docs); returns the store's identity.
///
/// # Errors
/// [`BindError::ForeignStore`], [`BindError::RestoredStore`] or [`BindError::UnboundEvents`]
/// (each counted in [`METRIC_BINDING_REFUSED`] and logged); [`BindError::Bus`] /
/// [`BindError::Store`] when either cannot be read.
pub async fn bind(store: &dyn EventStore, bus: &dyn Bus) -> Result<StoreIdentity, BindError> {
    let outcome = check(store, bus).await;
    if let Err(e) = &outcome {
        if let Some(reason) = e.reason() {
            metrics::counter!(METRIC_BINDING_REFUSED, "reason" => reason).increment(1);
            tracing::error!(reason, error = %e, "bus refused");
        }
    }
    outcome
}

async fn check(store: &dyn EventStore, bus: &dyn Bus) -> Result<StoreIdentity, BindError> {
    let ours = store.identity().await?;
    let bound = match bus.bound_store().await? {
        Some(bound) => bound,
        None => {
            let last = bus.last_published().await?;
            if last > 0 {
                check_unbound_events(store, bus, last, ours).await?;
                tracing::info!(%ours, last, "binding a bus that holds this store's events");
            }
            bus.bind_store(&ours).await?
        }
    };
    if bound.store_id != ours.store_id {
        return Err(BindError::ForeignStore { bound, ours });
    }
    if bound.epoch != ours.epoch {
        return Err(BindError::RestoredStore { bound, ours });
    }
    Ok(ours)
}

/// An unbound bus holding events up to `last`: its last event must be the store's event at
/// that position.
async fn check_unbound_events(
    store: &dyn EventStore,
    bus: &dyn Bus,
    last: u64,
    ours: StoreIdentity,
) -> Result<(), BindError> {
    let refuse = |detail: String| BindError::UnboundEvents {
        last_published: last,
        detail,
        ours,
    };
    let Some(theirs) = bus.last_event().await? else {
        return Err(refuse("its last event cannot be read".into()));
    };
    let mine = store.read_all(last - 1, 1).await?;
    match mine.first() {
        Some(e) if e.position == last && e.event_id == theirs.event_id => Ok(()),
        Some(e) if e.position == last => Err(refuse(format!(
            "its event at position {last} is {}, the store's is {}",
            theirs.event_id, e.event_id
        ))),
        _ => Err(refuse(format!(
            "the store holds no event at position {last} (its event there is {})",
            theirs.event_id
        ))),
    }
}
