//! Sequence guards: which events of a batch are their aggregate's next one.
//!
//! A consumer applies an event only when its sequence is one above the last one applied for
//! its aggregate (its **guard**): lower is a duplicate, higher a gap. Live consumers and a
//! sealed rebuild read and write their guards in `consumer_guard` (one row per consumer key
//! and aggregate) in every batch. An unsealed rebuild beside the live version keeps the guards
//! it advanced **in memory** ([`GuardMemo`], at most [`MEMO_CAPACITY`]): reading and writing a
//! row per aggregate per page at random places of a B-tree far larger than SQLite's page cache
//! was most of a rebuild's time at 10M events (docs/performance.md, issue #14). Each page
//! appends its aggregates' new guards to a log table (at the right edge of a rowid B-tree, in
//! the page's transaction); the memo is read back from the log after a restart or when
//! another process applied pages meanwhile. When the memo is full, and at the seal, its
//! guards are written to `consumer_guard` in key order and the log is emptied
//! ([`GuardMemo::flush`]); an aggregate not in the memo is looked up there.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use uuid::Uuid;

use super::rebuild::Side;
use super::{backend, Key, Progress, Sums};
use crate::{ApplyOutcome, Change, ReadModelError};

/// The common case first: every item of the batch is its aggregate's next event (a live batch
/// without redeliveries, a sealed rebuild's page). Advances each aggregate's guard from the
/// batch's first sequence to its last with **one** conditional statement (an insert for a
/// first sequence of 1, else an update that requires the guard at `first − 1`), inside a
/// savepoint. Returns `false`, with the savepoint rolled back, as soon as one aggregate is not
/// in that state (a duplicate, a gap): the caller then decides item by item
/// ([`apply_exact`]).
pub(super) fn advance_guards(
    tx: &mut Transaction<'_>,
    key: &str,
    keys: &[Key],
) -> Result<bool, ReadModelError> {
    // Per aggregate, in first-seen order: first and last sequence; `None` when its items are
    // not consecutive within the batch.
    let mut spans: HashMap<(&str, &str), Option<(i64, i64)>> = HashMap::new();
    for k in keys {
        match spans.entry((k.aggregate_type.as_str(), k.aggregate_id.as_str())) {
            Entry::Vacant(e) => {
                e.insert(Some((k.sequence, k.sequence)));
            }
            Entry::Occupied(mut e) => {
                let span = e.get_mut();
                *span = match *span {
                    Some((first, last)) if k.sequence == last + 1 => Some((first, k.sequence)),
                    _ => None,
                };
            }
        }
    }
    let sp = tx.savepoint().map_err(backend)?;
    for ((aggregate_type, aggregate_id), span) in spans {
        let Some((first, last)) = span else {
            return Ok(false);
        };
        let changed = if first == 1 {
            sp.prepare_cached(
                "INSERT INTO consumer_guard (consumer, aggregate_type, aggregate_id, last_sequence)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![key, aggregate_type, aggregate_id, last]))
        } else {
            sp.prepare_cached(
                "UPDATE consumer_guard SET last_sequence = ?4
                 WHERE consumer = ?1 AND aggregate_type = ?2 AND aggregate_id = ?3
                   AND last_sequence = ?5",
            )
            .and_then(|mut s| {
                s.execute(params![key, aggregate_type, aggregate_id, last, first - 1])
            })
        }
        .map_err(backend)?;
        if changed != 1 {
            return Ok(false);
        }
    }
    sp.commit().map_err(backend)?;
    Ok(true)
}

/// Applies every item of a batch whose guards [`advance_guards`] advanced.
pub(super) fn apply_all(
    tx: &Transaction<'_>,
    side: Side,
    progress: &mut Progress,
    keys: &[Key],
    changes: &[Vec<Change>],
) -> Result<Vec<ApplyOutcome>, ReadModelError> {
    let mut sums = Sums::default();
    for (key, changes) in keys.iter().zip(changes) {
        sums.apply(tx, side, changes)?;
        progress.record(tx, key.position).map_err(backend)?;
    }
    sums.flush(tx, side)?;
    Ok(vec![ApplyOutcome::Applied; keys.len()])
}

/// Raises guard `(?1 consumer, ?2 aggregate type, ?3 aggregate id)` to `?4`, inserting it if
/// missing. Guards only grow, so a writer holding an older value lowers nothing (a flush from
/// a memo another process has overtaken), and a batch's advanced guard is simply written.
const SQL_RAISE_GUARD: &str = "INSERT INTO consumer_guard
         (consumer, aggregate_type, aggregate_id, last_sequence)
     VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (consumer, aggregate_type, aggregate_id)
     DO UPDATE SET last_sequence = MAX(last_sequence, excluded.last_sequence)";

/// Where [`apply_exact`] reads an aggregate's guard and writes it back.
pub(super) enum GuardSource<'m> {
    /// The `consumer_guard` rows of this guard key.
    Table(&'m str),
    /// An unsealed rebuild's memo ([`GuardMemo::source`]).
    Memo(MemoBatch<'m>),
}

/// The guard of `key` in `consumer_guard` under guard key `consumer` (0: none).
fn table_guard(tx: &Transaction<'_>, consumer: &str, key: &Key) -> Result<i64, ReadModelError> {
    tx.prepare_cached(
        "SELECT last_sequence FROM consumer_guard
         WHERE consumer = ?1 AND aggregate_type = ?2 AND aggregate_id = ?3",
    )
    .and_then(|mut s| {
        s.query_row(
            params![consumer, key.aggregate_type, key.aggregate_id],
            |r| r.get(0),
        )
        .optional()
    })
    .map(|last| last.unwrap_or(0))
    .map_err(backend)
}

impl GuardSource<'_> {
    fn read(&mut self, tx: &Transaction<'_>, key: &Key) -> Result<i64, ReadModelError> {
        match self {
            GuardSource::Table(guard_key) => table_guard(tx, guard_key, key),
            GuardSource::Memo(batch) => batch.read(tx, key),
        }
    }

    fn write(&mut self, tx: &Transaction<'_>, key: &Key, last: i64) -> Result<(), ReadModelError> {
        match self {
            GuardSource::Table(guard_key) => tx
                .prepare_cached(SQL_RAISE_GUARD)
                .and_then(|mut s| {
                    s.execute(params![
                        *guard_key,
                        key.aggregate_type,
                        key.aggregate_id,
                        last
                    ])
                })
                .map(drop)
                .map_err(backend),
            GuardSource::Memo(batch) => batch.write(tx, key, last),
        }
    }
}

/// A memo sequence: rejects a value above `u32::MAX` (four billion events in one aggregate).
fn to_u32(sequence: i64) -> Result<u32, ReadModelError> {
    u32::try_from(sequence).map_err(|_| {
        ReadModelError::Invalid(format!(
            "sequence {sequence} is beyond a rebuild's guard memo (at most {})",
            u32::MAX
        ))
    })
}

/// Decides each item of a batch under its aggregate's guard (read from `source` once per
/// aggregate, written back once at the end): `Duplicate`, `Gap` or applied.
pub(super) fn apply_exact(
    tx: &Transaction<'_>,
    side: Side,
    progress: &mut Progress,
    keys: &[Key],
    changes: &[Vec<Change>],
    source: &mut GuardSource<'_>,
) -> Result<Vec<ApplyOutcome>, ReadModelError> {
    // Per aggregate: the index of its first key in the batch, its guard, advanced or not.
    let mut guards: HashMap<(&str, &str), (usize, i64, bool)> = HashMap::new();
    let mut sums = Sums::default();
    let mut outcomes = Vec::with_capacity(keys.len());
    for (i, (key, changes)) in keys.iter().zip(changes).enumerate() {
        let guard = match guards.entry((key.aggregate_type.as_str(), key.aggregate_id.as_str())) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert((i, source.read(tx, key)?, false)),
        };
        if key.sequence <= guard.1 {
            outcomes.push(ApplyOutcome::Duplicate);
            continue;
        }
        if key.sequence > guard.1 + 1 {
            outcomes.push(ApplyOutcome::Gap {
                expected: (guard.1 + 1) as u64,
            });
            continue;
        }
        sums.apply(tx, side, changes)?;
        guard.1 = key.sequence;
        guard.2 = true;
        progress.record(tx, key.position).map_err(backend)?;
        outcomes.push(ApplyOutcome::Applied);
    }
    sums.flush(tx, side)?;
    for (first, last, advanced) in guards.into_values() {
        if advanced {
            source.write(tx, &keys[first], last)?;
        }
    }
    Ok(outcomes)
}

