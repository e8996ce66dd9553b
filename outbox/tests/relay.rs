//! The outbox relay against a real SQLite event store, on the in-process bus and on a real
//! `redis-server`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tektree_domain::EventEnvelope;
use tektree_event_store::conformance::{sample_event, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::{EventStore, OutboxStore, SqliteStore};
use tektree_outbox::faulty::{BusFault, FaultyBus};
use tektree_outbox::relay::{self, relay_once, RelayConfig};
use tektree_outbox::test_support::{unique_stream_key, RedisServer};
use tektree_outbox::{
    Bus, BusError, Delivery, MemoryBus, RedisBus, Subscription, SubscriptionOptions,
};
use tokio::time::Instant;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(15);

/// A new SQLite store in its own temporary directory (kept alive by the returned guard).
fn store() -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db")).unwrap();
    (dir, Arc::new(store))
}

/// Appends `per_aggregate` events to each of `aggregates` new aggregates, interleaving the
/// aggregates; returns the committed envelopes in position order.
async fn append(
    store: &dyn EventStore,
    aggregates: usize,
    per_aggregate: u64,
) -> Vec<EventEnvelope> {
    let ids: Vec<Uuid> = (0..aggregates).map(|_| Uuid::new_v4()).collect();
    let mut committed = Vec::new();
    for sequence in 1..=per_aggregate {
        for id in &ids {
            committed.extend(
                store
                    .append(
                        SAMPLE_AGGREGATE_TYPE,
                        *id,
                        sequence - 1,
                        vec![sample_event(*id, sequence)],
                    )
                    .await
                    .unwrap(),
            );
        }
    }
    committed
}

/// Reads (and acknowledges) everything the group `group` gets until `want` deliveries or the
/// deadline.
async fn read_all(bus: &dyn Bus, group: &str, want: usize) -> Vec<Delivery> {
    let mut sub: Box<dyn Subscription> = bus
        .subscribe(SubscriptionOptions::new(group, "reader"))
        .await
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let batch = sub
            .next_batch(100, Duration::from_millis(50))
            .await
            .unwrap();
        let ids: Vec<String> = batch.iter().map(|d| d.id.clone()).collect();
        sub.ack(&ids).await.unwrap();
        got.extend(batch);
    }
    // Nothing beyond what was expected.
    assert!(
        sub.next_batch(100, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty(),
        "unexpected extra deliveries"
    );
    got
}

async fn relay_until_empty(store: &dyn EventStore, bus: &dyn Bus, batch: usize) -> usize {
    let mut total = 0;
    loop {
        let n = relay_once(store, bus, batch).await.unwrap();
        assert!(n <= batch);
        if n == 0 {
            return total;
        }
        total += n;
    }
}

#[tokio::test]
async fn relay_publishes_all_outbox_rows_in_order_and_marks_them() {
    let (_dir, store) = store();
    let bus = MemoryBus::new();
    assert_eq!(relay_once(store.as_ref(), &bus, 10).await.unwrap(), 0);
    let committed = append(store.as_ref(), 3, 4).await;
    assert_eq!(store.outbox_backlog().await.unwrap(), 12);

    assert_eq!(relay_until_empty(store.as_ref(), &bus, 5).await, 12);
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    assert!(store.outbox_pending(100).await.unwrap().is_empty());
    assert_eq!(
        bus.last_published().await.unwrap(),
        committed.last().unwrap().position
    );

    let got = read_all(&bus, "g", committed.len()).await;
    let envelopes: Vec<EventEnvelope> = got.into_iter().map(|d| d.envelope).collect();
    assert_eq!(
        envelopes, committed,
        "the bus carries the committed envelopes, in position order"
    );
}

#[tokio::test]
async fn relay_crash_after_publish_before_mark_leaves_no_duplicates() {
    let (_dir, store) = store();
    let bus = MemoryBus::new();
    crash_after_publish_before_mark(store.as_ref(), &bus).await;
}

#[tokio::test]
async fn relay_crash_after_publish_before_mark_leaves_no_duplicates_on_redis() {
    let server = RedisServer::start();
    let (_dir, store) = store();
    let bus = RedisBus::with_stream(&server.url, unique_stream_key())
        .await
        .unwrap();
    crash_after_publish_before_mark(store.as_ref(), &bus).await;
}

