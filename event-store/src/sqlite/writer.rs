//! The group-commit writer of [`SqliteStore`](super::SqliteStore).
//!
//! One OS thread per store (shared by all its clones) owns the write connection and takes jobs
//! from an unbounded channel. Writes that are waiting when the thread becomes free are run
//! together — up to [`MAX_BATCH_WRITES`] writes or [`MAX_BATCH_EVENTS`] events — in **one**
//! `BEGIN IMMEDIATE … COMMIT` transaction, so one fsync (`synchronous=FULL`) makes the whole
//! batch durable. Each append runs inside its own `SAVEPOINT`: an append that fails (version
//! conflict, also against an earlier append of the same batch; idempotency key already
//! recorded; duplicate event id) is rolled back to its savepoint and answered with its own
//! error while its neighbours go on. Replies are sent only after `COMMIT` returned; if `BEGIN`,
//! a savepoint operation or `COMMIT` fails, or SQLite rolls the transaction back on its own
//! (I/O error, disk full), the whole batch is rolled back and **every** append of it gets
//! [`StoreError::Backend`] (nothing of the batch is visible).
//!
//! There is no timer: a lone append is taken at once and committed alone. Batches form only
//! from the writes that queue up while the previous transaction is in flight.
//!
//! Other writes (marking outbox records published, idempotency records, purges, snapshot
//! saves) are queued the
//! same way and share the batches, each in its own savepoint too.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use chrono::Utc;
use rusqlite::{params, Connection, TransactionBehavior};
use tektree_domain::{EventEnvelope, NewEvent};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{backend, insert_record, is_unique_violation, timestamp, to_i64};
use crate::{IdempotencyKey, IdempotencyRecord, StoreError};

/// Most writes (appends and other writes) committed in one transaction.
pub(super) const MAX_BATCH_WRITES: usize = 256;

/// A batch stops taking further writes once it holds this many events (an append is never
/// split, so a batch can exceed it by the events of its last append).
pub(super) const MAX_BATCH_EVENTS: usize = 4096;

/// Name of the metric recording the number of appends of each committed-or-failed batch.
pub(super) const METRIC_BATCH_APPENDS: &str = "tektree_store_batch_appends";

/// The outcome of one append, sent back to its caller.
pub(super) type AppendResult = Result<Vec<EventEnvelope>, StoreError>;

/// One event ready to insert: the event and its payload, already encoded as compact JSON by
/// the caller (so the encoding does not run on the writer thread).
pub(super) struct PreparedEvent {
    pub(super) event: NewEvent,
    pub(super) payload: String,
}

/// What one append writes (already checked by `validate_batch`).
pub(super) struct AppendBody {
    pub(super) aggregate_type: String,
    pub(super) aggregate_id: Uuid,
    pub(super) expected_version: u64,
    pub(super) events: Vec<PreparedEvent>,
    pub(super) key: Option<IdempotencyKey>,
}

/// One write waiting for the writer thread: an append or another write, with the channel
/// of its answer.
pub(super) trait BatchedWrite: Send {
    /// Events the write inserts (for [`MAX_BATCH_EVENTS`]); 0 for writes other than appends.
    fn events(&self) -> usize;

    /// Whether this is an append (counted by [`Stats::appends`]).
    fn is_append(&self) -> bool;

    /// Runs the write inside its savepoint and keeps its outcome; `Err` (the error's text)
    /// when it failed (the caller then rolls back to the savepoint).
    fn run(&mut self, conn: &Connection) -> Result<(), String>;

    /// Answers the caller after the transaction ended: with the kept outcome when the batch
    /// committed (`batch_failure` is `None`), else with [`StoreError::Backend`].
    fn answer(self: Box<Self>, batch_failure: Option<&str>);
}

/// One append waiting for the writer, with the channel of its answer.
struct AppendRequest {
    body: Option<AppendBody>,
    events: usize,
    outcome: Option<AppendResult>,
    reply: oneshot::Sender<AppendResult>,
}

impl BatchedWrite for AppendRequest {
    fn events(&self) -> usize {
        self.events
    }

    fn is_append(&self) -> bool {
        true
    }

    fn run(&mut self, conn: &Connection) -> Result<(), String> {
        let outcome = match self.body.take() {
            Some(body) => append_rows(conn, body),
            None => Err(StoreError::Backend("append ran twice".to_string())),
        };
        let status = outcome.as_ref().map(|_| ()).map_err(|e| e.to_string());
        self.outcome = Some(outcome);
        status
    }

    fn answer(self: Box<Self>, batch_failure: Option<&str>) {
        answer(self.reply, self.outcome, batch_failure);
    }
}

