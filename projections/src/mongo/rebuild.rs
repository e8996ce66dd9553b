//! Rebuilds beside the live read model (blue/green) in MongoDB: [`REBUILD`] documents and the
//! begin, switch, cancel and status operations (the design is in the [module docs](super)).

use futures::FutureExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::ClientSession;

use super::generations::{
    collection_name, generation_of, live_generation, projection_collections, rebuild_consumer, Head,
};
use super::mapping::{APPLIED, CHECKPOINT, GUARD, REBUILD};
use super::{
    backend, collect, corrupt, ensure_collection, indexes_of, txn, untx, Inner, MongoReadModels,
    TxError,
};
use crate::{Projection, ReadModelError, RebuildPhase, RebuildStatus, RebuildSwitch};

/// How often [`MongoReadModels::begin_rebuild`] reads the rebuild document again after
/// another process changed it between its read and its write.
const BEGIN_ATTEMPTS: usize = 5;

/// Guard or applied-position documents deleted per transaction when a consumer key is
/// cleaned up.
const CLEANUP_CHUNK: usize = 1000;

/// MongoDB's `NamespaceNotFound` (dropping a collection that does not exist, before 7.0).
const NAMESPACE_NOT_FOUND: i32 = 26;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn phase_name(p: RebuildPhase) -> &'static str {
    match p {
        RebuildPhase::Building => "building",
        RebuildPhase::Switched => "switched",
        RebuildPhase::Cancelled => "cancelled",
    }
}

fn phase_from(s: &str) -> Result<RebuildPhase, TxError> {
    match s {
        "building" => Ok(RebuildPhase::Building),
        "switched" => Ok(RebuildPhase::Switched),
        "cancelled" => Ok(RebuildPhase::Cancelled),
        other => Err(corrupt("rebuild", format!("unknown phase {other:?}"))),
    }
}

fn int_at(d: &Document, field: &str) -> Result<i64, TxError> {
    match d.get(field) {
        Some(Bson::Int64(v)) => Ok(*v),
        Some(Bson::Int32(v)) => Ok(i64::from(*v)),
        _ => Err(corrupt("rebuild", format!("{field} is not an integer"))),
    }
}

fn count_at(d: &Document, field: &str) -> Result<u64, TxError> {
    u64::try_from(int_at(d, field)?).map_err(|e| corrupt("rebuild", e))
}

/// The status a [`REBUILD`] document records for `projection` (its own checkpoint and count:
/// those of the switch or the cancel once finished).
fn recorded(projection: Projection, d: &Document) -> Result<RebuildStatus, TxError> {
    let finished_at_ms = match d.get("finished_ms") {
        None | Some(Bson::Null) => None,
        Some(_) => Some(int_at(d, "finished_ms")?),
    };
    Ok(RebuildStatus {
        projection,
        generation: count_at(d, "generation")?,
        phase: phase_from(d.get_str("phase").map_err(|e| corrupt("rebuild", e))?)?,
        started_at_ms: int_at(d, "started_ms")?,
        finished_at_ms,
        checkpoint: count_at(d, "checkpoint")?,
        applied: count_at(d, "applied")?,
    })
}

/// The status of `projection`'s rebuild document `d`, with the checkpoint and count of its
/// consumer while it is building, read in session `s`.
async fn status(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
    d: &Document,
) -> Result<RebuildStatus, TxError> {
    let mut status = recorded(projection, d)?;
    if status.phase == RebuildPhase::Building {
        let consumer = rebuild_consumer(projection, status.generation);
        let head = Head::read(inner, s, &consumer).await?;
        (status.checkpoint, status.applied) = (head.checkpoint, head.applied);
    }
    Ok(status)
}

/// The generation of the rebuild of `projection` in progress, if any, read in session `s`.
pub(super) async fn building_generation(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
) -> Result<Option<u64>, TxError> {
    inner
        .coll(REBUILD)
        .find_one(doc! { "_id": projection.name(), "phase": "building" })
        .session(&mut *s)
        .await?
        .map(|d| count_at(&d, "generation"))
        .transpose()
}

/// The generation of the rebuild of `projection` in progress, read in session `s`.
///
/// # Errors
/// [`ReadModelError::Invalid`] (as [`TxError::Abort`]) when none is in progress.
pub(super) async fn building(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
) -> Result<u64, TxError> {
    building_generation(inner, s, projection)
        .await?
        .ok_or_else(|| {
            TxError::Abort(ReadModelError::Invalid(format!(
                "no rebuild of {projection} is in progress"
            )))
        })
}

