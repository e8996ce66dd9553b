//! Tests of the SQLite adapter on real temporary database files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use proptest::prelude::*;
use rusqlite::Connection;
use tektree_domain::EventEnvelope;
use tektree_event_store::conformance::{self, sample_event, sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::{
    EventLog, EventStore, Head, IdempotencyKey, IdempotencyStore, OutboxStore, SnapshotStore,
    SqliteStore, StoreError,
};
use uuid::Uuid;

const USER: &str = SAMPLE_AGGREGATE_TYPE;

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tektree.db");
    (dir, path)
}

/// Raw counts straight from the file: (events, outbox rows).
fn raw_counts(path: &Path) -> (i64, i64) {
    let conn = Connection::open(path).expect("raw open");
    let events = conn
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .expect("count events");
    let outbox = conn
        .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .expect("count outbox");
    (events, outbox)
}

/// Load → append at the loaded version, retrying on conflict. Returns (event ids, conflicts).
async fn append_with_retry(store: &dyn EventStore, id: Uuid, count: u64) -> (Vec<Uuid>, u64) {
    let mut conflicts = 0;
    loop {
        let version = store
            .load(USER, id)
            .await
            .expect("load")
            .last()
            .map_or(0, |e| e.sequence);
        let batch = sample_events(id, version + 1, count);
        let ids = batch.iter().map(|e| e.event_id).collect();
        match store.append(USER, id, version, batch).await {
            Ok(_) => return (ids, conflicts),
            Err(StoreError::Conflict {
                expected, actual, ..
            }) => {
                assert_eq!(expected, version);
                assert!(
                    actual > version,
                    "conflict reports actual {actual} <= {version}"
                );
                conflicts += 1;
            }
            Err(e) => panic!("append failed: {e}"),
        }
    }
}

fn assert_contiguous(events: &[tektree_domain::EventEnvelope], n: u64) {
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
}

#[tokio::test]
async fn conformance_suite() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    assert_eq!(store.path(), path.as_path());
    conformance::run_all(&store).await;
    // Running it again on the now non-empty store must pass too.
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_concurrency_on_multi_thread_runtime() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    conformance::concurrent_writers_on_one_aggregate(&store, 16, 4).await;
}

#[tokio::test]
async fn open_is_idempotent_and_creates_only_its_own_tables() {
    let (_dir, path) = temp_db();
    {
        // Another crate's read model already lives in the file.
        let conn = Connection::open(&path).expect("raw open");
        conn.execute_batch(
            "CREATE TABLE rm_users (id TEXT PRIMARY KEY); INSERT INTO rm_users VALUES ('x');",
        )
        .expect("rm table");
    }
    let a = SqliteStore::open(&path).expect("first open");
    let id = Uuid::new_v4();
    a.append(USER, id, 0, sample_events(id, 1, 2))
        .await
        .expect("append");
    let b = SqliteStore::open(&path).expect("second open");
    assert_eq!(b.load(USER, id).await.expect("load").len(), 2);
    let (_other_dir, other_path) = temp_db();
    let other = SqliteStore::open(&other_path).expect("another store");
    conformance::identity_is_the_store_s(&a, &b, &other).await;
    drop((a, b));

    let conn = Connection::open(&path).expect("raw open");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let mut stmt = conn
        .prepare(
            "SELECT type, name FROM sqlite_master \
             WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name",
        )
        .expect("prepare");
    let objects: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let expected: Vec<(String, String)> = [
        ("index", "idempotency_expiry"),
        ("index", "outbox_unpublished"),
        ("table", "events"),
        ("table", "idempotency"),
        ("table", "outbox"),
        ("table", "rm_users"),
        ("table", "snapshots"),
        ("table", "store_identity"),
    ]
    .iter()
    .map(|(t, n)| (t.to_string(), n.to_string()))
    .collect();
    assert_eq!(objects, expected);
    let rm: i64 = conn
        .query_row("SELECT COUNT(*) FROM rm_users", [], |r| r.get(0))
        .expect("rm rows");
    assert_eq!(rm, 1);
}

#[tokio::test]
async fn open_fails_cleanly_for_a_missing_directory() {
    let (dir, _) = temp_db();
    let err = SqliteStore::open(dir.path().join("no/such/dir/x.db")).expect_err("must fail");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
}

#[tokio::test]
async fn timestamps_round_trip_with_nanoseconds_in_fixed_width_utc_text() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let id = Uuid::new_v4();
    let mut e = sample_event(id, 1);
    e.metadata.occurred_at = DateTime::from_timestamp(1_700_000_000, 7).expect("time");
    let appended = store.append(USER, id, 0, vec![e]).await.expect("append");
    let loaded = store.load(USER, id).await.expect("load");
    assert_eq!(loaded, appended);
    assert_eq!(loaded[0].occurred_at.timestamp_subsec_nanos(), 7);

    let conn = Connection::open(&path).expect("raw open");
    let (occurred, recorded): (String, String) = conn
        .query_row("SELECT occurred_at, recorded_at FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("row");
    assert_eq!(occurred, "2023-11-14T22:13:20.000000007Z");
    assert_eq!(recorded.len(), occurred.len(), "{recorded}");
    assert!(recorded.ends_with('Z'), "{recorded}");
}

