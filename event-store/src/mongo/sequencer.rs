//! Global positions on MongoDB: the **position log**, a chain of batch documents.
//!
//! An append commits its events *unsequenced* (with a provisional key `pending`, see the
//! [module docs](super)). A **sequencer pass** turns the oldest pending events into the next
//! batch of the log:
//!
//! 1. read the log's **tip** (its highest batch `k - 1`); if the tip is not yet
//!    *materialized*, materialize it first (below);
//! 2. in a read-only snapshot transaction, read up to [`SEQUENCE_BATCH`] pending events in
//!    `pending` order (each append's events then brought together, [`appends_together`], so an
//!    append gets consecutive positions) and which of them have an outbox record; set aside (with an error log
//!    and the metric [`METRIC_UNSEQUENCED`]) any that can never be sequenced;
//! 3. **insert** batch `k` = `{_id: k, first: last(k-1) + 1, last, ids: [event ids in order]}`.
//!    The insert is the whole decision: `_id` is unique, so of all the passes (in every
//!    process) that read the same tip exactly one inserts batch `k`; the others get a duplicate
//!    key and start again from the new tip;
//! 4. **materialize** batch `k`: set `position` on its events and outbox records (removing
//!    `pending`), in chunks, idempotently; read the chunk back and check that every document
//!    carries its position (an update that reports success may still have skipped a document
//!    under concurrent passes, as SecantusDB 0.7's was seen to do; the batch then stays
//!    unflagged and is materialized again), then flag the batch `materialized`.
//!
//! No pass holds a lock or an open write transaction between steps, and nothing a pass writes
//! is written by every appender: a process SIGKILLed or SIGSTOPped anywhere in a pass delays no
//! other (the next pass anywhere materializes a tip it left half done; a stale pass that wakes
//! up gets a duplicate key). Readers see positions only up to the **watermark**: the last
//! position of the highest materialized batch (every batch below the tip was materialized
//! before the tip was inserted), so positions never appear out of order, even while a batch is
//! half materialized.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use mongodb::bson::{doc, Bson, Document};
use mongodb::{ClientSession, Collection};
use uuid::Uuid;

use super::mapping::{envelope_from_document, uuid_from_bson};
use super::{backend, Inner};
use crate::StoreError;
use tektree_domain::EventEnvelope;
use tektree_mongo::{backoff, code, jitter, DUPLICATE_KEY};

/// The position-log collection: one document per sequencer batch.
pub const POSITION_LOG: &str = "position_log";
/// Most pending events one pass reads (a single append larger than this is sequenced whole in
/// one batch of its own).
pub const SEQUENCE_BATCH: usize = 512;
/// Most events one append may hold on MongoDB: a batch's event ids live in one log document
/// (16 MiB at most; 100,000 ids take about 2.2 MiB).
pub const MAX_APPEND_EVENTS: usize = 100_000;
/// Events per materializing update (`$indexOfArray` over the chunk is quadratic in its size).
const MATERIALIZE_CHUNK: usize = 512;
/// How long one pass keeps retrying driver errors (each step is idempotent) before failing.
const PASS_RETRY_TIME: Duration = Duration::from_secs(30);

/// Counter of committed events set aside because they can never be sequenced (label
/// `reason`: `event_id`, `outbox`, `envelope`). Each is also logged at error level with its
/// `_id`; the events stay in `events` with an `unsequenced` field saying why.
pub const METRIC_UNSEQUENCED: &str = "tektree_store_unsequenced_events_total";
/// Counter of sequencer passes that lost the race for the next batch to another pass.
pub const METRIC_PASS_LOST: &str = "tektree_store_sequencer_lost_races_total";

/// The highest batch of the position log.
#[derive(Debug, Clone, PartialEq)]
pub struct Tip {
    /// Batch number (`_id`), 0 for an empty log.
    pub number: i64,
    /// First position of the batch.
    pub first: i64,
    /// Last position of the batch (`first - 1` for an empty batch).
    pub last: i64,
    /// The batch's event ids, in position order.
    pub ids: Vec<Bson>,
    /// Whether every event and outbox record of the batch carries its position.
    pub materialized: bool,
}

impl Tip {
    /// The tip of an empty log.
    fn empty() -> Tip {
        Tip {
            number: 0,
            first: 1,
            last: 0,
            ids: Vec::new(),
            materialized: true,
        }
    }