/// Marks the rebuild of `projection` finished in `phase` at `head`'s checkpoint and count.
async fn finish(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
    phase: RebuildPhase,
    head: &Head,
) -> Result<(), TxError> {
    inner
        .coll(REBUILD)
        .update_one(
            doc! { "_id": projection.name() },
            doc! { "$set": {
                "phase": phase_name(phase),
                "finished_ms": now_ms(),
                "checkpoint": head.checkpoint as i64,
                "applied": head.applied as i64,
            } },
        )
        .session(&mut *s)
        .await?;
    Ok(())
}

/// Deletes up to [`CLEANUP_CHUNK`] documents of collection `c` matching `filter`; returns how
/// many.
async fn delete_chunk(
    inner: &Inner,
    s: &mut ClientSession,
    c: &str,
    filter: &Document,
) -> Result<usize, TxError> {
    let cursor = inner
        .coll(c)
        .find(filter.clone())
        .projection(doc! { "_id": 1 })
        .limit(CLEANUP_CHUNK as i64)
        .session(&mut *s)
        .await?;
    let ids: Vec<Bson> = collect(cursor, s)
        .await?
        .into_iter()
        .filter_map(|d| d.get("_id").cloned())
        .collect();
    if !ids.is_empty() {
        inner
            .coll(c)
            .delete_many(doc! { "_id": { "$in": &ids } })
            .session(&mut *s)
            .await?;
    }
    Ok(ids.len())
}

/// What the switch transaction decided: the answer and, when it switched, the guard key the
/// live consumer used before.
type Switched = (RebuildSwitch, Option<String>);

/// The switch transaction of [`MongoReadModels::switch_rebuild`].
async fn switch_body(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
) -> Result<Switched, TxError> {
    let generation = building(inner, s, projection).await?;
    let shadow = rebuild_consumer(projection, generation);
    let rebuilt = Head::read(inner, s, &shadow).await?;
    let live = Head::read(inner, s, projection.name()).await?;
    let parked = inner
        .coll(APPLIED)
        .find_one(doc! { "consumer": &live.key })
        .sort(doc! { "consumer": -1, "position": -1 })
        .projection(doc! { "_id": 0, "position": 1 })
        .session(&mut *s)
        .await?
        .map(|d| {
            d.get_i64("position")
                .map_err(|e| corrupt("parked position", e))
        })
        .transpose()?
        .unwrap_or(0);
    let live_max = live.checkpoint.max(u64::try_from(parked).unwrap_or(0));
    if rebuilt.checkpoint < live_max {
        let behind = RebuildSwitch::Behind {
            live: live_max,
            rebuild: rebuilt.checkpoint,
        };
        return Ok((behind, None));
    }
    let checkpoints = inner.coll(CHECKPOINT);
    checkpoints
        .update_one(
            doc! { "_id": projection.name() },
            doc! { "$set": {
                "checkpoint": rebuilt.checkpoint as i64,
                "applied": rebuilt.applied as i64,
                "generation": generation as i64,
                "state": &shadow,
            } },
        )
        .upsert(true)
        .session(&mut *s)
        .await?;
    checkpoints
        .delete_one(doc! { "_id": &shadow })
        .session(&mut *s)
        .await?;
    finish(inner, s, projection, RebuildPhase::Switched, &rebuilt).await?;
    Ok((RebuildSwitch::Switched, Some(live.key)))
}

/// The cancel transaction of [`MongoReadModels::cancel_rebuild`]: the generation cancelled,
/// if one was building.
async fn cancel_body(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
) -> Result<Option<u64>, TxError> {
    let Some(generation) = building_generation(inner, s, projection).await? else {
        return Ok(None);
    };
    let shadow = rebuild_consumer(projection, generation);
    let rebuilt = Head::read(inner, s, &shadow).await?;
    inner
        .coll(CHECKPOINT)
        .delete_one(doc! { "_id": &shadow })
        .session(&mut *s)
        .await?;
    finish(inner, s, projection, RebuildPhase::Cancelled, &rebuilt).await?;
    Ok(Some(generation))
}

impl MongoReadModels {
    /// [`ReadModelStore::rebuild_begin`](crate::ReadModelStore::rebuild_begin): resumes the
    /// rebuild in progress, or drops the collections of the generations that are neither live
    /// nor the new one (those a switch retired, leftovers of an interrupted cancel), claims
    /// the next generation in the [`REBUILD`] document (a conditional write, so two processes
    /// cannot start two) and creates its collections and indexes.
    pub(super) async fn begin_rebuild(
        &self,
        projection: Projection,
    ) -> Result<RebuildStatus, ReadModelError> {
        for _ in 0..BEGIN_ATTEMPTS {
            let mut s = self.session().await?;
            let latest = self
                .inner
                .coll(REBUILD)
                .find_one(doc! { "_id": projection.name() })
                .session(&mut s)
                .await
                .map_err(|e| backend("read the rebuild", e))?;
            let recorded = latest
                .as_ref()
                .map(|d| recorded(projection, d))
                .transpose()
                .map_err(|e| untx("read the rebuild", e))?;
            if let Some(r) = recorded
                .as_ref()
                .filter(|r| r.phase == RebuildPhase::Building)
            {
                self.create_generation(projection, r.generation).await?;
                let d = latest.unwrap_or_default();
                return status(&self.inner, &mut s, projection, &d)
                    .await
                    .map_err(|e| untx("read the rebuild", e));
            }
            let generation = recorded.as_ref().map_or(1, |r| r.generation + 1);
            self.retire_generations(&mut s, projection, generation)
                .await?;
            let begun = self
                .claim(&mut s, projection, recorded.as_ref(), generation)
                .await?;
            self.inner.clock.observe(&s);
            if let Some(begun) = begun {
                self.create_generation(projection, generation).await?;
                return Ok(begun);
            }
        }
        Err(ReadModelError::Backend(format!(
            "rebuild of {projection}: the rebuild document changed {BEGIN_ATTEMPTS} times while \
             it was being begun"
        )))
    }

