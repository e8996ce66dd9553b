//! Backend conformance suite: the behaviour every [`EventStore`] adapter must show.
//!
//! Each check is a plain `async fn` taking `&dyn EventStore` that **panics with a message
//! prefixed `conformance::<check>`** on the first violation, so an adapter's test only has to
//! open a fresh store and call [`run_all`] (or single checks) from an async test:
//!
//! ```no_run
//! # async fn demo() -> Result<(), tektree_event_store::StoreError> {
//! let dir = std::env::temp_dir().join("tektree-conformance-demo.db");
//! let store = tektree_event_store::SqliteStore::open(&dir)?;
//! tektree_event_store::conformance::run_all(&store).await;
//! # Ok(()) }
//! ```
//!
//! Requirements on the store under test: it must not be written by anyone else while a check
//! runs (checks compare [`Head`](crate::Head), `read_all` and the outbox backlog before and after
//! their own writes). It may already contain events (each check uses fresh aggregate ids), so
//! checks can run one after another on the same store. The concurrency check drives its writers
//! as concurrent futures on the caller's task; adapters that do their I/O on other threads
//! (SQLite via `spawn_blocking`, network drivers) therefore really race.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use tektree_domain::events::UserRegistered;
use tektree_domain::{Actor, Event, EventEnvelope, EventMetadata, NewEvent};
use uuid::Uuid;

use crate::{EventStore, IdempotencyKey, IdempotencyRecord, StoreError, StoredSnapshot};

/// Aggregate type used by [`sample_event`].
pub const SAMPLE_AGGREGATE_TYPE: &str = "user";

/// The fixed `occurred_at` of [`sample_event`]: 2024-05-06T07:08:09.123Z (millisecond precision,
/// so that backends storing milliseconds also round-trip it exactly).
pub fn sample_occurred_at() -> DateTime<Utc> {
    DateTime::from_timestamp(1_714_979_289, 123_000_000).unwrap_or_default()
}

/// A `user.registered` event of aggregate `user`/`aggregate_id` at `sequence`, with new random
/// `event_id`, `correlation_id` and `causation_id`, actor `system:importer`, `occurred_at`
/// [`sample_occurred_at`] and a display name containing non-ASCII text and JSON metacharacters
/// (to exercise payload round-trips).
pub fn sample_event(aggregate_id: Uuid, sequence: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        aggregate_type: SAMPLE_AGGREGATE_TYPE.to_string(),
        aggregate_id,
        sequence,
        event: Event::UserRegistered(UserRegistered {
            user_id: aggregate_id,
            display_name: format!("Zoë \"#{sequence}\" \\ 🌳"),
            preferences: Default::default(),
        }),
        metadata: EventMetadata {
            occurred_at: sample_occurred_at(),
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            actor: Actor::importer(),
        },
    }
}

/// `count` [`sample_event`]s of `aggregate_id` with sequences `first_sequence ..`.
pub fn sample_events(aggregate_id: Uuid, first_sequence: u64, count: u64) -> Vec<NewEvent> {
    (0..count)
        .map(|i| sample_event(aggregate_id, first_sequence + i))
        .collect()
}

/// Reads the whole history and checks what every adapter guarantees of it: `read_all(0, ∞)`
/// holds exactly positions `1..=head`, `head.events == head.position`, and every aggregate's
/// sequences run `1, 2, 3, …` in position order. Returns the history.
///
/// # Panics
/// When a guarantee is violated, with `context` in the message.
pub async fn whole_history_is_gap_free_and_ordered(
    store: &dyn EventStore,
    context: &str,
) -> Vec<EventEnvelope> {
    let head = ok(context, "head", store.head().await);
    assert_eq!(head.events, head.position, "{context}: head");
    let all = ok(context, "read_all", store.read_all(0, usize::MAX).await);
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (1..=head.position).collect::<Vec<_>>(),
        "{context}: positions are not 1..=head"
    );
    let mut last: HashMap<(String, Uuid), u64> = HashMap::new();
    for e in &all {
        let prev = last
            .insert((e.aggregate_type.clone(), e.aggregate_id), e.sequence)
            .unwrap_or(0);
        assert_eq!(
            e.sequence,
            prev + 1,
            "{context}: {}/{} out of sequence order at position {}",
            e.aggregate_type,
            e.aggregate_id,
            e.position
        );
    }
    all
}

/// Runs every check of this module in turn on `store`.
///
/// # Panics
/// On the first violated guarantee, with a message naming the check.
pub async fn run_all(store: &dyn EventStore) {
    append_and_load_round_trip(store).await;
    empty_append_is_a_no_op(store).await;
    expected_version_conflict_writes_nothing(store).await;
    malformed_batch_writes_nothing(store).await;
    concurrent_writers_on_one_aggregate(store, 8, 3).await;
    positions_strictly_increasing(store).await;
    stored_reads_match_envelopes(store).await;
    outbox_contract(store).await;
    idempotency_records(store).await;
    snapshots(store).await;
}

