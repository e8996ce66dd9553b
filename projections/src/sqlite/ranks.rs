//! The count trie of [`crate::rank_tree`] in table `rm_leaderboard_tree`, read and written
//! with synchronous statements inside the caller's transaction.

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::rebuild::Side;
use super::{backend, uuid_at};
use crate::rank_tree::{self, child, rows, Child, RankNodes, UpperCounts};
use crate::{LeaderboardRow, ReadModelError};

/// Schema of the count trie; idempotent.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rm_leaderboard_tree (
    board  TEXT    NOT NULL,
    depth  INTEGER NOT NULL,
    prefix BLOB    NOT NULL,
    n      INTEGER NOT NULL,
    split  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (board, depth, prefix)
) WITHOUT ROWID;
";

const SQL_ADD: &str = "INSERT INTO rm_leaderboard_tree (board, depth, prefix, n, split)
    VALUES (?1, ?2, ?3, ?4, 0)
    ON CONFLICT (board, depth, prefix) DO UPDATE SET n = n + excluded.n
    RETURNING n, split";

const SQL_CHILDREN: &str = "SELECT prefix, n, split FROM rm_leaderboard_tree
    WHERE board = ?1 AND depth = ?2 AND prefix >= ?3 AND prefix <= ?4 ORDER BY prefix";

const SQL_SUM_BEFORE: &str = "SELECT COALESCE(SUM(n), 0) FROM rm_leaderboard_tree
    WHERE board = ?1 AND depth = ?2 AND prefix >= ?3 AND prefix < ?4";

const SQL_BETWEEN: &str = "SELECT user_id FROM rm_leaderboard
    WHERE board = ?1 AND xp = ?2 AND user_id >= ?3 AND user_id <= ?4
    ORDER BY xp DESC, user_id ASC";

const SQL_COUNT_BETWEEN: &str = "SELECT COUNT(*) FROM rm_leaderboard
    WHERE board = ?1 AND xp = ?2 AND user_id >= ?3 AND user_id < ?4";

const SQL_TIES_FROM: &str = "SELECT user_id, xp FROM rm_leaderboard
    WHERE board = ?1 AND xp = ?2 AND user_id >= ?3
    ORDER BY xp DESC, user_id ASC LIMIT ?4";

const SQL_BELOW: &str = "SELECT user_id, xp FROM rm_leaderboard
    WHERE board = ?1 AND xp < ?2
    ORDER BY xp DESC, user_id ASC LIMIT ?3";

/// Every statement above with its parameter count and the index range its plan must search
/// (checked by the adapter's plan test).
#[cfg(test)]
pub(super) const PLANNED: &[(&str, usize, &str)] = &[
    (
        SQL_CHILDREN,
        4,
        "PRIMARY KEY (board=? AND depth=? AND prefix>? AND prefix<?)",
    ),
    (
        SQL_SUM_BEFORE,
        4,
        "PRIMARY KEY (board=? AND depth=? AND prefix>? AND prefix<?)",
    ),
    (
        SQL_BETWEEN,
        4,
        "COVERING INDEX rm_leaderboard_rank (board=? AND xp=? AND user_id>? AND user_id<?)",
    ),
    (
        SQL_COUNT_BETWEEN,
        4,
        "COVERING INDEX rm_leaderboard_rank (board=? AND xp=? AND user_id>? AND user_id<?)",
    ),
    (
        SQL_TIES_FROM,
        4,
        "COVERING INDEX rm_leaderboard_rank (board=? AND xp=? AND user_id>?)",
    ),
    (
        SQL_BELOW,
        3,
        "COVERING INDEX rm_leaderboard_rank (board=? AND xp<?)",
    ),
];

/// [`RankNodes`] on a SQLite connection (inside the caller's transaction), on the live tables
/// or on a rebuild's.
pub(super) struct SqlNodes<'c>(pub(super) &'c Connection, pub(super) Side);

fn depth(prefix: &[u8]) -> i64 {
    prefix.len() as i64
}