    /// Reads a log document.
    fn from_document(d: &Document) -> Result<Tip, StoreError> {
        let bad = |what: &str| backend("position log", format!("batch {d}: {what}"));
        let ids = match d.get("ids") {
            Some(Bson::Array(a)) => a.clone(),
            _ => return Err(bad("no ids")),
        };
        Ok(Tip {
            number: d.get_i64("_id").map_err(|_| bad("_id"))?,
            first: d.get_i64("first").map_err(|_| bad("first"))?,
            last: d.get_i64("last").map_err(|_| bad("last"))?,
            ids,
            materialized: d.get_bool("materialized").unwrap_or(false),
        })
    }

    /// The last position readers may see: every position up to it is materialized.
    pub fn watermark(&self) -> u64 {
        let w = if self.materialized {
            self.last
        } else {
            self.first - 1
        };
        w.max(0) as u64
    }

    /// Positions of the batch's events.
    fn assigned(&self) -> Result<Vec<(Uuid, u64)>, StoreError> {
        self.ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let p = (self.first + i as i64) as u64;
                uuid_from_bson("_id", id)
                    .map(|u| (u, p))
                    .map_err(|e| StoreError::Corrupt {
                        position: p,
                        reason: e.to_string(),
                    })
            })
            .collect()
    }
}

