//! Scenario 6, **limits**: what the machine and the servers allow for the same data, without
//! our code in between.
//!
//! - `sqlite_insert_batched`: the corpus's rows inserted into an `events` + `outbox` table pair
//!   of the same columns and constraints as our store, 500 rows per transaction, WAL,
//!   `synchronous=FULL` (rows/s).
//! - `sqlite_insert_txn_per_row`: the same, one transaction per row, as a command does today
//!   (rows/s).
//! - `redis_xadd_pipelined`: XADD of payloads of the corpus's mean envelope size, pipelines of
//!   500 (the relay's batch) on one connection (events/s).
//! - `nats_publish_acked`: JetStream publishes of that size to a file-backed stream, up to 500
//!   acknowledgements outstanding (events/s).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use rusqlite::params;
use tektree_domain::EventEnvelope;

use crate::corpus::remove_db;
use crate::relay::Cleanup;

/// Rows per transaction / XADDs per pipeline / outstanding publish acknowledgements.
pub const BATCH: usize = 500;

const SCHEMA: &str = "
CREATE TABLE events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL UNIQUE,
    event_type     TEXT    NOT NULL,
    event_version  INTEGER NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL,
    occurred_at    TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    correlation_id TEXT    NOT NULL,
    causation_id   TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE outbox (position INTEGER PRIMARY KEY, published_at TEXT NULL);
CREATE INDEX outbox_unpublished ON outbox(position) WHERE published_at IS NULL;
";

/// Inserts `events` (at most `limit` of them) into a fresh database at `path`, `per_txn` rows
/// per transaction; `(rows, seconds)`.
///
/// # Errors
/// SQLite errors.
pub fn sqlite_insert(
    path: &Path,
    events: &[EventEnvelope],
    per_txn: usize,
    limit: usize,
) -> Result<(u64, f64)> {
    remove_db(path);
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    let rows: Vec<[String; 11]> = events
        .iter()
        .take(limit)
        .map(|e| {
            [
                e.event_id.to_string(),
                e.event_type.clone(),
                e.aggregate_type.clone(),
                e.aggregate_id.to_string(),
                e.occurred_at.to_rfc3339(),
                e.recorded_at.to_rfc3339(),
                e.correlation_id.to_string(),
                e.causation_id.to_string(),
                e.actor.to_string(),
                e.payload.to_string(),
                e.sequence.to_string(),
            ]
        })
        .collect();
    let started = Instant::now();
    for chunk in rows.chunks(per_txn.max(1)) {
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO events (event_id, event_type, event_version, aggregate_type,
                 aggregate_id, sequence, occurred_at, recorded_at, correlation_id, causation_id,
                 actor, payload) VALUES (?1, ?2, 1, ?3, ?4, ?11, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let mut outbox = tx.prepare_cached("INSERT INTO outbox (position) VALUES (?1)")?;
            for r in chunk {
                ins.execute(params![
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    r[5],
                    r[6],
                    r[7],
                    r[8],
                    r[9],
                    r[10].parse::<i64>().unwrap_or(1)
                ])?;
                outbox.execute([tx.last_insert_rowid()])?;
            }
        }
        tx.commit()?;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(conn);
    remove_db(path);
    Ok((rows.len() as u64, secs))
}

/// Mean JSON size of `events` as the buses carry them.
pub fn mean_payload_bytes(events: &[EventEnvelope]) -> usize {
    if events.is_empty() {
        return 0;
    }
    let total: usize = events
        .iter()
        .map(|e| serde_json::to_vec(e).map_or(0, |v| v.len()))
        .sum();
    total / events.len()
}

/// `n` pipelined XADDs of `bytes`-byte payloads to a fresh stream at `url`; `(n, seconds)`.
///
/// # Errors
/// Redis errors.
pub async fn redis_xadd(url: &str, n: u64, bytes: usize) -> Result<(u64, f64)> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let key = format!(
        "tektree-bench:limit:{}",
        tektree_outbox::test_support::unique_stream_key()
    );
    let payload = vec![b'x'; bytes];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let k = (n - sent).min(BATCH as u64);
        let mut pipe = redis::pipe();
        for _ in 0..k {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("e")
                .arg(&payload[..])
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
        sent += k;
    }
    let secs = started.elapsed().as_secs_f64();
    Cleanup::Redis(key).run(url).await;
    Ok((sent, secs))
}

/// `n` JetStream publishes of `bytes`-byte payloads to a fresh file-backed stream at `url`,
/// each acknowledged, up to [`BATCH`] outstanding; `(n, seconds)`.
///
/// # Errors
/// NATS errors.
pub async fn nats_publish(url: &str, n: u64, bytes: usize) -> Result<(u64, f64)> {
    use async_nats::jetstream::{self, stream};
    let client = async_nats::connect(url)
        .await
        .context("connecting to nats")?;
    let js = jetstream::new(client);
    let names = tektree_outbox::test_support::unique_nats_names();
    js.create_stream(stream::Config {
        name: names.stream.clone(),
        subjects: vec![format!("{}.>", names.subject_prefix)],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the stream: {e}"))?;
    let subject = format!("{}.limit", names.subject_prefix);
    let payload = vec![b'x'; bytes];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let k = (n - sent).min(BATCH as u64);
        let mut acks = Vec::with_capacity(k as usize);
        for _ in 0..k {
            let ack = js
                .publish(subject.clone(), payload.clone().into())
                .await
                .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
        }
        sent += k;
    }
    let secs = started.elapsed().as_secs_f64();
    Cleanup::Nats(vec![names.stream]).run(url).await;
    Ok((sent, secs))
}
