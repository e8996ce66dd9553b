//! Bus conformance suite: the behaviour every [`Bus`] adapter must show (the delivery contract
//! in the crate docs and on [`Bus`] / [`Subscription`]).
//!
//! Each check is a plain `async fn` taking a **new, empty** bus (a fresh [`crate::MemoryBus`],
//! a [`crate::RedisBus`] on a [`crate::test_support::unique_stream_key`], …) and panics with a
//! message prefixed `conformance::<check>` on the first violation. An adapter's tests call each
//! check from its own `#[tokio::test]` (multi-threaded or not):
//!
//! ```no_run
//! # async fn demo() {
//! let bus = std::sync::Arc::new(tektree_outbox::MemoryBus::new());
//! tektree_outbox::conformance::publish_dedups_by_position(bus).await;
//! # }
//! ```
//!
//! Checks that involve reclaiming use a `min_idle` of [`SHORT_MIN_IDLE`] and wait for it in
//! bounded polling loops (up to [`DEADLINE`]); none asserts wall-clock durations.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tektree_domain::{Actor, EventEnvelope};
use tokio::time::Instant;
use uuid::Uuid;

use tektree_event_store::{EventLog, SqliteStore, StoreIdentity};

use crate::bus::{Bus, Delivery, Subscription, SubscriptionOptions};

/// `min_idle` used by the reclaim checks.
pub const SHORT_MIN_IDLE: Duration = Duration::from_millis(200);
/// Longest any check waits for deliveries it expects.
pub const DEADLINE: Duration = Duration::from_secs(15);
/// `block` passed to [`Subscription::next_batch`] in polling loops.
const POLL_BLOCK: Duration = Duration::from_millis(50);
/// Shortest watch for acknowledged deliveries coming back in [`acked_deliveries_never_return`].
pub const ACKED_WATCH: Duration = Duration::from_secs(3);
/// `block` of the consumer that [`publish_wakes_a_blocked_consumer`] keeps waiting.
pub const LONG_BLOCK: Duration = Duration::from_secs(10);
/// Longest time from a publish to its arrival at a consumer blocked in `next_batch`.
pub const WAKE_WITHIN: Duration = Duration::from_secs(2);

/// A test envelope at `position`: event type `test.event`, aggregate `test`/a fixed id,
/// `sequence` = `position`, actor `system:test`, fixed millisecond-precision timestamps, and a
/// payload `{"n": position, "text": …}` with non-ASCII text and JSON metacharacters (to
/// exercise the round trip).
pub fn envelope(position: u64) -> EventEnvelope {
    let at: DateTime<Utc> =
        DateTime::from_timestamp(1_714_979_289, 123_000_000).unwrap_or_default();
    EventEnvelope {
        event_id: Uuid::from_u64_pair(0x7465_6b74_7265_6500, position),
        event_type: "test.event".into(),
        event_version: 1,
        aggregate_type: "test".into(),
        aggregate_id: Uuid::from_u64_pair(0x7465_6b74_7265_6501, 1),
        sequence: position,
        position,
        occurred_at: at,
        recorded_at: at,
        correlation_id: Uuid::from_u64_pair(0x7465_6b74_7265_6502, position),
        causation_id: Uuid::from_u64_pair(0x7465_6b74_7265_6503, position),
        actor: Actor::System("test".into()),
        payload: serde_json::json!({ "n": position, "text": format!("Zoë \"#{position}\" \\ 🌳") }),
    }
}

/// [`envelope`] for each position of `positions`, in that order.
pub fn envelopes(positions: impl IntoIterator<Item = u64>) -> Vec<EventEnvelope> {
    positions.into_iter().map(envelope).collect()
}

/// Subscribes `consumer` to `group` with `min_idle`.
async fn subscribe(
    bus: &Arc<dyn Bus>,
    check: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
) -> Box<dyn Subscription> {
    let mut options = SubscriptionOptions::new(group, consumer);
    options.min_idle = min_idle;
    bus.subscribe(options)
        .await
        .unwrap_or_else(|e| panic!("conformance::{check}: subscribe {group}/{consumer}: {e}"))
}

async fn next(
    sub: &mut Box<dyn Subscription>,
    check: &str,
    max: usize,
    block: Duration,
) -> Vec<Delivery> {
    let got = sub
        .next_batch(max, block)
        .await
        .unwrap_or_else(|e| panic!("conformance::{check}: next_batch: {e}"));
    assert!(
        got.len() <= max,
        "conformance::{check}: next_batch({max}) returned {} deliveries",
        got.len()
    );
    got
}

