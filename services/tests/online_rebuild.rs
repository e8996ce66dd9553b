//! Zero-downtime rebuilds (issue #14 §5): every projection is rebuilt beside its live read
//! model while commands keep arriving, the relay and the workers keep running and queries
//! keep being answered; each switches once caught up. The result must equal a stopped-world
//! rebuild of the same store, a second rebuild must not make the policies fire again (the
//! store's head does not move), and no query may fail during the switch. On SQLite with the
//! in-process bus, Redis Streams and NATS JetStream, and on MongoDB (SecantusDB) with the
//! in-process bus — real servers started by the test.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::history::{register, user};
use common::{exports, log_to_test_output};
use tektree_commands::CommandMeta;
use tektree_domain::{Actor, Content, ContentCommand, Rules, VoteDirection};
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_projections::{Projection, RebuildPhase};
use tektree_services::app::App;
use tektree_services::replay::{rebuild, rebuild_beside};
use tektree_test_servers::MongoServer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

const USERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilds_beside_a_running_workload_equal_a_stopped_world_rebuild() {
    log_to_test_output();
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = |name: &str| format!("sqlite://{}", dir.path().join(name).display());
    for (store, bus) in [
        (sqlite("memory.db"), "memory".to_string()),
        (sqlite("redis.db"), redis.url.clone()),
        (sqlite("nats.db"), nats.url.clone()),
        (
            mongo.uri_with_database(&format!("tektree_rebuild_{}", std::process::id())),
            "memory".to_string(),
        ),
    ] {
        scenario(&store, &bus).await;
    }
}

/// Commands until `stop`: questions, answers and votes with fresh ids by the test users.
async fn workload(app: App, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let meta = || CommandMeta::new(Actor::importer(), chrono::Utc::now());
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let q = Uuid::new_v4();
        let cmd = ContentCommand::PostQuestion {
            question_id: q,
            author_id: Some(user(n % USERS)),
            title: format!("question {n}"),
            body: String::new(),
            tags: vec![format!("t{}", n % 3)],
            actor: Actor::importer(),
            area_id: None,
        };
        app.handler
            .execute::<Content>(q, cmd, &app.knowledge, &meta())
            .await
            .unwrap();
        let a = Uuid::new_v4();
        let cmd = ContentCommand::SubmitAnswer {
            answer_id: a,
            question_id: q,
            author_id: Some(user((n + 1) % USERS)),
            body: "answer".into(),
            actor: Actor::importer(),
        };
        app.handler
            .execute::<Content>(a, cmd, &app.knowledge, &meta())
            .await
            .unwrap();
        for v in 0..3 {
            let cmd = ContentCommand::Vote {
                content_id: a,
                voter_id: user((n + 2 + v) % USERS),
                direction: if v == 2 {
                    VoteDirection::Down
                } else {
                    VoteDirection::Up
                },
                actor: Actor::importer(),
            };
            app.handler
                .execute::<Content>(a, cmd, &app.knowledge, &meta())
                .await
                .unwrap();
        }
        n += 1;
        done.store(n as u64, Ordering::SeqCst);
    }
}

/// Queries until `stop`; every one must succeed (an error during a switch fails the test).
async fn reader(app: App, stop: Arc<AtomicBool>) -> u64 {
    let mut answered = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let rm = &app.read_models;
        rm.leaderboard("all-time", 10, 0).await.expect("page");
        rm.rank("all-time", user(1)).await.expect("rank");
        rm.user_xp(user(2)).await.expect("xp");
        rm.tag("t1").await.expect("tag");
        rm.quota(user(3), "2026-12").await.expect("quota");
        rm.checkpoints().await.expect("checkpoints");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    answered
}

/// Rebuilds `projection` of `app` beside its live read model, to the switch.
async fn rebuild_to_switch(
    app: &App,
    projection: Projection,
) -> Result<tektree_services::replay::BesideReport, tektree_services::replay::ReplayError> {
    rebuild_beside(
        app.store.as_ref(),
        app.read_models.as_ref(),
        projection,
        |_| std::ops::ControlFlow::Continue(()),
    )
    .await
}

/// The whole check on one store and bus.
async fn scenario(url: &str, bus: &str) {
    let what = format!("{url} on {bus}");
    let app = App::open(url, bus, Rules::default())
        .await
        .unwrap_or_else(|e| panic!("open {what}: {e}"));
    app.seed_in_process_bus().await.unwrap();
    let (shutdown, rx) = watch::channel(false);
    let mut pipeline = JoinSet::new();
    app.spawn_pipeline(rx, &mut pipeline);
    register(&app, 0..USERS).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(workload(app.clone(), stop.clone(), done.clone()));
    let reading = tokio::spawn(reader(app.clone(), stop.clone()));
    while done.load(Ordering::SeqCst) < 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every projection rebuilt beside the live one while commands arrive.
    for projection in Projection::ALL {
        let before = done.load(Ordering::SeqCst);
        let report = rebuild_to_switch(&app, projection)
            .await
            .unwrap_or_else(|e| panic!("{what}: rebuild {projection}: {e}"));
        assert!(report.switched, "{what}: {projection}");
        assert_eq!(report.resumed_from, 0);
        assert!(report.events > 0);
        // The workload kept going during the rebuild (it was not a stopped world).
        while done.load(Ordering::SeqCst) < before + 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let rebuilt = app.read_models.rebuilds().await.unwrap();
    assert_eq!(rebuilt.len(), 5, "{what}");
    assert!(rebuilt
        .iter()
        .all(|r| r.phase == RebuildPhase::Switched && r.generation == 1));
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let answered = reading.await.unwrap();
    assert!(answered > 0);
    app.settle(Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let live = exports(app.read_models.as_ref()).await.unwrap();
    let head = app.store.last_position().await.unwrap();

    // A second rebuild with nothing arriving: the same read models, and no policy fired again
    // (the store's head did not move).
    for projection in Projection::ALL {
        let report = rebuild_to_switch(&app, projection).await.unwrap();
        assert_eq!(
            (report.generation, report.events),
            (2, head),
            "{what}: {projection}"
        );
    }
    app.settle(Duration::from_secs(60)).await.unwrap();
    assert_eq!(app.store.last_position().await.unwrap(), head, "{what}");
    assert_eq!(
        exports(app.read_models.as_ref()).await.unwrap(),
        live,
        "{what}"
    );

    // The stopped world: workers stopped, every read model reset and replayed in place.
    shutdown.send(true).unwrap();
    while pipeline.join_next().await.is_some() {}
    for projection in Projection::ALL {
        rebuild(
            app.store.as_ref(),
            app.read_models.as_ref(),
            projection,
            |_| {},
        )
        .await
        .unwrap();
    }
    assert_eq!(
        exports(app.read_models.as_ref()).await.unwrap(),
        live,
        "{what}"
    );
}
