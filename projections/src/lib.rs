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

#![deny(missing_docs)]

mod changes;
mod model;
#[cfg(feature = "mongodb")]
pub mod mongo;
mod rank_tree;
mod sqlite;

use async_trait::async_trait;
use uuid::Uuid;

pub use changes::{project, project_event, Change, ContentDelta, Projection, UnknownProjection};
pub use model::{Checkpoint, ContentRow, LeaderboardRow, QuotaRow, ReadModel, TagRow, XpRow};
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

    /// Events per transaction that suit this backend when a rebuild replays the store into
    /// it (one [`apply`](Self::apply) per page): large pages sum more changes per row and
    /// touch each aggregate's guard once per page, bounded by the backend's transaction
    /// limits. Default 1,000.
    fn rebuild_page(&self) -> usize {
        1000
    }

    /// Deletes the rows of read model `projection` together with its guard and checkpoint, so
    /// that it can be rebuilt from position 1 (the stopped-world rebuild,
    /// `tektree-replay rebuild --in-place`).
    async fn reset(&self, projection: Projection) -> Result<(), ReadModelError>;

    /// Starts a **rebuild beside the live read model** of `projection` (blue/green): a new,
    /// empty version of its rows with its own sequence guard and checkpoint, which queries do
    /// not read and live workers do not write until [`rebuild_switch`](Self::rebuild_switch).
    /// When a rebuild of `projection` is already in progress (a process stopped or was
    /// killed during it), returns that one unchanged, so the caller resumes from its
    /// checkpoint.
    ///
    /// # Errors
    /// [`ReadModelError::Backend`]; nothing changed.
    async fn rebuild_begin(&self, projection: Projection) -> Result<RebuildStatus, ReadModelError>;

    /// Applies `items` to the rebuild of `projection` in progress, exactly as
    /// [`apply`](Self::apply) applies them to the live version (same changes, same sequence
    /// guard semantics, one transaction), and advances the rebuild's checkpoint.
    ///
    /// # Errors
    /// [`ReadModelError::Invalid`] when no rebuild of `projection` is in progress (never begun,
    /// switched or cancelled meanwhile); [`ReadModelError::Backend`]; nothing was applied.
    async fn rebuild_apply(
        &self,
        projection: Projection,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError>;

    /// Switches queries and live workers to the rebuilt version of `projection`, atomically,
    /// when it has applied every event the live version has (its checkpoint is at or above
    /// the highest position the live consumer applied); otherwise changes nothing and returns
    /// [`RebuildSwitch::Behind`] (apply more events, then try again). After the switch the
    /// live consumer goes on from the rebuild's guard and checkpoint: events the rebuild
    /// applied and the live worker had not reached are duplicates to it, so nothing is
    /// applied twice and nothing downstream runs again. The old version's rows are dropped.
    ///
    /// # Errors
    /// [`ReadModelError::Invalid`] when no rebuild of `projection` is in progress;
    /// [`ReadModelError::Backend`]; nothing was switched.
    async fn rebuild_switch(&self, projection: Projection)
        -> Result<RebuildSwitch, ReadModelError>;

    /// Cancels the rebuild of `projection` in progress: drops its rows, guard and checkpoint;
    /// the live version is untouched. Returns whether one was in progress.
    ///
    /// # Errors
    /// [`ReadModelError::Backend`].
    async fn rebuild_cancel(&self, projection: Projection) -> Result<bool, ReadModelError>;

    /// The latest rebuild of every projection that had one (in progress, switched or
    /// cancelled), in [`Projection::ALL`] order.
    ///
    /// # Errors
    /// [`ReadModelError::Backend`].
    async fn rebuilds(&self) -> Result<Vec<RebuildStatus>, ReadModelError>;

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

    /// "Around me": the `k` entries ranked just above `user_id` on `board`, the user's own
    /// entry and the `k` just below, in rank order (fewer at either end of the board), read
    /// from one snapshot; `None` if the user has no entry on the board.
    ///
    /// Like [`leaderboard`](Self::leaderboard) and [`rank`](Self::rank), O(log n) in the
    /// board's size (see the adapters' count trie) plus the rows returned.
    async fn around(
        &self,
        board: &str,
        user_id: Uuid,
        k: u32,
    ) -> Result<Option<Vec<LeaderboardRow>>, ReadModelError>;

    /// Quota row of one user for `period` (`YYYY-MM`).
    async fn quota(&self, user_id: Uuid, period: &str) -> Result<Option<QuotaRow>, ReadModelError>;

    /// The user's current subscription tier (`rm_tier`, written by the `quota` projection
    /// from `payment.subscription.created` / `.upgraded` / `.downgraded` / `.cancelled`);
    /// `None` before the subscription is opened.
    async fn tier(&self, user_id: Uuid) -> Result<Option<tektree_domain::Tier>, ReadModelError>;

    /// Content row of one question or answer.
    async fn content(&self, content_id: Uuid) -> Result<Option<ContentRow>, ReadModelError>;

    /// The counts of `tag` (exact, as stored: lower case); `None` when no question or answer
    /// carried it.
    async fn tag(&self, tag: &str) -> Result<Option<TagRow>, ReadModelError>;

    /// Up to `limit` rows of `model` that follow `after` in the model's export order (from the
    /// first row when `after` is `None`), as JSON objects with the HTTP field names (for
    /// `tektree export`).
    ///
    /// **Keyset paging**: pass the previous page's [`ExportPage::next`] as `after` until it is
    /// `None`. A page is an index range read that starts at the cursor's key (no rows are
    /// skipped, no ranks counted), so a whole export reads each row once where the server stops
    /// a range read at the limit (SQLite, MongoDB; see the MongoDB adapter for SecantusDB).
    /// Export order, per model:
    ///
    /// | model | order (the cursor's key) |
    /// |---|---|
    /// | [`ReadModel::Xp`] | `user_id` |
    /// | [`ReadModel::Leaderboard`] | `board`, then rank: `xp` descending, `user_id` ascending |
    /// | [`ReadModel::Quota`] | `user_id`, `period` |
    /// | [`ReadModel::Content`] | `content_id` |
    /// | [`ReadModel::Tags`] | `tag` (bytewise) |
    ///
    /// Ids order as their lower-case hyphenated text (equivalently their bytes, [`Uuid`]'s
    /// `Ord`). Leaderboard ranks start at 1 on each board and continue from the cursor's rank
    /// (no counting), so they equal [`rank`](Self::rank) when the board does not change while
    /// it is exported. Each page is read from one snapshot; pages are not one snapshot
    /// together: a row keyed by an id (xp, quota, content) is exported exactly once if it
    /// exists during the whole export (with its values as of its page), whereas a leaderboard
    /// entry whose XP changes between pages may be missed or exported twice, and the ranks
    /// that follow may then differ by one from [`rank`](Self::rank).
    ///
    /// # Errors
    /// [`ReadModelError::Invalid`] when `limit` is 0 (a page must make progress) or `after`
    /// is a cursor of another model; [`ReadModelError::Backend`] when the backend fails.
    async fn export(
        &self,
        model: ReadModel,
        after: Option<&ExportCursor>,
        limit: u32,
    ) -> Result<ExportPage, ReadModelError>;
}

