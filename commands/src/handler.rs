//! Load → decide → append, with bounded retry on expected-version conflicts.
//!
//! # Snapshots
//!
//! A load starts from the newest state it can trust, then folds only the events after it:
//! 1. the in-memory [`StateCache`] (this process's folded states);
//! 2. on a cache miss, the aggregate's stored snapshot
//!    ([`SnapshotStore::load_snapshot`](tektree_event_store::SnapshotStore::load_snapshot)), used only
//!    when its `snapshot_version` equals the aggregate's
//!    [`SnapshotVersion::SNAPSHOT_VERSION`], its state deserialises, and the event at its
//!    version is stored; anything else is ignored (logged at debug) — snapshots are a cache;
//! 3. otherwise the first event.
//!
//! After a command commits, when the aggregate's version crossed a multiple of the snapshot
//! interval (`old / interval != new / interval`, so a command emitting several events cannot
//! jump over a snapshot), the new state is saved as the aggregate's snapshot. The save runs
//! after the commit and is best effort: a failure is logged (warn) and counted
//! (`tektree_snapshot_save_failures_total`, [`SnapshotCounts::save_failures`]) and the command
//! still succeeds, because the events are the truth and a missing or stale snapshot only makes a
//! later load fold more events.
//!
//! The snapshot version of an aggregate is looked up by its Rust type among the domain's
//! aggregates ([`User`], [`Content`], [`Profile`], [`Subscription`], [`Area`]), so that
//! `load`/`execute` need no bound beyond [`Aggregate`] (callers in other crates are generic over
//! it); another aggregate type gets no snapshots. A unit test fails when the domain's event
//! catalog names an aggregate type that is missing from the list.

use std::any::TypeId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use tektree_domain::{
    Actor, Area, Content, DomainError, Event, EventEnvelope, EventMetadata, NewEvent, Profile,
    QuotaRules, SnapshotVersion, Subscription, User,
};
use tektree_event_store::{
    EventStore, IdempotencyKey, IdempotencyRecord, StoreError, StoredSnapshot,
};
use tracing::Instrument;
use uuid::Uuid;

use crate::cache::StateCache;
use crate::error::CommandError;

/// Correlation data of one command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandMeta {
    /// Unique id of this command; the causation id of the events it emits.
    pub command_id: Uuid,
    /// Correlation id (from the request, or the source event's for policy commands).
    pub correlation_id: Uuid,
    /// Issuer.
    pub actor: Actor,
    /// Domain time of the fact (now for API commands, the dump's date for imports).
    pub occurred_at: DateTime<Utc>,
}

impl CommandMeta {
    /// Metadata for a fresh command by `actor` at `occurred_at` with new ids.
    pub fn new(actor: Actor, occurred_at: DateTime<Utc>) -> Self {
        let id = Uuid::new_v4();
        CommandMeta {
            command_id: id,
            correlation_id: id,
            actor,
            occurred_at,
        }
    }

    /// Metadata for a policy command caused by `source`: same correlation id and domain time,
    /// causation = the source event.
    pub fn caused_by(source: &EventEnvelope, actor: Actor) -> Self {
        CommandMeta {
            command_id: source.event_id,
            correlation_id: source.correlation_id,
            actor,
            occurred_at: source.occurred_at,
        }
    }

    fn metadata(&self) -> EventMetadata {
        EventMetadata {
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id,
            causation_id: self.command_id,
            actor: self.actor.clone(),
        }
    }
}

/// What a committed command produced. `events` is empty when the command changed nothing
/// (an idempotent repeat).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Aggregate type.
    pub aggregate_type: &'static str,
    /// Aggregate id.
    pub aggregate_id: Uuid,
    /// Committed events, in sequence order.
    pub events: Vec<EventEnvelope>,
    /// Aggregate version after the command.
    pub version: u64,
}

/// Default of [`CommandHandler::with_snapshot_interval`]: a snapshot every 100 versions.
///
/// Why 100: the state cache already serves hot aggregates inside one process; snapshots pay
/// off after a restart, a cache eviction or in another process, where a load then folds at most
/// 99 events instead of the whole history (the hottest profile of the bundled dump has 2,262).
/// A save costs one extra write per 100 versions (≤ 1 % more writes), and the many aggregates
/// with fewer than 100 events (most users and posts) never get a snapshot at all.
pub const DEFAULT_SNAPSHOT_INTERVAL: u64 = 100;

