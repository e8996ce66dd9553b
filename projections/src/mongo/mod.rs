//! [`MongoReadModels`]: the MongoDB adapter of [`ReadModelStore`] (feature `mongodb`, on by
//! default). Needs a replica set; see `docs/mongodb.md`.
//!
//! # Semantics (the same as [`SqliteReadModels`](crate::SqliteReadModels))
//!
//! [`ReadModelStore::apply`] runs **one multi-document transaction** per batch: it reads the
//! consumer's guards for the batch's aggregates (one `$in` query) and its checkpoint, decides
//! each item's outcome under the sequence guard ([`plan_guards`]), applies the changes of the
//! applied items as commutative upserts ([`change_upsert`]: `$inc`, set-while-null, maximum by
//! tuple), writes the new guards, folds the applied positions into the low-water checkpoint
//! ([`Progress`], parking positions above a gap in `consumer_applied`) and commits — read-model
//! rows, guards and checkpoint together or not at all. Transient transaction errors (for
//! example two workers of one consumer writing its checkpoint document at once) retry the whole
//! batch, as the driver documents; see
//! [`should_retry`](tektree_mongo::should_retry). The error classification, the
//! transaction runner and the client setup are the plumbing shared with the event store ([`tektree_mongo`]),
//! shared by both adapters.
//!
//! Queries read with read concern `majority` in a causally consistent session advanced to this
//! handle's own latest write, so a handle reads its own writes. Reads that take several queries
//! (rank, an export page of several ranges) run in one read-only snapshot transaction.
//!
//! Ranks, pages at an offset and "around me" descend the leaderboard's count trie
//! ([`TREE`], see `crate::rank_tree`), kept in the batch transaction beside the entries: a few
//! range reads of [`TREE_INDEX`] and of the [`RANK_INDEX`] `(board, xp desc, user_id asc)` per
//! level, O(log n) in the board's size (never a `skip` or a count of index keys). Exports
//! page by key (keyset), never by `skip`: `_id` = user id (xp), `(board, xp desc, user_id)`
//! (leaderboard), `(user_id, period)` (quota), `_id` = content id (content); UUIDs are binary,
//! which sorts like the SQLite adapter's UUID text. A page runs the index ranges of
//! [`export_queries`] after the cursor's key in turn (at most two for quota, three for the
//! leaderboard: `$or` would be a collection scan on SecantusDB), limited to what the page still
//! lacks; leaderboard ranks continue from the cursor's, nothing is counted. On MongoDB a page
//! reads its own rows only. SecantusDB (the test server) reads a whole index range before it
//! applies the limit, so there a page costs the rest of its range (of the model for xp, content
//! and quota, of the board and then of the following boards for the leaderboard): a whole
//! export is still quadratic on SecantusDB, with a much smaller constant than `skip` paging
//! (measured on SecantusDB 0.7.0b3 in pages of 1,000: 35,000 `rm_xp` documents 11 s, against
//! 79 s for `skip` pages without the `export` index; 30,000 leaderboard entries on three boards
//! 9 s, against 29 s for `skip` pages before any rank is counted).
//!
//! # Generations: rebuilds beside the live read model (blue/green)
//!
//! Each projection's collections exist in **generations**: generation 0 has the names a
//! database starts with (`rm_xp`, `rm_leaderboard` + `rm_leaderboard_tree`, `rm_quota` +
//! `rm_tier`, `rm_content`, `rm_tags`; so databases written before rebuilds need no
//! migration), generation `N` ≥ 1 the same names with the suffix `_gN` ([`collection_name`])
//! and the same indexes. The **live** generation of projection `p` is field `generation` of
//! `p`'s checkpoint document in [`CHECKPOINT`] (absent = 0), and field `state` names the key
//! of its guard and applied-position documents (absent = `p`). Policies and any consumer that
//! is not a projection have neither field: their key is their name.
//!
//! - [`ReadModelStore::rebuild_begin`] claims generation `N` = the last one recorded in
//!   [`REBUILD`] (`_id` = projection; `generation`, `phase`, `started_ms`, `finished_ms`,
//!   `checkpoint`, `applied`) + 1 with a conditional write (generations never repeat; a
//!   rebuild in phase building is resumed instead), and creates its empty collections. The
//!   rebuild has its own consumer `p#gN`: checkpoint document, guards and parked positions.
//! - [`ReadModelStore::rebuild_apply`] is the live apply (same transaction code) on
//!   generation `N` and consumer `p#gN`; the rebuild document is read in the transaction.
//! - A **live apply** reads its checkpoint document first, inside its transaction, and takes
//!   the generation and guard key from it; every apply that applies an event writes that
//!   document. The changes of other projections' collections (not produced by the services'
//!   consumers) go to those projections' live generations, read in the transaction too; as
//!   such a batch does not write those projections' documents, one that commits while they
//!   switch may land in the retired generation.
//! - [`ReadModelStore::rebuild_switch`] is one transaction: it reads the rebuild's checkpoint
//!   and the live one (and the highest position parked under the live key), answers
//!   [`RebuildSwitch::Behind`] while the rebuild is behind, and otherwise sets the live
//!   document to the rebuild's checkpoint and count with `generation: N`, `state: "p#gN"`,
//!   deletes the `p#gN` document and marks the rebuild switched. As every applying live batch
//!   writes the same live document, a concurrent batch either committed before the switch's
//!   snapshot (the switch sees it) or fails with a write conflict and is retried by the
//!   transaction runner on generation `N`: writers switch atomically. After the commit the old
//!   key's guard and applied documents are deleted (nothing uses them any more) in
//!   transactions of 1,000 documents: bounded by the transaction limits, and retried on a
//!   write conflict with a live batch still in flight on the old key (an unbounded
//!   `deleteMany` outside a transaction deadlocks with such a batch on SecantusDB, the test
//!   server, which holds the collection's lock while it waits for the conflict to clear).
//! - Queries read the live generation, then the rows: reads that run in a snapshot
//!   transaction (a leaderboard page, rank, around me, an export page of several ranges) read
//!   the generation in the same transaction; a single-document read (user XP, quota, tier,
//!   content, tag, an export page of one range) reads the generation and then the row in one
//!   causally consistent session (two round trips), so it may read the retired generation if
//!   a switch commits in between: the answer is then the one of just before the switch. For
//!   that reason a switch does **not** drop the retired collections: they are dropped when the
//!   projection's next rebuild begins (which drops every generation but the live one and the
//!   new one, and deletes leftover `p#g…` guard and applied documents of interrupted
//!   clean-ups). Until then the old version costs its storage.
//! - [`ReadModelStore::rebuild_cancel`] deletes the `p#gN` checkpoint document and marks the
//!   rebuild cancelled in one transaction, then drops generation `N`'s collections at once (no
//!   query ever read them) and deletes its guard and applied documents.
//! - [`ReadModelStore::reset`] (the stopped-world rebuild) empties the **live** generation's
//!   collections and deletes its key's guard and applied documents and the checkpoint fields;
//!   `generation` and `state` stay, so the live generation does not change.
//! - [`ReadModelStore::checkpoints`] lists neither rebuild consumers (`#` in the name) nor
//!   projections reset since their last apply.
//!
//! Costs to know: a batch is one transaction with one round trip per change (the driver's
//! `Client::bulk_write` needs MongoDB 8.0), so keep batches to a few hundred events; [`ReadModelStore::reset`] deletes a model in one transaction, which is
//! bounded by the server's transaction limits (60 s lifetime by default): fine for
//! hundreds of thousands of rows, not for hundreds of millions.