#[tokio::test]
async fn positions_are_gap_free_from_one() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let id = Uuid::new_v4();
    store
        .append(USER, id, 0, sample_events(id, 1, 3))
        .await
        .expect("append");
    // A conflict and a rejected batch in between must not burn positions.
    assert!(store
        .append(USER, id, 0, sample_events(id, 1, 1))
        .await
        .is_err());
    let mut dup = sample_events(id, 4, 2);
    dup[1].event_id = store.load(USER, id).await.expect("load")[0].event_id;
    assert!(store.append(USER, id, 3, dup).await.is_err());
    store
        .append(USER, id, 3, sample_events(id, 4, 2))
        .await
        .expect("append");
    let all = store.read_all(0, 100).await.expect("read_all");
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        store.head().await.expect("head"),
        Head {
            position: 5,
            events: 5
        }
    );
}

#[tokio::test]
async fn conflicting_append_leaves_events_and_outbox_unchanged() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let id = Uuid::new_v4();
    store
        .append(USER, id, 0, sample_events(id, 1, 2))
        .await
        .expect("append");
    store.outbox_mark_published(&[1]).await.expect("mark");
    let before = raw_counts(&path);
    assert_eq!(before, (2, 2));

    let err = store
        .append(USER, id, 1, sample_events(id, 2, 3))
        .await
        .expect_err("stale version");
    match err {
        StoreError::Conflict {
            aggregate_type,
            aggregate_id,
            expected,
            actual,
        } => {
            assert_eq!((aggregate_type.as_str(), aggregate_id), (USER, id));
            assert_eq!((expected, actual), (1, 2));
        }
        other => panic!("want Conflict, got {other:?}"),
    }
    assert_eq!(raw_counts(&path), before);
    assert_eq!(store.outbox_backlog().await.expect("backlog"), 1);

    // Programming errors are Backend errors and write nothing either.
    for bad in [sample_events(id, 4, 1), {
        let mut v = sample_events(id, 3, 2);
        v[1].sequence = 3;
        v
    }] {
        let err = store.append(USER, id, 2, bad).await.expect_err("malformed");
        assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
        assert_eq!(raw_counts(&path), before);
    }
}

#[tokio::test]
async fn duplicate_event_id_rolls_back_the_whole_batch() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let a = Uuid::new_v4();
    let first = store
        .append(USER, a, 0, sample_events(a, 1, 1))
        .await
        .expect("append");
    let b = Uuid::new_v4();
    let mut batch = sample_events(b, 1, 3);
    batch[2].event_id = first[0].event_id;
    let err = store
        .append(USER, b, 0, batch)
        .await
        .expect_err("duplicate id");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert_eq!(raw_counts(&path), (1, 1));
    assert!(store.load(USER, b).await.expect("load").is_empty());
}

