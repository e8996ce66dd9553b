//! The leaderboards' order-statistic structure: a **count trie** over each board's rank key,
//! kept in the same transaction as the board's entries, so that a rank, a page at any offset
//! and "around me" cost O(log n) reads instead of counting or skipping index entries.
//!
//! ## Rank key
//! An entry `(xp, user_id)` of a board has the 24-byte key `enc(xp) ‖ user_id` where
//! `enc(xp) = !((xp as u64) ^ 2⁶³)` big-endian: keys in byte order are the board's rank order
//! (XP descending, then user id ascending, [`Uuid`]'s byte order).
//!
//! ## Nodes
//! A node is a key prefix `p` of a board and holds `n(p)`, the number of the board's entries
//! whose key starts with `p`. Nodes of the XP bytes (prefix lengths 0–8; length 8 is one exact
//! XP value) always exist for every prefix that has entries. Below, the trie grows only where
//! it is needed: a node of length ≥ 8 is a **leaf** until it holds more than
//! [`SPLIT_ABOVE`] entries; it is then **split** (its children by the next byte of the user id
//! are written, counted from the board's ranking index) and stays split. The entries of a leaf
//! are one range of the ranking index (`board`, `xp`, user ids with the leaf's prefix), at most
//! [`SPLIT_ABOVE`] + 1 of them, or 256 at the deepest level (length 23, never split).
//!
//! ## Costs
//! - rank: per level, one range read of at most 255 sibling counts; then one count of at most
//!   [`SPLIT_ABOVE`] leaf entries. Levels: 8 for the XP bytes plus about
//!   `log₂₅₆(ties / SPLIT_ABOVE)` for entries of equal XP, whatever the id distribution
//!   (ids sharing long prefixes add single-child levels, at most 15);
//! - a page at an offset: the same descent reading each level's children (≤ 256), then the page
//!   itself, a range of the ranking index from the entry found;
//! - a change of XP: the XP-byte nodes whose prefix changes (usually the last one or two),
//!   and one counter update per tie level on the old and the new key, each node's updates
//!   summed per batch (ties share their exact-XP node).
//!
//! The algorithm is written once here over [`RankNodes`], the few reads and writes each
//! adapter provides inside its transaction (SQLite: synchronous statements behind ready
//! futures; MongoDB: the session's operations).

use std::collections::HashMap;
use std::future::Future;

use uuid::Uuid;

use crate::LeaderboardRow;

/// Bytes of the XP part of a rank key.
pub(crate) const XP_BYTES: usize = 8;
/// Bytes of a whole rank key (XP and user id).
pub(crate) const KEY_BYTES: usize = XP_BYTES + 16;
/// A leaf with more entries than this is split. 64 keeps a leaf's count a few microseconds
/// (one short index range) and the tie levels few (log₂₅₆(10M / 64) ≈ 2.2).
pub(crate) const SPLIT_ABOVE: i64 = 64;

/// The rank key of an entry (see the module docs).
pub(crate) fn key(xp: i64, user_id: Uuid) -> [u8; KEY_BYTES] {
    let mut k = [0u8; KEY_BYTES];
    k[..XP_BYTES].copy_from_slice(&(!((xp as u64) ^ (1 << 63))).to_be_bytes());
    k[XP_BYTES..].copy_from_slice(user_id.as_bytes());
    k
}