/// [`EventLog::read_all_stored`] returns what [`EventLog::read_all`] returns, in the same
/// order and pages: the same keys, type and version, a payload text that parses to the
/// envelope's payload, and the same decoded event.
///
/// # Panics
/// On any violation or store error.
pub async fn stored_reads_match_envelopes(store: &dyn EventStore) {
    const C: &str = "stored_reads_match_envelopes";
    let head0 = ok(C, "head", store.head().await);
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    ok(
        C,
        "append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, a, 0, sample_events(a, 1, 3))
            .await,
    );
    ok(
        C,
        "append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, b, 0, sample_events(b, 1, 2))
            .await,
    );
    let envelopes = ok(C, "read_all", store.read_all(head0.position, 10).await);
    let stored = ok(
        C,
        "read_all_stored",
        store.read_all_stored(head0.position, 10).await,
    );
    assert_eq!(
        envelopes.len(),
        5,
        "conformance::{C}: read_all read {envelopes:?}"
    );
    assert_eq!(
        stored.len(),
        envelopes.len(),
        "conformance::{C}: read_all_stored read {} events, read_all {}",
        stored.len(),
        envelopes.len()
    );
    for (s, e) in stored.iter().zip(&envelopes) {
        let key = |p, t: &str, i, q, ty: &str, v| (p, t.to_owned(), i, q, ty.to_owned(), v);
        assert_eq!(
            key(
                s.position,
                &s.aggregate_type,
                s.aggregate_id,
                s.sequence,
                &s.event_type,
                s.event_version
            ),
            key(
                e.position,
                &e.aggregate_type,
                e.aggregate_id,
                e.sequence,
                &e.event_type,
                e.event_version
            ),
            "conformance::{C}: keys differ"
        );
        let payload: serde_json::Value = serde_json::from_str(&s.payload)
            .unwrap_or_else(|err| panic!("conformance::{C}: payload text {:?}: {err}", s.payload));
        assert_eq!(payload, e.payload, "conformance::{C}: payloads differ");
        assert_eq!(
            s.decode().ok(),
            e.decode().ok(),
            "conformance::{C}: decoded events differ at {}",
            s.position
        );
        assert!(
            s.decode().is_ok(),
            "conformance::{C}: {s:?} does not decode"
        );
    }
    let page = ok(
        C,
        "read_all_stored",
        store.read_all_stored(stored[1].position, 2).await,
    );
    assert_eq!(
        page,
        stored[2..4].to_vec(),
        "conformance::{C}: a page after position {} differs",
        stored[1].position
    );
}

/// Two handles of one store report the same [`crate::StoreIdentity`], at epoch 1 for a store
/// never restored; a store created apart (`other`) has another `store_id`;
/// [`EventLog::raise_epoch`] through either handle raises the epoch above the stored one and
/// the one named (so the store is left at epoch 7).
///
/// # Panics
/// On any violation or store error.
pub async fn identity_is_the_store_s(
    store: &dyn EventStore,
    second_handle: &dyn EventStore,
    other: &dyn EventStore,
) {
    let check = "identity_is_the_store_s";
    let a = ok(check, "identity", store.identity().await);
    assert_eq!(a.epoch, 1, "conformance::{check}: a new store's epoch");
    assert_ne!(
        a.store_id,
        Uuid::nil(),
        "conformance::{check}: nil store id"
    );
    let b = ok(check, "identity", second_handle.identity().await);
    assert_eq!(a, b, "conformance::{check}: two handles of one store");
    let c = ok(check, "identity", other.identity().await);
    assert_ne!(a.store_id, c.store_id, "conformance::{check}: two stores");
    // A restore raises the epoch above the store's own and the one named, through any handle.
    let raised = ok(check, "raise_epoch", store.raise_epoch(0).await);
    assert_eq!(
        (raised.store_id, raised.epoch),
        (a.store_id, 2),
        "conformance::{check}"
    );
    let raised = ok(check, "raise_epoch", second_handle.raise_epoch(5).await);
    assert_eq!(
        (raised.store_id, raised.epoch),
        (a.store_id, 6),
        "conformance::{check}"
    );
    let raised = ok(check, "raise_epoch", store.raise_epoch(3).await);
    assert_eq!(
        raised.epoch, 7,
        "conformance::{check}: above the other handle's raise"
    );
    assert_eq!(
        ok(check, "identity", store.identity().await),
        raised,
        "conformance::{check}: identity after a raise"
    );
    assert_eq!(
        ok(check, "identity", other.identity().await),
        c,
        "conformance::{check}: another store is untouched"
    );
}

fn ok<T>(check: &str, what: &str, r: Result<T, StoreError>) -> T {
    r.unwrap_or_else(|e| panic!("conformance::{check}: {what} failed: {e}"))
}

/// Asserts that `env` is `new` committed (all fields but `position` / `recorded_at` from `new`).
fn assert_committed_as(check: &str, env: &EventEnvelope, new: &NewEvent) {
    let expected = new.clone().into_envelope(env.position, env.recorded_at);
    assert_eq!(
        env, &expected,
        "conformance::{check}: committed envelope differs from the appended event"
    );
}

