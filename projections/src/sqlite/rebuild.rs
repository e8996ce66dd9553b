//! Rebuilds beside the live read model (blue/green) in SQLite.
//!
//! A rebuild of projection `p` writes tables named like the live ones with the suffix
//! `__rebuild` (`rm_xp__rebuild`, …), created empty by [`begin`], with its own consumer row
//! `p#gN` (`N` = the rebuild's generation) for its checkpoint, sequence guard and positions
//! applied above the checkpoint. The statements of the write path are the live ones with the
//! table names rewritten ([`Side::sql`]), so a rebuild applies exactly the live code.
//!
//! [`switch`] is one write transaction: it checks that the rebuild has applied every position
//! the live consumer applied, renames the live tables to `…__retired` and the rebuild's to the
//! live names (O(1) schema edits), and points the live consumer row at the rebuild's guard
//! rows (column `state`). Readers in WAL mode see the old tables or the new ones, never a mix;
//! live workers queue on the write lock and go on with the rebuild's guard. The retired tables
//! and the old guard rows are dropped afterwards in transactions of their own.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::guards::GuardMemo;
use super::{backend, Progress, SCHEMA_TABLES};
use crate::{Projection, ReadModelError, RebuildPhase, RebuildStatus, RebuildSwitch};

/// Suffix of a rebuild's tables.
const REBUILDING: &str = "__rebuild";
/// Suffix of the live tables a switch replaced, until they are dropped.
const RETIRED: &str = "__retired";
/// Guard and applied-position rows deleted per transaction after a switch or a cancel.
const CLEANUP_CHUNK: i64 = 10_000;

/// Which version of a projection's tables a statement writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// The tables queries read.
    Live,
    /// The tables of the rebuild in progress (`…__rebuild`).
    Rebuild,
    /// The tables of the rebuild in progress, before its leaderboard count trie is built:
    /// entries only (the trie is built from them in [`seal`], before the first switch).
    RebuildBulk,
}

thread_local! {
    /// Rewritten statements by the address of the live one (a bounded set of constants).
    static REWRITTEN: RefCell<HashMap<usize, &'static str>> = RefCell::new(HashMap::new());
}

impl Side {
    /// `sql` with its read-model table names for this side.
    pub(super) fn sql(self, sql: &'static str) -> Cow<'static, str> {
        match self {
            Side::Live => Cow::Borrowed(sql),
            Side::Rebuild | Side::RebuildBulk => Cow::Borrowed(REWRITTEN.with(|cache| {
                *cache
                    .borrow_mut()
                    .entry(sql.as_ptr() as usize)
                    .or_insert_with(|| Box::leak(rename(sql, REBUILDING).into_boxed_str()))
            })),
        }
    }
}

/// Whether `b` can be part of an SQL identifier.
fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `sql` with every read-model table name (a whole identifier in [`SCHEMA_TABLES`]) followed
/// by `suffix`.
fn rename(sql: &str, suffix: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some(i) = rest.find("rm_") {
        let starts_word = i == 0 || !is_ident(rest.as_bytes()[i - 1]);
        let end = i + rest[i..].bytes().take_while(|b| is_ident(*b)).count();
        out.push_str(&rest[..end]);
        if starts_word && SCHEMA_TABLES.iter().any(|(t, _)| *t == &rest[i..end]) {
            out.push_str(suffix);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The read-model tables of `projection`.
pub(super) fn tables(projection: Projection) -> &'static [&'static str] {
    match projection {
        Projection::Xp => &["rm_xp"],
        Projection::Leaderboard => &["rm_leaderboard", "rm_leaderboard_tree"],
        Projection::Quota => &["rm_quota", "rm_tier"],
        Projection::Content => &["rm_content"],
        Projection::Tags => &["rm_tags"],
    }
}

/// The log table of the guards of `projection`'s unsealed rebuild
/// ([`super::guards::GuardMemo`]): `(aggregate_type, aggregate_id, last_sequence)` rows
/// appended by each page, dropped by the seal.
pub(super) fn guard_log(projection: Projection) -> String {
    format!("rebuild_guard_log_{}", projection.name())
}

/// Whether table `name` exists, in `tx`.
pub(super) fn table_exists(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
}

/// Creates the guard log of `projection`'s rebuild `consumer` unless it exists. A rebuild
/// begun by a version that kept its guards in `consumer_guard` gets them copied in.
fn create_guard_log(
    tx: &Transaction<'_>,
    projection: Projection,
    consumer: &str,
) -> rusqlite::Result<()> {
    let log = guard_log(projection);
    if table_exists(tx, &log)? {
        return Ok(());
    }
    tx.execute_batch(&format!(
        "CREATE TABLE {log} (
             aggregate_type TEXT    NOT NULL,
             aggregate_id   TEXT    NOT NULL,
             last_sequence  INTEGER NOT NULL
         )"
    ))?;
    tx.execute(
        &format!(
            "INSERT INTO {log} (aggregate_type, aggregate_id, last_sequence)
             SELECT aggregate_type, aggregate_id, last_sequence FROM consumer_guard
             WHERE consumer = ?1"
        ),
        [consumer],
    )
    .map(drop)
}

/// The consumer row (and guard key) of generation `generation` of `projection`'s rebuild.
fn rebuild_consumer(projection: Projection, generation: i64) -> String {
    format!("{projection}#g{generation}")
}

/// Creates the ranking index of `table` named `name` unless the table has one already
/// (a switched table keeps the index name its rebuild gave it).
pub(super) fn ensure_rank_index(
    tx: &Transaction<'_>,
    table: &str,
    name: &str,
) -> rusqlite::Result<()> {
    let has: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1
             AND substr(name, 1, 19) = 'rm_leaderboard_rank')",
        [table],
        |r| r.get(0),
    )?;
    if !has {
        tx.execute_batch(&format!(
            "CREATE INDEX {name} ON {table} (board, xp DESC, user_id ASC)"
        ))?;
    }
    Ok(())
}

