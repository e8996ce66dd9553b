//! Issue #12 §1: a bus carries one store. Two SQLite stores pointed at one Redis (and at one
//! NATS server): the first binds the bus; the second is refused — by `App::open` and by the
//! `tektree` binary — with an error naming both store ids, before it publishes anything, while
//! the first goes on publishing and consuming.

use std::process::Command;
use std::time::{Duration, Instant};

use tektree_domain::Rules;
use tektree_event_store::conformance::{sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_outbox::binding::BindError;
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_services::app::{App, AppError};
use uuid::Uuid;

/// Store `name` in `dir`, with three events appended (positions 1–3, unpublished).
async fn store_with_events(dir: &std::path::Path, name: &str) -> String {
    let url = format!("sqlite://{}", dir.join(name).display());
    let app = App::open(&url, "memory", Rules::default()).await.unwrap();
    let id = Uuid::new_v4();
    app.store
        .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 3))
        .await
        .unwrap();
    url
}

async fn two_stores_on_one_bus(bus: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (a_url, b_url) = (
        store_with_events(dir.path(), "a.db").await,
        store_with_events(dir.path(), "b.db").await,
    );
    let a = App::open(&a_url, bus, Rules::default()).await.unwrap();
    let a_id = a.store.identity().await.unwrap();
    tektree_outbox::relay_once(a.store.as_ref(), a.bus.as_ref(), 100)
        .await
        .unwrap();
    assert_eq!(a.bus.last_published().await.unwrap(), 3, "{bus}");

    let refused = App::open(&b_url, bus, Rules::default()).await.err();
    let Some(AppError::Binding(BindError::ForeignStore { bound, ours })) = refused else {
        panic!("{bus}: store b opened a's bus: {refused:?}");
    };
    assert_eq!(bound, a_id, "{bus}");
    let text = AppError::Binding(BindError::ForeignStore { bound, ours }).to_string();
    assert!(
        text.contains(&a_id.store_id.to_string()) && text.contains(&ours.store_id.to_string()),
        "{bus}: {text}"
    );
    assert!(text.contains("docs/operations.md"), "{text}");

    // The binary refuses too, at start, and names both stores.
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tektree"))
        .args(["--store", &b_url, "--bus", bus, "relay"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{bus}: tektree relay on b: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "{bus}");
    assert!(
        stderr.contains(&a_id.store_id.to_string()) && stderr.contains(&ours.store_id.to_string()),
        "{bus}: {stderr}"
    );
    // Nothing of b's reached the bus; a goes on.
    assert_eq!(a.bus.last_published().await.unwrap(), 3, "{bus}");
    let last = a.bus.last_event().await.unwrap().unwrap();
    assert_eq!(
        a.store.read_all(2, 1).await.unwrap()[0].event_id,
        last.event_id,
        "{bus}: the bus's event at 3 is a's"
    );
    let id = Uuid::new_v4();
    a.store
        .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 2))
        .await
        .unwrap();
    tektree_outbox::relay_once(a.store.as_ref(), a.bus.as_ref(), 100)
        .await
        .unwrap();
    assert_eq!(a.bus.last_published().await.unwrap(), 5, "{bus}");
    // Reopening a is fine.
    App::open(&a_url, bus, Rules::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_is_refused_on_redis() {
    let redis = RedisServer::start();
    two_stores_on_one_bus(&redis.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_is_refused_on_nats() {
    let nats = NatsServer::start();
    two_stores_on_one_bus(&nats.url).await;
}