/// Append then load returns exactly the committed envelopes (every field, including timestamps
/// and payload), a second append continues the sequence, `read_all` and `head` reflect the
/// writes, and aggregates are keyed by type *and* id.
///
/// # Panics
/// On any violation or store error.
pub async fn append_and_load_round_trip(store: &dyn EventStore) {
    const C: &str = "append_and_load_round_trip";
    let id = Uuid::new_v4();
    let head0 = ok(C, "head", store.head().await);

    let first = sample_events(id, 1, 3);
    let appended = ok(
        C,
        "append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, id, 0, first.clone())
            .await,
    );
    assert_eq!(
        appended.len(),
        3,
        "conformance::{C}: append returned {} envelopes for 3 events",
        appended.len()
    );
    for (env, new) in appended.iter().zip(&first) {
        assert_committed_as(C, env, new);
        assert!(
            env.position > head0.position,
            "conformance::{C}: new position {} not above previous head {}",
            env.position,
            head0.position
        );
    }
    let loaded = ok(C, "load", store.load(SAMPLE_AGGREGATE_TYPE, id).await);
    assert_eq!(
        loaded, appended,
        "conformance::{C}: load differs from append's result"
    );

    let second = sample_events(id, 4, 2);
    let appended2 = ok(
        C,
        "second append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, id, 3, second.clone())
            .await,
    );
    for (env, new) in appended2.iter().zip(&second) {
        assert_committed_as(C, env, new);
    }
    let all: Vec<EventEnvelope> = appended.iter().chain(&appended2).cloned().collect();
    let loaded = ok(C, "load", store.load(SAMPLE_AGGREGATE_TYPE, id).await);
    assert_eq!(loaded, all, "conformance::{C}: load after two appends");
    let seqs: Vec<u64> = loaded.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "conformance::{C}: sequences");
    for after in 0..=6 {
        let tail = ok(
            C,
            "load_after",
            store.load_after(SAMPLE_AGGREGATE_TYPE, id, after).await,
        );
        let want: Vec<EventEnvelope> = all.iter().filter(|e| e.sequence > after).cloned().collect();
        assert_eq!(tail, want, "conformance::{C}: load_after({after})");
    }

    let other_type = ok(C, "load", store.load("content", id).await);
    assert!(
        other_type.is_empty(),
        "conformance::{C}: load(\"content\", id) returned events of the user aggregate"
    );
    let unknown = ok(
        C,
        "load",
        store.load(SAMPLE_AGGREGATE_TYPE, Uuid::new_v4()).await,
    );
    assert!(
        unknown.is_empty(),
        "conformance::{C}: unknown aggregate not empty"
    );

    let read = ok(
        C,
        "read_all",
        store.read_all(head0.position, usize::MAX).await,
    );
    assert_eq!(
        read, all,
        "conformance::{C}: read_all after the previous head"
    );
    let head = ok(C, "head", store.head().await);
    assert_eq!(
        head.events,
        head0.events + 5,
        "conformance::{C}: head.events did not grow by 5"
    );
    assert_eq!(
        Some(head.position),
        all.last().map(|e| e.position),
        "conformance::{C}: head.position is not the last committed position"
    );
}

/// Appending no events returns an empty vector and writes nothing.
///
/// # Panics
/// On any violation or store error.
pub async fn empty_append_is_a_no_op(store: &dyn EventStore) {
    const C: &str = "empty_append_is_a_no_op";
    let head0 = ok(C, "head", store.head().await);
    let backlog0 = ok(C, "outbox_backlog", store.outbox_backlog().await);
    let out = ok(
        C,
        "append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, Uuid::new_v4(), 0, Vec::new())
            .await,
    );
    assert!(out.is_empty(), "conformance::{C}: returned envelopes");
    assert_eq!(
        ok(C, "head", store.head().await),
        head0,
        "conformance::{C}: head changed"
    );
    assert_eq!(
        ok(C, "outbox_backlog", store.outbox_backlog().await),
        backlog0,
        "conformance::{C}: backlog changed"
    );
}

async fn backlog(check: &str, store: &dyn EventStore) -> u64 {
    ok(check, "outbox_backlog", store.outbox_backlog().await)
}

/// Snapshot of everything an append could change, for "nothing written" checks.
async fn snapshot(
    check: &str,
    store: &dyn EventStore,
    id: Uuid,
) -> (crate::Head, u64, Vec<EventEnvelope>) {
    (
        ok(check, "head", store.head().await),
        ok(check, "outbox_backlog", store.outbox_backlog().await),
        ok(check, "load", store.load(SAMPLE_AGGREGATE_TYPE, id).await),
    )
}

