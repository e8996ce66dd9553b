//! The MongoDB adapter of [`EventStore`] (feature `mongodb`, on by default): [`MongoStore`].
//!
//! Needs a **replica set** (a one-node replica set is enough) or a sharded cluster: every
//! append is a multi-document transaction. [`MongoStore::connect`] refuses a standalone server.
//! How to run one and the conformance suite: `docs/mongodb.md`.
//!
//! # Collections
//!
//! | collection | one document per | fields |
//! |---|---|---|
//! | `events` | event | the envelope (see [`envelope_to_document`]); `position` once sequenced; until then `pending`, `pending_of` (first event id of the append) and `pending_n` (events in the append) |
//! | `outbox` | event | `_id` = event id, `position` once sequenced, `published`, `published_at` |
//! | `idempotency` | request with an `Idempotency-Key` | see [`record_to_document`]; written in the append's transaction; TTL index on `expires_at` |
//! | `position_log` | sequencer batch | `_id` (batch number), `first`, `last`, `ids` (event ids in position order), `materialized` (module `sequencer`) |
//! | `counters` | — | `{_id: "position", last}` of builds before the position log, adopted as batch 0 |
//! | `store_identity` | — | `{_id: "identity", store_id, epoch, created_at}`: the [`StoreIdentity`], made by the first `connect` |
//! | `snapshots` | aggregate with a snapshot | see [`snapshot_to_document`]; one upsert per save, outside any append's transaction (module `snapshots`) |
//!
//! Indexes: [`event_indexes`], [`outbox_indexes`], [`idempotency_indexes`] and [`snapshot_indexes`], created idempotently by `connect`.
//!
//! # Positions: a post-commit sequencer over a position log
//!
//! An append is **one transaction** that checks the aggregate's version and inserts the events
//! and their outbox records. It does not touch any shared document, so appends to different
//! aggregates never conflict. The events are committed **unsequenced**: without `position`,
//! with a provisional key `pending` (the appender's clock in microseconds, raised above the
//! aggregate's previous unsequenced event, so `pending` increases along every aggregate),
//! `pending_of` (the append's first event id) and `pending_n` (its size).
//!
//! Positions are assigned by **sequencer passes** that append batches to the `position_log`
//! collection (one document per batch, unique `_id` = batch number) and then copy the positions
//! onto the events and outbox records; readers see positions up to the log's materialized
//! watermark. No pass holds a lock, a lease or an open write transaction, so a process killed
//! or paused anywhere delays no other. The design, its proof and the alternatives are in the
//! module `sequencer` and `docs/mongodb.md`.
//!
//! After its commit an append runs passes (serialised in the process by a mutex: one pass
//! sequences every waiting appender's events, group commit) until its own events have
//! positions, then returns the envelopes. `load` returns an aggregate's sequenced prefix,
//! `read_all`, `head` and the outbox stop at the watermark.
//!
//! # Consistency
//!
//! Transactions read a majority snapshot and commit with `w: majority, j: true`. Reads outside
//! transactions use read concern `majority` in a causally consistent session advanced to the
//! latest operation time this handle has written, so a handle reads its own writes and never
//! sees writes that a failover could roll back.
//!
//! # Shared with the read-model adapter
//!
//! The MongoDB adapter of `tektree-projections` uses this module's driver plumbing rather than
//! a copy: [`connect_client`] (options and the replica-set check), [`CausalClock`] (reading a
//! handle's own writes), the error classification ([`classify`], [`should_retry`], …), the
//! transaction runner [`run_transaction`] (generic over the body's abort error) and
//! [`index_model`], [`uuid_to_bson`].

mod idempotency;
mod indexes;
mod mapping;
mod sequencer;
mod snapshots;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use futures::FutureExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Client, ClientSession, Collection, Database};
use tektree_domain::{EventEnvelope, NewEvent};
use uuid::Uuid;

// The plumbing shared with the read models (crate `tektree-mongo`), re-exported.
pub use indexes::{
    check_unsharded, event_indexes, outbox_indexes, OUTBOX_INDEX, PENDING_INDEX, POSITION_INDEX,
    SEQUENCE_INDEX, UNSHARDED,
};
pub use mapping::{
    bson_to_json, envelope_from_document, envelope_to_document, json_to_bson, timestamp_from_bson,
    timestamp_to_bson, uuid_from_bson, MappingError,
};
pub use tektree_mongo::{
    backoff, check_deployment, classify, classify_parts, code, code_and_message, connect_client,
    index_model, run_transaction, should_retry, transaction_options, uuid_to_bson, CausalClock,
    Deployment, ErrorClass, Phase, Retry, RunError, ServerBuild, TxError, COMMIT_TIME_LIMIT,
    DUPLICATE_KEY, MAX_RETRY_TIME, MAX_TIME_MS_EXPIRED,
};

pub use snapshots::{
    snapshot_from_document, snapshot_indexes, snapshot_key_filter, snapshot_save_filter,
    snapshot_to_document, snapshot_update, SNAPSHOTS, SNAPSHOT_KEY_INDEX,
};