mod generations;
mod mapping;
mod plan;
mod ranks;
mod rebuild;
mod txn;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::FindOptions;
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use tektree_mongo::{code, connect_client, CausalClock};
use uuid::Uuid;

pub use generations::{collection_name, owner, projection_collections};
pub use mapping::{
    change_upsert, content_row, export_queries, leaderboard_row, quota_row, read_model_indexes,
    tag_row, tier_from_str, tier_of, uuid_bson, xp_row, ExportQuery, Update, Upsert, APPLIED,
    CHECKPOINT, COLLECTIONS, CONTENT, EXPORT_INDEX, GUARD, LEADERBOARD, QUOTA, RANK_INDEX, REBUILD,
    TAGS, TIER, XP,
};
pub use plan::{plan_guards, GuardKey, Progress};
pub use ranks::{planned_finds, TREE, TREE_INDEX};

use generations::{live_generation, rebuild_consumer, Generations, Head};
use ranks::Ranking;

use crate::rank_tree::UpperCounts;
use crate::{
    check_consumer, check_export, check_key, export_page, int, ApplyOutcome, Change, Checkpoint,
    ContentRow, EventKey, ExportCursor, ExportKey, ExportPage, LeaderboardRow, Projection,
    QuotaRow, ReadModel, ReadModelError, ReadModelStore, RebuildStatus, RebuildSwitch, TagRow,
    XpRow,
};
use txn::TxError;

/// Parked positions read per query while folding the checkpoint.
const PARKED_PAGE: usize = 256;

fn backend(what: &str, e: impl std::fmt::Display) -> ReadModelError {
    ReadModelError::Backend(format!("{what}: {e}"))
}

/// Read models and consumer checkpoints in a MongoDB database (see the [module docs](self)).
///
/// Cheap to clone (an [`Arc`]); clones share the driver's connection pool and causal clock.
/// Several handles and processes may apply to one database at once.
#[derive(Clone)]
pub struct MongoReadModels {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    db: Database,
    clock: CausalClock,
}

impl std::fmt::Debug for MongoReadModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoReadModels")
            .field("database", &self.inner.db.name())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn coll(&self, name: &str) -> Collection<Document> {
        self.db.collection(name)
    }
}