    /// Writes the [`REBUILD`] document of generation `generation` in phase building, if it
    /// is still `previous` (inserts it when there was none). `None`: another process changed
    /// it first.
    async fn claim(
        &self,
        s: &mut ClientSession,
        projection: Projection,
        previous: Option<&RebuildStatus>,
        generation: u64,
    ) -> Result<Option<RebuildStatus>, ReadModelError> {
        let begun = RebuildStatus {
            projection,
            generation,
            phase: RebuildPhase::Building,
            started_at_ms: now_ms(),
            finished_at_ms: None,
            checkpoint: 0,
            applied: 0,
        };
        let fields = doc! {
            "generation": generation as i64,
            "phase": phase_name(RebuildPhase::Building),
            "started_ms": begun.started_at_ms,
            "finished_ms": Bson::Null,
            "checkpoint": 0_i64,
            "applied": 0_i64,
        };
        let rebuilds = self.inner.coll(REBUILD);
        let won = match previous {
            None => {
                let mut d = doc! { "_id": projection.name() };
                d.extend(fields);
                match rebuilds.insert_one(d).session(&mut *s).await {
                    Ok(_) => true,
                    Err(e) if tektree_mongo::code(&e) == Some(tektree_mongo::DUPLICATE_KEY) => {
                        false
                    }
                    Err(e) => return Err(backend("begin the rebuild", e)),
                }
            }
            Some(p) => {
                let filter = doc! {
                    "_id": projection.name(),
                    "generation": p.generation as i64,
                    "phase": phase_name(p.phase),
                };
                let r = rebuilds
                    .update_one(filter, doc! { "$set": fields })
                    .session(&mut *s)
                    .await
                    .map_err(|e| backend("begin the rebuild", e))?;
                r.matched_count == 1
            }
        };
        Ok(won.then_some(begun))
    }

    /// Creates the collections of generation `generation` of `projection` with the indexes of
    /// the live ones, where missing.
    async fn create_generation(
        &self,
        projection: Projection,
        generation: u64,
    ) -> Result<(), ReadModelError> {
        let db = &self.inner.db;
        let existing = db
            .list_collection_names()
            .await
            .map_err(|e| backend("list collections", e))?;
        for base in projection_collections(projection) {
            let name = collection_name(base, generation);
            ensure_collection(db, &existing, &name, indexes_of(base)).await?;
        }
        Ok(())
    }

    /// Before generation `next` of `projection` begins: drops the collections of every
    /// generation of `projection` but the live one and `next`, and deletes the guard and
    /// applied documents of its rebuild consumers (`p#g…`) but the live key and `next`'s.
    async fn retire_generations(
        &self,
        s: &mut ClientSession,
        projection: Projection,
        next: u64,
    ) -> Result<(), ReadModelError> {
        let inner: &Inner = &self.inner;
        let live = Head::read(inner, s, projection.name())
            .await
            .map_err(|e| untx("read the live generation", e))?;
        let names = inner
            .db
            .list_collection_names()
            .await
            .map_err(|e| backend("list collections", e))?;
        for base in projection_collections(projection) {
            for name in &names {
                match generation_of(base, name) {
                    Some(g) if g != live.generation && g != next => {
                        self.drop_collection(s, name).await?
                    }
                    _ => {}
                }
            }
        }
        // Rebuild consumers sort between `p#g` and `p#h`; the new one is kept too, in case
        // another process claimed it meanwhile and applies to it already.
        let keep = [live.key, rebuild_consumer(projection, next)];
        let stale = doc! { "consumer": {
            "$gte": format!("{projection}#g"), "$lt": format!("{projection}#h"), "$nin": &keep[..],
        } };
        self.delete_in_chunks(stale).await
    }