pub use idempotency::{
    idempotency_indexes, record_from_document, record_to_document, IDEMPOTENCY,
    IDEMPOTENCY_TTL_INDEX,
};
pub use sequencer::{
    appends_together, batch_ids, Tip, MAX_APPEND_EVENTS, METRIC_PASS_LOST, METRIC_UNSEQUENCED,
    POSITION_LOG, SEQUENCE_BATCH,
};

use crate::{
    validate_batch, EventLog, Head, IdempotencyKey, IdempotencyRecord, IdempotencyStore,
    OutboxStore, SnapshotStore, StoreError, StoreIdentity, StoredSnapshot,
};

/// The store's identity: one document `{_id: "identity", store_id, epoch, created_at}`.
pub const STORE_IDENTITY: &str = "store_identity";
/// The events collection.
pub const EVENTS: &str = "events";
/// The outbox collection.
pub const OUTBOX: &str = "outbox";
/// The counters collection of databases written before the position log: its
/// `{_id: "position", last}` document becomes the log's first batch (see
/// [`MongoStore::connect`]); nothing writes it any more.
pub const COUNTERS: &str = "counters";
/// `_id` of the old position counter document.
pub const POSITION_COUNTER: &str = "position";

/// Most sequencer passes one [`MongoStore::sequence_pending`] call runs.
pub const MAX_PASSES_PER_CALL: usize = 1024;

/// How long an append waits for its committed events to be sequenced before reporting an
/// error (the events stay committed and are sequenced by a later pass).
const SEQUENCE_WAIT: Duration = Duration::from_secs(30);

fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what}: {e}"))
}

fn corrupt(doc: &Document, e: MappingError) -> StoreError {
    StoreError::Corrupt {
        position: mapping::get_u64(doc, "position").unwrap_or(0),
        reason: e.to_string(),
    }
}

/// [`EventStore`] on a MongoDB replica set (see the [module docs](self) for the design).
///
/// Cheap to clone (an [`Arc`]); clones share the driver's connection pool, the in-process
/// sequencer lock and the causal clock. Several handles and processes may use one database at
/// once.
#[derive(Clone)]
pub struct MongoStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    db: Database,
    events: Collection<Document>,
    outbox: Collection<Document>,
    position_log: Collection<Document>,
    idempotency: Collection<Document>,
    snapshots: Collection<Document>,
    /// Serialises this process's sequencer passes (across processes, the log's unique `_id`
    /// decides between passes).
    sequencer: tokio::sync::Mutex<()>,
    /// Sequencer passes completed by this handle (to skip a pass when another did the work).
    passes: AtomicU64,
    /// The highest position-log batch number this handle has seen (where tip searches start).
    tip_seen: std::sync::atomic::AtomicI64,
    clock: CausalClock,
    /// Read at connect; changed only by [`EventLog::raise_epoch`].
    identity: std::sync::Mutex<StoreIdentity>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore")
            .field("database", &self.inner.db.name())
            .finish_non_exhaustive()
    }
}

/// Everything one append transaction attempt needs.
struct AppendCtx<'a> {
    inner: &'a Inner,
    aggregate_type: &'a str,
    aggregate_id: Uuid,
    expected: u64,
    /// Provisional sequencing key of the first event (recorded_at in µs), before raising it
    /// above the aggregate's previous unsequenced event.
    pending_base: i64,
    docs: &'a [Document],
    outbox: &'a [Document],
    /// The idempotency record to insert with the events, if the request had a key.
    record: Option<&'a Document>,
}

impl AppendCtx<'_> {
    async fn attempt(&self, s: &mut ClientSession) -> Result<(), TxError<StoreError>> {
        let inner = self.inner;
        let last = inner
            .events
            .find_one(doc! {
                "aggregate_type": self.aggregate_type,
                "aggregate_id": uuid_to_bson(self.aggregate_id),
            })
            .sort(doc! { "sequence": -1 })
            .projection(doc! { "sequence": 1, "pending": 1, "position": 1 })
            .session(&mut *s)
            .await?;
        let (actual, previous_pending) = match &last {
            None => (0, None),
            Some(d) => (
                mapping::get_u64(d, "sequence").map_err(|e| TxError::Abort(corrupt(d, e)))?,
                d.get_i64("pending").ok(),
            ),
        };
        if actual != self.expected {
            return Err(TxError::Abort(StoreError::Conflict {
                aggregate_type: self.aggregate_type.to_string(),
                aggregate_id: self.aggregate_id,
                expected: self.expected,
                actual,
            }));
        }
        let base = match previous_pending {
            Some(p) => self.pending_base.max(p.saturating_add(1)),
            None => self.pending_base,
        };
        let first_id = self.docs.first().and_then(|d| d.get("_id")).cloned();
        let n = self.docs.len() as i64;
        let docs = self.docs.iter().enumerate().map(|(i, d)| {
            let mut d = d.clone();
            d.insert("pending", base.saturating_add(i as i64));
            d.insert("pending_of", first_id.clone().unwrap_or(Bson::Null));
            d.insert("pending_n", n);
            d
        });
        if let Some(rec) = self.record {
            let key = rec.get("_id").cloned().unwrap_or(Bson::Null);
            let created = rec.get("created_at").cloned().unwrap_or(Bson::Null);
            inner
                .idempotency
                .delete_one(doc! { "_id": key.clone(), "expires_at": { "$lte": created } })
                .session(&mut *s)
                .await?;
            let live = inner
                .idempotency
                .find_one(doc! { "_id": key.clone() })
                .session(&mut *s)
                .await?;
            if live.is_some() {
                return Err(TxError::Abort(StoreError::IdempotencyKeyExists {
                    key: key.as_str().unwrap_or_default().to_string(),
                }));
            }
            inner
                .idempotency
                .insert_one(rec.clone())
                .session(&mut *s)
                .await?;
        }
        inner.events.insert_many(docs).session(&mut *s).await?;
        inner
            .outbox
            .insert_many(self.outbox.iter().cloned())
            .session(&mut *s)
            .await?;
        Ok(())
    }
}

