//! `MongoReadModels` against a **real** MongoDB replica set named by `MONGODB_URI` (see
//! `docs/mongodb.md`), checked for equivalence with `SqliteReadModels`: the same sequence of
//! `apply` calls (shuffled, duplicated, gapped, in random batches) must give the same outcomes,
//! the same exports of every read model, the same checkpoints and the same point queries; then
//! reset and rebuild, two concurrent handles, invalid arguments, export pages that end inside
//! runs of equal XP and between boards, and index-backed ranking and export pages; rebuilds
//! beside the live read model (the backend-neutral check of `rebuilds/mod.rs`, the generation
//! collections they create, keep and drop, and live writers racing a switch).
//!
//! Without `MONGODB_URI` each test starts its own SecantusDB (`secantusd-py`, installed by
//! `scripts/test`); with neither it fails. Each run uses a fresh database
//! that is dropped at the end, also when a check fails.

#![cfg(feature = "mongodb")]

mod paging;
mod ranking;
mod rebuilds;

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use mongodb::bson::{doc, Bson, Document};
use paging::export_in_pages;
use serde_json::Value;
use tektree_domain::Tier;
use tektree_mongo::ServerBuild;
use tektree_projections::mongo::{
    collection_name, export_queries, planned_finds, uuid_bson, CHECKPOINT, EXPORT_INDEX, GUARD,
    LEADERBOARD, RANK_INDEX, TREE, TREE_INDEX,
};
use tektree_projections::{
    ApplyOutcome, Change, ContentDelta, EventKey, MongoReadModels, Projection, ReadModel,
    ReadModelError, ReadModelStore, RebuildPhase, RebuildSwitch, SqliteReadModels,
};
use tektree_test_servers::MongoServer;
use uuid::Uuid;

const MODELS: [ReadModel; 5] = [
    ReadModel::Xp,
    ReadModel::Leaderboard,
    ReadModel::Quota,
    ReadModel::Content,
    ReadModel::Tags,
];

/// The tags random changes use, and one no change uses.
const TAGS: [&str; 4] = ["rust", "c++", "node.js", "unused"];

/// A server for this test: SecantusDB started on a free port, or the deployment named by
/// `MONGODB_URI`; panics (the suite fails) when there is none.
fn server() -> MongoServer {
    MongoServer::start()
}