/// Any other write: a closure run inside its savepoint.
struct ExecRequest<T, F> {
    f: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> BatchedWrite for ExecRequest<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn events(&self) -> usize {
        0
    }

    fn is_append(&self) -> bool {
        false
    }

    fn run(&mut self, conn: &Connection) -> Result<(), String> {
        let outcome = match self.f.take() {
            Some(f) => f(conn),
            None => Err(StoreError::Backend("write ran twice".to_string())),
        };
        let status = outcome.as_ref().map(|_| ()).map_err(|e| e.to_string());
        self.outcome = Some(outcome);
        status
    }

    fn answer(self: Box<Self>, batch_failure: Option<&str>) {
        answer(self.reply, self.outcome, batch_failure);
    }
}

/// Sends the answer of one write (the caller may have gone away; it is then dropped).
fn answer<T>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    outcome: Option<Result<T, StoreError>>,
    batch_failure: Option<&str>,
) {
    let result = match (batch_failure, outcome) {
        (None, Some(outcome)) => outcome,
        (Some(reason), _) => Err(StoreError::Backend(reason.to_string())),
        (None, None) => Err(StoreError::Backend(
            "write was not run in its batch".to_string(),
        )),
    };
    let _ = reply.send(result);
}

/// A unit of work of the writer thread.
type Job = Box<dyn BatchedWrite>;

/// Counters of one writer (shared by every clone of its store).
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// Write transactions run (committed or failed as a whole).
    pub(super) batches: AtomicU64,
    /// Appends those transactions carried (each committed or answered with its own error).
    /// Other writes are not counted.
    pub(super) appends: AtomicU64,
}

/// Handle of the writer thread: the sending side of its queue. The thread ends once every
/// handle is dropped and the queue is drained.
pub(super) struct Writer {
    queue: mpsc::Sender<Job>,
    pub(super) stats: Arc<Stats>,
}

fn stopped() -> StoreError {
    StoreError::Backend("the sqlite writer thread has stopped".to_string())
}

impl Writer {
    /// Starts the writer thread owning `conn`.
    pub(super) fn spawn(conn: Connection) -> Result<Self, StoreError> {
        let (queue, jobs) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("tektree-sqlite-writer".to_string())
            .spawn(move || run(conn, &jobs, &thread_stats))
            .map_err(|e| StoreError::Backend(format!("spawn sqlite writer thread: {e}")))?;
        Ok(Writer { queue, stats })
    }