/// Creates the missing tables of `projection`'s rebuild (the leaderboard's ranking index comes at
/// its seal, [`create_rank_index`]).
fn create_tables(tx: &Transaction<'_>, projection: Projection) -> rusqlite::Result<()> {
    for table in tables(projection) {
        let ddl = SCHEMA_TABLES
            .iter()
            .find(|(t, _)| t == table)
            .map(|(_, ddl)| *ddl)
            .unwrap_or_default();
        tx.execute_batch(&rename(ddl, REBUILDING))?;
    }
    Ok(())
}

/// Creates the ranking index of the rebuild's leaderboard, generation `generation`: at the
/// seal, from the entries the bulk phase wrote (one sorted build instead of moving an index
/// entry at a random place for every XP change; nobody ranks the rebuild's board before).
fn create_rank_index(conn: &mut Connection, generation: u64) -> Result<(), ReadModelError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    ensure_rank_index(
        &tx,
        &format!("rm_leaderboard{REBUILDING}"),
        &format!("rm_leaderboard_rank_g{generation}"),
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn phase_from(s: &str) -> RebuildPhase {
    match s {
        "building" => RebuildPhase::Building,
        "switched" => RebuildPhase::Switched,
        _ => RebuildPhase::Cancelled,
    }
}

fn phase_name(p: RebuildPhase) -> &'static str {
    match p {
        RebuildPhase::Building => "building",
        RebuildPhase::Switched => "switched",
        RebuildPhase::Cancelled => "cancelled",
    }
}

