//! Scenario 7, **growth**: the append workload on a store that already holds many events.
//!
//! The filler is made fast, outside our code: the corpus's rows are copied into the store's
//! `events` table with fresh event and aggregate ids, doubling with `INSERT … SELECT` until
//! the size is reached (`synchronous=OFF` while filling; the measured appends then run with the
//! store's own `synchronous=FULL`), and every filler row is marked published in the outbox.
//! The filler aggregates are never touched by the workload, but every index the appends
//! maintain (positions, event ids, aggregate sequences, the outbox) holds them.
//!
//! This writes the store's tables directly, so it depends on the SQLite store's schema
//! (`event-store/src/sqlite.rs`); a schema change makes it fail loudly.

use std::path::Path;

use anyhow::{bail, Result};
use tektree_domain::Rules;
use tektree_services::app::App;

/// A random lower-case UUID (version 4 layout) in SQL.
const SQL_UUID: &str = "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || \
     substr(lower(hex(randomblob(2))), 2) || '-a' || substr(lower(hex(randomblob(2))), 2) || '-' || \
     lower(hex(randomblob(6)))";

/// Creates the store at `path` (through [`App::open`], so with its own schema) and fills it
/// with about `n` events copied from the SQLite store `corpus`. Returns the stored events.
///
/// # Errors
/// Store or SQLite errors; also when the corpus is empty.
pub async fn prefill(path: &Path, corpus: &Path, n: u64) -> Result<u64> {
    crate::corpus::remove_db(path);
    let app = App::open(
        &format!("sqlite://{}", path.display()),
        "memory",
        Rules::default(),
    )
    .await?;
    drop(app);
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    conn.execute(
        "ATTACH DATABASE ?1 AS corpus",
        [corpus.to_string_lossy().as_ref()],
    )?;
    let cols = "event_type, event_version, aggregate_type, sequence, occurred_at, recorded_at, \
                correlation_id, causation_id, actor, payload";
    let copy = |from: &str, limit: u64| -> rusqlite::Result<usize> {
        conn.execute(
            &format!(
                "INSERT INTO events (event_id, aggregate_id, {cols})
                 SELECT {SQL_UUID}, {SQL_UUID}, {cols} FROM {from} LIMIT {limit}"
            ),
            [],
        )
    };
    let count = |c: &rusqlite::Connection| -> rusqlite::Result<u64> {
        c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
            .map(|v| v as u64)
    };
    copy("corpus.events", n)?;
    let mut have = count(&conn)?;
    if have == 0 && n > 0 {
        bail!("the corpus is empty");
    }
    while have < n {
        copy("main.events", n - have)?;
        have = count(&conn)?;
    }
    conn.execute(
        "INSERT OR IGNORE INTO outbox (position, published_at)
         SELECT position, '2020-01-01T00:00:00Z' FROM events",
        [],
    )?;
    conn.execute_batch("DETACH DATABASE corpus; PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(have)
}