impl SqlNodes<'_> {
    /// Rows `(user_id, xp)` of entry statement `sql`.
    fn entries(
        &self,
        sql: &'static str,
        p: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<(Uuid, i64)>, ReadModelError> {
        self.0
            .prepare_cached(&self.1.sql(sql))
            .and_then(|mut s| {
                s.query_map(p, |r| Ok((uuid_at(r, 0)?, r.get(1)?)))?
                    .collect()
            })
            .map_err(backend)
    }
}

impl RankNodes for SqlNodes<'_> {
    type Error = ReadModelError;

    fn corrupt(what: String) -> ReadModelError {
        ReadModelError::Backend(format!("corrupt leaderboard rank tree: {what}"))
    }

    async fn add(
        &mut self,
        board: &str,
        prefix: &[u8],
        delta: i64,
    ) -> Result<(i64, bool), ReadModelError> {
        self.0
            .prepare_cached(&self.1.sql(SQL_ADD))
            .and_then(|mut s| {
                s.query_row(params![board, depth(prefix), prefix, delta], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
            })
            .map_err(backend)
    }

    async fn split(
        &mut self,
        board: &str,
        prefix: &[u8],
        children: &[(u8, i64)],
    ) -> Result<(), ReadModelError> {
        self.0
            .prepare_cached(&self.1.sql(
                "UPDATE rm_leaderboard_tree SET split = 1
                 WHERE board = ?1 AND depth = ?2 AND prefix = ?3",
            ))
            .and_then(|mut s| s.execute(params![board, depth(prefix), prefix]))
            .map_err(backend)?;
        let mut insert = self
            .0
            .prepare_cached(&self.1.sql(
                "INSERT INTO rm_leaderboard_tree (board, depth, prefix, n, split)
                 VALUES (?1, ?2, ?3, ?4, 0)",
            ))
            .map_err(backend)?;
        for (digit, n) in children {
            insert
                .execute(params![board, depth(prefix) + 1, child(prefix, *digit), n])
                .map_err(backend)?;
        }
        Ok(())
    }

    async fn node(
        &mut self,
        board: &str,
        prefix: &[u8],
    ) -> Result<Option<(i64, bool)>, ReadModelError> {
        self.0
            .prepare_cached(&self.1.sql(
                "SELECT n, split FROM rm_leaderboard_tree
                 WHERE board = ?1 AND depth = ?2 AND prefix = ?3",
            ))
            .and_then(|mut s| {
                s.query_row(params![board, depth(prefix), prefix], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(backend)
    }

    async fn children(&mut self, board: &str, prefix: &[u8]) -> Result<Vec<Child>, ReadModelError> {
        let (lo, hi) = (child(prefix, 0), child(prefix, 0xff));
        self.0
            .prepare_cached(&self.1.sql(SQL_CHILDREN))
            .and_then(|mut s| {
                s.query_map(params![board, depth(prefix) + 1, lo, hi], |r| {
                    let key: Vec<u8> = r.get(0)?;
                    Ok(Child {
                        digit: key.last().copied().unwrap_or_default(),
                        n: r.get(1)?,
                        split: r.get(2)?,
                    })
                })?
                .collect()
            })
            .map_err(backend)
    }

    async fn sum_before(
        &mut self,
        board: &str,
        prefix: &[u8],
        digit: u8,
    ) -> Result<i64, ReadModelError> {
        if digit == 0 {
            return Ok(0);
        }
        let (lo, hi) = (child(prefix, 0), child(prefix, digit));
        self.0
            .prepare_cached(&self.1.sql(SQL_SUM_BEFORE))
            .and_then(|mut s| s.query_row(params![board, depth(prefix) + 1, lo, hi], |r| r.get(0)))
            .map_err(backend)
    }

    async fn entries_between(
        &mut self,
        board: &str,
        xp: i64,
        lo: Uuid,
        hi: Uuid,
    ) -> Result<Vec<Uuid>, ReadModelError> {
        self.0
            .prepare_cached(&self.1.sql(SQL_BETWEEN))
            .and_then(|mut s| {
                s.query_map(params![board, xp, lo.to_string(), hi.to_string()], |r| {
                    uuid_at(r, 0)
                })?
                .collect()
            })
            .map_err(backend)
    }

    async fn count_between(
        &mut self,
        board: &str,
        xp: i64,
        lo: Uuid,
        user_id: Uuid,
    ) -> Result<i64, ReadModelError> {
        self.0
            .prepare_cached(&self.1.sql(SQL_COUNT_BETWEEN))
            .and_then(|mut s| {
                s.query_row(
                    params![board, xp, lo.to_string(), user_id.to_string()],
                    |r| r.get(0),
                )
            })
            .map_err(backend)
    }

    async fn ties_from(
        &mut self,
        board: &str,
        xp: i64,
        user_id: Uuid,
        limit: i64,
    ) -> Result<Vec<(Uuid, i64)>, ReadModelError> {
        let user = user_id.to_string();
        self.entries(SQL_TIES_FROM, &[&board, &xp, &user, &limit])
    }

    async fn below(
        &mut self,
        board: &str,
        xp: i64,
        limit: i64,
    ) -> Result<Vec<(Uuid, i64)>, ReadModelError> {
        self.entries(SQL_BELOW, &[&board, &xp, &limit])
    }
}

/// Sets `user_id`'s entry on `board` to its XP plus `delta` (creating it at `delta`) and moves
/// it in the count trie; the XP-byte counts go into `upper`.
pub(super) fn add_xp(
    conn: &Connection,
    side: Side,
    upper: &mut UpperCounts,
    board: &str,
    user_id: Uuid,
    delta: i64,
) -> Result<(), ReadModelError> {
    let user = user_id.to_string();
    if side == Side::RebuildBulk {
        // A rebuild before its trie exists: the entry only (see `rebuild::seal`).
        return conn
            .prepare_cached(&side.sql(
                "INSERT INTO rm_leaderboard (board, user_id, xp) VALUES (?1, ?2, ?3)
                 ON CONFLICT (board, user_id) DO UPDATE SET xp = xp + excluded.xp",
            ))
            .and_then(|mut s| s.execute(params![board, user, delta]))
            .map(drop)
            .map_err(backend);
    }
    // One statement for an existing entry (the common case), two for a new one.
    let updated: Option<i64> = conn
        .prepare_cached(&side.sql(
            "UPDATE rm_leaderboard SET xp = xp + ?3 WHERE board = ?1 AND user_id = ?2
             RETURNING xp",
        ))
        .and_then(|mut s| {
            s.query_row(params![board, user, delta], |r| r.get(0))
                .optional()
        })
        .map_err(backend)?;
    let (old, new) = match updated {
        Some(new) => (Some(new - delta), new),
        None => {
            conn.prepare_cached(
                &side.sql("INSERT INTO rm_leaderboard (board, user_id, xp) VALUES (?1, ?2, ?3)"),
            )
            .and_then(|mut s| s.execute(params![board, user, delta]))
            .map_err(backend)?;
            (None, delta)
        }
    };
    rank_tree::ready(rank_tree::move_entry(
        &mut SqlNodes(conn, side),
        upper,
        board,
        user_id,
        old,
        Some(new),
    ))
}

/// Writes a batch's summed XP-byte counts.
pub(super) fn flush(
    conn: &Connection,
    side: Side,
    upper: UpperCounts,
) -> Result<(), ReadModelError> {
    rank_tree::ready(rank_tree::flush(&mut SqlNodes(conn, side), upper))
}

/// Up to `limit` groups `(board, xp, entries)` of `side`'s leaderboard after the group
/// `after` in `(board, xp descending)` order (from the first when `None`), read from the
/// ranking index.
pub(super) fn groups_after(
    conn: &Connection,
    side: Side,
    after: Option<&(String, i64)>,
    limit: i64,
) -> Result<Vec<(String, i64, i64)>, ReadModelError> {
    let read = |sql: &'static str, p: &[&dyn rusqlite::ToSql]| {
        conn.prepare_cached(&side.sql(sql))
            .and_then(|mut s| {
                s.query_map(p, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(backend)
    };
    match after {
        None => read(
            "SELECT board, xp, COUNT(*) FROM rm_leaderboard
             GROUP BY board, xp ORDER BY board, xp DESC LIMIT ?1",
            &[&limit],
        ),
        Some((board, xp)) => read(
            "SELECT board, xp, COUNT(*) FROM rm_leaderboard
             WHERE board > ?1 OR (board = ?1 AND xp < ?2)
             GROUP BY board, xp ORDER BY board, xp DESC LIMIT ?3",
            &[board, xp, &limit],
        ),
    }
}

/// Adds the groups `(board, xp, entries)` of `side`'s leaderboard to its count trie (see
/// [`rank_tree::build`]: additive over disjoint sets of groups).
pub(super) fn build_groups(
    conn: &Connection,
    side: Side,
    groups: &[(String, i64, i64)],
) -> Result<(), ReadModelError> {
    rank_tree::ready(rank_tree::build(&mut SqlNodes(conn, side), groups))
}

/// Builds the count trie of every board from `rm_leaderboard` when the trie is empty and the
/// boards are not (a file written before the trie existed). Runs inside the caller's write
/// transaction; returns the number of entries counted.
pub(super) fn build_if_missing(conn: &Connection) -> Result<u64, ReadModelError> {
    let missing: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM rm_leaderboard)
                AND NOT EXISTS (SELECT 1 FROM rm_leaderboard_tree)",
            [],
            |r| r.get(0),
        )
        .map_err(backend)?;
    if !missing {
        return Ok(0);
    }
    let groups: Vec<(String, i64, i64)> = conn
        .prepare("SELECT board, xp, COUNT(*) FROM rm_leaderboard GROUP BY board, xp")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(backend)?;
    rank_tree::ready(rank_tree::build(&mut SqlNodes(conn, Side::Live), &groups))?;
    Ok(groups.iter().map(|g| g.2 as u64).sum())
}

/// A page of `board` from 0-based `offset` (one read transaction).
pub(super) fn page(
    conn: &mut Connection,
    board: &str,
    limit: u32,
    offset: u64,
) -> Result<Vec<LeaderboardRow>, ReadModelError> {
    let tx = conn.transaction().map_err(backend)?;
    let page = rank_tree::ready(rank_tree::page(
        &mut SqlNodes(&tx, Side::Live),
        board,
        offset,
        u64::from(limit),
    ))?;
    tx.finish().map_err(backend)?;
    Ok(rows(board, page))
}

/// The XP of `user_id`'s entry on `board`.
fn entry_xp(conn: &Connection, board: &str, user_id: Uuid) -> Result<Option<i64>, ReadModelError> {
    conn.prepare_cached("SELECT xp FROM rm_leaderboard WHERE board = ?1 AND user_id = ?2")
        .and_then(|mut s| {
            s.query_row(params![board, user_id.to_string()], |r| r.get(0))
                .optional()
        })
        .map_err(backend)
}

/// The rank of `user_id` on `board` (one read transaction).
pub(super) fn rank(
    conn: &mut Connection,
    board: &str,
    user_id: Uuid,
) -> Result<Option<LeaderboardRow>, ReadModelError> {
    let tx = conn.transaction().map_err(backend)?;
    let row = match entry_xp(&tx, board, user_id)? {
        None => None,
        Some(xp) => {
            let ahead = rank_tree::ready(rank_tree::ahead(
                &mut SqlNodes(&tx, Side::Live),
                board,
                xp,
                user_id,
            ))?;
            Some(LeaderboardRow {
                board: board.to_string(),
                rank: ahead + 1,
                user_id,
                xp,
            })
        }
    };
    tx.finish().map_err(backend)?;
    Ok(row)
}

/// The `k` entries above and below `user_id` on `board` and the user's own (one read
/// transaction); `None` when the user has no entry.
pub(super) fn around(
    conn: &mut Connection,
    board: &str,
    user_id: Uuid,
    k: u32,
) -> Result<Option<Vec<LeaderboardRow>>, ReadModelError> {
    let tx = conn.transaction().map_err(backend)?;
    let page = match entry_xp(&tx, board, user_id)? {
        None => None,
        Some(xp) => Some(rank_tree::ready(rank_tree::around(
            &mut SqlNodes(&tx, Side::Live),
            board,
            xp,
            user_id,
            u64::from(k),
        ))?),
    };
    tx.finish().map_err(backend)?;
    Ok(page.map(|p| rows(board, p)))
}
