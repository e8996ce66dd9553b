//! Event evolution (issue #6): `user.registered` rows stored at version 1 by builds before
//! issue #6 (`fixtures/user_registered_v1.jsonl`, written raw into a real SQLite store with
//! exactly the columns the store writes) are seen as version 2, with default `preferences`, on
//! every read path: aggregate loads and new commands, the relay (what goes on the bus), the
//! policies and projections of the pipeline, `tektree-replay events` and a projection rebuild.
//! The stored rows themselves are never rewritten.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rusqlite::params;
use serde_json::Value;
use tektree_commands::CommandMeta;
use tektree_domain::events::{Preferences, UserProfileUpdated};
use tektree_domain::{
    Actor, EventEnvelope, NoServices, Rules, Subscription, Tier, User, UserCommand,
};
use tektree_event_store::{EventLog, OutboxStore, SqliteStore};
use tektree_outbox::relay::{self, relay_once, RelayConfig};
use tektree_outbox::{Bus, Delivery, MemoryBus, SubscriptionOptions};
use tektree_projections::{Projection, ReadModel};
use tektree_services::app::App;
use tektree_services::replay::{events, rebuild, EventForm, EventSelection};
use tektree_services::worker::Processed;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A bound against a stuck pipeline, not a speed assertion.
const DEADLINE: Duration = Duration::from_secs(60);

/// The stored-v1 fixture: `user.registered` envelopes as builds before issue #6 stored them.
fn fixture() -> Vec<EventEnvelope> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/user_registered_v1.jsonl");
    let rows: Vec<EventEnvelope> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for (i, e) in rows.iter().enumerate() {
        // What a build before issue #6 wrote: version 1, no `preferences`.
        assert_eq!(e.event_type, "user.registered");
        assert_eq!(e.event_version, 1);
        assert_eq!((e.aggregate_type.as_str(), e.sequence), ("user", 1));
        assert_eq!(e.position, i as u64 + 1);
        let keys: Vec<&str> = e
            .payload
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.contains(&"user_id") && keys.contains(&"display_name"));
        assert_eq!(e.payload["user_id"], e.aggregate_id.to_string());
    }
    rows
}

/// The envelope as the current build must see it: version 2, default `preferences` added,
/// every other field as stored.
fn as_v2(stored: &EventEnvelope) -> EventEnvelope {
    let mut e = stored.clone();
    e.event_version = 2;
    e.payload["preferences"] = serde_json::to_value(Preferences::default()).unwrap();
    e
}

/// A new SQLite store file (schema created by [`SqliteStore::open`]) holding `rows` written raw,
/// each in `events` and unpublished in `outbox`, as the store's writer inserts them. Returns the
/// guard, the file and its `sqlite://` URL.
fn store_with(rows: &[EventEnvelope]) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tektree.db");
    drop(SqliteStore::open(&path).unwrap());
    write_raw(&path, rows);
    let url = format!("sqlite://{}", path.display());
    (dir, path, url)
}