fn assert_conflict(
    check: &str,
    r: Result<Vec<EventEnvelope>, StoreError>,
    id: Uuid,
    expected: u64,
    current: u64,
) {
    match r {
        Err(StoreError::Conflict {
            aggregate_type,
            aggregate_id,
            expected: e,
            actual,
        }) => {
            assert_eq!(
                aggregate_type, SAMPLE_AGGREGATE_TYPE,
                "conformance::{check}: conflict aggregate_type"
            );
            assert_eq!(
                aggregate_id, id,
                "conformance::{check}: conflict aggregate_id"
            );
            assert_eq!(
                e, expected,
                "conformance::{check}: conflict expected version"
            );
            // The trait allows `expected + 1` when the backend only sees a duplicate key.
            assert!(
                actual == current || (actual == expected + 1 && expected < current),
                "conformance::{check}: conflict reports actual {actual}, the aggregate is at \
                 {current} (expected {expected})"
            );
        }
        Err(other) => panic!(
            "conformance::{check}: append at stale version {expected} (current {current}) \
             failed with {other:?}, want StoreError::Conflict"
        ),
        Ok(envs) => panic!(
            "conformance::{check}: append at version {expected} succeeded though the aggregate \
             is at {current} ({} events written)",
            envs.len()
        ),
    }
}

/// An append whose `expected_version` is behind or ahead of the aggregate fails with
/// [`StoreError::Conflict`] (type, id, expected and actual version reported) and writes neither
/// events nor outbox records.
///
/// # Panics
/// On any violation or unexpected store error.
pub async fn expected_version_conflict_writes_nothing(store: &dyn EventStore) {
    const C: &str = "expected_version_conflict_writes_nothing";
    let id = Uuid::new_v4();
    ok(
        C,
        "append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, id, 0, sample_events(id, 1, 2))
            .await,
    );
    let before = snapshot(C, store, id).await;

    for expected in [0u64, 1, 5] {
        let r = store
            .append(
                SAMPLE_AGGREGATE_TYPE,
                id,
                expected,
                sample_events(id, expected + 1, 2),
            )
            .await;
        assert_conflict(C, r, id, expected, 2);
        assert_eq!(
            snapshot(C, store, id).await,
            before,
            "conformance::{C}: a conflicting append at version {expected} wrote something"
        );
    }

    // A fresh aggregate is at version 0.
    let fresh = Uuid::new_v4();
    let r = store
        .append(SAMPLE_AGGREGATE_TYPE, fresh, 1, sample_events(fresh, 2, 1))
        .await;
    assert_conflict(C, r, fresh, 1, 0);
    assert_eq!(
        snapshot(C, store, fresh).await,
        (before.0, before.1, Vec::new()),
        "conformance::{C}: a conflicting append on a new aggregate wrote something"
    );
}

/// A batch that is not `expected_version + 1 ..` contiguous or not all of the named aggregate is
/// rejected with an error and writes nothing.
///
/// # Panics
/// On any violation (including the batch being accepted).
pub async fn malformed_batch_writes_nothing(store: &dyn EventStore) {
    const C: &str = "malformed_batch_writes_nothing";
    let id = Uuid::new_v4();
    let before = snapshot(C, store, id).await;
    let mut gap = sample_events(id, 1, 2);
    gap[1].sequence = 3;
    let mut foreign = sample_events(id, 1, 2);
    foreign[1].aggregate_id = Uuid::new_v4();
    let mut other_type = sample_events(id, 1, 2);
    other_type[0].aggregate_type = "content".into();
    let cases: [(&str, Vec<NewEvent>); 4] = [
        ("starts after expected_version + 1", sample_events(id, 2, 2)),
        ("has a gap", gap),
        ("contains another aggregate id", foreign),
        ("contains another aggregate type", other_type),
    ];
    for (what, batch) in cases {
        let r = store.append(SAMPLE_AGGREGATE_TYPE, id, 0, batch).await;
        assert!(
            r.is_err(),
            "conformance::{C}: a batch that {what} was accepted"
        );
        assert_eq!(
            snapshot(C, store, id).await,
            before,
            "conformance::{C}: a rejected batch that {what} wrote something"
        );
    }
}