    /// Drops collection `name` (absent already is fine).
    async fn drop_collection(
        &self,
        s: &mut ClientSession,
        name: &str,
    ) -> Result<(), ReadModelError> {
        match self.inner.coll(name).drop().session(&mut *s).await {
            Ok(()) => Ok(()),
            Err(e) if tektree_mongo::code(&e) == Some(NAMESPACE_NOT_FOUND) => Ok(()),
            Err(e) => Err(backend(&format!("drop {name}"), e)),
        }
    }

    /// Deletes the guard and applied-position documents of guard key `key` (no consumer uses
    /// it any more), [`CLEANUP_CHUNK`] per transaction.
    async fn delete_key_documents(&self, key: &str) -> Result<(), ReadModelError> {
        self.delete_in_chunks(doc! { "consumer": key }).await
    }

    /// Deletes the guard and applied-position documents matching `filter` (on `consumer`),
    /// [`CLEANUP_CHUNK`] per transaction: bounded by the transaction limits, and a document a
    /// live transaction writes at the same time is a write conflict that retries the chunk
    /// (SecantusDB, the test server, would otherwise keep an unbounded `deleteMany` waiting
    /// for that transaction while holding the lock the transaction waits for).
    async fn delete_in_chunks(&self, filter: Document) -> Result<(), ReadModelError> {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        for c in [GUARD, APPLIED] {
            loop {
                let ctx = (inner, c, &filter);
                let out = txn::run(
                    &mut s,
                    "delete retired consumer documents",
                    ctx,
                    |s, ctx| {
                        let (inner, c, filter) = *ctx;
                        async move { delete_chunk(inner, s, c, filter).await }.boxed()
                    },
                )
                .await;
                self.inner.clock.observe(&s);
                if out? < CLEANUP_CHUNK {
                    break;
                }
            }
        }
        Ok(())
    }

    /// [`ReadModelStore::rebuild_switch`](crate::ReadModelStore::rebuild_switch): the switch
    /// transaction, then the deletion of the old guard key's documents. The retired
    /// collections stay until the next rebuild of `projection` begins.
    pub(super) async fn switch_rebuild(
        &self,
        projection: Projection,
    ) -> Result<RebuildSwitch, ReadModelError> {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        let out = txn::run(
            &mut s,
            "switch to the rebuilt read model",
            (inner, projection),
            |s, ctx| {
                let (inner, projection) = *ctx;
                async move { switch_body(inner, s, projection).await }.boxed()
            },
        )
        .await;
        self.inner.clock.observe(&s);
        let (answer, old_key) = out?;
        if let Some(old_key) = old_key {
            self.delete_key_documents(&old_key).await?;
        }
        Ok(answer)
    }

    /// [`ReadModelStore::rebuild_cancel`](crate::ReadModelStore::rebuild_cancel): the cancel
    /// transaction, then the rebuild's collections are dropped and its guard and applied
    /// documents deleted (no query ever read them).
    pub(super) async fn cancel_rebuild(
        &self,
        projection: Projection,
    ) -> Result<bool, ReadModelError> {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        let out = txn::run(
            &mut s,
            "cancel the rebuild",
            (inner, projection),
            |s, ctx| {
                let (inner, projection) = *ctx;
                async move { cancel_body(inner, s, projection).await }.boxed()
            },
        )
        .await;
        self.inner.clock.observe(&s);
        let Some(generation) = out? else {
            return Ok(false);
        };
        for base in projection_collections(projection) {
            self.drop_collection(&mut s, &collection_name(base, generation))
                .await?;
        }
        self.delete_key_documents(&rebuild_consumer(projection, generation))
            .await?;
        Ok(true)
    }

    /// [`ReadModelStore::rebuilds`](crate::ReadModelStore::rebuilds), read from one snapshot.
    pub(super) async fn rebuild_statuses(&self) -> Result<Vec<RebuildStatus>, ReadModelError> {
        self.read_transaction("read rebuilds", |s, inner| {
            let inner: &Inner = inner;
            async move {
                let cursor = inner.coll(REBUILD).find(doc! {}).session(&mut *s).await?;
                let docs = collect(cursor, s).await?;
                let mut out = Vec::new();
                for p in Projection::ALL {
                    if let Some(d) = docs.iter().find(|d| d.get_str("_id") == Ok(p.name())) {
                        out.push(status(inner, s, p, d).await?);
                    }
                }
                Ok(out)
            }
            .boxed()
        })
        .await
    }
}

impl MongoReadModels {
    /// The live generation of `projection`: the one queries read and live workers write (0
    /// for the collections a database starts with, `N` after the switch to rebuild `N`).
    ///
    /// # Errors
    /// [`ReadModelError::Backend`].
    pub async fn live_generation(&self, projection: Projection) -> Result<u64, ReadModelError> {
        let mut s = self.session().await?;
        live_generation(&self.inner, &mut s, projection)
            .await
            .map_err(|e| untx("read the live generation", e))
    }
}
