//! The bus conformance suite and JetStream-specific behaviour against a real `nats-server -js`
//! (started per test by `test_support`, or `TEKTREE_TEST_NATS_URL`), including the outbox relay
//! on a real SQLite event store.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tektree_domain::EventEnvelope;
use tektree_event_store::conformance::{sample_event, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::{EventStore, OutboxStore, SqliteStore};
use tektree_outbox::conformance::{self, envelope, envelopes};
use tektree_outbox::relay::{self, relay_once, RelayConfig};
use tektree_outbox::test_support::{unique_nats_names, NatsNames, NatsServer, NATS_URL_ENV};
use tektree_outbox::{
    Bus, BusError, Delivery, NatsBus, Subscription, SubscriptionOptions, HEADER_POSITION,
};
use tokio::time::Instant;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(15);
const SHORT: Duration = Duration::from_millis(200);
const POLL: Duration = Duration::from_millis(50);

async fn nats_bus(server: &NatsServer, names: &NatsNames) -> NatsBus {
    NatsBus::with_prefix(&server.url, &names.stream, &names.subject_prefix)
        .await
        .expect("connecting to the test nats-server")
}

/// A bus on a fresh, isolated pair of streams.
async fn bus(server: &NatsServer) -> Arc<dyn Bus> {
    Arc::new(nats_bus(server, &unique_nats_names()).await)
}

/// A raw JetStream context on the test server, to look at the streams from outside the adapter.
async fn raw(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url.as_str()).await.unwrap())
}

/// Messages stored in stream `name` and its last sequence.
async fn stream_counts(js: &jetstream::Context, name: &str) -> (u64, u64) {
    let stream = js.get_stream(name).await.unwrap();
    let state = &stream.cached_info().state;
    (state.messages, state.last_sequence)
}

/// The positions stored in stream `name`, in stream order.
async fn stored_positions(js: &jetstream::Context, name: &str) -> Vec<u64> {
    let stream = js.get_stream(name).await.unwrap();
    let state = stream.cached_info().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.unwrap();
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(
            message.headers.get(HEADER_POSITION).map(|v| v.as_str()),
            Some(envelope.position.to_string().as_str()),
            "position header of sequence {seq}"
        );
        out.push(envelope.position);
    }
    out
}

fn positions(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(|d| d.envelope.position).collect()
}

fn ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.id.clone()).collect()
}