/// `writers` concurrent writers each run `commands` commands against ONE aggregate as
/// load → append at the loaded version, retrying on [`StoreError::Conflict`]. Afterwards the
/// aggregate holds every writer's events exactly once with sequences `1..=N` contiguous, and
/// every retry was caused by a genuine conflict (no other error).
///
/// Command `k` of a writer appends `k % 2 + 1` events, so multi-event batches race too.
///
/// # Panics
/// On any violation, a non-conflict error, or a writer exceeding 10,000 attempts.
pub async fn concurrent_writers_on_one_aggregate(
    store: &dyn EventStore,
    writers: usize,
    commands: usize,
) {
    const C: &str = "concurrent_writers_on_one_aggregate";
    let id = Uuid::new_v4();
    let writer = |w: usize| async move {
        let mut mine = Vec::new();
        let mut conflicts = 0u64;
        for k in 0..commands {
            let mut attempts = 0;
            loop {
                attempts += 1;
                assert!(
                    attempts <= 10_000,
                    "conformance::{C}: writer {w} made no progress in 10,000 attempts"
                );
                let version = ok(C, "load", store.load(SAMPLE_AGGREGATE_TYPE, id).await)
                    .last()
                    .map_or(0, |e| e.sequence);
                let batch = sample_events(id, version + 1, (k % 2 + 1) as u64);
                let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
                match store
                    .append(SAMPLE_AGGREGATE_TYPE, id, version, batch)
                    .await
                {
                    Ok(envs) => {
                        let got: Vec<Uuid> = envs.iter().map(|e| e.event_id).collect();
                        assert_eq!(got, ids, "conformance::{C}: append returned other events");
                        mine.extend(ids);
                        break;
                    }
                    Err(StoreError::Conflict { expected, .. }) => {
                        assert_eq!(expected, version, "conformance::{C}: conflict expected");
                        conflicts += 1;
                    }
                    Err(e) => panic!("conformance::{C}: writer {w} append failed: {e}"),
                }
            }
        }
        (mine, conflicts)
    };
    let results = futures::future::join_all((0..writers).map(writer)).await;

    let written: Vec<Uuid> = results.iter().flat_map(|(m, _)| m.clone()).collect();
    let loaded = ok(C, "load", store.load(SAMPLE_AGGREGATE_TYPE, id).await);
    let seqs: Vec<u64> = loaded.iter().map(|e| e.sequence).collect();
    let want: Vec<u64> = (1..=written.len() as u64).collect();
    assert_eq!(
        seqs,
        want,
        "conformance::{C}: sequences are not 1..={} contiguous",
        written.len()
    );
    let stored: HashSet<Uuid> = loaded.iter().map(|e| e.event_id).collect();
    assert_eq!(
        stored.len(),
        loaded.len(),
        "conformance::{C}: duplicate event ids stored"
    );
    let written_set: HashSet<Uuid> = written.iter().copied().collect();
    assert_eq!(
        stored, written_set,
        "conformance::{C}: stored events differ from the successfully appended ones"
    );
    let positions: Vec<u64> = loaded.iter().map(|e| e.position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "conformance::{C}: positions not increasing with sequence: {positions:?}"
    );
}

/// Positions are assigned strictly increasing across appends to several aggregates,
/// `read_all` returns events in position order (also when paged), and `head` points at the
/// last one.
///
/// # Panics
/// On any violation or store error.
pub async fn positions_strictly_increasing(store: &dyn EventStore) {
    const C: &str = "positions_strictly_increasing";
    let head0 = ok(C, "head", store.head().await);
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let mut appended = Vec::new();
    for round in 0..3u64 {
        for id in &ids {
            let n = round % 2 + 1;
            let version = ok(C, "load", store.load(SAMPLE_AGGREGATE_TYPE, *id).await)
                .last()
                .map_or(0, |e| e.sequence);
            appended.extend(ok(
                C,
                "append",
                store
                    .append(
                        SAMPLE_AGGREGATE_TYPE,
                        *id,
                        version,
                        sample_events(*id, version + 1, n),
                    )
                    .await,
            ));
        }
    }
    let positions: Vec<u64> = appended.iter().map(|e| e.position).collect();
    assert!(
        positions.first().is_some_and(|&p| p > head0.position),
        "conformance::{C}: first new position {:?} not above previous head {}",
        positions.first(),
        head0.position
    );
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "conformance::{C}: positions not strictly increasing in append order: {positions:?}"
    );

    let read = ok(
        C,
        "read_all",
        store.read_all(head0.position, usize::MAX).await,
    );
    assert_eq!(
        read, appended,
        "conformance::{C}: read_all differs from the appended events"
    );

    let mut paged = Vec::new();
    let mut after = head0.position;
    loop {
        let page = ok(C, "read_all", store.read_all(after, 3).await);
        assert!(
            page.len() <= 3,
            "conformance::{C}: read_all ignored its limit"
        );
        let Some(last) = page.last() else { break };
        after = last.position;
        paged.extend(page);
    }
    assert_eq!(paged, appended, "conformance::{C}: paged read_all differs");

    let last = positions.last().copied().unwrap_or_default();
    assert!(
        ok(C, "read_all", store.read_all(last, 10).await).is_empty(),
        "conformance::{C}: read_all after the head is not empty"
    );
    assert!(
        ok(C, "read_all", store.read_all(head0.position, 0).await).is_empty(),
        "conformance::{C}: read_all with limit 0 is not empty"
    );
    let head = ok(C, "head", store.head().await);
    assert_eq!(head.position, last, "conformance::{C}: head.position");
    assert_eq!(
        head.events,
        head0.events + appended.len() as u64,
        "conformance::{C}: head.events"
    );
}

