//! The bus conformance suite against [`MemoryBus`].

use std::sync::Arc;

use tektree_outbox::{conformance, Bus, MemoryBus};

fn bus() -> Arc<dyn Bus> {
    Arc::new(MemoryBus::new())
}

#[tokio::test]
async fn memory_publish_dedups_by_position() {
    conformance::publish_dedups_by_position(bus()).await;
}

#[tokio::test]
async fn memory_every_group_sees_every_event() {
    conformance::every_group_sees_every_event(bus()).await;
}

#[tokio::test]
async fn memory_consumers_share_a_group() {
    conformance::consumers_share_a_group(bus()).await;
}

#[tokio::test]
async fn memory_acked_deliveries_never_return() {
    conformance::acked_deliveries_never_return(bus()).await;
}

#[tokio::test]
async fn memory_dead_consumer_is_reclaimed() {
    conformance::dead_consumer_is_reclaimed(bus()).await;
}

#[tokio::test]
async fn memory_own_pending_is_reclaimed_after_restart() {
    conformance::own_pending_is_reclaimed_after_restart(bus()).await;
}

#[tokio::test]
async fn memory_per_consumer_position_order() {
    conformance::per_consumer_position_order(bus()).await;
}

#[tokio::test]
async fn memory_store_binding_is_set_once() {
    conformance::store_binding_is_set_once(bus()).await;
}

#[tokio::test]
async fn memory_emptying_for_a_restore() {
    conformance::emptying_for_a_restore(bus()).await;
}

#[tokio::test]
async fn memory_bus_carries_one_store() {
    conformance::a_bus_carries_one_store(bus()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_publish_wakes_a_blocked_consumer() {
    conformance::publish_wakes_a_blocked_consumer(bus()).await;
}

#[tokio::test]
async fn memory_clones_share_one_log() {
    let a = MemoryBus::new();
    let b = a.clone();
    a.publish(&conformance::envelopes(1..=2)).await.unwrap();
    assert_eq!(b.last_published().await.unwrap(), 2);
}

#[tokio::test]
async fn open_bus_memory_and_invalid_url() {
    let bus = tektree_outbox::open_bus("memory").await.unwrap();
    assert_eq!(bus.last_published().await.unwrap(), 0);
    match tektree_outbox::open_bus("kafka://localhost").await {
        Err(tektree_outbox::BusError::InvalidUrl(url)) => assert_eq!(url, "kafka://localhost"),
        Err(e) => panic!("expected InvalidUrl, got {e}"),
        Ok(_) => panic!("expected InvalidUrl, got a bus"),
    }
}