/// Where [`CommandHandler::load_with_source`] started folding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// The in-memory state cache held the aggregate at `version`; only later events were
    /// folded.
    Cache {
        /// Version of the cached state.
        version: u64,
    },
    /// The stored snapshot at `version` was used; only later events were folded.
    Snapshot {
        /// Version of the snapshot.
        version: u64,
    },
    /// Folded from the aggregate's first event (no cached state and no usable snapshot).
    Events,
}

/// Snapshot activity of a handler and its clones since [`CommandHandler::new`] (also exported
/// as `metrics` counters, see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotCounts {
    /// Loads that started from a stored snapshot.
    pub loads_from_snapshot: u64,
    /// Stored snapshots that a load found but did not use (other `snapshot_version`, state that
    /// does not deserialise, version without its event, or the read failed).
    pub ignored: u64,
    /// Snapshots saved after a command (including saves the store answered by keeping a newer
    /// snapshot of the same shape).
    pub saved: u64,
    /// Snapshots that could not be saved (the commands succeeded anyway).
    pub save_failures: u64,
}

#[derive(Debug, Default)]
struct SnapshotStats {
    loads_from_snapshot: AtomicU64,
    ignored: AtomicU64,
    saved: AtomicU64,
    save_failures: AtomicU64,
}

/// One row of [`snapshot_versions`]: the aggregate's Rust type, `Aggregate::TYPE` and
/// [`SnapshotVersion::SNAPSHOT_VERSION`].
type SnapshotRow = (TypeId, &'static str, u32);

fn row<A: Aggregate + SnapshotVersion + 'static>() -> SnapshotRow {
    (TypeId::of::<A>(), A::TYPE, A::SNAPSHOT_VERSION)
}

/// The domain's aggregates and their snapshot versions. A unit test checks that every
/// aggregate type of the event catalog is listed.
fn snapshot_versions() -> [SnapshotRow; 5] {
    [
        row::<User>(),
        row::<Content>(),
        row::<Profile>(),
        row::<Subscription>(),
        row::<Area>(),
    ]
}

/// The [`SnapshotVersion::SNAPSHOT_VERSION`] of `A` when it is one of the domain's aggregates;
/// `None` (no snapshots) for any other type.
fn snapshot_version_of<A: 'static>() -> Option<u32> {
    let id = TypeId::of::<A>();
    snapshot_versions()
        .into_iter()
        .find_map(|(t, _, v)| (t == id).then_some(v))
}

/// Runs commands against aggregates stored in an [`EventStore`].
#[derive(Clone)]
pub struct CommandHandler {
    store: Arc<dyn EventStore>,
    /// The monthly quota [`CommandHandler::submit`] enforces on users' metered posts.
    quota: Arc<QuotaRules>,
    max_attempts: u32,
    cache: Arc<StateCache>,
    snapshot_interval: u64,
    snapshots: Arc<SnapshotStats>,
}

