//! The same command history through every bus (in-process, Redis Streams, NATS JetStream —
//! real servers) gives identical read models, and a rebuild from the store gives them again.

use std::time::Duration;

use tektree_domain::Rules;
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_projections::{Projection, ReadModel};
use tektree_services::app::App;
use tektree_services::replay::rebuild;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod common;
use common::history::drive;

async fn exports(app: &App) -> Vec<Vec<serde_json::Value>> {
    let mut all = vec![];
    for m in [
        ReadModel::Xp,
        ReadModel::Leaderboard,
        ReadModel::Quota,
        ReadModel::Content,
        ReadModel::Tags,
    ] {
        all.push(app.read_models.export(m, None, 100_000).await.unwrap().rows);
    }
    all
}

async fn run(bus: &str) -> Vec<Vec<serde_json::Value>> {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, bus, Rules::default()).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    drive(&app).await;
    app.settle(Duration::from_secs(300)).await.unwrap();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let live = exports(&app).await;
    for p in Projection::ALL {
        rebuild(app.store.as_ref(), app.read_models.as_ref(), p, |_| {})
            .await
            .unwrap();
    }
    assert_eq!(exports(&app).await, live, "{bus}: rebuild equals live");
    live
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bus_gives_identical_read_models() {
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let memory = run("memory").await;
    assert!(memory.iter().all(|rows| !rows.is_empty()));
    assert_eq!(memory[0].len(), 6, "one xp row per registered user");
    assert_eq!(run(&redis.url).await, memory, "redis vs in-process");
    assert_eq!(run(&nats.url).await, memory, "nats vs in-process");
}

/// A process started while its bus is down (Redis restarting) waits for it instead of failing
/// (found by the fault harness); without patience it fails at once with a transport error.
#[tokio::test]
async fn opening_waits_for_a_bus_that_comes_up_later() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let port = tektree_outbox::test_support::restartable_port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = App::open(&store, &url, Rules::default()).await.err();
    assert!(
        matches!(
            err,
            Some(tektree_services::app::AppError::Bus(
                tektree_outbox::BusError::Transport(_)
            ))
        ),
        "{err:?}"
    );
    let data = dir.path().join("redis");
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        RedisServer::start_persistent_on(port, data).unwrap()
    });
    let app = App::open_waiting(&store, &url, Rules::default(), Duration::from_secs(60))
        .await
        .unwrap();
    let server = starter.join().unwrap();
    assert!(!app.in_process_bus);
    // The bus works: publishing the head (nothing) and reading the last published position.
    assert_eq!(app.bus.last_published().await.unwrap(), 0);
    drop(server);
}