async fn ack(sub: &mut Box<dyn Subscription>, check: &str, deliveries: &[Delivery]) {
    let ids: Vec<String> = deliveries.iter().map(|d| d.id.clone()).collect();
    sub.ack(&ids)
        .await
        .unwrap_or_else(|e| panic!("conformance::{check}: ack: {e}"));
}

async fn publish(bus: &Arc<dyn Bus>, check: &str, events: &[EventEnvelope]) {
    bus.publish(events)
        .await
        .unwrap_or_else(|e| panic!("conformance::{check}: publish: {e}"));
}

/// Reads (and acknowledges) until `want` deliveries arrived or [`DEADLINE`] passed.
async fn collect(
    sub: &mut Box<dyn Subscription>,
    check: &str,
    want: usize,
    max: usize,
) -> Vec<Delivery> {
    let deadline = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let batch = next(sub, check, max, POLL_BLOCK).await;
        ack(sub, check, &batch).await;
        got.extend(batch);
    }
    got
}

fn positions(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(|d| d.envelope.position).collect()
}

fn assert_increasing(check: &str, who: &str, positions: &[u64]) {
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "conformance::{check}: {who} saw positions out of order: {positions:?}"
    );
}

/// Publishing delivers events in position order, once each, unchanged: republishing a batch,
/// overlapping batches, and events at or below the highest published position are dropped;
/// gaps in positions are allowed. [`Bus::last_published`] follows the highest position.
pub async fn publish_dedups_by_position(bus: Arc<dyn Bus>) {
    const C: &str = "publish_dedups_by_position";
    assert_eq!(
        bus.last_published().await.expect("last_published"),
        0,
        "conformance::{C}: a new bus must be empty"
    );
    publish(&bus, C, &[]).await;
    publish(&bus, C, &envelopes(1..=5)).await;
    assert_eq!(
        bus.last_published().await.expect("last_published"),
        5,
        "conformance::{C}"
    );
    publish(&bus, C, &envelopes(1..=5)).await; // the same batch again
    publish(&bus, C, &envelopes(3..=8)).await; // overlapping
    publish(&bus, C, &envelopes([10, 12])).await; // a gap
    publish(&bus, C, &envelopes([9, 11])).await; // both at or below 12: dropped
    publish(&bus, C, &envelopes([12, 13])).await; // 12 dropped, 13 new
    assert_eq!(
        bus.last_published().await.expect("last_published"),
        13,
        "conformance::{C}"
    );

    let mut sub = subscribe(&bus, C, "g", "c", Duration::from_secs(30)).await;
    let expected: Vec<u64> = (1..=8).chain([10, 12, 13]).collect();
    let got = collect(&mut sub, C, expected.len(), 4).await;
    assert_eq!(
        positions(&got),
        expected,
        "conformance::{C}: delivered positions"
    );
    for d in &got {
        assert_eq!(
            d.envelope,
            envelope(d.envelope.position),
            "conformance::{C}: envelope changed on the way"
        );
        assert_eq!(
            d.delivery_count, 1,
            "conformance::{C}: first delivery count"
        );
    }
    let ids: HashSet<&str> = got.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids.len(),
        got.len(),
        "conformance::{C}: message ids must be unique"
    );
    // Nothing more arrives.
    assert!(
        next(&mut sub, C, 10, POLL_BLOCK).await.is_empty(),
        "conformance::{C}: extra deliveries"
    );
}

/// Every consumer group sees every event, whether it subscribed before or after publishing
/// (a new group starts at the beginning of the log).
pub async fn every_group_sees_every_event(bus: Arc<dyn Bus>) {
    const C: &str = "every_group_sees_every_event";
    let mut early = subscribe(&bus, C, "early", "c", Duration::from_secs(30)).await;
    publish(&bus, C, &envelopes(1..=10)).await;
    let mut late = subscribe(&bus, C, "late", "c", Duration::from_secs(30)).await;
    publish(&bus, C, &envelopes(11..=20)).await;
    let all: Vec<u64> = (1..=20).collect();
    for (name, sub) in [("early", &mut early), ("late", &mut late)] {
        let got = collect(sub, C, all.len(), 7).await;
        assert_eq!(positions(&got), all, "conformance::{C}: group {name}");
    }
}