/// One item of a batch, converted before the transaction.
struct Item {
    key: EventKey,
    /// Each change's upsert; for [`Change::QuotaExceeded`] also the change, whose upsert is
    /// rebuilt inside the transaction with the user's current tier, and for
    /// [`Change::Leaderboard`] the change, which also moves the entry in the count trie.
    upserts: Vec<(Upsert, Option<Change>)>,
}

/// Whose batch an apply writes.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// A live consumer (projection or policy): the live generation of every projection.
    Live(&'a str),
    /// The rebuild of a projection in progress: its generation, its consumer `p#gN`.
    Rebuild(Projection),
}

/// Everything one apply attempt needs.
struct ApplyCtx<'a> {
    inner: &'a Inner,
    target: Target<'a>,
    items: &'a [Item],
    /// The projections whose collections the batch's changes write.
    owners: BTreeSet<Projection>,
}

async fn collect(
    cursor: mongodb::SessionCursor<Document>,
    s: &mut ClientSession,
) -> Result<Vec<Document>, mongodb::error::Error> {
    let mut cursor = cursor;
    let mut out = Vec::new();
    while let Some(d) = cursor.next(s).await {
        out.push(d?);
    }
    Ok(out)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> TxError {
    TxError::Abort(ReadModelError::Backend(format!("corrupt {what}: {e}")))
}

/// A transaction body's error outside a transaction runner.
fn untx(what: &str, e: TxError) -> ReadModelError {
    match e {
        TxError::Abort(e) => e,
        TxError::Driver(e) => backend(what, e),
    }
}

async fn upsert(
    inner: &Inner,
    s: &mut ClientSession,
    gens: &Generations,
    u: Upsert,
) -> Result<(), TxError> {
    let coll = inner.coll(&gens.name(u.collection));
    match u.update {
        Update::Modifier(m) => coll.update_one(u.filter, m),
        Update::Pipeline(p) => coll.update_one(u.filter, p),
    }
    .upsert(true)
    .session(&mut *s)
    .await?;
    Ok(())
}

/// The stored guards of the aggregates of `items` under guard key `key`.
async fn read_guards(
    inner: &Inner,
    s: &mut ClientSession,
    key: &str,
    items: &[Item],
) -> Result<HashMap<GuardKey, u64>, TxError> {
    let ids: Vec<Bson> = items
        .iter()
        .map(|i| i.key.aggregate_id)
        .collect::<BTreeSet<Uuid>>()
        .into_iter()
        .map(uuid_bson)
        .collect();
    let cursor = inner
        .coll(GUARD)
        .find(doc! { "consumer": key, "aggregate_id": { "$in": ids } })
        .session(&mut *s)
        .await?;
    let mut stored = HashMap::new();
    for d in collect(cursor, s).await? {
        let id = match d.get("aggregate_id") {
            Some(Bson::Binary(b)) => Uuid::from_slice(&b.bytes).map_err(|e| corrupt("guard", e))?,
            _ => return Err(corrupt("guard", "aggregate_id is not a UUID")),
        };
        let t = d
            .get_str("aggregate_type")
            .map_err(|e| corrupt("guard", e))?
            .to_string();
        let last = d
            .get_i64("last_sequence")
            .map_err(|e| corrupt("guard", e))?;
        stored.insert(
            (t, id),
            u64::try_from(last).map_err(|e| corrupt("guard", e))?,
        );
    }
    Ok(stored)
}

/// Writes the guards that changed under guard key `key`.
async fn write_guards(
    inner: &Inner,
    s: &mut ClientSession,
    key: &str,
    changed: &HashMap<GuardKey, u64>,
) -> Result<(), TxError> {
    for ((t, id), last) in changed {
        inner
            .coll(GUARD)
            .update_one(
                doc! { "consumer": key, "aggregate_id": uuid_bson(*id), "aggregate_type": t },
                doc! { "$set": { "last_sequence": *last as i64 } },
            )
            .upsert(true)
            .session(&mut *s)
            .await?;
    }
    Ok(())
}

/// Folds the positions parked under guard key `key` into `progress` (which started at
/// checkpoint `start`), parks its new positions above the checkpoint and writes the
/// checkpoint document of `consumer` (keeping its other fields: `generation`, `state`).
async fn save_progress(
    inner: &Inner,
    s: &mut ClientSession,
    consumer: &str,
    key: &str,
    mut progress: Progress,
    start: u64,
) -> Result<(), TxError> {
    loop {
        let cursor = inner
            .coll(APPLIED)
            .find(doc! { "consumer": key, "position": { "$gt": progress.checkpoint as i64 } })
            .with_options(
                FindOptions::builder()
                    .sort(doc! { "consumer": 1, "position": 1 })
                    .limit(PARKED_PAGE as i64)
                    .projection(doc! { "_id": 0, "position": 1 })
                    .build(),
            )
            .session(&mut *s)
            .await?;
        let page: Vec<u64> = collect(cursor, s)
            .await?
            .iter()
            .map(|d| d.get_i64("position").map(|p| p as u64))
            .collect::<Result<_, _>>()
            .map_err(|e| corrupt("parked position", e))?;
        if !progress.fold_parked(&page, PARKED_PAGE) {
            break;
        }
    }
    if progress.checkpoint > start {
        inner
            .coll(APPLIED)
            .delete_many(
                doc! { "consumer": key, "position": { "$lte": progress.checkpoint as i64 } },
            )
            .session(&mut *s)
            .await?;
    }
    if !progress.parked_new.is_empty() {
        let docs = progress
            .parked_new
            .iter()
            .map(|&p| doc! { "consumer": key, "position": p as i64 });
        inner
            .coll(APPLIED)
            .insert_many(docs)
            .session(&mut *s)
            .await?;
    }
    inner
        .coll(CHECKPOINT)
        .update_one(
            doc! { "_id": consumer },
            doc! { "$set": {
                "checkpoint": progress.checkpoint as i64,
                "applied": progress.applied as i64,
            } },
        )
        .upsert(true)
        .session(&mut *s)
        .await?;
    Ok(())
}

impl ApplyCtx<'_> {
    /// The consumer whose checkpoint document the batch advances, its head and the
    /// generations the batch writes, read inside the transaction.
    async fn resolve(&self, s: &mut ClientSession) -> Result<(String, Head, Generations), TxError> {
        let inner = self.inner;
        let mut gens = Generations::default();
        match self.target {
            Target::Live(consumer) => {
                let head = Head::read(inner, s, consumer).await?;
                let own = consumer.parse::<Projection>().ok();
                if let Some(p) = own {
                    gens.set(p, head.generation);
                }
                for &p in &self.owners {
                    if Some(p) != own {
                        gens.set(p, live_generation(inner, s, p).await?);
                    }
                }
                Ok((consumer.to_string(), head, gens))
            }
            Target::Rebuild(p) => {
                let generation = rebuild::building(inner, s, p).await?;
                let consumer = rebuild_consumer(p, generation);
                let head = Head::read(inner, s, &consumer).await?;
                gens.set(p, generation);
                Ok((consumer, head, gens))
            }
        }
    }

    async fn attempt(&self, s: &mut ClientSession) -> Result<Vec<ApplyOutcome>, TxError> {
        let (consumer, head, gens) = self.resolve(s).await?;
        let stored = read_guards(self.inner, s, &head.key, self.items).await?;
        let keys: Vec<EventKey> = self.items.iter().map(|i| i.key.clone()).collect();
        let (outcomes, changed) = plan_guards(&keys, &stored);
        let mut progress = Progress::new(head.checkpoint, head.applied);
        self.write_changes(s, &gens, &outcomes, &mut progress)
            .await?;
        write_guards(self.inner, s, &head.key, &changed).await?;
        if progress.dirty {
            save_progress(
                self.inner,
                s,
                &consumer,
                &head.key,
                progress,
                head.checkpoint,
            )
            .await?;
        }
        Ok(outcomes)
    }

    /// Applies the changes of the applied items to generations `gens` and records their
    /// positions in `progress`.
    async fn write_changes(
        &self,
        s: &mut ClientSession,
        gens: &Generations,
        outcomes: &[ApplyOutcome],
        progress: &mut Progress,
    ) -> Result<(), TxError> {
        let inner = self.inner;
        let ranking = Ranking::of(inner, gens.get(Projection::Leaderboard));
        let mut upper = UpperCounts::default();
        for (item, outcome) in self.items.iter().zip(outcomes) {
            if *outcome != ApplyOutcome::Applied {
                continue;
            }
            for (u, exceeded) in &item.upserts {
                let u = match exceeded {
                    Some(change @ Change::QuotaExceeded { user_id, .. }) => {
                        // The placeholder row of an exceeded period takes the user's tier.
                        let tier = inner
                            .coll(&gens.name(TIER))
                            .find_one(doc! { "_id": uuid_bson(*user_id) })
                            .session(&mut *s)
                            .await?
                            .as_ref()
                            .and_then(tier_of);
                        change_upsert(change, tier).map_err(TxError::Abort)?
                    }
                    Some(Change::Leaderboard { board, user_id, xp }) => {
                        ranks::add_xp(&ranking, s, &mut upper, board, *user_id, *xp).await?;
                        continue;
                    }
                    _ => u.clone(),
                };
                upsert(inner, s, gens, u).await?;
            }
            progress.record(item.key.position);
        }
        ranks::flush(&ranking, s, upper).await
    }
}

