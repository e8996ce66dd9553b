//! The bus conformance suite and Redis-specific behaviour against a real `redis-server`
//! (started per test by `test_support`, or `TEKTREE_TEST_REDIS_URL`).

use std::sync::Arc;
use std::time::Duration;

use tektree_outbox::test_support::{unique_stream_key, RedisServer};
use tektree_outbox::{conformance, Bus, BusError, RedisBus, SubscriptionOptions};

async fn bus(server: &RedisServer) -> Arc<dyn Bus> {
    Arc::new(
        RedisBus::with_stream(&server.url, unique_stream_key())
            .await
            .expect("connecting to the test redis"),
    )
}

#[tokio::test]
async fn redis_publish_dedups_by_position() {
    let server = RedisServer::start();
    conformance::publish_dedups_by_position(bus(&server).await).await;
}

#[tokio::test]
async fn redis_every_group_sees_every_event() {
    let server = RedisServer::start();
    conformance::every_group_sees_every_event(bus(&server).await).await;
}

#[tokio::test]
async fn redis_consumers_share_a_group() {
    let server = RedisServer::start();
    conformance::consumers_share_a_group(bus(&server).await).await;
}

#[tokio::test]
async fn redis_acked_deliveries_never_return() {
    let server = RedisServer::start();
    conformance::acked_deliveries_never_return(bus(&server).await).await;
}

#[tokio::test]
async fn redis_dead_consumer_is_reclaimed() {
    let server = RedisServer::start();
    conformance::dead_consumer_is_reclaimed(bus(&server).await).await;
}

#[tokio::test]
async fn redis_own_pending_is_reclaimed_after_restart() {
    let server = RedisServer::start();
    conformance::own_pending_is_reclaimed_after_restart(bus(&server).await).await;
}

#[tokio::test]
async fn redis_per_consumer_position_order() {
    let server = RedisServer::start();
    conformance::per_consumer_position_order(bus(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publish_wakes_a_blocked_consumer() {
    let server = RedisServer::start();
    conformance::publish_wakes_a_blocked_consumer(bus(&server).await).await;
}

/// The whole suite, one after another on one server (each check on its own stream key), as
/// another crate would run it.
#[tokio::test]
async fn redis_run_all_on_one_server() {
    let server = RedisServer::start();
    let url = server.url.clone();
    conformance::run_all(|| {
        let url = url.clone();
        async move {
            Arc::new(
                RedisBus::with_stream(&url, unique_stream_key())
                    .await
                    .unwrap(),
            ) as Arc<dyn Bus>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_concurrent_publishers_store_each_position_once() {
    let server = RedisServer::start();
    let key = unique_stream_key();
    let mut tasks = Vec::new();
    for publisher in 0..4u64 {
        let bus = RedisBus::with_stream(&server.url, &key).await.unwrap();
        tasks.push(tokio::spawn(async move {
            // Overlapping, growing batches, each publisher starting at a different offset.
            for end in (5 + publisher..=60).step_by(5) {
                bus.publish(&conformance::envelopes(end.saturating_sub(12).max(1)..=end))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let bus: Arc<dyn Bus> = Arc::new(RedisBus::with_stream(&server.url, &key).await.unwrap());
    assert_eq!(bus.last_published().await.unwrap(), 60);
    let mut sub = bus
        .subscribe(SubscriptionOptions::new("g", "c"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let batch = sub.next_batch(100, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            break;
        }
        seen.extend(batch.iter().map(|d| d.envelope.position));
    }
    assert_eq!(seen, (1..=60).collect::<Vec<_>>());
}

#[tokio::test]
async fn redis_undecodable_message_is_a_decode_error_and_can_be_skipped() {
    let server = RedisServer::start();
    let key = unique_stream_key();
    let bus = RedisBus::with_stream(&server.url, &key).await.unwrap();
    bus.publish(&conformance::envelopes(1..=2)).await.unwrap();
    // A foreign message at position 3.
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("3-0")
        .arg("envelope")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    bus.publish(&conformance::envelopes(4..=5)).await.unwrap();

    let mut sub = bus
        .subscribe(SubscriptionOptions::new("g", "c"))
        .await
        .unwrap();
    let first = sub.next_batch(10, Duration::ZERO).await.unwrap();
    assert_eq!(
        first
            .iter()
            .map(|d| d.envelope.position)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    match sub.next_batch(10, Duration::ZERO).await {
        Err(BusError::Decode { id, .. }) => {
            assert_eq!(id, "3-0");
            // The consumer skips it (a dead-letter policy is the caller's) by acknowledging it.
            sub.ack(&[id]).await.unwrap();
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let rest = sub.next_batch(10, Duration::ZERO).await.unwrap();
    assert_eq!(
        rest.iter().map(|d| d.envelope.position).collect::<Vec<_>>(),
        [4, 5]
    );
    let ids: Vec<String> = first.iter().chain(&rest).map(|d| d.id.clone()).collect();
    assert_eq!(ids, ["1-0", "2-0", "4-0", "5-0"]);
    sub.ack(&ids).await.unwrap();
}

#[tokio::test]
async fn redis_open_bus_and_unreachable_server() {
    let server = RedisServer::start();
    // `open_bus` and `connect` use the default stream key.
    let bus = tektree_outbox::open_bus(&server.url).await.unwrap();
    let direct = RedisBus::connect(&server.url).await.unwrap();
    assert_eq!(direct.stream_key(), tektree_outbox::DEFAULT_STREAM);
    // (A server from TEKTREE_TEST_REDIS_URL may already have events on that key.)
    let next = direct.last_published().await.unwrap() + 1;
    bus.publish(&conformance::envelopes([next])).await.unwrap();
    assert!(direct.last_published().await.unwrap() >= next);

    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match RedisBus::connect(&format!("redis://127.0.0.1:{port}")).await {
        Err(BusError::Transport(_)) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[tokio::test]
async fn redis_server_gone_is_a_transport_error() {
    if std::env::var_os(tektree_outbox::test_support::REDIS_URL_ENV).is_some() {
        return; // not our server to stop
    }
    let server = RedisServer::start();
    let bus = bus(&server).await;
    let mut sub = bus
        .subscribe(SubscriptionOptions::new("g", "c"))
        .await
        .unwrap();
    drop(server);
    assert!(matches!(
        bus.publish(&conformance::envelopes([1])).await,
        Err(BusError::Transport(_))
    ));
    assert!(matches!(
        sub.next_batch(1, Duration::from_millis(10)).await,
        Err(BusError::Transport(_))
    ));
}