/// Two consumers of one group share its events: together they see each event exactly once
/// (both acknowledge at once, so nothing is reclaimed), each in position order.
pub async fn consumers_share_a_group(bus: Arc<dyn Bus>) {
    const C: &str = "consumers_share_a_group";
    publish(&bus, C, &envelopes(1..=30)).await;
    let mut a = subscribe(&bus, C, "g", "a", Duration::from_secs(30)).await;
    let mut b = subscribe(&bus, C, "g", "b", Duration::from_secs(30)).await;
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + DEADLINE;
    while seen_a.len() + seen_b.len() < 30 && Instant::now() < deadline {
        for (sub, seen) in [(&mut a, &mut seen_a), (&mut b, &mut seen_b)] {
            let batch = next(sub, C, 4, POLL_BLOCK).await;
            ack(sub, C, &batch).await;
            seen.extend(positions(&batch));
        }
    }
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "conformance::{C}: both consumers must get a share: a={seen_a:?} b={seen_b:?}"
    );
    assert_increasing(C, "consumer a", &seen_a);
    assert_increasing(C, "consumer b", &seen_b);
    let mut all: Vec<u64> = seen_a.iter().chain(&seen_b).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=30).collect::<Vec<_>>(),
        "conformance::{C}: union of both consumers (no loss, no duplicate)"
    );
    for sub in [&mut a, &mut b] {
        assert!(
            next(sub, C, 10, POLL_BLOCK).await.is_empty(),
            "conformance::{C}: extra deliveries"
        );
    }
}

/// Acknowledged deliveries are never handed out again, even after `min_idle`: the check watches
/// until the bus has handed out an unacknowledged delivery again (to another consumer of the
/// group), then as long again, and at least [`ACKED_WATCH`] (15 × [`SHORT_MIN_IDLE`]) in all.
pub async fn acked_deliveries_never_return(bus: Arc<dyn Bus>) {
    const C: &str = "acked_deliveries_never_return";
    publish(&bus, C, &envelopes(1..=5)).await;
    let mut first = subscribe(&bus, C, "g", "first", SHORT_MIN_IDLE).await;
    let got = {
        let deadline = Instant::now() + DEADLINE;
        let mut got = Vec::new();
        while got.len() < 5 && Instant::now() < deadline {
            got.extend(next(&mut first, C, 5 - got.len(), POLL_BLOCK).await);
        }
        got
    };
    assert_eq!(
        positions(&got),
        vec![1, 2, 3, 4, 5],
        "conformance::{C}: first read"
    );
    ack(&mut first, C, &got[..3]).await;
    drop(first);

    // 4 and 5 come back to `second` once idle; 1..=3 never do.
    let mut second = subscribe(&bus, C, "g", "second", SHORT_MIN_IDLE).await;
    let again = collect(&mut second, C, 2, 10).await;
    assert_eq!(
        positions(&again),
        vec![4, 5],
        "conformance::{C}: only the unacknowledged return"
    );
    for d in &again {
        assert!(
            d.delivery_count >= 2,
            "conformance::{C}: a reclaimed delivery must count ≥ 2, got {}",
            d.delivery_count
        );
    }
    // 1..=5 are acknowledged now. 6 is taken and left unacknowledged, and a third consumer
    // watches until the bus hands 6 out again, then as long again, and at least ACKED_WATCH in
    // all: the watch spans at least one redelivery by the bus, and nothing acknowledged may
    // come back during it.
    publish(&bus, C, &envelopes([6])).await;
    let mut held = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while held.is_empty() && Instant::now() < deadline {
        held = next(&mut second, C, 10, POLL_BLOCK).await;
    }
    assert_eq!(positions(&held), vec![6], "conformance::{C}: the new event");
    let mut watcher = subscribe(&bus, C, "g", "watcher", SHORT_MIN_IDLE).await;
    let started = Instant::now();
    let mut until = started + DEADLINE;
    let mut returned = None;
    let mut seen = Vec::new();
    while Instant::now() < until {
        let batch = next(&mut watcher, C, 10, POLL_BLOCK).await;
        ack(&mut watcher, C, &batch).await;
        seen.extend(positions(&batch));
        if returned.is_none() && seen.contains(&6) {
            let after = started.elapsed();
            returned = Some(after);
            until = (Instant::now() + after).max(started + ACKED_WATCH);
        }
    }
    assert!(
        returned.is_some(),
        "conformance::{C}: the unacknowledged 6 never returned within {DEADLINE:?}"
    );
    assert_eq!(
        seen,
        vec![6],
        "conformance::{C}: only the unacknowledged event may return (it did after {returned:?})"
    );
}

