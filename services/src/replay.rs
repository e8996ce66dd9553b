//! Rebuilding projections from the event store (used by `tektree-replay rebuild`).
//!
//! [`rebuild`] replays the event store, in position order and in pages of [`PAGE`] events
//! (constant memory), through a projection's change function into its read model, after
//! resetting it. Because the projection is a pure function of each event and the read-model
//! store applies changes under the same sequence guard as the live workers, the rebuilt read
//! model equals the one built live.

use tektree_event_store::{EventStore, StoreError};
use tektree_projections::{project, Change, EventKey, ReadModelError, ReadModelStore, PROJECTIONS};

/// Events read and applied per transaction during a rebuild.
pub const PAGE: usize = 1000;

/// Errors of [`rebuild`].
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Not one of `xp`, `leaderboard`, `quota`, `content`.
    #[error("unknown projection {0:?}: expected one of xp, leaderboard, quota, content")]
    UnknownProjection(String),
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
}

/// Resets `projection` and replays every stored event into it. Calls `progress(position)` after
/// each page. Returns the number of events replayed.
///
/// # Errors
/// [`ReplayError`]; the read model is then partially rebuilt — run the rebuild again.
pub async fn rebuild(
    store: &dyn EventStore,
    read_models: &dyn ReadModelStore,
    projection: &str,
    mut progress: impl FnMut(u64),
) -> Result<u64, ReplayError> {
    let name = PROJECTIONS
        .iter()
        .find(|p| **p == projection)
        .ok_or_else(|| ReplayError::UnknownProjection(projection.into()))?;
    read_models.reset(name).await?;
    let mut after = 0u64;
    let mut count = 0u64;
    loop {
        let page = store.read_all(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        let mut items: Vec<(EventKey, Vec<Change>)> = Vec::with_capacity(page.len());
        for env in &page {
            let event = env.decode().map_err(|e| ReplayError::Decode {
                position: env.position,
                reason: e.to_string(),
            })?;
            items.push((EventKey::of(env), project(name, env, &event)));
        }
        read_models.apply(name, &items).await?;
        count += page.len() as u64;
        progress(after);
    }
    Ok(count)
}