/// Runs `checks(uri, database)` on a fresh database and drops it afterwards, whatever happened.
async fn with_database<F>(uri: &str, checks: impl FnOnce(String, String) -> F)
where
    F: std::future::Future<Output = ()>,
{
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!("tektree_rm_{}_{nanos}", std::process::id());
    let outcome = AssertUnwindSafe(checks(uri.to_string(), name.clone()))
        .catch_unwind()
        .await;
    match mongodb::Client::with_uri_str(uri).await {
        Ok(client) => {
            if let Err(e) = client.database(&name).drop().await {
                eprintln!("could not drop test database {name}: {e}");
            }
        }
        Err(e) => eprintln!("could not drop test database {name}: {e}"),
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The two stores under comparison.
struct Pair {
    mongo: MongoReadModels,
    sqlite: SqliteReadModels,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// Applies one batch to both; the outcomes (or error kinds) must agree.
    async fn apply(&self, consumer: &str, items: &[(EventKey, Vec<Change>)]) -> Vec<ApplyOutcome> {
        let m = self.mongo.apply(consumer, items).await;
        let s = self.sqlite.apply(consumer, items).await;
        match (m, s) {
            (Ok(m), Ok(s)) => {
                assert_eq!(m, s, "{consumer}: outcomes differ");
                m
            }
            (Err(ReadModelError::Invalid(_)), Err(ReadModelError::Invalid(_))) => vec![],
            (m, s) => panic!("{consumer}: mongo {m:?} vs sqlite {s:?}"),
        }
    }

    /// Every read model, every checkpoint and every point query agree.
    async fn assert_same(&self, what: &str) {
        let mut users = Vec::new();
        for model in MODELS {
            let (m, s) = (
                export(&self.mongo, model).await,
                export(&self.sqlite, model).await,
            );
            assert_eq!(m, s, "{what}: export of {model:?} differs");
            for row in &m {
                if let Some(u) = row.get("user_id").and_then(Value::as_str) {
                    users.push(Uuid::parse_str(u).unwrap());
                }
            }
        }
        assert_eq!(
            self.mongo.checkpoints().await.unwrap(),
            self.sqlite.checkpoints().await.unwrap(),
            "{what}: checkpoints differ"
        );
        users.push(Uuid::from_u128(999));
        for &u in &users {
            assert_eq!(
                self.mongo.user_xp(u).await.unwrap(),
                self.sqlite.user_xp(u).await.unwrap(),
                "{what}: user_xp({u})"
            );
            for period in PERIODS {
                assert_eq!(
                    self.mongo.quota(u, period).await.unwrap(),
                    self.sqlite.quota(u, period).await.unwrap(),
                    "{what}: quota({u}, {period})"
                );
            }
            for board in BOARDS {
                assert_eq!(
                    self.mongo.rank(board, u).await.unwrap(),
                    self.sqlite.rank(board, u).await.unwrap(),
                    "{what}: rank({board}, {u})"
                );
            }
        }
        for c in 0..=CONTENT as u128 {
            let id = content_id(c);
            assert_eq!(
                self.mongo.content(id).await.unwrap(),
                self.sqlite.content(id).await.unwrap(),
                "{what}: content({id})"
            );
        }
        for tag in TAGS {
            assert_eq!(
                self.mongo.tag(tag).await.unwrap(),
                self.sqlite.tag(tag).await.unwrap(),
                "{what}: tag({tag})"
            );
        }
        for board in BOARDS {
            for (limit, offset) in [(3, 0), (3, 2), (100, 0), (0, 0), (2, 50)] {
                assert_eq!(
                    self.mongo.leaderboard(board, limit, offset).await.unwrap(),
                    self.sqlite.leaderboard(board, limit, offset).await.unwrap(),
                    "{what}: leaderboard({board}, {limit}, {offset})"
                );
            }
        }
    }
}

/// Every row of `model`, in pages of 7.
async fn export(store: &dyn ReadModelStore, model: ReadModel) -> Vec<Value> {
    export_in_pages(store, model, 7).await
}

/// One consumer's batch items.
type Items = Vec<(EventKey, Vec<Change>)>;

const USERS: u128 = 5;
const CONTENT: usize = 4;
const BOARDS: [&str; 4] = ["all-time", "tag:go", "tag:rust", "weekly:2024-W01"];
const PERIODS: [&str; 2] = ["2024-05", "2024-06"];
const TIERS: [Tier; 4] = [Tier::Free, Tier::Pro, Tier::Team, Tier::Enterprise];

fn user(n: u128) -> Uuid {
    Uuid::from_u128(n + 1)
}

fn content_id(n: u128) -> Uuid {
    Uuid::from_u128(0x1000 + n)
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// A random change of the read model that `consumer` maintains.
fn random_change(rng: &mut Rng, consumer: &str) -> Change {
    let u = user(rng.below(USERS as u64) as u128);
    let maybe = |rng: &mut Rng, id: Uuid| (rng.below(4) == 0).then_some(id);
    match consumer {
        "xp" => Change::Xp {
            user_id: u,
            xp: rng.below(30) as i64 - 8,
            questions: rng.below(2) as i64,
            answers: rng.below(2) as i64,
            accepted_answers: rng.below(2) as i64,
        },
        "leaderboard" => Change::Leaderboard {
            board: rng.pick(&BOARDS).to_string(),
            user_id: u,
            // Small values so that ties (broken by user id) are common.
            xp: rng.below(5) as i64 - 1,
        },
        "content" => Change::Content(ContentDelta {
            content_id: content_id(rng.below(CONTENT as u64) as u128),
            kind: (rng.below(5) == 0).then(|| rng.pick(&["question", "answer"])),
            question_id: maybe(rng, content_id(0)),
            author_id: maybe(rng, u),
            upvotes: rng.below(3) as i64 - 1,
            downvotes: rng.below(3) as i64 - 1,
            answers: rng.below(2) as i64,
            comments: rng.below(2) as i64,
            accepted_answer_id: maybe(rng, content_id(1)),
        }),
        "tags" => Change::Tag {
            tag: rng.pick(&TAGS[..3]).to_string(),
            questions: rng.below(2) as i64,
            answers: rng.below(3) as i64,
        },
        "quota" => match rng.below(4) {
            0 => Change::Tier {
                user_id: u,
                tier: rng.pick(&TIERS),
            },
            1 => Change::QuotaExceeded {
                user_id: u,
                period: rng.pick(&PERIODS).to_string(),
            },
            _ => Change::Usage {
                user_id: u,
                period: rng.pick(&PERIODS).to_string(),
                tier: rng.pick(&TIERS),
                used: rng.below(4),
                limit: (rng.below(3) > 0).then(|| rng.below(3)),
            },
        },
        other => panic!("no random changes for the consumer {other}"),
    }
}

/// `n` events of a few aggregates (positions 1..=n in a random interleaving) and, per
/// consumer, each event's changes.
fn history(rng: &mut Rng, n: u64) -> Vec<(String, Items)> {
    let aggregates: Vec<(&str, Uuid)> = (0..4u128)
        .map(|i| {
            (
                ["user", "content", "profile"][i as usize % 3],
                Uuid::from_u128(0x5000 + i),
            )
        })
        .collect();
    let mut next_seq: HashMap<Uuid, u64> = HashMap::new();
    let keys: Vec<EventKey> = (1..=n)
        .map(|position| {
            let (t, id) = rng.pick(&aggregates);
            let seq = next_seq.entry(id).or_insert(0);
            *seq += 1;
            EventKey {
                aggregate_type: t.to_string(),
                aggregate_id: id,
                sequence: *seq,
                position,
            }
        })
        .collect();
    let mut consumers: Vec<String> = Projection::ALL.iter().map(|p| p.to_string()).collect();
    consumers.push("policy.gamification".into());
    consumers
        .into_iter()
        .map(|c| {
            let items = keys
                .iter()
                .map(|k| {
                    let changes = if c.starts_with("policy") {
                        vec![]
                    } else {
                        (0..rng.below(3)).map(|_| random_change(rng, &c)).collect()
                    };
                    (k.clone(), changes)
                })
                .collect();
            (c, items)
        })
        .collect()
}

/// Delivers `items` to both stores shuffled, with duplicates, in random batches, requeueing
/// gaps, then redelivers everything; returns the number of applied events.
async fn deliver(pair: &Pair, rng: &mut Rng, consumer: &str, items: &[(EventKey, Vec<Change>)]) {
    let n = items.len();
    let mut order: Vec<usize> = (0..n).collect();
    for i in 0..n {
        if rng.below(4) == 0 {
            order.push(i);
        }
    }
    rng.shuffle(&mut order);
    let mut queue: VecDeque<usize> = order.into();
    let (mut applied, mut rounds) = (0, 0);
    while !queue.is_empty() {
        rounds += 1;
        assert!(rounds < 10_000, "delivery does not progress");
        let k = 1 + rng.below(queue.len().min(6) as u64) as usize;
        let take: Vec<usize> = queue.drain(..k).collect();
        let batch: Vec<_> = take.iter().map(|&i| items[i].clone()).collect();
        let outcomes = pair.apply(consumer, &batch).await;
        for (i, o) in take.into_iter().zip(outcomes) {
            match o {
                ApplyOutcome::Applied => applied += 1,
                ApplyOutcome::Duplicate => {}
                ApplyOutcome::Gap { .. } => {
                    let at = rng.below(queue.len() as u64 + 1) as usize;
                    queue.insert(at, i);
                }
            }
        }
    }
    assert_eq!(applied, n, "{consumer}: every event applied exactly once");
    let again: Vec<_> = items.to_vec();
    let out = pair.apply(consumer, &again).await;
    assert!(out.iter().all(|o| *o == ApplyOutcome::Duplicate));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_read_models_match_sqlite() {
    let server = server();
    let uri = server.url.clone();
    with_database(&uri, |uri, db| async move {
        let dir = tempfile::tempdir().unwrap();
        let pair = Pair {
            mongo: MongoReadModels::connect(&uri, &db).await.expect("connect"),
            sqlite: SqliteReadModels::open(dir.path().join("reference.db")).unwrap(),
            _dir: dir,
        };
        // connect is idempotent.
        MongoReadModels::connect(&uri, &db)
            .await
            .expect("second connect");
        invalid_arguments_agree(&pair).await;
        pair.assert_same("empty").await;

        let mut rng = Rng(0x7e47_7e47);
        for round in 0..3 {
            for (consumer, items) in history(&mut rng, 40) {
                // Fresh aggregates per round would need fresh keys; instead each round uses
                // its own consumer names so that guards start empty.
                let consumer = if round == 0 {
                    consumer
                } else {
                    format!("{consumer}.{round}")
                };
                deliver(&pair, &mut rng, &consumer, &items).await;
            }
            pair.assert_same(&format!("after round {round}")).await;
        }

        // Reset and rebuild one projection.
        for p in [Projection::Quota, Projection::Leaderboard] {
            pair.mongo.reset(p).await.unwrap();
            pair.sqlite.reset(p).await.unwrap();
            pair.assert_same(&format!("after reset {p}")).await;
        }
        assert!("policy.gamification".parse::<Projection>().is_err());
        for (consumer, items) in history(&mut rng, 30) {
            if consumer == "quota" || consumer == "leaderboard" {
                deliver(&pair, &mut rng, &consumer, &items).await;
            }
        }
        pair.assert_same("after rebuild").await;

        export_pages_continue_across_ties_and_boards(&pair).await;
        ranking_is_answered_from_the_index(&pair.mongo).await;
        exports_are_answered_from_indexes(&pair.mongo).await;
        two_handles_apply_each_event_exactly_once(&pair.mongo, &uri, &db).await;
    })
    .await;
}

/// Ranks, pages at every offset and "around me" on MongoDB equal a plain sort of the summed
/// XP (the SQLite suite runs the same check as a property test over many more histories).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_ranks_pages_and_around_me_equal_a_full_sort() {
    let server = server();
    // A mixed history, and one tie of 130 entries per board (its trie node is split).
    for (users, ties) in [(100, false), (130, true)] {
        with_database(&server.url, |uri, db| async move {
            let mongo = MongoReadModels::connect(&uri, &db).await.expect("connect");
            let h = if ties {
                ranking::ties(users, 0x5eed_0002)
            } else {
                ranking::history(users, 0x5eed_0001)
            };
            ranking::apply_and_check(&mongo, &h, 5).await;
            // A database written before the trie existed: connect builds it.
            mongo
                .database()
                .collection::<Document>(TREE)
                .delete_many(doc! {})
                .await
                .unwrap();
            let reconnected = MongoReadModels::connect(&uri, &db).await.expect("connect");
            ranking::check(&reconnected, &h, 9).await;
        })
        .await;
    }
}

async fn invalid_arguments_agree(pair: &Pair) {
    let k = |sequence, position| EventKey {
        aggregate_type: "profile".into(),
        aggregate_id: user(0),
        sequence,
        position,
    };
    let usage = Change::Usage {
        user_id: user(0),
        period: "2024-05".into(),
        tier: Tier::Free,
        used: u64::MAX,
        limit: None,
    };
    for (consumer, items) in [
        ("", vec![(k(1, 1), vec![])]),
        ("c", vec![(k(0, 1), vec![])]),
        ("c", vec![(k(1, 0), vec![])]),
        ("c", vec![(k(1, u64::MAX), vec![])]),
        ("c", vec![(k(1, 1), vec![]), (k(2, 2), vec![usage])]),
    ] {
        for r in [
            pair.mongo.apply(consumer, &items).await,
            pair.sqlite.apply(consumer, &items).await,
        ] {
            assert!(matches!(r, Err(ReadModelError::Invalid(_))), "{r:?}");
        }
    }
    assert!(pair.mongo.apply("c", &[]).await.unwrap().is_empty());
    for r in [
        pair.mongo.leaderboard("all-time", 10, u64::MAX).await,
        pair.sqlite.leaderboard("all-time", 10, u64::MAX).await,
    ] {
        assert!(matches!(r, Err(ReadModelError::Invalid(_))));
    }
}

/// Two boards after every other one (`~` sorts after letters), each with a run of equal XP:
/// exported in pages of every size from 1 to 9 (so pages end inside each run, at the end of
/// each board and between them), both stores give the rows and ranks computed here.
async fn export_pages_continue_across_ties_and_boards(pair: &Pair) {
    let entries: [(&str, u128, i64); 8] = [
        ("~a", 7, 5),
        ("~a", 2, 5),
        ("~a", 4, 5),
        ("~a", 1, 2),
        ("~a", 3, 8),
        ("~b", 6, 9),
        ("~b", 5, 4),
        ("~b", 2, 4),
    ];
    let items: Items = entries
        .iter()
        .enumerate()
        .map(|(i, &(b, u, xp))| {
            (
                EventKey {
                    aggregate_type: "profile".into(),
                    aggregate_id: Uuid::from_u128(0x7000 + i as u128),
                    sequence: 1,
                    position: i as u64 + 1,
                },
                vec![Change::Leaderboard {
                    board: b.into(),
                    user_id: user(u),
                    xp,
                }],
            )
        })
        .collect();
    let out = pair.apply("leaderboard.pages", &items).await;
    assert!(out.iter().all(|o| *o == ApplyOutcome::Applied));
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|&(b, u, xp)| (b, std::cmp::Reverse(xp), user(u)));
    let mut expected = vec![];
    for (i, &(b, u, xp)) in sorted.iter().enumerate() {
        let rank = 1 + sorted[..i].iter().filter(|e| e.0 == b).count();
        expected.push(serde_json::json!({"board": b, "rank": rank, "user_id": user(u), "xp": xp}));
    }
    let whole = export_in_pages(&pair.sqlite, ReadModel::Leaderboard, 10_000).await;
    assert_eq!(
        whole[whole.len() - expected.len()..],
        expected[..],
        "the two boards come last, ranked"
    );
    for page in 1..=9 {
        for store in [&pair.mongo as &dyn ReadModelStore, &pair.sqlite] {
            let rows = export_in_pages(store, ReadModel::Leaderboard, page).await;
            assert_eq!(rows, whole, "pages of {page}");
        }
    }
    // A cursor continues only its own model's export.
    let page = pair
        .mongo
        .export(ReadModel::Leaderboard, None, 1)
        .await
        .unwrap();
    let cursor = page.next.expect("a full page has a cursor");
    for r in [
        pair.mongo.export(ReadModel::Xp, Some(&cursor), 5).await,
        pair.mongo.export(ReadModel::Leaderboard, None, 0).await,
    ] {
        assert!(matches!(r, Err(ReadModelError::Invalid(_))), "{r:?}");
    }
}

/// Every range read of an export page, from the start and after a cursor from the middle of
/// each model, is answered from an index of its collection: no collection scan (and, on
/// mongod, no in-memory sort).
async fn exports_are_answered_from_indexes(mongo: &MongoReadModels) {
    let build = ServerBuild::of(mongo.database().client())
        .await
        .expect("buildInfo");
    for (model, allowed) in [
        (ReadModel::Xp, &[EXPORT_INDEX, "_id_"][..]),
        (ReadModel::Content, &[EXPORT_INDEX, "_id_"][..]),
        (ReadModel::Tags, &[EXPORT_INDEX, "_id_"][..]),
        (ReadModel::Quota, &["user_period"][..]),
        (ReadModel::Leaderboard, &[RANK_INDEX, "board_user"][..]),
    ] {
        let first = mongo.export(model, None, 2).await.unwrap();
        let cursor = first.next.expect("the model has more than one page of 2");
        let mut queries = export_queries(model, None).unwrap();
        queries.extend(export_queries(model, Some(&cursor)).unwrap());
        for q in queries {
            let mut command = doc! {
                "find": q.collection, "filter": q.filter, "sort": q.sort, "limit": 7_i64,
            };
            if let Some(p) = q.projection {
                command.insert("projection", p);
            }
            let (stages, indexes) = explain(mongo, &command).await;
            assert!(
                !stages.iter().any(|s| s == "COLLSCAN"),
                "{build}: {command}: {stages:?}"
            );
            assert!(
                !indexes.is_empty() && indexes.iter().all(|i| allowed.contains(&i.as_str())),
                "{build}: {command}: {indexes:?}"
            );
            if build.is_mongod() {
                assert!(
                    !stages.iter().any(|s| s == "SORT"),
                    "{build}: {command}: {stages:?}"
                );
            }
        }
    }
}

/// Stage and index names of the winning plans of `command`, explained (`queryPlanner`).
async fn explain(mongo: &MongoReadModels, command: &Document) -> (Vec<String>, Vec<String>) {
    let reply = mongo
        .database()
        .run_command(doc! { "explain": command.clone(), "verbosity": "queryPlanner" })
        .await
        .expect("explain");
    plan_of(&reply)
}

/// Stage and index names of every winning plan in an explain reply.
fn plan_of(reply: &Document) -> (Vec<String>, Vec<String>) {
    fn walk(b: &Bson, in_plan: bool, stages: &mut Vec<String>, indexes: &mut Vec<String>) {
        match b {
            Bson::Document(d) => {
                for (k, v) in d {
                    let in_plan = in_plan || k == "winningPlan";
                    if in_plan && k == "stage" {
                        stages.extend(v.as_str().map(str::to_string));
                    }
                    if in_plan && k == "indexName" {
                        indexes.extend(v.as_str().map(str::to_string));
                    }
                    walk(v, in_plan, stages, indexes);
                }
            }
            Bson::Array(items) => items.iter().for_each(|v| walk(v, in_plan, stages, indexes)),
            _ => {}
        }
    }
    let (mut stages, mut indexes) = (vec![], vec![]);
    walk(
        &Bson::Document(reply.clone()),
        false,
        &mut stages,
        &mut indexes,
    );
    (stages, indexes)
}

/// Every read of the count trie (children, sibling sums, a node) and of a leaf or a page
/// (ranges of the ranking index) is an index range: no collection scan; on mongod also no
/// in-memory sort, and entry reads are covered (no document fetch).
async fn ranking_is_answered_from_the_index(mongo: &MongoReadModels) {
    let build = ServerBuild::of(mongo.database().client())
        .await
        .expect("buildInfo");
    for command in planned_finds("tag:rust") {
        let (stages, indexes) = explain(mongo, &command).await;
        if let Ok(hint) = command.get_str("hint") {
            assert!(indexes.iter().any(|i| i == hint), "{command}: {indexes:?}");
        }
        assert!(
            !stages.iter().any(|s| s == "COLLSCAN"),
            "{build}: {command}: {stages:?}"
        );
        // An index-ordered (and, for entries, covered) scan is mongod's planner's property
        // (SecantusDB sorts and fetches in memory after the index scan): asserted where the
        // server is mongod.
        if build.is_mongod() {
            assert!(
                !stages.iter().any(|s| s == "SORT"),
                "{build}: {command}: {stages:?}"
            );
            if command.get_str("find") == Ok(LEADERBOARD) {
                assert!(
                    !stages.iter().any(|s| s == "FETCH"),
                    "{build}: {command}: {stages:?}"
                );
            }
        }
    }
    // The entry lookup by (board, user_id) uses the unique key index.
    let reply = mongo
        .database()
        .run_command(doc! {
            "explain": { "find": LEADERBOARD,
                         "filter": { "board": "tag:rust", "user_id": uuid_bson(user(1)) } },
            "verbosity": "queryPlanner",
        })
        .await
        .unwrap();
    let (stages, _) = plan_of(&reply);
    assert!(!stages.iter().any(|s| s == "COLLSCAN"), "{stages:?}");
}

/// Two handles (separate connection pools) deliver the same 60 events of one consumer, one
/// forwards and one backwards, concurrently: their transactions conflict on the checkpoint
/// and are retried; every event is applied exactly once.
async fn two_handles_apply_each_event_exactly_once(first: &MongoReadModels, uri: &str, db: &str) {
    let second = MongoReadModels::connect(uri, db).await.unwrap();
    let a = user(42);
    let items: Items = (0..60u64)
        .map(|i| {
            (
                EventKey {
                    aggregate_type: "content".into(),
                    aggregate_id: Uuid::from_u128(0x9000 + (i % 3) as u128),
                    sequence: i / 3 + 1,
                    position: i + 1,
                },
                vec![Change::Xp {
                    user_id: a,
                    xp: 1,
                    questions: 0,
                    answers: 0,
                    accepted_answers: 0,
                }],
            )
        })
        .collect();
    async fn run(store: MongoReadModels, items: Items, order: Vec<usize>, batch: usize) -> usize {
        let mut queue: VecDeque<usize> = order.into();
        let (mut applied, mut rounds) = (0, 0);
        while !queue.is_empty() {
            rounds += 1;
            assert!(rounds < 100_000, "delivery does not progress");
            let take: Vec<usize> = queue.drain(..batch.min(queue.len())).collect();
            let b: Vec<_> = take.iter().map(|&i| items[i].clone()).collect();
            let outcomes = store.apply("xp.concurrent", &b).await.unwrap();
            for (i, o) in take.into_iter().zip(outcomes) {
                match o {
                    ApplyOutcome::Applied => applied += 1,
                    ApplyOutcome::Duplicate => {}
                    ApplyOutcome::Gap { .. } => queue.push_back(i),
                }
            }
        }
        applied
    }
    let forward: Vec<usize> = (0..items.len()).collect();
    let backward: Vec<usize> = forward.iter().rev().copied().collect();
    let x = tokio::spawn(run(first.clone(), items.clone(), forward, 7));
    let y = tokio::spawn(run(second, items.clone(), backward, 5));
    assert_eq!(x.await.unwrap() + y.await.unwrap(), 60);
    assert_eq!(first.user_xp(a).await.unwrap().unwrap().xp, 60);
    let cp = first
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.name == "xp.concurrent")
        .unwrap();
    assert_eq!((cp.checkpoint, cp.applied), (60, 60));
}

/// Rebuilds beside the live read model (blue/green), for a one-collection model (`xp`) and one
/// with its count trie (`leaderboard`); see `rebuilds/mod.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilds_beside_the_live_version_switch_atomically_resume_and_cancel() {
    let server = server();
    for projection in [Projection::Xp, Projection::Leaderboard] {
        with_database(&server.url, |uri, db| async move {
            let mongo = MongoReadModels::connect(&uri, &db).await.expect("connect");
            rebuilds::blue_green(&mongo, projection).await;
        })
        .await;
    }
}

