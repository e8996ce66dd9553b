//! BSON mapping of read-model rows and changes, index specifications and query shapes, as
//! plain functions.
//!
//! Collections (all ids are BSON binary subtype 4 UUIDs, counters int64):
//!
//! | collection | key | fields |
//! |---|---|---|
//! | `rm_xp` | `_id` = user id | `xp`, `questions`, `answers`, `accepted_answers`; index `export` = `(_id -1)` |
//! | `rm_leaderboard` | unique `(board, user_id)` | `xp`; index `rank` = `(board 1, xp -1, user_id 1)` |
//! | `rm_content` | `_id` = content id | `kind`, `question_id`, `author_id` (null when unknown), `upvotes`, `downvotes`, `answer_count`, `comment_count`, `accepted_answer_id`; index `export` = `(_id -1)` |
//! | `rm_quota` | unique `(user_id, period)` | `tier`, `used`, `limit_units` (null = unlimited or unknown), `exceeded` |
//! | `rm_tier` | `_id` = user id | `tier` |
//! | `consumer_guard` | unique `(consumer, aggregate_id, aggregate_type)` | `last_sequence` |
//! | `consumer_checkpoint` | `_id` = consumer | `checkpoint`, `applied`; for a projection also `generation` (its live generation, absent = 0) and `state` (the key of its guard and applied documents, absent = the consumer's name) |
//! | `consumer_applied` | unique `(consumer, position)` | positions applied above the checkpoint |
//! | `consumer_rebuild` | `_id` = projection | the latest rebuild beside the live read model: `generation`, `phase` (`building`, `switched`, `cancelled`), `started_ms`, `finished_ms`, `checkpoint`, `applied` |
//!
//! Generation `N` ≥ 1 of a projection's collections (see the [module docs](super)) is named
//! like generation 0 with the suffix `_gN` (`rm_xp_g2`) and has the same indexes; the
//! consumer of a rebuild is `{projection}#g{N}` (`xp#g2`) in the `consumer_*` collections.

use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, Document};
use mongodb::IndexModel;
use tektree_domain::{level_for_xp, Tier};
use tektree_mongo::index_model;
use uuid::Uuid;

use crate::{
    check_export, int, Change, ContentDelta, ContentRow, ExportCursor, ExportKey, LeaderboardRow,
    QuotaRow, ReadModel, ReadModelError, TagRow, XpRow,
};

/// `rm_xp`.
pub const XP: &str = "rm_xp";
/// `rm_leaderboard`.
pub const LEADERBOARD: &str = "rm_leaderboard";
/// `rm_content`.
pub const CONTENT: &str = "rm_content";
/// `rm_quota`.
pub const QUOTA: &str = "rm_quota";
/// `rm_tier`.
pub const TIER: &str = "rm_tier";
/// `rm_tags` (`_id` is the tag).
pub const TAGS: &str = "rm_tags";
/// `consumer_guard`.
pub const GUARD: &str = "consumer_guard";
/// `consumer_checkpoint`.
pub const CHECKPOINT: &str = "consumer_checkpoint";
/// `consumer_applied`.
pub const APPLIED: &str = "consumer_applied";
/// `consumer_rebuild`: the latest rebuild beside the live read model of each projection.
pub const REBUILD: &str = "consumer_rebuild";
/// Every collection of the adapter that [`MongoReadModels::connect`](crate::MongoReadModels::connect)
/// creates (the read models' generation 0; later generations are created by
/// [`rebuild_begin`](crate::ReadModelStore::rebuild_begin)).
pub const COLLECTIONS: [&str; 11] = [
    XP,
    LEADERBOARD,
    crate::mongo::TREE,
    CONTENT,
    QUOTA,
    TIER,
    TAGS,
    GUARD,
    CHECKPOINT,
    APPLIED,
    REBUILD,
];

/// Name of the leaderboard ranking index `(board 1, xp -1, user_id 1)`.
pub const RANK_INDEX: &str = "rank";

/// Name of the `(_id -1)` index of `rm_xp`, `rm_content` and `rm_tags`, which export pages read (see
/// [`read_model_indexes`]).
pub const EXPORT_INDEX: &str = "export";

/// A (not partial) index of the read models.
fn index(keys: Document, name: &str, unique: bool) -> IndexModel {
    index_model(keys, name, unique, None)
}