/// What a pass read in its snapshot: the pending events it may sequence and those it must set
/// aside (`_id`, reason, detail).
#[derive(Debug, Default)]
struct PendingRead {
    ids: Vec<Bson>,
    set_aside: Vec<(Bson, &'static str, String)>,
}

/// The envelope of a pending event, or why it can never be sequenced: its `_id` is not a UUID,
/// it has no outbox record, or it does not decode as an envelope.
fn unsequenceable(
    d: &Document,
    with_outbox: &HashSet<Vec<u8>>,
) -> Result<EventEnvelope, (&'static str, String)> {
    let id = d.get("_id").cloned().unwrap_or(Bson::Null);
    if let Err(e) = uuid_from_bson("_id", &id) {
        return Err(("event_id", e.to_string()));
    }
    if !with_outbox.contains(&key_bytes(&id)) {
        return Err(("outbox", "no outbox record".into()));
    }
    envelope_from_document(d).map_err(|e| ("envelope", e.to_string()))
}

/// The aggregates of `batch` (pending events in `pending` order) whose events may be sequenced
/// now: their sequences in the batch are contiguous, and they are not among `missed` (the
/// aggregates of pending events that the batch's read did not return, see
/// `missed_aggregates`). Any other aggregate may have lost an earlier event to a commit racing
/// the read and waits for the next pass, so no aggregate's order can break.
pub fn ordered_aggregates(
    batch: &[(Bson, EventEnvelope)],
    missed: &HashSet<(String, Uuid)>,
) -> HashSet<(String, Uuid)> {
    let mut seqs: HashMap<(String, Uuid), Vec<u64>> = HashMap::new();
    for (_, e) in batch {
        seqs.entry((e.aggregate_type.clone(), e.aggregate_id))
            .or_default()
            .push(e.sequence);
    }
    seqs.into_iter()
        .filter(|(k, s)| s.windows(2).all(|w| w[1] == w[0] + 1) && !missed.contains(k))
        .map(|(k, _)| k)
        .collect()
}

/// The hint for queries of the pending queue: its partial index (a planner may otherwise scan
/// the whole collection, as SecantusDB's does for `$exists` on a partial index).
fn pending_index() -> mongodb::options::Hint {
    mongodb::options::Hint::Name(super::PENDING_INDEX.into())
}

/// A hashable form of a BSON value (its debug rendering).
fn key_bytes(b: &Bson) -> Vec<u8> {
    format!("{b:?}").into_bytes()
}

/// The ids of a pass's batch, from the pending events `rows` (sorted by `pending`, at most
/// `limit`):
/// - fewer than `limit`: all of them;
/// - otherwise, when the first row's append is not wholly in `rows`: `None` — the caller
///   sequences that append alone and whole (an append is never split);
/// - otherwise the rows of the appends that are wholly in `rows` (the appends cut off at the
///   limit wait for the next pass; their aggregates' later appends have higher keys, so they
///   are beyond the limit too, and per-aggregate order holds).
///
/// An append is identified by `pending_of` (its first event id) and has `pending_n` events;
/// a document without those fields counts as a whole append of one.
pub fn batch_ids(rows: &[Document], limit: usize) -> Option<Vec<Bson>> {
    let all = || rows.iter().filter_map(|d| d.get("_id").cloned()).collect();
    if rows.len() < limit {
        return Some(all());
    }
    let key = |d: &Document| key_bytes(d.get("pending_of").unwrap_or(&Bson::Null));
    let mut seen: HashMap<Vec<u8>, i64> = HashMap::new();
    for d in rows {
        *seen.entry(key(d)).or_default() += 1;
    }
    let whole = |d: &Document| d.get_i64("pending_n").map_or(true, |n| seen[&key(d)] >= n);
    if !rows.first().is_some_and(whole) {
        return None;
    }
    Some(
        rows.iter()
            .filter(|d| whole(d))
            .filter_map(|d| d.get("_id").cloned())
            .collect(),
    )
}

/// `rows` (pending events in `pending` order) with each append's events brought together, so
/// that an append gets consecutive positions: appends in the order of their first event, each
/// append's events in their order. `pending` comes from each appender's clock, so two appends
/// committed within microseconds of each other interleave in it (seen in `mongo_processes`: an
/// event of another process's append between the events of one append). An aggregate keeps its
/// order: its later append's keys are all above its earlier append's. An event without
/// `pending_of` is an append of its own.
pub fn appends_together(rows: Vec<Document>) -> Vec<Document> {
    let mut order: Vec<Vec<u8>> = Vec::new();
    let mut groups: HashMap<Vec<u8>, Vec<Document>> = HashMap::new();
    for d in rows {
        let key = key_bytes(d.get("pending_of").or(d.get("_id")).unwrap_or(&Bson::Null));
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(d);
    }
    order
        .into_iter()
        .flat_map(|k| groups.remove(&k).unwrap_or_default())
        .collect()
}

impl Inner {
    /// The log's tip (the empty tip when the log is empty), found by point reads of `_id`
    /// starting at the highest batch this handle has seen: gallop up (`+1, +2, +4, …`) while
    /// batches exist, then bisect. Batch numbers form a prefix `1..=k` (batch `k + 1` is only
    /// inserted after batch `k`), which makes the search exact. A sorted `limit 1` read would
    /// do on mongod, but some servers scan the whole log for it (SecantusDB: 0.7 s at 20,000
    /// batches); a point read is one index lookup, and a busy handle needs two or three.
    pub(super) async fn tip(&self, s: &mut ClientSession) -> Result<Tip, StoreError> {
        let start = self.tip_seen.load(Ordering::Relaxed);
        let mut low = match self.batch(s, start).await? {
            Some(d) => (start, Some(d)),
            // Batch 0 exists only in adopted databases; below it, the empty log.
            None if start == 0 => (0, None),
            // Cannot happen (batches are never deleted); search from the bottom.
            None => (0, self.batch(s, 0).await?),
        };
        let mut step = 1i64;
        let high = loop {
            match self.batch(s, low.0 + step).await? {
                Some(d) => {
                    low = (low.0 + step, Some(d));
                    step = step.saturating_mul(2);
                }
                None => break low.0 + step,
            }
        };
        let mut high = high;
        while high - low.0 > 1 {
            let mid = low.0 + (high - low.0) / 2;
            match self.batch(s, mid).await? {
                Some(d) => low = (mid, Some(d)),
                None => high = mid,
            }
        }
        let tip = match low.1 {
            Some(d) => Tip::from_document(&d)?,
            None => Tip::empty(),
        };
        self.tip_seen.fetch_max(tip.number, Ordering::Relaxed);
        Ok(tip)
    }

    /// Batch `number` of the log, if it exists.
    async fn batch(
        &self,
        s: &mut ClientSession,
        number: i64,
    ) -> Result<Option<Document>, StoreError> {
        self.position_log
            .find_one(doc! { "_id": number })
            .session(s)
            .await
            .map_err(|e| backend("read the position log", e))
    }