#[tokio::test]
async fn corrupt_row_is_reported_with_its_position() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let id = Uuid::new_v4();
    store
        .append(USER, id, 0, sample_events(id, 1, 2))
        .await
        .expect("append");
    let conn = Connection::open(&path).expect("raw open");
    conn.execute(
        "UPDATE events SET payload = '{not json' WHERE position = 2",
        [],
    )
    .expect("corrupt");
    match store.load(USER, id).await {
        Err(StoreError::Corrupt { position, reason }) => {
            assert_eq!(position, 2);
            assert!(reason.contains("payload"), "{reason}");
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
    conn.execute(
        "UPDATE events SET payload = '{}', occurred_at = 'yesterday' WHERE position = 2",
        [],
    )
    .expect("corrupt");
    assert!(matches!(
        store.read_all(0, 10).await,
        Err(StoreError::Corrupt { position: 2, .. })
    ));
    assert!(matches!(
        store.outbox_pending(10).await,
        Err(StoreError::Corrupt { position: 2, .. })
    ));
}

#[tokio::test]
async fn data_survives_reopen() {
    let (_dir, path) = temp_db();
    let id = Uuid::new_v4();
    let appended = {
        let store = SqliteStore::open(&path).expect("open");
        let appended = store
            .append(USER, id, 0, sample_events(id, 1, 3))
            .await
            .expect("append");
        store.outbox_mark_published(&[1]).await.expect("mark");
        appended
    };
    let store = SqliteStore::open(&path).expect("reopen");
    assert_eq!(store.load(USER, id).await.expect("load"), appended);
    assert_eq!(
        store.head().await.expect("head"),
        Head {
            position: 3,
            events: 3
        }
    );
    assert_eq!(store.outbox_backlog().await.expect("backlog"), 2);
    let pending = store.outbox_pending(10).await.expect("pending");
    assert_eq!(pending, appended[1..].to_vec());
    let more = store
        .append(USER, id, 3, sample_events(id, 4, 1))
        .await
        .expect("append");
    assert_eq!(more[0].position, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_append_to_different_aggregates() {
    let (_dir, path) = temp_db();
    let stores: Vec<Arc<dyn EventStore>> = vec![
        Arc::new(SqliteStore::open(&path).expect("open a")),
        Arc::new(SqliteStore::open(&path).expect("open b")),
    ];
    const TASKS: usize = 8;
    const APPENDS: u64 = 10;
    let ids: Vec<Uuid> = (0..TASKS).map(|_| Uuid::new_v4()).collect();
    let mut handles = Vec::new();
    for (t, id) in ids.iter().copied().enumerate() {
        let stores = stores.clone();
        handles.push(tokio::spawn(async move {
            for k in 0..APPENDS {
                let store = &stores[(t + k as usize) % 2];
                store
                    .append(USER, id, k, sample_events(id, k + 1, 1))
                    .await
                    .expect("append on an own aggregate never conflicts");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let total = TASKS as u64 * APPENDS;
    for store in &stores {
        for id in &ids {
            assert_contiguous(&store.load(USER, *id).await.expect("load"), APPENDS);
        }
        assert_eq!(
            store.head().await.expect("head"),
            Head {
                position: total,
                events: total
            }
        );
        let all = store.read_all(0, usize::MAX).await.expect("read_all");
        let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
        assert_eq!(positions, (1..=total).collect::<Vec<_>>());
        assert_eq!(store.outbox_backlog().await.expect("backlog"), total);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_append_to_the_same_aggregate() {
    let (_dir, path) = temp_db();
    let a = SqliteStore::open(&path).expect("open a");
    let b = SqliteStore::open(&path).expect("open b");
    let id = Uuid::new_v4();

    // Deterministic cross-instance conflict: A reads, B writes, A's write is rejected.
    a.append(USER, id, 0, sample_events(id, 1, 1))
        .await
        .expect("append");
    let seen_by_a = a.load(USER, id).await.expect("load").len() as u64;
    b.append(USER, id, seen_by_a, sample_events(id, seen_by_a + 1, 2))
        .await
        .expect("b appends");
    match a
        .append(USER, id, seen_by_a, sample_events(id, seen_by_a + 1, 1))
        .await
    {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (1, 3)),
        other => panic!("want Conflict, got {other:?}"),
    }
    assert_eq!(
        a.load(USER, id).await.expect("load").len(),
        3,
        "A sees B's commit"
    );

    // Racing writers on both instances.
    let stores: Vec<Arc<dyn EventStore>> = vec![Arc::new(a), Arc::new(b)];
    const TASKS: usize = 8;
    const COMMANDS: usize = 5;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&stores[t % 2]);
        handles.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut conflicts = 0;
            for k in 0..COMMANDS {
                let (mine, c) = append_with_retry(store.as_ref(), id, (k % 2 + 1) as u64).await;
                ids.extend(mine);
                conflicts += c;
            }
            (ids, conflicts)
        }));
    }
    let mut written: Vec<Uuid> = Vec::new();
    for h in handles {
        let (ids, _conflicts) = h.await.expect("task");
        written.extend(ids);
    }
    let loaded = stores[0].load(USER, id).await.expect("load");
    let n = 3 + written.len() as u64;
    assert_contiguous(&loaded, n);
    let stored: HashSet<Uuid> = loaded.iter().map(|e| e.event_id).collect();
    assert_eq!(stored.len() as u64, n, "no duplicate events");
    assert!(written.iter().all(|w| stored.contains(w)), "no lost events");
    assert_eq!(raw_counts(&path), (n as i64, n as i64));
}

// ---------------------------------------------------------------------------------------------
// Crash atomicity: a child process appending in a loop is SIGKILLed at a random moment.
// ---------------------------------------------------------------------------------------------

const CHILD_ENV: &str = "TEKTREE_CHILD";
const CHILD_DB_ENV: &str = "TEKTREE_CHILD_DB";
const CRASH_TEST: &str = "killed_writer_leaves_no_partial_command";
/// Events per command the child appends; a partial command would leave a count not divisible
/// by this.
const EVENTS_PER_COMMAND: u64 = 4;
const CHILD_AGGREGATES: usize = 5;

/// The child's loop: multi-event commands round-robin over a few aggregates, marking some
/// outbox rows published, until killed (or a safety cap is reached).
async fn child_main(path: &Path) {
    let store = SqliteStore::open(path).expect("child open");
    let ids: Vec<Uuid> = (0..CHILD_AGGREGATES).map(|_| Uuid::new_v4()).collect();
    for round in 0..200_000u64 {
        let id = ids[(round % CHILD_AGGREGATES as u64) as usize];
        let version = store
            .load(USER, id)
            .await
            .expect("child load")
            .last()
            .map_or(0, |e| e.sequence);
        let envs = store
            .append(
                USER,
                id,
                version,
                sample_events(id, version + 1, EVENTS_PER_COMMAND),
            )
            .await
            .expect("child append");
        if round % 3 == 0 {
            store
                .outbox_mark_published(&[envs[0].position])
                .await
                .expect("child mark");
        }
    }
}

/// Kills the child if the parent test panics before doing so.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(path: &Path) -> KillOnDrop {
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .args(["--exact", CRASH_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env(CHILD_DB_ENV, path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    KillOnDrop(child)
}

/// Asserts the crash invariants directly on the file.
fn assert_consistent_after_crash(path: &Path) -> i64 {
    let conn = Connection::open(path).expect("raw open");
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(ok, "ok");
    let orphans: i64 = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM events e LEFT JOIN outbox o ON o.position = e.position \
                     WHERE o.position IS NULL) \
                  + (SELECT COUNT(*) FROM outbox o LEFT JOIN events e ON e.position = o.position \
                     WHERE e.position IS NULL)",
            [],
            |r| r.get(0),
        )
        .expect("orphans");
    assert_eq!(orphans, 0, "every event has its outbox row and vice versa");
    let (count, max): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(MAX(position), 0) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count");
    assert_eq!(count, max, "positions are gap-free");

    let mut stmt = conn
        .prepare("SELECT aggregate_id, sequence FROM events ORDER BY aggregate_id, sequence")
        .expect("prepare");
    let mut per_aggregate: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .expect("query")
    {
        let (agg, seq) = row.expect("row");
        per_aggregate.entry(agg).or_default().push(seq);
    }
    for (agg, seqs) in &per_aggregate {
        let n = seqs.len() as i64;
        assert_eq!(
            seqs,
            &(1..=n).collect::<Vec<_>>(),
            "aggregate {agg} is contiguous"
        );
        assert_eq!(
            n % EVENTS_PER_COMMAND as i64,
            0,
            "aggregate {agg} holds a partial command ({n} events)"
        );
    }
    count
}

#[tokio::test]
async fn killed_writer_leaves_no_partial_command() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let path = std::env::var_os(CHILD_DB_ENV).expect("child db path");
        child_main(Path::new(&path)).await;
        return;
    }
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let mut committed = 0i64;
    for round in 0..3 {
        let start = store.head().await.expect("head").events;
        let mut child = spawn_child(&path);
        // Wait until the child has committed a few commands (generous cap against hangs).
        let mut polls = 0;
        while store.head().await.expect("head").events < start + 10 * EVENTS_PER_COMMAND {
            if let Some(status) = child.0.try_wait().expect("try_wait") {
                panic!("child exited early in round {round}: {status}");
            }
            polls += 1;
            assert!(polls < 12_000, "child made no progress in round {round}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let jitter = (Uuid::new_v4().as_u128() % 25) as u64;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        child.0.kill().expect("SIGKILL child");
        child.0.wait().expect("reap child");

        let count = assert_consistent_after_crash(&path);
        assert!(count >= committed, "committed events never disappear");
        committed = count;
        // The store stays usable: the killed writer's lock is gone.
        let head = store.head().await.expect("head");
        assert_eq!(head.events as i64, count);
        let backlog = store.outbox_backlog().await.expect("backlog");
        let pending = store.outbox_pending(usize::MAX).await.expect("pending");
        assert_eq!(pending.len() as u64, backlog);
    }
    let id = Uuid::new_v4();
    store
        .append(USER, id, 0, sample_events(id, 1, EVENTS_PER_COMMAND))
        .await
        .expect("append after crashes");
    assert_consistent_after_crash(&path);
}

#[tokio::test]
async fn concurrent_first_opens_of_a_new_file_succeed() {
    let (_dir, path) = temp_db();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || SqliteStore::open(&path).map(|_| ()))
        })
        .collect();
    for t in threads {
        t.join().expect("thread").expect("concurrent open");
    }
    let store = SqliteStore::open(&path).expect("open");
    assert_eq!(store.head().await.expect("head"), Head::default());
}

// ---------------------------------------------------------------------------------------------
// Group commit: appends waiting together share one transaction, each in its own savepoint.
// ---------------------------------------------------------------------------------------------

type AppendFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<EventEnvelope>, StoreError>> + Send + 'a>,
>;

/// Runs `appends` as **one** group-commit batch and returns their results in order.
///
/// Deterministic: another connection holds the database write lock, so the writer thread
/// blocks in `BEGIN IMMEDIATE` of a batch holding only an `outbox_mark_published` queued first
/// (we wait until that batch has started); every append is then polled once (which queues
/// it, or fails it before the queue, e.g. a malformed batch) and only then is the lock
/// released. The writer therefore finds all queued appends waiting at once. Asserts that
/// exactly one further batch carried exactly the queued appends.
async fn in_one_batch<'a>(
    store: &'a SqliteStore,
    path: &Path,
    appends: Vec<AppendFuture<'a>>,
) -> Vec<Result<Vec<EventEnvelope>, StoreError>> {
    let (batches0, appends0) = (store.write_batches(), store.batched_appends());
    let lock = Connection::open(path).expect("raw open");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut blocker = store.outbox_mark_published(&[1]);
    assert!(futures::poll!(&mut blocker).is_pending(), "blocker queued");
    let mut polls = 0;
    while store.write_batches() == batches0 {
        polls += 1;
        assert!(
            polls < 10_000,
            "the writer never started the blocker's batch"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut pending = Vec::new();
    let mut results: Vec<Option<Result<Vec<EventEnvelope>, StoreError>>> = Vec::new();
    for mut f in appends {
        match futures::poll!(&mut f) {
            std::task::Poll::Ready(r) => results.push(Some(r)),
            std::task::Poll::Pending => {
                pending.push((results.len(), f));
                results.push(None);
            }
        }
    }
    lock.execute_batch("COMMIT")
        .expect("release the write lock");
    blocker.await.expect("blocker");
    let queued = pending.len() as u64;
    for (i, f) in pending {
        results[i] = Some(f.await);
    }
    assert_eq!(
        store.write_batches() - batches0,
        2,
        "the blocker's batch, then one batch"
    );
    assert_eq!(
        store.batched_appends() - appends0,
        queued,
        "the batch carried every queued append"
    );
    results.into_iter().map(|r| r.expect("result")).collect()
}

fn key(name: &str) -> IdempotencyKey {
    let t = conformance::sample_occurred_at();
    IdempotencyKey {
        key: name.to_string(),
        fingerprint: format!("fp-{name}"),
        created_at: t,
        expires_at: t + chrono::Duration::hours(24),
    }
}

/// Positions of all stored events, in order.
async fn all_positions(store: &SqliteStore) -> Vec<u64> {
    store
        .read_all(0, usize::MAX)
        .await
        .expect("read_all")
        .iter()
        .map(|e| e.position)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_appends_are_group_committed() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");

    // At low load every append is committed alone (no waiting for company).
    let lone = Uuid::new_v4();
    for k in 0..5 {
        store
            .append(USER, lone, k, sample_events(lone, k + 1, 1))
            .await
            .expect("lone append");
    }
    assert_eq!((store.write_batches(), store.batched_appends()), (5, 5));

    const TASKS: usize = 64;
    const APPENDS: u64 = 50;
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            let mut positions = Vec::new();
            for k in 0..APPENDS {
                let envs = store
                    .append(USER, id, k, sample_events(id, k + 1, 1))
                    .await
                    .expect("append on an own aggregate never conflicts");
                assert_eq!(envs.len(), 1);
                assert_eq!(envs[0].sequence, k + 1);
                positions.push(envs[0].position);
            }
            (id, positions)
        }));
    }
    let mut acknowledged = HashSet::new();
    for h in handles {
        let (id, positions) = h.await.expect("task");
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "one client's positions increase: {positions:?}"
        );
        let loaded = store.load(USER, id).await.expect("load");
        assert_contiguous(&loaded, APPENDS);
        assert_eq!(
            loaded.iter().map(|e| e.position).collect::<Vec<_>>(),
            positions,
            "acknowledged positions are the stored ones"
        );
        acknowledged.extend(positions);
    }
    let total = 5 + TASKS as u64 * APPENDS;
    assert_eq!(acknowledged.len() as u64, total - 5, "no position twice");
    assert_eq!(all_positions(&store).await, (1..=total).collect::<Vec<_>>());
    assert_eq!(raw_counts(&path), (total as i64, total as i64));
    assert_eq!(store.batched_appends(), total);
    let batches = store.write_batches();
    assert!(
        batches < total,
        "{total} appends took {batches} transactions: no batching"
    );
}