/// The secondary indexes of each collection that has any (the others are keyed by `_id`):
///
/// - `rm_xp`, `rm_content`: [`EXPORT_INDEX`] `(_id -1)`, the export order (walked backwards).
///   MongoDB could read `_id` ranges from its `_id_` index alone, but SecantusDB's planner
///   never uses `_id_` for a range: without this index an export page of `{_id: {$gt: …}}`
///   is a collection scan there (a whole export of 35,000 `rm_xp` documents in pages of
///   1,000, measured on SecantusDB 0.7.0b3: 48 s without it, 11 s with it). `_id` never
///   changes, so an entry is written once per document (MongoDB skips unchanged index keys
///   on update);
/// - `rm_leaderboard`: unique `board_user` `(board, user_id)` (the upsert key) and
///   [`RANK_INDEX`] `(board 1, xp -1, user_id 1)`: the count trie's leaves are ranges of it,
///   a page reads it from the entry the trie finds, an export page is up to three ranges of
///   it ([`export_queries`]);
/// - `rm_leaderboard_tree`: unique [`TREE_INDEX`](crate::mongo::TREE_INDEX)
///   `(board, depth, prefix)`, the trie's nodes (a node's children are one range);
/// - `rm_quota`: unique `user_period` `(user_id, period)` (upsert key and export order);
/// - `consumer_guard`: unique `guard_key` `(consumer, aggregate_id, aggregate_type)` (one
///   `$in` query reads a batch's guards);
/// - `consumer_applied`: unique `applied_key` `(consumer, position)`.
pub fn read_model_indexes() -> Vec<(&'static str, Vec<IndexModel>)> {
    vec![
        (XP, vec![index(doc! { "_id": -1 }, EXPORT_INDEX, false)]),
        (
            CONTENT,
            vec![index(doc! { "_id": -1 }, EXPORT_INDEX, false)],
        ),
        (TAGS, vec![index(doc! { "_id": -1 }, EXPORT_INDEX, false)]),
        (
            LEADERBOARD,
            vec![
                index(doc! { "board": 1, "user_id": 1 }, "board_user", true),
                index(
                    doc! { "board": 1, "xp": -1, "user_id": 1 },
                    RANK_INDEX,
                    false,
                ),
            ],
        ),
        (
            crate::mongo::TREE,
            vec![index(
                doc! { "board": 1, "depth": 1, "prefix": 1 },
                crate::mongo::TREE_INDEX,
                true,
            )],
        ),
        (
            QUOTA,
            vec![index(
                doc! { "user_id": 1, "period": 1 },
                "user_period",
                true,
            )],
        ),
        (
            GUARD,
            vec![index(
                doc! { "consumer": 1, "aggregate_id": 1, "aggregate_type": 1 },
                "guard_key",
                true,
            )],
        ),
        (
            APPLIED,
            vec![index(
                doc! { "consumer": 1, "position": 1 },
                "applied_key",
                true,
            )],
        ),
    ]
}

/// A UUID as BSON binary subtype 4 (the event store's mapping, so ids compare equal across
/// the two adapters' collections).
pub use tektree_mongo::uuid_to_bson as uuid_bson;

fn opt_uuid_bson(id: Option<Uuid>) -> Bson {
    id.map_or(Bson::Null, uuid_bson)
}

fn corrupt(collection: &str, field: &str, reason: impl std::fmt::Display) -> ReadModelError {
    ReadModelError::Backend(format!(
        "corrupt {collection} document, field {field}: {reason}"
    ))
}

fn field<'a>(doc: &'a Document, collection: &str, name: &str) -> Result<&'a Bson, ReadModelError> {
    doc.get(name)
        .ok_or_else(|| corrupt(collection, name, "missing"))
}

fn uuid_at(doc: &Document, collection: &str, name: &str) -> Result<Uuid, ReadModelError> {
    match field(doc, collection, name)? {
        Bson::Binary(Binary {
            subtype: BinarySubtype::Uuid,
            bytes,
        }) => Uuid::from_slice(bytes).map_err(|e| corrupt(collection, name, e)),
        other => Err(corrupt(
            collection,
            name,
            format!("expected a UUID, found {:?}", other.element_type()),
        )),
    }
}

fn opt_uuid_at(
    doc: &Document,
    collection: &str,
    name: &str,
) -> Result<Option<Uuid>, ReadModelError> {
    match doc.get(name) {
        None | Some(Bson::Null) => Ok(None),
        Some(_) => uuid_at(doc, collection, name).map(Some),
    }
}

fn i64_at(doc: &Document, collection: &str, name: &str) -> Result<i64, ReadModelError> {
    match field(doc, collection, name)? {
        Bson::Int64(i) => Ok(*i),
        Bson::Int32(i) => Ok(i64::from(*i)),
        other => Err(corrupt(
            collection,
            name,
            format!("expected an integer, found {:?}", other.element_type()),
        )),
    }
}

fn u64_at(doc: &Document, collection: &str, name: &str) -> Result<u64, ReadModelError> {
    let v = i64_at(doc, collection, name)?;
    u64::try_from(v).map_err(|_| corrupt(collection, name, format!("negative value {v}")))
}