/// Inserts `rows` into the store's `events` and `outbox` tables in one transaction, with the
/// store's encodings: lower-case hyphenated uuids, RFC 3339 UTC timestamps with nine fractional
/// digits, the actor's text form and the payload as compact JSON.
fn write_raw(path: &Path, rows: &[EventEnvelope]) {
    let ts = |t: &chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Nanos, true);
    let mut conn = rusqlite::Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    for e in rows {
        tx.execute(
            "INSERT INTO events (position, event_id, event_type, event_version, aggregate_type, \
             aggregate_id, sequence, occurred_at, recorded_at, correlation_id, causation_id, \
             actor, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                e.position as i64,
                e.event_id.to_string(),
                e.event_type,
                e.event_version,
                e.aggregate_type,
                e.aggregate_id.to_string(),
                e.sequence as i64,
                ts(&e.occurred_at),
                ts(&e.recorded_at),
                e.correlation_id.to_string(),
                e.causation_id.to_string(),
                e.actor.to_string(),
                serde_json::to_string(&e.payload).unwrap(),
            ],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO outbox (position, published_at) VALUES (?1, NULL)",
            params![e.position as i64],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// Reads (and acknowledges) everything group `group` gets, until `want` deliveries or the
/// deadline; then checks nothing more comes.
async fn read_bus(bus: &dyn Bus, group: &str, want: usize) -> Vec<Delivery> {
    let mut sub = bus
        .subscribe(SubscriptionOptions::new(group, "observer"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut got = Vec::new();
    while got.len() < want && tokio::time::Instant::now() < deadline {
        let batch = sub
            .next_batch(100, Duration::from_millis(50))
            .await
            .unwrap();
        let ids: Vec<String> = batch.iter().map(|d| d.id.clone()).collect();
        sub.ack(&ids).await.unwrap();
        got.extend(batch);
    }
    let extra = sub
        .next_batch(100, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(extra.is_empty(), "unexpected extra deliveries: {extra:?}");
    assert_eq!(got.len(), want);
    got
}

fn meta() -> CommandMeta {
    CommandMeta::new(Actor::importer(), Utc::now())
}

/// (a) Loading a user registered at version 1 folds the upcast event (default preferences);
/// commands decide against that state and append after the stored history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_load_sees_v1_registrations_as_v2_and_new_commands_append_after_them() {
    let v1 = fixture();
    let (_dir, _path, url) = store_with(&v1);
    let app = App::open(&url, "memory", Rules::default()).await.unwrap();

    for e in &v1 {
        let (user, version) = app.handler.load::<User>(e.aggregate_id).await.unwrap();
        assert_eq!(version, 1);
        assert_eq!(
            user.display_name.as_deref(),
            e.payload["display_name"].as_str()
        );
        assert_eq!(user.preferences, Preferences::default());
    }

    // Repeating the registration is recognised as the same registration: a no-op.
    let ada = v1[0].aggregate_id;
    let again = UserCommand::Register {
        user_id: ada,
        display_name: "Ada".into(),
        preferences: Preferences::default(),
    };
    let o = app
        .handler
        .execute::<User>(ada, again, &NoServices, &meta())
        .await
        .unwrap();
    assert!(o.events.is_empty(), "{:?}", o.events);

    // A profile update appends at sequence 2, after the stored version-1 event.
    let prefs = Preferences {
        weekly_digest: true,
        ..Preferences::default()
    };
    let update = UserCommand::UpdateProfile(UserProfileUpdated {
        user_id: ada,
        bio: Some("Historian of Rome".into()),
        preferences: Some(prefs.clone()),
        ..UserProfileUpdated::default()
    });
    let o = app
        .handler
        .execute::<User>(ada, update, &NoServices, &meta())
        .await
        .unwrap();
    assert_eq!(o.version, 2);
    assert_eq!(o.events.len(), 1);
    assert_eq!(o.events[0].event_type, "user.profile.updated");
    assert_eq!(o.events[0].sequence, 2);
    assert_eq!(o.events[0].position, v1.len() as u64 + 1);

    // A fresh handler (no cached state) folds the same state from the store.
    let (user, version) = tektree_commands::CommandHandler::new(app.store.clone())
        .load::<User>(ada)
        .await
        .unwrap();
    assert_eq!(version, 2);
    assert_eq!(user.bio, "Historian of Rome");
    assert_eq!(user.preferences, prefs);

    // The store is never rewritten: the first event is still stored at version 1.
    let stored = app.store.load("user", ada).await.unwrap();
    assert_eq!(stored[0], v1[0]);
}

/// (b) The relay publishes version-1 outbox records upcast to version 2 (everything but
/// `event_version` and `payload` as stored) and marks exactly those records published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_stored_v1_records_as_v2_and_marks_them() {
    let v1 = fixture();
    let (_dir, path, _url) = store_with(&v1);
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    assert_eq!(store.outbox_backlog().await.unwrap(), 3);
    let bus = MemoryBus::new();

    let (stop, shutdown) = watch::channel(false);
    let cfg = RelayConfig {
        batch: 2,
        idle_poll: Duration::from_millis(10),
    };
    let relay = tokio::spawn(relay::run(
        store.clone(),
        Arc::new(bus.clone()),
        cfg,
        None,
        shutdown,
    ));
    let got = read_bus(&bus, "test.observer", v1.len()).await;
    stop.send(true).unwrap();
    tokio::time::timeout(DEADLINE, relay)
        .await
        .expect("relay stops on shutdown")
        .unwrap()
        .unwrap();

    let published: Vec<EventEnvelope> = got.into_iter().map(|d| d.envelope).collect();
    let want: Vec<EventEnvelope> = v1.iter().map(as_v2).collect();
    assert_eq!(published, want);
    for e in &published {
        assert_eq!(e.event_version, 2);
        assert_eq!(e.payload["preferences"]["language"], "en");
        e.decode().unwrap();
    }
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    assert!(store.outbox_pending(10).await.unwrap().is_empty());
    // Still stored at version 1.
    assert_eq!(store.read_all(0, 10).await.unwrap(), v1);
}

/// (b) A record this build cannot upcast (a newer version, an unknown type) is published
/// unchanged and marked, not dropped and not blocking the records behind it; consumers then
/// treat it as poison (dead-lettered after `max_deliver` attempts), as any undecodable event,
/// and `tektree-replay events` shows it as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_records_it_cannot_upcast_unchanged_and_consumers_poison_them() {
    let v1 = fixture();
    // Written by a hypothetical newer build: `user.registered` v3, and a type unknown here.
    let mut newer = v1[1].clone();
    newer.event_version = 3;
    newer.payload["handle"] = Value::from("zoe");
    let mut unknown = v1[2].clone();
    unknown.event_type = "user.deactivated".into();
    unknown.payload = serde_json::json!({"user_id": unknown.aggregate_id});
    let rows = vec![newer.clone(), unknown.clone(), v1[0].clone()];
    let rows: Vec<EventEnvelope> = rows
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.position = i as u64 + 1;
            e
        })
        .collect();
    let (_dir, _path, url) = store_with(&rows);
    let app = App::open(&url, "memory", Rules::default()).await.unwrap();

    assert_eq!(
        relay_once(app.store.as_ref(), app.bus.as_ref(), 10)
            .await
            .unwrap(),
        3
    );
    assert_eq!(app.store.outbox_backlog().await.unwrap(), 0);
    let got = read_bus(app.bus.as_ref(), "test.observer", 3).await;
    let published: Vec<EventEnvelope> = got.iter().map(|d| d.envelope.clone()).collect();
    assert_eq!(
        published,
        vec![rows[0].clone(), rows[1].clone(), as_v2(&rows[2])]
    );

    // `tektree-replay events` shows them the same way.
    let all = EventSelection::After {
        after: 0,
        limit: 10,
    };
    assert_eq!(
        events(app.store.as_ref(), &all, EventForm::Upcast)
            .await
            .unwrap(),
        published
    );

    let xp = app.consumer("xp").unwrap();
    let outcome = tektree_services::worker::process(&app, xp.as_ref(), &got, &[])
        .await
        .unwrap();
    match &outcome[..] {
        [Processed::Poison(a), Processed::Poison(b), Processed::Applied] => {
            assert!(a.contains("unsupported event_version 3"), "{a}");
            assert!(b.contains("unknown event type"), "{b}");
        }
        other => panic!("{other:?}"),
    }
}