#[tokio::test]
async fn same_expected_version_twice_in_one_batch_commits_exactly_one() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let (id, other) = (Uuid::new_v4(), Uuid::new_v4());
    let a = sample_events(id, 1, 2);
    let b = sample_events(id, 1, 1);
    let results = in_one_batch(
        &store,
        &path,
        vec![
            store.append(USER, id, 0, a.clone()),
            store.append(USER, id, 0, b),
            store.append(USER, other, 0, sample_events(other, 1, 1)),
        ],
    )
    .await;
    let first = results[0].as_ref().expect("the first queued append wins");
    assert_eq!(
        first.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        a.iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
    match &results[1] {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((*expected, *actual), (0, 2), "sees its batch neighbour"),
        other => panic!("want Conflict, got {other:?}"),
    }
    assert_eq!(results[2].as_ref().expect("neighbour")[0].position, 3);
    assert_eq!(store.load(USER, id).await.expect("load"), first.clone());
    assert_eq!(all_positions(&store).await, vec![1, 2, 3]);
    assert_eq!(raw_counts(&path), (3, 3));
}

#[tokio::test]
async fn reused_idempotency_key_fails_alone_in_its_batch() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let old = Uuid::new_v4();
    store
        .append_idempotent(USER, old, 0, sample_events(old, 1, 1), key("old"))
        .await
        .expect("first keyed append");
    let [p, q, r, s] = [(); 4].map(|()| Uuid::new_v4());
    let results = in_one_batch(
        &store,
        &path,
        vec![
            store.append(USER, p, 0, sample_events(p, 1, 1)),
            // A key recorded by an earlier transaction.
            store.append_idempotent(USER, q, 0, sample_events(q, 1, 2), key("old")),
            store.append_idempotent(USER, r, 0, sample_events(r, 1, 1), key("new")),
            // A key recorded by an earlier append of the same batch.
            store.append_idempotent(USER, s, 0, sample_events(s, 1, 1), key("new")),
            store.append(USER, s, 0, sample_events(s, 1, 1)),
        ],
    )
    .await;
    for (i, k) in [(1, "old"), (3, "new")] {
        match &results[i] {
            Err(StoreError::IdempotencyKeyExists { key }) => assert_eq!(key, k),
            other => panic!("append #{i}: want IdempotencyKeyExists, got {other:?}"),
        }
    }
    for i in [0, 2, 4] {
        assert!(results[i].is_ok(), "append #{i}: {:?}", results[i]);
    }
    assert!(store.load(USER, q).await.expect("load").is_empty());
    assert_eq!(store.load(USER, s).await.expect("load").len(), 1);
    let t = conformance::sample_occurred_at();
    let record = store
        .idempotency_record("new", t)
        .await
        .expect("get")
        .expect("record of the winner");
    assert_eq!(record.aggregate_id, r);
    let old_record = store.idempotency_record("old", t).await.expect("get");
    assert_eq!(old_record.map(|rec| rec.aggregate_id), Some(old));
    assert_eq!(all_positions(&store).await, vec![1, 2, 3, 4]);
    assert_eq!(raw_counts(&path), (4, 4));
}

