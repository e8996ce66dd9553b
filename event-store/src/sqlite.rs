//! The embedded SQLite adapter of [`EventStore`].
//!
//! # Schema
//!
//! Only these tables (and their indexes) belong to this adapter; the same database file also
//! holds read-model tables of other crates (prefixed `rm_` and `consumer_`), which it never
//! touches.
//!
//! ```sql
//! events(position INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE,
//!        event_type TEXT, event_version INTEGER, aggregate_type TEXT, aggregate_id TEXT,
//!        sequence INTEGER, occurred_at TEXT, recorded_at TEXT, correlation_id TEXT,
//!        causation_id TEXT, actor TEXT, payload TEXT,
//!        UNIQUE(aggregate_type, aggregate_id, sequence))
//! outbox(position INTEGER PRIMARY KEY REFERENCES events(position), published_at TEXT NULL)
//! idempotency(key TEXT PRIMARY KEY, …)            -- see crate::IdempotencyRecord
//! snapshots(aggregate_type TEXT, aggregate_id TEXT, version INTEGER,
//!           snapshot_version INTEGER, state TEXT, taken_at TEXT,
//!           PRIMARY KEY(aggregate_type, aggregate_id))
//! store_identity(id INTEGER PRIMARY KEY CHECK (id = 1), store_id TEXT, epoch INTEGER,
//!                created_at TEXT)                 -- one row: crate::StoreIdentity
//! ```
//!
//! `snapshots` holds one [`StoredSnapshot`] per aggregate (`state` as compact JSON text). A save
//! is one `INSERT … ON CONFLICT DO UPDATE … WHERE` upsert (the no-backwards rule of
//! [`StoredSnapshot::replaces`] in SQL) queued on the writer thread like the other writes (its
//! JSON is encoded on the caller's thread first). It is never part of an append's savepoint,
//! so a failing save cannot fail an append; sharing the writer keeps it from contending with
//! the writer for SQLite's database lock.
//!
//! Uuids are stored as lower-case hyphenated text, timestamps as RFC 3339 in UTC with exactly
//! nine fractional digits (`2024-05-06T07:08:09.123456789Z`, fixed width, so text order is time
//! order), the actor as `user:<uuid>` / `system:<name>` and the payload as compact JSON text.
//!
//! # Group commit
//!
//! All writes of one [`SqliteStore`] (and its clones) go through one writer thread that owns
//! the write connection (module `writer`). Appends that queue up while a transaction is in
//! flight are committed together: up to 256 writes (or about 4,096 events) run in **one**
//! `BEGIN IMMEDIATE … COMMIT` transaction, so `synchronous=FULL` costs one fsync per batch
//! instead of one per command. Each append stays atomic and individually answered:
//! - it runs in its own `SAVEPOINT`; when it fails (expected-version conflict — also against an
//!   earlier append of the same batch, whose writes it sees —, idempotency key already
//!   recorded, duplicate event id) only its savepoint is rolled back and only its caller gets
//!   the error; the other appends of the batch commit;
//! - no caller gets its envelopes before the batch's `COMMIT` has returned (the events are on
//!   disk);
//! - if `BEGIN` or `COMMIT` fails, or SQLite aborts the transaction (I/O error, disk full), the
//!   batch is rolled back as a whole and every append of it gets [`StoreError::Backend`].
//!
//! There is no timer: an append arriving at an idle writer is committed alone at once, so low
//! load pays no latency. The batch sizes are recorded in the histogram
//! `tektree_store_batch_appends` (through the `metrics` facade) and counted by
//! [`SqliteStore::write_batches`] / [`SqliteStore::batched_appends`]. Other writes (outbox
//! marks, idempotency records and purges, snapshot saves) are queued on the same thread and share the batches
//! in the same way, each in its own savepoint and answered after the `COMMIT`; they count
//! toward the 256. Checking, and JSON-encoding payloads, happen on the caller's thread
//! before queueing. As before group commit, a queued append whose caller stops waiting (its
//! future dropped) still runs and may commit.
//!
//! # Concurrency and positions
//!
//! Every write transaction is `BEGIN IMMEDIATE`, which takes SQLite's single database write
//! lock up front (waiting up to the busy timeout, 10 s, for other connections and other OS
//! processes, which have writer threads of their own). Writers are therefore serialised: a
//! position is assigned while the writer holds the lock, and the lock is released only by
//! commit or rollback. Hence `AUTOINCREMENT` positions are strictly increasing **in commit
//! order** (within a batch, in queue order), and — because a rolled back transaction or
//! savepoint also rolls back the `sqlite_sequence` counter and rows are never deleted — they
//! are gap-free (1, 2, 3, …). Readers use WAL snapshots and never block the writer.

