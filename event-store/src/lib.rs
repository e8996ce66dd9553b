//! # tektree-event-store
//!
//! The event store port ([`EventStore`]), its embedded adapter ([`SqliteStore`]) and, with the
//! default feature `mongodb`, its MongoDB adapter (`MongoStore`, module `mongo`).
//!
//! Guarantees every adapter gives (checked by the conformance suite in [`conformance`]):
//! - [`EventLog::append`] writes one aggregate's new events **and their outbox records in one
//!   transaction**: after a crash either all are visible or none.
//! - Per-aggregate `sequence` is contiguous from 1; an append whose `expected_version` is not the
//!   aggregate's current version fails with [`StoreError::Conflict`] and writes nothing.
//! - Global `position` is assigned by the store, strictly increasing in commit order: a reader
//!   that has seen position `p` never later sees a newly committed event with a position `≤ p`.
//!   One append's events get consecutive positions (SQLite: one transaction under the write
//!   lock; MongoDB: a sequencer pass keeps each append together, checked across processes by
//!   `tests/mongo_processes.rs`).
//! - [`OutboxStore::outbox_pending`] returns unpublished outbox records in position order.
//! - [`SnapshotStore::save_snapshot`] keeps one [`StoredSnapshot`] per aggregate and never moves it
//!   back to a lower `version` of the same `snapshot_version`.

#![deny(missing_docs)]

#[cfg(any(test, feature = "testkit"))]
pub mod conformance;
mod error;
mod idempotency;
#[cfg(feature = "mongodb")]
pub mod mongo;
mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tektree_domain::{EventEnvelope, NewEvent, StoredEvent};
use uuid::Uuid;

pub use error::StoreError;
pub use idempotency::{IdempotencyKey, IdempotencyRecord, MAX_KEY_BYTES};
#[cfg(feature = "mongodb")]
pub use mongo::MongoStore;
pub use sqlite::backup as sqlite_backup;
pub use sqlite::SqliteStore;

/// The store's head: the highest committed position and the number of stored events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    /// Highest committed global position; 0 when empty.
    pub position: u64,
    /// Number of stored events.
    pub events: u64,
}

/// Who a store is (issue #12): `store_id` is created with the store and never changes (a copy
/// of the store, a backup, keeps it); `epoch` starts at 1 and is raised by a restore, so a
/// store restored to an older point differs from the one that went on. A bus is bound to one
/// store identity (`tektree_outbox::binding`), so that two stores, or a store and its older
/// self, never share a bus silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreIdentity {
    /// Random (v4) id made when the store was created.
    pub store_id: Uuid,
    /// 1 for a new store; raised by one on each restore.
    pub epoch: u64,
}

impl std::fmt::Display for StoreIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "store {} epoch {}", self.store_id, self.epoch)
    }
}

/// The folded state of one aggregate at one version, stored so that a load folds only the
/// events after it (issue #6). One per aggregate (`aggregate_type`, `aggregate_id`).
///
/// The store treats `state` as opaque JSON; whoever reads it checks `snapshot_version` against
/// the state shape it expects (the aggregate's `SnapshotVersion::SNAPSHOT_VERSION` in
/// `tektree-domain`) and ignores a snapshot of another shape. A snapshot is a cache: deleting
/// or ignoring it never changes what a load returns, only how many events it folds.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSnapshot {
    /// Aggregate type (`user`, `content`, `profile`, `subscription`).
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: Uuid,
    /// Aggregate version folded into `state`: the sequence of the last event applied (≥ 1).
    pub version: u64,
    /// Shape version of `state` (the aggregate's `SNAPSHOT_VERSION` when it was taken).
    pub snapshot_version: u32,
    /// The folded state, as the aggregate's serde JSON form.
    pub state: serde_json::Value,
    /// When the snapshot was taken (writer's clock; stored with nanoseconds).
    pub taken_at: DateTime<Utc>,
}