    /// Sets the positions of `tip`'s events and outbox records (those that have none yet),
    /// then flags the batch materialized. Idempotent; any pass may finish another's batch.
    pub(super) async fn materialize(
        &self,
        s: &mut ClientSession,
        tip: &Tip,
    ) -> Result<(), StoreError> {
        for (c, chunk) in tip.ids.chunks(MATERIALIZE_CHUNK).enumerate() {
            let first = tip.first + (c * MATERIALIZE_CHUNK) as i64;
            let list = Bson::Array(chunk.to_vec());
            let position = doc! {
                "$add": [first, { "$indexOfArray": [{ "$literal": list.clone() }, "$_id"] }],
            };
            let unset = doc! { "_id": { "$in": list.clone() }, "position": { "$exists": false } };
            set_positions(&self.events, s, unset.clone(), &position, true).await?;
            set_positions(&self.outbox, s, unset, &position, false).await?;
            for (coll, what) in [(&self.events, "events"), (&self.outbox, "outbox records")] {
                let missing = unmaterialized(coll, s, chunk, first).await?;
                if missing > 0 {
                    tracing::warn!(
                        batch = tip.number,
                        missing,
                        what,
                        "materializing update skipped documents; materializing the batch again"
                    );
                    // The update reported success yet skipped documents (seen on SecantusDB
                    // under concurrent passes): the batch stays unflagged, so the retried pass
                    // (or any other) materializes it again before reading pending events.
                    return Err(backend(
                        "materialize positions",
                        format!(
                            "batch {}: {missing} {what} left without a position",
                            tip.number
                        ),
                    ));
                }
            }
        }
        self.position_log
            .update_one(
                doc! { "_id": tip.number },
                doc! { "$set": { "materialized": true } },
            )
            .session(s)
            .await
            .map_err(|e| backend("flag a position-log batch", e))?;
        Ok(())
    }

    /// Reads the pending events a pass may sequence (see [`batch_ids`]) and those to set
    /// aside, then keeps only aggregates whose order is proven (see [`ordered_aggregates`]).
    ///
    /// Plain reads, no transaction: a read that misses a pending event (a commit racing the
    /// scan, as a yielding index scan allows) cannot break per-aggregate order, because a
    /// second read finds the aggregates of such events and they wait for the next pass.
    async fn read_pending(&self, s: &mut ClientSession) -> Result<PendingRead, StoreError> {
        let read = |e| backend("read pending events", e);
        let rows = collect(
            self.events
                .find(doc! { "pending": { "$exists": true } })
                .sort(doc! { "pending": 1 })
                .hint(pending_index())
                .limit(SEQUENCE_BATCH as i64)
                .batch_size(SEQUENCE_BATCH as u32)
                .session(&mut *s)
                .await
                .map_err(read)?,
            s,
        )
        .await
        .map_err(read)?;
        let rows = match batch_ids(&rows, SEQUENCE_BATCH) {
            Some(ids) => {
                let keep: HashSet<Vec<u8>> = ids.iter().map(key_bytes).collect();
                rows.into_iter()
                    .filter(|d| keep.contains(&key_bytes(d.get("_id").unwrap_or(&Bson::Null))))
                    .collect::<Vec<_>>()
            }
            None => {
                // The first append is larger than a batch: sequence it alone, whole.
                let of = rows[0].get("pending_of").cloned().unwrap_or(Bson::Null);
                collect(
                    self.events
                        .find(doc! { "pending": { "$exists": true }, "pending_of": of })
                        .sort(doc! { "pending": 1 })
                        .hint(pending_index())
                        .session(&mut *s)
                        .await
                        .map_err(read)?,
                    s,
                )
                .await
                .map_err(read)?
            }
        };
        let rows = appends_together(rows);
        let ids: Vec<Bson> = rows.iter().filter_map(|d| d.get("_id").cloned()).collect();
        let mut with_outbox = HashSet::new();
        for chunk in ids.chunks(MATERIALIZE_CHUNK) {
            let found = by_ids(&self.outbox, s, chunk, doc! { "_id": 1 })
                .await
                .map_err(read)?;
            with_outbox.extend(found.iter().filter_map(|d| d.get("_id")).map(key_bytes));
        }
        let mut out = PendingRead::default();
        let mut good = Vec::new();
        for d in &rows {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            match unsequenceable(d, &with_outbox) {
                Ok(env) => good.push((id, env)),
                Err((reason, detail)) => out.set_aside.push((id, reason, detail)),
            }
        }
        let max_key = rows.iter().filter_map(|d| d.get_i64("pending").ok()).max();
        let seen: HashSet<Vec<u8>> = ids.iter().map(key_bytes).collect();
        let missed = match max_key {
            Some(k) => self.missed_aggregates(s, k, &seen).await?,
            None => HashSet::new(),
        };
        let ordered = ordered_aggregates(&good, &missed);
        out.ids = good
            .into_iter()
            .filter(|(_, e)| ordered.contains(&(e.aggregate_type.clone(), e.aggregate_id)))
            .map(|(id, _)| id)
            .collect();
        Ok(out)
    }