/// Where a rebuild beside the live read model stands ([`ReadModelStore::rebuild_begin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildPhase {
    /// Rows are being written beside the live version; queries read the live version.
    Building,
    /// The rebuilt version became the live one.
    Switched,
    /// Cancelled; its rows were dropped.
    Cancelled,
}

/// One rebuild of a projection beside its live read model (`tektree-replay status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RebuildStatus {
    /// The projection rebuilt.
    pub projection: Projection,
    /// Version number of the rebuilt read model: 1 for the first rebuild beside the version
    /// the store started with, then 2, 3, …
    pub generation: u64,
    /// Where it stands.
    pub phase: RebuildPhase,
    /// When it began, Unix milliseconds (UTC).
    pub started_at_ms: i64,
    /// When it switched or was cancelled, Unix milliseconds; `None` while building.
    pub finished_at_ms: Option<i64>,
    /// The rebuild's checkpoint: every event at or below this position is applied to it.
    /// While building, the position it has reached; after the switch, where it was then.
    pub checkpoint: u64,
    /// Events applied to it.
    pub applied: u64,
}

/// The answer of [`ReadModelStore::rebuild_switch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildSwitch {
    /// Queries and live workers now use the rebuilt version.
    Switched,
    /// Not switched: the live consumer applied events up to `live` and the rebuild only up to
    /// `rebuild`.
    Behind {
        /// The highest position the live consumer applied.
        live: u64,
        /// The rebuild's checkpoint.
        rebuild: u64,
    },
}

/// One page of [`ReadModelStore::export`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExportPage {
    /// The page's rows in export order, as JSON objects with the HTTP field names (the
    /// [`XpRow`], [`LeaderboardRow`], [`QuotaRow`], [`ContentRow`] or [`TagRow`] serialisation); at most
    /// the requested `limit`.
    pub rows: Vec<serde_json::Value>,
    /// The cursor of the last row, to pass as `after` for the next page; `None` when this is
    /// the last page (fewer rows than the limit). A full page always has one, so a model whose
    /// size is a multiple of the limit ends with an empty page.
    pub next: Option<ExportCursor>,
}