/// (b), (c), (d) The whole pipeline over the stored version-1 users: the relay's bus carries
/// them as version 2; the policies award registration XP and open Free subscriptions; then
/// `tektree-replay events` shows them upcast (stored with `--stored`) and a rebuild of `xp`
/// equals the live read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_and_replay_see_stored_v1_users_as_v2() {
    let v1 = fixture();
    let (_dir, _path, url) = store_with(&v1);
    let app = App::open(&url, "memory", Rules::default()).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    app.settle(DEADLINE).await.unwrap();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}

    // (b) Every stored event went through the relay; the fixture's as version 2.
    let head = app.store.head().await.unwrap();
    assert!(
        head.position > v1.len() as u64,
        "the policies appended events"
    );
    let on_bus = read_bus(app.bus.as_ref(), "test.observer", head.position as usize).await;
    let stored = app.store.read_all(0, 10_000).await.unwrap();
    assert_eq!(on_bus.len(), stored.len());
    for (d, s) in on_bus.iter().zip(&stored) {
        if s.position <= v1.len() as u64 {
            assert_eq!(s, &v1[s.position as usize - 1], "stored unchanged");
            assert_eq!(d.envelope, as_v2(s));
        } else {
            assert_eq!(&d.envelope, s, "current events are published as stored");
        }
    }

    // (c) The policies and projections consumed them.
    for e in &v1 {
        let id = e.aggregate_id;
        let xp = app.read_models.user_xp(id).await.unwrap().expect("xp row");
        assert_eq!(xp.xp, 1, "registration earns 1 XP");
        let (sub, _) = app.handler.load::<Subscription>(id).await.unwrap();
        assert_eq!(sub.tier, Some(Tier::Free));
        let (user, _) = app.handler.load::<User>(id).await.unwrap();
        assert_eq!(user.preferences, Preferences::default());
    }

    // (d) `tektree-replay events`: upcast by default, as stored with `--stored`.
    let all = EventSelection::After {
        after: 0,
        limit: 10_000,
    };
    let upcast = events(app.store.as_ref(), &all, EventForm::default())
        .await
        .unwrap();
    assert_eq!(
        upcast,
        on_bus
            .iter()
            .map(|d| d.envelope.clone())
            .collect::<Vec<_>>()
    );
    let as_stored = events(app.store.as_ref(), &all, EventForm::Stored)
        .await
        .unwrap();
    assert_eq!(as_stored, stored);
    assert_eq!(as_stored[..v1.len()], v1[..]);
    let grace = v1[2].aggregate_id;
    let one = EventSelection::Aggregate {
        aggregate_type: "user".into(),
        aggregate_id: grace,
    };
    assert_eq!(
        events(app.store.as_ref(), &one, EventForm::Upcast)
            .await
            .unwrap(),
        vec![as_v2(&v1[2])]
    );
    assert_eq!(
        events(app.store.as_ref(), &one, EventForm::Stored)
            .await
            .unwrap(),
        vec![v1[2].clone()]
    );

    // (d) A rebuild of `xp` from the store gives the live read model back.
    let live = app
        .read_models
        .export(ReadModel::Xp, None, 10_000)
        .await
        .unwrap()
        .rows;
    assert_eq!(live.len(), v1.len());
    let n = rebuild(
        app.store.as_ref(),
        app.read_models.as_ref(),
        Projection::Xp,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(n, head.position);
    assert_eq!(
        app.read_models
            .export(ReadModel::Xp, None, 10_000)
            .await
            .unwrap()
            .rows,
        live
    );
}