/// Deliveries a consumer took and never acknowledged (it "died") are handed to another
/// consumer of the group once idle for `min_idle`, with a delivery count ≥ 2; that consumer
/// first gets the new events (delivery count 1).
pub async fn dead_consumer_is_reclaimed(bus: Arc<dyn Bus>) {
    const C: &str = "dead_consumer_is_reclaimed";
    publish(&bus, C, &envelopes(1..=10)).await;
    let mut dead = subscribe(&bus, C, "g", "dead", SHORT_MIN_IDLE).await;
    let taken = next(&mut dead, C, 6, POLL_BLOCK).await;
    assert_eq!(
        positions(&taken),
        (1..=6).collect::<Vec<_>>(),
        "conformance::{C}: dead consumer's read"
    );
    drop(dead);

    let mut live = subscribe(&bus, C, "g", "live", SHORT_MIN_IDLE).await;
    let got = collect(&mut live, C, 10, 100).await;
    let mut all = positions(&got);
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=10).collect::<Vec<_>>(),
        "conformance::{C}: live consumer must end up with every event once"
    );
    for d in &got {
        let p = d.envelope.position;
        if p <= 6 {
            assert!(
                d.delivery_count >= 2,
                "conformance::{C}: reclaimed position {p} has delivery count {}",
                d.delivery_count
            );
        } else {
            assert_eq!(d.delivery_count, 1, "conformance::{C}: new position {p}");
        }
    }
    let new: Vec<u64> = got
        .iter()
        .filter(|d| d.delivery_count == 1)
        .map(|d| d.envelope.position)
        .collect();
    assert_increasing(C, "live consumer (new deliveries)", &new);
}

/// A consumer that restarts under the same name gets its own unacknowledged deliveries back
/// once idle for `min_idle`.
pub async fn own_pending_is_reclaimed_after_restart(bus: Arc<dyn Bus>) {
    const C: &str = "own_pending_is_reclaimed_after_restart";
    publish(&bus, C, &envelopes(1..=3)).await;
    let mut before = subscribe(&bus, C, "g", "worker", SHORT_MIN_IDLE).await;
    let taken = next(&mut before, C, 10, POLL_BLOCK).await;
    assert_eq!(
        positions(&taken),
        vec![1, 2, 3],
        "conformance::{C}: first read"
    );
    drop(before);
    let mut after = subscribe(&bus, C, "g", "worker", SHORT_MIN_IDLE).await;
    let got = collect(&mut after, C, 3, 10).await;
    assert_eq!(
        positions(&got),
        vec![1, 2, 3],
        "conformance::{C}: after restart"
    );
    assert!(
        got.iter().all(|d| d.delivery_count >= 2),
        "conformance::{C}: reclaimed deliveries count ≥ 2"
    );
}

/// Each consumer sees new deliveries in position order, also when publishing and reading
/// interleave and two consumers of one group alternate.
pub async fn per_consumer_position_order(bus: Arc<dyn Bus>) {
    const C: &str = "per_consumer_position_order";
    let mut a = subscribe(&bus, C, "g", "a", Duration::from_secs(30)).await;
    let mut b = subscribe(&bus, C, "g", "b", Duration::from_secs(30)).await;
    let mut solo = subscribe(&bus, C, "solo", "s", Duration::from_secs(30)).await;
    let (mut seen_a, mut seen_b, mut seen_solo) = (Vec::new(), Vec::new(), Vec::new());
    let mut next_position = 1u64;
    for round in 0..8u64 {
        let n = 1 + round % 4;
        publish(&bus, C, &envelopes(next_position..next_position + n)).await;
        next_position += n;
        for (sub, seen, max) in [
            (&mut a, &mut seen_a, 2),
            (&mut b, &mut seen_b, 3),
            (&mut solo, &mut seen_solo, 3),
        ] {
            let batch = next(sub, C, max, Duration::ZERO).await;
            ack(sub, C, &batch).await;
            seen.extend(positions(&batch));
        }
    }
    let total = next_position - 1;
    // Drain what is left.
    let deadline = Instant::now() + DEADLINE;
    while (seen_a.len() + seen_b.len()) < total as usize && Instant::now() < deadline {
        for (sub, seen) in [(&mut a, &mut seen_a), (&mut b, &mut seen_b)] {
            let batch = next(sub, C, 5, POLL_BLOCK).await;
            ack(sub, C, &batch).await;
            seen.extend(positions(&batch));
        }
    }
    seen_solo.extend(positions(
        &collect(&mut solo, C, total as usize - seen_solo.len(), 5).await,
    ));
    assert_increasing(C, "consumer a", &seen_a);
    assert_increasing(C, "consumer b", &seen_b);
    assert_eq!(
        seen_solo,
        (1..=total).collect::<Vec<_>>(),
        "conformance::{C}: single consumer sees all, in order"
    );
    let union: BTreeSet<u64> = seen_a.iter().chain(&seen_b).copied().collect();
    assert_eq!(
        union.len(),
        seen_a.len() + seen_b.len(),
        "conformance::{C}: duplicate between a and b"
    );
    assert_eq!(
        union,
        (1..=total).collect(),
        "conformance::{C}: union of a and b"
    );
}