/// Where an export page ended: the key of its last row in the model's export order (see
/// [`ReadModelStore::export`]). Opaque: obtained from [`ExportPage::next`] only, valid for the
/// model it came from on any adapter and any handle (it holds keys, not a server-side
/// cursor, so it never expires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCursor(pub(crate) ExportKey);

/// The key an [`ExportCursor`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExportKey {
    /// `rm_xp`: the user.
    Xp { user_id: Uuid },
    /// `rm_leaderboard`: the entry's board, XP and user, and its rank on the board.
    Leaderboard {
        board: String,
        xp: i64,
        user_id: Uuid,
        rank: u64,
    },
    /// `rm_quota`: the user and period.
    Quota { user_id: Uuid, period: String },
    /// `rm_content`: the content.
    Content { content_id: Uuid },
    /// `rm_tags`: the tag.
    Tags { tag: String },
}

impl ExportCursor {
    /// The read model whose export this cursor continues.
    pub fn model(&self) -> ReadModel {
        match self.0 {
            ExportKey::Xp { .. } => ReadModel::Xp,
            ExportKey::Leaderboard { .. } => ReadModel::Leaderboard,
            ExportKey::Quota { .. } => ReadModel::Quota,
            ExportKey::Content { .. } => ReadModel::Content,
            ExportKey::Tags { .. } => ReadModel::Tags,
        }
    }
}

/// The argument checks every adapter makes before an export reads: `limit ≥ 1` and a cursor
/// of `model`. Returns the cursor's key.
pub(crate) fn check_export(
    model: ReadModel,
    after: Option<&ExportCursor>,
    limit: u32,
) -> Result<Option<ExportKey>, ReadModelError> {
    if limit == 0 {
        return Err(ReadModelError::Invalid(
            "export limit must be at least 1".into(),
        ));
    }
    match after {
        Some(c) if c.model() != model => Err(ReadModelError::Invalid(format!(
            "an export cursor of {:?} cannot continue an export of {model:?}",
            c.model()
        ))),
        other => Ok(other.map(|c| c.0.clone())),
    }
}

/// The page of `rows` read with `limit`: their JSON and, when the page is full, the cursor of
/// the last row (`key` gives a row's key).
pub(crate) fn export_page<T: serde::Serialize>(
    rows: Vec<T>,
    limit: u32,
    key: impl Fn(&T) -> ExportKey,
) -> Result<ExportPage, ReadModelError> {
    let next = if rows.len() >= limit as usize {
        rows.last().map(|r| ExportCursor(key(r)))
    } else {
        None
    };
    let rows = rows
        .into_iter()
        .map(|r| {
            serde_json::to_value(r)
                .map_err(|e| ReadModelError::Backend(format!("export: serialise row: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(ExportPage { rows, next })
}

impl ExportKey {
    /// The key of an xp row.
    pub(crate) fn xp(r: &XpRow) -> Self {
        ExportKey::Xp { user_id: r.user_id }
    }

    /// The key of a leaderboard row (with its rank).
    pub(crate) fn leaderboard(r: &LeaderboardRow) -> Self {
        ExportKey::Leaderboard {
            board: r.board.clone(),
            xp: r.xp,
            user_id: r.user_id,
            rank: r.rank,
        }
    }

    /// The key of a quota row.
    pub(crate) fn quota(r: &QuotaRow) -> Self {
        ExportKey::Quota {
            user_id: r.user_id,
            period: r.period.clone(),
        }
    }

    /// The key of a content row.
    pub(crate) fn content(r: &ContentRow) -> Self {
        ExportKey::Content {
            content_id: r.content_id,
        }
    }

    /// The key of a tag row.
    pub(crate) fn tags(r: &TagRow) -> Self {
        ExportKey::Tags { tag: r.tag.clone() }
    }
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
    if consumer.contains('#') {
        return Err(ReadModelError::Invalid(format!(
            "consumer name {consumer:?} contains '#', which names rebuilds"
        )));
    }
    Ok(())
}

/// The check every adapter makes before [`ReadModelStore::rebuild_apply`] writes: every
/// change belongs to `projection` (a rebuild has the tables of its own projection only).
pub(crate) fn check_rebuild_items(
    projection: Projection,
    items: &[(EventKey, Vec<Change>)],
) -> Result<(), ReadModelError> {
    match items
        .iter()
        .flat_map(|(_, changes)| changes)
        .find(|c| c.projection() != projection)
    {
        Some(c) => Err(ReadModelError::Invalid(format!(
            "a rebuild of {projection} cannot apply a change of {}",
            c.projection()
        ))),
        None => Ok(()),
    }
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
