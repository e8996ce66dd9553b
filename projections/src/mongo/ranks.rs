//! The count trie of [`crate::rank_tree`] in collection [`TREE`], read and written with the
//! operations of the caller's session (inside its transaction), on one generation of the
//! leaderboard's collections ([`Ranking`]: [`LEADERBOARD`] and [`TREE`], or their
//! `_gN` versions, see the [module docs](super)).

use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use mongodb::options::{Hint, ReturnDocument};
use mongodb::{ClientSession, Collection};
use uuid::Uuid;

use super::generations::collection_name;
use super::{collect, corrupt, Inner, TxError};
use crate::mongo::mapping::{leaderboard_row, uuid_bson, LEADERBOARD, RANK_INDEX};
use crate::rank_tree::{self, child, rows, Child, RankNodes, UpperCounts};
use crate::LeaderboardRow;

/// `rm_leaderboard_tree`: one document per trie node, `{board, depth, prefix (binary), n,
/// split}`, unique index [`TREE_INDEX`] `(board, depth, prefix)` (generation `N` ≥ 1 of the
/// leaderboard: `rm_leaderboard_tree_gN`).
pub const TREE: &str = "rm_leaderboard_tree";

/// Name of the unique `(board 1, depth 1, prefix 1)` index of [`TREE`]: a node's key, and its
/// children are one range of it (binary values of one length compare bytewise).
pub const TREE_INDEX: &str = "node";

/// The collections of one generation of the leaderboard: its entries ([`LEADERBOARD`]) and
/// its count trie ([`TREE`]).
pub(super) struct Ranking {
    entries: Collection<Document>,
    tree: Collection<Document>,
}

impl Ranking {
    /// The collections of generation `generation`.
    pub(super) fn of(inner: &Inner, generation: u64) -> Self {
        Ranking {
            entries: inner.coll(&collection_name(LEADERBOARD, generation)),
            tree: inner.coll(&collection_name(TREE, generation)),
        }
    }
}

/// [`RankNodes`] on a MongoDB session, on one generation of the leaderboard.
pub(super) struct MongoNodes<'a> {
    r: &'a Ranking,
    s: &'a mut ClientSession,
}

fn bin(bytes: Vec<u8>) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes,
    })
}

fn node_filter(board: &str, prefix: &[u8]) -> Document {
    doc! { "board": board, "depth": prefix.len() as i32, "prefix": bin(prefix.to_vec()) }
}

/// The filter of the children of `prefix` with digits `lo..=hi`.
fn children_filter(board: &str, prefix: &[u8], lo: u8, hi: u8) -> Document {
    doc! {
        "board": board,
        "depth": prefix.len() as i32 + 1,
        "prefix": { "$gte": bin(child(prefix, lo)), "$lte": bin(child(prefix, hi)) },
    }
}

/// The rank order of [`RANK_INDEX`].
fn rank_sort() -> Document {
    doc! { "board": 1, "xp": -1, "user_id": 1 }
}

/// The fields an entry read returns: only [`RANK_INDEX`]'s.
fn rank_projection() -> Document {
    doc! { "_id": 0, "user_id": 1, "xp": 1 }
}

/// Entries of `board` with `xp` and an id in `lo..=hi`.
fn between_filter(board: &str, xp: i64, lo: Uuid, hi: Uuid) -> Document {
    doc! { "board": board, "xp": xp, "user_id": { "$gte": uuid_bson(lo), "$lte": uuid_bson(hi) } }
}

/// Entries of `board` with `xp` and an id from `user_id` on.
fn ties_from_filter(board: &str, xp: i64, user_id: Uuid) -> Document {
    doc! { "board": board, "xp": xp, "user_id": { "$gte": uuid_bson(user_id) } }
}

/// Entries of `board` with less than `xp`.
fn below_filter(board: &str, xp: i64) -> Document {
    doc! { "board": board, "xp": { "$lt": xp } }
}