/// A leaderboard event: user `u` (of 4) gains `xp` on `all-time` at `position`, the
/// user's `position / 4 + 1`-th event when positions are 1, 2, 3, ….
fn board_item(position: u64, xp: i64) -> (EventKey, Vec<Change>) {
    let u = (position - 1) % 4;
    let user_id = user(u128::from(u));
    let key = EventKey {
        aggregate_type: "user".into(),
        aggregate_id: user_id,
        sequence: (position - 1) / 4 + 1,
        position,
    };
    let change = Change::Leaderboard {
        board: "all-time".into(),
        user_id,
        xp,
    };
    (key, vec![change])
}

/// The read-model collections of the leaderboard in `mongo`'s database, sorted.
async fn leaderboard_collections(mongo: &MongoReadModels) -> Vec<String> {
    let mut names: Vec<String> = mongo
        .database()
        .list_collection_names()
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(LEADERBOARD))
        .collect();
    names.sort();
    names
}

/// The names of both leaderboard collections of generation `g`, sorted.
fn generation(g: u64) -> Vec<String> {
    let mut names = vec![
        collection_name(LEADERBOARD, g).into_owned(),
        collection_name(TREE, g).into_owned(),
    ];
    names.sort();
    names
}

/// Index names of collection `name`, sorted.
async fn index_names(mongo: &MongoReadModels, name: &str) -> Vec<String> {
    let mut names = mongo
        .database()
        .collection::<Document>(name)
        .list_index_names()
        .await
        .unwrap();
    names.sort();
    names
}