pub mod backup;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use tektree_domain::{Actor, EventEnvelope, NewEvent, StoredEvent};
use uuid::Uuid;

use crate::{
    validate_batch, EventLog, Head, IdempotencyKey, IdempotencyRecord, IdempotencyStore,
    OutboxStore, SnapshotStore, StoreError, StoreIdentity, StoredSnapshot,
};
use writer::{AppendBody, PreparedEvent, Writer};

/// How long a connection waits for a lock held by another connection or process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle read connections kept open for reuse (more are opened on demand and closed after use).
const MAX_IDLE_READERS: usize = 4;

/// Columns selected by every event read, in [`decode_row`] order.
const EVENT_COLUMNS: &str = "e.position, e.event_id, e.event_type, e.event_version, \
     e.aggregate_type, e.aggregate_id, e.sequence, e.occurred_at, e.recorded_at, \
     e.correlation_id, e.causation_id, e.actor, e.payload";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL UNIQUE,
    event_type     TEXT    NOT NULL,
    event_version  INTEGER NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence >= 1),
    occurred_at    TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    correlation_id TEXT    NOT NULL,
    causation_id   TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE IF NOT EXISTS outbox (
    position     INTEGER PRIMARY KEY REFERENCES events(position),
    published_at TEXT NULL
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox(position) WHERE published_at IS NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    key            TEXT    PRIMARY KEY,
    fingerprint    TEXT    NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    first_sequence INTEGER NOT NULL,
    event_count    INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    created_at     INTEGER NOT NULL, -- µs since the Unix epoch
    expires_at     INTEGER NOT NULL  -- µs since the Unix epoch
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency(expires_at);
CREATE TABLE IF NOT EXISTS snapshots (
    aggregate_type   TEXT    NOT NULL,
    aggregate_id     TEXT    NOT NULL,
    version          INTEGER NOT NULL CHECK (version >= 0),
    snapshot_version INTEGER NOT NULL CHECK (snapshot_version >= 0),
    state            TEXT    NOT NULL, -- the folded state, compact JSON
    taken_at         TEXT    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS store_identity (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    store_id   TEXT    NOT NULL,
    epoch      INTEGER NOT NULL CHECK (epoch >= 1),
    created_at TEXT    NOT NULL
);
";

/// [`EventStore`] on one SQLite database file (WAL mode, `synchronous=FULL`).
///
/// Cloning is cheap (an [`Arc`]); clones share one writer thread with its write connection
/// (and so batch their appends together) and a small pool of read connections. Several
/// `SqliteStore`s — in one process or in several OS processes — may open the same file at
/// once; their writes are serialised by SQLite's database lock (see the module docs on
/// positions). A write waits at most 10 s for the lock, then fails with
/// [`StoreError::Backend`].
///
/// Writes run on the store's writer thread (see the module docs on group commit); reads run on
/// [`tokio::task::spawn_blocking`], so the async methods must be called inside a Tokio runtime.
/// The writer thread ends when the last clone is dropped (after finishing the queued writes).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The group-commit writer thread owning the write connection.
    writer: Writer,
    readers: Mutex<Vec<Connection>>,
    /// Read at open; changed only by [`EventLog::raise_epoch`].
    identity: Mutex<StoreIdentity>,
}

/// The `store_identity` row.
fn read_identity(conn: &Connection) -> Result<StoreIdentity, StoreError> {
    let (id, epoch): (String, i64) = conn
        .query_row(
            "SELECT store_id, epoch FROM store_identity WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(backend)?;
    Ok(StoreIdentity {
        store_id: Uuid::parse_str(&id).map_err(|e| backend(format!("store_id {id:?}: {e}")))?,
        epoch: u64::try_from(epoch).map_err(backend)?,
    })
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-done transaction behind (dropping a
    // `Transaction` rolls it back), so a poisoned lock is safe to reuse.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{what} {v} exceeds i64::MAX")))
}

fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Runs `op` until it does not fail with `SQLITE_BUSY` / `SQLITE_LOCKED` or `deadline` passes.
///
/// Needed while opening: changing the journal mode (and reading a schema another process is
/// changing) can fail with `SQLITE_BUSY` *without* consulting the busy handler, because SQLite
/// refuses to wait where waiting could deadlock (a shared lock waiting for an exclusive one).
fn retry_busy<T>(
    deadline: Instant,
    mut op: impl FnMut() -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    let mut pause = Duration::from_millis(1);
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(backend(e)),
        }
    }
}

/// SQLite's busy handler: sleeps 50 µs, 100 µs, … up to 1 ms between tries, then 1 ms, for
/// about [`BUSY_TIMEOUT`] in all, instead of SQLite's own 1, 2, 5, … 100 ms steps (which put
/// whole sleeps of tens of milliseconds into commit and read-model latency under contention).
fn wait_for_lock(calls: i32) -> bool {
    std::thread::sleep(Duration::from_micros(50 * (calls.clamp(0, 19) as u64 + 1)));
    calls < 20 + BUSY_TIMEOUT.as_millis() as i32
}

/// Opens a connection with the per-connection settings every connection needs.
fn connect(path: &Path, flags: OpenFlags, reader: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Backend(format!("open {}: {e}", path.display())))?;
    conn.busy_handler(Some(wait_for_lock)).map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(backend)?;
    if reader {
        conn.pragma_update(None, "query_only", "ON")
            .map_err(backend)?;
    }
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and creates the `events`,
    /// `outbox`, `idempotency`, `snapshots` and `store_identity` tables if they do not exist yet
    /// (a new file gets a fresh [`StoreIdentity`], epoch 1). Idempotent; safe to call from several processes
    /// at once. Switches the file to WAL mode (a persistent property of the file).
    ///
    /// This is a blocking call (file I/O; it may wait up to 10 s for another process's lock).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the file cannot be opened or created (for example a missing
    /// parent directory), is not a SQLite database, or the schema cannot be created.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut writer = connect(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            false,
        )?;
        let deadline = Instant::now() + BUSY_TIMEOUT;
        let mode: String = retry_busy(deadline, || {
            writer.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "{}: could not switch to WAL mode (journal_mode is {mode})",
                path.display()
            )));
        }
        retry_busy(deadline, || {
            let tx = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA)?;
            // The identity is made once, with the store (a copy keeps it).
            tx.execute(
                "INSERT OR IGNORE INTO store_identity (id, store_id, epoch, created_at) \
                 VALUES (1, ?1, 1, ?2)",
                params![
                    Uuid::new_v4().to_string(),
                    Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true)
                ],
            )?;
            tx.commit()
        })?;
        let identity = read_identity(&writer)?;
        let writer = Writer::spawn(writer)?;
        tracing::debug!(path = %path.display(), "opened sqlite event store");
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                writer,
                readers: Mutex::new(Vec::new()),
                identity: Mutex::new(identity),
            }),
        })
    }

    /// The database file's path, as given to [`SqliteStore::open`].
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Number of write transactions (group commits) this store's writer has run since
    /// [`SqliteStore::open`], committed or rolled back; shared by all clones. Each carried one
    /// or more writes: appends, outbox marks, idempotency records, purges, snapshot saves (see
    /// the module docs on group commit).
    pub fn write_batches(&self) -> u64 {
        self.inner.writer.stats.batches.load(Ordering::Relaxed)
    }

    /// Number of appends (calls of [`EventLog::append`] / [`IdempotencyStore::append_idempotent`]
    /// with at least one event) that the batches counted by [`SqliteStore::write_batches`]
    /// carried, each committed or answered with its own error. `batched_appends() /
    /// write_batches()` is the mean batch size; the distribution is the histogram
    /// `tektree_store_batch_appends` of the `metrics` facade.
    pub fn batched_appends(&self) -> u64 {
        self.inner.writer.stats.appends.load(Ordering::Relaxed)
    }

    /// The append of [`EventLog::append`] and [`IdempotencyStore::append_idempotent`]: checks and
    /// encodes the batch on the caller's thread, then queues it for the group-commit writer.
    async fn append_with(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        validate_batch(aggregate_type, aggregate_id, expected_version, &events)?;
        let events = events
            .into_iter()
            .map(|event| {
                let payload = serde_json::to_string(&event.event.to_payload()).map_err(backend)?;
                Ok(PreparedEvent { event, payload })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.inner
            .writer
            .append(AppendBody {
                aggregate_type: aggregate_type.to_string(),
                aggregate_id,
                expected_version,
                events,
                key,
            })
            .await
    }

    /// Runs `f` on the writer thread inside its own savepoint of a group-commit transaction
    /// (`f` must not begin or end transactions); returns its result after the `COMMIT`.
    async fn with_writer<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.inner.writer.exec(f).await
    }

    /// Runs `f` with a pooled read connection on the blocking pool.
    async fn with_reader<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let idle = lock(&inner.readers).pop();
            let conn = match idle {
                Some(c) => c,
                None => connect(
                    &inner.path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    true,
                )?,
            };
            let out = f(&conn);
            let mut pool = lock(&inner.readers);
            if pool.len() < MAX_IDLE_READERS {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Backend(format!("blocking task failed: {e}")))?
    }
}