/// Guards an unsealed rebuild keeps in memory at most: beyond, the memo is flushed
/// ([`GuardMemo::flush`]) and starts empty. 500,000 guards take about 26 MiB of hash table
/// (`(type, UUID) → (u32, bool)`, 25 bytes per bucket), so a rebuild's peak RSS stays flat
/// however many aggregates the history holds (issue #14: ≤ 256 MB at 10M events, where the
/// tiled bench history has 2.2M aggregates).
pub(super) const MEMO_CAPACITY: usize = 500_000;

/// Guard rows upserted per transaction by [`GuardMemo::flush`] (live writers wait for one
/// chunk at most).
const FLUSH_CHUNK: usize = 20_000;

/// A guard in the memo.
#[derive(Debug, Clone, Copy)]
struct Slot {
    last: u32,
    /// Advanced since `consumer_guard` was written: the value is in the log only.
    dirty: bool,
}

/// The guards of one unsealed rebuild in memory, as of the rebuild consumer's
/// `(checkpoint, applied)`: those its pages advanced since the last flush (also in the log
/// table) and those read from `consumer_guard` since.
#[derive(Debug)]
pub(super) struct GuardMemo {
    /// Guards held at most ([`MEMO_CAPACITY`]; smaller in tests).
    capacity: usize,
    /// The rebuild consumer (`p#gN`) the memo belongs to.
    consumer: String,
    /// Its `(checkpoint, applied)` when the memo was last brought up to date.
    version: (i64, i64),
    types: Vec<String>,
    guards: HashMap<(u8, Uuid), Slot>,
    /// Rows appended to the log since it was last emptied, as far as this memo knows.
    logged: usize,
}