async fn crash_after_publish_before_mark(store: &dyn EventStore, bus: &dyn Bus) {
    let committed = append(store, 2, 5).await;
    // A relay round that published (part of) the outbox and died before marking it.
    let pending = store.outbox_pending(7).await.unwrap();
    bus.publish(&pending).await.unwrap();
    // The restarted relay publishes everything unmarked again.
    assert_eq!(relay_until_empty(store, bus, 4).await, committed.len());
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    let got = read_all(bus, "g", committed.len()).await;
    let positions: Vec<u64> = got.iter().map(|d| d.envelope.position).collect();
    let expected: Vec<u64> = committed.iter().map(|e| e.position).collect();
    assert_eq!(positions, expected, "each position exactly once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_run_end_to_end_on_redis() {
    let server = RedisServer::start();
    let (_dir, store) = store();
    let bus: Arc<dyn Bus> = Arc::new(
        RedisBus::with_stream(&server.url, unique_stream_key())
            .await
            .unwrap(),
    );
    let mut committed = append(store.as_ref(), 2, 3).await;

    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let cfg = RelayConfig {
        batch: 4,
        idle_poll: Duration::from_millis(10),
    };
    let relay = tokio::spawn(relay::run(store.clone(), bus.clone(), cfg, None, shutdown));
    // More events while the relay runs.
    committed.extend(append(store.as_ref(), 3, 2).await);

    let got = read_all(bus.as_ref(), "projection.test", committed.len()).await;
    let envelopes: Vec<EventEnvelope> = got.into_iter().map(|d| d.envelope).collect();
    assert_eq!(envelopes, committed);

    stop.send(true).unwrap();
    tokio::time::timeout(DEADLINE, relay)
        .await
        .expect("relay stops on shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

/// The first `failures` publishes fail after publishing a prefix of the batch.
struct FlakyPublish {
    failures: AtomicUsize,
}

#[async_trait]
impl BusFault for FlakyPublish {
    async fn publish_after(
        &self,
        inner: &dyn Bus,
        floor: u64,
        events: &[EventEnvelope],
    ) -> Result<(), BusError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            inner
                .publish_after(floor, &events[..events.len() / 2])
                .await?;
            return Err(BusError::Transport("injected failure".into()));
        }
        inner.publish_after(floor, events).await
    }
}

#[tokio::test]
async fn relay_run_retries_failed_publishes_without_skipping() {
    let (_dir, store) = store();
    let committed = append(store.as_ref(), 2, 5).await;
    let flaky = Arc::new(FaultyBus::new(
        Arc::new(MemoryBus::new()),
        FlakyPublish {
            failures: AtomicUsize::new(3),
        },
    ));

    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let cfg = RelayConfig {
        batch: 4,
        idle_poll: Duration::from_millis(10),
    };
    let relay = tokio::spawn(relay::run(
        store.clone(),
        flaky.clone(),
        cfg,
        None,
        shutdown,
    ));

    let got = read_all(flaky.inner.as_ref(), "g", committed.len()).await;
    let positions: Vec<u64> = got.iter().map(|d| d.envelope.position).collect();
    assert_eq!(
        positions,
        committed.iter().map(|e| e.position).collect::<Vec<_>>()
    );
    assert_eq!(
        flaky.fault.failures.load(Ordering::SeqCst),
        0,
        "the injected failures happened"
    );

    stop.send(true).unwrap();
    tokio::time::timeout(DEADLINE, relay)
        .await
        .expect("relay stops on shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

#[tokio::test]
async fn relay_run_stops_when_the_shutdown_sender_is_dropped() {
    let (_dir, store) = store();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn(relay::run(
        store,
        Arc::new(MemoryBus::new()),
        RelayConfig::default(),
        None,
        shutdown,
    ));
    drop(stop);
    tokio::time::timeout(DEADLINE, relay)
        .await
        .expect("relay stops")
        .unwrap()
        .unwrap();
}

/// What the relay publishes for each outbox record (stored v1 records with real SQLite rows:
/// services/tests/upcasting.rs).
#[test]
fn relay_publishes_older_versions_upcast_and_what_it_cannot_upcast_unchanged() {
    let id = Uuid::new_v4();
    let current = sample_event(id, 1).into_envelope(7, chrono::Utc::now());
    // Current version: published as stored.
    assert_eq!(relay::for_publishing(current.clone()), current);

    // `user.registered` v1, as builds before issue #6 stored it: published as v2 with default
    // preferences; position, ids, times and actor as stored.
    let mut v1 = current.clone();
    v1.event_version = 1;
    v1.payload = serde_json::json!({"user_id": id, "display_name": "Ada"});
    let published = relay::for_publishing(v1.clone());
    assert_eq!(published.event_version, 2);
    assert_eq!(
        published.payload,
        serde_json::json!({"user_id": id, "display_name": "Ada", "preferences":
            {"email_notifications": true, "weekly_digest": false, "language": "en",
             "profile_public": true}})
    );
    assert_eq!(
        EventEnvelope {
            event_version: 1,
            payload: v1.payload.clone(),
            ..published.clone()
        },
        v1
    );
    published.decode().unwrap();

    // A newer version or an unknown type (written by a newer build): published unchanged.
    let mut newer = current.clone();
    newer.event_version = 3;
    assert_eq!(relay::for_publishing(newer.clone()), newer);
    let mut unknown = current;
    unknown.event_type = "user.deactivated".into();
    assert_eq!(relay::for_publishing(unknown.clone()), unknown);
}

#[test]
fn relay_config_defaults() {
    let cfg = RelayConfig::default();
    assert_eq!(cfg.batch, 500);
    assert_eq!(cfg.idle_poll, Duration::from_millis(5));
}