fn is_unique_violation(e: &rusqlite::Error, column: &str) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            f.code == ErrorCode::ConstraintViolation
                && msg.as_deref().is_some_and(|m| m.contains(column))
        }
        _ => false,
    }
}

/// Inserts `record` unless a record of its key is live at `record.key.created_at` (an expired
/// one is replaced). Returns whether it was inserted.
fn insert_record(conn: &Connection, record: &IdempotencyRecord) -> Result<bool, StoreError> {
    let k = &record.key;
    let created = k.created_at.timestamp_micros();
    conn.prepare_cached("DELETE FROM idempotency WHERE key = ?1 AND expires_at <= ?2")
        .and_then(|mut st| st.execute(params![k.key, created]))
        .map_err(backend)?;
    let inserted = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO idempotency (key, fingerprint, aggregate_type, aggregate_id, \
             first_sequence, event_count, version, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut st| {
            st.execute(params![
                k.key,
                k.fingerprint,
                record.aggregate_type,
                record.aggregate_id.to_string(),
                to_i64(record.first_sequence, "first_sequence").unwrap_or(i64::MAX),
                to_i64(record.event_count, "event_count").unwrap_or(i64::MAX),
                to_i64(record.version, "version").unwrap_or(i64::MAX),
                created,
                k.expires_at.timestamp_micros(),
            ])
        })
        .map_err(backend)?;
    Ok(inserted == 1)
}