impl StoredSnapshot {
    /// Whether saving `self` over the stored `current` replaces it: always when their
    /// `snapshot_version`s differ (a stored snapshot of another shape is useless to the writer,
    /// which would ignore it on load; this also lets a rolled-back build replace the snapshots of
    /// a newer one), else only when `self.version >= current.version` (never backwards).
    pub fn replaces(&self, current: &StoredSnapshot) -> bool {
        self.snapshot_version != current.snapshot_version || self.version >= current.version
    }
}

/// The log of domain events: appends with an expected version (events and their outbox records
/// in one transaction), reads by aggregate and by global position, the head, and the store's
/// identity. One of the four parts of an [`EventStore`].
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `events` (all of aggregate `aggregate_type`/`aggregate_id`, sequences
    /// `expected_version + 1 ..`) and one outbox record per event, atomically.
    ///
    /// Returns the committed envelopes (with `position` and `recorded_at`). An empty `events` is
    /// a no-op returning an empty vector.
    ///
    /// # Errors
    /// - [`StoreError::Conflict`] when the aggregate's current version is not
    ///   `expected_version` (another writer won); nothing is written.
    /// - [`StoreError::Backend`] for storage failures; nothing is written.
    async fn append(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<Vec<EventEnvelope>, StoreError>;

    /// All events of one aggregate in sequence order (empty when it has none).
    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Vec<EventEnvelope>, StoreError>;

    /// Events of one aggregate with `sequence > after_sequence`, in sequence order (used to
    /// bring a cached aggregate state up to date). The default filters [`EventLog::load`];
    /// adapters override it with an indexed range read.
    async fn load_after(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut all = self.load(aggregate_type, aggregate_id).await?;
        all.retain(|e| e.sequence > after_sequence);
        Ok(all)
    }

    /// Up to `limit` events with `position > after`, in position order.
    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<EventEnvelope>, StoreError>;

    /// [`read_all`](Self::read_all) as a rebuild needs it: each event's key, type, version
    /// and payload text as stored ([`StoredEvent`]), without parsing the payload or the
    /// metadata. The default converts [`read_all`](Self::read_all)'s envelopes; SQLite reads
    /// the columns only.
    async fn read_all_stored(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self
            .read_all(after, limit)
            .await?
            .iter()
            .map(StoredEvent::from)
            .collect())
    }

    /// The current [`Head`].
    async fn head(&self) -> Result<Head, StoreError>;

    /// The highest committed position ([`Head::position`]) without counting the events, for
    /// checks made often (the relay's check for a bus that lost events). The default reads
    /// [`EventLog::head`]; adapters whose count is not free override it.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn last_position(&self) -> Result<u64, StoreError> {
        Ok(self.head().await?.position)
    }

    /// This store's [`StoreIdentity`] (created with the store, read at open).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when it cannot be read.
    async fn identity(&self) -> Result<StoreIdentity, StoreError>;

    /// Marks this store as restored (issue #12, `tektree restore`): sets its epoch to one more
    /// than the greater of its own and `above` (pass the epoch a bus was bound to, so that the
    /// new epoch is above every epoch that bus has seen); returns the new identity. The
    /// `store_id` never changes.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    async fn raise_epoch(&self, above: u64) -> Result<StoreIdentity, StoreError>;
}