/// One batch's view of a [`GuardMemo`]: reads through it, collects the advanced guards
/// (applied to the memo by [`MemoBatch::commit`] once the transaction committed) and appends
/// them to the log table `log`.
pub(super) struct MemoBatch<'m> {
    memo: &'m mut GuardMemo,
    log: &'m str,
    advanced: Vec<(u8, Uuid, u32)>,
}

impl MemoBatch<'_> {
    fn read(&mut self, tx: &Transaction<'_>, key: &Key) -> Result<i64, ReadModelError> {
        let ty = self.memo.type_index(&key.aggregate_type)?;
        if let Some(slot) = self.memo.guards.get(&(ty, key.id)) {
            return Ok(i64::from(slot.last));
        }
        // Not advanced since the last flush: `consumer_guard` holds it (committed state, so
        // it may enter the memo whatever becomes of this batch).
        let last = table_guard(tx, &self.memo.consumer, key)?;
        let slot = Slot {
            last: to_u32(last)?,
            dirty: false,
        };
        self.memo.guards.insert((ty, key.id), slot);
        Ok(last)
    }

    fn write(&mut self, tx: &Transaction<'_>, key: &Key, last: i64) -> Result<(), ReadModelError> {
        tx.prepare_cached(&format!(
            "INSERT INTO {} (aggregate_type, aggregate_id, last_sequence) VALUES (?1, ?2, ?3)",
            self.log
        ))
        .and_then(|mut s| s.execute(params![key.aggregate_type, key.aggregate_id, last]))
        .map_err(backend)?;
        let ty = self.memo.type_index(&key.aggregate_type)?;
        self.advanced.push((ty, key.id, to_u32(last)?));
        Ok(())
    }

    /// Folds the batch's guards into the memo, now at `version`; call after the commit.
    pub(super) fn commit(self, version: (i64, i64)) {
        self.memo.logged += self.advanced.len();
        for (ty, id, last) in self.advanced {
            self.memo
                .guards
                .insert((ty, id), Slot { last, dirty: true });
        }
        self.memo.version = version;
    }
}

impl Default for GuardMemo {
    fn default() -> Self {
        GuardMemo::with_capacity(MEMO_CAPACITY)
    }
}