/// The latest rebuild of `projection`, read in `conn`'s current transaction.
fn status(conn: &Connection, projection: Projection) -> rusqlite::Result<Option<RebuildStatus>> {
    let row = conn
        .prepare_cached(
            "SELECT generation, phase, started_ms, finished_ms, checkpoint, applied
             FROM consumer_rebuild WHERE projection = ?1",
        )?
        .query_row([projection.name()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .optional()?;
    let Some((generation, phase, started, finished, mut checkpoint, mut applied)) = row else {
        return Ok(None);
    };
    let phase = phase_from(&phase);
    if phase == RebuildPhase::Building {
        (checkpoint, applied) = conn
            .prepare_cached(
                "SELECT checkpoint, applied FROM consumer_checkpoint WHERE consumer = ?1",
            )?
            .query_row([rebuild_consumer(projection, generation)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .unwrap_or((0, 0));
    }
    Ok(Some(RebuildStatus {
        projection,
        generation: generation as u64,
        phase,
        started_at_ms: started,
        finished_at_ms: finished,
        checkpoint: checkpoint as u64,
        applied: applied as u64,
    }))
}

/// The consumer row of the rebuild of `projection` in progress and the side its writes take
/// ([`Side::RebuildBulk`] until its count trie is built, then [`Side::Rebuild`]).
///
/// # Errors
/// [`ReadModelError::Invalid`] when none is in progress.
pub(super) fn building(
    tx: &Transaction<'_>,
    projection: Projection,
) -> Result<(String, Side), ReadModelError> {
    let row: Option<(i64, bool)> = tx
        .prepare_cached(
            "SELECT generation, sealed FROM consumer_rebuild
             WHERE projection = ?1 AND phase = 'building'",
        )
        .and_then(|mut s| {
            s.query_row([projection.name()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(backend)?;
    let (generation, sealed) = row.ok_or_else(|| {
        ReadModelError::Invalid(format!("no rebuild of {projection} is in progress"))
    })?;
    let side = if sealed {
        Side::Rebuild
    } else {
        Side::RebuildBulk
    };
    Ok((rebuild_consumer(projection, generation), side))
}

/// Groups `(board, xp, entries)` of the rebuild's leaderboard read per transaction by [`seal`].
const SEAL_GROUPS: i64 = 500;

/// Ends the rebuild's bulk phase: builds the count trie of the rebuild's leaderboard from its
/// entries ([`SEAL_GROUPS`] groups per transaction) and writes the guards of its memo into
/// `consumer_guard` ([`GuardMemo::flush`]), then marks the rebuild sealed and drops its guard
/// log: later pages move entries in the trie and advance guards as the live projection does.
/// The rebuild's rows are read by nobody else; should a page be applied meanwhile (another
/// process), the guards are flushed again. A no-op once sealed.
fn seal(
    conn: &mut Connection,
    memos: &Mutex<HashMap<Projection, GuardMemo>>,
    projection: Projection,
) -> Result<(), ReadModelError> {
    {
        let tx = conn.transaction().map_err(backend)?;
        if building(&tx, projection)?.1 == Side::Rebuild {
            return Ok(());
        }
    }
    if projection == Projection::Leaderboard {
        let generation = {
            let tx = conn.transaction().map_err(backend)?;
            status(&tx, projection)
                .map_err(backend)?
                .map_or(0, |s| s.generation)
        };
        create_rank_index(conn, generation)?;
        build_trie(conn)?;
    }
    let log = guard_log(projection);
    let mut memos = memos.lock().unwrap_or_else(PoisonError::into_inner);
    let memo = memos.entry(projection).or_default();
    loop {
        let version = {
            let tx = conn.transaction().map_err(backend)?;
            let (consumer, _) = building(&tx, projection)?;
            let version = Progress::load(&tx, &consumer).map_err(backend)?.version();
            memo.sync(&tx, &consumer, &log, version)?;
            version
        };
        if !memo.flush(conn, &log)? {
            continue;
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let (consumer, _) = building(&tx, projection)?;
        if Progress::load(&tx, &consumer).map_err(backend)?.version() != version {
            continue;
        }
        tx.execute(
            "UPDATE consumer_rebuild SET sealed = 1 WHERE projection = ?1 AND phase = 'building'",
            [projection.name()],
        )
        .map_err(backend)?;
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {log}"))
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        memos.remove(&projection);
        return Ok(());
    }
}

/// Builds the count trie of the rebuild's leaderboard from its entries, [`SEAL_GROUPS`]
/// groups per transaction, starting again from nothing (a seal cut short by a crash left part
/// of the trie).
fn build_trie(conn: &mut Connection) -> Result<(), ReadModelError> {
    let tree = format!("rm_leaderboard_tree{REBUILDING}");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    tx.execute(&format!("DELETE FROM {tree}"), [])
        .map_err(backend)?;
    tx.commit().map_err(backend)?;
    let mut after: Option<(String, i64)> = None;
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let groups = super::ranks::groups_after(&tx, Side::Rebuild, after.as_ref(), SEAL_GROUPS)?;
        super::ranks::build_groups(&tx, Side::Rebuild, &groups)?;
        tx.commit().map_err(backend)?;
        match groups.last() {
            Some((board, xp, _)) if groups.len() as i64 == SEAL_GROUPS => {
                after = Some((board.clone(), *xp));
            }
            _ => return Ok(()),
        }
    }
}

/// [`crate::ReadModelStore::rebuild_begin`].
pub(super) fn begin(
    conn: &mut Connection,
    projection: Projection,
) -> Result<RebuildStatus, ReadModelError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let latest = status(&tx, projection).map_err(backend)?;
    let generation = match &latest {
        Some(s) if s.phase == RebuildPhase::Building => s.generation as i64,
        Some(s) => s.generation as i64 + 1,
        None => 1,
    };
    if latest.as_ref().map(|s| s.phase) != Some(RebuildPhase::Building) {
        for table in tables(projection) {
            tx.execute_batch(&format!("DROP TABLE IF EXISTS {table}{REBUILDING}"))
                .map_err(backend)?;
        }
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", guard_log(projection)))
            .map_err(backend)?;
        tx.execute(
            "INSERT INTO consumer_rebuild
                 (projection, generation, phase, started_ms, finished_ms, checkpoint, applied,
                  sealed)
             VALUES (?1, ?2, 'building', ?3, NULL, 0, 0, 0)
             ON CONFLICT (projection) DO UPDATE SET generation = excluded.generation,
                 phase = 'building', started_ms = excluded.started_ms, finished_ms = NULL,
                 checkpoint = 0, applied = 0, sealed = 0",
            params![projection.name(), generation, now_ms()],
        )
        .map_err(backend)?;
    }
    create_tables(&tx, projection).map_err(backend)?;
    let (consumer, side) = building(&tx, projection)?;
    if side == Side::RebuildBulk {
        create_guard_log(&tx, projection, &consumer).map_err(backend)?;
    }
    let begun = status(&tx, projection)
        .map_err(backend)?
        .ok_or_else(|| ReadModelError::Backend("rebuild row vanished".into()))?;
    tx.commit().map_err(backend)?;
    Ok(begun)
}

/// The guard key of live consumer `consumer` (its `state`, or its own name).
fn live_key(tx: &Transaction<'_>, consumer: &str) -> rusqlite::Result<(i64, i64, String)> {
    let row: Option<(i64, i64, Option<String>)> = tx
        .query_row(
            "SELECT checkpoint, applied, state FROM consumer_checkpoint WHERE consumer = ?1",
            [consumer],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (checkpoint, applied, state) = row.unwrap_or((0, 0, None));
    Ok((
        checkpoint,
        applied,
        state.unwrap_or_else(|| consumer.to_owned()),
    ))
}

/// [`crate::ReadModelStore::rebuild_switch`]: the rebuild's count trie if it has none yet
/// ([`seal`]), the switch transaction, then the clean-up of the retired tables and the old
/// guard rows.
pub(super) fn switch(
    conn: &mut Connection,
    memos: &Mutex<HashMap<Projection, GuardMemo>>,
    projection: Projection,
) -> Result<RebuildSwitch, ReadModelError> {
    seal(conn, memos, projection)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let (shadow, _) = building(&tx, projection)?;
    let live = projection.name();
    let (live_checkpoint, _, old_key) = live_key(&tx, live).map_err(backend)?;
    let live_max: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(position), 0) FROM consumer_applied WHERE consumer = ?1",
            [&old_key],
            |r| r.get(0),
        )
        .map_err(backend)?;
    let live_max = live_max.max(live_checkpoint);
    let (checkpoint, applied, _) = live_key(&tx, &shadow).map_err(backend)?;
    if checkpoint < live_max {
        return Ok(RebuildSwitch::Behind {
            live: live_max as u64,
            rebuild: checkpoint as u64,
        });
    }
    for table in tables(projection) {
        tx.execute_batch(&format!(
            "DROP TABLE IF EXISTS {table}{RETIRED};
             ALTER TABLE {table} RENAME TO {table}{RETIRED};
             ALTER TABLE {table}{REBUILDING} RENAME TO {table};"
        ))
        .map_err(backend)?;
    }
    tx.execute(
        "INSERT INTO consumer_checkpoint (consumer, checkpoint, applied, state)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (consumer) DO UPDATE SET checkpoint = excluded.checkpoint,
             applied = excluded.applied, state = excluded.state",
        params![live, checkpoint, applied, shadow],
    )
    .map_err(backend)?;
    tx.execute(
        "DELETE FROM consumer_checkpoint WHERE consumer = ?1",
        [&shadow],
    )
    .map_err(backend)?;
    finish(&tx, projection, RebuildPhase::Switched, checkpoint, applied)?;
    tx.commit().map_err(backend)?;
    drop_tables(conn, projection, RETIRED)?;
    delete_key_rows(conn, &old_key)?;
    Ok(RebuildSwitch::Switched)
}

/// Marks the rebuild of `projection` finished in `phase`.
fn finish(
    tx: &Transaction<'_>,
    projection: Projection,
    phase: RebuildPhase,
    checkpoint: i64,
    applied: i64,
) -> Result<(), ReadModelError> {
    tx.execute(
        "UPDATE consumer_rebuild SET phase = ?2, finished_ms = ?3, checkpoint = ?4, applied = ?5
         WHERE projection = ?1",
        params![
            projection.name(),
            phase_name(phase),
            now_ms(),
            checkpoint,
            applied
        ],
    )
    .map(drop)
    .map_err(backend)
}

/// [`crate::ReadModelStore::rebuild_cancel`].
pub(super) fn cancel(
    conn: &mut Connection,
    memos: &Mutex<HashMap<Projection, GuardMemo>>,
    projection: Projection,
) -> Result<bool, ReadModelError> {
    memos
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&projection);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let shadow = match building(&tx, projection) {
        Ok((shadow, _)) => shadow,
        Err(ReadModelError::Invalid(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    let (checkpoint, applied, _) = live_key(&tx, &shadow).map_err(backend)?;
    tx.execute(
        "DELETE FROM consumer_checkpoint WHERE consumer = ?1",
        [&shadow],
    )
    .map_err(backend)?;
    finish(
        &tx,
        projection,
        RebuildPhase::Cancelled,
        checkpoint,
        applied,
    )?;
    tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", guard_log(projection)))
        .map_err(backend)?;
    tx.commit().map_err(backend)?;
    drop_tables(conn, projection, REBUILDING)?;
    delete_key_rows(conn, &shadow)?;
    Ok(true)
}

/// Drops `projection`'s tables with `suffix`, in one transaction.
fn drop_tables(
    conn: &mut Connection,
    projection: Projection,
    suffix: &str,
) -> Result<(), ReadModelError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    for table in tables(projection) {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {table}{suffix}"))
            .map_err(backend)?;
    }
    tx.commit().map_err(backend)
}

/// Deletes the guard and applied-position rows of guard key `key`, [`CLEANUP_CHUNK`] rows per
/// transaction (so live writers wait for one chunk at most).
fn delete_key_rows(conn: &mut Connection, key: &str) -> Result<(), ReadModelError> {
    for sql in [
        "DELETE FROM consumer_guard WHERE consumer = ?1 AND (aggregate_type, aggregate_id) IN
             (SELECT aggregate_type, aggregate_id FROM consumer_guard WHERE consumer = ?1 LIMIT ?2)",
        "DELETE FROM consumer_applied WHERE consumer = ?1 AND position IN
             (SELECT position FROM consumer_applied WHERE consumer = ?1 LIMIT ?2)",
    ] {
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let n = tx
                .execute(sql, params![key, CLEANUP_CHUNK])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            if (n as i64) < CLEANUP_CHUNK {
                break;
            }
        }
    }
    Ok(())
}

/// [`crate::ReadModelStore::rebuilds`].
pub(super) fn statuses(conn: &mut Connection) -> Result<Vec<RebuildStatus>, ReadModelError> {
    let tx = conn.transaction().map_err(backend)?;
    let mut out = Vec::new();
    for projection in Projection::ALL {
        out.extend(status(&tx, projection).map_err(backend)?);
    }
    tx.finish().map_err(backend)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_read_model_table_names_are_renamed() {
        assert_eq!(
            rename(
                "UPDATE rm_leaderboard SET xp = 1; SELECT * FROM rm_leaderboard_tree, \
                 rm_tierx, xrm_xp, consumer_guard WHERE rm_quota.tier = (SELECT tier FROM rm_tier)",
                "__rebuild"
            ),
            "UPDATE rm_leaderboard__rebuild SET xp = 1; SELECT * FROM rm_leaderboard_tree__rebuild, \
             rm_tierx, xrm_xp, consumer_guard WHERE rm_quota__rebuild.tier = \
             (SELECT tier FROM rm_tier__rebuild)"
        );
    }
}
