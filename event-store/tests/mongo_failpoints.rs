//! Every transaction error path of the MongoDB event store, forced with the server's
//! `failCommand` failpoint (issue #11): transient errors and write conflicts on the append's
//! statements, unknown commit results and dropped connections at `commitTransaction`, and
//! failures while positions are assigned (the position-log insert, the materializing updates).
//! Each case must end with the append answered `Ok`, every event stored once, in order, at the
//! position the append returned, with exactly one outbox record, and no event left pending.

#![cfg(feature = "mongodb")]

use mongodb::bson::{doc, Bson, Document};
use tektree_event_store::conformance::{self, sample_event, sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::mongo::{envelope_to_document, uuid_to_bson, MongoStore, EVENTS, OUTBOX};
use tektree_event_store::EventLog;
use tektree_test_servers::MongoServer;
use uuid::Uuid;

/// The one command name of a `failCommand` data document.
fn failed_command(data: &Document) -> String {
    data.get_array("failCommands").unwrap()[0]
        .as_str()
        .unwrap()
        .to_string()
}

/// Arms `failCommand` for the next `times` matching commands.
async fn arm(store: &MongoStore, times: i32, data: Document) {
    store
        .database()
        .client()
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand", "mode": { "times": times }, "data": data,
        })
        .await
        .expect("configureFailPoint (the server needs --enable-test-commands)");
}

/// Sends `command` once from `probe` (a client without retryable reads or writes, so an armed
/// failpoint shows as an error).
async fn probe_outcome(probe: &mongodb::Client, command: &str) -> mongodb::error::Result<()> {
    let coll = probe
        .database("tektree_fp_probe")
        .collection::<Document>("probe");
    match command {
        "insert" => coll.insert_one(doc! { "probe": 1 }).await.map(drop),
        "find" => coll.find_one(doc! {}).await.map(drop),
        "update" => coll
            .update_one(doc! { "probe": 1 }, doc! { "$set": { "seen": true } })
            .await
            .map(drop),
        "commitTransaction" => {
            let mut s = probe.start_session().await?;
            s.start_transaction().await?;
            coll.insert_one(doc! { "probe": 2 }).session(&mut s).await?;
            let committed = s.commit_transaction().await;
            if committed.is_err() {
                // A failed commit leaves the transaction open on the server: end it.
                let _ = s.abort_transaction().await;
            }
            committed
        }
        other => panic!("no probe for {other}"),
    }
}

/// Proves that the failpoint on `command` fired (was used up by the code under test): the
/// probe must now succeed — while the failpoint is still armed it fails (checked at the start
/// of the test). Then turns the failpoint off.
async fn assert_fired_and_disarm(
    store: &MongoStore,
    probe: &mongodb::Client,
    command: &str,
    case: &str,
) {
    let outcome = probe_outcome(probe, command).await;
    disarm(store).await;
    if let Err(e) = outcome {
        panic!("{case}: the failpoint on {command} never fired (a probe still hit it: {e})");
    }
}

async fn disarm(store: &MongoStore) {
    store
        .database()
        .client()
        .database("admin")
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await
        .unwrap();
}

/// The store holds `ids` once each, in sequence order at consecutive positions from `first`,
/// each with one outbox record, and no event anywhere lacks a position.
async fn stored_once(store: &MongoStore, case: &str, aggregate: Uuid, ids: &[Uuid], first: u64) {
    let loaded = store.load(SAMPLE_AGGREGATE_TYPE, aggregate).await.unwrap();
    let got: Vec<Uuid> = loaded.iter().map(|e| e.event_id).collect();
    assert_eq!(got, ids, "{case}: events of the aggregate");
    for (i, e) in loaded.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1, "{case}: sequence");
        assert_eq!(e.position, first + i as u64, "{case}: position");
    }
    let db = store.database();
    let list: Vec<Bson> = ids.iter().map(|id| uuid_to_bson(*id)).collect();
    let outbox = db
        .collection::<Document>(OUTBOX)
        .count_documents(doc! { "_id": { "$in": list.clone() }, "position": { "$gt": 0_i64 } })
        .await
        .unwrap();
    assert_eq!(outbox, ids.len() as u64, "{case}: one outbox record each");
    let events = db
        .collection::<Document>(EVENTS)
        .count_documents(doc! { "_id": { "$in": list } })
        .await
        .unwrap();
    assert_eq!(events, ids.len() as u64, "{case}: stored once");
    let unsequenced = db
        .collection::<Document>(EVENTS)
        .count_documents(doc! { "position": { "$exists": false } })
        .await
        .unwrap();
    assert_eq!(unsequenced, 0, "{case}: events left without a position");
    conformance::whole_history_is_gap_free_and_ordered(store, case).await;
}

