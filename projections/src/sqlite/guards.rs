//! Sequence guards: which events of a batch are their aggregate's next one.
//!
//! A consumer applies an event only when its sequence is one above the last one applied for
//! its aggregate (its **guard**): lower is a duplicate, higher a gap. Live consumers and a
//! sealed rebuild keep their guards in `consumer_guard` (one row per consumer key and
//! aggregate). A rebuild beside the live version keeps them **in memory** until it is sealed
//! ([`GuardMemo`]): its pages run in position order over a fresh key range, so reading and
//! writing a row per aggregate per page at random places of a B-tree far larger than the page
//! cache was most of its time at 10M events (docs/performance.md, issue #14). Each page
//! appends its aggregates' new guards to a log table (at the right edge of a rowid B-tree, in
//! the page's transaction), from which the memo is read again after a restart or when another
//! process applied pages meanwhile; the seal writes the memo into `consumer_guard` once, in
//! key order ([`GuardMemo::write_sorted`]).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};
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

/// Where [`apply_exact`] reads an aggregate's guard and writes it back.
pub(super) enum GuardSource<'m> {
    /// The `consumer_guard` rows of this guard key.
    Table(&'m str),
    /// An unsealed rebuild's memo ([`GuardMemo::source`]).
    Memo(MemoBatch<'m>),
}

impl GuardSource<'_> {
    fn read(&self, tx: &Transaction<'_>, key: &Key) -> Result<i64, ReadModelError> {
        match self {
            GuardSource::Table(guard_key) => tx
                .prepare_cached(
                    "SELECT last_sequence FROM consumer_guard
                     WHERE consumer = ?1 AND aggregate_type = ?2 AND aggregate_id = ?3",
                )
                .and_then(|mut s| {
                    s.query_row(
                        params![guard_key, key.aggregate_type, key.aggregate_id],
                        |r| r.get(0),
                    )
                    .optional()
                })
                .map(|last| last.unwrap_or(0))
                .map_err(backend),
            GuardSource::Memo(batch) => Ok(batch.memo.last(&key.aggregate_type, key.id)),
        }
    }

    fn write(&mut self, tx: &Transaction<'_>, key: &Key, last: i64) -> Result<(), ReadModelError> {
        match self {
            GuardSource::Table(guard_key) => tx
                .prepare_cached(
                    "INSERT INTO consumer_guard
                         (consumer, aggregate_type, aggregate_id, last_sequence)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (consumer, aggregate_type, aggregate_id)
                     DO UPDATE SET last_sequence = excluded.last_sequence",
                )
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
            GuardSource::Memo(batch) => {
                tx.prepare_cached(&format!(
                    "INSERT INTO {} (aggregate_type, aggregate_id, last_sequence)
                     VALUES (?1, ?2, ?3)",
                    batch.log
                ))
                .and_then(|mut s| s.execute(params![key.aggregate_type, key.aggregate_id, last]))
                .map_err(backend)?;
                let ty = batch.memo.type_index(&key.aggregate_type)?;
                batch.advanced.push((ty, key.id, to_u32(last)?));
                Ok(())
            }
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

/// The guards of one unsealed rebuild, in memory: the last sequence applied per aggregate
/// (aggregate types interned), as of the rebuild consumer's `(checkpoint, applied)`.
///
/// About 25 bytes per aggregate the rebuild has seen (hash table of `(type, UUID) → u32`):
/// tens of MiB at 10M events, within the rebuild's peak-RSS target (≤ 256 MB, issue #14).
#[derive(Debug, Default)]
pub(super) struct GuardMemo {
    /// The rebuild consumer (`p#gN`) the memo belongs to.
    consumer: String,
    /// Its `(checkpoint, applied)` when the memo was last brought up to date.
    version: (i64, i64),
    types: Vec<String>,
    last: HashMap<(u8, Uuid), u32>,
}

/// One batch's view of a [`GuardMemo`]: reads from it, collects the advanced guards (applied
/// to the memo by [`MemoBatch::commit`] once the transaction committed) and appends them to
/// the log table `log`.
pub(super) struct MemoBatch<'m> {
    memo: &'m mut GuardMemo,
    log: &'m str,
    advanced: Vec<(u8, Uuid, u32)>,
}

impl MemoBatch<'_> {
    /// Folds the batch's guards into the memo, now at `version`; call after the commit.
    pub(super) fn commit(self, version: (i64, i64)) {
        for (ty, id, last) in self.advanced {
            self.memo.last.insert((ty, id), last);
        }
        self.memo.version = version;
    }
}

impl GuardMemo {
    /// The memo of `consumer` at `version`: kept when it is already that, else read again
    /// from `log` (a restart, another process's pages, a new generation).
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
        self.last.clear();
        let mut stmt = tx
            .prepare(&format!(
                "SELECT aggregate_type, aggregate_id, last_sequence FROM {log}"
            ))
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            let ty: String = row.get(0).map_err(backend)?;
            let id: String = row.get(1).map_err(backend)?;
            let last: i64 = row.get(2).map_err(backend)?;
            let id = Uuid::parse_str(&id).map_err(backend)?;
            let ty = self.type_index(&ty)?;
            let last = to_u32(last)?;
            let slot = self.last.entry((ty, id)).or_default();
            *slot = (*slot).max(last);
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

    fn last(&self, ty: &str, id: Uuid) -> i64 {
        self.types
            .iter()
            .position(|t| t == ty)
            .and_then(|i| self.last.get(&(i as u8, id)))
            .map_or(0, |l| i64::from(*l))
    }

    /// Upserts every guard of the memo into `consumer_guard` under its consumer key, in key
    /// order (type, then the UUID's text, which sorts as its bytes), `chunk` rows per call of
    /// `write` (one transaction each, so live writers wait for one chunk at most).
    ///
    /// # Errors
    /// What `write` returns.
    pub(super) fn write_sorted(
        &self,
        chunk: usize,
        mut write: impl FnMut(&str, &[(&str, Uuid, u32)]) -> Result<(), ReadModelError>,
    ) -> Result<(), ReadModelError> {
        let mut all: Vec<(&str, Uuid, u32)> = self
            .last
            .iter()
            .map(|((ty, id), last)| (self.types[*ty as usize].as_str(), *id, *last))
            .collect();
        all.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for rows in all.chunks(chunk.max(1)) {
            write(&self.consumer, rows)?;
        }
        Ok(())
    }
}
