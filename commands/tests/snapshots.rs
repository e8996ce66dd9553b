//! Persisted aggregate snapshots (issue #6) against a real SQLite event store file: when they
//! are written, that a load from a snapshot gives exactly the state of a full fold, and that
//! snapshots of another shape, undecodable ones and failed saves never change an outcome.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use cqrs_es::Aggregate;
use rusqlite::Connection;
use serde_json::json;
use tektree_commands::{CommandHandler, CommandMeta, LoadSource, DEFAULT_SNAPSHOT_INTERVAL};
use tektree_domain::events::Activity;
use tektree_domain::{Actor, GamificationRules, Profile, ProfileCommand, SnapshotVersion};
use tektree_event_store::{EventStore, SqliteStore, StoredSnapshot};
use uuid::Uuid;

const PROFILE: &str = <Profile as Aggregate>::TYPE;

struct Env {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: Arc<dyn EventStore>,
    rules: GamificationRules,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("snapshots.db");
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&path).expect("open"));
    Env {
        _dir: dir,
        path,
        store,
        rules: GamificationRules::default(),
    }
}

impl Env {
    /// A handler without state cache (every load goes to the store) and the given interval.
    fn handler(&self, interval: u64) -> CommandHandler {
        CommandHandler::new(Arc::clone(&self.store))
            .with_cache_capacity(0)
            .with_snapshot_interval(interval)
    }

    /// The reference: the aggregate folded from its first event by a handler that neither
    /// reads nor writes snapshots.
    async fn full_fold(&self, user: Uuid) -> (Profile, u64) {
        let (state, version, source) = self
            .handler(0)
            .load_with_source::<Profile>(user)
            .await
            .expect("full fold");
        assert_eq!(source, LoadSource::Events);
        (state, version)
    }

    async fn stored(&self, user: Uuid) -> Option<StoredSnapshot> {
        self.store
            .load_snapshot(PROFILE, user)
            .await
            .expect("load_snapshot")
    }

    /// Runs `n` commands (see [`award`]) numbered `first..first + n`; returns the versions
    /// after each.
    async fn award_n(
        &self,
        h: &CommandHandler,
        user: Uuid,
        first: u32,
        n: u32,
        rich: bool,
    ) -> Vec<u64> {
        let mut versions = Vec::new();
        for i in first..first + n {
            let meta = CommandMeta::new(Actor::importer(), Utc::now());
            let outcome = h
                .execute::<Profile>(user, award(user, i, rich), &self.rules, &meta)
                .await
                .expect("award");
            versions.push(outcome.version);
        }
        versions
    }
}

fn day0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-05T10:00:00Z")
        .expect("date")
        .with_timezone(&Utc)
}

/// Command `i` on `user`. Plain: 3 XP and no activity, so exactly one event per command and
/// no level-up for the first 33 commands (level 2 starts at 100 XP). Rich: 40 XP and an
/// authored activity on day `i`, so the state grows counters, active days and streaks, and
/// commands emit several events (level-ups, unlocks, milestones).
fn award(user: Uuid, i: u32, rich: bool) -> ProfileCommand {
    let (amount, activity) = if rich {
        let a = match i % 3 {
            0 => Activity::Question,
            1 => Activity::Answer {
                answer_id: Uuid::from_u128(u128::from(i)),
            },
            _ => Activity::Comment,
        };
        (40, Some(a))
    } else {
        (3, None)
    };
    ProfileCommand::AwardXp {
        user_id: user,
        amount,
        source_event_id: Uuid::new_v4(),
        source_event_type: "knowledge.content.upvoted".into(),
        source_occurred_at: day0() + Duration::days(i64::from(i)),
        tags: vec!["rust".into(), "zoë".into()],
        area_id: None,
        activity,
    }
}

fn foreign(
    user: Uuid,
    version: u64,
    snapshot_version: u32,
    state: serde_json::Value,
) -> StoredSnapshot {
    StoredSnapshot {
        aggregate_type: PROFILE.to_string(),
        aggregate_id: user,
        version,
        snapshot_version,
        state,
        taken_at: Utc::now(),
    }
}