fn str_at<'a>(doc: &'a Document, collection: &str, name: &str) -> Result<&'a str, ReadModelError> {
    match field(doc, collection, name)? {
        Bson::String(s) => Ok(s),
        other => Err(corrupt(
            collection,
            name,
            format!("expected a string, found {:?}", other.element_type()),
        )),
    }
}

/// Parses a stored tier name.
pub fn tier_from_str(s: &str) -> Option<Tier> {
    [Tier::Free, Tier::Pro, Tier::Team, Tier::Enterprise]
        .into_iter()
        .find(|t| t.as_str() == s)
}

fn tier_at(doc: &Document, collection: &str, name: &str) -> Result<Tier, ReadModelError> {
    let s = str_at(doc, collection, name)?;
    tier_from_str(s).ok_or_else(|| corrupt(collection, name, format!("unknown tier {s:?}")))
}

/// An `rm_xp` document as its row.
///
/// # Errors
/// [`ReadModelError::Backend`] naming a missing or malformed field.
pub fn xp_row(doc: &Document) -> Result<XpRow, ReadModelError> {
    let xp = i64_at(doc, XP, "xp")?;
    Ok(XpRow {
        user_id: uuid_at(doc, XP, "_id")?,
        xp,
        level: level_for_xp(xp),
        questions: u64_at(doc, XP, "questions")?,
        answers: u64_at(doc, XP, "answers")?,
        accepted_answers: u64_at(doc, XP, "accepted_answers")?,
    })
}

/// An `rm_content` document as its row.
///
/// # Errors
/// [`ReadModelError::Backend`] naming a missing or malformed field.
pub fn content_row(doc: &Document) -> Result<ContentRow, ReadModelError> {
    let upvotes = i64_at(doc, CONTENT, "upvotes")?;
    let downvotes = i64_at(doc, CONTENT, "downvotes")?;
    let kind = match doc.get("kind") {
        None | Some(Bson::Null) => None,
        Some(_) => Some(str_at(doc, CONTENT, "kind")?.to_string()),
    };
    Ok(ContentRow {
        content_id: uuid_at(doc, CONTENT, "_id")?,
        kind,
        question_id: opt_uuid_at(doc, CONTENT, "question_id")?,
        author_id: opt_uuid_at(doc, CONTENT, "author_id")?,
        score: upvotes - downvotes,
        upvotes,
        downvotes,
        answer_count: i64_at(doc, CONTENT, "answer_count")?,
        comment_count: i64_at(doc, CONTENT, "comment_count")?,
        accepted_answer_id: opt_uuid_at(doc, CONTENT, "accepted_answer_id")?,
    })
}

/// An `rm_tags` document as its row.
///
/// # Errors
/// [`ReadModelError::Backend`] naming a missing or malformed field.
pub fn tag_row(doc: &Document) -> Result<TagRow, ReadModelError> {
    Ok(TagRow {
        tag: str_at(doc, TAGS, "_id")?.to_string(),
        questions: u64_at(doc, TAGS, "questions")?,
        answers: u64_at(doc, TAGS, "answers")?,
    })
}

/// An `rm_quota` document as its row.
///
/// # Errors
/// [`ReadModelError::Backend`] naming a missing or malformed field.
pub fn quota_row(doc: &Document) -> Result<QuotaRow, ReadModelError> {
    let limit = match doc.get("limit_units") {
        None | Some(Bson::Null) => None,
        Some(_) => Some(u64_at(doc, QUOTA, "limit_units")?),
    };
    let exceeded = match field(doc, QUOTA, "exceeded")? {
        Bson::Boolean(b) => *b,
        other => {
            return Err(corrupt(
                QUOTA,
                "exceeded",
                format!("expected a boolean, found {:?}", other.element_type()),
            ))
        }
    };
    Ok(QuotaRow {
        user_id: uuid_at(doc, QUOTA, "user_id")?,
        period: str_at(doc, QUOTA, "period")?.to_string(),
        tier: tier_at(doc, QUOTA, "tier")?,
        used: u64_at(doc, QUOTA, "used")?,
        limit,
        exceeded,
    })
}

/// An `rm_leaderboard` document (or index-covered projection `{user_id, xp}`) with its rank.
///
/// # Errors
/// [`ReadModelError::Backend`] naming a missing or malformed field.
pub fn leaderboard_row(
    board: &str,
    rank: u64,
    doc: &Document,
) -> Result<LeaderboardRow, ReadModelError> {
    Ok(LeaderboardRow {
        board: board.to_string(),
        rank,
        user_id: uuid_at(doc, LEADERBOARD, "user_id")?,
        xp: i64_at(doc, LEADERBOARD, "xp")?,
    })
}

