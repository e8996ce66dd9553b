//! Issue #12 §3–4: a broker that lost its data — Redis flushed (`FLUSHALL`), the NATS events
//! stream deleted — is detected by the relay (the bus ends below what the store marked
//! published) and by the consumers (their group or stream is gone), and what the consumers had
//! not applied is republished from the store: every read model ends equal to a rebuild from the
//! store (nothing lost, nothing applied twice), with a log line and a metric for the loss.

use std::time::{Duration, Instant};

use tektree_domain::Rules;
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_outbox::DEFAULT_NATS_STREAM;
use tektree_projections::Projection;
use tektree_services::app::App;
use tektree_services::replay::rebuild;
use tektree_services::worker::WorkerConfig;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod common;
use common::exports;
use common::history::drive;

const SETTLE: Duration = Duration::from_secs(60);

/// Deletes everything the broker at `bus` holds for the app's bus.
async fn wipe(bus: &str) {
    if bus.starts_with("redis://") {
        let client = redis::Client::open(bus).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    } else {
        let client = async_nats::connect(bus).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.delete_stream(DEFAULT_NATS_STREAM).await.unwrap();
    }
}

/// Polls `check` every 20 ms until it holds; panics after `SETTLE`.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < SETTLE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the pipeline, then checks that every read model equals a rebuild from the store.
async fn assert_rebuild_equals_live(app: &App, bus: &str, what: &str) {
    let live = exports(app.read_models.as_ref()).await.unwrap();
    assert!(
        live.values().all(|rows| !rows.is_empty()),
        "{bus} {what}: {live:?}"
    );
    for p in Projection::ALL {
        rebuild(app.store.as_ref(), app.read_models.as_ref(), p, |_| {})
            .await
            .unwrap();
    }
    let rebuilt = exports(app.read_models.as_ref()).await.unwrap();
    assert!(
        rebuilt == live,
        "{bus} {what}: live read models differ from a rebuild"
    );
}

async fn stop(stop: watch::Sender<bool>, mut tasks: JoinSet<()>) {
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
}

/// The whole history is published while no consumer runs, then the broker loses it; consumers
/// started afterwards still get every event, republished by the relay.
async fn lost_before_the_consumers_read_it(bus: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, bus, Rules::default()).await.unwrap();
    let (stopper, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_relay(stopped.clone(), &mut tasks);
    drive(&app).await;
    until("the outbox to empty", || async {
        app.store.outbox_backlog().await.unwrap() == 0
    })
    .await;
    let head = app.store.head().await.unwrap().position;
    assert_eq!(app.bus.last_published().await.unwrap(), head, "{bus}");

    wipe(bus).await;
    for c in app.consumers() {
        app.spawn_consumer(c, WorkerConfig::default(), stopped.clone(), &mut tasks);
    }
    app.settle(SETTLE).await.unwrap();
    assert!(
        app.bus.last_published().await.unwrap() >= head,
        "{bus}: the bus holds the history again"
    );
    // The binding the broker lost is back.
    let bound = app.bus.bound_store().await.unwrap();
    assert_eq!(bound, Some(app.store.identity().await.unwrap()), "{bus}");
    stop(stopper, tasks).await;
    assert_rebuild_equals_live(&app, bus, "lost before read").await;
}

/// The broker loses its data twice while the pipeline runs: in the middle of the history and
/// after everything settled.
async fn lost_while_running(bus: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, bus, Rules::default()).await.unwrap();
    let (stopper, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    let wiper = {
        let (app, bus) = (app.clone(), bus.to_string());
        tokio::spawn(async move {
            until("40 events on the bus", || async {
                app.bus.last_published().await.unwrap_or(0) >= 40
            })
            .await;
            wipe(&bus).await;
        })
    };
    drive(&app).await;
    wiper.await.unwrap();
    if let Err(e) = app.settle(SETTLE).await {
        panic!("{bus}: {e}");
    }

    wipe(bus).await;
    let head = app.store.head().await.unwrap().position;
    until("the bus to end at the head again", || async {
        app.bus.last_published().await.unwrap_or(0) >= head
    })
    .await;
    app.settle(SETTLE).await.unwrap();
    stop(stopper, tasks).await;
    assert_rebuild_equals_live(&app, bus, "lost while running").await;
}

/// The sum of every series of `metric` on the process's metrics page.
fn counter(metric: &str) -> f64 {
    tektree_services::api::metrics::render()
        .lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const COUNTED: [&str; 3] = [
    "tektree_bus_losses_total",
    "tektree_relay_republished_total",
    "tektree_bus_recreated_total",
];

/// Both cases, each on a broker of its own (`url` of a fresh server, kept alive by `keep`);
/// each loss is counted.
async fn broker_loss<S>(what: &str, mut start: impl FnMut() -> (S, String)) {
    let before: Vec<f64> = COUNTED.iter().map(|m| counter(m)).collect();
    let (server, url) = start();
    lost_before_the_consumers_read_it(&url).await;
    drop(server);
    let (server, url) = start();
    lost_while_running(&url).await;
    drop(server);
    for (metric, before) in COUNTED.iter().zip(&before) {
        assert!(counter(metric) > *before, "{what}: {metric} did not grow");
    }
    // Three wipes, each found once or more (a wipe can be seen by the idle check and again by
    // a round that started before the republish ended).
    assert!(
        counter(COUNTED[0]) >= before[0] + 3.0,
        "{what}: {} losses counted for 3 wipes",
        counter(COUNTED[0]) - before[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flushed_redis_or_a_deleted_nats_stream_loses_nothing() {
    tektree_services::api::metrics::handle();
    common::log_to_test_output();
    broker_loss("redis", || {
        let s = RedisServer::start();
        let url = s.url.clone();
        (s, url)
    })
    .await;
    broker_loss("nats", || {
        let s = NatsServer::start();
        let url = s.url.clone();
        (s, url)
    })
    .await;
}