/// The `find` commands the trie runs for a rank, a page and a split on `board` (with sample
/// bounds), built from the same filters, sorts and hints: what a plan test explains.
pub fn planned_finds(board: &str) -> Vec<Document> {
    let k = rank_tree::key(5, Uuid::nil());
    let leaf = &k[..rank_tree::XP_BYTES];
    let (lo, hi) = rank_tree::id_range(leaf);
    vec![
        doc! { "find": TREE, "filter": children_filter(board, leaf, 0, 0xff),
        "sort": { "board": 1, "depth": 1, "prefix": 1 }, "hint": TREE_INDEX },
        doc! { "find": TREE, "filter": children_filter(board, leaf, 0, 0x7f),
        "projection": { "_id": 0, "n": 1, "split": 1 }, "hint": TREE_INDEX },
        doc! { "find": TREE, "filter": node_filter(board, leaf) },
        doc! { "find": LEADERBOARD, "filter": between_filter(board, 5, lo, hi),
        "sort": rank_sort(), "projection": rank_projection(), "hint": RANK_INDEX },
        doc! { "find": LEADERBOARD, "filter": ties_from_filter(board, 5, lo),
        "sort": rank_sort(), "projection": rank_projection(), "hint": RANK_INDEX,
        "limit": 20_i64 },
        doc! { "find": LEADERBOARD, "filter": below_filter(board, 5),
        "sort": rank_sort(), "projection": rank_projection(), "hint": RANK_INDEX,
        "limit": 20_i64 },
    ]
}

fn count_of(d: &Document) -> Result<(i64, bool), TxError> {
    let n = d.get_i64("n").map_err(|e| corrupt("rank node", e))?;
    let split = d.get_bool("split").map_err(|e| corrupt("rank node", e))?;
    Ok((n, split))
}

impl MongoNodes<'_> {
    /// `board`'s entries matching `filter` (on [`RANK_INDEX`] fields) in rank order, as
    /// `(user_id, xp)`.
    async fn entries(
        &mut self,
        filter: Document,
        limit: Option<i64>,
    ) -> Result<Vec<(Uuid, i64)>, TxError> {
        let cursor = self
            .r
            .entries
            .find(filter)
            .sort(rank_sort())
            .projection(rank_projection())
            .hint(Hint::Name(RANK_INDEX.to_string()))
            .limit(limit.unwrap_or(0))
            .session(&mut *self.s)
            .await?;
        collect(cursor, self.s)
            .await?
            .iter()
            .map(|d| {
                let row = leaderboard_row("", 0, d).map_err(TxError::Abort)?;
                Ok((row.user_id, row.xp))
            })
            .collect()
    }
}

