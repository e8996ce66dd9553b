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
//!
//! A restore ([`EventLog::raise_epoch`], `tektree restore`) raises the store's epoch. A bus
//! bound to an **earlier epoch** of the same store holds events the restored store may not
//! have, at positions it will give to other events: the first process that opens the pair
//! empties the bus and binds it to the new epoch ([`Bus::empty_and_rebind`], logged and counted
//! in [`METRIC_BUS_EMPTIED`]); the relay then republishes from the store what the consumers
//! have not applied ([`crate::recovery`]). A bus bound to a **later epoch** is refused: this
//! store is an older copy. At the **same epoch**, the bus's last event must be this store's
//! event at that position, else the store was copied back from an older point without a
//! restore and is refused ([`BindError::Diverged`]).

use tektree_event_store::{EventStore, StoreError, StoreIdentity};

use crate::bus::{Bus, BusError};

/// Counter of refused bindings (label `reason`: `foreign_store`, `restored_store`,
/// `unbound_events`, `diverged`). Each refusal is also logged at error level.
pub const METRIC_BINDING_REFUSED: &str = "tektree_bus_binding_refusals_total";
/// Counter of buses emptied and bound to a restored store's new epoch.
pub const METRIC_BUS_EMPTIED: &str = "tektree_bus_emptied_for_restore_total";

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
    /// The bus carries this store's events from a later epoch: this store is an older copy
    /// (taken before a restore).
    #[error(
        "the bus is bound to {bound}, but this store is at epoch {}: it is an older copy of the \
         store, from before a restore, and the bus (and the read models fed from it) hold events \
         it does not have. Nothing was published or consumed. Use the current store; to go back \
         to this copy on purpose, run `tektree --store <this store> --bus <this bus> restore` \
         on it first (it raises the epoch above the bus's; the bus is then emptied and refilled \
         from it); see docs/operations.md",
        ours.epoch
    )]
    RestoredStore {
        /// The identity the bus is bound to.
        bound: StoreIdentity,
        /// This store's identity.
        ours: StoreIdentity,
    },
    /// The bus is bound to this store at this epoch, but holds events the store does not have:
    /// the store was copied back from an older point without `tektree restore`.
    #[error(
        "the bus is bound to {ours} and holds its events up to position {last_published}, but \
         {detail}: the store was copied back from an older point (a backup, a snapshot) without \
         `tektree restore`, so its new events would take positions the bus already holds for \
         other events. Nothing was published or consumed. Run `tektree --store <this store> \
         --bus <this bus> restore` (it raises the epoch; the next start empties the bus and \
         refills it from the store); see docs/operations.md"
    )]
    Diverged {
        /// The bus's highest position.
        last_published: u64,
        /// What differs.
        detail: String,
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
            BindError::Diverged { .. } => Some("diverged"),
            BindError::Bus(_) | BindError::Store(_) => None,
        }
    }
}

/// Checks that `bus` carries `store`'s events, binding an unbound bus to it (see the module
/// docs); returns the store's identity.
///
/// # Errors
/// [`BindError::ForeignStore`], [`BindError::RestoredStore`], [`BindError::UnboundEvents`] or
/// [`BindError::Diverged`] (each counted in [`METRIC_BINDING_REFUSED`] and logged); [`BindError::Bus`] /
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
    // A binding replaced meanwhile by another process (emptying the bus for this epoch) is
    // read again once.
    for _ in 0..2 {
        let bound = match bus.bound_store().await? {
            Some(bound) => bound,
            None => {
                let last = bus.last_published().await?;
                if last > 0 {
                    if let Err(detail) = same_last_event(store, bus).await? {
                        return Err(BindError::UnboundEvents {
                            last_published: last,
                            detail,
                            ours,
                        });
                    }
                    tracing::info!(%ours, last, "binding a bus that holds this store's events");
                }
                bus.bind_store(&ours).await?
            }
        };
        if bound.store_id != ours.store_id {
            return Err(BindError::ForeignStore { bound, ours });
        }
        if bound.epoch > ours.epoch {
            return Err(BindError::RestoredStore { bound, ours });
        }
        if bound.epoch < ours.epoch {
            if !bus.empty_and_rebind(&bound, &ours).await? {
                continue;
            }
            metrics::counter!(METRIC_BUS_EMPTIED).increment(1);
            tracing::warn!(%bound, %ours,
                "the store was restored: the bus held events of its earlier epoch, at positions \
                 the restored store gives to other events; emptied it and bound it to the new \
                 epoch (the relay republishes what the consumers have not applied)");
            return Ok(ours);
        }
        let last = bus.last_published().await?;
        if last > 0 {
            if let Err(detail) = same_last_event(store, bus).await? {
                return Err(BindError::Diverged {
                    last_published: last,
                    detail,
                    ours,
                });
            }
        }
        return Ok(ours);
    }
    Err(BindError::Bus(BusError::Transport(
        "the bus's store binding kept changing while it was checked".into(),
    )))
}