    /// The aggregates of pending events with a key up to `max_key` that are not in `seen`: a
    /// second read of the pending index, started after the first one ended. An event committed
    /// before the first read ended cannot be missed by this one, so an aggregate whose earlier
    /// event the first read missed (a commit racing the scan) shows up here.
    async fn missed_aggregates(
        &self,
        s: &mut ClientSession,
        max_key: i64,
        seen: &HashSet<Vec<u8>>,
    ) -> Result<HashSet<(String, Uuid)>, StoreError> {
        let again = collect(
            self.events
                .find(doc! { "pending": { "$exists": true, "$lte": max_key } })
                .sort(doc! { "pending": 1 })
                .hint(pending_index())
                .projection(doc! { "aggregate_type": 1, "aggregate_id": 1 })
                .batch_size(SEQUENCE_BATCH as u32)
                .session(&mut *s)
                .await
                .map_err(|e| backend("re-read pending events", e))?,
            s,
        )
        .await
        .map_err(|e| backend("re-read pending events", e))?;
        Ok(again
            .iter()
            .filter(|d| !seen.contains(&key_bytes(d.get("_id").unwrap_or(&Bson::Null))))
            .filter_map(|d| {
                let t = d.get_str("aggregate_type").ok()?;
                let id = uuid_from_bson("aggregate_id", d.get("aggregate_id")?).ok()?;
                Some((t.to_string(), id))
            })
            .collect())
    }

    /// Takes events that can never be sequenced out of the queue (`pending` removed,
    /// `unsequenced` set), with an error log and [`METRIC_UNSEQUENCED`] each.
    async fn set_aside(
        &self,
        s: &mut ClientSession,
        events: &[(Bson, &'static str, String)],
    ) -> Result<(), StoreError> {
        for (id, reason, detail) in events {
            let r = self
                .events
                .update_one(
                    doc! { "_id": id.clone(), "pending": { "$exists": true } },
                    doc! {
                        "$set": { "unsequenced": format!("{reason}: {detail}") },
                        "$unset": { "pending": "", "pending_of": "", "pending_n": "" },
                    },
                )
                .session(&mut *s)
                .await
                .map_err(|e| backend("set aside an unsequenceable event", e))?;
            if r.modified_count > 0 {
                metrics::counter!(METRIC_UNSEQUENCED, "reason" => *reason).increment(1);
                tracing::error!(
                    event = %id,
                    reason,
                    detail = %detail,
                    "committed event cannot be sequenced: set aside (field `unsequenced`); \
                     it gets no position and is never published"
                );
            }
        }
        Ok(())
    }

    /// One sequencer pass (see the module docs): the positions it assigned, empty when nothing
    /// was pending. Driver errors are retried from the top (every step is idempotent) for up
    /// to 30 s.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the server keeps failing for 30 s, [`StoreError::Corrupt`]
    /// for a log document this build cannot read.
    pub(super) async fn pass(&self, s: &mut ClientSession) -> Result<Vec<(Uuid, u64)>, StoreError> {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.pass_attempt(s).await {
                Ok(Some(assigned)) => return Ok(assigned),
                Ok(None) => {
                    metrics::counter!(METRIC_PASS_LOST).increment(1);
                    tokio::time::sleep(backoff(attempt.min(4), jitter())).await;
                }
                Err(e @ StoreError::Corrupt { .. }) => return Err(e),
                Err(e) if started.elapsed() >= PASS_RETRY_TIME => return Err(e),
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "retrying sequencer pass");
                    tokio::time::sleep(backoff(attempt.min(8), jitter())).await;
                }
            }
        }
    }