#[tokio::test]
async fn failing_appends_do_not_roll_back_their_batch_neighbours() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let existing = Uuid::new_v4();
    let stored = store
        .append(USER, existing, 0, sample_events(existing, 1, 2))
        .await
        .expect("seed");
    let [a, b, c, d, e] = [(); 5].map(|()| Uuid::new_v4());
    let b_events = sample_events(b, 1, 3);
    // Reuses the id of an event already in the file.
    let mut dup_stored = sample_events(c, 1, 2);
    dup_stored[1].event_id = stored[0].event_id;
    // Reuses the id of an event committed earlier in the same batch.
    let mut dup_in_batch = sample_events(d, 1, 1);
    dup_in_batch[0].event_id = b_events[2].event_id;
    // Sequences not contiguous: refused before it reaches the writer.
    let mut malformed = sample_events(e, 1, 2);
    malformed[1].sequence = 5;
    let results = in_one_batch(
        &store,
        &path,
        vec![
            store.append(USER, a, 0, sample_events(a, 1, 1)),
            store.append(USER, existing, 1, sample_events(existing, 2, 1)),
            store.append(USER, b, 0, b_events.clone()),
            store.append(USER, c, 0, dup_stored),
            store.append(USER, d, 0, dup_in_batch),
            store.append(USER, e, 0, malformed),
            store.append(USER, existing, 2, sample_events(existing, 3, 1)),
        ],
    )
    .await;
    assert!(matches!(
        results[1],
        Err(StoreError::Conflict {
            expected: 1,
            actual: 2,
            ..
        })
    ));
    for i in [3, 4, 5] {
        assert!(
            matches!(results[i], Err(StoreError::Backend(_))),
            "append #{i}: {:?}",
            results[i]
        );
    }
    let positions = |i: usize| -> Vec<u64> {
        results[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("append #{i}: {e}"))
            .iter()
            .map(|env| env.position)
            .collect()
    };
    // Committed in queue order, gap-free: failed appends burn no positions.
    assert_eq!(positions(0), vec![3]);
    assert_eq!(positions(2), vec![4, 5, 6]);
    assert_eq!(positions(6), vec![7]);
    assert_eq!(all_positions(&store).await, (1..=7).collect::<Vec<_>>());
    assert_eq!(raw_counts(&path), (7, 7));
    for (id, n) in [(a, 1), (b, 3), (c, 0), (d, 0), (e, 0), (existing, 3)] {
        assert_contiguous(&store.load(USER, id).await.expect("load"), n);
    }
    assert_eq!(store.outbox_backlog().await.expect("backlog"), 6);
}

