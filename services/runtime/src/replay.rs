//! Rebuilding projections from the event store and reading its history (`tektree-replay rebuild`
//! and `tektree-replay events`).
//!
//! [`rebuild_beside`] (the default of `tektree-replay rebuild`) replays the event store into a
//! new version of a projection's read model **beside the live one**, while the API, the relay
//! and the workers keep running, and switches queries and the live workers to it atomically
//! once it has caught up (blue/green; [`ReadModelStore::rebuild_switch`]). It can be stopped
//! at any point and resumed from its checkpoint, or cancelled.
//!
//! [`rebuild`] is the stopped-world rebuild (`rebuild --in-place`): it resets the live read
//! model and replays the store into it; the projection's workers should be stopped meanwhile.
//!
//! Both replay in position order and in pages (constant memory) through the projection's
//! change function. Because the projection is a pure function of each event and the
//! read-model store applies changes under the same sequence guard as the live workers, the
//! rebuilt read model equals the one built live.
//!
//! [`events`] reads stored events for `tektree-replay events`, upcast to the current versions
//! of their types by default ([`EventForm::Upcast`]) or exactly as stored
//! ([`EventForm::Stored`], `--stored`).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use tektree_domain::{EventEnvelope, StoredEvent};
use tektree_event_store::{EventStore, StoreError};
use tektree_projections::{
    project_event, ApplyOutcome, Change, EventKey, Projection, ReadModelError, ReadModelStore,
    RebuildSwitch,
};
use uuid::Uuid;

/// How long [`rebuild_beside`] keeps trying to switch when it has read every stored event and
/// the live consumer is still ahead of it, before it reports the store as behind its read
/// models (a restored store; see [`ReplayError::History`]).
pub const SWITCH_PATIENCE: Duration = Duration::from_secs(10);

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
        let page = store.read_all_stored(after, page_size).await?;
        let Some(items) = changes_of(projection, after, &page)? else {
            break;
        };
        let outcomes = read_models.apply(name, &items).await?;
        check_applied(&items, &outcomes)?;
        after += page.len() as u64;
        count += page.len() as u64;
        progress(after);
    }
    Ok(count)
}

/// One replayed event: its key and the projection's changes.
type Item = (EventKey, Vec<Change>);

/// The changes of `projection` for `page`, the events after position `after`; `None` for an
/// empty page.
///
/// # Errors
/// [`ReplayError::History`] when the page does not continue at `after + 1` without a hole;
/// [`ReplayError::Decode`].
fn changes_of(
    projection: Projection,
    after: u64,
    page: &[StoredEvent],
) -> Result<Option<Vec<Item>>, ReplayError> {
    if page.is_empty() {
        return Ok(None);
    }
    let mut items: Vec<Item> = Vec::with_capacity(page.len());
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
        let key = EventKey {
            aggregate_type: env.aggregate_type.clone(),
            aggregate_id: env.aggregate_id,
            sequence: env.sequence,
            position: env.position,
        };
        items.push((key, project_event(projection, &event)));
    }
    Ok(Some(items))
}

/// Every outcome of a replayed page must be [`ApplyOutcome::Applied`].
fn check_applied(page: &[Item], outcomes: &[ApplyOutcome]) -> Result<(), ReplayError> {
    match page
        .iter()
        .zip(outcomes)
        .find(|(_, o)| **o != ApplyOutcome::Applied)
    {
        Some(((key, _), outcome)) => Err(ReplayError::History {
            position: key.position,
            reason: format!(
                "{}/{} sequence {} was not applied after the reset ({outcome:?})",
                key.aggregate_type, key.aggregate_id, key.sequence
            ),
        }),
        None => Ok(()),
    }
}

/// What [`rebuild_beside`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BesideReport {
    /// The rebuilt version's generation ([`tektree_projections::RebuildStatus::generation`]).
    pub generation: u64,
    /// The position the rebuild resumed from (0 for a new one).
    pub resumed_from: u64,
    /// Events applied by this call.
    pub events: u64,
    /// Whether queries and live workers now use the rebuilt version; `false` when `progress`
    /// stopped the rebuild (it stays in progress, to resume or cancel).
    pub switched: bool,
}