/// How many guard documents consumer key `key` has.
async fn guards_of(mongo: &MongoReadModels, key: &str) -> u64 {
    mongo
        .database()
        .collection::<Document>(GUARD)
        .count_documents(doc! { "consumer": key })
        .await
        .unwrap()
}

/// The XP of user `u` on `all-time`.
async fn board_xp(store: &dyn ReadModelStore, u: u128) -> Option<i64> {
    store.rank("all-time", user(u)).await.unwrap().map(|r| r.xp)
}

/// What the MongoDB adapter does with collections: a rebuild's generation gets its own
/// collections with the live indexes; a switch keeps the retired ones (a query may still read
/// them) and deletes the old guard key's documents; the next rebuild drops them; a cancel
/// drops its own at once; a reconnect and a reset keep the live generation; changes of
/// another consumer follow the live generation; a rebuild refuses other models' changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_generations_are_collections_created_kept_and_dropped() {
    let server = server();
    with_database(&server.url, |uri, db| async move {
        let mongo = MongoReadModels::connect(&uri, &db).await.expect("connect");
        let lb = Projection::Leaderboard;
        let live: Vec<_> = (1..=8).map(|p| board_item(p, 1)).collect();
        mongo.apply("leaderboard", &live).await.unwrap();
        assert_eq!(leaderboard_collections(&mongo).await, generation(0));
        assert!(matches!(
            mongo.rebuild_apply(lb, &[]).await,
            Err(ReadModelError::Invalid(_))
        ));

        let begun = mongo.rebuild_begin(lb).await.unwrap();
        assert_eq!(begun.generation, 1);
        let mut both = generation(0);
        both.extend(generation(1));
        both.sort();
        assert_eq!(leaderboard_collections(&mongo).await, both);
        assert_eq!(
            index_names(&mongo, &collection_name(LEADERBOARD, 1)).await,
            vec!["_id_", "board_user", RANK_INDEX]
        );
        assert_eq!(
            index_names(&mongo, &collection_name(TREE, 1)).await,
            vec!["_id_", TREE_INDEX]
        );
        let xp = Change::Xp {
            user_id: user(0),
            xp: 1,
            questions: 0,
            answers: 0,
            accepted_answers: 0,
        };
        assert!(matches!(
            mongo
                .rebuild_apply(lb, &[(board_item(1, 1).0, vec![xp])])
                .await,
            Err(ReadModelError::Invalid(_))
        ));
        let rebuilt: Vec<_> = (1..=8).map(|p| board_item(p, 5)).collect();
        mongo.rebuild_apply(lb, &rebuilt).await.unwrap();
        assert_eq!(board_xp(&mongo, 0).await, Some(2), "live until the switch");
        assert_eq!(
            mongo.rebuild_switch(lb).await.unwrap(),
            RebuildSwitch::Switched
        );
        assert_eq!(mongo.live_generation(lb).await.unwrap(), 1);
        assert_eq!(board_xp(&mongo, 0).await, Some(10));
        // The retired version is kept (with its rows), its guard key's documents are not.
        assert_eq!(leaderboard_collections(&mongo).await, both);
        let retired = mongo.database().collection::<Document>(LEADERBOARD);
        assert_eq!(retired.count_documents(doc! {}).await.unwrap(), 4);
        assert_eq!(guards_of(&mongo, "leaderboard").await, 0);
        assert_eq!(guards_of(&mongo, "leaderboard#g1").await, 4);
        let checkpoints = mongo.database().collection::<Document>(CHECKPOINT);
        let head = checkpoints
            .find_one(doc! { "_id": "leaderboard" })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(head.get_i64("generation").unwrap(), 1);
        assert_eq!(head.get_str("state").unwrap(), "leaderboard#g1");
        assert_eq!(head.get_i64("checkpoint").unwrap(), 8);
        assert!(checkpoints
            .find_one(doc! { "_id": "leaderboard#g1" })
            .await
            .unwrap()
            .is_none());

        // Another consumer's leaderboard changes go to the live generation.
        let extra = [(board_item(1, 100).0, board_item(1, 100).1)];
        mongo.apply("leaderboard.extra", &extra).await.unwrap();
        assert_eq!(board_xp(&mongo, 0).await, Some(110));
        // A new handle (connect recreates nothing of generation 1) reads generation 1.
        let again = MongoReadModels::connect(&uri, &db).await.expect("connect");
        assert_eq!(board_xp(&again, 0).await, Some(110));

        // The next rebuild drops the retired generation and leftover documents of rebuild
        // consumers (an interrupted clean-up), keeping the live key's; its cancel drops its
        // own.
        mongo
            .database()
            .collection::<Document>(GUARD)
            .insert_one(doc! {
                "consumer": "leaderboard#g9", "aggregate_id": uuid_bson(user(0)),
                "aggregate_type": "user", "last_sequence": 1_i64,
            })
            .await
            .unwrap();
        let second = mongo.rebuild_begin(lb).await.unwrap();
        assert_eq!(second.generation, 2);
        assert_eq!(guards_of(&mongo, "leaderboard#g9").await, 0);
        assert_eq!(guards_of(&mongo, "leaderboard#g1").await, 4);
        assert_eq!(guards_of(&mongo, "leaderboard.extra").await, 1);
        let mut next = generation(1);
        next.extend(generation(2));
        next.sort();
        assert_eq!(leaderboard_collections(&mongo).await, next);
        mongo.rebuild_apply(lb, &rebuilt).await.unwrap();
        assert_eq!(guards_of(&mongo, "leaderboard#g2").await, 4);
        assert!(mongo.rebuild_cancel(lb).await.unwrap());
        assert_eq!(leaderboard_collections(&mongo).await, generation(1));
        assert_eq!(guards_of(&mongo, "leaderboard#g2").await, 0);
        assert_eq!(mongo.live_generation(lb).await.unwrap(), 1);
        assert_eq!(board_xp(&mongo, 0).await, Some(110));

        // A reset empties the live generation and keeps it live.
        mongo.reset(lb).await.unwrap();
        assert_eq!(mongo.live_generation(lb).await.unwrap(), 1);
        assert_eq!(board_xp(&mongo, 0).await, None);
        assert_eq!(guards_of(&mongo, "leaderboard#g1").await, 0);
        let names: Vec<String> = mongo
            .checkpoints()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, vec!["leaderboard.extra".to_string()]);
        let out = mongo.apply("leaderboard", &live).await.unwrap();
        assert!(out.iter().all(|o| *o == ApplyOutcome::Applied), "{out:?}");
        assert_eq!(board_xp(&mongo, 0).await, Some(2));
        assert_eq!(
            collection_name(LEADERBOARD, 1),
            format!("{LEADERBOARD}_g1"),
            "the documented names"
        );
    })
    .await;
}