/// Appends two events (then one more) to a fresh aggregate with the failpoint armed before
/// the first append, proves the failpoint fired, and checks the outcome.
async fn case(store: &MongoStore, probe: &mongodb::Client, name: &str, times: i32, data: Document) {
    let id = Uuid::new_v4();
    let command = failed_command(&data);
    arm(store, times, data).await;
    let first = store
        .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 2))
        .await
        .unwrap_or_else(|e| panic!("{name}: append failed: {e}"));
    assert_fired_and_disarm(store, probe, &command, name).await;
    let second = store
        .append(SAMPLE_AGGREGATE_TYPE, id, 2, sample_events(id, 3, 1))
        .await
        .unwrap_or_else(|e| panic!("{name}: second append failed: {e}"));
    assert_eq!(
        second[0].position,
        first[1].position + 1,
        "{name}: next position"
    );
    let ids: Vec<Uuid> = first.iter().chain(&second).map(|e| e.event_id).collect();
    stored_once(store, name, id, &ids, first[0].position).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transaction_error_path_ends_with_each_event_stored_once() {
    let server = MongoServer::start();
    let db = format!("tektree_fp_{}", std::process::id());
    let store = MongoStore::connect(&server.url, &db).await.unwrap();
    let sep = if server.url.contains('?') { '&' } else { '?' };
    let probe = mongodb::Client::with_uri_str(format!(
        "{}{sep}retryWrites=false&retryReads=false",
        server.url
    ))
    .await
    .unwrap();
    // The probe's collection exists before any probe transaction (creating it inside one would
    // hold the collection until that transaction ends).
    probe
        .database("tektree_fp_probe")
        .collection::<Document>("probe")
        .insert_one(doc! { "probe": 0 })
        .await
        .unwrap();
    // The probe itself sees an armed failpoint (so a failpoint the code never hit is caught).
    for command in ["insert", "find", "update", "commitTransaction"] {
        arm(
            &store,
            1,
            doc! { "failCommands": [command], "errorCode": 112 },
        )
        .await;
        assert!(
            probe_outcome(&probe, command).await.is_err(),
            "probe of {command}"
        );
        disarm(&store).await;
    }
    let transient = || vec![Bson::String("TransientTransactionError".into())];
    let unknown = || vec![Bson::String("UnknownTransactionCommitResult".into())];

    // The append's statements.
    case(
        &store,
        &probe,
        "write conflict on the events insert",
        1,
        doc! { "failCommands": ["insert"], "errorCode": 112, "errorLabels": transient() },
    )
    .await;
    case(
        &store,
        &probe,
        "transient error three times",
        3,
        doc! { "failCommands": ["insert"], "errorCode": 112, "errorLabels": transient() },
    )
    .await;
    case(
        &store,
        &probe,
        "connection closed on the version check",
        1,
        doc! { "failCommands": ["find"], "closeConnection": true },
    )
    .await;
    case(
        &store,
        &probe,
        "connection closed on the insert",
        1,
        doc! { "failCommands": ["insert"], "closeConnection": true },
    )
    .await;
    // commitTransaction.
    case(
        &store,
        &probe,
        "unknown commit result",
        1,
        doc! { "failCommands": ["commitTransaction"], "errorCode": 91, "errorLabels": unknown() },
    )
    .await;
    case(
        &store,
        &probe,
        "unknown commit result twice",
        2,
        doc! { "failCommands": ["commitTransaction"], "errorCode": 189, "errorLabels": unknown() },
    )
    .await;
    case(&store, &probe, "transient error at commit", 1,
        doc! { "failCommands": ["commitTransaction"], "errorCode": 112, "errorLabels": transient() }).await;
    case(
        &store,
        &probe,
        "connection closed at commit",
        1,
        doc! { "failCommands": ["commitTransaction"], "closeConnection": true },
    )
    .await;
    // Position assignment: the materializing updates (only passes send `update`).
    case(
        &store,
        &probe,
        "connection closed while materializing",
        1,
        doc! { "failCommands": ["update"], "closeConnection": true },
    )
    .await;
    case(
        &store,
        &probe,
        "write conflict while materializing",
        2,
        doc! { "failCommands": ["update"], "errorCode": 112 },
    )
    .await;

    // The position-log insert: a committed but unsequenced event (as a crashed appender
    // leaves), then a pass whose log insert loses its connection, then one whose insert fails.
    for (name, data) in [
        (
            "connection closed on the log insert",
            doc! { "failCommands": ["insert"], "closeConnection": true },
        ),
        (
            "error on the log insert",
            doc! { "failCommands": ["insert"], "errorCode": 112 },
        ),
    ] {
        let id = Uuid::new_v4();
        let new = sample_event(id, 1);
        let mut d =
            envelope_to_document(&new.clone().into_envelope(0, chrono::Utc::now())).unwrap();
        d.insert("pending", 1_i64);
        store
            .database()
            .collection::<Document>(EVENTS)
            .insert_one(d)
            .await
            .unwrap();
        store
            .database()
            .collection::<Document>(OUTBOX)
            .insert_one(doc! { "_id": uuid_to_bson(new.event_id), "published": false, "published_at": Bson::Null })
            .await
            .unwrap();
        let head = store.head().await.unwrap().position;
        let command = failed_command(&data);
        arm(&store, 1, data).await;
        assert_eq!(store.sequence_pending().await.unwrap(), 1, "{name}");
        assert_fired_and_disarm(&store, &probe, &command, name).await;
        stored_once(&store, name, id, &[new.event_id], head + 1).await;
    }
    let _ = store.database().drop().await;
    let _ = probe.database("tektree_fp_probe").drop().await;
}