impl CommandHandler {
    /// A handler over `store` with the default of 5 attempts per command, a cache of up to
    /// 50,000 folded aggregate states and a snapshot every [`DEFAULT_SNAPSHOT_INTERVAL`] (100)
    /// versions.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        CommandHandler {
            store,
            quota: Arc::new(QuotaRules::default()),
            max_attempts: 5,
            cache: Arc::new(StateCache::new(50_000)),
            snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL,
            snapshots: Arc::new(SnapshotStats::default()),
        }
    }

    /// Saves an aggregate's snapshot whenever a command moves its version across a multiple of
    /// `interval` (in events), and lets loads start from stored snapshots (see the module
    /// docs). 0 turns snapshots off: no snapshot is read or written.
    pub fn with_snapshot_interval(mut self, interval: u64) -> Self {
        self.snapshot_interval = interval;
        self
    }

    /// The snapshot interval in versions (0 = off).
    pub fn snapshot_interval(&self) -> u64 {
        self.snapshot_interval
    }

    /// Snapshot activity of this handler and its clones so far.
    pub fn snapshot_counts(&self) -> SnapshotCounts {
        let s = &self.snapshots;
        SnapshotCounts {
            loads_from_snapshot: s.loads_from_snapshot.load(Ordering::Relaxed),
            ignored: s.ignored.load(Ordering::Relaxed),
            saved: s.saved.load(Ordering::Relaxed),
            save_failures: s.save_failures.load(Ordering::Relaxed),
        }
    }

    /// Replaces the state cache with one of `capacity` aggregates (0 disables it: every load
    /// folds the aggregate's whole history).
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = Arc::new(StateCache::new(capacity));
        self
    }

    /// Sets the number of attempts on expected-version conflicts (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Attempts per command before [`CommandError::Conflict`].
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// This handler (and its clones) enforcing `quota` in [`CommandHandler::submit`] (default
    /// [`QuotaRules::default`], issue #2's limits). `App::open` sets the deployment's rules.
    pub fn with_quota_rules(mut self, quota: QuotaRules) -> Self {
        self.quota = Arc::new(quota);
        self
    }

    /// The quota rules [`CommandHandler::submit`] enforces.
    pub fn quota_rules(&self) -> &QuotaRules {
        &self.quota
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Loads aggregate `A` with id `id`: its state and version (0 = no events).
    ///
    /// # Errors
    /// [`CommandError::Store`] or [`CommandError::Decode`].
    pub async fn load<A>(&self, id: Uuid) -> Result<(A, u64), CommandError>
    where
        A: Aggregate<Event = Event> + Clone + 'static,
    {
        self.load_with_source::<A>(id)
            .await
            .map(|(state, version, _)| (state, version))
    }

    /// [`CommandHandler::load`], also telling where the fold started: the cached state, the
    /// stored snapshot or the first event (see the module docs). The state is the same
    /// whichever path is taken.
    ///
    /// # Errors
    /// [`CommandError::Store`] or [`CommandError::Decode`] (of an event; an unusable snapshot
    /// is ignored, never an error).
    pub async fn load_with_source<A>(&self, id: Uuid) -> Result<(A, u64, LoadSource), CommandError>
    where
        A: Aggregate<Event = Event> + Clone + 'static,
    {
        let (mut state, from, source, stored) = match self.cache.get::<A>(A::TYPE, id) {
            Some((state, version)) => {
                let stored = self.events_after::<A>(id, version).await?;
                (state, version, LoadSource::Cache { version }, stored)
            }
            None => match self.usable_snapshot::<A>(id).await {
                Some((state, version)) => {
                    // Read from the snapshot's own event: a snapshot is used only when the
                    // history it was folded from is stored (one extra row, not applied).
                    let mut stored = self.events_after::<A>(id, version - 1).await?;
                    if stored.first().map(|e| e.sequence) == Some(version) {
                        stored.remove(0);
                        self.snapshots
                            .loads_from_snapshot
                            .fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("tektree_snapshot_loads_total", "aggregate" => A::TYPE)
                            .increment(1);
                        (state, version, LoadSource::Snapshot { version }, stored)
                    } else {
                        self.snapshot_ignored::<A>(
                            id,
                            "missing_event",
                            "the event at its version is not stored",
                        );
                        let stored = self.events_after::<A>(id, 0).await?;
                        (A::default(), 0, LoadSource::Events, stored)
                    }
                }
                None => {
                    let stored = self.events_after::<A>(id, 0).await?;
                    (A::default(), 0, LoadSource::Events, stored)
                }
            },
        };
        let version = stored.last().map(|e| e.sequence).unwrap_or(from);
        // A state from a snapshot is worth caching even when no event follows it.
        let fresh = !stored.is_empty() || matches!(source, LoadSource::Snapshot { .. });
        for env in stored {
            let event = env.decode().map_err(|source| CommandError::Decode {
                event_id: env.event_id,
                source,
            })?;
            state.apply(event);
        }
        if fresh {
            self.cache.put(A::TYPE, id, state.clone(), version);
        }
        Ok((state, version, source))
    }

    /// The stored events of `A`/`id` after sequence `after`.
    async fn events_after<A: Aggregate>(
        &self,
        id: Uuid,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, CommandError> {
        self.store
            .load_after(A::TYPE, id, after)
            .await
            .map_err(CommandError::Store)
    }

    /// The stored snapshot of `A`/`id` as a state and its version, when snapshots are on and it
    /// is usable (right `snapshot_version`, deserialises, version ≥ 1); `None` otherwise.
    async fn usable_snapshot<A>(&self, id: Uuid) -> Option<(A, u64)>
    where
        A: Aggregate + 'static,
    {
        if self.snapshot_interval == 0 {
            return None;
        }
        let expected = snapshot_version_of::<A>()?;
        let snapshot = match self.store.load_snapshot(A::TYPE, id).await {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(
                    aggregate_type = A::TYPE,
                    aggregate_id = %id,
                    error = %e,
                    "snapshot read failed; folding from the first event"
                );
                self.snapshot_ignored::<A>(id, "read_failed", "the read failed");
                return None;
            }
        };
        if snapshot.snapshot_version != expected {
            tracing::debug!(
                stored = snapshot.snapshot_version,
                expected,
                "snapshot of another state shape"
            );
            self.snapshot_ignored::<A>(id, "snapshot_version", "another snapshot_version");
            return None;
        }
        if snapshot.version == 0 {
            self.snapshot_ignored::<A>(id, "version", "version 0");
            return None;
        }
        match serde_json::from_value::<A>(snapshot.state) {
            Ok(state) => Some((state, snapshot.version)),
            Err(e) => {
                tracing::debug!(error = %e, "snapshot state does not deserialise");
                self.snapshot_ignored::<A>(id, "decode", "its state does not deserialise");
                None
            }
        }
    }

    /// Logs (debug) and counts a stored snapshot that a load does not use.
    fn snapshot_ignored<A: Aggregate>(&self, id: Uuid, reason: &'static str, why: &str) {
        tracing::debug!(
            aggregate_type = A::TYPE,
            aggregate_id = %id,
            reason,
            "ignoring the stored snapshot ({why}); folding from the first event"
        );
        self.snapshots.ignored.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "tektree_snapshots_ignored_total",
            "aggregate" => A::TYPE,
            "reason" => reason
        )
        .increment(1);
    }

    /// The snapshot to save after a command moved `A`/`id` from version `old` to `new` with
    /// resulting `state`: `Some` when snapshots are on for `A` and the move crossed a multiple
    /// of the interval. A state that does not serialise is logged and counted as a failed save.
    fn due_snapshot<A>(&self, id: Uuid, old: u64, new: u64, state: &A) -> Option<StoredSnapshot>
    where
        A: Aggregate + 'static,
    {
        let interval = self.snapshot_interval;
        if interval == 0 || old / interval == new / interval {
            return None;
        }
        let snapshot_version = snapshot_version_of::<A>()?;
        match serde_json::to_value(state) {
            Ok(state) => Some(StoredSnapshot {
                aggregate_type: A::TYPE.to_string(),
                aggregate_id: id,
                version: new,
                snapshot_version,
                state,
                taken_at: Utc::now(),
            }),
            Err(e) => {
                self.snapshot_save_failed::<A>(id, new, &e);
                None
            }
        }
    }

    /// Saves `snapshot` after its command committed; best effort (never fails the command).
    async fn save_snapshot<A: Aggregate>(&self, snapshot: StoredSnapshot) {
        match self.store.save_snapshot(&snapshot).await {
            Ok(stored) => {
                tracing::debug!(version = snapshot.version, stored, "snapshot saved");
                self.snapshots.saved.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("tektree_snapshots_saved_total", "aggregate" => A::TYPE)
                    .increment(1);
            }
            Err(e) => self.snapshot_save_failed::<A>(snapshot.aggregate_id, snapshot.version, &e),
        }
    }

    fn snapshot_save_failed<A: Aggregate>(
        &self,
        id: Uuid,
        version: u64,
        error: &dyn std::fmt::Display,
    ) {
        tracing::warn!(
            aggregate_type = A::TYPE,
            aggregate_id = %id,
            version,
            %error,
            "snapshot not saved (the command committed; later loads fold more events)"
        );
        self.snapshots.save_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tektree_snapshot_save_failures_total", "aggregate" => A::TYPE)
            .increment(1);
    }

    /// Executes `command` on aggregate `A`/`id` with `services`.
    ///
    /// # Errors
    /// [`CommandError::Rejected`] when the aggregate refuses; [`CommandError::Conflict`] after
    /// `max_attempts` expected-version conflicts; store / decode errors otherwise. Nothing is
    /// written on error.
    pub async fn execute<A>(
        &self,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
    ) -> Result<Outcome, CommandError>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone,
    {
        self.run::<A>(id, command, services, meta, None)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// [`CommandHandler::execute`] for a request with an idempotency `key`: the first request
    /// with the key runs the command and stores the key's [`IdempotencyRecord`] in the same
    /// transaction as its events; every later request with the key and the same fingerprint,
    /// until `key.expires_at`, gets the first outcome back (rebuilt from the stored events)
    /// and writes nothing. The `bool` is `true` for such a replay.
    ///
    /// Concurrent first requests with one key are safe: the store admits one record per key,
    /// the loser finds the winner's record and replays it.
    ///
    /// # Errors
    /// As [`CommandHandler::execute`], and [`CommandError::IdempotencyKeyReused`] when the key
    /// is live with another fingerprint. Refused commands store no record: a retry runs again.
    pub async fn execute_idempotent<A>(
        &self,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
        key: &IdempotencyKey,
    ) -> Result<(Outcome, bool), CommandError>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone,
    {
        if let Some(outcome) = self.replay_idempotent::<A>(key).await? {
            return Ok((outcome, true));
        }
        self.run::<A>(id, command, services, meta, Some(key)).await
    }

    /// The outcome recorded for `key` if a record is live at `key.created_at`, rebuilt from
    /// the stored events; `None` when the key is new (or expired).
    ///
    /// # Errors
    /// [`CommandError::IdempotencyKeyReused`] when the record has another fingerprint (or is
    /// for another aggregate type); store errors.
    pub async fn replay_idempotent<A>(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<Outcome>, CommandError>
    where
        A: Aggregate<Event = Event> + 'static,
    {
        let Some(record) = self
            .store
            .idempotency_record(&key.key, key.created_at)
            .await
            .map_err(CommandError::Store)?
        else {
            return Ok(None);
        };
        self.replay_record::<A>(key, record).await.map(Some)
    }

    async fn replay_record<A>(
        &self,
        key: &IdempotencyKey,
        record: IdempotencyRecord,
    ) -> Result<Outcome, CommandError>
    where
        A: Aggregate<Event = Event> + 'static,
    {
        if record.key.fingerprint != key.fingerprint || record.aggregate_type != A::TYPE {
            return Err(CommandError::IdempotencyKeyReused {
                key: key.key.clone(),
            });
        }
        let mut events = if record.event_count == 0 {
            Vec::new()
        } else {
            self.store
                .load_after(A::TYPE, record.aggregate_id, record.first_sequence - 1)
                .await
                .map_err(CommandError::Store)?
        };
        events.truncate(record.event_count as usize);
        if events.len() as u64 != record.event_count {
            return Err(CommandError::Store(StoreError::Backend(format!(
                "idempotency record {:?} names {} events from {}/{} sequence {}, {} are stored",
                key.key,
                record.event_count,
                A::TYPE,
                record.aggregate_id,
                record.first_sequence,
                events.len()
            ))));
        }
        metrics::counter!("tektree_idempotent_replays_total", "aggregate" => A::TYPE).increment(1);
        Ok(Outcome {
            aggregate_type: A::TYPE,
            aggregate_id: record.aggregate_id,
            events,
            version: record.version,
        })
    }

    /// Load → handle → append with retries; with a `key`, the append carries the idempotency
    /// record, and a lost race for the key replays the winner's outcome.
    /// The outcome of a command that decided nothing (an identical repeat) at `version`. With
    /// a `key`, its record (no events) is stored so that a retry replays it; when another
    /// request stored the key first, that request's outcome is replayed (`true`).
    async fn unchanged<A>(
        &self,
        id: Uuid,
        version: u64,
        key: Option<&IdempotencyKey>,
    ) -> Result<(Outcome, bool), CommandError>
    where
        A: Aggregate<Event = Event> + 'static,
    {
        let outcome = Outcome {
            aggregate_type: A::TYPE,
            aggregate_id: id,
            events: vec![],
            version,
        };
        let Some(key) = key else {
            return Ok((outcome, false));
        };
        let mine = IdempotencyRecord::for_append(key.clone(), A::TYPE, id, version, 0);
        let stored = self
            .store
            .put_idempotency_record(mine.clone())
            .await
            .map_err(CommandError::Store)?;
        // Backends may round timestamps: compare what the response is made of.
        let same = stored.key.fingerprint == mine.key.fingerprint
            && stored.aggregate_id == mine.aggregate_id
            && stored.event_count == 0
            && stored.version == version;
        if same {
            return Ok((outcome, false));
        }
        Ok((self.replay_record::<A>(key, stored).await?, true))
    }

    /// After the append of `committed` on `A`/`id` (loaded at `version`): caches `state` (which
    /// has applied the new events), counts the command, saves a snapshot when one is due (a
    /// failure is only logged and counted), and returns the outcome.
    async fn committed<A>(
        &self,
        id: Uuid,
        version: u64,
        state: A,
        committed: Vec<EventEnvelope>,
    ) -> Outcome
    where
        A: Aggregate<Event = Event> + Clone + 'static,
    {
        let new_version = committed.last().map(|e| e.sequence).unwrap_or(version);
        let snapshot = self.due_snapshot(id, version, new_version, &state);
        self.cache.put(A::TYPE, id, state, new_version);
        metrics::counter!("tektree_commands_total", "aggregate" => A::TYPE, "result" => "committed")
            .increment(1);
        if let Some(snapshot) = snapshot {
            self.save_snapshot::<A>(snapshot).await;
        }
        Outcome {
            aggregate_type: A::TYPE,
            aggregate_id: id,
            events: committed,
            version: new_version,
        }
    }

    pub(crate) async fn run<A>(
        &self,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
        key: Option<&IdempotencyKey>,
    ) -> Result<(Outcome, bool), CommandError>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone,
    {
        let span = tracing::info_span!(
            "command",
            aggregate_type = A::TYPE,
            aggregate_id = %id,
            command_id = %meta.command_id,
            correlation_id = %meta.correlation_id,
            actor = %meta.actor,
        );
        async move {
            for attempt in 1..=self.max_attempts {
                let (mut state, version) = self.load::<A>(id).await?;
                let sink = EventSink::default();
                state.handle(command.clone(), services, &sink).await?;
                let events = sink.collect().await;
                if events.is_empty() {
                    return self.unchanged::<A>(id, version, key).await;
                }
                let new: Vec<NewEvent> = events
                    .into_iter()
                    .enumerate()
                    .map(|(i, event)| NewEvent {
                        event_id: Uuid::new_v4(),
                        aggregate_type: A::TYPE.to_string(),
                        aggregate_id: id,
                        sequence: version + 1 + i as u64,
                        event,
                        metadata: meta.metadata(),
                    })
                    .collect();
                let appended = match key {
                    None => self.store.append(A::TYPE, id, version, new).await,
                    Some(k) => {
                        self.store
                            .append_idempotent(A::TYPE, id, version, new, k.clone())
                            .await
                    }
                };
                match appended {
                    Ok(committed) => {
                        let outcome = self.committed::<A>(id, version, state, committed).await;
                        return Ok((outcome, false));
                    }
                    Err(e @ StoreError::IdempotencyKeyExists { .. }) => {
                        let Some(key) = key else {
                            return Err(CommandError::Store(e));
                        };
                        return match self.replay_idempotent::<A>(key).await? {
                            Some(outcome) => Ok((outcome, true)),
                            // The winner's record expired in between: treat as a conflict.
                            None => Err(CommandError::Conflict {
                                aggregate: format!("{}/{id}", A::TYPE),
                                attempts: attempt,
                            }),
                        };
                    }
                    Err(StoreError::Conflict { .. }) => {
                        tracing::debug!(attempt, "expected-version conflict; retrying");
                        metrics::counter!("tektree_command_conflicts_total", "aggregate" => A::TYPE).increment(1);
                        // Back off a little, growing with the attempt, to let the winner finish.
                        tokio::time::sleep(std::time::Duration::from_millis(
                            (attempt as u64) * (1 + rand_jitter(id, attempt)),
                        ))
                        .await;
                    }
                    Err(e) => return Err(CommandError::Store(e)),
                }
            }
            Err(CommandError::Conflict {
                aggregate: format!("{}/{id}", A::TYPE),
                attempts: self.max_attempts,
            })
        }
        .instrument(span)
        .await
    }
}

/// A cheap deterministic jitter of 0..=4 ms from the aggregate id and attempt (no RNG dependency).
fn rand_jitter(id: Uuid, attempt: u32) -> u64 {
    let b = id.as_bytes();
    (b[(attempt as usize) % 16] as u64 + std::process::id() as u64) % 5
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NotAnAggregate;

    #[test]
    fn every_aggregate_of_the_event_catalog_has_its_snapshot_version() {
        let listed: Vec<&str> = snapshot_versions().iter().map(|(_, t, _)| *t).collect();
        for entry in tektree_domain::events::CATALOG.iter() {
            assert!(
                listed.contains(&entry.aggregate_type),
                "aggregate type {:?} (event {:?}) has no row in snapshot_versions()",
                entry.aggregate_type,
                entry.event_type
            );
        }
        assert_eq!(
            snapshot_version_of::<Profile>(),
            Some(Profile::SNAPSHOT_VERSION)
        );
        assert_eq!(snapshot_version_of::<User>(), Some(User::SNAPSHOT_VERSION));
        assert_eq!(snapshot_version_of::<NotAnAggregate>(), None);
    }
}