    /// Queues one append and waits for its own result (after its batch's `COMMIT`).
    pub(super) async fn append(&self, body: AppendBody) -> AppendResult {
        let (reply, answer) = oneshot::channel();
        let events = body.events.len();
        self.queue
            .send(Box::new(AppendRequest {
                body: Some(body),
                events,
                outcome: None,
                reply,
            }))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Queues `f`, a write run inside its own savepoint of a batch (it must not begin or end
    /// transactions itself), and returns its result after the batch's `COMMIT`.
    pub(super) async fn exec<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Box::new(ExecRequest {
                f: Some(f),
                outcome: None,
                reply,
            }))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The writer thread's loop: until every [`Writer`] handle is gone.
fn run(mut conn: Connection, jobs: &mpsc::Receiver<Job>, stats: &Stats) {
    while let Ok(first) = jobs.recv() {
        let mut events = first.events();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_WRITES && events < MAX_BATCH_EVENTS {
            match jobs.try_recv() {
                Ok(next) => {
                    events += next.events();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // A panic drops the open transaction (rolling it back) and the pending reply senders
        // (their callers get "writer stopped"); the thread and its connection carry on.
        if catch_unwind(AssertUnwindSafe(|| run_batch(&mut conn, batch, stats))).is_err() {
            tracing::error!("sqlite writer batch panicked; its transaction was rolled back");
        }
    }
}

/// Runs `batch` in one transaction, each write in its own savepoint, then answers every write.
fn run_batch(conn: &mut Connection, mut batch: Vec<Job>, stats: &Stats) {
    let size = batch.len();
    let appends = batch.iter().filter(|w| w.is_append()).count();
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.appends.fetch_add(appends as u64, Ordering::Relaxed);
    if appends > 0 {
        metrics::histogram!(METRIC_BATCH_APPENDS).record(appends as f64);
    }

    let failure = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Err(e) => Some(format!("begin write transaction: {e}")),
        Ok(tx) => {
            let fatal = batch
                .iter_mut()
                .find_map(|write| run_in_savepoint(&tx, write.as_mut()).err());
            match fatal {
                // Dropping `tx` rolls the transaction back.
                Some(reason) => Some(reason),
                // On failure, `commit` rolls the transaction back.
                None => tx
                    .commit()
                    .err()
                    .map(|e| format!("commit of a batch of {size} writes failed: {e}")),
            }
        }
    };
    if let Some(reason) = &failure {
        tracing::warn!(writes = size, appends, %reason, "sqlite write batch rolled back");
    }
    for write in batch {
        write.answer(failure.as_deref());
    }
}

/// Runs `sql` (a savepoint statement) as a cached statement.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs one write inside `SAVEPOINT`; its own failure is rolled back to the savepoint and kept
/// as its outcome. `Err(reason)` means the enclosing transaction can no longer be trusted and
/// the whole batch must be rolled back.
fn run_in_savepoint(conn: &Connection, write: &mut dyn BatchedWrite) -> Result<(), String> {
    exec_cached(conn, "SAVEPOINT tektree_write").map_err(|e| format!("savepoint: {e}"))?;
    let Err(err) = write.run(conn) else {
        return exec_cached(conn, "RELEASE tektree_write")
            .map_err(|e| format!("release savepoint: {e}"));
    };
    if conn.is_autocommit() {
        // SQLite rolled the whole transaction back on its own (I/O error, disk full, …).
        return Err(format!("the transaction was rolled back by SQLite: {err}"));
    }
    exec_cached(conn, "ROLLBACK TO tektree_write")
        .and_then(|()| exec_cached(conn, "RELEASE tektree_write"))
        .map_err(|e| format!("roll back to savepoint after {err}: {e}"))
}

/// The writes of one append: version check, idempotency record, event and outbox rows.
/// `recorded_at` is the store clock when this append starts (the write lock is held).
fn append_rows(conn: &Connection, body: AppendBody) -> AppendResult {
    let AppendBody {
        aggregate_type,
        aggregate_id,
        expected_version,
        events,
        key,
    } = body;
    let agg_id = aggregate_id.to_string();
    let conflict = |actual: u64| StoreError::Conflict {
        aggregate_type: aggregate_type.clone(),
        aggregate_id,
        expected: expected_version,
        actual,
    };
    let actual: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(sequence), 0) FROM events \
             WHERE aggregate_type = ?1 AND aggregate_id = ?2",
        )
        .and_then(|mut s| s.query_row(params![aggregate_type, agg_id], |r| r.get(0)))
        .map_err(backend)?;
    let actual = u64::try_from(actual)
        .map_err(|_| StoreError::Backend(format!("negative stored sequence {actual}")))?;
    if actual != expected_version {
        return Err(conflict(actual));
    }
    if let Some(key) = key {
        let k = key.key.clone();
        let record = IdempotencyRecord::for_append(
            key,
            &aggregate_type,
            aggregate_id,
            expected_version,
            events.len() as u64,
        );
        if !insert_record(conn, &record)? {
            return Err(StoreError::IdempotencyKeyExists { key: k });
        }
    }
    let recorded_at = Utc::now();
    let recorded = timestamp(&recorded_at);
    let mut insert_event = conn
        .prepare_cached(
            "INSERT INTO events (event_id, event_type, event_version, aggregate_type, \
             aggregate_id, sequence, occurred_at, recorded_at, correlation_id, causation_id, \
             actor, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .map_err(backend)?;
    let mut insert_outbox = conn
        .prepare_cached("INSERT INTO outbox (position, published_at) VALUES (?1, NULL)")
        .map_err(backend)?;
    let mut committed = Vec::with_capacity(events.len());
    for PreparedEvent { event: e, payload } in events {
        let sequence = to_i64(e.sequence, "sequence")?;
        let inserted = insert_event.execute(params![
            e.event_id.to_string(),
            e.event.event_type(),
            e.event.event_version(),
            e.aggregate_type,
            agg_id,
            sequence,
            timestamp(&e.metadata.occurred_at),
            recorded,
            e.metadata.correlation_id.to_string(),
            e.metadata.causation_id.to_string(),
            e.metadata.actor.to_string(),
            payload,
        ]);
        match inserted {
            Ok(_) => {}
            // Unreachable while every writer uses BEGIN IMMEDIATE (the version check above
            // runs under the write lock), but a writer that does not would surface here.
            Err(err) if is_unique_violation(&err, "events.sequence") => {
                return Err(conflict(expected_version + 1));
            }
            Err(err) if is_unique_violation(&err, "events.event_id") => {
                return Err(StoreError::Backend(format!(
                    "duplicate event_id {}: {err}",
                    e.event_id
                )));
            }
            Err(err) => return Err(backend(err)),
        }
        let position = conn.last_insert_rowid();
        insert_outbox.execute([position]).map_err(backend)?;
        let position = u64::try_from(position)
            .map_err(|_| StoreError::Backend(format!("negative position {position}")))?;
        committed.push(e.into_envelope(position, recorded_at));
    }
    Ok(committed)
}