/// The `rm_tier` tier of a document, if it has a valid one.
pub fn tier_of(doc: &Document) -> Option<Tier> {
    tier_at(doc, TIER, "tier").ok()
}

/// An update or pipeline update.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Update operators (`$inc`, `$set`).
    Modifier(Document),
    /// An aggregation-pipeline update (for set-if-null and maximum-by-tuple rules).
    Pipeline(Vec<Document>),
}

/// One upsert that applies a [`Change`].
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    /// Collection.
    pub collection: &'static str,
    /// Equality filter on the row's key (copied into a newly inserted document).
    pub filter: Document,
    /// The update.
    pub update: Update,
}

/// `$literal` wrapper: user text inside a pipeline is never read as a field path or operator.
fn lit(v: impl Into<Bson>) -> Bson {
    Bson::Document(doc! { "$literal": v.into() })
}

/// `{$add: [{$ifNull: ["$f", 0]}, delta]}`.
fn add(field: &str, delta: i64) -> Document {
    doc! { "$add": [{ "$ifNull": [format!("${field}"), 0_i64] }, delta] }
}

/// `{$ifNull: ["$f", value]}`: keeps a fact once known (SQL `COALESCE(f, value)`).
fn keep(field: &str, value: Bson) -> Document {
    doc! { "$ifNull": [format!("${field}"), lit(value)] }
}

/// The commutative upsert that applies `change`. For [`Change::QuotaExceeded`], `current_tier`
/// is the user's tier from `rm_tier` (a placeholder row takes it, or `free`).
///
/// Rules (the same as the SQLite adapter's):
/// - xp, leaderboard, tags: `$inc`;
/// - content: counters add, facts are set only while null (`$ifNull`);
/// - usage: `used` is a maximum; `tier` and `limit_units` come from the record greatest in
///   `(used, tier, limit_units ?? -1)` order; a new row takes the record; `exceeded` is kept;
/// - quota exceeded: sets `exceeded`, creating a placeholder (used 0, `current_tier` or free,
///   unknown limit) when the period has no row;
/// - tier: `$set`.
///
/// # Errors
/// [`ReadModelError::Invalid`] for `used` or `limit` beyond `i64::MAX`.
pub fn change_upsert(
    change: &Change,
    current_tier: Option<Tier>,
) -> Result<Upsert, ReadModelError> {
    Ok(match change {
        Change::Xp {
            user_id,
            xp,
            questions,
            answers,
            accepted_answers,
        } => Upsert {
            collection: XP,
            filter: doc! { "_id": uuid_bson(*user_id) },
            update: Update::Modifier(doc! { "$inc": {
                "xp": xp, "questions": questions, "answers": answers,
                "accepted_answers": accepted_answers,
            } }),
        },
        Change::Tag {
            tag,
            questions,
            answers,
        } => Upsert {
            collection: TAGS,
            filter: doc! { "_id": tag.as_str() },
            update: Update::Modifier(
                doc! { "$inc": { "questions": questions, "answers": answers } },
            ),
        },
        Change::Leaderboard { board, user_id, xp } => Upsert {
            collection: LEADERBOARD,
            filter: doc! { "board": board.as_str(), "user_id": uuid_bson(*user_id) },
            update: Update::Modifier(doc! { "$inc": { "xp": xp } }),
        },
        Change::Content(ContentDelta {
            content_id,
            kind,
            question_id,
            author_id,
            upvotes,
            downvotes,
            answers,
            comments,
            accepted_answer_id,
        }) => Upsert {
            collection: CONTENT,
            filter: doc! { "_id": uuid_bson(*content_id) },
            update: Update::Pipeline(vec![doc! { "$set": {
                "kind": keep("kind", kind.map_or(Bson::Null, |k| Bson::String(k.to_string()))),
                "question_id": keep("question_id", opt_uuid_bson(*question_id)),
                "author_id": keep("author_id", opt_uuid_bson(*author_id)),
                "upvotes": add("upvotes", *upvotes),
                "downvotes": add("downvotes", *downvotes),
                "answer_count": add("answer_count", *answers),
                "comment_count": add("comment_count", *comments),
                "accepted_answer_id": keep("accepted_answer_id", opt_uuid_bson(*accepted_answer_id)),
            } }]),
        },
        Change::Usage {
            user_id,
            period,
            tier,
            used,
            limit,
        } => {
            let used = int(*used, "used")?;
            let limit = limit.map(|l| int(l, "limit")).transpose()?;
            let tier = tier.as_str();
            let limit_or_minus_one = limit.unwrap_or(-1);
            let limit_bson = limit.map_or(Bson::Null, Bson::Int64);
            Upsert {
                collection: QUOTA,
                filter: doc! { "user_id": uuid_bson(*user_id), "period": period.as_str() },
                update: Update::Pipeline(vec![
                    doc! { "$set": { "_take": { "$or": [
                        { "$eq": [{ "$type": "$used" }, "missing"] },
                        { "$gt": [used, "$used"] },
                        { "$and": [
                            { "$eq": [used, "$used"] },
                            { "$gt": [lit(tier), "$tier"] },
                        ] },
                        { "$and": [
                            { "$eq": [used, "$used"] },
                            { "$eq": [lit(tier), "$tier"] },
                            { "$gt": [limit_or_minus_one, { "$ifNull": ["$limit_units", -1_i64] }] },
                        ] },
                    ] } } },
                    doc! { "$set": {
                        "tier": { "$cond": ["$_take", lit(tier), "$tier"] },
                        "limit_units": { "$cond": ["$_take", lit(limit_bson), "$limit_units"] },
                        "used": { "$max": [used, { "$ifNull": ["$used", used] }] },
                        "exceeded": { "$ifNull": ["$exceeded", false] },
                    } },
                    doc! { "$unset": "_take" },
                ]),
            }
        }
        Change::QuotaExceeded { user_id, period } => Upsert {
            collection: QUOTA,
            filter: doc! { "user_id": uuid_bson(*user_id), "period": period.as_str() },
            update: Update::Pipeline(vec![doc! { "$set": {
                "tier": keep("tier", Bson::String(current_tier.unwrap_or(Tier::Free).as_str().to_string())),
                "used": { "$ifNull": ["$used", 0_i64] },
                "limit_units": { "$ifNull": ["$limit_units", Bson::Null] },
                "exceeded": true,
            } }]),
        },
        Change::Tier { user_id, tier } => Upsert {
            collection: TIER,
            filter: doc! { "_id": uuid_bson(*user_id) },
            update: Update::Modifier(doc! { "$set": { "tier": tier.as_str() } }),
        },
    })
}