/// The projections whose collections the changes of `items` write.
fn owners(items: &[Item]) -> BTreeSet<Projection> {
    items
        .iter()
        .flat_map(|i| i.upserts.iter())
        .filter_map(|(u, _)| owner(u.collection))
        .collect()
}

/// Validates a batch and converts it before any I/O (so an invalid item changes nothing).
fn check_items(
    consumer: &str,
    items: &[(EventKey, Vec<Change>)],
) -> Result<Vec<Item>, ReadModelError> {
    check_consumer(consumer)?;
    items
        .iter()
        .map(|(k, changes)| {
            check_key(k)?;
            let upserts = changes
                .iter()
                .map(|c| {
                    let exceeded =
                        matches!(c, Change::QuotaExceeded { .. } | Change::Leaderboard { .. })
                            .then(|| c.clone());
                    Ok((change_upsert(c, None)?, exceeded))
                })
                .collect::<Result<_, ReadModelError>>()?;
            Ok(Item {
                key: k.clone(),
                upserts,
            })
        })
        .collect()
}

/// Creates collection `name` of database `db` unless it is among `existing` (or is created
/// concurrently by another process), then its `indexes` (idempotent).
async fn ensure_collection(
    db: &Database,
    existing: &[String],
    name: &str,
    indexes: Vec<IndexModel>,
) -> Result<(), ReadModelError> {
    if !existing.iter().any(|c| c == name) {
        match db.create_collection(name).await {
            Ok(()) => {}
            // Created concurrently by another process.
            Err(e) if code(&e) == Some(48) => {}
            Err(e) => return Err(backend(&format!("create collection {name}"), e)),
        }
    }
    if indexes.is_empty() {
        return Ok(());
    }
    db.collection::<Document>(name)
        .create_indexes(indexes)
        .await
        .map(drop)
        .map_err(|e| backend(&format!("create indexes of {name}"), e))
}

