//! Tests of the SQLite adapter on real temporary database files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use rusqlite::Connection;
use tektree_event_store::conformance::{self, sample_event, sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::{EventStore, Head, SqliteStore, StoreError};
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
async fn open_is_idempotent_and_creates_only_events_and_outbox() {
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
        ("index", "outbox_unpublished"),
        ("table", "events"),
        ("table", "outbox"),
        ("table", "rm_users"),
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
