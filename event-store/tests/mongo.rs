//! The event-store conformance suite and MongoDB-specific checks against a **real** MongoDB
//! replica set named by `MONGODB_URI` (see `docs/mongodb.md`), for example
//! `MONGODB_URI='mongodb://localhost:27017/?replicaSet=rs0&directConnection=true'`.
//!
//! Without `MONGODB_URI` each test starts its own SecantusDB (`secantusd-py`, installed by
//! `scripts/test`); with neither it fails. Each run uses a fresh database
//! (`tektree_es_<pid>_<nanos>`) that is dropped at the end, also when a check fails.

#![cfg(feature = "mongodb")]

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use mongodb::bson::{doc, Bson, Document};
use tektree_event_store::conformance::{self, sample_event, sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::mongo::{
    envelope_to_document, snapshot_key_filter, uuid_to_bson, MongoStore, ServerBuild, EVENTS,
    METRIC_UNSEQUENCED, OUTBOX, OUTBOX_INDEX, PENDING_INDEX, POSITION_INDEX, POSITION_LOG,
    SEQUENCE_INDEX, SNAPSHOTS, SNAPSHOT_KEY_INDEX,
};
use tektree_event_store::{EventLog, OutboxStore, StoreError};
use tektree_test_servers::MongoServer;
use uuid::Uuid;

/// A server for this test: SecantusDB started on a free port, or the deployment named by
/// `MONGODB_URI`; panics (the suite fails) when there is none.
fn server() -> MongoServer {
    MongoServer::start()
}

fn database_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Runs `checks(uri, database)` on a fresh database and drops it afterwards, whatever happened.
async fn with_database<F>(uri: &str, prefix: &str, checks: impl FnOnce(String, String) -> F)
where
    F: std::future::Future<Output = ()>,
{
    let name = database_name(prefix);
    let outcome = AssertUnwindSafe(checks(uri.to_string(), name.clone()))
        .catch_unwind()
        .await;
    match mongodb::Client::with_uri_str(uri).await {
        Ok(client) => {
            if let Err(e) = client.database(&name).drop().await {
                eprintln!("could not drop test database {name}: {e}");
            }
        }
        Err(e) => eprintln!("could not drop test database {name}: {e}"),
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_conformance() {
    let server = server();
    let uri = server.url.clone();
    with_database(&uri, "tektree_es", |uri, db| async move {
        let store = MongoStore::connect(&uri, &db).await.expect("connect");
        assert_eq!(store.head().await.unwrap().position, 0, "fresh database");
        conformance::run_all(&store).await;
        positions_are_gap_free(&store).await;
        indexes_exist_and_serve_the_queries(&store).await;
        // connect is idempotent (indexes, counter) and a second handle sees the same store.
        let other = MongoStore::connect(&uri, &db)
            .await
            .expect("second connect");
        assert_eq!(other.head().await.unwrap(), store.head().await.unwrap());
        let elsewhere = MongoStore::connect(&uri, &format!("{db}_other"))
            .await
            .expect("another database");
        conformance::identity_is_the_store_s(&store, &other, &elsewhere).await;
        let _ = elsewhere.database().drop().await;
        two_handles_race(&store, &other).await;
        conformance::concurrent_writers_on_one_aggregate(&other, 4, 3).await;
        crashed_appenders_are_sequenced_late_but_never_skipped(&store).await;
        positions_are_gap_free(&other).await;
        unsequenceable_events_are_set_aside(&store).await;
        an_append_larger_than_a_batch_is_sequenced_whole(&store, &other).await;
        positions_are_gap_free(&store).await;
    })
    .await;
}

/// The whole history is gap-free and in order (the shared check of `conformance`).
async fn positions_are_gap_free(store: &MongoStore) {
    conformance::whole_history_is_gap_free_and_ordered(store, "mongodb").await;
}

/// Stage names and index names of every winning plan in an explain reply.
fn plan_of(reply: &Document) -> (Vec<String>, Vec<String>) {
    fn walk(b: &Bson, in_plan: bool, stages: &mut Vec<String>, indexes: &mut Vec<String>) {
        match b {
            Bson::Document(d) => {
                for (k, v) in d {
                    let in_plan = in_plan || k == "winningPlan";
                    if in_plan && k == "stage" {
                        stages.extend(v.as_str().map(str::to_string));
                    }
                    if in_plan && k == "indexName" {
                        indexes.extend(v.as_str().map(str::to_string));
                    }
                    walk(v, in_plan, stages, indexes);
                }
            }
            Bson::Array(items) => items.iter().for_each(|v| walk(v, in_plan, stages, indexes)),
            _ => {}
        }
    }
    let (mut stages, mut indexes) = (vec![], vec![]);
    walk(
        &Bson::Document(reply.clone()),
        false,
        &mut stages,
        &mut indexes,
    );
    (stages, indexes)
}

async fn explain(store: &MongoStore, command: Document) -> (Vec<String>, Vec<String>) {
    let reply = store
        .database()
        .run_command(doc! { "explain": command, "verbosity": "queryPlanner" })
        .await
        .expect("explain");
    plan_of(&reply)
}

/// The expected "index" of an `_id` point read: the `_id_` index or mongod's IDHACK stage.
const ID_LOOKUP: &str = "_id_ or IDHACK";

/// Every query shape uses its index on every server (no `COLLSCAN`); that the index also gives
/// the order (no in-memory `SORT`) is mongod's planner's property, asserted where the server is
/// mongod (`buildInfo`; SecantusDB's planner sorts index scans in memory).
async fn indexes_exist_and_serve_the_queries(store: &MongoStore) {
    let db = store.database();
    let build = ServerBuild::of(db.client()).await.expect("buildInfo");
    let names = db
        .collection::<Document>(EVENTS)
        .list_index_names()
        .await
        .unwrap();
    for want in [SEQUENCE_INDEX, POSITION_INDEX, PENDING_INDEX] {
        assert!(
            names.iter().any(|n| n == want),
            "events index {want}: {names:?}"
        );
    }
    let names = db
        .collection::<Document>(OUTBOX)
        .list_index_names()
        .await
        .unwrap();
    assert!(names.iter().any(|n| n == OUTBOX_INDEX), "{names:?}");
    let names = db
        .collection::<Document>(SNAPSHOTS)
        .list_index_names()
        .await
        .unwrap();
    assert!(names.iter().any(|n| n == SNAPSHOT_KEY_INDEX), "{names:?}");

    let cases = [
        (
            doc! { "find": EVENTS, "filter": { "position": { "$gt": 3_i64, "$lte": 9_i64 } },
            "sort": { "position": 1 }, "limit": 10 },
            POSITION_INDEX,
        ),
        (
            doc! { "find": EVENTS, "filter": { "pending": { "$exists": true, "$lte": 5_i64 } },
            "sort": { "pending": 1 }, "hint": PENDING_INDEX },
            PENDING_INDEX,
        ),
        (
            doc! { "find": POSITION_LOG, "filter": { "_id": 7_i64 } },
            ID_LOOKUP,
        ),
        (
            doc! { "find": EVENTS,
            "filter": { "position": { "$gte": 1_i64, "$lte": 5_i64 } },
            "sort": { "position": 1 } },
            POSITION_INDEX,
        ),
        (
            doc! { "find": EVENTS,
            "filter": { "aggregate_type": "user", "aggregate_id": uuid_to_bson(Uuid::nil()) },
            "sort": { "sequence": 1 } },
            SEQUENCE_INDEX,
        ),
        (
            doc! { "find": EVENTS, "filter": { "pending": { "$exists": true } },
            "sort": { "pending": 1 }, "limit": 512, "hint": PENDING_INDEX },
            PENDING_INDEX,
        ),
        (
            doc! { "find": OUTBOX,
            "filter": { "published": false, "position": { "$gt": 0_i64, "$lte": 9_i64 } },
            "sort": { "published": 1, "position": 1 }, "limit": 10 },
            OUTBOX_INDEX,
        ),
        (
            doc! { "find": SNAPSHOTS,
            "filter": snapshot_key_filter("profile", Uuid::nil()), "limit": 1 },
            SNAPSHOT_KEY_INDEX,
        ),
    ];
    for (command, index) in cases {
        let (stages, indexes) = explain(store, command.clone()).await;
        // mongod answers an `_id` point read with IDHACK, a stage that names no index.
        let id_lookup = index == ID_LOOKUP
            && (indexes.iter().any(|i| i == "_id_") || stages.iter().any(|s| s == "IDHACK"));
        assert!(
            id_lookup || indexes.iter().any(|i| i == index),
            "{command}: {indexes:?} {stages:?}"
        );
        assert!(
            !stages.iter().any(|s| s == "COLLSCAN"),
            "{build}: {command}: {stages:?}"
        );
        if build.is_mongod() {
            assert!(
                !stages.iter().any(|s| s == "SORT"),
                "{build}: {command}: {stages:?}"
            );
        }
    }
}

/// Two handles (two clients, as two processes would have) append concurrently to their own
/// aggregates and race on a shared one; positions stay gap-free, unique, and increasing along
/// every aggregate.
async fn two_handles_race(a: &MongoStore, b: &MongoStore) {
    let head0 = a.head().await.unwrap();
    let shared = Uuid::new_v4();
    let mut tasks = Vec::new();
    for (w, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            let mut written = 0u64;
            for k in 0..6u64 {
                let own = Uuid::new_v4();
                let n = k % 3 + 1;
                written += store
                    .append(SAMPLE_AGGREGATE_TYPE, own, 0, sample_events(own, 1, n))
                    .await
                    .unwrap_or_else(|e| panic!("writer {w}: {e}"))
                    .len() as u64;
                loop {
                    let version = store
                        .load(SAMPLE_AGGREGATE_TYPE, shared)
                        .await
                        .unwrap()
                        .last()
                        .map_or(0, |e| e.sequence);
                    match store
                        .append(
                            SAMPLE_AGGREGATE_TYPE,
                            shared,
                            version,
                            sample_events(shared, version + 1, 1),
                        )
                        .await
                    {
                        Ok(e) => {
                            written += e.len() as u64;
                            break;
                        }
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
            }
            written
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap();
    }
    let head = b.head().await.unwrap();
    assert_eq!(head.position, head0.position + written);
    let events = a.read_all(head0.position, usize::MAX).await.unwrap();
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (head0.position + 1..=head.position).collect::<Vec<_>>()
    );
    let mut last: HashMap<Uuid, (u64, u64)> = HashMap::new();
    for e in &events {
        if let Some((seq, pos)) = last.insert(e.aggregate_id, (e.sequence, e.position)) {
            assert_eq!(
                e.sequence,
                seq + 1,
                "sequence order along {}",
                e.aggregate_id
            );
            assert!(e.position > pos);
        }
    }
    assert_eq!(last[&shared].0, 24, "every shared append landed once");
}

/// An appender that died between its commit and its sequencer pass leaves an event without a
/// position: it is invisible to `read_all` and the outbox until a pass runs, then appears at
/// the *next* position (never below what readers have seen), and `load` sees it.
async fn crashed_appenders_are_sequenced_late_but_never_skipped(store: &MongoStore) {
    let id = Uuid::new_v4();
    let new = sample_event(id, 1);
    let mut env = new.clone().into_envelope(0, chrono::Utc::now());
    let mut doc = envelope_to_document(&env).unwrap();
    // An old provisional key: it committed "long ago" but was never sequenced.
    doc.insert("pending", 1_i64);
    let db = store.database();
    db.collection::<Document>(EVENTS)
        .insert_one(doc)
        .await
        .unwrap();
    db.collection::<Document>(OUTBOX)
        .insert_one(doc! { "_id": uuid_to_bson(new.event_id), "published": false, "published_at": Bson::Null })
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    assert!(store.read_all(head.position, 10).await.unwrap().is_empty());

    let pending = store.outbox_pending(usize::MAX).await.unwrap();
    env.position = head.position + 1;
    assert!(
        pending.contains(&env),
        "the relay's poll sequenced the orphan"
    );
    assert_eq!(
        store.read_all(head.position, 10).await.unwrap(),
        vec![env.clone()]
    );
    assert_eq!(
        store.load(SAMPLE_AGGREGATE_TYPE, id).await.unwrap(),
        vec![env.clone()]
    );
    assert_eq!(store.sequence_pending().await.unwrap(), 0);

    // The same through `load` alone.
    let id = Uuid::new_v4();
    let new = sample_event(id, 1);
    let mut env = new.clone().into_envelope(0, chrono::Utc::now());
    let mut doc = envelope_to_document(&env).unwrap();
    doc.insert("pending", 2_i64);
    db.collection::<Document>(EVENTS)
        .insert_one(doc)
        .await
        .unwrap();
    db.collection::<Document>(OUTBOX)
        .insert_one(doc! { "_id": uuid_to_bson(new.event_id), "published": false, "published_at": Bson::Null })
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    env.position = head.position + 1;
    assert_eq!(
        store.load(SAMPLE_AGGREGATE_TYPE, id).await.unwrap(),
        vec![env]
    );
    store
        .outbox_mark_published(&(1..=head.position + 1).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

/// Throughput and latency of appends on a real replica set, printed (never asserted). Runs
/// with the suite at a small size whenever `MONGODB_URI` is set; for a real measurement:
///
/// ```sh
/// MONGODB_URI='mongodb://localhost:27017/?replicaSet=rs0&directConnection=true' \
///   TEKTREE_BENCH_WRITERS=16 TEKTREE_BENCH_APPENDS=200 \
///   cargo test --release -p tektree-event-store --test mongo append_throughput -- --nocapture
/// ```
///
/// `TEKTREE_BENCH_WRITERS` (default 4) concurrent writers, each `TEKTREE_BENCH_APPENDS`
/// (default 20) appends of 2 events to its own aggregates, split over two handles (two
/// connection pools, as two processes); then the same number of writers on ONE aggregate.
/// A database written by a build before the position log (its `counters` document and events
/// positioned 1..=3) is adopted: positions continue at 4, gap-free, from several handles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_position_counter_is_adopted() {
    let server = server();
    let uri = server.url.clone();
    with_database(&uri, "tektree_es_old", |uri, db| async move {
        let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
        let d = client.database(&db);
        let id = Uuid::new_v4();
        for (i, e) in sample_events(id, 1, 3).into_iter().enumerate() {
            let position = i as u64 + 1;
            let event_id = e.event_id;
            let doc = envelope_to_document(&e.into_envelope(position, chrono::Utc::now())).unwrap();
            d.collection::<Document>(EVENTS)
                .insert_one(doc)
                .await
                .unwrap();
            d.collection::<Document>(OUTBOX)
                .insert_one(
                    doc! { "_id": uuid_to_bson(event_id), "position": position as i64,
                    "published": true, "published_at": Bson::Null },
                )
                .await
                .unwrap();
        }
        d.collection::<Document>("counters")
            .insert_one(doc! { "_id": "position", "last": 3_i64 })
            .await
            .unwrap();
        let (a, b) = (
            MongoStore::connect(&uri, &db).await.unwrap(),
            MongoStore::connect(&uri, &db).await.unwrap(),
        );
        assert_eq!(a.head().await.unwrap().position, 3);
        let next = b
            .append(SAMPLE_AGGREGATE_TYPE, id, 3, sample_events(id, 4, 2))
            .await
            .unwrap();
        assert_eq!(next.iter().map(|e| e.position).collect::<Vec<_>>(), [4, 5]);
        let all = conformance::whole_history_is_gap_free_and_ordered(&a, "adopted").await;
        assert_eq!(all.len(), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn append_throughput() {
    let server = server();
    let uri = server.url.clone();
    let env_or = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let writers = env_or("TEKTREE_BENCH_WRITERS", 4);
    let appends = env_or("TEKTREE_BENCH_APPENDS", 20);
    with_database(&uri, "tektree_es_bench", |uri, db| async move {
        let a = MongoStore::connect(&uri, &db).await.unwrap();
        let b = MongoStore::connect(&uri, &db).await.unwrap();
        let report = |what: &str, started: Instant, mut lat: Vec<Duration>, events: usize| {
            lat.sort();
            let secs = started.elapsed().as_secs_f64();
            let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
            println!(
                "{what}: {} appends ({events} events) in {secs:.2} s = {:.0} appends/s, \
                 {:.0} events/s; latency p50 {:?} p99 {:?}",
                lat.len(),
                lat.len() as f64 / secs,
                events as f64 / secs,
                pct(0.5),
                pct(0.99)
            );
        };

        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(appends);
                for _ in 0..appends {
                    let id = Uuid::new_v4();
                    let t = Instant::now();
                    store
                        .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 2))
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        report(
            &format!("{writers} writers, distinct aggregates"),
            started,
            lat,
            writers * appends * 2,
        );
        // Every acknowledged append is stored once, at dense positions in one order.
        let all = conformance::whole_history_is_gap_free_and_ordered(&a, "distinct").await;
        assert_eq!(all.len(), writers * appends * 2, "events stored");
        let aggregates: std::collections::HashSet<Uuid> =
            all.iter().map(|e| e.aggregate_id).collect();
        assert_eq!(aggregates.len(), writers * appends, "aggregates stored");

        let shared = Uuid::new_v4();
        let per_writer = (appends / 10).max(1);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let (mut lat, mut conflicts) = (Vec::new(), 0u64);
                for _ in 0..per_writer {
                    let t = Instant::now();
                    loop {
                        let v = store
                            .load(SAMPLE_AGGREGATE_TYPE, shared)
                            .await
                            .unwrap()
                            .last()
                            .map_or(0, |e| e.sequence);
                        match store
                            .append(
                                SAMPLE_AGGREGATE_TYPE,
                                shared,
                                v,
                                sample_events(shared, v + 1, 1),
                            )
                            .await
                        {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    lat.push(t.elapsed());
                }
                (lat, conflicts)
            }));
        }
        let (mut lat, mut conflicts) = (Vec::new(), 0);
        for t in tasks {
            let (l, c) = t.await.unwrap();
            lat.extend(l);
            conflicts += c;
        }
        let n = lat.len();
        report(
            &format!("{writers} writers, one aggregate ({conflicts} conflicts retried)"),
            started,
            lat,
            n,
        );
        // The contended aggregate holds one event per acknowledged append, sequences 1..=n,
        // at increasing positions.
        let shared_events = b.load(SAMPLE_AGGREGATE_TYPE, shared).await.unwrap();
        let sequences: Vec<u64> = shared_events.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (1..=n as u64).collect::<Vec<_>>());
        assert!(shared_events
            .windows(2)
            .all(|w| w[0].position < w[1].position));
        conformance::whole_history_is_gap_free_and_ordered(&b, "one aggregate").await;
    })
    .await;
}

/// Committed events that can never be sequenced (no outbox record; an `_id` that is not a
/// UUID) are set aside with their reason and never block the queue; loading an aggregate whose
/// history lost one reports it.
async fn unsequenceable_events_are_set_aside(store: &MongoStore) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only metrics recorder of this test binary");
    let db = store.database();
    let events = db.collection::<Document>(EVENTS);
    let orphan = Uuid::new_v4();
    let mut d = envelope_to_document(&sample_event(orphan, 1).into_envelope(0, chrono::Utc::now()))
        .unwrap();
    d.insert("pending", 1_i64);
    events.insert_one(d).await.unwrap();
    let mut bad =
        envelope_to_document(&sample_event(Uuid::new_v4(), 1).into_envelope(0, chrono::Utc::now()))
            .unwrap();
    bad.insert("_id", "not-a-uuid");
    bad.insert("pending", 2_i64);
    events.insert_one(bad).await.unwrap();
    db.collection::<Document>(OUTBOX)
        .insert_one(doc! { "_id": "not-a-uuid", "published": false, "published_at": Bson::Null })
        .await
        .unwrap();

    let id = Uuid::new_v4();
    let started = Instant::now();
    let envs = store
        .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 1))
        .await
        .expect("an append after unsequenceable events");
    assert!(started.elapsed() < Duration::from_secs(5));
    let head = store.head().await.unwrap();
    assert_eq!(envs[0].position, head.position);
    for (filter, reason) in [
        (doc! { "aggregate_id": uuid_to_bson(orphan) }, "outbox"),
        (doc! { "_id": "not-a-uuid" }, "event_id"),
    ] {
        let d = events.find_one(filter).await.unwrap().unwrap();
        assert!(
            !d.contains_key("pending") && !d.contains_key("position"),
            "{d}"
        );
        let why = d.get_str("unsequenced").unwrap();
        assert!(why.starts_with(reason), "{why}");
    }
    let mut counted: Vec<String> = Vec::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() == METRIC_UNSEQUENCED {
            let reason: Vec<String> = key.key().labels().map(|l| l.value().to_string()).collect();
            assert!(
                matches!(value, metrics_util::debugging::DebugValue::Counter(1)),
                "{reason:?}: {value:?}"
            );
            counted.extend(reason);
        }
    }
    counted.sort();
    assert_eq!(
        counted,
        ["event_id", "outbox"],
        "{METRIC_UNSEQUENCED} by reason"
    );
    match store.load(SAMPLE_AGGREGATE_TYPE, orphan).await {
        Err(StoreError::Corrupt { reason, .. }) => {
            assert!(reason.contains("set aside"), "{reason}")
        }
        other => panic!("load of an aggregate with a set-aside event: {other:?}"),
    }
}

/// An append of more events than one pass takes (1,300 > 512) is sequenced whole, at
/// consecutive positions, while small appends run concurrently on both handles; the
/// aggregate's next append comes after it.
async fn an_append_larger_than_a_batch_is_sequenced_whole(a: &MongoStore, b: &MongoStore) {
    let big = Uuid::new_v4();
    let mut small = Vec::new();
    for (w, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        small.push(tokio::spawn(async move {
            for _ in 0..6 {
                let id = Uuid::new_v4();
                store
                    .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 2))
                    .await
                    .unwrap_or_else(|e| panic!("small writer {w}: {e}"));
            }
        }));
    }
    let envs = a
        .append(SAMPLE_AGGREGATE_TYPE, big, 0, sample_events(big, 1, 1300))
        .await
        .unwrap();
    for t in small {
        t.await.unwrap();
    }
    let first = envs[0].position;
    let positions: Vec<u64> = envs.iter().map(|e| e.position).collect();
    assert_eq!(positions, (first..first + 1300).collect::<Vec<_>>());
    let next = b
        .append(
            SAMPLE_AGGREGATE_TYPE,
            big,
            1300,
            sample_events(big, 1301, 1),
        )
        .await
        .unwrap();
    assert!(next[0].position > first + 1299);
    let loaded = b.load(SAMPLE_AGGREGATE_TYPE, big).await.unwrap();
    assert_eq!(loaded.len(), 1301);
    assert!(loaded.windows(2).all(|w| w[1].position > w[0].position));
}