/// One append of a generated batch: aggregate index, expected version, number of events,
/// whether its **last** event reuses the id of an event already committed (so its earlier
/// events are written before it fails), and the idempotency key it carries, if any.
#[derive(Debug, Clone)]
struct Op {
    aggregate: usize,
    expected: u64,
    events: u64,
    reuse_id: bool,
    key: Option<usize>,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    (
        0..3usize,
        0..4u64,
        1..4u64,
        proptest::bool::weighted(0.15),
        proptest::option::weighted(0.3, 0..2usize),
    )
        .prop_map(|(aggregate, expected, events, reuse_id, key)| Op {
            aggregate,
            expected,
            events,
            reuse_id,
            key,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A batch behaves exactly like its appends run one after another in queue order.
    #[test]
    fn a_batch_equals_its_appends_in_queue_order(ops in proptest::collection::vec(op_strategy(), 1..12)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (_dir, path) = temp_db();
            let store = SqliteStore::open(&path).expect("open");
            let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
            // Seed aggregate 0 with one event, so there is an id to reuse.
            let seed = store
                .append(USER, ids[0], 0, sample_events(ids[0], 1, 1))
                .await
                .expect("seed");
            let mut committed_ids = vec![seed[0].event_id];
            let mut batches = Vec::new();
            for op in &ops {
                let id = ids[op.aggregate];
                let mut events = sample_events(id, op.expected + 1, op.events);
                if op.reuse_id {
                    if let Some(last) = events.last_mut() {
                        last.event_id = committed_ids[0];
                    }
                }
                batches.push(events);
            }
            let futures = ops
                .iter()
                .zip(&batches)
                .map(|(op, events)| match op.key {
                    Some(k) => store.append_idempotent(
                        USER,
                        ids[op.aggregate],
                        op.expected,
                        events.clone(),
                        key(&format!("k{k}")),
                    ),
                    None => store.append(USER, ids[op.aggregate], op.expected, events.clone()),
                })
                .collect();
            let results = in_one_batch(&store, &path, futures).await;

            // The model: sequential application in queue order.
            let mut versions = [1u64, 0, 0];
            let mut next_position = 2u64;
            let mut recorded_keys = HashSet::new();
            for ((op, events), result) in ops.iter().zip(&batches).zip(&results) {
                let version = versions[op.aggregate];
                if op.expected != version {
                    match result {
                        Err(StoreError::Conflict { expected, actual, .. }) => {
                            assert_eq!((*expected, *actual), (op.expected, version));
                        }
                        other => panic!("{op:?}: want Conflict, got {other:?}"),
                    }
                } else if let Some(k) = op.key.filter(|k| recorded_keys.contains(k)) {
                    match result {
                        Err(StoreError::IdempotencyKeyExists { key }) => {
                            assert_eq!(key, &format!("k{k}"));
                        }
                        other => panic!("{op:?}: want IdempotencyKeyExists, got {other:?}"),
                    }
                } else if op.reuse_id {
                    assert!(matches!(result, Err(StoreError::Backend(_))), "{op:?}: {result:?}");
                } else {
                    let envs = result.as_ref().unwrap_or_else(|e| panic!("{op:?}: {e}"));
                    let want: Vec<u64> = (next_position..next_position + op.events).collect();
                    assert_eq!(envs.iter().map(|e| e.position).collect::<Vec<_>>(), want);
                    next_position += op.events;
                    versions[op.aggregate] += op.events;
                    committed_ids.extend(events.iter().map(|e| e.event_id));
                    recorded_keys.extend(op.key);
                }
            }
            let t = conformance::sample_occurred_at();
            for k in 0..2 {
                let record = store.idempotency_record(&format!("k{k}"), t).await.expect("get");
                assert_eq!(record.is_some(), recorded_keys.contains(&k), "key k{k}");
            }
            for (i, id) in ids.iter().enumerate() {
                assert_contiguous(&store.load(USER, *id).await.expect("load"), versions[i]);
            }
            let total = next_position - 1;
            assert_eq!(all_positions(&store).await, (1..=total).collect::<Vec<_>>());
            assert_eq!(raw_counts(&path), (total as i64, total as i64));
        });
    }
}

