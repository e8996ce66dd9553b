//! Rebuilding projections from the event store and reading its history (`tektree-replay rebuild`
//! and `tektree-replay events`).
//!
//! [`rebuild`] replays the event store, in position order and in pages of [`PAGE`] events
//! (constant memory), through a projection's change function into its read model, after
//! resetting it. Because the projection is a pure function of each event and the read-model
//! store applies changes under the same sequence guard as the live workers, the rebuilt read
//! model equals the one built live.
//!
//! [`events`] reads stored events for `tektree-replay events`, upcast to the current versions
//! of their types by default ([`EventForm::Upcast`]) or exactly as stored
//! ([`EventForm::Stored`], `--stored`).

use tektree_domain::EventEnvelope;
use tektree_event_store::{EventStore, StoreError};
use tektree_projections::{
    project, ApplyOutcome, Change, EventKey, Projection, ReadModelError, ReadModelStore,
};
use uuid::Uuid;

/// Events read and applied per transaction by [`rebuild_paged`]'s callers that do not ask the
/// store ([`ReadModelStore::rebuild_page`]'s default).
pub const PAGE: usize = 1000;

/// Errors of [`rebuild`].
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the read model failed.
    #[error(transparent)]
    ReadModels(#[from] ReadModelError),
    /// A stored event does not decode.
    #[error("event at position {position} does not decode: {reason}")]
    Decode {
        /// Where.
        position: u64,
        /// Why.
        reason: String,
    },
    /// The stored history breaks a guarantee of the event store, so a rebuild would silently
    /// differ from live: a hole in the global positions (an event is missing), or an event
    /// that the read model's sequence guard did not apply after the reset (its aggregate's
    /// previous event comes later in position order, or it was already applied).
    #[error("history broken at position {position}: {reason} (the read model is partially rebuilt; the store needs repair)")]
    History {
        /// Position of the offending event.
        position: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Resets `projection` and replays every stored event into it, in pages of the read-model
/// store's [`rebuild_page`](ReadModelStore::rebuild_page) events (one transaction each).
/// Calls `progress(position)` after each page. Returns the number of events replayed.
///
/// After the reset every event must be applied: positions must run `1, 2, 3, …` without a
/// hole, and every `apply` outcome must be [`ApplyOutcome::Applied`] (a `Gap` or `Duplicate`
/// means the stored history is out of per-aggregate order or holds an event twice). Either
/// stops the rebuild with [`ReplayError::History`] rather than dropping the event silently.
///
/// # Errors
/// [`ReplayError`]; the read model is then partially rebuilt — run the rebuild again (after
/// repairing the store for [`ReplayError::History`]).
pub async fn rebuild(
    store: &dyn EventStore,
    read_models: &dyn ReadModelStore,
    projection: Projection,
    progress: impl FnMut(u64),
) -> Result<u64, ReplayError> {
    let page = read_models.rebuild_page();
    rebuild_paged(store, read_models, projection, page, progress).await
}

/// [`rebuild`] in pages of `page` events (at least 1): one read-model transaction per page,
/// memory proportional to the page.
///
/// # Errors
/// As [`rebuild`].
pub async fn rebuild_paged(
    store: &dyn EventStore,
    read_models: &dyn ReadModelStore,
    projection: Projection,
    page: usize,
    mut progress: impl FnMut(u64),
) -> Result<u64, ReplayError> {
    let page_size = page.max(1);
    let name = projection.name();
    read_models.reset(projection).await?;
    let mut after = 0u64;
    let mut count = 0u64;
    loop {
        let page = store.read_all(after, page_size).await?;
        let Some(last) = page.last() else { break };
        let mut items: Vec<(EventKey, Vec<Change>)> = Vec::with_capacity(page.len());
        for (i, env) in page.iter().enumerate() {
            let want = after + 1 + i as u64;
            if env.position != want {
                return Err(ReplayError::History {
                    position: env.position,
                    reason: format!(
                        "position {want} is missing (the next stored event is at {})",
                        env.position
                    ),
                });
            }
            let event = env.decode().map_err(|e| ReplayError::Decode {
                position: env.position,
                reason: e.to_string(),
            })?;
            items.push((EventKey::of(env), project(projection, env, &event)));
        }
        after = last.position;
        let outcomes = read_models.apply(name, &items).await?;
        if let Some((env, outcome)) = page
            .iter()
            .zip(&outcomes)
            .find(|(_, o)| **o != ApplyOutcome::Applied)
        {
            return Err(ReplayError::History {
                position: env.position,
                reason: format!(
                    "{}/{} sequence {} was not applied after the reset ({outcome:?})",
                    env.aggregate_type, env.aggregate_id, env.sequence
                ),
            });
        }
        count += page.len() as u64;
        progress(after);
    }
    Ok(count)
}

/// Which events [`events`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSelection {
    /// One aggregate's whole history, in sequence order (`events --aggregate TYPE/ID`).
    Aggregate {
        /// `user`, `area`, `content`, `profile` or `subscription`.
        aggregate_type: String,
        /// The aggregate instance.
        aggregate_id: Uuid,
    },
    /// Up to `limit` events after global position `after`, in position order
    /// (`events [--after POSITION] [--limit N]`).
    After {
        /// Start after this position (0 = from the first event).
        after: u64,
        /// At most this many.
        limit: usize,
    },
}

/// The form in which [`events`] returns envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventForm {
    /// Upcast to the current version of each type ([`EventEnvelope::upcast`]), as the relay
    /// publishes them and consumers decode them (the default of `tektree-replay events`).
    #[default]
    Upcast,
    /// Exactly as stored: the stored `event_version` and payload (`events --stored`).
    Stored,
}

/// The events of `selection` in `form` (`tektree-replay events`).
///
/// With [`EventForm::Upcast`], an envelope this build cannot upcast (a type outside its
/// catalog or a version newer than it knows, written by a newer build) is returned as stored,
/// with a `tracing` warning: an operator inspecting history sees every event, and its
/// `event_version` tells it was not upcast. The relay publishes such events the same way.
///
/// # Errors
/// [`ReplayError::Store`] when reading fails.
pub async fn events(
    store: &dyn EventStore,
    selection: &EventSelection,
    form: EventForm,
) -> Result<Vec<EventEnvelope>, ReplayError> {
    let stored = match selection {
        EventSelection::Aggregate {
            aggregate_type,
            aggregate_id,
        } => store.load(aggregate_type, *aggregate_id).await?,
        EventSelection::After { after, limit } => store.read_all(*after, *limit).await?,
    };
    Ok(match form {
        EventForm::Stored => stored,
        EventForm::Upcast => stored.into_iter().map(upcast_or_stored).collect(),
    })
}

/// `env` upcast, or unchanged (with a warning) when this build cannot upcast it.
fn upcast_or_stored(env: EventEnvelope) -> EventEnvelope {
    match env.clone().upcast() {
        Ok(current) => current,
        Err(e) => {
            tracing::warn!(position = env.position, event_id = %env.event_id, error = %e,
                "this build cannot upcast the event: shown as stored");
            env
        }
    }
}