/// One range read of an export page: the arguments of a `find`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportQuery {
    /// Collection.
    pub collection: &'static str,
    /// Filter: a range of the export index (equalities on its leading fields, then one
    /// `$gt` / `$lt` bound); never `$or` or `$in`, which SecantusDB's planner answers with a
    /// collection scan on a compound index.
    pub filter: Document,
    /// The export order, which the index gives.
    pub sort: Document,
    /// Fields returned; `None` for the whole document.
    pub projection: Option<Document>,
}

/// The range reads of an export page of `model` after `after`, in export order: the adapter
/// runs them in turn, each limited to what the page still lacks, until the page is full. A
/// cursor of another model is refused.
///
/// | model | from the start | after the cursor's key |
/// |---|---|---|
/// | xp, content | `{}` by `_id` | `{_id: {$gt: id}}` by `_id` ([`EXPORT_INDEX`]) |
/// | quota | `{}` by `(user_id, period)` | `{user_id: u, period: {$gt: p}}`, then `{user_id: {$gt: u}}` (`user_period`) |
/// | leaderboard | `{}` by `(board, xp desc, user_id)` | `{board: b, xp: x, user_id: {$gt: u}}`, then `{board: b, xp: {$lt: x}}`, then `{board: {$gt: b}}` ([`RANK_INDEX`]) |
///
/// Leaderboard reads return only the ranking index's fields (`board`, `xp`, `user_id`).
///
/// # Errors
/// [`ReadModelError::Invalid`] when `after` is a cursor of another model.
pub fn export_queries(
    model: ReadModel,
    after: Option<&ExportCursor>,
) -> Result<Vec<ExportQuery>, ReadModelError> {
    let after = check_export(model, after, 1)?;
    let q = |collection, filter, sort: Document| ExportQuery {
        collection,
        filter,
        sort,
        projection: None,
    };
    let by_id = doc! { "_id": 1 };
    let by_user_period = doc! { "user_id": 1, "period": 1 };
    Ok(match (model, after) {
        (ReadModel::Xp, Some(ExportKey::Xp { user_id })) => {
            vec![q(XP, doc! { "_id": { "$gt": uuid_bson(user_id) } }, by_id)]
        }
        (ReadModel::Xp, _) => vec![q(XP, doc! {}, by_id)],
        (ReadModel::Content, Some(ExportKey::Content { content_id })) => {
            vec![q(
                CONTENT,
                doc! { "_id": { "$gt": uuid_bson(content_id) } },
                by_id,
            )]
        }
        (ReadModel::Content, _) => vec![q(CONTENT, doc! {}, by_id)],
        (ReadModel::Tags, Some(ExportKey::Tags { tag })) => {
            vec![q(TAGS, doc! { "_id": { "$gt": tag } }, by_id)]
        }
        (ReadModel::Tags, _) => vec![q(TAGS, doc! {}, by_id)],
        (ReadModel::Quota, Some(ExportKey::Quota { user_id, period })) => vec![
            q(
                QUOTA,
                doc! { "user_id": uuid_bson(user_id), "period": { "$gt": period } },
                by_user_period.clone(),
            ),
            q(
                QUOTA,
                doc! { "user_id": { "$gt": uuid_bson(user_id) } },
                by_user_period,
            ),
        ],
        (ReadModel::Quota, _) => vec![q(QUOTA, doc! {}, by_user_period)],
        (ReadModel::Leaderboard, after) => leaderboard_export_queries(after),
    })
}