#[tokio::test]
async fn a_transaction_aborted_by_sqlite_fails_its_whole_batch() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let seed = Uuid::new_v4();
    store
        .append(USER, seed, 0, sample_events(seed, 1, 1))
        .await
        .expect("seed");
    let [a, poison, b] = [(); 3].map(|()| Uuid::new_v4());
    let raw = Connection::open(&path).expect("raw open");
    // Real SQLite fault injection: RAISE(ROLLBACK) aborts the whole enclosing transaction,
    // RAISE(ABORT) only the failing statement.
    let trigger = |action: &str| {
        raw.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS poison; \
             CREATE TRIGGER poison BEFORE INSERT ON events \
             WHEN NEW.aggregate_id = '{poison}' BEGIN SELECT RAISE({action}, 'poison'); END;"
        ))
        .expect("trigger");
    };

    trigger("ROLLBACK");
    let results = in_one_batch(
        &store,
        &path,
        vec![
            store.append(USER, a, 0, sample_events(a, 1, 1)),
            store.append(USER, poison, 0, sample_events(poison, 1, 1)),
            store.append(USER, b, 0, sample_events(b, 1, 1)),
        ],
    )
    .await;
    for (i, r) in results.iter().enumerate() {
        assert!(
            matches!(r, Err(StoreError::Backend(_))),
            "append #{i} of an aborted batch: {r:?}"
        );
    }
    assert_eq!(raw_counts(&path), (1, 1), "nothing of the batch is visible");

    trigger("ABORT");
    let results = in_one_batch(
        &store,
        &path,
        vec![
            store.append(USER, a, 0, sample_events(a, 1, 1)),
            store.append(USER, poison, 0, sample_events(poison, 1, 1)),
            store.append(USER, b, 0, sample_events(b, 1, 1)),
        ],
    )
    .await;
    assert!(matches!(results[1], Err(StoreError::Backend(_))));
    let positions: Vec<u64> = [0, 2]
        .iter()
        .map(|&i| results[i].as_ref().expect("neighbour commits")[0].position)
        .collect();
    assert_eq!(positions, vec![2, 3]);
    assert_eq!(all_positions(&store).await, vec![1, 2, 3]);
    assert_eq!(raw_counts(&path), (3, 3));
}