/// `Ok(Err(detail))` unless the bus's last event is the store's event at its position. The
/// position is the one the event carries, so a relay publishing meanwhile cannot make a fresh
/// read of the bus's end disagree with an older one.
async fn same_last_event(
    store: &dyn EventStore,
    bus: &dyn Bus,
) -> Result<Result<(), String>, BindError> {
    let Some(theirs) = bus.last_event().await? else {
        return Ok(Err("its last event cannot be read".into()));
    };
    let at = theirs.position;
    let mine = store.read_all(at.saturating_sub(1), 1).await?;
    Ok(match mine.first() {
        Some(e) if e.position == at && e.event_id == theirs.event_id => Ok(()),
        Some(e) if e.position == at => Err(format!(
            "its event at position {at} is {}, the store's is {}",
            theirs.event_id, e.event_id
        )),
        _ => Err(format!(
            "the store holds no event at position {at} (the bus's event there is {})",
            theirs.event_id
        )),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;
    use tektree_domain::EventEnvelope;
    use tektree_event_store::conformance::{sample_events, SAMPLE_AGGREGATE_TYPE};
    use tektree_event_store::EventLog;
    use tektree_event_store::SqliteStore;
    use uuid::Uuid;

    use super::*;
    use crate::faulty::{BusFault, FaultyBus};
    use crate::MemoryBus;

    /// `last_published` lags one event behind `last_event`, as when a relay publishes between
    /// the two reads.
    struct RelayPublishesMeanwhile;

    #[async_trait]
    impl BusFault for RelayPublishesMeanwhile {
        async fn last_published(&self, inner: &dyn Bus) -> Result<u64, BusError> {
            Ok(inner.last_published().await?.saturating_sub(1))
        }
    }

    #[tokio::test]
    async fn a_relay_publishing_while_a_process_starts_is_no_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db")).unwrap();
        let id = Uuid::new_v4();
        store
            .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 3))
            .await
            .unwrap();
        let bus = FaultyBus::new(
            std::sync::Arc::new(MemoryBus::new()),
            RelayPublishesMeanwhile,
        );
        assert_eq!(bind(&store, &bus).await.unwrap().epoch, 1);
        bus.publish(&store.read_all(0, 10).await.unwrap())
            .await
            .unwrap();
        let bound = tokio::time::timeout(Duration::from_secs(10), bind(&store, &bus)).await;
        assert!(matches!(bound, Ok(Ok(_))), "{bound:?}");
        // A store that does not hold the bus's last event is refused.
        let other = SqliteStore::open(dir.path().join("s.db")).unwrap();
        let restored_by_hand = MemoryBus::new();
        bind(&other, &restored_by_hand).await.unwrap();
        let mut theirs = other.read_all(0, 10).await.unwrap();
        theirs.push(EventEnvelope {
            position: 4,
            event_id: Uuid::new_v4(),
            ..theirs[2].clone()
        });
        restored_by_hand.publish(&theirs).await.unwrap();
        let refused = bind(&other, &restored_by_hand).await;
        assert!(
            matches!(
                refused,
                Err(BindError::Diverged {
                    last_published: 4,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
}