/// Every appended event has exactly one outbox record, pending records come in position order
/// with the committed envelope, `limit` is honoured, marking published is idempotent and ignores
/// unknown positions, and the backlog counts exactly the unpublished records. Marking never
/// removes events.
///
/// # Panics
/// On any violation or store error.
pub async fn outbox_contract(store: &dyn EventStore) {
    const C: &str = "outbox_contract";
    let backlog0 = ok(C, "outbox_backlog", store.outbox_backlog().await);
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut appended = ok(
        C,
        "append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, a, 0, sample_events(a, 1, 3))
            .await,
    );
    appended.extend(ok(
        C,
        "append",
        store
            .append(SAMPLE_AGGREGATE_TYPE, b, 0, sample_events(b, 1, 2))
            .await,
    ));
    let mine: Vec<u64> = appended.iter().map(|e| e.position).collect();
    assert_eq!(
        backlog(C, store).await,
        backlog0 + 5,
        "conformance::{C}: backlog after 5 events"
    );

    let pending = ok(C, "outbox_pending", store.outbox_pending(usize::MAX).await);
    assert_eq!(
        pending.len() as u64,
        backlog0 + 5,
        "conformance::{C}: outbox_pending(all) length differs from the backlog"
    );
    let pos: Vec<u64> = pending.iter().map(|e| e.position).collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "conformance::{C}: outbox_pending not in strictly increasing position order: {pos:?}"
    );
    for env in &appended {
        let hits: Vec<&EventEnvelope> = pending
            .iter()
            .filter(|p| p.position == env.position)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "conformance::{C}: event at position {} has {} outbox records, want 1",
            env.position,
            hits.len()
        );
        assert_eq!(
            hits[0], env,
            "conformance::{C}: outbox record differs from the event"
        );
    }
    let first_two = ok(C, "outbox_pending", store.outbox_pending(2).await);
    assert_eq!(
        first_two,
        pending[..2.min(pending.len())].to_vec(),
        "conformance::{C}: outbox_pending(2) is not the first two pending records"
    );
    assert!(
        ok(C, "outbox_pending", store.outbox_pending(0).await).is_empty(),
        "conformance::{C}: outbox_pending(0) not empty"
    );

    ok(
        C,
        "mark_published",
        store.outbox_mark_published(&mine[..2]).await,
    );
    assert_eq!(
        backlog(C, store).await,
        backlog0 + 3,
        "conformance::{C}: backlog after marking 2"
    );
    ok(
        C,
        "mark_published",
        store.outbox_mark_published(&mine[..2]).await,
    );
    ok(C, "mark_published", store.outbox_mark_published(&[]).await);
    let head = ok(C, "head", store.head().await);
    ok(
        C,
        "mark_published",
        store
            .outbox_mark_published(&[head.position + 1_000, u64::MAX])
            .await,
    );
    assert_eq!(
        backlog(C, store).await,
        backlog0 + 3,
        "conformance::{C}: re-marking or marking unknown positions changed the backlog"
    );
    let pending = ok(C, "outbox_pending", store.outbox_pending(usize::MAX).await);
    let pending_pos: HashSet<u64> = pending.iter().map(|e| e.position).collect();
    assert!(
        mine[..2].iter().all(|p| !pending_pos.contains(p)),
        "conformance::{C}: published records still pending"
    );
    assert!(
        mine[2..].iter().all(|p| pending_pos.contains(p)),
        "conformance::{C}: unpublished records missing from pending"
    );

    ok(
        C,
        "mark_published",
        store.outbox_mark_published(&mine).await,
    );
    assert_eq!(
        backlog(C, store).await,
        backlog0,
        "conformance::{C}: backlog after marking all"
    );
    let pending = ok(C, "outbox_pending", store.outbox_pending(usize::MAX).await);
    assert!(
        pending.iter().all(|e| !mine.contains(&e.position)),
        "conformance::{C}: published records still pending"
    );
    let loaded = ok(C, "load", store.load(SAMPLE_AGGREGATE_TYPE, a).await);
    assert_eq!(
        loaded,
        appended[..3].to_vec(),
        "conformance::{C}: marking changed the events"
    );
}

/// A key valid for 24 hours from a fixed instant (millisecond precision, like
/// [`sample_occurred_at`], so every backend round-trips it).
fn sample_key(created_at: DateTime<Utc>) -> IdempotencyKey {
    IdempotencyKey {
        key: format!("{}:conformance", Uuid::new_v4()),
        fingerprint: "f".repeat(64),
        created_at,
        expires_at: created_at + chrono::Duration::hours(24),
    }
}