async fn subscribe(
    bus: &dyn Bus,
    group: &str,
    consumer: &str,
    min_idle: Duration,
) -> Box<dyn Subscription> {
    let mut options = SubscriptionOptions::new(group, consumer);
    options.min_idle = min_idle;
    bus.subscribe(options).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// The conformance suite, each check on its own server and streams.

#[tokio::test]
async fn nats_publish_dedups_by_position() {
    let server = NatsServer::start();
    conformance::publish_dedups_by_position(bus(&server).await).await;
}

#[tokio::test]
async fn nats_every_group_sees_every_event() {
    let server = NatsServer::start();
    conformance::every_group_sees_every_event(bus(&server).await).await;
}

#[tokio::test]
async fn nats_consumers_share_a_group() {
    let server = NatsServer::start();
    conformance::consumers_share_a_group(bus(&server).await).await;
}

#[tokio::test]
async fn nats_acked_deliveries_never_return() {
    let server = NatsServer::start();
    conformance::acked_deliveries_never_return(bus(&server).await).await;
}

#[tokio::test]
async fn nats_dead_consumer_is_reclaimed() {
    let server = NatsServer::start();
    conformance::dead_consumer_is_reclaimed(bus(&server).await).await;
}

#[tokio::test]
async fn nats_own_pending_is_reclaimed_after_restart() {
    let server = NatsServer::start();
    conformance::own_pending_is_reclaimed_after_restart(bus(&server).await).await;
}

#[tokio::test]
async fn nats_per_consumer_position_order() {
    let server = NatsServer::start();
    conformance::per_consumer_position_order(bus(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publish_wakes_a_blocked_consumer() {
    let server = NatsServer::start();
    conformance::publish_wakes_a_blocked_consumer(bus(&server).await).await;
}

/// The whole suite, one after another on one server (each check on its own streams), as
/// another crate would run it.
#[tokio::test]
async fn nats_run_all_on_one_server() {
    let server = NatsServer::start();
    let url = server.url.clone();
    conformance::run_all(|| {
        let url = url.clone();
        async move {
            let names = unique_nats_names();
            Arc::new(
                NatsBus::with_prefix(&url, &names.stream, &names.subject_prefix)
                    .await
                    .unwrap(),
            ) as Arc<dyn Bus>
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Publishing.

/// `publish` returns only once JetStream acknowledged every event (the stream holds them when
/// it returns, without polling); a republished batch is dropped, whether by position (the
/// same bus) or by `Nats-Msg-Id` (a raw publish of the same event id within the window).
#[tokio::test]
async fn nats_publish_waits_for_acks_and_dedups_a_republished_batch() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let bus = nats_bus(&server, &names).await;
    let js = raw(&server).await;
    assert_eq!(stream_counts(&js, &names.stream).await, (0, 0));

    bus.publish(&envelopes(1..=5)).await.unwrap();
    assert_eq!(stream_counts(&js, &names.stream).await, (5, 5));

    // The same batch again, and from a second bus (another relay process).
    bus.publish(&envelopes(1..=5)).await.unwrap();
    let other = nats_bus(&server, &names).await;
    assert_eq!(other.last_published().await.unwrap(), 5);
    other.publish(&envelopes(1..=6)).await.unwrap();
    assert_eq!(stream_counts(&js, &names.stream).await, (6, 6));

    // A raw publish of event 3 with its event id: JetStream's duplicate window drops it.
    let event = envelope(3);
    let ack = js
        .send_publish(
            bus.subject_for(&event),
            jetstream::message::PublishMessage::build()
                .payload(serde_json::to_vec(&event).unwrap().into())
                .message_id(event.event_id.to_string()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        ack.duplicate,
        "JetStream must flag the republished event id"
    );
    assert_eq!(stream_counts(&js, &names.stream).await, (6, 6));
    assert_eq!(
        stored_positions(&js, &names.stream).await,
        (1..=6).collect::<Vec<_>>()
    );

    // Subjects are per aggregate.
    let message = js
        .get_stream(&names.stream)
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(
        message.subject.as_str(),
        format!(
            "{}.{}.{}",
            names.subject_prefix,
            envelope(1).aggregate_type,
            envelope(1).aggregate_id
        )
    );
    assert_eq!(
        message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string()),
        Some(envelope(1).event_id.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_concurrent_publishers_store_each_position_once() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let mut tasks = Vec::new();
    for publisher in 0..4u64 {
        let bus = nats_bus(&server, &names).await;
        tasks.push(tokio::spawn(async move {
            // Overlapping, growing batches, each publisher starting at a different offset.
            for end in (5 + publisher..=60).step_by(5) {
                bus.publish(&envelopes(end.saturating_sub(12).max(1)..=end))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let js = raw(&server).await;
    assert_eq!(
        stored_positions(&js, &names.stream).await,
        (1..=60).collect::<Vec<_>>()
    );
    let bus = nats_bus(&server, &names).await;
    assert_eq!(bus.last_published().await.unwrap(), 60);
}

/// Another publisher's message on the stream's subjects (not an envelope) is a decode error
/// for the consumer, reported after the good ones before it; acknowledging its id skips it.
/// The bus's publishing is not disturbed by it.
#[tokio::test]
async fn nats_undecodable_message_is_a_decode_error_and_can_be_skipped() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let bus = nats_bus(&server, &names).await;
    bus.publish(&envelopes(1..=2)).await.unwrap();
    let js = raw(&server).await;
    js.publish(
        format!("{}.foreign.x", names.subject_prefix),
        "{not json".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    bus.publish(&envelopes(4..=5)).await.unwrap();
    assert_eq!(bus.last_published().await.unwrap(), 5);

    let mut sub = subscribe(&bus, "g", "c", Duration::from_secs(30)).await;
    let first = sub.next_batch(10, Duration::ZERO).await.unwrap();
    assert_eq!(positions(&first), [1, 2]);
    match sub.next_batch(10, Duration::ZERO).await {
        Err(BusError::Decode { id, .. }) => {
            assert_eq!(id, "3");
            sub.ack(&[id]).await.unwrap();
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let rest = sub.next_batch(10, Duration::ZERO).await.unwrap();
    assert_eq!(positions(&rest), [4, 5]);
    let all: Vec<String> = first.iter().chain(&rest).map(|d| d.id.clone()).collect();
    assert_eq!(all, ["1", "2", "4", "5"]);
    sub.ack(&all).await.unwrap();
    // Acknowledging again (and unknown ids) is harmless.
    sub.ack(&all).await.unwrap();
    sub.ack(&["999".to_string()]).await.unwrap();
    // The skipped message does not come back either.
    let mut again = subscribe(&bus, "g", "c2", SHORT).await;
    let until = Instant::now() + SHORT * 4;
    while Instant::now() < until {
        assert!(again.next_batch(10, POLL).await.unwrap().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer groups.

/// A worker whose process died (its connection is gone) holding unacknowledged deliveries:
/// JetStream hands them to another worker of the group once `ack_wait` (= `min_idle`) passed,
/// with a delivery count of 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_consumer_messages_come_back_to_another_worker() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let publisher = nats_bus(&server, &names).await;
    publisher.publish(&envelopes(1..=8)).await.unwrap();

    {
        // The doomed worker, on its own connection.
        let doomed = nats_bus(&server, &names).await;
        let mut sub = subscribe(&doomed, "projection.test", "doomed", SHORT).await;
        let taken = sub.next_batch(5, POLL).await.unwrap();
        assert_eq!(positions(&taken), [1, 2, 3, 4, 5]);
        sub.ack(&ids(&taken[..2])).await.unwrap();
        // Dropping the bus and the subscription closes the connection: the process is gone.
    }

    let survivor = nats_bus(&server, &names).await;
    let mut sub = subscribe(&survivor, "projection.test", "survivor", SHORT).await;
    let deadline = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    while got.len() < 6 && Instant::now() < deadline {
        let batch = sub.next_batch(10, POLL).await.unwrap();
        sub.ack(&ids(&batch)).await.unwrap();
        got.extend(batch);
    }
    let mut seen = positions(&got);
    seen.sort_unstable();
    assert_eq!(seen, [3, 4, 5, 6, 7, 8], "the survivor gets the rest once");
    for d in &got {
        let expected = if d.envelope.position <= 5 { 2 } else { 1 };
        assert_eq!(
            d.delivery_count, expected,
            "delivery count of position {}",
            d.envelope.position
        );
    }
}

/// JetStream never gives up on an unacknowledged message: it keeps handing it out, with a
/// rising delivery count, beyond the worker's own limit (`WorkerConfig::max_deliver`, 5), so
/// the worker alone decides when to dead-letter it; once acknowledged it is never handed out
/// again.
///
/// nats-server 2.9.10 (Debian's, what CI installs) occasionally leaves a pull request
/// unanswered for ~5 s while a redelivery is due, and then hands the message out twice in one
/// batch: once with the next count and once more as count 1 (the reply subjects show a new
/// consumer sequence for both). So counts rise apart from such repeats reported as 1; the
/// worker copes because every delivery goes through the read-model guard.
#[tokio::test]
async fn nats_consumers_never_give_up_on_a_message() {
    const WANTED: u64 = 7;
    let server = NatsServer::start();
    let names = unique_nats_names();
    let bus = nats_bus(&server, &names).await;
    bus.publish(&envelopes([1])).await.unwrap();
    let mut sub = subscribe(&bus, "policy.poison", "w", SHORT).await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while seen.iter().map(|d: &Delivery| d.delivery_count).max() < Some(WANTED)
        && Instant::now() < deadline
    {
        seen.extend(sub.next_batch(10, POLL).await.unwrap());
    }
    let counts: Vec<u64> = seen.iter().map(|d| d.delivery_count).collect();
    eprintln!("delivery counts: {counts:?}");
    assert!(
        seen.iter().all(|d| d.envelope.position == 1),
        "only the one event"
    );
    assert_eq!(counts.first(), Some(&1), "the first delivery: {counts:?}");
    let max = counts.iter().copied().max().unwrap();
    assert!(max >= WANTED, "redelivered beyond 5: {counts:?}");
    let rising: Vec<u64> = counts.iter().copied().filter(|&c| c > 1).collect();
    assert!(
        rising.windows(2).all(|w| w[0] < w[1]),
        "delivery counts rise: {counts:?}"
    );
    // What the worker does with a delivery it gives up on: dead letter, then ack.
    let last = seen.iter().find(|d| d.delivery_count == max).unwrap();
    bus.dead_letter("policy.poison", last, "handler kept failing")
        .await
        .unwrap();
    sub.ack(std::slice::from_ref(&last.id)).await.unwrap();
    // Acknowledged: not handed out again, however long we poll (several ack_waits).
    let until = Instant::now() + SHORT * 5;
    while Instant::now() < until {
        let extra = sub.next_batch(10, POLL).await.unwrap();
        assert!(
            extra.is_empty(),
            "delivered after the ack: {:?}",
            extra.iter().map(|d| d.delivery_count).collect::<Vec<_>>()
        );
    }
    let letters = bus.dead_letters(Some("policy.poison"), 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].delivery_count, max);
}

/// Dead letters: publish, list (all, per group, limited), dedup of a repeated call, remove.
#[tokio::test]
async fn nats_dead_letter_round_trip() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let bus = nats_bus(&server, &names).await;
    assert!(bus.dead_letters(None, 10).await.unwrap().is_empty());
    bus.publish(&envelopes(1..=3)).await.unwrap();
    let mut sub = subscribe(&bus, "projection.xp", "w", Duration::from_secs(30)).await;
    let got = sub.next_batch(10, POLL).await.unwrap();
    assert_eq!(positions(&got), [1, 2, 3]);

    bus.dead_letter("projection.xp", &got[1], "boom:\nline two")
        .await
        .unwrap();
    bus.dead_letter("projection.xp", &got[2], "bad payload")
        .await
        .unwrap();
    // The same call again (a worker that crashed before acknowledging): stored once.
    bus.dead_letter("projection.xp", &got[2], "bad payload")
        .await
        .unwrap();
    bus.dead_letter("policy.gamification", &got[0], "other group")
        .await
        .unwrap();
    // A group whose name differs only in characters sanitized away shares the subject, not
    // the listing.
    bus.dead_letter("projection_xp", &got[0], "look-alike group")
        .await
        .unwrap();
    sub.ack(&ids(&got)).await.unwrap();

    let js = raw(&server).await;
    assert_eq!(stream_counts(&js, bus.dead_letter_stream_name()).await.0, 4);

    let all = bus.dead_letters(None, 100).await.unwrap();
    let summary: Vec<(&str, u64)> = all
        .iter()
        .map(|d| (d.group.as_str(), d.envelope.position))
        .collect();
    assert_eq!(
        summary,
        [
            ("projection.xp", 2),
            ("projection.xp", 3),
            ("policy.gamification", 1),
            ("projection_xp", 1)
        ]
    );
    assert_eq!(all[0].reason, "boom: line two");
    assert_eq!(all[0].delivery_count, 1);
    assert_eq!(all[0].envelope, envelope(2));
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));

    let xp = bus.dead_letters(Some("projection.xp"), 100).await.unwrap();
    assert_eq!(xp, all[..2].to_vec());
    assert_eq!(bus.dead_letters(None, 1).await.unwrap(), all[..1].to_vec());
    assert!(bus
        .dead_letters(Some("nobody"), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(bus.dead_letters(None, 0).await.unwrap().is_empty());

    assert!(bus.remove_dead_letter(all[0].seq).await.unwrap());
    assert!(!bus.remove_dead_letter(all[0].seq).await.unwrap());
    assert!(!bus.remove_dead_letter(9_999).await.unwrap());
    let xp = bus.dead_letters(Some("projection.xp"), 100).await.unwrap();
    assert_eq!(xp, all[1..2].to_vec());

    // The listing consumers are gone; only the group's durable consumer remains.
    let dl = js.get_stream(bus.dead_letter_stream_name()).await.unwrap();
    assert_eq!(dl.cached_info().state.consumer_count, 0);
}

// ---------------------------------------------------------------------------------------------
// Connecting.

#[tokio::test]
async fn nats_open_bus_connect_and_unreachable_server() {
    let server = NatsServer::start();
    // `open_bus` and `connect` use the default streams.
    let bus = tektree_outbox::open_bus(&server.url).await.unwrap();
    let direct = NatsBus::connect(&server.url).await.unwrap();
    assert_eq!(direct.stream_name(), tektree_outbox::DEFAULT_NATS_STREAM);
    assert_eq!(
        direct.subject_prefix(),
        tektree_outbox::DEFAULT_SUBJECT_PREFIX
    );
    assert_eq!(
        direct.dead_letter_stream_name(),
        tektree_outbox::DEFAULT_DEAD_LETTER_STREAM
    );
    assert_eq!(
        direct.dead_letter_prefix(),
        tektree_outbox::DEFAULT_DEAD_LETTER_PREFIX
    );
    // (A server from TEKTREE_TEST_NATS_URL may already have events there.)
    let next = direct.last_published().await.unwrap() + 1;
    bus.publish(&envelopes([next])).await.unwrap();
    assert!(direct.last_published().await.unwrap() >= next);

    // The stream as created: limits retention, file storage, 2-minute duplicate window, no
    // max age.
    let js = raw(&server).await;
    let info = js
        .get_stream(tektree_outbox::DEFAULT_NATS_STREAM)
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.subjects, ["tektree.events.>"]);
    assert_eq!(
        info.config.retention,
        jetstream::stream::RetentionPolicy::Limits
    );
    assert_eq!(info.config.storage, jetstream::stream::StorageType::File);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.config.max_age, Duration::ZERO);

    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match NatsBus::connect(&format!("nats://127.0.0.1:{port}")).await {
        Err(BusError::Transport(_)) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
    match NatsBus::connect("nats://bad url").await {
        Err(BusError::InvalidUrl(_)) => {}
        other => panic!("expected an invalid url error, got {other:?}"),
    }
    match NatsBus::with_prefix(&server.url, "A.B", "x.events").await {
        Err(BusError::Config(_)) => {}
        other => panic!("expected a config error, got {other:?}"),
    }
    match NatsBus::with_prefix(&server.url, "AB", "x.*").await {
        Err(BusError::Config(_)) => {}
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// An existing stream with work-queue retention would lose events other groups need: refused.
#[tokio::test]
async fn nats_incompatible_existing_stream_is_a_config_error() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let js = raw(&server).await;
    js.create_stream(jetstream::stream::Config {
        name: names.stream.clone(),
        subjects: vec![format!("{}.>", names.subject_prefix)],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    match NatsBus::with_prefix(&server.url, &names.stream, &names.subject_prefix).await {
        Err(BusError::Config(why)) => assert!(why.contains("retention"), "{why}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test]
async fn nats_server_gone_is_a_transport_error() {
    if std::env::var_os(NATS_URL_ENV).is_some() {
        return; // not our server to stop
    }
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let mut sub = subscribe(bus.as_ref(), "g", "c", Duration::from_secs(30)).await;
    drop(server);
    // The client notices the closed connection asynchronously; then every call fails fast.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match bus.publish(&envelopes([1])).await {
            Err(BusError::Transport(_)) => break,
            other => assert!(
                Instant::now() < deadline,
                "expected a transport error, got {other:?}"
            ),
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(matches!(
        sub.next_batch(1, Duration::from_millis(10)).await,
        Err(BusError::Transport(_))
    ));
    assert!(matches!(
        bus.last_published().await,
        Err(BusError::Transport(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// The relay on NATS, with a real SQLite event store.

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

/// Reads (and acknowledges) everything group `group` gets until `want` deliveries or the
/// deadline, then checks nothing more arrives.
async fn read_all(bus: &dyn Bus, group: &str, want: usize) -> Vec<Delivery> {
    let mut sub = subscribe(bus, group, "reader", Duration::from_secs(30)).await;
    let deadline = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let batch = sub.next_batch(100, POLL).await.unwrap();
        sub.ack(&ids(&batch)).await.unwrap();
        got.extend(batch);
    }
    assert!(
        sub.next_batch(100, POLL).await.unwrap().is_empty(),
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

/// A relay that died after publishing but before marking its outbox rows: the restarted relay
/// publishes them again, and the stream still holds each position exactly once, in order.
#[tokio::test]
async fn nats_relay_crash_after_publish_before_mark_leaves_no_duplicates() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let (_dir, store) = store();
    let bus = nats_bus(&server, &names).await;
    let committed = append(store.as_ref(), 2, 5).await;
    let expected: Vec<u64> = committed.iter().map(|e| e.position).collect();

    let pending = store.outbox_pending(7).await.unwrap();
    bus.publish(&pending).await.unwrap();
    // The restarted relay, in a new process: a new bus.
    let restarted = nats_bus(&server, &names).await;
    assert_eq!(
        relay_until_empty(store.as_ref(), &restarted, 4).await,
        committed.len()
    );
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);

    let js = raw(&server).await;
    assert_eq!(stored_positions(&js, &names.stream).await, expected);
    let got = read_all(&restarted, "g", committed.len()).await;
    assert_eq!(
        positions(&got),
        expected,
        "each position exactly once, in order"
    );
    let envelopes: Vec<EventEnvelope> = got.into_iter().map(|d| d.envelope).collect();
    assert_eq!(envelopes, committed, "the committed envelopes, unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_relay_run_end_to_end() {
    let server = NatsServer::start();
    let names = unique_nats_names();
    let (_dir, store) = store();
    let bus: Arc<dyn Bus> = Arc::new(nats_bus(&server, &names).await);
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
    let js = raw(&server).await;
    assert_eq!(
        stored_positions(&js, &names.stream).await,
        committed.iter().map(|e| e.position).collect::<Vec<_>>()
    );
    // Per-aggregate subjects: each aggregate's events are on its own subject, in sequence.
    let stream = js.get_stream(&names.stream).await.unwrap();
    for (seq, event) in (1u64..).zip(&committed) {
        let message = stream.get_raw_message(seq).await.unwrap();
        assert_eq!(
            message.subject.as_str(),
            format!(
                "{}.{}.{}",
                names.subject_prefix, SAMPLE_AGGREGATE_TYPE, event.aggregate_id
            )
        );
    }
}