    /// One attempt: `None` when another pass inserted the next batch first.
    async fn pass_attempt(
        &self,
        s: &mut ClientSession,
    ) -> Result<Option<Vec<(Uuid, u64)>>, StoreError> {
        let tip = self.tip(s).await?;
        if !tip.materialized {
            self.materialize(s, &tip).await?;
        }
        let read = self.read_pending(s).await?;
        if !read.set_aside.is_empty() {
            self.set_aside(s, &read.set_aside).await?;
        }
        if read.ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let n = read.ids.len() as i64;
        let batch = Tip {
            number: tip.number + 1,
            first: tip.last + 1,
            last: tip.last + n,
            ids: read.ids,
            materialized: false,
        };
        let inserted = self
            .position_log
            .insert_one(doc! {
                "_id": batch.number,
                "first": batch.first,
                "last": batch.last,
                "ids": batch.ids.clone(),
                "materialized": false,
                "at": Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true),
            })
            .session(&mut *s)
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if code(&e) == Some(DUPLICATE_KEY) => return Ok(None),
            Err(e) => return Err(backend("insert a position-log batch", e)),
        }
        self.materialize(s, &batch).await?;
        tracing::trace!(batch = batch.number, events = n, "sequenced");
        batch.assigned().map(Some)
    }
}

/// Sets `position` (and, on events, removes the pending fields) on the documents of `filter`.
async fn set_positions(
    coll: &Collection<Document>,
    s: &mut ClientSession,
    filter: Document,
    position: &Document,
    events: bool,
) -> Result<(), StoreError> {
    let mut pipeline = vec![doc! { "$set": { "position": position.clone() } }];
    if events {
        pipeline.push(doc! { "$unset": ["pending", "pending_of", "pending_n"] });
    }
    coll.update_many(filter, pipeline)
        .session(s)
        .await
        .map_err(|e| backend("materialize positions", e))?;
    Ok(())
}

/// How many documents of `chunk` (ids in position order from `first`) in `coll` have no
/// position yet. A document carrying a *different* position is a corrupt log (an event in two
/// batches): [`StoreError::Corrupt`], never overwritten.
async fn unmaterialized(
    coll: &Collection<Document>,
    s: &mut ClientSession,
    chunk: &[Bson],
    first: i64,
) -> Result<usize, StoreError> {
    let docs = by_ids(coll, s, chunk, doc! { "_id": 1, "position": 1 })
        .await
        .map_err(|e| backend("check materialized positions", e))?;
    let at: HashMap<Vec<u8>, i64> = docs
        .iter()
        .filter_map(|d| {
            let p = super::mapping::get_u64(d, "position").ok()?;
            Some((key_bytes(d.get("_id")?), p as i64))
        })
        .collect();
    let mut missing = 0;
    for (i, id) in chunk.iter().enumerate() {
        let want = first + i as i64;
        match at.get(&key_bytes(id)) {
            None => missing += 1,
            Some(&p) if p == want => {}
            Some(&p) => {
                return Err(StoreError::Corrupt {
                    position: want as u64,
                    reason: format!(
                        "{} {id} of position {want} already carries position {p} \
                         (an event in two position-log batches)",
                        coll.name()
                    ),
                })
            }
        }
    }
    Ok(missing)
}

/// The documents of `coll` with the ids `chunk` (at most [`MATERIALIZE_CHUNK`]), projected.
async fn by_ids(
    coll: &Collection<Document>,
    s: &mut ClientSession,
    chunk: &[Bson],
    projection: Document,
) -> Result<Vec<Document>, mongodb::error::Error> {
    let cursor = coll
        .find(doc! { "_id": { "$in": chunk.to_vec() } })
        .projection(projection)
        .batch_size(MATERIALIZE_CHUNK as u32)
        .session(&mut *s)
        .await?;
    collect(cursor, s).await
}

