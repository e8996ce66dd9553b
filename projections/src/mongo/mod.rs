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
//! Costs to know: a batch is one transaction with one round trip per change (the driver's
//! `Client::bulk_write` needs MongoDB 8.0), so keep batches to a few hundred events; [`ReadModelStore::reset`] deletes a model in one transaction, which is
//! bounded by the server's transaction limits (60 s lifetime by default): fine for
//! hundreds of thousands of rows, not for hundreds of millions.

mod mapping;
mod plan;
mod ranks;
mod txn;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::FindOptions;
use mongodb::{Client, ClientSession, Collection, Database};
use tektree_mongo::{code, connect_client, CausalClock};
use uuid::Uuid;

pub use mapping::{
    change_upsert, content_row, export_queries, leaderboard_row, quota_row, read_model_indexes,
    tag_row, tier_from_str, tier_of, uuid_bson, xp_row, ExportQuery, Update, Upsert, APPLIED,
    CHECKPOINT, COLLECTIONS, CONTENT, EXPORT_INDEX, GUARD, LEADERBOARD, QUOTA, RANK_INDEX, TAGS,
    TIER, XP,
};
pub use plan::{plan_guards, GuardKey, Progress};
pub use ranks::{planned_finds, TREE, TREE_INDEX};

use crate::rank_tree::UpperCounts;
use crate::{
    check_consumer, check_export, check_key, export_page, int, ApplyOutcome, Change, Checkpoint,
    ContentRow, EventKey, ExportCursor, ExportKey, ExportPage, LeaderboardRow, Projection,
    QuotaRow, ReadModel, ReadModelError, ReadModelStore, TagRow, XpRow,
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

/// Everything one apply attempt needs.
struct ApplyCtx<'a> {
    inner: &'a Inner,
    consumer: &'a str,
    items: &'a [Item],
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

async fn upsert(inner: &Inner, s: &mut ClientSession, u: Upsert) -> Result<(), TxError> {
    let coll = inner.coll(u.collection);
    match u.update {
        Update::Modifier(m) => coll.update_one(u.filter, m),
        Update::Pipeline(p) => coll.update_one(u.filter, p),
    }
    .upsert(true)
    .session(&mut *s)
    .await?;
    Ok(())
}

impl ApplyCtx<'_> {
    async fn attempt(&self, s: &mut ClientSession) -> Result<Vec<ApplyOutcome>, TxError> {
        let inner = self.inner;
        let consumer = self.consumer;
        // Guards of the batch's aggregates.
        let ids: Vec<Bson> = self
            .items
            .iter()
            .map(|i| i.key.aggregate_id)
            .collect::<BTreeSet<Uuid>>()
            .into_iter()
            .map(uuid_bson)
            .collect();
        let cursor = inner
            .coll(GUARD)
            .find(doc! { "consumer": consumer, "aggregate_id": { "$in": ids } })
            .session(&mut *s)
            .await?;
        let mut stored = HashMap::new();
        for d in collect(cursor, s).await? {
            let id = match d.get("aggregate_id") {
                Some(Bson::Binary(b)) => {
                    Uuid::from_slice(&b.bytes).map_err(|e| corrupt("guard", e))?
                }
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
        let keys: Vec<EventKey> = self.items.iter().map(|i| i.key.clone()).collect();
        let (outcomes, changed) = plan_guards(&keys, &stored);

        let checkpoint = inner
            .coll(CHECKPOINT)
            .find_one(doc! { "_id": consumer })
            .session(&mut *s)
            .await?;
        let mut progress = match checkpoint {
            None => Progress::new(0, 0),
            Some(d) => {
                let cp = d
                    .get_i64("checkpoint")
                    .map_err(|e| corrupt("checkpoint", e))?;
                let applied = d.get_i64("applied").map_err(|e| corrupt("checkpoint", e))?;
                Progress::new(cp as u64, applied as u64)
            }
        };
        let start = progress.checkpoint;

        let mut upper = UpperCounts::default();
        for (item, outcome) in self.items.iter().zip(&outcomes) {
            if *outcome != ApplyOutcome::Applied {
                continue;
            }
            for (u, exceeded) in &item.upserts {
                let u = match exceeded {
                    Some(change @ Change::QuotaExceeded { user_id, .. }) => {
                        // The placeholder row of an exceeded period takes the user's tier.
                        let tier = inner
                            .coll(TIER)
                            .find_one(doc! { "_id": uuid_bson(*user_id) })
                            .session(&mut *s)
                            .await?
                            .as_ref()
                            .and_then(tier_of);
                        change_upsert(change, tier).map_err(TxError::Abort)?
                    }
                    Some(Change::Leaderboard { board, user_id, xp }) => {
                        ranks::add_xp(inner, s, &mut upper, board, *user_id, *xp).await?;
                        continue;
                    }
                    _ => u.clone(),
                };
                upsert(inner, s, u).await?;
            }
            progress.record(item.key.position);
        }
        ranks::flush(inner, s, upper).await?;
        for ((t, id), last) in &changed {
            inner
                .coll(GUARD)
                .update_one(
                    doc! { "consumer": consumer, "aggregate_id": uuid_bson(*id), "aggregate_type": t },
                    doc! { "$set": { "last_sequence": *last as i64 } },
                )
                .upsert(true)
                .session(&mut *s)
                .await?;
        }
        if !progress.dirty {
            return Ok(outcomes);
        }
        // Fold positions parked by earlier batches.
        loop {
            let cursor = inner
                .coll(APPLIED)
                .find(doc! { "consumer": consumer, "position": { "$gt": progress.checkpoint as i64 } })
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
                .delete_many(doc! {
                    "consumer": consumer,
                    "position": { "$lte": progress.checkpoint as i64 },
                })
                .session(&mut *s)
                .await?;
        }
        if !progress.parked_new.is_empty() {
            let docs = progress
                .parked_new
                .iter()
                .map(|&p| doc! { "consumer": consumer, "position": p as i64 });
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
        Ok(outcomes)
    }
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

impl MongoReadModels {
    /// Connects to the replica set at `uri`, refuses a standalone server (transactions need a
    /// replica set), and creates the adapter's collections and indexes in database `db_name`
    /// if missing (idempotent; safe from several processes at once). Other collections in the
    /// database (for example the event store's) are left alone.
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
            if existing.iter().any(|c| c == name) {
                continue;
            }
            match db.create_collection(name).await {
                Ok(()) => {}
                // Created concurrently by another process.
                Err(e) if code(&e) == Some(48) => {}
                Err(e) => return Err(backend(&format!("create collection {name}"), e)),
            }
        }
        for (name, models) in read_model_indexes() {
            db.collection::<Document>(name)
                .create_indexes(models)
                .await
                .map_err(|e| backend(&format!("create indexes of {name}"), e))?;
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

    /// Builds the count trie of every board from `rm_leaderboard` when the trie is empty and
    /// the boards are not (a database written before the trie existed), in one transaction.
    async fn build_rank_tree_if_missing(&self) -> Result<(), ReadModelError> {
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        let out = txn::run(&mut s, "build leaderboard rank tree", inner, |s, inner| {
            let inner: &Inner = inner;
            async move { ranks::build_if_missing(inner, s).await }.boxed()
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

    /// Documents of `collection` matching `filter`, in a causally consistent session.
    async fn find(
        &self,
        collection: &str,
        filter: Document,
        options: FindOptions,
    ) -> Result<Vec<Document>, ReadModelError> {
        let mut s = self.session().await?;
        let cursor = self
            .inner
            .coll(collection)
            .find(filter)
            .with_options(options)
            .session(&mut s)
            .await
            .map_err(|e| backend(&format!("find in {collection}"), e))?;
        collect(cursor, &mut s)
            .await
            .map_err(|e| backend(&format!("find in {collection}"), e))
    }

    async fn find_one(
        &self,
        collection: &str,
        filter: Document,
    ) -> Result<Option<Document>, ReadModelError> {
        let mut s = self.session().await?;
        self.inner
            .coll(collection)
            .find_one(filter)
            .session(&mut s)
            .await
            .map_err(|e| backend(&format!("find in {collection}"), e))
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
}

#[async_trait]
impl ReadModelStore for MongoReadModels {
    async fn apply(
        &self,
        consumer: &str,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        let items = check_items(consumer, items)?;
        if items.is_empty() {
            return Ok(vec![]);
        }
        let ctx = ApplyCtx {
            inner: &self.inner,
            consumer,
            items: &items,
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

    /// 1,000 (the default, stated): a page is one multi-document transaction of one round
    /// trip per change, which must end within the server's transaction lifetime (60 s by
    /// default).
    fn rebuild_page(&self) -> usize {
        1000
    }

    async fn reset(&self, projection: Projection) -> Result<(), ReadModelError> {
        let collections: &'static [&'static str] = match projection {
            Projection::Xp => &[XP],
            Projection::Leaderboard => &[LEADERBOARD, TREE],
            Projection::Quota => &[QUOTA, TIER],
            Projection::Content => &[CONTENT],
            Projection::Tags => &[TAGS],
        };
        let consumer = projection.to_string();
        let mut s = self.session().await?;
        let inner: &Inner = &self.inner;
        let out = txn::run(
            &mut s,
            "reset read model",
            (inner, collections, consumer.as_str()),
            |s, ctx| {
                let (inner, collections, consumer) = *ctx;
                async move {
                    for c in collections {
                        inner.coll(c).delete_many(doc! {}).session(&mut *s).await?;
                    }
                    for c in [GUARD, APPLIED] {
                        inner
                            .coll(c)
                            .delete_many(doc! { "consumer": consumer })
                            .session(&mut *s)
                            .await?;
                    }
                    inner
                        .coll(CHECKPOINT)
                        .delete_one(doc! { "_id": consumer })
                        .session(&mut *s)
                        .await?;
                    Ok(())
                }
                .boxed()
            },
        )
        .await;
        self.inner.clock.observe(&s);
        out
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ReadModelError> {
        self.find(
            CHECKPOINT,
            doc! {},
            FindOptions::builder().sort(doc! { "_id": 1 }).build(),
        )
        .await?
        .iter()
        .map(|d| {
            let get = |f: &str| {
                d.get_i64(f)
                    .map_err(|e| backend("corrupt checkpoint", e))
                    .and_then(|v| u64::try_from(v).map_err(|e| backend("corrupt checkpoint", e)))
            };
            Ok(Checkpoint {
                name: d
                    .get_str("_id")
                    .map_err(|e| backend("corrupt checkpoint", e))?
                    .to_string(),
                checkpoint: get("checkpoint")?,
                applied: get("applied")?,
            })
        })
        .collect()
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
        self.read_transaction("leaderboard page", |s, inner| {
            let inner: &Inner = inner;
            let board = board.clone();
            async move { ranks::page(inner, s, &board, limit, offset).await }.boxed()
        })
        .await
    }

    async fn rank(
        &self,
        board: &str,
        user_id: Uuid,
    ) -> Result<Option<LeaderboardRow>, ReadModelError> {
        let board = board.to_string();
        self.read_transaction("rank", |s, inner| {
            let inner: &Inner = inner;
            let board = board.clone();
            async move { ranks::rank(inner, s, &board, user_id).await }.boxed()
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
        self.read_transaction("around", |s, inner| {
            let inner: &Inner = inner;
            let board = board.clone();
            async move { ranks::around(inner, s, &board, user_id, k).await }.boxed()
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
    /// Runs `queries` in turn, each limited to what the page still lacks, until `limit`
    /// documents are read: one query alone in a causally consistent session, several in one
    /// read-only snapshot transaction (so a page is one snapshot).
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
                let mut docs = Vec::with_capacity(limit);
                for q in &queries {
                    if docs.len() >= limit {
                        break;
                    }
                    let cursor = inner
                        .coll(q.collection)
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
