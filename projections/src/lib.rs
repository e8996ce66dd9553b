//! # tektree-projections
//!
//! Read models of issue #2 §5, built by **projections**: plain functions from one committed
//! event to a list of [`Change`]s ([`project`]), applied by a [`ReadModelStore`] atomically
//! together with the consumer's checkpoint.
//!
//! ## Exactly-once effect
//! Every consumer (projection or policy) has a **sequence guard** per aggregate: the last
//! `sequence` it applied. [`ReadModelStore::apply`] compares an event's sequence with the guard
//! inside the same transaction as the read-model update:
//! - `sequence ≤ last` → [`ApplyOutcome::Duplicate`] (redelivery; nothing changes);
//! - `sequence = last + 1` → the changes and the new guard commit together → [`ApplyOutcome::Applied`];
//! - `sequence > last + 1` → [`ApplyOutcome::Gap`] (an earlier event of the aggregate has not
//!   been applied yet; the consumer retries later, so per-aggregate order holds even with
//!   several workers).
//!
//! All changes are commutative across aggregates (sums, counters, max), so read models do not
//! depend on how different aggregates' events interleave: the live run and a replay in position
//! order give equal read models.
//!
//! ## Checkpoint
//! Each consumer's **checkpoint** is the highest position `p` such that every event with
//! position `≤ p` has been applied (a low-water mark, exact even when workers apply out of
//! order); `lag = head position − checkpoint`.

mod changes;
mod model;
#[cfg(feature = "mongodb")]
pub mod mongo;
mod sqlite;

use async_trait::async_trait;
use uuid::Uuid;

pub use changes::{project, Change, ContentDelta, ProjectionName, PROJECTIONS};
pub use model::{Checkpoint, ContentRow, LeaderboardRow, QuotaRow, ReadModel, XpRow};
#[cfg(feature = "mongodb")]
pub use mongo::MongoReadModels;
pub use sqlite::SqliteReadModels;

/// Errors of a [`ReadModelStore`].
#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    /// The storage backend failed; retryable.
    #[error("read-model backend: {0}")]
    Backend(String),
    /// Unknown projection / consumer / read-model name or invalid query argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Identity of one committed event, for the sequence guard and the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventKey {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: Uuid,
    /// Per-aggregate sequence.
    pub sequence: u64,
    /// Global position.
    pub position: u64,
}

impl EventKey {
    /// The key of an envelope.
    pub fn of(e: &tektree_domain::EventEnvelope) -> Self {
        EventKey {
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id,
            sequence: e.sequence,
            position: e.position,
        }
    }
}

/// Result of applying one event for one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Changes and guard committed.
    Applied,
    /// Already applied earlier; nothing changed.
    Duplicate,
    /// The aggregate's previous event is not applied yet; nothing changed. `expected` is the
    /// sequence the guard waits for.
    Gap {
        /// Next sequence the guard accepts.
        expected: u64,
    },
}

/// Storage of read models and consumer checkpoints.
#[async_trait]
pub trait ReadModelStore: Send + Sync + 'static {
    /// Applies `items` for consumer `consumer` in order, each under the sequence guard, in one
    /// transaction (all outcomes commit together or, on error, none). Items with no changes
    /// still advance the guard and checkpoint (used by policies and for events a projection
    /// ignores).
    ///
    /// # Errors
    /// [`ReadModelError::Backend`]; nothing was applied.
    async fn apply(
        &self,
        consumer: &str,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError>;

    /// Deletes the rows of read model `projection` (one of [`PROJECTIONS`]) together with its
    /// guard and checkpoint, so that it can be rebuilt from position 1.
    async fn reset(&self, projection: &str) -> Result<(), ReadModelError>;

    /// Every consumer's checkpoint, sorted by name.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ReadModelError>;

    /// XP row of one user.
    async fn user_xp(&self, user_id: Uuid) -> Result<Option<XpRow>, ReadModelError>;

    /// A page of `board`, ordered XP descending then user id ascending; ranks from 1.
    async fn leaderboard(
        &self,
        board: &str,
        limit: u32,
        offset: u64,
    ) -> Result<Vec<LeaderboardRow>, ReadModelError>;

    /// The rank of one user on `board` (`None` if the user has no entry on it).
    async fn rank(
        &self,
        board: &str,
        user_id: Uuid,
    ) -> Result<Option<LeaderboardRow>, ReadModelError>;

    /// Quota row of one user for `period` (`YYYY-MM`).
    async fn quota(&self, user_id: Uuid, period: &str) -> Result<Option<QuotaRow>, ReadModelError>;

    /// The user's current subscription tier (`rm_tier`, written by the `quota` projection
    /// from `payment.subscription.created` / `.upgraded` / `.downgraded` / `.cancelled`);
    /// `None` before the subscription is opened.
    async fn tier(&self, user_id: Uuid) -> Result<Option<tektree_domain::Tier>, ReadModelError>;

    /// Content row of one question or answer.
    async fn content(&self, content_id: Uuid) -> Result<Option<ContentRow>, ReadModelError>;

    /// Up to `limit` rows of `model` after `offset` in a stable key order, as JSON objects with
    /// the HTTP field names (for `tektree export`).
    async fn export(
        &self,
        model: ReadModel,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<serde_json::Value>, ReadModelError>;
}

/// Converts a `u64` argument to the backends' signed 64-bit integers.
pub(crate) fn int(v: u64, what: &str) -> Result<i64, ReadModelError> {
    i64::try_from(v).map_err(|_| ReadModelError::Invalid(format!("{what} {v} is out of range")))
}

/// The consumer-name check every adapter makes before [`ReadModelStore::apply`] writes.
pub(crate) fn check_consumer(consumer: &str) -> Result<(), ReadModelError> {
    if consumer.is_empty() {
        return Err(ReadModelError::Invalid("empty consumer name".into()));
    }
    Ok(())
}

/// The key check every adapter makes before writing: sequence and position start at 1 and fit
/// a signed 64-bit integer. Returns them converted.
pub(crate) fn check_key(k: &EventKey) -> Result<(i64, i64), ReadModelError> {
    if k.sequence == 0 || k.position == 0 {
        return Err(ReadModelError::Invalid(format!(
            "event {}/{} has sequence {} and position {}; both start at 1",
            k.aggregate_type, k.aggregate_id, k.sequence, k.position
        )));
    }
    Ok((int(k.sequence, "sequence")?, int(k.position, "position")?))
}