impl MongoStore {
    /// Connects to the deployment at `uri`, checks that it is a replica set (or sharded
    /// cluster), and creates the collections' indexes and the position counter in database
    /// `db_name` if missing (idempotent; safe to run from several processes at once). Then
    /// sequences events left unsequenced by a crashed appender.
    ///
    /// The client uses read concern `majority` and write concern `majority` with journaling;
    /// the URI's other options (pool size, timeouts, TLS, `directConnection`, …) apply.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the URI is invalid, no server is reachable within the
    /// server-selection timeout (30 s unless the URI says otherwise), the server is a
    /// **standalone** (the message names the replica-set requirement), or an index with the
    /// same name but a different definition exists.
    pub async fn connect(uri: &str, db_name: &str) -> Result<Self, StoreError> {
        let (client, deployment) = connect_client(uri).await.map_err(StoreError::Backend)?;
        if deployment == Deployment::Sharded {
            refuse_sharded_event_collections(&client, db_name).await?;
        }
        let db = client.database(db_name);
        let events = db.collection::<Document>(EVENTS);
        let outbox = db.collection::<Document>(OUTBOX);
        let position_log = db.collection::<Document>(POSITION_LOG);
        let idempotency = db.collection::<Document>(IDEMPOTENCY);
        let snapshots = db.collection::<Document>(SNAPSHOTS);
        snapshots
            .create_indexes(snapshot_indexes())
            .await
            .map_err(|e| backend("create indexes of snapshots", e))?;
        idempotency
            .create_indexes(idempotency_indexes())
            .await
            .map_err(|e| backend("create indexes of idempotency", e))?;
        events
            .create_indexes(event_indexes())
            .await
            .map_err(|e| backend("create indexes of events", e))?;
        outbox
            .create_indexes(outbox_indexes())
            .await
            .map_err(|e| backend("create indexes of outbox", e))?;
        adopt_position_counter(&db, &position_log).await?;
        let identity = identity_of(&db).await?;
        tracing::debug!(
            database = db_name,
            ?deployment,
            "opened MongoDB event store"
        );
        let store = MongoStore {
            inner: Arc::new(Inner {
                client,
                db,
                events,
                outbox,
                position_log,
                idempotency,
                snapshots,
                sequencer: tokio::sync::Mutex::new(()),
                passes: AtomicU64::new(0),
                tip_seen: std::sync::atomic::AtomicI64::new(0),
                clock: CausalClock::default(),
                identity: std::sync::Mutex::new(identity),
            }),
        };
        store.sequence_pending().await?;
        Ok(store)
    }

    /// The database this store uses.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// Runs sequencer passes until one finds no committed event without a position (or after
    /// [`MAX_PASSES_PER_CALL`] passes, when writers keep adding faster than passes drain);
    /// returns how many events got positions.
    ///
    /// Appends sequence their own events, so this is only needed to recover events whose
    /// appender died between its commit and its pass (`outbox_pending`, `load` and
    /// `load_after` call it when they see such events).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when a pass fails (after the transaction retries).
    pub async fn sequence_pending(&self) -> Result<u64, StoreError> {
        let _guard = self.inner.sequencer.lock().await;
        let mut total = 0u64;
        for _ in 0..MAX_PASSES_PER_CALL {
            let assigned = self.sequence_pass().await?;
            if assigned.is_empty() {
                break;
            }
            total += assigned.len() as u64;
        }
        Ok(total)
    }

    /// A causally consistent session that starts at the latest time this handle wrote.
    async fn session(&self) -> Result<ClientSession, StoreError> {
        self.inner
            .clock
            .session(&self.inner.client)
            .await
            .map_err(|e| backend("start session", e))
    }

    /// One sequencer pass (the caller holds the sequencer lock; module `sequencer`).
    async fn sequence_pass(&self) -> Result<Vec<(Uuid, u64)>, StoreError> {
        let mut session = self.session().await?;
        let out = self.inner.pass(&mut session).await;
        self.inner.clock.observe(&session);
        self.inner.passes.fetch_add(1, Ordering::SeqCst);
        out
    }