/// The XP of a prefix of at least [`XP_BYTES`] bytes.
pub(crate) fn xp_of(prefix: &[u8]) -> i64 {
    let mut b = [0u8; XP_BYTES];
    b.copy_from_slice(&prefix[..XP_BYTES]);
    (!u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// The first and last user id under a prefix of at least [`XP_BYTES`] bytes.
pub(crate) fn id_range(prefix: &[u8]) -> (Uuid, Uuid) {
    let mut lo = [0u8; 16];
    let mut hi = [0xffu8; 16];
    let id = &prefix[XP_BYTES..];
    lo[..id.len()].copy_from_slice(id);
    hi[..id.len()].copy_from_slice(id);
    (Uuid::from_bytes(lo), Uuid::from_bytes(hi))
}

/// `prefix ‖ digit`, the key of a child node.
pub(crate) fn child(prefix: &[u8], digit: u8) -> Vec<u8> {
    let mut c = Vec::with_capacity(prefix.len() + 1);
    c.extend_from_slice(prefix);
    c.push(digit);
    c
}

/// Rows `(rank, user_id, xp)` of `board` as [`LeaderboardRow`]s.
pub(crate) fn rows(board: &str, rows: Vec<(u64, Uuid, i64)>) -> Vec<LeaderboardRow> {
    rows.into_iter()
        .map(|(rank, user_id, xp)| LeaderboardRow {
            board: board.to_string(),
            rank,
            user_id,
            xp,
        })
        .collect()
}

/// A node as listed among its parent's children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Child {
    /// The byte that extends the parent's prefix.
    pub digit: u8,
    /// Entries under the child.
    pub n: i64,
    /// Whether the child's own children exist (always for XP-byte nodes).
    pub split: bool,
}

/// The reads and writes of the count trie, inside one adapter transaction. Prefixes are
/// stored per `(board, prefix length, prefix bytes)`.
pub(crate) trait RankNodes {
    /// The adapter's error.
    type Error;

    /// An error for counts that contradict the entries (a corrupt read model).
    fn corrupt(what: String) -> Self::Error;

    /// Adds `delta` to node `prefix` of `board`, creating it (not split) when absent; returns
    /// its count after the change and whether it is split.
    fn add(
        &mut self,
        board: &str,
        prefix: &[u8],
        delta: i64,
    ) -> impl Future<Output = Result<(i64, bool), Self::Error>>;

    /// Marks leaf `prefix` split and creates its children (digit, count), none of them split.
    fn split(
        &mut self,
        board: &str,
        prefix: &[u8],
        children: &[(u8, i64)],
    ) -> impl Future<Output = Result<(), Self::Error>>;

    /// The count and split flag of node `prefix`.
    fn node(
        &mut self,
        board: &str,
        prefix: &[u8],
    ) -> impl Future<Output = Result<Option<(i64, bool)>, Self::Error>>;

    /// The children of `prefix` in digit order.
    fn children(
        &mut self,
        board: &str,
        prefix: &[u8],
    ) -> impl Future<Output = Result<Vec<Child>, Self::Error>>;

    /// The summed counts of the children of `prefix` with a digit below `digit`.
    fn sum_before(
        &mut self,
        board: &str,
        prefix: &[u8],
        digit: u8,
    ) -> impl Future<Output = Result<i64, Self::Error>>;

    /// The user ids of `board`'s entries with `xp` and an id in `lo..=hi`, ascending.
    fn entries_between(
        &mut self,
        board: &str,
        xp: i64,
        lo: Uuid,
        hi: Uuid,
    ) -> impl Future<Output = Result<Vec<Uuid>, Self::Error>>;

    /// The number of `board`'s entries with `xp` and an id in `lo..user_id` (end excluded).
    fn count_between(
        &mut self,
        board: &str,
        xp: i64,
        lo: Uuid,
        user_id: Uuid,
    ) -> impl Future<Output = Result<i64, Self::Error>>;

    /// Up to `limit` entries `(user_id, xp)` of `board` with `xp` and an id ≥ `user_id`, in
    /// id order.
    fn ties_from(
        &mut self,
        board: &str,
        xp: i64,
        user_id: Uuid,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<(Uuid, i64)>, Self::Error>>;

    /// Up to `limit` entries `(user_id, xp)` of `board` with less than `xp`, in rank order.
    fn below(
        &mut self,
        board: &str,
        xp: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<(Uuid, i64)>, Self::Error>>;
}

/// The trie changes of one batch, written once at its end by [`flush`]: the XP-byte nodes
/// (prefix lengths 0–7) summed per node, and the entries' moves below them (one `±1` per
/// rank key that leaves or joins a board), which [`flush`] sums per node level by level. Nodes
/// are shared by many entries (every tie shares its exact-XP node), and a move within one of
/// them cancels out.
///
/// The XP-byte nodes are keyed per board by `(prefix length, prefix bytes zero-padded)`, so
/// that a move allocates nothing once its board is known.
#[derive(Debug, Default)]
pub(crate) struct UpperCounts {
    levels: HashMap<String, HashMap<(u8, [u8; XP_BYTES]), i64>>,
    moves: HashMap<String, Vec<Move>>,
}

/// One entry leaving (`-1`) or joining (`+1`) the node path of its rank key.
type Move = ([u8; KEY_BYTES], i64);

impl UpperCounts {
    fn add(&mut self, board: &str, key: &[u8; KEY_BYTES], delta: i64) {
        let nodes = match self.levels.get_mut(board) {
            Some(nodes) => nodes,
            None => self.levels.entry(board.to_string()).or_default(),
        };
        for len in 0..XP_BYTES {
            let mut prefix = [0u8; XP_BYTES];
            prefix[..len].copy_from_slice(&key[..len]);
            *nodes.entry((len as u8, prefix)).or_default() += delta;
        }
        let moves = match self.moves.get_mut(board) {
            Some(moves) => moves,
            None => self.moves.entry(board.to_string()).or_default(),
        };
        moves.push((*key, delta));
    }
}

/// Records the move of `user_id`'s entry on `board` from XP `old` to `new` (`None`: no entry)
/// in `upper`, after the entry itself was written; [`flush`] writes it into the trie.
pub(crate) async fn move_entry<S: RankNodes>(
    _s: &mut S,
    upper: &mut UpperCounts,
    board: &str,
    user_id: Uuid,
    old: Option<i64>,
    new: Option<i64>,
) -> Result<(), S::Error> {
    if old == new {
        return Ok(());
    }
    if let Some(xp) = old {
        upper.add(board, &key(xp, user_id), -1);
    }
    if let Some(xp) = new {
        upper.add(board, &key(xp, user_id), 1);
    }
    Ok(())
}

/// Writes a batch's trie changes, after every entry of the batch was written: the summed
/// XP-byte counts, then, per board, from the exact-XP level down, each node's summed moves
/// with one counter update. Under a split node the moves go on to its children by the next
/// key byte; a leaf that now holds more than [`SPLIT_ABOVE`] entries is split, counted from
/// the entries (which already include the batch's, so its moves do not go further down).
pub(crate) async fn flush<S: RankNodes>(s: &mut S, upper: UpperCounts) -> Result<(), S::Error> {
    for (board, nodes) in upper.levels {
        for ((len, prefix), delta) in nodes {
            if delta != 0 {
                s.add(&board, &prefix[..usize::from(len)], delta).await?;
            }
        }
    }
    for (board, moves) in upper.moves {
        let mut todo = vec![(XP_BYTES, moves)];
        while let Some((len, moves)) = todo.pop() {
            // Per node of this level: the summed delta and the moves under it.
            let mut nodes: HashMap<&[u8], (i64, Vec<Move>)> = HashMap::new();
            for (k, delta) in &moves {
                let node = nodes.entry(&k[..len]).or_default();
                node.0 += delta;
                node.1.push((*k, *delta));
            }
            for (prefix, (delta, under)) in nodes {
                let (n, split) = s.add(&board, prefix, delta).await?;
                if n < 0 {
                    return Err(S::corrupt(format!(
                        "rank node of {board} went below zero ({n})"
                    )));
                }
                if split && len < KEY_BYTES - 1 {
                    todo.push((len + 1, under));
                } else if !split && n > SPLIT_ABOVE && len < KEY_BYTES - 1 {
                    split_leaf(s, &board, prefix).await?;
                }
            }
        }
    }
    Ok(())
}

/// Builds the trie of boards whose entries exist while their trie does not (a store written
/// before the trie existed): `groups` holds, per board and XP value, the number of entries.
/// Counts the XP-byte levels and each exact XP value first, then splits every exact-XP node
/// above [`SPLIT_ABOVE`] from the entries (which all exist and are all counted by then; the
/// incremental walk would count an entry twice when a split meets entries not walked yet).
///
/// Additive over disjoint sets of groups (counts are added to the nodes, and an exact-XP node
/// belongs to one group), so a large board can be built in several calls, one per chunk of
/// its groups, as long as the entries do not change in between (a rebuild's seal).
pub(crate) async fn build<S: RankNodes>(
    s: &mut S,
    groups: &[(String, i64, i64)],
) -> Result<(), S::Error> {
    let mut counts: HashMap<(String, Vec<u8>), i64> = HashMap::new();
    for (board, xp, n) in groups {
        let k = key(*xp, Uuid::nil());
        for len in 0..=XP_BYTES {
            *counts
                .entry((board.clone(), k[..len].to_vec()))
                .or_default() += n;
        }
    }
    for ((board, prefix), n) in &counts {
        s.add(board, prefix, *n).await?;
    }
    for ((board, prefix), n) in &counts {
        if prefix.len() == XP_BYTES && *n > SPLIT_ABOVE {
            split_leaf(s, board, prefix).await?;
        }
    }
    Ok(())
}

/// Splits leaf `prefix` into its children, counted from the board's entries, and splits
/// further any child that is itself too large.
async fn split_leaf<S: RankNodes>(s: &mut S, board: &str, prefix: &[u8]) -> Result<(), S::Error> {
    let mut todo = vec![prefix.to_vec()];
    while let Some(p) = todo.pop() {
        let (lo, hi) = id_range(&p);
        let ids = s.entries_between(board, xp_of(&p), lo, hi).await?;
        let at = p.len() - XP_BYTES;
        let mut children: Vec<(u8, i64)> = Vec::new();
        for id in ids {
            let digit = id.as_bytes()[at];
            match children.last_mut() {
                Some((d, n)) if *d == digit => *n += 1,
                _ => children.push((digit, 1)),
            }
        }
        s.split(board, &p, &children).await?;
        for (digit, n) in children {
            if n > SPLIT_ABOVE && p.len() + 1 < KEY_BYTES - 1 {
                let mut child = p.clone();
                child.push(digit);
                todo.push(child);
            }
        }
    }
    Ok(())
}

/// The number of `board`'s entries ranked ahead of `(xp, user_id)` (an entry of the board).
pub(crate) async fn ahead<S: RankNodes>(
    s: &mut S,
    board: &str,
    xp: i64,
    user_id: Uuid,
) -> Result<u64, S::Error> {
    let k = key(xp, user_id);
    let mut total = 0i64;
    for len in 0..XP_BYTES {
        total += s.sum_before(board, &k[..len], k[len]).await?;
    }
    let mut len = XP_BYTES;
    loop {
        let Some((_, split)) = s.node(board, &k[..len]).await? else {
            return Err(S::corrupt(format!(
                "rank node missing on {board} for an entry with {xp} XP"
            )));
        };
        if !split || len == KEY_BYTES - 1 {
            let (lo, _) = id_range(&k[..len]);
            total += s.count_between(board, xp, lo, user_id).await?;
            return Ok(total as u64);
        }
        total += s.sum_before(board, &k[..len], k[len]).await?;
        len += 1;
    }
}

/// The entry at 0-based `offset` of `board` in rank order as `(xp, user_id)`; `None` past
/// the last entry.
pub(crate) async fn seek<S: RankNodes>(
    s: &mut S,
    board: &str,
    offset: u64,
) -> Result<Option<(i64, Uuid)>, S::Error> {
    let mut prefix: Vec<u8> = Vec::with_capacity(KEY_BYTES);
    let mut left = offset as i64;
    let mut split = true;
    while prefix.len() < XP_BYTES || (split && prefix.len() < KEY_BYTES - 1) {
        let children = s.children(board, &prefix).await?;
        let mut next = None;
        for c in children {
            if left < c.n {
                next = Some(c);
                break;
            }
            left -= c.n;
        }
        let Some(c) = next else {
            return Ok(None);
        };
        prefix.push(c.digit);
        split = c.split;
    }
    let (lo, hi) = id_range(&prefix);
    let xp = xp_of(&prefix);
    let ids = s.entries_between(board, xp, lo, hi).await?;
    match ids.get(left as usize) {
        Some(id) => Ok(Some((xp, *id))),
        None => Err(S::corrupt(format!(
            "rank leaf of {board} at {xp} XP holds {} entries, its count says more",
            ids.len()
        ))),
    }
}

/// Up to `limit` entries of `board` from 0-based `offset` in rank order, as
/// `(rank, user_id, xp)`.
pub(crate) async fn page<S: RankNodes>(
    s: &mut S,
    board: &str,
    offset: u64,
    limit: u64,
) -> Result<Vec<(u64, Uuid, i64)>, S::Error> {
    if limit == 0 {
        return Ok(vec![]);
    }
    let Some((xp, user_id)) = seek(s, board, offset).await? else {
        return Ok(vec![]);
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = s.ties_from(board, xp, user_id, limit).await?;
    let left = limit - rows.len() as i64;
    if left > 0 {
        rows.extend(s.below(board, xp, left).await?);
    }
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, (user, xp))| (offset + i as u64 + 1, user, xp))
        .collect())
}

/// The `k` entries above and below the entry `(xp, user_id)` of `board` and the entry itself,
/// in rank order, as `(rank, user_id, xp)`.
pub(crate) async fn around<S: RankNodes>(
    s: &mut S,
    board: &str,
    xp: i64,
    user_id: Uuid,
    k: u64,
) -> Result<Vec<(u64, Uuid, i64)>, S::Error> {
    let ahead = ahead(s, board, xp, user_id).await?;
    let from = ahead.saturating_sub(k);
    page(s, board, from, ahead - from + 1 + k).await
}

/// Drives a future that never waits (an adapter whose [`RankNodes`] calls are synchronous)
/// to completion.
///
/// # Panics
/// If the future is pending: only futures that complete on their first poll may be passed.
pub(crate) fn ready<T>(f: impl Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a synchronous rank-tree future was pending"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_by_xp_descending_then_id_ascending() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let order = [
            (i64::MAX, a),
            (1_000_000, a),
            (256, b),
            (255, a),
            (1, a),
            (0, a),
            (0, b),
            (-1, a),
            (i64::MIN, b),
        ];
        for w in order.windows(2) {
            assert!(key(w[0].0, w[0].1) < key(w[1].0, w[1].1), "{w:?}");
        }
        for (xp, id) in order {
            let k = key(xp, id);
            assert_eq!(xp_of(&k), xp);
            assert_eq!(id_range(&k), (id, id));
        }
    }

    #[test]
    fn id_ranges_cover_exactly_the_prefix() {
        let k = key(5, Uuid::from_u128(0xabcd_u128 << 112));
        let (lo, hi) = id_range(&k[..XP_BYTES + 2]);
        assert_eq!(lo.to_string(), "abcd0000-0000-0000-0000-000000000000");
        assert_eq!(hi.to_string(), "abcdffff-ffff-ffff-ffff-ffffffffffff");
        let (lo, hi) = id_range(&k[..XP_BYTES]);
        assert_eq!((lo, hi), (Uuid::nil(), Uuid::max()));
    }
}
