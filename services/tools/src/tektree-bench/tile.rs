//! The replay scenario's large stores: the corpus **tiled** until it holds the asked number of
//! events (issue #5: replay over 1M and 10M stored events).
//!
//! Building 10M events through the command handler would take hours on the build machine, so
//! the corpus's rows (a real history: the append workload plus what both policies added) are
//! copied again and again. Copy `k` (k ≥ 1) gives every UUID in the row — aggregate id,
//! event id, causation and correlation ids, and every UUID string inside the payload — a new
//! value by XOR-ing its first 8 bytes with a constant derived from `k`. That map is a
//! bijection per copy, so each copy is a consistent history of its own (answers point at that
//! copy's questions, votes at its posts, XP at its users), copies share no aggregate, and per
//! aggregate the sequences stay contiguous in position order. The projections therefore do the
//! same work per event on copy 1,000 as on copy 0, on a read model that keeps growing.
//!
//! Rows are inserted directly into the store's `events` table (the store's schema is created
//! by opening it first) with `synchronous=OFF` while filling, so this couples to the SQLite
//! store's schema (`event-store/src/sqlite.rs`) like the growth filler does; a schema change
//! makes it fail loudly. No outbox rows are written: a rebuild reads the events only.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use uuid::Uuid;

/// Rows per filling transaction.
const CHUNK: usize = 50_000;

/// One corpus row (every column but `position`).
struct Row {
    event_id: String,
    event_type: String,
    event_version: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    occurred_at: String,
    recorded_at: String,
    correlation_id: String,
    causation_id: String,
    actor: String,
    payload: String,
}

/// The UUID `id` as copy `copy` sees it (copy 0: unchanged); text that is no UUID is kept.
fn remap_text(id: &str, copy: u64) -> String {
    match Uuid::parse_str(id) {
        Ok(u) if id.len() == 36 => remap(u, copy).to_string(),
        _ => id.to_string(),
    }
}

/// `u` with its first 8 bytes XOR-ed with a per-copy constant (a bijection for each copy).
fn remap(u: Uuid, copy: u64) -> Uuid {
    if copy == 0 {
        return u;
    }
    let mask = copy.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes();
    let mut b = *u.as_bytes();
    for (byte, m) in b.iter_mut().zip(mask) {
        *byte ^= m;
    }
    Uuid::from_bytes(b)
}

/// Every UUID string inside `v` remapped for `copy`.
fn remap_json(v: &mut Value, copy: u64) {
    match v {
        Value::String(s) if s.len() == 36 => *s = remap_text(s, copy),
        Value::Array(items) => items.iter_mut().for_each(|i| remap_json(i, copy)),
        Value::Object(map) => map.values_mut().for_each(|i| remap_json(i, copy)),
        _ => {}
    }
}

/// Creates (or replaces) the store at `dest` holding `n` events: the SQLite store `corpus`
/// copied as often as needed (the last copy cut short). Returns the stored events.
///
/// # Errors
/// SQLite or store errors; also when the corpus is empty.
pub async fn tile(corpus: &Path, dest: &Path, n: u64) -> Result<u64> {
    crate::corpus::remove_db(dest);
    // Opening creates the schema.
    drop(tektree_event_store::SqliteStore::open(dest)?);
    let rows = read_corpus(corpus)?;
    if rows.is_empty() {
        bail!("the corpus {} is empty", corpus.display());
    }
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || fill(&dest, &rows, n))
        .await
        .context("the filling thread")?
}

fn read_corpus(corpus: &Path) -> Result<Vec<Row>> {
    let conn = rusqlite::Connection::open(corpus)?;
    let mut stmt = conn.prepare(
        "SELECT event_id, event_type, event_version, aggregate_type, aggregate_id, sequence,
                occurred_at, recorded_at, correlation_id, causation_id, actor, payload
         FROM events ORDER BY position",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Row {
                event_id: r.get(0)?,
                event_type: r.get(1)?,
                event_version: r.get(2)?,
                aggregate_type: r.get(3)?,
                aggregate_id: r.get(4)?,
                sequence: r.get(5)?,
                occurred_at: r.get(6)?,
                recorded_at: r.get(7)?,
                correlation_id: r.get(8)?,
                causation_id: r.get(9)?,
                actor: r.get(10)?,
                payload: r.get(11)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn fill(dest: &Path, rows: &[Row], n: u64) -> Result<u64> {
    let mut conn = rusqlite::Connection::open(dest)?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let mut written = 0u64;
    let mut copy = 0u64;
    while written < n {
        for chunk in rows.chunks(CHUNK) {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO events (event_id, event_type, event_version, aggregate_type,
                        aggregate_id, sequence, occurred_at, recorded_at, correlation_id,
                        causation_id, actor, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )?;
                for row in chunk {
                    if written == n {
                        break;
                    }
                    let payload = if copy == 0 {
                        row.payload.clone()
                    } else {
                        let mut v: Value = serde_json::from_str(&row.payload)
                            .context("a corpus payload is not JSON")?;
                        remap_json(&mut v, copy);
                        v.to_string()
                    };
                    insert.execute(rusqlite::params![
                        remap_text(&row.event_id, copy),
                        row.event_type,
                        row.event_version,
                        row.aggregate_type,
                        remap_text(&row.aggregate_id, copy),
                        row.sequence,
                        row.occurred_at,
                        row.recorded_at,
                        remap_text(&row.correlation_id, copy),
                        remap_text(&row.causation_id, copy),
                        remap_text(&row.actor, copy),
                        payload,
                    ])?;
                    written += 1;
                }
            }
            tx.commit()?;
            if written == n {
                break;
            }
        }
        copy += 1;
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remap_is_a_bijection_per_copy_and_differs_between_copies() {
        let u = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(remap(u, 0), u);
        assert_ne!(remap(u, 1), u);
        assert_ne!(remap(u, 1), remap(u, 2));
        // XOR twice with the same mask gives the original back.
        assert_eq!(remap(remap(u, 7), 7), u);
        let mut v = serde_json::json!({"a": u.to_string(), "b": [u.to_string(), "x"], "n": 3});
        remap_json(&mut v, 1);
        assert_eq!(v["a"], remap(u, 1).to_string());
        assert_eq!(v["b"][0], remap(u, 1).to_string());
        assert_eq!(v["b"][1], "x");
    }
}