/// A consumer blocked in `next_batch` is woken by a publish: the event reaches it within
/// [`WAKE_WITHIN`] of the publish, while the consumer's `block` is [`LONG_BLOCK`], so a bus
/// that answers only when the block runs out (or polls on a long period) fails. A bus may
/// return empty early; the consumer then waits again.
pub async fn publish_wakes_a_blocked_consumer(bus: Arc<dyn Bus>) {
    const C: &str = "publish_wakes_a_blocked_consumer";
    let mut sub = subscribe(&bus, C, "g", "c", Duration::from_secs(30)).await;
    let waiter = tokio::spawn(async move {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = next(&mut sub, C, 10, LONG_BLOCK).await;
            if !got.is_empty() || Instant::now() >= deadline {
                return (got, Instant::now());
            }
        }
    });
    // Long enough for the consumer to be waiting inside `next_batch`.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = Instant::now();
    publish(&bus, C, &envelopes([1])).await;
    let (got, arrived) = waiter.await.expect("waiter task");
    assert_eq!(positions(&got), vec![1], "conformance::{C}");
    let waited = arrived.duration_since(published);
    assert!(
        waited < WAKE_WITHIN,
        "conformance::{C}: the event arrived {waited:?} after its publish; a blocked consumer \
         must wake within {WAKE_WITHIN:?} (its block was {LONG_BLOCK:?})"
    );
}

/// A bus records one store binding and never replaces it; `last_event` is the event at the
/// highest published position.
///
/// # Panics
/// On any violation or bus error.
pub async fn store_binding_is_set_once(bus: Arc<dyn Bus>) {
    const C: &str = "store_binding_is_set_once";
    let a = StoreIdentity {
        store_id: Uuid::from_u128(0xa),
        epoch: 1,
    };
    let b = StoreIdentity {
        store_id: Uuid::from_u128(0xb),
        epoch: 1,
    };
    fn read<T>(r: Result<T, crate::BusError>) -> T {
        r.unwrap_or_else(|e| panic!("conformance::{C}: {e}"))
    }
    assert_eq!(
        read(bus.bound_store().await),
        None,
        "conformance::{C}: new bus"
    );
    assert_eq!(
        read(bus.last_event().await),
        None,
        "conformance::{C}: empty bus"
    );
    assert_eq!(
        read(bus.bind_store(&a).await),
        a,
        "conformance::{C}: first bind"
    );
    assert_eq!(
        read(bus.bind_store(&b).await),
        a,
        "conformance::{C}: second bind"
    );
    assert_eq!(read(bus.bound_store().await), Some(a), "conformance::{C}");
    publish(&bus, C, &envelopes([1, 2, 3])).await;
    assert_eq!(
        read(bus.last_event().await),
        Some(envelope(3)),
        "conformance::{C}: last event"
    );
}