    /// The position-log tip, read in a causally consistent session.
    async fn tip(&self) -> Result<Tip, StoreError> {
        let mut session = self.session().await?;
        self.inner.tip(&mut session).await
    }

    /// The last position readers may see (see [`Tip::watermark`]); first finishes a batch left
    /// half materialized by a pass that died, and sequences pending events when
    /// `sequence` is set.
    async fn settled_watermark(&self, sequence: bool) -> Result<u64, StoreError> {
        let tip = self.tip().await?;
        if !tip.materialized || (sequence && self.has_pending().await?) {
            self.sequence_pending().await?;
            return Ok(self.tip().await?.watermark());
        }
        Ok(tip.watermark())
    }

    /// Positions of those of `ids` that are sequenced.
    async fn positions_of(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, u64>, StoreError> {
        let list: Vec<Bson> = ids.iter().map(|id| uuid_to_bson(*id)).collect();
        let docs = self
            .find(
                &self.inner.events,
                doc! { "_id": { "$in": list }, "position": { "$gt": 0_i64 } },
                None,
                None,
                Some(doc! { "_id": 1, "position": 1 }),
            )
            .await?;
        docs.iter()
            .map(|d| {
                let id = uuid_from_bson("_id", d.get("_id").unwrap_or(&Bson::Null))
                    .map_err(|e| corrupt(d, e))?;
                let p = mapping::get_u64(d, "position").map_err(|e| corrupt(d, e))?;
                Ok((id, p))
            })
            .collect()
    }

    /// Runs passes until every event of `ids` (committed by the caller) has a position.
    /// `passes_seen` is the pass counter read right after the caller's commit.
    async fn sequence_own(
        &self,
        ids: &[Uuid],
        passes_seen: u64,
    ) -> Result<HashMap<Uuid, u64>, StoreError> {
        let _guard = self.inner.sequencer.lock().await;
        let wanted: HashSet<Uuid> = ids.iter().copied().collect();
        let mut found = HashMap::with_capacity(ids.len());
        if self.inner.passes.load(Ordering::SeqCst) != passes_seen {
            // A pass ran while we waited for the lock: it probably sequenced our events.
            found.extend(self.positions_of(ids).await?);
        }
        let deadline = Instant::now() + SEQUENCE_WAIT;
        while found.len() < wanted.len() {
            let assigned = self.sequence_pass().await?;
            let none = assigned.is_empty();
            found.extend(assigned.into_iter().filter(|(id, _)| wanted.contains(id)));
            if found.len() == wanted.len() {
                break;
            }
            if none {
                // Not pending in the pass's snapshot: another process sequenced them.
                let missing: Vec<Uuid> = ids
                    .iter()
                    .filter(|id| !found.contains_key(id))
                    .copied()
                    .collect();
                found.extend(self.positions_of(&missing).await?);
                if found.len() < wanted.len() {
                    if Instant::now() > deadline {
                        return Err(StoreError::Backend(format!(
                            "{} committed events got no position within {SEQUENCE_WAIT:?}; \
                             they stay stored and are sequenced by a later pass",
                            wanted.len() - found.len()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        Ok(found)
    }

    /// Runs a find in a causally consistent session and collects the documents.
    async fn find(
        &self,
        coll: &Collection<Document>,
        filter: Document,
        sort: Option<Document>,
        limit: Option<i64>,
        projection: Option<Document>,
    ) -> Result<Vec<Document>, StoreError> {
        let mut session = self.session().await?;
        let mut cursor = coll
            .find(filter)
            .with_options(
                mongodb::options::FindOptions::builder()
                    .sort(sort)
                    .limit(limit)
                    .projection(projection)
                    .build(),
            )
            .session(&mut session)
            .await
            .map_err(|e| backend("find", e))?;
        let mut out = Vec::new();
        while let Some(d) = cursor.next(&mut session).await {
            out.push(d.map_err(|e| backend("find", e))?);
        }
        Ok(out)
    }

    /// Events matching `filter` in `sort` order, decoded.
    async fn find_events(
        &self,
        filter: Document,
        sort: Document,
        limit: Option<i64>,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.find(&self.inner.events, filter, Some(sort), limit, None)
            .await?
            .iter()
            .map(|d| envelope_from_document(d).map_err(|e| corrupt(d, e)))
            .collect()
    }

    /// Events of one aggregate with `sequence > after`, all sequenced (committed events that
    /// still lack a position are sequenced first).
    async fn load_range(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let filter = doc! {
            "aggregate_type": aggregate_type,
            "aggregate_id": uuid_to_bson(aggregate_id),
            "sequence": { "$gt": after },
        };
        let events = self.sequenced_prefix(filter.clone()).await?;
        if let Ok(events) = events {
            return Ok(events);
        }
        // Committed events without a position: a concurrent append (sequenced any moment) or
        // an appender that died after its commit. Sequence what is pending, read again, and
        // return the sequenced prefix: what is still unsequenced now was committed while this
        // load ran, so the load reads as if it had run just before that commit (a command
        // deciding on the prefix gets a version conflict and retries).
        self.sequence_pending().await?;
        Ok(match self.sequenced_prefix(filter).await? {
            Ok(events) => events,
            Err(prefix) => prefix,
        })
    }

    /// The events matching `filter` in sequence order: `Ok` when all have positions, else
    /// `Err` with those before the first event without one.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for an event that does not decode or was set aside as
    /// unsequenceable (the aggregate's history cannot be loaded without it).
    async fn sequenced_prefix(
        &self,
        filter: Document,
    ) -> Result<Result<Vec<EventEnvelope>, Vec<EventEnvelope>>, StoreError> {
        let docs = self
            .find(
                &self.inner.events,
                filter,
                Some(doc! { "sequence": 1 }),
                None,
                None,
            )
            .await?;
        let mut events = Vec::with_capacity(docs.len());
        for d in &docs {
            if let Ok(why) = d.get_str("unsequenced") {
                return Err(StoreError::Corrupt {
                    position: 0,
                    reason: format!(
                        "event {} (sequence {}) was set aside as unsequenceable: {why}",
                        d.get("_id").map(ToString::to_string).unwrap_or_default(),
                        d.get("sequence")
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                    ),
                });
            }
            let e = envelope_from_document(d).map_err(|e| corrupt(d, e))?;
            if e.position == 0 {
                return Ok(Err(events));
            }
            events.push(e);
        }
        Ok(Ok(events))
    }

    /// The append of [`EventLog::append`] and [`IdempotencyStore::append_idempotent`].
    async fn append_with(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        validate_batch(aggregate_type, aggregate_id, expected_version, &events)?;
        if events.len() > MAX_APPEND_EVENTS {
            return Err(StoreError::Backend(format!(
                "append to {aggregate_type}/{aggregate_id}: {} events; MongoDB takes at most \
                 {MAX_APPEND_EVENTS} per append (the ids of a batch live in one document)",
                events.len()
            )));
        }
        let recorded_at = Utc::now();
        let record = key
            .map(|k| {
                let r = IdempotencyRecord::for_append(
                    k,
                    aggregate_type,
                    aggregate_id,
                    expected_version,
                    events.len() as u64,
                );
                record_to_document(&r).map_err(|e| backend("idempotency record", e))
            })
            .transpose()?;
        let mut docs = Vec::with_capacity(events.len());
        let mut outbox = Vec::with_capacity(events.len());
        for e in &events {
            let env = e.clone().into_envelope(0, recorded_at);
            docs.push(envelope_to_document(&env).map_err(|err| {
                StoreError::Backend(format!("event {} cannot be stored: {err}", e.event_id))
            })?);
            outbox.push(doc! {
                "_id": uuid_to_bson(e.event_id),
                "published": false,
                "published_at": Bson::Null,
            });
        }
        let ctx = AppendCtx {
            inner: &self.inner,
            aggregate_type,
            aggregate_id,
            expected: expected_version,
            pending_base: recorded_at.timestamp_micros(),
            docs: &docs,
            outbox: &outbox,
            record: record.as_ref(),
        };
        let mut session = self.session().await?;
        let out = run_transaction(&mut session, &ctx, |s, ctx| {
            let ctx: &AppendCtx<'_> = ctx;
            async move { ctx.attempt(s).await }.boxed()
        })
        .await;
        self.inner.clock.observe(&session);
        let passes_seen = self.inner.passes.load(Ordering::SeqCst);
        match out {
            Ok(()) => {}
            Err(RunError::Abort(e)) => return Err(e),
            Err(RunError::Failed(ErrorClass::Conflict, _)) => {
                return Err(StoreError::Conflict {
                    aggregate_type: aggregate_type.to_string(),
                    aggregate_id,
                    expected: expected_version,
                    actual: expected_version + 1,
                })
            }
            Err(RunError::Failed(ErrorClass::UnknownCommitResult, e)) => {
                return Err(StoreError::Backend(format!(
                    "append to {aggregate_type}/{aggregate_id}: commit result unknown after \
                     retries (the events may have been stored): {e}"
                )))
            }
            Err(RunError::Failed(_, e)) => {
                let (code, _) = code_and_message(&e);
                let what = if code == Some(DUPLICATE_KEY) {
                    "duplicate event_id"
                } else {
                    "transaction failed"
                };
                return Err(StoreError::Backend(format!(
                    "append to {aggregate_type}/{aggregate_id}: {what}: {e}"
                )));
            }
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let positions = self.sequence_own(&ids, passes_seen).await?;
        events
            .into_iter()
            .map(|e| {
                let position = positions.get(&e.event_id).copied().ok_or_else(|| {
                    StoreError::Backend(format!("event {} has no position", e.event_id))
                })?;
                Ok(e.into_envelope(position, recorded_at))
            })
            .collect()
    }

    /// Whether any committed event waits for a position.
    async fn has_pending(&self) -> Result<bool, StoreError> {
        let mut session = self.session().await?;
        let found = self
            .inner
            .events
            .find_one(doc! { "pending": { "$exists": true } })
            .projection(doc! { "_id": 1 })
            .hint(mongodb::options::Hint::Name(PENDING_INDEX.into()))
            .session(&mut session)
            .await
            .map_err(|e| backend("find pending events", e))?;
        Ok(found.is_some())
    }
}

/// On a sharded cluster: refuses a database whose [`UNSHARDED`] collections are sharded
/// (see [`check_unsharded`]), reading `config.collections` through the router.
async fn refuse_sharded_event_collections(client: &Client, db: &str) -> Result<(), StoreError> {
    let ids: Vec<String> = UNSHARDED.iter().map(|c| format!("{db}.{c}")).collect();
    let mut cursor = client
        .database("config")
        .collection::<Document>("collections")
        .find(doc! { "_id": { "$in": ids } })
        .await
        .map_err(|e| backend("read config.collections", e))?;
    let mut docs = Vec::new();
    while cursor
        .advance()
        .await
        .map_err(|e| backend("read config.collections", e))?
    {
        docs.push(
            cursor
                .deserialize_current()
                .map_err(|e| backend("read config.collections", e))?,
        );
    }
    check_unsharded(db, &docs).map_err(StoreError::Backend)
}

/// Makes the position counter of a database written before the position log (an older
/// build) the log's batch 0, so positions continue after it; a new database gets no batch 0
/// (the empty log's tip stands for it). Idempotent, safe from several processes at once.
async fn adopt_position_counter(
    db: &Database,
    position_log: &Collection<Document>,
) -> Result<(), StoreError> {
    let counter = db
        .collection::<Document>(COUNTERS)
        .find_one(doc! { "_id": POSITION_COUNTER })
        .await
        .map_err(|e| backend("read the old position counter", e))?;
    let last = counter
        .as_ref()
        .and_then(|d| d.get_i64("last").ok())
        .unwrap_or(0);
    if last <= 0 {
        return Ok(());
    }
    let adopted = position_log
        .insert_one(doc! {
            "_id": 0_i64, "first": 1_i64, "last": last, "ids": [], "materialized": true,
            "adopted_from": COUNTERS,
        })
        .await;
    match adopted {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some(DUPLICATE_KEY) => Ok(()),
        Err(e) => Err(backend("adopt the old position counter", e)),
    }
}

/// The store's identity: the [`STORE_IDENTITY`] document, made with a fresh id and epoch 1 by
/// the first connect (several processes at once: one insert wins, all read it back).
async fn identity_of(db: &Database) -> Result<StoreIdentity, StoreError> {
    let coll = db.collection::<Document>(STORE_IDENTITY);
    let made = coll
        .insert_one(doc! {
            "_id": "identity",
            "store_id": uuid_to_bson(Uuid::new_v4()),
            "epoch": 1_i64,
            "created_at": Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true),
        })
        .await;
    match made {
        Ok(_) => {}
        Err(e) if code(&e) == Some(DUPLICATE_KEY) => {}
        Err(e) => return Err(backend("create the store identity", e)),
    }
    let d = coll
        .find_one(doc! { "_id": "identity" })
        .await
        .map_err(|e| backend("read the store identity", e))?
        .ok_or_else(|| backend("read the store identity", "missing"))?;
    let store_id = uuid_from_bson("store_id", d.get("store_id").unwrap_or(&Bson::Null))
        .map_err(|e| backend("read the store identity", e))?;
    let epoch = mapping::get_u64(&d, "epoch").map_err(|e| backend("read the store identity", e))?;
    Ok(StoreIdentity { store_id, epoch })
}

/// `v` as a BSON 64-bit integer.
fn to_bson_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{v} exceeds i64::MAX")))
}

/// `limit` as a find limit (`None` = unlimited).
fn find_limit(limit: usize) -> Option<i64> {
    i64::try_from(limit).ok()
}

#[async_trait]
impl EventLog for MongoStore {
    /// See [`EventLog::append`] and the [module docs](self): one transaction (version check,
    /// events, outbox records), then sequencer passes until the events have positions.
    /// `recorded_at` is this process's clock when the append started, the same for every event
    /// of the batch.
    ///
    /// # Errors
    /// Additionally to the trait's errors: [`StoreError::Backend`] (nothing written) for a
    /// malformed batch (as the SQLite adapter), an `event_id` that is already stored, or a value
    /// BSON cannot hold; [`StoreError::Backend`] *after* the commit when no sequencer pass
    /// succeeds within 30 s (the events are stored and get positions later).
    async fn append(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.append_with(aggregate_type, aggregate_id, expected_version, events, None)
            .await
    }

    /// See [`EventLog::load`]. Events of the aggregate that are committed but not sequenced
    /// yet (a concurrent or crashed appender) are sequenced first.
    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.load_range(aggregate_type, aggregate_id, 0).await
    }

    /// See [`EventLog::load_after`]: a range read of the aggregate's sequence index, with the
    /// same sequencing of not yet sequenced events as [`EventLog::load`].
    async fn load_after(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.load_range(aggregate_type, aggregate_id, after_sequence)
            .await
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let watermark = self.settled_watermark(false).await? as i64;
        if watermark <= after {
            return Ok(Vec::new());
        }
        self.find_events(
            doc! { "position": { "$gt": after, "$lte": watermark } },
            doc! { "position": 1 },
            find_limit(limit),
        )
        .await
    }

    /// See [`EventLog::head`]: the watermark of the position log (positions are gap-free
    /// and events are never deleted, so the number of events equals the last position; events
    /// set aside as unsequenceable have no position and are not counted). One read of the
    /// log's tip.
    async fn identity(&self) -> Result<StoreIdentity, StoreError> {
        Ok(*self
            .inner
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// See [`EventLog::raise_epoch`]: a compare-and-set on the identity document's epoch,
    /// retried while another process raises it at the same time.
    async fn raise_epoch(&self, above: u64) -> Result<StoreIdentity, StoreError> {
        let coll = self.inner.db.collection::<Document>(STORE_IDENTITY);
        loop {
            let current = identity_of(&self.inner.db).await?;
            let epoch = current.epoch.max(above) + 1;
            let (old, new) = (to_bson_i64(current.epoch)?, to_bson_i64(epoch)?);
            let updated = coll
                .update_one(
                    doc! { "_id": "identity", "epoch": old },
                    doc! { "$set": { "epoch": new } },
                )
                .await
                .map_err(|e| backend("raise the store's epoch", e))?;
            if updated.matched_count == 1 {
                let raised = StoreIdentity { epoch, ..current };
                *self
                    .inner
                    .identity
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = raised;
                return Ok(raised);
            }
        }
    }

    async fn head(&self) -> Result<Head, StoreError> {
        let last = self.tip().await?.watermark();
        Ok(Head {
            position: last,
            events: last,
        })
    }
}

#[async_trait]
impl IdempotencyStore for MongoStore {
    /// See [`IdempotencyStore::append_idempotent`]: the record is inserted in the append's
    /// transaction after the version check (an expired record of the key is deleted first).
    async fn append_idempotent(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
        key: IdempotencyKey,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.append_with(
            aggregate_type,
            aggregate_id,
            expected_version,
            events,
            Some(key),
        )
        .await
    }

    async fn idempotency_record(
        &self,
        key: &str,
        now: chrono::DateTime<Utc>,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let found = self
            .find(
                &self.inner.idempotency,
                doc! { "_id": key, "expires_at": { "$gt": idempotency::bson_date(now) } },
                None,
                Some(1),
                None,
            )
            .await?;
        found
            .first()
            .map(|d| {
                record_from_document(d)
                    .map_err(|e| backend(&format!("idempotency record {key:?}"), e))
            })
            .transpose()
    }

    async fn put_idempotency_record(
        &self,
        record: IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError> {
        let mut d = record_to_document(&record).map_err(|e| backend("idempotency record", e))?;
        d.remove("_id");
        let created = idempotency::bson_date(record.key.created_at);
        self.inner
            .idempotency
            .delete_one(doc! { "_id": &record.key.key, "expires_at": { "$lte": created.clone() } })
            .await
            .map_err(|e| backend("expire idempotency record", e))?;
        // Insert if absent; an existing live record is kept and returned.
        let stored = self
            .inner
            .idempotency
            .find_one_and_update(doc! { "_id": &record.key.key }, doc! { "$setOnInsert": d })
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| backend("put idempotency record", e))?
            .ok_or_else(|| backend("put idempotency record", "no document returned"))?;
        record_from_document(&stored).map_err(|e| backend("idempotency record", e))
    }

    async fn purge_idempotency_records(
        &self,
        now: chrono::DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let r = self
            .inner
            .idempotency
            .delete_many(doc! { "expires_at": { "$lte": idempotency::bson_date(now) } })
            .await
            .map_err(|e| backend("purge idempotency records", e))?;
        Ok(r.deleted_count)
    }
}

#[async_trait]
impl OutboxStore for MongoStore {
    /// See [`OutboxStore::outbox_pending`]. First sequences committed events that have no
    /// position yet (recovering appenders that died after their commit), so the relay never
    /// waits for them longer than one poll.
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let watermark = self.settled_watermark(true).await? as i64;
        let records = self
            .find(
                &self.inner.outbox,
                doc! { "published": false, "position": { "$gt": 0_i64, "$lte": watermark } },
                Some(doc! { "published": 1, "position": 1 }),
                find_limit(limit),
                Some(doc! { "_id": 0, "position": 1 }),
            )
            .await?;
        let positions: Vec<i64> = records
            .iter()
            .map(|d| {
                d.get_i64("position")
                    .map_err(|e| backend("outbox record", e))
            })
            .collect::<Result<_, _>>()?;
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        // A range read of the position index (the relay marks records in order, so the
        // unpublished ones are one run); `$in` over positions is a collection scan on some
        // servers (SecantusDB: about 1 s at 20,000 events).
        let (first, last) = (positions[0], positions[positions.len() - 1]);
        let wanted: HashSet<i64> = positions.iter().copied().collect();
        let events: Vec<EventEnvelope> = self
            .find_events(
                doc! { "position": { "$gte": first, "$lte": last } },
                doc! { "position": 1 },
                None,
            )
            .await?
            .into_iter()
            .filter(|e| wanted.contains(&(e.position as i64)))
            .collect();
        if events.len() != positions.len() {
            let found: HashSet<u64> = events.iter().map(|e| e.position).collect();
            let missing = positions
                .iter()
                .map(|&p| p as u64)
                .find(|p| !found.contains(p))
                .unwrap_or_default();
            return Err(StoreError::Corrupt {
                position: missing,
                reason: "outbox record without its event".into(),
            });
        }
        Ok(events)
    }

    async fn outbox_mark_published(&self, positions: &[u64]) -> Result<(), StoreError> {
        // Positions beyond i64::MAX cannot exist; ignore them like any unknown position.
        let positions: Vec<i64> = positions
            .iter()
            .filter_map(|&p| i64::try_from(p).ok())
            .collect();
        if positions.is_empty() {
            return Ok(());
        }
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
        let mut session = self.session().await?;
        self.inner
            .outbox
            .update_many(
                doc! { "published": false, "position": { "$in": positions } },
                doc! { "$set": { "published": true, "published_at": now } },
            )
            .session(&mut session)
            .await
            .map_err(|e| backend("mark outbox records published", e))?;
        self.inner.clock.observe(&session);
        Ok(())
    }

    async fn outbox_backlog(&self) -> Result<u64, StoreError> {
        let mut session = self.session().await?;
        let n = self
            .inner
            .outbox
            .count_documents(doc! { "published": false, "position": { "$gt": 0_i64 } })
            .session(&mut session)
            .await
            .map_err(|e| backend("count outbox backlog", e))?;
        Ok(n)
    }
}

#[async_trait]
impl SnapshotStore for MongoStore {
    /// See [`SnapshotStore::load_snapshot`]: one find on the unique key index (causally consistent,
    /// so a handle reads its own saves).
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        let found = self
            .find(
                &self.inner.snapshots,
                snapshot_key_filter(aggregate_type, aggregate_id),
                None,
                Some(1),
                Some(doc! { "_id": 0 }),
            )
            .await?;
        found
            .first()
            .map(|d| {
                snapshot_from_document(d).map_err(|e| {
                    backend(&format!("snapshot of {aggregate_type}/{aggregate_id}"), e)
                })
            })
            .transpose()
    }

    /// See [`SnapshotStore::save_snapshot`] and the module `snapshots`: one upsert whose filter
    /// enforces [`StoredSnapshot::replaces`]; a duplicate key on the unique index means the
    /// stored snapshot was kept (after one retry, for a concurrent first save).
    async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<bool, StoreError> {
        let what = || {
            format!(
                "save snapshot of {}/{}",
                snapshot.aggregate_type, snapshot.aggregate_id
            )
        };
        let filter = snapshot_save_filter(snapshot).map_err(|e| backend(&what(), e))?;
        let update = snapshot_update(snapshot).map_err(|e| backend(&what(), e))?;
        for attempt in 1..=2 {
            let mut session = self.session().await?;
            let result = self
                .inner
                .snapshots
                .update_one(filter.clone(), update.clone())
                .upsert(true)
                .session(&mut session)
                .await;
            self.inner.clock.observe(&session);
            match result {
                Ok(r) => return Ok(r.matched_count > 0 || r.upserted_id.is_some()),
                Err(e) if code(&e) == Some(DUPLICATE_KEY) && attempt == 1 => continue,
                Err(e) if code(&e) == Some(DUPLICATE_KEY) => return Ok(false),
                Err(e) => return Err(backend(&what(), e)),
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::sample_events;

    #[test]
    fn malformed_batches_are_rejected_before_any_io() {
        let id = Uuid::new_v4();
        assert!(validate_batch("user", id, 0, &sample_events(id, 1, 3)).is_ok());
        assert!(validate_batch("user", id, 2, &sample_events(id, 3, 1)).is_ok());
        let mut gap = sample_events(id, 1, 2);
        gap[1].sequence = 3;
        let mut other = sample_events(id, 1, 2);
        other[0].aggregate_id = Uuid::new_v4();
        for batch in [sample_events(id, 2, 2), gap, other] {
            assert!(matches!(
                validate_batch("user", id, 0, &batch),
                Err(StoreError::Backend(_))
            ));
        }
        assert!(validate_batch("content", id, 0, &sample_events(id, 1, 1)).is_err());
        assert!(validate_batch("user", id, u64::MAX, &sample_events(id, 0, 1)).is_err());
    }

    #[test]
    fn find_limit_maps_usize_max_to_unlimited() {
        assert_eq!(find_limit(3), Some(3));
        assert_eq!(find_limit(usize::MAX), None);
    }

    #[tokio::test]
    async fn connect_rejects_an_invalid_uri_without_a_server() {
        let err = MongoStore::connect("postgres://localhost", "x")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Backend(m) if m.contains("parse MongoDB URI")),
            "{err}"
        );
    }
}