/// The record of `key` live at `now`, if any.
fn select_record(
    conn: &Connection,
    key: &str,
    now: DateTime<Utc>,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT fingerprint, aggregate_type, aggregate_id, first_sequence, event_count, \
             version, created_at, expires_at FROM idempotency WHERE key = ?1 AND expires_at > ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![key, now.timestamp_micros()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .optional()
        })
        .map_err(backend)?;
    let Some((fingerprint, aggregate_type, aggregate_id, first, count, version, created, expires)) =
        row
    else {
        return Ok(None);
    };
    let corrupt =
        |what: &str| StoreError::Backend(format!("idempotency record {key:?}: bad {what}"));
    let micros =
        |v: i64, what: &str| DateTime::<Utc>::from_timestamp_micros(v).ok_or_else(|| corrupt(what));
    let unsigned = |v: i64, what: &str| u64::try_from(v).map_err(|_| corrupt(what));
    Ok(Some(IdempotencyRecord {
        key: IdempotencyKey {
            key: key.to_string(),
            fingerprint,
            created_at: micros(created, "created_at")?,
            expires_at: micros(expires, "expires_at")?,
        },
        aggregate_type,
        aggregate_id: Uuid::parse_str(&aggregate_id).map_err(|_| corrupt("aggregate_id"))?,
        first_sequence: unsigned(first, "first_sequence")?,
        event_count: unsigned(count, "event_count")?,
        version: unsigned(version, "version")?,
    }))
}