/// A live worker applies events (in small batches, retrying gaps) while a rebuild of the same
/// projection code catches up in pages and tries to switch after each page: the switch
/// happens while the worker writes, and afterwards every event is applied exactly once to the
/// live version (the sums and the live consumer's `applied` count say so). A batch that
/// committed to the retired version after the switch, or applied again what the rebuild had
/// applied, would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_writers_switch_atomically_with_a_concurrent_rebuild() {
    const N: u64 = 160;
    let server = server();
    with_database(&server.url, |uri, db| async move {
        let mongo = MongoReadModels::connect(&uri, &db).await.expect("connect");
        let other = MongoReadModels::connect(&uri, &db).await.expect("connect");
        let lb = Projection::Leaderboard;
        let first: Vec<_> = (1..=20).map(|p| board_item(p, 1)).collect();
        mongo.apply("leaderboard", &first).await.unwrap();
        mongo.rebuild_begin(lb).await.unwrap();
        let worker = tokio::spawn(async move {
            let mut next = 21;
            let mut applied = 0u64;
            while next <= N {
                let batch: Vec<_> = (next..=(next + 2).min(N))
                    .map(|p| board_item(p, 1))
                    .collect();
                let out = other.apply("leaderboard", &batch).await.unwrap();
                assert!(
                    out.iter().all(|o| !matches!(o, ApplyOutcome::Gap { .. })),
                    "in order: {out:?}"
                );
                applied += out.iter().filter(|o| **o == ApplyOutcome::Applied).count() as u64;
                next += batch.len() as u64;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            applied
        });
        let mut switched_at = None;
        for page in 0..N / 10 {
            let items: Vec<_> = (page * 10 + 1..=page * 10 + 10)
                .map(|p| board_item(p, 1))
                .collect();
            mongo.rebuild_apply(lb, &items).await.unwrap();
            if mongo.rebuild_switch(lb).await.unwrap() == RebuildSwitch::Switched {
                switched_at = Some(page * 10 + 10);
                break;
            }
        }
        let live_applied = worker.await.unwrap();
        let switched_at = switched_at.expect("the rebuild catches up and switches");
        // The worker still had events to write after the switch (so its batches raced it and
        // went on in the rebuilt version).
        assert!(switched_at < N, "switched at {switched_at}");
        assert!(live_applied >= N - switched_at, "{live_applied}");
        let status = &mongo.rebuilds().await.unwrap()[0];
        assert_eq!(
            (status.phase, status.checkpoint),
            (RebuildPhase::Switched, switched_at)
        );
        // Every event exactly once: user u's XP is its number of events.
        for u in 0..4 {
            assert_eq!(board_xp(&mongo, u).await, Some((N / 4) as i64), "user {u}");
        }
        let cp = mongo.checkpoints().await.unwrap();
        assert_eq!(
            (cp[0].name.as_str(), cp[0].checkpoint, cp[0].applied),
            ("leaderboard", N, N)
        );
        let page = mongo.leaderboard("all-time", 10, 0).await.unwrap();
        assert_eq!(page.len(), 4);
        assert!(page.iter().all(|r| r.xp == (N / 4) as i64));
    })
    .await;
}