impl GuardMemo {
    /// An empty memo holding at most `capacity` guards.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        GuardMemo {
            capacity,
            consumer: String::new(),
            version: (0, 0),
            types: Vec::new(),
            guards: HashMap::new(),
            logged: 0,
        }
    }

    /// The memo of `consumer` at `version`: kept when it is already that, else emptied and
    /// read again from `log` (a restart, another process's pages, a new generation).
    ///
    /// # Errors
    /// [`ReadModelError::Backend`] reading the log.
    pub(super) fn sync(
        &mut self,
        tx: &Transaction<'_>,
        consumer: &str,
        log: &str,
        version: (i64, i64),
    ) -> Result<(), ReadModelError> {
        if self.consumer == consumer && self.version == version {
            return Ok(());
        }
        self.consumer = consumer.to_owned();
        self.types.clear();
        self.guards.clear();
        self.logged = 0;
        let mut stmt = tx
            .prepare(&format!(
                "SELECT aggregate_type, aggregate_id, last_sequence FROM {log}"
            ))
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            let ty: String = row.get(0).map_err(backend)?;
            let id: String = row.get(1).map_err(backend)?;
            let last = to_u32(row.get(2).map_err(backend)?)?;
            let id = Uuid::parse_str(&id).map_err(backend)?;
            let ty = self.type_index(&ty)?;
            let slot = self
                .guards
                .entry((ty, id))
                .or_insert(Slot { last, dirty: true });
            slot.last = slot.last.max(last);
            self.logged += 1;
        }
        self.version = version;
        Ok(())
    }

    /// A batch on this memo appending to `log`.
    pub(super) fn source<'m>(&'m mut self, log: &'m str) -> GuardSource<'m> {
        GuardSource::Memo(MemoBatch {
            memo: self,
            log,
            advanced: Vec::new(),
        })
    }

    /// Whether the memo holds more than its capacity of guards, or its log more than four
    /// times as many rows: time to [`flush`](Self::flush).
    pub(super) fn full(&self) -> bool {
        self.guards.len() > self.capacity || self.logged > 4 * self.capacity
    }

    /// Writes the memo's advanced guards into `consumer_guard` in key order (type, then the
    /// UUID's text, which sorts as its bytes), [`FLUSH_CHUNK`] rows per transaction, each
    /// raised to at least the memo's value (guards only grow, so a chunk written from a memo
    /// another process has overtaken lowers nothing); then, when the rebuild is still at the
    /// memo's version, empties the log. The memo starts empty afterwards (read again from the
    /// log if the rebuild moved on meanwhile). Returns whether the log was emptied.
    ///
    /// # Errors
    /// [`ReadModelError::Backend`]; what was written stays correct.
    pub(super) fn flush(
        &mut self,
        conn: &mut Connection,
        log: &str,
    ) -> Result<bool, ReadModelError> {
        let mut order: Vec<usize> = (0..self.types.len()).collect();
        order.sort_by_key(|i| &self.types[*i]);
        let mut dirty: Vec<(u8, Uuid, u32)> = self
            .guards
            .iter()
            .filter(|(_, slot)| slot.dirty)
            .map(|((ty, id), slot)| (*ty, *id, slot.last))
            .collect();
        let rank = |ty: u8| order.iter().position(|i| *i == usize::from(ty));
        dirty.sort_unstable_by_key(|(ty, id, _)| (rank(*ty), *id));
        for rows in dirty.chunks(FLUSH_CHUNK) {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            {
                let mut upsert = tx.prepare_cached(SQL_RAISE_GUARD).map_err(backend)?;
                for (ty, id, last) in rows {
                    let ty = &self.types[usize::from(*ty)];
                    upsert
                        .execute(params![self.consumer, ty, id.to_string(), last])
                        .map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)?;
        }
        drop(dirty);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        let current = Progress::load(&tx, &self.consumer)
            .map_err(backend)?
            .version();
        let log_exists = super::rebuild::table_exists(&tx, log).map_err(backend)?;
        // Not emptied when another process moved the rebuild on, sealed or cancelled it.
        let emptied = current == self.version && log_exists;
        if emptied {
            tx.execute(&format!("DELETE FROM {log}"), [])
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        self.guards = HashMap::new();
        self.logged = 0;
        if !emptied {
            // Another process moved the rebuild on: read the log again next time.
            self.consumer.clear();
        }
        Ok(emptied)
    }

    /// The index of aggregate type `ty`, interned on first sight.
    ///
    /// # Errors
    /// [`ReadModelError::Invalid`] for a 257th type (the domain has a handful).
    fn type_index(&mut self, ty: &str) -> Result<u8, ReadModelError> {
        if let Some(i) = self.types.iter().position(|t| t == ty) {
            return Ok(i as u8);
        }
        let i = u8::try_from(self.types.len()).map_err(|_| {
            ReadModelError::Invalid("more than 256 aggregate types in one rebuild".into())
        })?;
        self.types.push(ty.to_owned());
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{EventKey, Projection, ReadModelStore, RebuildSwitch, SqliteReadModels};

    /// Event `p`: aggregate `p % 8` (two aggregate types), its next sequence, `p` XP to it.
    fn event(p: u64) -> (EventKey, Vec<Change>) {
        let a = u128::from(p % 8);
        let id = Uuid::from_u128(0xf1_0000 + a);
        let ty = if a < 4 { "user" } else { "content" };
        let key = EventKey {
            aggregate_type: ty.into(),
            aggregate_id: id,
            sequence: (p - 1) / 8 + 1,
            position: p,
        };
        let change = Change::Xp {
            user_id: id,
            xp: p as i64,
            questions: 0,
            answers: 0,
            accepted_answers: 0,
        };
        (key, vec![change])
    }

    fn events(range: impl IntoIterator<Item = u64>) -> Vec<(EventKey, Vec<Change>)> {
        range.into_iter().map(event).collect()
    }

    fn count(store: &SqliteReadModels, sql: &str) -> i64 {
        rusqlite::Connection::open(store.path())
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    /// A memo smaller than a page flushes after every page: the guards then come from
    /// `consumer_guard`, the log is emptied, duplicates and gaps are still told, another
    /// instance continues from the flushed guards, and the switched consumer goes on from
    /// exactly the rebuilt guards. The expected XP is a plain sum per aggregate.
    #[tokio::test]
    async fn a_full_memo_flushes_its_guards_and_keeps_the_guard_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteReadModels::open(dir.path().join("tektree.db")).unwrap();
        let live = a.apply("xp", &events(1..=60)).await.unwrap();
        assert!(live.iter().all(|o| *o == ApplyOutcome::Applied));
        a.rebuild_begin(Projection::Xp).await.unwrap();
        a.inner
            .memos
            .lock()
            .unwrap()
            .insert(Projection::Xp, GuardMemo::with_capacity(3));
        for page in (1..=40).collect::<Vec<u64>>().chunks(5) {
            let out = a
                .rebuild_apply(Projection::Xp, &events(page.iter().copied()))
                .await
                .unwrap();
            assert!(out.iter().all(|o| *o == ApplyOutcome::Applied), "{out:?}");
            // The memo is flushed before each page: the log holds the last page only.
            assert_eq!(count(&a, "SELECT COUNT(*) FROM rebuild_guard_log_xp"), 5);
        }
        // Flushed through position 35: aggregates 1, 2 and 3 at their fifth event, the
        // other five at their fourth.
        assert_eq!(
            count(
                &a,
                "SELECT COUNT(*) * 1000 + SUM(last_sequence) FROM consumer_guard
                 WHERE consumer = 'xp#g1'"
            ),
            8 * 1000 + 3 * 5 + 5 * 4
        );
        // Event 41 is aggregate 1's sixth; 33 its fifth (a duplicate), 49 its seventh (a gap).
        let out = a
            .rebuild_apply(Projection::Xp, &events([33, 49, 41]))
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![
                ApplyOutcome::Duplicate,
                ApplyOutcome::Gap { expected: 6 },
                ApplyOutcome::Applied
            ]
        );
        // Another instance (its own memo, of the default size) goes on from the table and
        // the log; then the first one again (its memo is stale: read again).
        let b = SqliteReadModels::open(dir.path().join("tektree.db")).unwrap();
        let out = b
            .rebuild_apply(Projection::Xp, &events((42..=48).chain([41])))
            .await
            .unwrap();
        assert_eq!(
            out,
            [
                vec![ApplyOutcome::Applied; 7],
                vec![ApplyOutcome::Duplicate]
            ]
            .concat()
        );
        let out = a
            .rebuild_apply(Projection::Xp, &events((46..=60).chain([48])))
            .await
            .unwrap();
        assert_eq!(
            out[..3],
            [
                ApplyOutcome::Duplicate,
                ApplyOutcome::Duplicate,
                ApplyOutcome::Duplicate
            ]
        );
        assert!(out[3..15].iter().all(|o| *o == ApplyOutcome::Applied));
        assert_eq!(out[15..], [ApplyOutcome::Duplicate]);
        assert_eq!(
            a.rebuild_switch(Projection::Xp).await.unwrap(),
            RebuildSwitch::Switched
        );
        let out = a.apply("xp", &events(57..=64)).await.unwrap();
        assert_eq!(
            out,
            [
                vec![ApplyOutcome::Duplicate; 4],
                vec![ApplyOutcome::Applied; 4]
            ]
            .concat()
        );
        let mut want: BTreeMap<Uuid, i64> = BTreeMap::new();
        for p in 1..=64u64 {
            *want
                .entry(Uuid::from_u128(0xf1_0000 + u128::from(p % 8)))
                .or_default() += p as i64;
        }
        for (id, xp) in want {
            assert_eq!(a.user_xp(id).await.unwrap().unwrap().xp, xp, "{id}");
        }
    }
}