/// Idempotency records ([`IdempotencyStore::append_idempotent`] and friends):
/// - an idempotent append stores the events and a record describing them, atomically;
/// - a second append with the same live key fails with [`StoreError::IdempotencyKeyExists`]
///   and writes nothing (not even when it targets another aggregate);
/// - a version conflict writes neither events nor the record;
/// - a record is invisible once expired, and an expired key can be used again;
/// - [`IdempotencyStore::put_idempotency_record`] keeps an earlier live record and returns it;
/// - [`IdempotencyStore::purge_idempotency_records`] deletes expired records only.
///
/// # Panics
/// On any violation or unexpected store error.
pub async fn idempotency_records(store: &dyn EventStore) {
    const C: &str = "idempotency_records";
    let t0 = sample_occurred_at();
    let id = Uuid::new_v4();
    let key = sample_key(t0);

    // A conflicting append writes no record.
    let r = store
        .append_idempotent(
            SAMPLE_AGGREGATE_TYPE,
            id,
            1,
            sample_events(id, 2, 1),
            key.clone(),
        )
        .await;
    assert_conflict(C, r, id, 1, 0);
    assert_eq!(
        ok(C, "get", store.idempotency_record(&key.key, t0).await),
        None,
        "conformance::{C}: a conflicting append left an idempotency record"
    );

    let committed = ok(
        C,
        "append_idempotent",
        store
            .append_idempotent(
                SAMPLE_AGGREGATE_TYPE,
                id,
                0,
                sample_events(id, 1, 2),
                key.clone(),
            )
            .await,
    );
    assert_eq!(committed.len(), 2, "conformance::{C}: committed events");
    let want = IdempotencyRecord::for_append(key.clone(), SAMPLE_AGGREGATE_TYPE, id, 0, 2);
    assert_eq!(
        ok(C, "get", store.idempotency_record(&key.key, t0).await),
        Some(want.clone()),
        "conformance::{C}: the record describes the append"
    );

    // The same key again, on this or another aggregate: refused, nothing written.
    let other = Uuid::new_v4();
    let before = snapshot(C, store, other).await;
    for (agg, version) in [(id, 2), (other, 0)] {
        let first = version + 1;
        match store
            .append_idempotent(
                SAMPLE_AGGREGATE_TYPE,
                agg,
                version,
                sample_events(agg, first, 1),
                key.clone(),
            )
            .await
        {
            Err(StoreError::IdempotencyKeyExists { key: k }) => assert_eq!(k, key.key),
            other => panic!("conformance::{C}: a reused live key gave {other:?}"),
        }
    }
    assert_eq!(
        snapshot(C, store, other).await,
        before,
        "conformance::{C}: a refused key wrote something"
    );
    assert_eq!(
        ok(C, "load", store.load(SAMPLE_AGGREGATE_TYPE, id).await).len(),
        2,
        "conformance::{C}: a refused key appended to the first aggregate"
    );

    // Expiry: invisible at expires_at; then the key may be used again.
    assert_eq!(
        ok(
            C,
            "get",
            store.idempotency_record(&key.key, key.expires_at).await
        ),
        None,
        "conformance::{C}: an expired record is still returned"
    );
    let later = sample_key(key.expires_at);
    let reused = IdempotencyKey {
        key: key.key.clone(),
        ..later
    };
    ok(
        C,
        "append_idempotent with an expired key",
        store
            .append_idempotent(
                SAMPLE_AGGREGATE_TYPE,
                other,
                0,
                sample_events(other, 1, 1),
                reused.clone(),
            )
            .await,
    );
    let now = reused.created_at;
    let got = ok(C, "get", store.idempotency_record(&key.key, now).await);
    assert_eq!(
        got.map(|r| r.aggregate_id),
        Some(other),
        "conformance::{C}: the expired record was not replaced"
    );

    // put keeps a live record and returns it; stores a new one otherwise.
    let noop = IdempotencyRecord {
        event_count: 0,
        first_sequence: 2,
        version: 1,
        ..IdempotencyRecord::for_append(reused.clone(), SAMPLE_AGGREGATE_TYPE, id, 0, 0)
    };
    let kept = ok(C, "put", store.put_idempotency_record(noop.clone()).await);
    assert_eq!(
        kept.aggregate_id, other,
        "conformance::{C}: put replaced a live record"
    );
    let fresh_key = sample_key(now);
    let fresh = IdempotencyRecord {
        key: fresh_key.clone(),
        ..noop
    };
    assert_eq!(
        ok(C, "put", store.put_idempotency_record(fresh.clone()).await),
        fresh,
        "conformance::{C}: put of a new key"
    );

    // Purge deletes exactly the expired records.
    let purged = ok(
        C,
        "purge",
        store.purge_idempotency_records(fresh_key.expires_at).await,
    );
    assert!(
        purged >= 2,
        "conformance::{C}: purged {purged} records, want at least 2"
    );
    assert_eq!(
        ok(
            C,
            "get",
            store.idempotency_record(&fresh_key.key, now).await
        ),
        None,
        "conformance::{C}: a purged record is still returned"
    );
}

/// A snapshot of `user`/`aggregate_id` at `version` with shape `snapshot_version`, taken at
/// [`sample_occurred_at`] plus `version` nanoseconds (so a backend that loses nanoseconds
/// fails the round trip), with a state holding non-ASCII text, JSON metacharacters, a key that
/// is awkward in document stores, a float and an integer above `i64::MAX`.
pub fn sample_snapshot(aggregate_id: Uuid, version: u64, snapshot_version: u32) -> StoredSnapshot {
    StoredSnapshot {
        aggregate_type: SAMPLE_AGGREGATE_TYPE.to_string(),
        aggregate_id,
        version,
        snapshot_version,
        state: serde_json::json!({
            "display_name": format!("Zoë \"#{version}\" \\ 🌳"),
            "$set.odd": [version, 0.5, null, true, u64::MAX],
            "nested": { "empty": {}, "list": [] },
        }),
        taken_at: sample_occurred_at() + chrono::Duration::nanoseconds(version as i64),
    }
}