impl RankNodes for MongoNodes<'_> {
    type Error = TxError;

    fn corrupt(what: String) -> TxError {
        corrupt("leaderboard rank tree", what)
    }

    async fn add(
        &mut self,
        board: &str,
        prefix: &[u8],
        delta: i64,
    ) -> Result<(i64, bool), TxError> {
        let d = self
            .r
            .tree
            .find_one_and_update(
                node_filter(board, prefix),
                doc! { "$inc": { "n": delta }, "$setOnInsert": { "split": false } },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .session(&mut *self.s)
            .await?;
        match d {
            Some(d) => count_of(&d),
            None => Err(Self::corrupt("an upsert returned no node".into())),
        }
    }

    async fn split(
        &mut self,
        board: &str,
        prefix: &[u8],
        children: &[(u8, i64)],
    ) -> Result<(), TxError> {
        let tree = &self.r.tree;
        tree.update_one(
            node_filter(board, prefix),
            doc! { "$set": { "split": true } },
        )
        .session(&mut *self.s)
        .await?;
        if children.is_empty() {
            return Ok(());
        }
        let docs = children.iter().map(|(digit, n)| {
            let mut d = node_filter(board, &child(prefix, *digit));
            d.insert("n", *n);
            d.insert("split", false);
            d
        });
        tree.insert_many(docs).session(&mut *self.s).await?;
        Ok(())
    }

    async fn node(&mut self, board: &str, prefix: &[u8]) -> Result<Option<(i64, bool)>, TxError> {
        self.r
            .tree
            .find_one(node_filter(board, prefix))
            .session(&mut *self.s)
            .await?
            .as_ref()
            .map(count_of)
            .transpose()
    }

    async fn children(&mut self, board: &str, prefix: &[u8]) -> Result<Vec<Child>, TxError> {
        let cursor = self
            .r
            .tree
            .find(children_filter(board, prefix, 0, 0xff))
            .sort(doc! { "board": 1, "depth": 1, "prefix": 1 })
            .hint(Hint::Name(TREE_INDEX.to_string()))
            .session(&mut *self.s)
            .await?;
        collect(cursor, self.s)
            .await?
            .iter()
            .map(|d| {
                let (n, split) = count_of(d)?;
                let digit = match d.get("prefix") {
                    Some(Bson::Binary(b)) => b.bytes.last().copied(),
                    _ => None,
                };
                let digit = digit.ok_or_else(|| corrupt("rank node", "prefix is not binary"))?;
                Ok(Child { digit, n, split })
            })
            .collect()
    }

    async fn sum_before(&mut self, board: &str, prefix: &[u8], digit: u8) -> Result<i64, TxError> {
        if digit == 0 {
            return Ok(0);
        }
        let cursor = self
            .r
            .tree
            .find(children_filter(board, prefix, 0, digit - 1))
            .projection(doc! { "_id": 0, "n": 1, "split": 1 })
            .hint(Hint::Name(TREE_INDEX.to_string()))
            .session(&mut *self.s)
            .await?;
        let mut total = 0;
        for d in collect(cursor, self.s).await? {
            total += count_of(&d)?.0;
        }
        Ok(total)
    }

    async fn entries_between(
        &mut self,
        board: &str,
        xp: i64,
        lo: Uuid,
        hi: Uuid,
    ) -> Result<Vec<Uuid>, TxError> {
        Ok(self
            .entries(between_filter(board, xp, lo, hi), None)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    async fn count_between(
        &mut self,
        board: &str,
        xp: i64,
        lo: Uuid,
        user_id: Uuid,
    ) -> Result<i64, TxError> {
        let filter = doc! {
            "board": board, "xp": xp,
            "user_id": { "$gte": uuid_bson(lo), "$lt": uuid_bson(user_id) },
        };
        Ok(self.entries(filter, None).await?.len() as i64)
    }

    async fn ties_from(
        &mut self,
        board: &str,
        xp: i64,
        user_id: Uuid,
        limit: i64,
    ) -> Result<Vec<(Uuid, i64)>, TxError> {
        let ties = ties_from_filter(board, xp, user_id);
        self.entries(ties, Some(limit)).await
    }

    async fn below(
        &mut self,
        board: &str,
        xp: i64,
        limit: i64,
    ) -> Result<Vec<(Uuid, i64)>, TxError> {
        self.entries(below_filter(board, xp), Some(limit)).await
    }
}

/// Adds `delta` to `user_id`'s entry on `board` (creating it at `delta`) and moves it in the
/// count trie of `r`; the XP-byte counts go into `upper`.
pub(super) async fn add_xp(
    r: &Ranking,
    s: &mut ClientSession,
    upper: &mut UpperCounts,
    board: &str,
    user_id: Uuid,
    delta: i64,
) -> Result<(), TxError> {
    let before = r
        .entries
        .find_one_and_update(
            doc! { "board": board, "user_id": uuid_bson(user_id) },
            doc! { "$inc": { "xp": delta } },
        )
        .upsert(true)
        .return_document(ReturnDocument::Before)
        .projection(doc! { "_id": 0, "xp": 1 })
        .session(&mut *s)
        .await?;
    let old = before
        .map(|d| d.get_i64("xp").map_err(|e| corrupt("leaderboard entry", e)))
        .transpose()?;
    let new = old.unwrap_or(0) + delta;
    let mut nodes = MongoNodes { r, s };
    rank_tree::move_entry(&mut nodes, upper, board, user_id, old, Some(new)).await
}

/// Builds the count trie of every board of `r` from the entries when the trie is empty and
/// the boards are not (a database written before the trie existed).
pub(super) async fn build_if_missing(r: &Ranking, s: &mut ClientSession) -> Result<(), TxError> {
    let trie = r.tree.find_one(doc! {}).session(&mut *s).await?;
    if trie.is_some() {
        return Ok(());
    }
    let cursor = r
        .entries
        .aggregate([
            doc! { "$group": { "_id": { "board": "$board", "xp": "$xp" }, "n": { "$sum": 1 } } },
        ])
        .session(&mut *s)
        .await?;
    let mut groups = Vec::new();
    for d in collect(cursor, s).await? {
        let group = |d: &Document| -> Option<(String, i64, i64)> {
            let id = d.get_document("_id").ok()?;
            let n = match d.get("n")? {
                Bson::Int32(n) => i64::from(*n),
                Bson::Int64(n) => *n,
                _ => return None,
            };
            Some((
                id.get_str("board").ok()?.to_string(),
                id.get_i64("xp").ok()?,
                n,
            ))
        };
        groups.push(group(&d).ok_or_else(|| corrupt("leaderboard group", &d))?);
    }
    rank_tree::build(&mut MongoNodes { r, s }, &groups).await
}

/// Writes a batch's summed XP-byte counts to the trie of `r`.
pub(super) async fn flush(
    r: &Ranking,
    s: &mut ClientSession,
    upper: UpperCounts,
) -> Result<(), TxError> {
    rank_tree::flush(&mut MongoNodes { r, s }, upper).await
}

/// The XP of `user_id`'s entry on `board`.
async fn entry_xp(
    r: &Ranking,
    s: &mut ClientSession,
    board: &str,
    user_id: Uuid,
) -> Result<Option<i64>, TxError> {
    r.entries
        .find_one(doc! { "board": board, "user_id": uuid_bson(user_id) })
        .projection(doc! { "_id": 0, "xp": 1 })
        .session(&mut *s)
        .await?
        .map(|d| d.get_i64("xp").map_err(|e| corrupt("leaderboard entry", e)))
        .transpose()
}

/// A page of `board` from 0-based `offset`.
pub(super) async fn page(
    r: &Ranking,
    s: &mut ClientSession,
    board: &str,
    limit: u32,
    offset: u64,
) -> Result<Vec<LeaderboardRow>, TxError> {
    let page = rank_tree::page(&mut MongoNodes { r, s }, board, offset, u64::from(limit)).await?;
    Ok(rows(board, page))
}

/// The rank of `user_id` on `board`.
pub(super) async fn rank(
    r: &Ranking,
    s: &mut ClientSession,
    board: &str,
    user_id: Uuid,
) -> Result<Option<LeaderboardRow>, TxError> {
    let Some(xp) = entry_xp(r, s, board, user_id).await? else {
        return Ok(None);
    };
    let ahead = rank_tree::ahead(&mut MongoNodes { r, s }, board, xp, user_id).await?;
    Ok(Some(LeaderboardRow {
        board: board.to_string(),
        rank: ahead + 1,
        user_id,
        xp,
    }))
}

/// The `k` entries above and below `user_id` on `board` and the user's own.
pub(super) async fn around(
    r: &Ranking,
    s: &mut ClientSession,
    board: &str,
    user_id: Uuid,
    k: u32,
) -> Result<Option<Vec<LeaderboardRow>>, TxError> {
    let Some(xp) = entry_xp(r, s, board, user_id).await? else {
        return Ok(None);
    };
    let mut nodes = MongoNodes { r, s };
    let page = rank_tree::around(&mut nodes, board, xp, user_id, u64::from(k)).await?;
    Ok(Some(rows(board, page)))
}