/// The indexes of read-model collection `base` ([`read_model_indexes`]).
fn indexes_of(base: &str) -> Vec<IndexModel> {
    read_model_indexes()
        .into_iter()
        .find(|(c, _)| *c == base)
        .map(|(_, models)| models)
        .unwrap_or_default()
}

impl MongoReadModels {
    /// Connects to the replica set at `uri`, refuses a standalone server (transactions need a
    /// replica set), and creates the adapter's collections ([`COLLECTIONS`]) and indexes in
    /// database `db_name` if missing (idempotent; safe from several processes at once). Other
    /// collections in the database (for example the event store's) are left alone.
    ///
    /// # Errors
    /// [`ReadModelError::Backend`] when the URI is invalid, no server is reachable within the
    /// server-selection timeout, the server is a standalone (the message names the
    /// replica-set requirement), or an index with the same name but another definition exists.
    pub async fn connect(uri: &str, db_name: &str) -> Result<Self, ReadModelError> {
        let (client, _) = connect_client(uri).await.map_err(ReadModelError::Backend)?;
        let db = client.database(db_name);
        let existing = db
            .list_collection_names()
            .await
            .map_err(|e| backend("list collections", e))?;
        for name in COLLECTIONS {
            ensure_collection(&db, &existing, name, indexes_of(name)).await?;
        }
        let store = MongoReadModels {
            inner: Arc::new(Inner {
                client,
                db,
                clock: CausalClock::default(),
            }),
        };
        store.build_rank_tree_if_missing().await?;
        Ok(store)
    }

    /// Builds the count trie of every board of the live leaderboard generation from its
    /// entries when the trie is empty and the boards are not (a database written before the
    /// trie existed), in one transaction.
    async fn build_rank_tree_if_missing(&self) -> Result<(), ReadModelError> {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        let out = txn::run(&mut s, "build leaderboard rank tree", inner, |s, inner| {
            let inner: &Inner = inner;
            async move {
                let g = live_generation(inner, s, Projection::Leaderboard).await?;
                ranks::build_if_missing(&Ranking::of(inner, g), s).await
            }
            .boxed()
        })
        .await;
        self.inner.clock.observe(&s);
        out
    }