/// Idempotency records of command requests (`Idempotency-Key`): an append with its record in
/// one transaction, the live record of a key, records of requests that appended nothing, and
/// their purge. One of the four parts of an [`EventStore`].
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// [`EventLog::append`] plus the [`IdempotencyRecord`] of `key`, in the same
    /// transaction: either the events, their outbox records and the idempotency record are all
    /// stored, or none is. A record of `key` whose `expires_at` is not after `key.created_at`
    /// is replaced.
    ///
    /// # Errors
    /// As [`EventLog::append`], and [`StoreError::IdempotencyKeyExists`] (nothing written)
    /// when a live record with the same key is stored: another request with the key won.
    async fn append_idempotent(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
        key: IdempotencyKey,
    ) -> Result<Vec<EventEnvelope>, StoreError>;

    /// The record of `key` if one is stored and live at `now` (`now < expires_at`).
    async fn idempotency_record(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Stores `record` unless a record of its key is live at `record.key.created_at`; returns
    /// the record in force afterwards (the given one, or the earlier live one). Used for
    /// requests that committed no events.
    async fn put_idempotency_record(
        &self,
        record: IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError>;

    /// Deletes the records that expired at or before `now`; returns how many.
    async fn purge_idempotency_records(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// The transactional outbox as the relay sees it: records not yet published, in position order,
/// and marking them published. One of the four parts of an [`EventStore`].
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Up to `limit` outbox records not yet marked published, in position order.
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<EventEnvelope>, StoreError>;

    /// Marks the outbox records at `positions` published. Unknown or already published positions
    /// are ignored (idempotent).
    async fn outbox_mark_published(&self, positions: &[u64]) -> Result<(), StoreError>;

    /// Number of outbox records not yet published.
    async fn outbox_backlog(&self) -> Result<u64, StoreError>;
}

/// Aggregate snapshots, a cache beside the events: load one, save one under the replacement
/// rule of [`StoredSnapshot::replaces`]. One of the four parts of an [`EventStore`].
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// The stored snapshot of `aggregate_type`/`aggregate_id`, if any (whatever its
    /// `snapshot_version`: the caller decides whether it can use it).
    ///
    /// # Errors
    /// [`StoreError::Backend`] for storage failures and for a stored row that cannot be decoded
    /// (callers treat snapshots as a cache and fall back to folding the events).
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<StoredSnapshot>, StoreError>;

    /// Stores `snapshot` as its aggregate's one snapshot (insert or replace), unless the stored
    /// one has the same `snapshot_version` and a higher `version` (see
    /// [`StoredSnapshot::replaces`]); atomic against concurrent saves of the same aggregate.
    /// Returns `true` when `snapshot` is now stored, `false` when the stored one was kept.
    ///
    /// Independent of appends: it is not part of any append's transaction, and the store does
    /// not check `version` against the aggregate's events (the caller saves only states it
    /// folded from committed events).
    ///
    /// # Errors
    /// [`StoreError::Backend`] for storage failures or a snapshot the backend cannot hold
    /// (`version` above `i64::MAX`); nothing is written then.
    async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<bool, StoreError>;
}

/// Append-only storage of domain events with a transactional outbox: the four parts by concern
/// ([`EventLog`], [`IdempotencyStore`], [`OutboxStore`], [`SnapshotStore`]) in one type, as
/// every adapter (SQLite, MongoDB) provides them and every caller holds them
/// (`Arc<dyn EventStore>`). Implemented for every type that implements the four; a caller that
/// needs one part only can ask for that part.
pub trait EventStore: EventLog + IdempotencyStore + OutboxStore + SnapshotStore {}

impl<T: EventLog + IdempotencyStore + OutboxStore + SnapshotStore> EventStore for T {}

/// The batch check every adapter makes before writing: `events` all belong to the aggregate
/// and are numbered `expected_version + 1 ..` (a violation is a programming error, reported as
/// [`StoreError::Backend`]).
pub(crate) fn validate_batch(
    aggregate_type: &str,
    aggregate_id: Uuid,
    expected_version: u64,
    events: &[NewEvent],
) -> Result<(), StoreError> {
    for (i, e) in events.iter().enumerate() {
        if e.aggregate_type != aggregate_type || e.aggregate_id != aggregate_id {
            return Err(StoreError::Backend(format!(
                "append to {aggregate_type}/{aggregate_id}: event {} belongs to {}/{}",
                e.event_id, e.aggregate_type, e.aggregate_id
            )));
        }
        let want = (i as u64)
            .checked_add(1)
            .and_then(|n| expected_version.checked_add(n));
        if Some(e.sequence) != want {
            return Err(StoreError::Backend(format!(
                "append to {aggregate_type}/{aggregate_id} at expected version \
                 {expected_version}: event #{i} has sequence {}, expected {} (sequences must be \
                 contiguous from expected_version + 1)",
                e.sequence,
                want.map_or_else(|| "overflow".to_string(), |w| w.to_string()),
            )));
        }
    }
    Ok(())
}