#[tokio::test]
async fn every_tenth_version_is_snapshotted_and_a_load_from_it_equals_the_full_fold() {
    let e = env();
    let h = e.handler(10);
    let user = Uuid::new_v4();
    let versions = e.award_n(&h, user, 0, 25, false).await;
    assert_eq!(
        versions,
        (1..=25).collect::<Vec<u64>>(),
        "one event per command"
    );

    let snapshot = e.stored(user).await.expect("a snapshot was saved");
    assert_eq!(snapshot.aggregate_type, PROFILE);
    assert_eq!(snapshot.aggregate_id, user);
    assert_eq!(snapshot.version, 20, "the latest crossing");
    assert_eq!(snapshot.snapshot_version, Profile::SNAPSHOT_VERSION);
    // The stored state is the fold of exactly the first 20 events.
    let mut at_20 = Profile::default();
    for env in &e.store.load(PROFILE, user).await.expect("load")[..20] {
        at_20.apply(env.decode().expect("decode"));
    }
    let stored: Profile = serde_json::from_value(snapshot.state).expect("state deserialises");
    assert_eq!(stored, at_20);
    assert_eq!(stored.xp, 60);

    let counts = h.snapshot_counts();
    assert_eq!(counts.saved, 2, "at versions 10 and 20");
    assert_eq!(counts.save_failures, 0);
    assert_eq!(
        counts.loads_from_snapshot, 15,
        "commands 11..=25 loaded from the snapshot at 10 or 20"
    );
    assert_eq!(counts.ignored, 0);

    let (state, version, source) = h.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!(source, LoadSource::Snapshot { version: 20 });
    assert_eq!(version, 25);
    let (full, full_version) = e.full_fold(user).await;
    assert_eq!((state, version), (full.clone(), full_version));
    assert_eq!(full.xp, 75);
    assert_eq!(full.awarded.len(), 25);
}

#[tokio::test]
async fn a_command_jumping_over_a_multiple_snapshots_its_new_version() {
    let e = env();
    let h = e.handler(10);
    let user = Uuid::new_v4();
    let versions = e.award_n(&h, user, 0, 30, true).await;
    assert!(
        versions.windows(2).any(|w| w[1] - w[0] > 1),
        "some commands emit several events: {versions:?}"
    );
    // The last command whose move crossed a multiple of 10 wrote the snapshot.
    let crossing = std::iter::once(0)
        .chain(versions.iter().copied())
        .collect::<Vec<u64>>()
        .windows(2)
        .rev()
        .find(|w| w[0] / 10 != w[1] / 10)
        .map(|w| w[1])
        .expect("a crossing");
    let snapshot = e.stored(user).await.expect("snapshot");
    assert_eq!(snapshot.version, crossing, "versions {versions:?}");

    let (state, version, source) = h.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!(source, LoadSource::Snapshot { version: crossing });
    let (full, full_version) = e.full_fold(user).await;
    assert_eq!(version, full_version);
    assert_eq!(state, full, "a rich state folds the same from its snapshot");
    assert!(!full.progress.counts.is_empty(), "the state has progress");
}

#[tokio::test]
async fn a_snapshot_of_another_snapshot_version_is_ignored_then_replaced_at_the_next_crossing() {
    let e = env();
    let h = e.handler(10);
    let user = Uuid::new_v4();
    e.award_n(&h, user, 0, 25, false).await;
    // A snapshot in a shape this build does not know (a newer build's, say) at version 20.
    let other_shape = foreign(
        user,
        20,
        Profile::SNAPSHOT_VERSION + 1,
        json!({ "xp": 1_000_000, "awarded": [], "progress": "another shape" }),
    );
    assert!(e.store.save_snapshot(&other_shape).await.expect("save"));

    let (state, version, source) = h.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!(source, LoadSource::Events, "the snapshot is ignored");
    assert_eq!((state, version), e.full_fold(user).await);
    assert_eq!(h.snapshot_counts().ignored, 1);

    // Commands 26..=30 fold from the first event too, and the crossing at 30 replaces it.
    e.award_n(&h, user, 25, 5, false).await;
    let snapshot = e.stored(user).await.expect("snapshot");
    assert_eq!(snapshot.version, 30);
    assert_eq!(snapshot.snapshot_version, Profile::SNAPSHOT_VERSION);
    let stored: Profile = serde_json::from_value(snapshot.state).expect("deserialises");
    let (full, _) = e.full_fold(user).await;
    assert_eq!(stored, full);
    let (_, _, source) = h.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!(source, LoadSource::Snapshot { version: 30 });
}

#[tokio::test]
async fn a_snapshot_that_does_not_deserialise_is_ignored() {
    let e = env();
    let h = e.handler(10);
    let user = Uuid::new_v4();
    e.award_n(&h, user, 0, 12, false).await;
    assert_eq!(e.stored(user).await.expect("snapshot").version, 10);
    let garbage = foreign(
        user,
        10,
        Profile::SNAPSHOT_VERSION,
        json!({ "xp": "a lot", "awarded": 5 }),
    );
    assert!(e.store.save_snapshot(&garbage).await.expect("save"));

    let (state, version, source) = h.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!(source, LoadSource::Events);
    assert_eq!((state, version), e.full_fold(user).await);
    assert_eq!(version, 12);
    assert_eq!(h.snapshot_counts().ignored, 1);
    // Commands still work on the right state.
    let versions = e.award_n(&h, user, 12, 1, false).await;
    assert_eq!(versions, vec![13]);
    assert_eq!(e.full_fold(user).await.0.xp, 39);
}