    /// The database this store uses.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    async fn session(&self) -> Result<ClientSession, ReadModelError> {
        self.inner
            .clock
            .session(&self.inner.client)
            .await
            .map_err(|e| backend("start session", e))
    }

    /// The name of read-model collection `base` in the live generation of its projection,
    /// read in session `s` (other collections keep their names).
    async fn live_name(
        &self,
        s: &mut ClientSession,
        base: &'static str,
    ) -> Result<Cow<'static, str>, ReadModelError> {
        let mut gens = Generations::default();
        if let Some(p) = owner(base) {
            let g = live_generation(&self.inner, s, p)
                .await
                .map_err(|e| untx("read the live generation", e))?;
            gens.set(p, g);
        }
        Ok(gens.name(base))
    }

    /// Documents of `collection` (of its live generation) matching `filter`, in a causally
    /// consistent session: the generation is read first, then the documents.
    async fn find(
        &self,
        collection: &'static str,
        filter: Document,
        options: FindOptions,
    ) -> Result<Vec<Document>, ReadModelError> {
        let mut s = self.session().await?;
        let name = self.live_name(&mut s, collection).await?;
        let cursor = self
            .inner
            .coll(&name)
            .find(filter)
            .with_options(options)
            .session(&mut s)
            .await
            .map_err(|e| backend(&format!("find in {name}"), e))?;
        collect(cursor, &mut s)
            .await
            .map_err(|e| backend(&format!("find in {name}"), e))
    }

    /// The document of `collection` (of its live generation) matching `filter`, in a causally
    /// consistent session: the generation is read first, then the document (two round trips;
    /// see the [module docs](self)).
    async fn find_one(
        &self,
        collection: &'static str,
        filter: Document,
    ) -> Result<Option<Document>, ReadModelError> {
        let mut s = self.session().await?;
        let name = self.live_name(&mut s, collection).await?;
        self.inner
            .coll(&name)
            .find_one(filter)
            .session(&mut s)
            .await
            .map_err(|e| backend(&format!("find in {name}"), e))
    }

    /// Runs a read-only snapshot transaction (one consistent view for several queries).
    async fn read_transaction<T, F>(&self, what: &str, body: F) -> Result<T, ReadModelError>
    where
        F: for<'s> FnMut(
            &'s mut ClientSession,
            &'s mut &Inner,
        ) -> futures::future::BoxFuture<'s, Result<T, TxError>>,
    {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        txn::run(&mut s, what, inner, body).await
    }

    /// Applies the checked `items` for `target` in one transaction.
    async fn apply_to(
        &self,
        target: Target<'_>,
        items: Vec<Item>,
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        let owners = owners(&items);
        if let Target::Rebuild(p) = target {
            if let Some(other) = owners.iter().find(|o| **o != p) {
                return Err(ReadModelError::Invalid(format!(
                    "a rebuild of {p} cannot apply changes of {other}'s read model"
                )));
            }
            if items.is_empty() {
                // Nothing to apply, but the rebuild must be in progress.
                self.read_transaction("rebuild apply", |s, inner| {
                    let inner: &Inner = inner;
                    async move { rebuild::building(inner, s, p).await.map(drop) }.boxed()
                })
                .await?;
            }
        }
        if items.is_empty() {
            return Ok(vec![]);
        }
        let ctx = ApplyCtx {
            inner: &self.inner,
            target,
            items: &items,
            owners,
        };
        let mut s = self.session().await?;
        let out = txn::run(&mut s, "apply read-model batch", &ctx, |s, ctx| {
            let ctx: &ApplyCtx<'_> = ctx;
            async move { ctx.attempt(s).await }.boxed()
        })
        .await;
        self.inner.clock.observe(&s);
        out
    }

    /// Runs `body` (a leaderboard read) in a read-only snapshot transaction on the live
    /// generation of the leaderboard, read in the same transaction.
    async fn ranked<T, F>(&self, what: &str, body: F) -> Result<T, ReadModelError>
    where
        F: for<'s> Fn(
                &'s Ranking,
                &'s mut ClientSession,
            ) -> futures::future::BoxFuture<'s, Result<T, TxError>>
            + Send
            + Sync,
        T: Send,
    {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        txn::run(&mut s, what, (inner, &body), |s, ctx| {
            let (inner, body): (&Inner, &F) = *ctx;
            async move {
                let g = live_generation(inner, s, Projection::Leaderboard).await?;
                let ranking = Ranking::of(inner, g);
                body(&ranking, s).await
            }
            .boxed()
        })
        .await
    }
}

/// [`ReadModelStore::reset`] in one transaction: empties the live generation of
/// `projection`'s collections, deletes the guard and applied documents of its key and its
/// checkpoint (the document keeps `generation` and `state`, so the live generation stays).
async fn reset_body(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
) -> Result<(), TxError> {
    let consumer = projection.name();
    let head = Head::read(inner, s, consumer).await?;
    for base in projection_collections(projection) {
        inner
            .coll(&collection_name(base, head.generation))
            .delete_many(doc! {})
            .session(&mut *s)
            .await?;
    }
    for c in [GUARD, APPLIED] {
        inner
            .coll(c)
            .delete_many(doc! { "consumer": &head.key })
            .session(&mut *s)
            .await?;
    }
    let checkpoint = inner.coll(CHECKPOINT);
    if head.generation == 0 && head.key == consumer {
        checkpoint
            .delete_one(doc! { "_id": consumer })
            .session(&mut *s)
            .await?;
    } else {
        checkpoint
            .update_one(
                doc! { "_id": consumer },
                doc! { "$unset": { "checkpoint": "", "applied": "" } },
            )
            .session(&mut *s)
            .await?;
    }
    Ok(())
}

/// A consumer's checkpoint document as listed by [`ReadModelStore::checkpoints`]; `None` for
/// a rebuild's consumer (`p#gN`) and for a projection reset since (no `checkpoint` field).
fn listed_checkpoint(d: &Document) -> Result<Option<Checkpoint>, ReadModelError> {
    let name = d
        .get_str("_id")
        .map_err(|e| backend("corrupt checkpoint", e))?;
    if name.contains('#') || !d.contains_key("checkpoint") {
        return Ok(None);
    }
    let get = |f: &str| {
        d.get_i64(f)
            .map_err(|e| backend("corrupt checkpoint", e))
            .and_then(|v| u64::try_from(v).map_err(|e| backend("corrupt checkpoint", e)))
    };
    Ok(Some(Checkpoint {
        name: name.to_string(),
        checkpoint: get("checkpoint")?,
        applied: get("applied")?,
    }))
}