/// [`crate::binding::bind`] on a bus holding store A's events without a binding (an older
/// build's): store B is refused (`UnboundEvents`), A binds it, then B is refused as a foreign
/// store with both ids in the message, and A opens it again.
///
/// # Panics
/// On any violation, or when temporary SQLite stores cannot be made.
pub async fn a_bus_carries_one_store(bus: Arc<dyn Bus>) {
    const C: &str = "a_bus_carries_one_store";
    use crate::binding::{bind, BindError};
    use tektree_event_store::conformance::{sample_events, SAMPLE_AGGREGATE_TYPE};
    let dir = tempfile::tempdir().expect("temporary directory");
    let a = SqliteStore::open(dir.path().join("a.db")).expect("store a");
    let b = SqliteStore::open(dir.path().join("b.db")).expect("store b");
    for store in [&a, &b] {
        let id = Uuid::new_v4();
        store
            .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 3))
            .await
            .expect("append");
    }
    let published = a.read_all(0, 10).await.expect("read a");
    publish(&bus, C, &published).await;
    let ids = (a.identity().await.unwrap(), b.identity().await.unwrap());
    match bind(&b, bus.as_ref()).await {
        Err(BindError::UnboundEvents { last_published, .. }) => {
            assert_eq!(last_published, 3, "conformance::{C}")
        }
        other => panic!("conformance::{C}: b on a's unbound events: {other:?}"),
    }
    assert_eq!(
        bind(&a, bus.as_ref()).await.expect("a binds"),
        ids.0,
        "conformance::{C}"
    );
    match bind(&b, bus.as_ref()).await {
        Err(e @ BindError::ForeignStore { .. }) => {
            let text = e.to_string();
            for id in [ids.0.store_id, ids.1.store_id] {
                assert!(text.contains(&id.to_string()), "conformance::{C}: {text}");
            }
        }
        other => panic!("conformance::{C}: b on a's bus: {other:?}"),
    }
    assert_eq!(
        bind(&a, bus.as_ref()).await.expect("a again"),
        ids.0,
        "conformance::{C}"
    );
}

/// [`Bus::empty_and_rebind`]: a bus not bound to `from` (another process emptied it first)
/// is left as it is; a bus bound to `from` loses its events and dead letters, is bound to `to`,
/// and takes positions from 1 again.
///
/// # Panics
/// On any violation or bus error.
pub async fn emptying_for_a_restore(bus: Arc<dyn Bus>) {
    const C: &str = "emptying_for_a_restore";
    let id = |epoch| StoreIdentity {
        store_id: Uuid::from_u128(0xe),
        epoch,
    };
    fn read<T>(r: Result<T, crate::BusError>) -> T {
        r.unwrap_or_else(|e| panic!("conformance::{C}: {e}"))
    }
    read(bus.bind_store(&id(1)).await);
    publish(&bus, C, &envelopes([1, 2, 3])).await;
    let delivery = Delivery {
        id: "2".into(),
        envelope: envelope(2),
        delivery_count: 5,
    };
    read(bus.dead_letter("g", &delivery, "failed").await);
    assert!(
        !read(bus.empty_and_rebind(&id(2), &id(3)).await),
        "conformance::{C}: emptied although bound to another epoch"
    );
    assert_eq!(read(bus.last_published().await), 3, "conformance::{C}");
    assert_eq!(
        read(bus.bound_store().await),
        Some(id(1)),
        "conformance::{C}"
    );
    assert!(
        read(bus.empty_and_rebind(&id(1), &id(2)).await),
        "conformance::{C}: not emptied"
    );
    assert_eq!(
        read(bus.last_published().await),
        0,
        "conformance::{C}: events left"
    );
    assert_eq!(read(bus.last_event().await), None, "conformance::{C}");
    assert!(
        read(bus.dead_letters(None, 10).await).is_empty(),
        "conformance::{C}: dead letters left"
    );
    assert_eq!(
        read(bus.bound_store().await),
        Some(id(2)),
        "conformance::{C}"
    );
    publish(&bus, C, &envelopes([1, 2])).await;
    assert_eq!(
        read(bus.last_event().await),
        Some(envelope(2)),
        "conformance::{C}"
    );
}

/// Runs every check, each on a new bus from `new_bus`.
pub async fn run_all<F, Fut>(mut new_bus: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Bus>>,
{
    publish_dedups_by_position(new_bus().await).await;
    every_group_sees_every_event(new_bus().await).await;
    consumers_share_a_group(new_bus().await).await;
    acked_deliveries_never_return(new_bus().await).await;
    dead_consumer_is_reclaimed(new_bus().await).await;
    own_pending_is_reclaimed_after_restart(new_bus().await).await;
    per_consumer_position_order(new_bus().await).await;
    publish_wakes_a_blocked_consumer(new_bus().await).await;
    store_binding_is_set_once(new_bus().await).await;
    a_bus_carries_one_store(new_bus().await).await;
    emptying_for_a_restore(new_bus().await).await;
}