/// Rebuilds `projection` beside its live read model and switches to it
/// ([`ReadModelStore::rebuild_begin`], then pages of the store's
/// [`rebuild_page`](ReadModelStore::rebuild_page) events through
/// [`rebuild_apply`](ReadModelStore::rebuild_apply); at the store's head,
/// [`rebuild_switch`](ReadModelStore::rebuild_switch), reading on while the live consumer is
/// ahead). A rebuild left in progress by an earlier call (stopped, killed) is resumed from its
/// checkpoint. After each page `progress(position)` may return [`ControlFlow::Break`] to stop
/// without switching (the rebuild stays in progress).
///
/// The API, relay and workers keep running meanwhile; policies and the live feed are not run
/// by a rebuild (it only writes the new version of the read model), so nothing downstream
/// fires twice.
///
/// # Errors
/// As [`rebuild`] ([`ReplayError::History`] for a broken history: the rebuild stays in
/// progress and unswitched, queries keep the live version); also [`ReplayError::History`]
/// when the live consumer has applied positions the store does not hold for longer than
/// [`SWITCH_PATIENCE`] (the store was restored from an older copy than the read models).
pub async fn rebuild_beside(
    store: &dyn EventStore,
    read_models: &dyn ReadModelStore,
    projection: Projection,
    progress: impl FnMut(u64) -> ControlFlow<()>,
) -> Result<BesideReport, ReplayError> {
    let page = read_models.rebuild_page();
    rebuild_beside_paged(store, read_models, projection, page, progress).await
}

/// [`rebuild_beside`] in pages of `page` events (at least 1): one read-model transaction per
/// page, memory proportional to the page.
///
/// # Errors
/// As [`rebuild_beside`].
pub async fn rebuild_beside_paged(
    store: &dyn EventStore,
    read_models: &dyn ReadModelStore,
    projection: Projection,
    page: usize,
    mut progress: impl FnMut(u64) -> ControlFlow<()>,
) -> Result<BesideReport, ReplayError> {
    let begun = read_models.rebuild_begin(projection).await?;
    let page_size = page.max(1);
    let mut report = BesideReport {
        generation: begun.generation,
        resumed_from: begun.checkpoint,
        events: 0,
        switched: false,
    };
    let mut after = begun.checkpoint;
    let mut behind_since: Option<Instant> = None;
    let mut next = Some(fetch(store, projection, after, page_size).await?);
    loop {
        let page = match next.take() {
            Some(page) => page,
            None => fetch(store, projection, after, page_size).await?,
        };
        // A short page reached the head as it was when read: try to switch after it (under a
        // steady stream of commands a page is seldom empty).
        let at_head = page.len() < page_size;
        if !page.is_empty() {
            // Apply this page while the next one is read and decoded (two cores: the store
            // and the read-model store work on blocking threads, decoding on this task).
            let apply = read_models.rebuild_apply(projection, &page);
            let outcomes = if at_head {
                apply.await?
            } else {
                let following = fetch(store, projection, after + page.len() as u64, page_size);
                let (outcomes, following) = tokio::join!(apply, following);
                next = Some(following?);
                outcomes?
            };
            check_applied(&page, &outcomes)?;
            after += page.len() as u64;
            report.events += page.len() as u64;
            if progress(after).is_break() {
                return Ok(report);
            }
        }
        if !at_head {
            continue;
        }
        match read_models.rebuild_switch(projection).await? {
            RebuildSwitch::Switched => {
                report.switched = true;
                return Ok(report);
            }
            RebuildSwitch::Behind { live, rebuild } if page.is_empty() => {
                // Everything stored is applied and the live consumer is still ahead.
                let since = *behind_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SWITCH_PATIENCE {
                    return Err(ReplayError::History {
                        position: live,
                        reason: format!(
                            "the live {projection} read model applied position {live}, the \
                             store holds events up to {rebuild} only (restored from an older \
                             copy?); not switching"
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            RebuildSwitch::Behind { .. } => behind_since = None,
        }
    }
}

/// Up to `limit` stored events after position `after` with their changes for `projection`
/// (empty at the head).
///
/// # Errors
/// As [`changes_of`], and [`ReplayError::Store`].
async fn fetch(
    store: &dyn EventStore,
    projection: Projection,
    after: u64,
    limit: usize,
) -> Result<Vec<Item>, ReplayError> {
    let page = store.read_all_stored(after, limit).await?;
    Ok(changes_of(projection, after, &page)?.unwrap_or_default())
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