#[async_trait]
impl ReadModelStore for MongoReadModels {
    async fn apply(
        &self,
        consumer: &str,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        let items = check_items(consumer, items)?;
        self.apply_to(Target::Live(consumer), items).await
    }

    /// 1,000 (the default, stated): a page is one multi-document transaction of one round
    /// trip per change, which must end within the server's transaction lifetime (60 s by
    /// default).
    fn rebuild_page(&self) -> usize {
        1000
    }

    async fn rebuild_begin(&self, projection: Projection) -> Result<RebuildStatus, ReadModelError> {
        self.begin_rebuild(projection).await
    }

    async fn rebuild_apply(
        &self,
        projection: Projection,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        let items = check_items(projection.name(), items)?;
        self.apply_to(Target::Rebuild(projection), items).await
    }

    async fn rebuild_switch(
        &self,
        projection: Projection,
    ) -> Result<RebuildSwitch, ReadModelError> {
        self.switch_rebuild(projection).await
    }

    async fn rebuild_cancel(&self, projection: Projection) -> Result<bool, ReadModelError> {
        self.cancel_rebuild(projection).await
    }

    async fn rebuilds(&self) -> Result<Vec<RebuildStatus>, ReadModelError> {
        self.rebuild_statuses().await
    }

    async fn reset(&self, projection: Projection) -> Result<(), ReadModelError> {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        let out = txn::run(&mut s, "reset read model", (inner, projection), |s, ctx| {
            let (inner, projection) = *ctx;
            async move { reset_body(inner, s, projection).await }.boxed()
        })
        .await;
        self.inner.clock.observe(&s);
        out
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ReadModelError> {
        let docs = self
            .find(
                CHECKPOINT,
                doc! {},
                FindOptions::builder().sort(doc! { "_id": 1 }).build(),
            )
            .await?;
        Ok(docs
            .iter()
            .map(listed_checkpoint)
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    async fn user_xp(&self, user_id: Uuid) -> Result<Option<XpRow>, ReadModelError> {
        self.find_one(XP, doc! { "_id": uuid_bson(user_id) })
            .await?
            .as_ref()
            .map(xp_row)
            .transpose()
    }

    async fn leaderboard(
        &self,
        board: &str,
        limit: u32,
        offset: u64,
    ) -> Result<Vec<LeaderboardRow>, ReadModelError> {
        int(offset, "offset")?;
        let board = board.to_string();
        self.ranked("leaderboard page", move |r, s| {
            let board = board.clone();
            async move { ranks::page(r, s, &board, limit, offset).await }.boxed()
        })
        .await
    }

    async fn rank(
        &self,
        board: &str,
        user_id: Uuid,
    ) -> Result<Option<LeaderboardRow>, ReadModelError> {
        let board = board.to_string();
        self.ranked("rank", move |r, s| {
            let board = board.clone();
            async move { ranks::rank(r, s, &board, user_id).await }.boxed()
        })
        .await
    }

    async fn around(
        &self,
        board: &str,
        user_id: Uuid,
        k: u32,
    ) -> Result<Option<Vec<LeaderboardRow>>, ReadModelError> {
        let board = board.to_string();
        self.ranked("around", move |r, s| {
            let board = board.clone();
            async move { ranks::around(r, s, &board, user_id, k).await }.boxed()
        })
        .await
    }

    async fn quota(&self, user_id: Uuid, period: &str) -> Result<Option<QuotaRow>, ReadModelError> {
        self.find_one(
            QUOTA,
            doc! { "user_id": uuid_bson(user_id), "period": period },
        )
        .await?
        .as_ref()
        .map(quota_row)
        .transpose()
    }

    async fn tier(&self, user_id: Uuid) -> Result<Option<tektree_domain::Tier>, ReadModelError> {
        Ok(self
            .find_one(TIER, doc! { "_id": uuid_bson(user_id) })
            .await?
            .as_ref()
            .and_then(tier_of))
    }

    async fn content(&self, content_id: Uuid) -> Result<Option<ContentRow>, ReadModelError> {
        self.find_one(CONTENT, doc! { "_id": uuid_bson(content_id) })
            .await?
            .as_ref()
            .map(content_row)
            .transpose()
    }

    async fn tag(&self, tag: &str) -> Result<Option<TagRow>, ReadModelError> {
        self.find_one(TAGS, doc! { "_id": tag })
            .await?
            .as_ref()
            .map(tag_row)
            .transpose()
    }

    async fn export(
        &self,
        model: ReadModel,
        after: Option<&ExportCursor>,
        limit: u32,
    ) -> Result<ExportPage, ReadModelError> {
        let key = check_export(model, after, limit)?;
        let docs = self
            .export_ranges(export_queries(model, after)?, limit)
            .await?;
        match model {
            ReadModel::Xp => export_page(decode(&docs, xp_row)?, limit, ExportKey::xp),
            ReadModel::Quota => export_page(decode(&docs, quota_row)?, limit, ExportKey::quota),
            ReadModel::Content => {
                export_page(decode(&docs, content_row)?, limit, ExportKey::content)
            }
            ReadModel::Tags => export_page(decode(&docs, tag_row)?, limit, ExportKey::tags),
            ReadModel::Leaderboard => {
                export_page(ranked_entries(&docs, key)?, limit, ExportKey::leaderboard)
            }
        }
    }
}

/// Every document decoded with `row`.
fn decode<T>(
    docs: &[Document],
    row: fn(&Document) -> Result<T, ReadModelError>,
) -> Result<Vec<T>, ReadModelError> {
    docs.iter().map(row).collect()
}

/// Leaderboard export entries (`board`, `user_id`, `xp`, in export order) with their ranks:
/// continuing from the cursor's rank on its board, from 1 on each new board. Nothing is
/// counted.
fn ranked_entries(
    docs: &[Document],
    after: Option<ExportKey>,
) -> Result<Vec<LeaderboardRow>, ReadModelError> {
    let mut prev: Option<(String, u64)> = match after {
        Some(ExportKey::Leaderboard { board, rank, .. }) => Some((board, rank)),
        _ => None,
    };
    let mut rows = Vec::with_capacity(docs.len());
    for d in docs {
        let board = d
            .get_str("board")
            .map_err(|e| backend("corrupt leaderboard entry", e))?;
        let rank = match &prev {
            Some((b, r)) if b == board => r + 1,
            _ => 1,
        };
        rows.push(leaderboard_row(board, rank, d)?);
        prev = Some((board.to_string(), rank));
    }
    Ok(rows)
}

impl MongoReadModels {
    /// Runs `queries` (on generation-0 names) in turn on the live generation of their
    /// projection, each limited to what the page still lacks, until `limit` documents are
    /// read: one query alone in a causally consistent session after reading the generation,
    /// several in one read-only snapshot transaction that also reads the generation (so a page
    /// is one snapshot).
    async fn export_ranges(
        &self,
        queries: Vec<ExportQuery>,
        limit: u32,
    ) -> Result<Vec<Document>, ReadModelError> {
        let options = |q: &ExportQuery, left: usize| {
            FindOptions::builder()
                .sort(q.sort.clone())
                .projection(q.projection.clone())
                .limit(left as i64)
                .build()
        };
        let limit = limit as usize;
        if let [q] = queries.as_slice() {
            return self
                .find(q.collection, q.filter.clone(), options(q, limit))
                .await;
        }
        self.read_transaction("export page", |s, inner| {
            let inner: &Inner = inner;
            let queries = queries.clone();
            async move {
                let mut gens = Generations::default();
                for p in queries.iter().filter_map(|q| owner(q.collection)) {
                    gens.set(p, live_generation(inner, s, p).await?);
                }
                let mut docs = Vec::with_capacity(limit);
                for q in &queries {
                    if docs.len() >= limit {
                        break;
                    }
                    let cursor = inner
                        .coll(&gens.name(q.collection))
                        .find(q.filter.clone())
                        .with_options(options(q, limit - docs.len()))
                        .session(&mut *s)
                        .await?;
                    docs.extend(collect(cursor, s).await?);
                }
                Ok(docs)
            }
            .boxed()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tektree_domain::Tier;

    #[test]
    fn invalid_batches_are_rejected_before_any_io() {
        let k = |sequence, position| EventKey {
            aggregate_type: "profile".into(),
            aggregate_id: Uuid::nil(),
            sequence,
            position,
        };
        assert!(matches!(
            check_items("", &[(k(1, 1), vec![])]),
            Err(ReadModelError::Invalid(_))
        ));
        for key in [k(0, 1), k(1, 0), k(1, u64::MAX), k(u64::MAX, 1)] {
            assert!(matches!(
                check_items("c", &[(key, vec![])]),
                Err(ReadModelError::Invalid(_))
            ));
        }
        let usage = Change::Usage {
            user_id: Uuid::nil(),
            period: "2024-05".into(),
            tier: Tier::Free,
            used: u64::MAX,
            limit: None,
        };
        assert!(matches!(
            check_items("c", &[(k(1, 1), vec![]), (k(2, 2), vec![usage])]),
            Err(ReadModelError::Invalid(_))
        ));
        let exceeded = Change::QuotaExceeded {
            user_id: Uuid::from_u128(9),
            period: "2024-05".into(),
        };
        let items = check_items("c", &[(k(1, 1), vec![exceeded])]).unwrap();
        assert!(matches!(
            items[0].upserts[0].1,
            Some(Change::QuotaExceeded { user_id, .. }) if user_id == Uuid::from_u128(9)
        ));
    }

    #[tokio::test]
    async fn connect_rejects_an_invalid_uri_without_a_server() {
        let err = MongoReadModels::connect("http://localhost", "x")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("parse MongoDB URI"), "{err}");
    }
}