#[tokio::test]
async fn other_writes_share_a_batch_with_appends_and_see_their_writes() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let batches0 = store.write_batches();
    // Same set-up as `in_one_batch`, with writes other than appends in the batch.
    let lock = Connection::open(&path).expect("raw open");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut blocker = store.outbox_mark_published(&[1]);
    assert!(futures::poll!(&mut blocker).is_pending(), "blocker queued");
    let mut polls = 0;
    while store.write_batches() == batches0 {
        polls += 1;
        assert!(
            polls < 10_000,
            "the writer never started the blocker's batch"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut append = store.append_idempotent(USER, a, 0, sample_events(a, 1, 2), key("k"));
    assert!(futures::poll!(&mut append).is_pending());
    let later = tektree_event_store::IdempotencyRecord::for_append(key("k"), USER, b, 0, 0);
    let mut put = store.put_idempotency_record(later);
    assert!(futures::poll!(&mut put).is_pending());
    let mut mark = store.outbox_mark_published(&[1]);
    assert!(futures::poll!(&mut mark).is_pending());
    let mut purge = store.purge_idempotency_records(conformance::sample_occurred_at());
    assert!(futures::poll!(&mut purge).is_pending());
    lock.execute_batch("COMMIT")
        .expect("release the write lock");
    blocker.await.expect("blocker");

    let committed = append.await.expect("append");
    let in_force = put.await.expect("put");
    assert_eq!(
        in_force.aggregate_id, a,
        "the put sees the record its batch neighbour wrote"
    );
    mark.await.expect("mark");
    assert_eq!(purge.await.expect("purge"), 0);
    assert_eq!(
        store.write_batches() - batches0,
        2,
        "one batch after the blocker's"
    );
    assert_eq!(store.batched_appends(), 1);
    assert_eq!(committed[0].position, 1);
    let pending = store.outbox_pending(10).await.expect("pending");
    assert_eq!(
        pending.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![2],
        "the mark in the batch saw position 1 written before it"
    );
}

/// Takes SQLite's write lock on a raw connection and queues an outbox mark behind it; returns
/// once the writer has started that mark's batch (and blocks in `BEGIN IMMEDIATE`), so that the
/// writes queued next all wait for the same following batch. Commit the returned connection's
/// transaction to let the writer go on, then await the returned mark.
async fn hold_the_writer<'a>(
    store: &'a SqliteStore,
    path: &Path,
) -> (
    Connection,
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>,
) {
    let batches0 = store.write_batches();
    let lock = Connection::open(path).expect("raw open");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut blocker = store.outbox_mark_published(&[1]);
    assert!(futures::poll!(&mut blocker).is_pending(), "blocker queued");
    let mut polls = 0;
    while store.write_batches() == batches0 {
        polls += 1;
        assert!(
            polls < 10_000,
            "the writer never started the blocker's batch"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (lock, blocker)
}

#[tokio::test]
async fn a_failing_snapshot_save_fails_alone_in_its_batch() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).expect("open");
    let raw = Connection::open(&path).expect("raw open");
    // Real SQLite fault injection: every snapshot write is refused.
    raw.execute_batch(
        "CREATE TRIGGER no_snapshots BEFORE INSERT ON snapshots \
         BEGIN SELECT RAISE(ABORT, 'no snapshots here'); END;",
    )
    .expect("trigger");
    let batches0 = store.write_batches();
    let (lock, blocker) = hold_the_writer(&store, &path).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let snapshot = conformance::sample_snapshot(a, 1, 1);
    let mut first = store.append(USER, a, 0, sample_events(a, 1, 1));
    assert!(futures::poll!(&mut first).is_pending());
    let mut save = store.save_snapshot(&snapshot);
    assert!(futures::poll!(&mut save).is_pending());
    let mut second = store.append(USER, b, 0, sample_events(b, 1, 1));
    assert!(futures::poll!(&mut second).is_pending());
    lock.execute_batch("COMMIT")
        .expect("release the write lock");
    blocker.await.expect("blocker");

    let first = first.await.expect("the append before the save commits");
    let second = second.await.expect("the append after the save commits");
    match save.await {
        Err(StoreError::Backend(m)) => assert!(m.contains("no snapshots here"), "{m}"),
        other => panic!("the refused snapshot save gave {other:?}"),
    }
    assert_eq!(
        store.write_batches() - batches0,
        2,
        "the blocker's batch, then one batch"
    );
    assert_eq!((first[0].position, second[0].position), (1, 2));
    assert_eq!(raw_counts(&path), (2, 2));
    assert_eq!(store.load_snapshot(USER, a).await.expect("load"), None);
}

#[tokio::test]
async fn snapshots_are_json_text_rows_that_survive_reopen() {
    let (_dir, path) = temp_db();
    let id = Uuid::new_v4();
    let snapshot = conformance::sample_snapshot(id, 20, 3);
    {
        let store = SqliteStore::open(&path).expect("open");
        assert!(store.save_snapshot(&snapshot).await.expect("save"));
    }
    let store = SqliteStore::open(&path).expect("reopen");
    assert_eq!(
        store.load_snapshot(USER, id).await.expect("load"),
        Some(snapshot.clone())
    );
    let raw = Connection::open(&path).expect("raw open");
    let (version, shape, state, taken_at): (i64, i64, String, String) = raw
        .query_row(
            "SELECT version, snapshot_version, state, taken_at FROM snapshots \
             WHERE aggregate_type = ?1 AND aggregate_id = ?2",
            rusqlite::params![USER, id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("row");
    assert_eq!((version, shape), (20, 3));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&state).expect("JSON text"),
        snapshot.state
    );
    assert!(!state.contains('\n'), "compact JSON");
    assert_eq!(taken_at, "2024-05-06T07:08:09.123000020Z");
    // A row another build wrote with a state that is not JSON is reported, not guessed.
    raw.execute(
        "UPDATE snapshots SET state = '{not json' WHERE aggregate_id = ?1",
        [id.to_string()],
    )
    .expect("corrupt");
    match store.load_snapshot(USER, id).await {
        Err(StoreError::Backend(m)) => assert!(m.contains("state"), "{m}"),
        other => panic!("a corrupt snapshot row gave {other:?}"),
    }
}