/// [`export_queries`] of the leaderboard after `after` (a leaderboard key or `None`).
fn leaderboard_export_queries(after: Option<ExportKey>) -> Vec<ExportQuery> {
    let filters = match after {
        Some(ExportKey::Leaderboard {
            board, xp, user_id, ..
        }) => vec![
            doc! { "board": &board, "xp": xp, "user_id": { "$gt": uuid_bson(user_id) } },
            doc! { "board": &board, "xp": { "$lt": xp } },
            doc! { "board": { "$gt": &board } },
        ],
        _ => vec![doc! {}],
    };
    filters
        .into_iter()
        .map(|filter| ExportQuery {
            collection: LEADERBOARD,
            filter,
            sort: doc! { "board": 1, "xp": -1, "user_id": 1 },
            projection: Some(doc! { "_id": 0, "board": 1, "user_id": 1, "xp": 1 }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_the_documented_ones() {
        let all = read_model_indexes();
        let find = |coll: &str, name: &str| {
            let (_, models) = all.iter().find(|(c, _)| *c == coll).unwrap();
            let m = models
                .iter()
                .find(|m| m.options.as_ref().and_then(|o| o.name.as_deref()) == Some(name))
                .unwrap_or_else(|| panic!("{coll}.{name}"));
            let keys: Vec<(String, Bson)> =
                m.keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            (keys, m.options.as_ref().unwrap().unique == Some(true))
        };
        let k = |pairs: &[(&str, i32)]| -> Vec<(String, Bson)> {
            pairs
                .iter()
                .map(|(f, d)| (f.to_string(), Bson::Int32(*d)))
                .collect()
        };
        assert_eq!(
            find(LEADERBOARD, RANK_INDEX),
            (k(&[("board", 1), ("xp", -1), ("user_id", 1)]), false)
        );
        for coll in [XP, CONTENT] {
            assert_eq!(find(coll, EXPORT_INDEX), (k(&[("_id", -1)]), false));
        }
        assert_eq!(
            find(LEADERBOARD, "board_user"),
            (k(&[("board", 1), ("user_id", 1)]), true)
        );
        assert_eq!(
            find(QUOTA, "user_period"),
            (k(&[("user_id", 1), ("period", 1)]), true)
        );
        assert_eq!(
            find(GUARD, "guard_key"),
            (
                k(&[("consumer", 1), ("aggregate_id", 1), ("aggregate_type", 1)]),
                true
            )
        );
        assert_eq!(
            find(APPLIED, "applied_key"),
            (k(&[("consumer", 1), ("position", 1)]), true)
        );
        for (coll, _) in &all {
            assert!(COLLECTIONS.contains(coll));
        }
    }

    /// Field names a filter, sort or projection mentions (top level and inside `$match`).
    fn fields(d: &Document) -> Vec<String> {
        d.keys().filter(|k| !k.starts_with('$')).cloned().collect()
    }

    /// Operator names anywhere in a filter.
    fn operators(d: &Document, out: &mut Vec<String>) {
        for (k, v) in d {
            if k.starts_with('$') {
                out.push(k.clone());
            }
            if let Bson::Document(inner) = v {
                operators(inner, out);
            }
        }
    }

    #[test]
    fn export_pages_are_ranges_of_their_index_in_its_order() {
        let u = Uuid::from_u128(7);
        let cursor = |k: ExportKey| ExportCursor(k);
        let lb = cursor(ExportKey::Leaderboard {
            board: "tag:rust".into(),
            xp: 5,
            user_id: u,
            rank: 3,
        });
        const ID: &[&str] = &["_id"];
        const USER_PERIOD: &[&str] = &["user_id", "period"];
        const RANK: &[&str] = &["board", "xp", "user_id"];
        let xp = cursor(ExportKey::Xp { user_id: u });
        let content = cursor(ExportKey::Content { content_id: u });
        let quota = cursor(ExportKey::Quota {
            user_id: u,
            period: "2024-05".into(),
        });
        let cases = [
            (ReadModel::Xp, None, 1, ID),
            (ReadModel::Xp, Some(&xp), 1, ID),
            (ReadModel::Content, Some(&content), 1, ID),
            (ReadModel::Quota, None, 1, USER_PERIOD),
            (ReadModel::Quota, Some(&quota), 2, USER_PERIOD),
            (ReadModel::Leaderboard, None, 1, RANK),
            (ReadModel::Leaderboard, Some(&lb), 3, RANK),
        ];
        for (model, after, n, key) in cases {
            let queries = export_queries(model, after).unwrap();
            assert_eq!(queries.len(), n, "{model:?}");
            for q in &queries {
                let sort: Vec<&str> = q.sort.keys().map(String::as_str).collect();
                assert_eq!(sort, key, "{model:?}: sorted in key order");
                for f in fields(&q.filter) {
                    assert!(key.contains(&f.as_str()), "{model:?}: {f}");
                }
                let mut ops = vec![];
                operators(&q.filter, &mut ops);
                assert!(ops.len() <= 1, "{model:?}: {ops:?}");
                assert!(
                    ops.iter().all(|o| o == "$gt" || o == "$lt"),
                    "{model:?}: {ops:?}"
                );
            }
        }
        let lb = export_queries(ReadModel::Leaderboard, Some(&lb)).unwrap();
        assert_eq!(
            lb.iter().map(|q| q.filter.clone()).collect::<Vec<_>>(),
            vec![
                doc! { "board": "tag:rust", "xp": 5_i64, "user_id": { "$gt": uuid_bson(u) } },
                doc! { "board": "tag:rust", "xp": { "$lt": 5_i64 } },
                doc! { "board": { "$gt": "tag:rust" } },
            ]
        );
        assert_eq!(
            lb[0].projection,
            Some(doc! { "_id": 0, "board": 1, "user_id": 1, "xp": 1 }),
            "covered by the ranking index"
        );
        assert!(matches!(
            export_queries(ReadModel::Xp, Some(&content)),
            Err(ReadModelError::Invalid(_))
        ));
    }

    #[test]
    fn counters_are_increments_and_facts_are_set_once() {
        let u = Uuid::from_u128(1);
        let up = change_upsert(
            &Change::Xp {
                user_id: u,
                xp: -2,
                questions: 1,
                answers: 0,
                accepted_answers: 0,
            },
            None,
        )
        .unwrap();
        assert_eq!(up.collection, XP);
        assert_eq!(up.filter, doc! { "_id": uuid_bson(u) });
        assert_eq!(
            up.update,
            Update::Modifier(doc! { "$inc": {
                "xp": -2_i64, "questions": 1_i64, "answers": 0_i64, "accepted_answers": 0_i64,
            } })
        );
        let up = change_upsert(
            &Change::Leaderboard {
                board: "$weird".into(),
                user_id: u,
                xp: 3,
            },
            None,
        )
        .unwrap();
        assert_eq!(
            up.filter,
            doc! { "board": "$weird", "user_id": uuid_bson(u) }
        );
        assert_eq!(
            up.update,
            Update::Modifier(doc! { "$inc": { "xp": 3_i64 } })
        );
        let up = change_upsert(
            &Change::Content(ContentDelta {
                content_id: u,
                kind: Some("question"),
                upvotes: 1,
                ..Default::default()
            }),
            None,
        )
        .unwrap();
        let Update::Pipeline(stages) = up.update else {
            panic!("content is a pipeline update")
        };
        let set = stages[0].get_document("$set").unwrap();
        assert_eq!(
            set.get_document("kind").unwrap(),
            &doc! { "$ifNull": ["$kind", { "$literal": "question" }] }
        );
        assert_eq!(
            set.get_document("author_id").unwrap(),
            &doc! { "$ifNull": ["$author_id", { "$literal": Bson::Null }] }
        );
        assert_eq!(
            set.get_document("upvotes").unwrap(),
            &doc! { "$add": [{ "$ifNull": ["$upvotes", 0_i64] }, 1_i64] }
        );
    }

    #[test]
    fn quota_upserts_compare_the_usage_tuple_and_keep_the_flag() {
        let u = Uuid::from_u128(2);
        let usage = |used, limit| Change::Usage {
            user_id: u,
            period: "2024-05".into(),
            tier: Tier::Pro,
            used,
            limit,
        };
        let up = change_upsert(&usage(3, Some(1000)), None).unwrap();
        assert_eq!(up.collection, QUOTA);
        assert_eq!(
            up.filter,
            doc! { "user_id": uuid_bson(u), "period": "2024-05" }
        );
        let Update::Pipeline(stages) = up.update else {
            panic!()
        };
        assert_eq!(stages.len(), 3);
        let take = stages[0]
            .get_document("$set")
            .unwrap()
            .get_document("_take")
            .unwrap();
        let or = take.get_array("$or").unwrap();
        assert_eq!(or.len(), 4, "new row, or (used, tier, limit) greater");
        let set = stages[1].get_document("$set").unwrap();
        assert_eq!(
            set.get_document("used").unwrap(),
            &doc! { "$max": [3_i64, { "$ifNull": ["$used", 3_i64] }] }
        );
        assert_eq!(
            set.get_document("limit_units").unwrap(),
            &doc! { "$cond": ["$_take", { "$literal": 1000_i64 }, "$limit_units"] }
        );
        assert_eq!(stages[2], doc! { "$unset": "_take" });
        // Unlimited compares as -1, as in SQL COALESCE(limit, -1).
        let Update::Pipeline(stages) = change_upsert(&usage(3, None), None).unwrap().update else {
            panic!()
        };
        let text = format!("{:?}", stages[0]);
        assert!(text.contains("Int64(-1)"), "{text}");
        assert!(matches!(
            change_upsert(&usage(u64::MAX, None), None),
            Err(ReadModelError::Invalid(_))
        ));
        assert!(matches!(
            change_upsert(&usage(1, Some(u64::MAX)), None),
            Err(ReadModelError::Invalid(_))
        ));

        let exceeded = Change::QuotaExceeded {
            user_id: u,
            period: "2024-05".into(),
        };
        for (tier, name) in [(Some(Tier::Team), "team"), (None, "free")] {
            let Update::Pipeline(stages) = change_upsert(&exceeded, tier).unwrap().update else {
                panic!()
            };
            let set = stages[0].get_document("$set").unwrap();
            assert!(set.get_bool("exceeded").unwrap());
            assert_eq!(
                set.get_document("tier").unwrap(),
                &doc! { "$ifNull": ["$tier", { "$literal": name }] }
            );
        }
    }

    #[test]
    fn rows_decode_from_documents_and_name_bad_fields() {
        let u = Uuid::from_u128(3);
        let xp = doc! { "_id": uuid_bson(u), "xp": 450_i64, "questions": 1_i64, "answers": 2_i32,
        "accepted_answers": 0_i64 };
        assert_eq!(
            xp_row(&xp).unwrap(),
            XpRow {
                user_id: u,
                xp: 450,
                level: 3,
                questions: 1,
                answers: 2,
                accepted_answers: 0
            }
        );
        let mut bad = xp.clone();
        bad.insert("answers", -1_i64);
        assert!(xp_row(&bad).unwrap_err().to_string().contains("answers"));

        let content = doc! {
            "_id": uuid_bson(u), "kind": "answer", "question_id": uuid_bson(Uuid::nil()),
            "author_id": Bson::Null, "upvotes": 3_i64, "downvotes": 5_i64, "answer_count": 0_i64,
            "comment_count": 1_i64, "accepted_answer_id": Bson::Null,
        };
        let row = content_row(&content).unwrap();
        assert_eq!((row.score, row.kind.as_deref()), (-2, Some("answer")));
        assert_eq!((row.question_id, row.author_id), (Some(Uuid::nil()), None));

        let quota = doc! {
            "user_id": uuid_bson(u), "period": "2024-05", "tier": "enterprise", "used": 7_i64,
            "limit_units": Bson::Null, "exceeded": false,
        };
        assert_eq!(
            quota_row(&quota).unwrap(),
            QuotaRow {
                user_id: u,
                period: "2024-05".into(),
                tier: Tier::Enterprise,
                used: 7,
                limit: None,
                exceeded: false
            }
        );
        let mut bad = quota;
        bad.insert("tier", "gold");
        assert!(quota_row(&bad).unwrap_err().to_string().contains("tier"));

        let entry = doc! { "user_id": uuid_bson(u), "xp": -4_i64 };
        assert_eq!(
            leaderboard_row("all-time", 9, &entry).unwrap(),
            LeaderboardRow {
                board: "all-time".into(),
                rank: 9,
                user_id: u,
                xp: -4
            }
        );
        assert_eq!(tier_of(&doc! { "tier": "pro" }), Some(Tier::Pro));
        assert_eq!(tier_of(&doc! {}), None);
    }

    /// BSON binary UUIDs of equal length and subtype sort by their bytes, which is the order of
    /// the SQLite adapter's lower-case hyphenated text and of `Uuid`'s `Ord`.
    #[test]
    fn uuid_bytes_order_is_text_order() {
        let mut ids: Vec<Uuid> = (0..64u128)
            .map(|i| Uuid::from_u128(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)))
            .collect();
        ids.sort();
        let mut text: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
        text.sort();
        assert_eq!(text, ids.iter().map(|u| u.to_string()).collect::<Vec<_>>());
        let mut bytes: Vec<[u8; 16]> = ids.iter().map(|u| *u.as_bytes()).collect();
        bytes.sort();
        assert_eq!(bytes, ids.iter().map(|u| *u.as_bytes()).collect::<Vec<_>>());
    }
}