#[tokio::test]
async fn a_snapshot_ahead_of_the_stored_events_is_ignored() {
    let e = env();
    let h = e.handler(10);
    let user = Uuid::new_v4();
    e.award_n(&h, user, 0, 12, false).await;
    let (full, _) = e.full_fold(user).await;
    // A well-formed snapshot whose version has no event in this store (a file restored from
    // another history): using it would fold nothing and append at a version that is not the
    // aggregate's.
    let mut ahead = full.clone();
    ahead.xp = 999;
    let ahead = foreign(
        user,
        500,
        Profile::SNAPSHOT_VERSION,
        serde_json::to_value(&ahead).expect("json"),
    );
    assert!(e.store.save_snapshot(&ahead).await.expect("save"));
    let (state, version, source) = h.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!(source, LoadSource::Events);
    assert_eq!((state, version), (full, 12));
    assert_eq!(h.snapshot_counts().ignored, 1);
}

#[tokio::test]
async fn a_failed_snapshot_save_does_not_fail_the_command() {
    let e = env();
    let h = e.handler(10);
    let user = Uuid::new_v4();
    // Real SQLite fault injection on a second connection to the same file: the database
    // refuses every snapshot write (the events and outbox tables are untouched).
    let raw = Connection::open(&e.path).expect("raw open");
    raw.execute_batch(
        "CREATE TRIGGER refuse_snapshot_insert BEFORE INSERT ON snapshots \
         BEGIN SELECT RAISE(ABORT, 'snapshots are read-only'); END; \
         CREATE TRIGGER refuse_snapshot_update BEFORE UPDATE ON snapshots \
         BEGIN SELECT RAISE(ABORT, 'snapshots are read-only'); END;",
    )
    .expect("triggers");

    let versions = e.award_n(&h, user, 0, 12, false).await;
    assert_eq!(
        versions,
        (1..=12).collect::<Vec<u64>>(),
        "every command committed"
    );
    let counts = h.snapshot_counts();
    assert_eq!(
        (counts.saved, counts.save_failures),
        (0, 1),
        "the save at 10 failed"
    );
    assert_eq!(e.stored(user).await, None);
    let (state, version) = e.full_fold(user).await;
    assert_eq!((state.xp, version), (36, 12));
    assert_eq!(
        e.store.outbox_backlog().await.expect("backlog"),
        12,
        "every event has its outbox record"
    );

    // Once the database accepts snapshots again, the next crossing saves one.
    raw.execute_batch("DROP TRIGGER refuse_snapshot_insert; DROP TRIGGER refuse_snapshot_update;")
        .expect("drop triggers");
    e.award_n(&h, user, 12, 8, false).await;
    assert_eq!(e.stored(user).await.expect("snapshot").version, 20);
    assert_eq!(h.snapshot_counts().saved, 1);
}

#[tokio::test]
async fn interval_zero_neither_writes_nor_reads_snapshots() {
    let e = env();
    let off = e.handler(0);
    let user = Uuid::new_v4();
    e.award_n(&off, user, 0, 25, false).await;
    assert_eq!(e.stored(user).await, None);
    // Even a valid snapshot is not read.
    let (state, _) = e.full_fold(user).await;
    let valid = foreign(
        user,
        20,
        Profile::SNAPSHOT_VERSION,
        serde_json::to_value(&state).expect("json"),
    );
    assert!(e.store.save_snapshot(&valid).await.expect("save"));
    let (_, version, source) = off.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!((version, source), (25, LoadSource::Events));
    assert_eq!(off.snapshot_counts(), Default::default());
}

#[tokio::test]
async fn a_new_handler_starts_from_the_snapshot_then_from_its_cache() {
    let e = env();
    let user = Uuid::new_v4();
    e.award_n(&e.handler(10), user, 0, 23, false).await;
    // As after a restart: a handler with the default cache and the default interval.
    let fresh = CommandHandler::new(Arc::clone(&e.store)).with_snapshot_interval(10);
    assert_eq!(
        CommandHandler::new(Arc::clone(&e.store)).snapshot_interval(),
        DEFAULT_SNAPSHOT_INTERVAL
    );
    let (first, v1, s1) = fresh.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!((v1, s1), (23, LoadSource::Snapshot { version: 20 }));
    let (second, v2, s2) = fresh.load_with_source::<Profile>(user).await.expect("load");
    assert_eq!((v2, s2), (23, LoadSource::Cache { version: 23 }));
    assert_eq!(first, second);
    assert_eq!(first, e.full_fold(user).await.0);
}