/// Decodes one row selected with [`EVENT_COLUMNS`].
fn decode_row(row: &rusqlite::Row<'_>) -> Result<EventEnvelope, StoreError> {
    let position: i64 = row.get(0).map_err(backend)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        position: u64::try_from(position).unwrap_or(0),
        reason,
    };
    let text = |i: usize, name: &str| -> Result<String, StoreError> {
        row.get::<_, String>(i)
            .map_err(|e| corrupt(format!("column {name}: {e}")))
    };
    let int = |i: usize, name: &str| -> Result<i64, StoreError> {
        row.get::<_, i64>(i)
            .map_err(|e| corrupt(format!("column {name}: {e}")))
    };
    // Columns only parsed are borrowed from the row, not copied into a `String`.
    let borrowed = |i: usize, name: &str| -> Result<&str, StoreError> {
        let value = row
            .get_ref(i)
            .map_err(|e| corrupt(format!("column {name}: {e}")))?;
        value
            .as_str()
            .map_err(|e| corrupt(format!("column {name}: {e}")))
    };
    let uuid = |i: usize, name: &str| -> Result<Uuid, StoreError> {
        let s = borrowed(i, name)?;
        Uuid::parse_str(s).map_err(|e| corrupt(format!("column {name} {s:?}: {e}")))
    };
    let time = |i: usize, name: &str| -> Result<DateTime<Utc>, StoreError> {
        let s = borrowed(i, name)?;
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| corrupt(format!("column {name} {s:?}: {e}")))
    };
    let position_u =
        u64::try_from(position).map_err(|_| corrupt(format!("negative position {position}")))?;
    let event_version = int(3, "event_version")?;
    let sequence = int(6, "sequence")?;
    let actor_text = borrowed(11, "actor")?;
    let payload_text = borrowed(12, "payload")?;
    Ok(EventEnvelope {
        event_id: uuid(1, "event_id")?,
        event_type: text(2, "event_type")?,
        event_version: u32::try_from(event_version)
            .map_err(|_| corrupt(format!("column event_version {event_version} out of range")))?,
        aggregate_type: text(4, "aggregate_type")?,
        aggregate_id: uuid(5, "aggregate_id")?,
        sequence: u64::try_from(sequence)
            .map_err(|_| corrupt(format!("column sequence {sequence} out of range")))?,
        position: position_u,
        occurred_at: time(7, "occurred_at")?,
        recorded_at: time(8, "recorded_at")?,
        correlation_id: uuid(9, "correlation_id")?,
        causation_id: uuid(10, "causation_id")?,
        actor: actor_text
            .parse::<Actor>()
            .map_err(|e| corrupt(format!("column actor: {e}")))?,
        payload: serde_json::from_str(payload_text)
            .map_err(|e| corrupt(format!("column payload: {e}")))?,
    })
}

/// Decodes one row of [`EventLog::read_all_stored`]'s query.
fn decode_stored(row: &rusqlite::Row<'_>) -> Result<StoredEvent, StoreError> {
    let position: i64 = row.get(0).map_err(backend)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        position: u64::try_from(position).unwrap_or(0),
        reason,
    };
    let unsigned = |i: usize, name: &str| -> Result<u64, StoreError> {
        let v: i64 = row
            .get(i)
            .map_err(|e| corrupt(format!("column {name}: {e}")))?;
        u64::try_from(v).map_err(|_| corrupt(format!("column {name} {v} out of range")))
    };
    let text = |i: usize, name: &str| -> Result<String, StoreError> {
        row.get::<_, String>(i)
            .map_err(|e| corrupt(format!("column {name}: {e}")))
    };
    let id = row
        .get_ref(2)
        .map_err(|e| corrupt(format!("column aggregate_id: {e}")))?
        .as_str()
        .map_err(|e| corrupt(format!("column aggregate_id: {e}")))?;
    let version = unsigned(5, "event_version")?;
    Ok(StoredEvent {
        position: unsigned(0, "position")?,
        aggregate_type: text(1, "aggregate_type")?,
        aggregate_id: Uuid::parse_str(id)
            .map_err(|e| corrupt(format!("column aggregate_id {id:?}: {e}")))?,
        sequence: unsigned(3, "sequence")?,
        event_type: text(4, "event_type")?,
        event_version: u32::try_from(version)
            .map_err(|_| corrupt(format!("column event_version {version} out of range")))?,
        payload: text(6, "payload")?,
    })
}

/// Runs a query selecting [`EVENT_COLUMNS`] and decodes every row.
fn query_events(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let mut rows = stmt.query(params).map_err(backend)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(backend)? {
        out.push(decode_row(row)?);
    }
    Ok(out)
}