/// Snapshots ([`SnapshotStore::save_snapshot`] / [`SnapshotStore::load_snapshot`]):
/// - no snapshot loads as `None`; a saved one loads back exactly (every field);
/// - one snapshot per aggregate: a save of a higher (or the same) `version` replaces it, a save
///   of a lower `version` with the same `snapshot_version` is refused (`false`) and changes
///   nothing;
/// - a save with another `snapshot_version` replaces the stored one whatever its `version`
///   (newer shape, and also an older one);
/// - snapshots are keyed by aggregate type *and* id;
/// - snapshots are not events: saving one changes neither the head nor the outbox.
///
/// # Panics
/// On any violation or store error.
pub async fn snapshots(store: &dyn EventStore) {
    const C: &str = "snapshots";
    let id = Uuid::new_v4();
    let head0 = ok(C, "head", store.head().await);
    let backlog0 = ok(C, "outbox_backlog", store.outbox_backlog().await);
    let load = |aggregate_type: &'static str, id: Uuid| async move {
        ok(
            C,
            "load_snapshot",
            store.load_snapshot(aggregate_type, id).await,
        )
    };
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, id).await,
        None,
        "conformance::{C}: a snapshot of an aggregate that has none"
    );

    let first = sample_snapshot(id, 20, 1);
    assert!(
        ok(C, "save", store.save_snapshot(&first).await),
        "conformance::{C}: the first save of an aggregate was refused"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, id).await,
        Some(first.clone()),
        "conformance::{C}: the saved snapshot does not load back exactly"
    );

    // Never backwards within one snapshot_version.
    let older = sample_snapshot(id, 10, 1);
    assert!(
        !ok(C, "save", store.save_snapshot(&older).await),
        "conformance::{C}: a save at a lower version reported that it replaced the snapshot"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, id).await,
        Some(first.clone()),
        "conformance::{C}: a save at a lower version moved the snapshot backwards"
    );
    let again = StoredSnapshot {
        state: serde_json::json!({ "same": "version" }),
        ..sample_snapshot(id, 20, 1)
    };
    assert!(
        ok(C, "save", store.save_snapshot(&again).await),
        "conformance::{C}: a save at the same version was refused"
    );
    let newer = sample_snapshot(id, 30, 1);
    assert!(
        ok(C, "save", store.save_snapshot(&newer).await),
        "conformance::{C}: a save at a higher version was refused"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, id).await,
        Some(newer.clone()),
        "conformance::{C}: a save at a higher version did not replace the snapshot"
    );

    // Another snapshot_version always replaces, even at a lower version: the stored one has a
    // shape the writer cannot use.
    let reshaped = sample_snapshot(id, 5, 2);
    assert!(
        ok(C, "save", store.save_snapshot(&reshaped).await),
        "conformance::{C}: a save with a newer snapshot_version was refused"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, id).await,
        Some(reshaped.clone()),
        "conformance::{C}: a newer snapshot_version did not replace the snapshot"
    );
    let rolled_back = sample_snapshot(id, 4, 1);
    assert!(
        ok(C, "save", store.save_snapshot(&rolled_back).await),
        "conformance::{C}: a save with an older snapshot_version was refused"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, id).await,
        Some(rolled_back.clone()),
        "conformance::{C}: an older snapshot_version did not replace the snapshot"
    );

    // Keyed by type and id.
    assert_eq!(
        load("content", id).await,
        None,
        "conformance::{C}: load_snapshot(\"content\", id) returned the user's snapshot"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, Uuid::new_v4()).await,
        None,
        "conformance::{C}: an unknown aggregate has a snapshot"
    );
    let content = StoredSnapshot {
        aggregate_type: "content".to_string(),
        ..sample_snapshot(id, 1, 1)
    };
    let other = sample_snapshot(Uuid::new_v4(), 1, 1);
    for s in [&content, &other] {
        assert!(
            ok(C, "save", store.save_snapshot(s).await),
            "conformance::{C}: the first save of another aggregate was refused"
        );
    }
    assert_eq!(
        load("content", id).await,
        Some(content),
        "conformance::{C}: snapshot of content/id"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, other.aggregate_id).await,
        Some(other),
        "conformance::{C}: snapshot of another user"
    );
    assert_eq!(
        load(SAMPLE_AGGREGATE_TYPE, id).await,
        Some(rolled_back),
        "conformance::{C}: saves of other aggregates changed this one's snapshot"
    );

    assert_eq!(
        ok(C, "head", store.head().await),
        head0,
        "conformance::{C}: saving snapshots changed the head"
    );
    assert_eq!(
        ok(C, "outbox_backlog", store.outbox_backlog().await),
        backlog0,
        "conformance::{C}: saving snapshots changed the outbox"
    );
}