/// Drains a cursor of a session.
async fn collect(
    mut cursor: mongodb::SessionCursor<Document>,
    s: &mut ClientSession,
) -> Result<Vec<Document>, mongodb::error::Error> {
    let mut out = Vec::new();
    while let Some(d) = cursor.next(&mut *s).await {
        out.push(d?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: Vec<Bson>) -> Vec<i32> {
        v.iter().map(|b| b.as_i32().unwrap()).collect()
    }

    fn row(id: i32, of: i32, n: i64) -> Document {
        doc! { "_id": id, "pending_of": of, "pending_n": n }
    }

    #[test]
    fn below_the_limit_every_pending_event_is_taken() {
        let rows = vec![row(1, 1, 2), row(2, 1, 2), row(3, 3, 2)];
        // Append 3 shows one of its two events only if its commit is not in the snapshot,
        // which is impossible (one transaction); below the limit nothing is cut.
        assert_eq!(ids(batch_ids(&rows, 4).unwrap()), [1, 2, 3]);
        assert!(batch_ids(&[], 2).unwrap().is_empty());
    }

    #[test]
    fn at_the_limit_appends_cut_off_wait_for_the_next_pass() {
        let rows = vec![row(1, 1, 2), row(3, 3, 2), row(2, 1, 2), row(5, 5, 1)];
        assert_eq!(ids(batch_ids(&rows, 4).unwrap()), [1, 2, 5]);
        // Documents without the batch fields count as whole appends of one.
        let rows = vec![doc! { "_id": 7 }, row(8, 8, 3)];
        assert_eq!(ids(batch_ids(&rows, 2).unwrap()), [7]);
    }

    #[test]
    fn an_append_larger_than_a_batch_is_never_split() {
        // The first append is cut off: the caller sequences it alone and whole.
        let rows = vec![row(1, 1, 9), row(2, 1, 9)];
        assert_eq!(batch_ids(&rows, 2), None);
        let rows = vec![row(1, 1, 3), row(4, 4, 1), row(2, 1, 3)];
        assert_eq!(batch_ids(&rows, 3), None);
    }

    #[test]
    fn an_append_gets_consecutive_positions_however_the_clocks_interleave() {
        // Appends 1 (3 events) and 4 (2 events) interleave in `pending` order; 9 has no
        // `pending_of` and counts as an append of its own.
        let rows = vec![
            row(1, 1, 3),
            row(2, 1, 3),
            row(4, 4, 2),
            doc! { "_id": 9 },
            row(3, 1, 3),
            row(5, 4, 2),
        ];
        let ids: Vec<i32> = appends_together(rows)
            .iter()
            .map(|d| d.get_i32("_id").unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 9]);
        assert!(appends_together(vec![]).is_empty());
    }

    #[test]
    fn the_watermark_stops_below_a_batch_that_is_not_materialized() {
        let mut tip = Tip {
            number: 3,
            first: 11,
            last: 15,
            ids: vec![],
            materialized: false,
        };
        assert_eq!(tip.watermark(), 10);
        tip.materialized = true;
        assert_eq!(tip.watermark(), 15);
        assert_eq!(Tip::empty().watermark(), 0);
    }

    #[test]
    fn unsequenceable_events_are_named_with_their_reason() {
        let good = Uuid::new_v4();
        let env = crate::conformance::sample_event(good, 1).into_envelope(0, Utc::now());
        let d = super::super::envelope_to_document(&env).unwrap();
        let mut outbox = HashSet::new();
        assert_eq!(unsequenceable(&d, &outbox).unwrap_err().0, "outbox");
        outbox.insert(key_bytes(d.get("_id").unwrap()));
        assert_eq!(unsequenceable(&d, &outbox), Ok(env));
        let mut bad_id = d.clone();
        bad_id.insert("_id", "not-a-uuid");
        outbox.insert(key_bytes(bad_id.get("_id").unwrap()));
        assert_eq!(unsequenceable(&bad_id, &outbox).unwrap_err().0, "event_id");
        let mut bad_env = d.clone();
        bad_env.remove("event_type");
        assert_eq!(unsequenceable(&bad_env, &outbox).unwrap_err().0, "envelope");
    }

    #[test]
    fn an_aggregate_waits_when_a_second_read_finds_it_missed_or_holed() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let ev = |id: Uuid, seq: u64| {
            let e = crate::conformance::sample_event(id, seq).into_envelope(0, Utc::now());
            (Bson::Null, e)
        };
        let t = crate::conformance::SAMPLE_AGGREGATE_TYPE.to_string();
        // c's event 6 was pending but not returned by the first read: c waits; a and b go.
        let batch = vec![ev(a, 1), ev(b, 4), ev(a, 2), ev(b, 5), ev(c, 7)];
        let missed = HashSet::from([(t.clone(), c)]);
        assert_eq!(
            ordered_aggregates(&batch, &missed),
            HashSet::from([(t.clone(), a), (t.clone(), b)])
        );
        // A hole inside the batch (sequence 2 missing) makes the aggregate wait too.
        assert!(ordered_aggregates(&[ev(a, 1), ev(a, 3)], &HashSet::new()).is_empty());
        assert_eq!(ordered_aggregates(&batch, &HashSet::new()).len(), 3);
    }
}