#[async_trait]
impl EventLog for SqliteStore {
    /// See [`EventLog::append`]. Runs in its own savepoint of a group-commit transaction
    /// (module docs): version check, event rows, outbox rows; answered after the batch's
    /// `COMMIT`. `recorded_at` is the store clock when this append's savepoint started (the
    /// write lock is held), the same for every event of the append; appends of one batch get
    /// their own, successive, clock readings.
    ///
    /// # Errors
    /// Additionally to the trait's errors: [`StoreError::Backend`] (nothing written) when an
    /// event is not of the given aggregate or the sequences are not `expected_version + 1 ..`
    /// contiguous (a programming error of the caller), or an `event_id` is already stored.
    async fn append(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.append_with(aggregate_type, aggregate_id, expected_version, events, None)
            .await
    }

    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let aggregate_type = aggregate_type.to_string();
        self.with_reader(move |conn| {
            query_events(
                conn,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events e \
                     WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2 ORDER BY e.sequence"
                ),
                params![aggregate_type, aggregate_id.to_string()],
            )
        })
        .await
    }

    async fn load_after(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        after_sequence: u64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let aggregate_type = aggregate_type.to_string();
        let after = i64::try_from(after_sequence).unwrap_or(i64::MAX);
        self.with_reader(move |conn| {
            query_events(
                conn,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events e \
                     WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2 AND e.sequence > ?3 \
                     ORDER BY e.sequence"
                ),
                params![aggregate_type, aggregate_id.to_string(), after],
            )
        })
        .await
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        self.with_reader(move |conn| {
            query_events(
                conn,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events e \
                     WHERE e.position > ?1 ORDER BY e.position LIMIT ?2"
                ),
                params![after, limit_i64(limit)],
            )
        })
        .await
    }

    /// See [`EventLog::read_all_stored`]: the key, type, version and payload columns only.
    async fn read_all_stored(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        self.with_reader(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT position, aggregate_type, aggregate_id, sequence, event_type,
                            event_version, payload
                     FROM events WHERE position > ?1 ORDER BY position LIMIT ?2",
                )
                .map_err(backend)?;
            let mut rows = stmt
                .query(params![after, limit_i64(limit)])
                .map_err(backend)?;
            let mut out = Vec::with_capacity(limit.min(100_000));
            while let Some(row) = rows.next().map_err(backend)? {
                out.push(decode_stored(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn head(&self) -> Result<Head, StoreError> {
        self.with_reader(|conn| {
            let (position, events): (i64, i64) = conn
                .query_row(
                    "SELECT COALESCE(MAX(position), 0), COUNT(*) FROM events",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(backend)?;
            Ok(Head {
                position: u64::try_from(position).map_err(backend)?,
                events: u64::try_from(events).map_err(backend)?,
            })
        })
        .await
    }

    async fn last_position(&self) -> Result<u64, StoreError> {
        self.with_reader(|conn| {
            let position: i64 = conn
                .query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
                    r.get(0)
                })
                .map_err(backend)?;
            u64::try_from(position).map_err(backend)
        })
        .await
    }

    async fn identity(&self) -> Result<StoreIdentity, StoreError> {
        Ok(*lock(&self.inner.identity))
    }

    async fn raise_epoch(&self, above: u64) -> Result<StoreIdentity, StoreError> {
        let above = to_i64(above, "epoch")?;
        let raised = self
            .with_writer(move |conn| {
                conn.execute(
                    "UPDATE store_identity SET epoch = MAX(epoch, ?1) + 1 WHERE id = 1",
                    [above],
                )
                .map_err(backend)?;
                read_identity(conn)
            })
            .await?;
        *lock(&self.inner.identity) = raised;
        Ok(raised)
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    /// See [`IdempotencyStore::append_idempotent`]: the record is inserted in the append's savepoint
    /// of the group-commit transaction, after the version check; a key that is already
    /// recorded (also by an earlier append of the same batch) fails this append alone.
    async fn append_idempotent(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        events: Vec<NewEvent>,
        key: IdempotencyKey,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        self.append_with(
            aggregate_type,
            aggregate_id,
            expected_version,
            events,
            Some(key),
        )
        .await
    }

    async fn idempotency_record(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let key = key.to_string();
        self.with_reader(move |conn| select_record(conn, &key, now))
            .await
    }

    async fn put_idempotency_record(
        &self,
        record: IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError> {
        self.with_writer(move |conn| {
            if insert_record(conn, &record)? {
                return Ok(record);
            }
            select_record(conn, &record.key.key, record.key.created_at)?.ok_or_else(|| {
                StoreError::Backend(format!(
                    "idempotency record {:?} vanished during its insert",
                    record.key.key
                ))
            })
        })
        .await
    }

    async fn purge_idempotency_records(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.with_writer(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM idempotency WHERE expires_at <= ?1")
                .and_then(|mut st| st.execute([now.timestamp_micros()]))
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }
}

#[async_trait]
impl OutboxStore for SqliteStore {
    async fn outbox_pending(&self, limit: usize) -> Result<Vec<EventEnvelope>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.with_reader(move |conn| {
            query_events(
                conn,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM outbox o JOIN events e ON e.position = o.position \
                     WHERE o.published_at IS NULL ORDER BY o.position LIMIT ?1"
                ),
                params![limit_i64(limit)],
            )
        })
        .await
    }

    async fn outbox_mark_published(&self, positions: &[u64]) -> Result<(), StoreError> {
        // Positions beyond i64::MAX cannot exist; ignore them like any unknown position.
        let positions: Vec<i64> = positions
            .iter()
            .filter_map(|&p| i64::try_from(p).ok())
            .collect();
        if positions.is_empty() {
            return Ok(());
        }
        self.with_writer(move |conn| {
            let now = timestamp(&Utc::now());
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE outbox SET published_at = ?1 \
                     WHERE position = ?2 AND published_at IS NULL",
                )
                .map_err(backend)?;
            for p in positions {
                stmt.execute(params![now, p]).map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn outbox_backlog(&self) -> Result<u64, StoreError> {
        self.with_reader(|conn| {
            let n: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
                    [],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            u64::try_from(n).map_err(backend)
        })
        .await
    }
}

#[async_trait]
impl SnapshotStore for SqliteStore {
    async fn load_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        let aggregate_type = aggregate_type.to_string();
        self.with_reader(move |conn| select_snapshot(conn, &aggregate_type, aggregate_id))
            .await
    }

    /// See [`SnapshotStore::save_snapshot`]: the state is encoded on the caller's thread, then one
    /// upsert runs in its own savepoint of a group-commit batch on the writer thread.
    async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<bool, StoreError> {
        let state = serde_json::to_string(&snapshot.state).map_err(backend)?;
        let version = to_i64(snapshot.version, "snapshot version")?;
        let row = (
            snapshot.aggregate_type.clone(),
            snapshot.aggregate_id.to_string(),
            version,
            i64::from(snapshot.snapshot_version),
            state,
            timestamp(&snapshot.taken_at),
        );
        self.with_writer(move |conn| {
            let (aggregate_type, aggregate_id, version, snapshot_version, state, taken_at) = row;
            let changed = conn
                .prepare_cached(
                    "INSERT INTO snapshots (aggregate_type, aggregate_id, version, \
                     snapshot_version, state, taken_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                     version = excluded.version, snapshot_version = excluded.snapshot_version, \
                     state = excluded.state, taken_at = excluded.taken_at \
                     WHERE excluded.snapshot_version <> snapshots.snapshot_version \
                     OR excluded.version >= snapshots.version",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        aggregate_type,
                        aggregate_id,
                        version,
                        snapshot_version,
                        state,
                        taken_at
                    ])
                })
                .map_err(backend)?;
            Ok(changed == 1)
        })
        .await
    }
}

/// The stored snapshot of `aggregate_type`/`aggregate_id`, decoded.
fn select_snapshot(
    conn: &Connection,
    aggregate_type: &str,
    aggregate_id: Uuid,
) -> Result<Option<StoredSnapshot>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, snapshot_version, state, taken_at FROM snapshots \
             WHERE aggregate_type = ?1 AND aggregate_id = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![aggregate_type, aggregate_id.to_string()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .optional()
        })
        .map_err(backend)?;
    let Some((version, snapshot_version, state, taken_at)) = row else {
        return Ok(None);
    };
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Backend(format!(
            "snapshot of {aggregate_type}/{aggregate_id}: bad {what}: {e}"
        ))
    };
    Ok(Some(StoredSnapshot {
        aggregate_type: aggregate_type.to_string(),
        aggregate_id,
        version: u64::try_from(version).map_err(|e| corrupt("version", &e))?,
        snapshot_version: u32::try_from(snapshot_version)
            .map_err(|e| corrupt("snapshot_version", &e))?,
        state: serde_json::from_str(&state).map_err(|e| corrupt("state", &e))?,
        taken_at: DateTime::parse_from_rfc3339(&taken_at)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| corrupt("taken_at", &e))?,
    }))
}
