//! `SqliteReadModels` on a real temporary SQLite file: the sequence guard, batch atomicity,
//! the low-water checkpoint, leaderboard ordering, reset, and a property test that shuffled,
//! duplicated and redelivered application equals a reference fold in position order.

mod paging;
mod ranking;
mod rebuilds;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

use paging::export_in_pages;
use proptest::prelude::*;
use serde_json::{json, Value};
use tektree_domain::events::{
    AnswerAccepted, AnswerSubmitted, CommentAdded, ContentVoted, QuestionPosted, QuotaExceeded,
    SubscriptionCreated, UsageRecorded, XpEarned,
};
use tektree_domain::{
    level_for_xp, Actor, Event, EventEnvelope, EventMetadata, NewEvent, Tier, VoteDirection,
};
use tektree_projections::{
    project, ApplyOutcome, Change, Checkpoint, ContentDelta, ContentRow, EventKey, ExportPage,
    LeaderboardRow, Projection, QuotaRow, ReadModel, ReadModelError, ReadModelStore, RebuildSwitch,
    SqliteReadModels, TagRow, XpRow,
};
use uuid::Uuid;

const MODELS: [ReadModel; 5] = [
    ReadModel::Xp,
    ReadModel::Leaderboard,
    ReadModel::Quota,
    ReadModel::Content,
    ReadModel::Tags,
];

fn open() -> (tempfile::TempDir, SqliteReadModels) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteReadModels::open(dir.path().join("tektree.db")).unwrap();
    (dir, store)
}

fn key(aggregate_type: &str, aggregate_id: Uuid, sequence: u64, position: u64) -> EventKey {
    EventKey {
        aggregate_type: aggregate_type.into(),
        aggregate_id,
        sequence,
        position,
    }
}

fn user(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn xp(user_id: Uuid, amount: i64) -> Change {
    Change::Xp {
        user_id,
        xp: amount,
        questions: 0,
        answers: 0,
        accepted_answers: 0,
    }
}

fn board(board: &str, user_id: Uuid, xp: i64) -> Change {
    Change::Leaderboard {
        board: board.into(),
        user_id,
        xp,
    }
}

/// Every read model and every checkpoint.
async fn snapshot(store: &SqliteReadModels) -> (Vec<Vec<Value>>, Vec<Checkpoint>) {
    let mut models = vec![];
    for m in MODELS {
        models.push(export_in_pages(store, m, 3).await);
    }
    (models, store.checkpoints().await.unwrap())
}

#[tokio::test]
async fn guard_applies_in_sequence_order_and_flags_duplicates_and_gaps() {
    let (_dir, store) = open();
    let a = user(1);
    let items = |seqs: &[(u64, u64)]| -> Vec<(EventKey, Vec<Change>)> {
        seqs.iter()
            .map(|&(s, p)| (key("profile", a, s, p), vec![xp(a, 1)]))
            .collect()
    };
    assert_eq!(
        store.apply("xp", &items(&[(1, 1)])).await.unwrap(),
        vec![ApplyOutcome::Applied]
    );
    assert_eq!(
        store.apply("xp", &items(&[(1, 1)])).await.unwrap(),
        vec![ApplyOutcome::Duplicate]
    );
    assert_eq!(
        store.apply("xp", &items(&[(3, 3)])).await.unwrap(),
        vec![ApplyOutcome::Gap { expected: 2 }]
    );
    // Within one batch items see the guard as advanced by the items before them.
    assert_eq!(
        store
            .apply(
                "xp",
                &items(&[(2, 2), (2, 2), (4, 4), (3, 3), (4, 4), (1, 1)])
            )
            .await
            .unwrap(),
        vec![
            ApplyOutcome::Applied,
            ApplyOutcome::Duplicate,
            ApplyOutcome::Gap { expected: 3 },
            ApplyOutcome::Applied,
            ApplyOutcome::Applied,
            ApplyOutcome::Duplicate,
        ]
    );
    assert_eq!(store.user_xp(a).await.unwrap().unwrap().xp, 4);
    assert_eq!(
        store.checkpoints().await.unwrap(),
        vec![Checkpoint {
            name: "xp".into(),
            checkpoint: 4,
            applied: 4
        }]
    );
}

#[tokio::test]
async fn guards_are_per_consumer_and_per_aggregate() {
    let (_dir, store) = open();
    let id = user(7);
    let item = |t: &str, p| (key(t, id, 1, p), vec![]);
    for consumer in ["xp", "policy.gamification", "policy.metering"] {
        assert_eq!(
            store
                .apply(consumer, &[item("profile", 1), item("subscription", 2)])
                .await
                .unwrap(),
            vec![ApplyOutcome::Applied, ApplyOutcome::Applied]
        );
    }
    let names: Vec<String> = store
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            assert_eq!((c.checkpoint, c.applied), (2, 2));
            c.name
        })
        .collect();
    assert_eq!(names, ["policy.gamification", "policy.metering", "xp"]);
}

#[tokio::test]
async fn gaps_and_duplicates_change_nothing() {
    let (_dir, store) = open();
    let (a, q) = (user(1), user(100));
    let changes = vec![
        xp(a, 5),
        board("all-time", a, 5),
        Change::Content(ContentDelta {
            content_id: q,
            upvotes: 1,
            ..Default::default()
        }),
        Change::Usage {
            user_id: a,
            period: "2024-05".into(),
            tier: Tier::Free,
            used: 1,
            limit: Some(100),
        },
        Change::QuotaExceeded {
            user_id: a,
            period: "2024-06".into(),
        },
        Change::Tier {
            user_id: a,
            tier: Tier::Team,
        },
    ];
    store
        .apply("mixed", &[(key("content", q, 1, 1), changes.clone())])
        .await
        .unwrap();
    let before = snapshot(&store).await;
    let outcomes = store
        .apply(
            "mixed",
            &[
                (key("content", q, 1, 1), changes.clone()),
                (key("content", q, 3, 3), changes.clone()),
                (key("content", user(101), 2, 2), changes.clone()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            ApplyOutcome::Duplicate,
            ApplyOutcome::Gap { expected: 2 },
            ApplyOutcome::Gap { expected: 1 },
        ]
    );
    assert_eq!(snapshot(&store).await, before);
}

#[tokio::test]
async fn a_failing_batch_commits_nothing() {
    let (_dir, store) = open();
    let a = user(1);
    let good = (
        key("profile", a, 1, 1),
        vec![xp(a, 10), board("all-time", a, 10)],
    );
    let bad = (
        key("subscription", a, 1, 2),
        vec![Change::Usage {
            user_id: a,
            period: "2024-05".into(),
            tier: Tier::Free,
            used: u64::MAX,
            limit: None,
        }],
    );
    let before = snapshot(&store).await;
    let err = store.apply("c", &[good.clone(), bad]).await.unwrap_err();
    assert!(matches!(err, ReadModelError::Invalid(_)), "{err}");
    assert_eq!(snapshot(&store).await, before);
    // The guard did not advance either: the good item applies now.
    assert_eq!(
        store.apply("c", &[good]).await.unwrap(),
        vec![ApplyOutcome::Applied]
    );
    assert_eq!(store.user_xp(a).await.unwrap().unwrap().xp, 10);
}

#[tokio::test]
async fn invalid_arguments_are_rejected_before_anything_runs() {
    let (_dir, store) = open();
    let a = user(1);
    for (consumer, k) in [
        ("", key("profile", a, 1, 1)),
        ("c", key("profile", a, 0, 1)),
        ("c", key("profile", a, 1, 0)),
        ("c", key("profile", a, 1, u64::MAX)),
    ] {
        assert!(matches!(
            store.apply(consumer, &[(k, vec![])]).await,
            Err(ReadModelError::Invalid(_))
        ));
    }
    assert!(store.apply("c", &[]).await.unwrap().is_empty());
    assert!(store.checkpoints().await.unwrap().is_empty());
    assert!(matches!(
        store.leaderboard("all-time", 10, u64::MAX).await,
        Err(ReadModelError::Invalid(_))
    ));
}

#[tokio::test]
async fn checkpoint_is_a_low_water_mark_under_out_of_order_application() {
    let (_dir, store) = open();
    // Six events of six aggregates, applied by "workers" in this order.
    let order = [3u64, 1, 6, 2, 5, 4];
    let expected = [0u64, 1, 1, 3, 3, 6];
    for (i, (&p, &cp)) in order.iter().zip(&expected).enumerate() {
        let out = store
            .apply(
                "content",
                &[(key("content", user(p as u128), 1, p), vec![])],
            )
            .await
            .unwrap();
        assert_eq!(out, vec![ApplyOutcome::Applied]);
        assert_eq!(
            store.checkpoints().await.unwrap(),
            vec![Checkpoint {
                name: "content".into(),
                checkpoint: cp,
                applied: i as u64 + 1
            }],
            "after applying position {p}"
        );
    }
    // Positions 7..=9 in one batch, out of order, close the gap inside the batch.
    let batch: Vec<_> = [9u64, 7, 8]
        .iter()
        .map(|&p| (key("content", user(p as u128), 1, p), vec![]))
        .collect();
    store.apply("content", &batch).await.unwrap();
    let cp = &store.checkpoints().await.unwrap()[0];
    assert_eq!((cp.checkpoint, cp.applied), (9, 9));
}

#[tokio::test]
async fn leaderboard_pages_and_ranks_order_by_xp_then_user_id() {
    let (_dir, store) = open();
    // Ties at 50 and 10 are broken by user id ascending.
    let entries = [(5u128, 50i64), (2, 50), (9, 70), (1, 10), (7, 10), (3, -4)];
    let mut items = vec![];
    for (i, &(u, x)) in entries.iter().enumerate() {
        // Split each user's XP over two changes to exercise the additive upsert.
        let changes = vec![
            board("tag:rust", user(u), x - 1),
            board("tag:rust", user(u), 1),
            board("tag:go", user(u), 1000 - x),
        ];
        items.push((key("profile", user(u), 1, i as u64 + 1), changes));
    }
    store.apply("leaderboard", &items).await.unwrap();
    let expected = [(9u128, 70i64), (2, 50), (5, 50), (1, 10), (7, 10), (3, -4)];
    let row = |rank: usize, (u, x): (u128, i64)| LeaderboardRow {
        board: "tag:rust".into(),
        rank: rank as u64,
        user_id: user(u),
        xp: x,
    };
    let all: Vec<LeaderboardRow> = expected
        .iter()
        .enumerate()
        .map(|(i, &e)| row(i + 1, e))
        .collect();
    assert_eq!(store.leaderboard("tag:rust", 100, 0).await.unwrap(), all);
    assert_eq!(
        store.leaderboard("tag:rust", 2, 2).await.unwrap(),
        all[2..4].to_vec()
    );
    assert_eq!(
        store.leaderboard("tag:rust", 10, 5).await.unwrap(),
        all[5..].to_vec()
    );
    assert!(store
        .leaderboard("tag:rust", 10, 6)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .leaderboard("tag:rust", 0, 0)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .leaderboard("tag:sql", 10, 0)
        .await
        .unwrap()
        .is_empty());
    for r in &all {
        assert_eq!(
            store.rank("tag:rust", r.user_id).await.unwrap().as_ref(),
            Some(r)
        );
    }
    assert_eq!(store.rank("tag:rust", user(4)).await.unwrap(), None);
    assert_eq!(store.rank("tag:sql", user(9)).await.unwrap(), None);
    // The other board is ranked independently (reverse order).
    let go = store.leaderboard("tag:go", 1, 0).await.unwrap();
    assert_eq!((go[0].user_id, go[0].xp), (user(3), 1004));
    assert_eq!(
        store.rank("tag:go", user(9)).await.unwrap().unwrap().rank,
        6
    );
    // Export: boards in name order, then rank, with the HTTP field names; the same in pages
    // of every size, so that some page ends inside a run of equal XP (tag:go has 990, 990
    // and 950, 950; tag:rust 50, 50 and 10, 10) and some exactly at the end of a board.
    let mut go: Vec<(Uuid, i64)> = entries.iter().map(|&(u, x)| (user(u), 1000 - x)).collect();
    go.sort_by_key(|&(u, x)| (std::cmp::Reverse(x), u));
    let mut expected: Vec<Value> = go
        .iter()
        .enumerate()
        .map(|(i, &(u, x))| json!({"board": "tag:go", "rank": i + 1, "user_id": u, "xp": x}))
        .collect();
    expected.extend(all.iter().map(|r| serde_json::to_value(r).unwrap()));
    assert_eq!(
        expected[0],
        json!({"board": "tag:go", "rank": 1, "user_id": user(3), "xp": 1004})
    );
    for page in 1..=13 {
        assert_eq!(
            export_in_pages(&store, ReadModel::Leaderboard, page).await,
            expected,
            "pages of {page}"
        );
    }
}

/// Keyset pages of every size give the rows an independent fold gives, in key order: quota
/// pages end between two periods of one user and between two users.
#[tokio::test]
async fn exports_in_pages_of_every_size_equal_the_rows_in_key_order() {
    let (_dir, store) = open();
    let periods = ["2024-04", "2024-05", "2024-06"];
    let mut items = vec![];
    let (mut xp_rows, mut quota_rows, mut content_rows) = (vec![], vec![], vec![]);
    for (u, n) in [(9u128, 2), (3, 3), (6, 1)] {
        let mut changes = vec![xp(user(u), u as i64)];
        for (i, period) in periods.iter().enumerate().take(n) {
            changes.push(Change::Usage {
                user_id: user(u),
                period: period.to_string(),
                tier: Tier::Pro,
                used: i as u64,
                limit: Some(1000),
            });
            quota_rows.push(json!({"user_id": user(u), "period": period, "tier": "pro",
                "used": i, "limit": 1000, "exceeded": false}));
        }
        changes.push(Change::Content(ContentDelta {
            content_id: user(0x100 + u),
            upvotes: 1,
            ..Default::default()
        }));
        content_rows.push(json!({"content_id": user(0x100 + u), "kind": null,
            "question_id": null, "author_id": null, "score": 1, "upvotes": 1, "downvotes": 0,
            "answer_count": 0, "comment_count": 0, "accepted_answer_id": null}));
        xp_rows.push(
            json!({"user_id": user(u), "xp": u, "level": 1, "questions": 0,
            "answers": 0, "accepted_answers": 0}),
        );
        items.push((key("profile", user(u), 1, items.len() as u64 + 1), changes));
    }
    store.apply("all", &items).await.unwrap();
    let key_of = |v: &Value, f: &str| v[f].as_str().unwrap().to_string();
    xp_rows.sort_by_key(|r| key_of(r, "user_id"));
    content_rows.sort_by_key(|r| key_of(r, "content_id"));
    quota_rows.sort_by_key(|r| (key_of(r, "user_id"), key_of(r, "period")));
    let first = store.export(ReadModel::Content, None, 1).await.unwrap();
    assert_eq!(first.rows, content_rows[..1]);
    let cursor = first.next.expect("a full page has a cursor");
    let rest = store
        .export(ReadModel::Content, Some(&cursor), 10)
        .await
        .unwrap();
    assert_eq!((rest.rows, rest.next), (content_rows[1..].to_vec(), None));
    // A page must make progress, and a cursor only continues its own model.
    for r in [
        store.export(ReadModel::Content, None, 0).await,
        store.export(ReadModel::Xp, Some(&cursor), 10).await,
    ] {
        assert!(matches!(r, Err(ReadModelError::Invalid(_))), "{r:?}");
    }
    for page in 1..=7 {
        for (model, expected) in [
            (ReadModel::Xp, &xp_rows),
            (ReadModel::Quota, &quota_rows),
            (ReadModel::Content, &content_rows),
        ] {
            assert_eq!(
                &export_in_pages(&store, model, page).await,
                expected,
                "{model:?} in pages of {page}"
            );
        }
    }
}

#[tokio::test]
async fn queries_return_the_http_rows() {
    let (_dir, store) = open();
    let (a, q, ans) = (user(1), user(100), user(101));
    let changes = vec![
        Change::Xp {
            user_id: a,
            xp: 450,
            questions: 1,
            answers: 2,
            accepted_answers: 1,
        },
        Change::Content(ContentDelta {
            content_id: q,
            kind: Some("question"),
            author_id: Some(a),
            upvotes: 3,
            downvotes: 5,
            answers: 2,
            comments: 1,
            accepted_answer_id: Some(ans),
            ..Default::default()
        }),
        Change::Content(ContentDelta {
            content_id: ans,
            kind: Some("answer"),
            question_id: Some(q),
            ..Default::default()
        }),
        Change::Tier {
            user_id: a,
            tier: Tier::Enterprise,
        },
        Change::Usage {
            user_id: a,
            period: "2024-05".into(),
            tier: Tier::Enterprise,
            used: 7,
            limit: None,
        },
    ];
    store
        .apply("all", &[(key("content", q, 1, 1), changes)])
        .await
        .unwrap();
    assert_eq!(
        store.user_xp(a).await.unwrap(),
        Some(XpRow {
            user_id: a,
            xp: 450,
            level: 3,
            questions: 1,
            answers: 2,
            accepted_answers: 1
        })
    );
    assert_eq!(store.user_xp(user(2)).await.unwrap(), None);
    let question = ContentRow {
        content_id: q,
        kind: Some("question".into()),
        question_id: None,
        author_id: Some(a),
        score: -2,
        upvotes: 3,
        downvotes: 5,
        answer_count: 2,
        comment_count: 1,
        accepted_answer_id: Some(ans),
    };
    assert_eq!(store.content(q).await.unwrap(), Some(question.clone()));
    assert_eq!(
        store.content(ans).await.unwrap().unwrap().question_id,
        Some(q)
    );
    assert_eq!(store.content(user(3)).await.unwrap(), None);
    let quota = QuotaRow {
        user_id: a,
        period: "2024-05".into(),
        tier: Tier::Enterprise,
        used: 7,
        limit: None,
        exceeded: false,
    };
    assert_eq!(
        store.quota(a, "2024-05").await.unwrap(),
        Some(quota.clone())
    );
    // A known tier without usage in the period has no row.
    assert_eq!(store.quota(a, "2024-06").await.unwrap(), None);

    assert_eq!(
        store.export(ReadModel::Xp, None, 10).await.unwrap(),
        ExportPage {
            rows: vec![
                json!({"user_id": a, "xp": 450, "level": 3, "questions": 1, "answers": 2,
                        "accepted_answers": 1})
            ],
            next: None,
        }
    );
    assert_eq!(
        store.export(ReadModel::Quota, None, 10).await.unwrap().rows,
        vec![
            json!({"user_id": a, "period": "2024-05", "tier": "enterprise", "used": 7,
                    "limit": null, "exceeded": false})
        ]
    );
    let content = store
        .export(ReadModel::Content, None, 10)
        .await
        .unwrap()
        .rows;
    assert_eq!(content[0], serde_json::to_value(&question).unwrap());
    assert_eq!(content[1]["kind"], json!("answer"));
}

#[tokio::test]
async fn reset_clears_one_model_and_its_consumer_only() {
    let (_dir, store) = open();
    let a = user(1);
    let k = key("subscription", a, 1, 1);
    store
        .apply("xp", &[(k.clone(), vec![xp(a, 3)])])
        .await
        .unwrap();
    store
        .apply(
            "quota",
            &[(
                k.clone(),
                vec![
                    Change::Tier {
                        user_id: a,
                        tier: Tier::Pro,
                    },
                    Change::Usage {
                        user_id: a,
                        period: "2024-05".into(),
                        tier: Tier::Pro,
                        used: 1,
                        limit: Some(1000),
                    },
                ],
            )],
        )
        .await
        .unwrap();
    store
        .apply("policy.metering", &[(k.clone(), vec![])])
        .await
        .unwrap();

    // A policy's guard cannot be reset: `reset` takes a `Projection`, which no policy name is.
    assert!("policy.metering".parse::<Projection>().is_err());
    store.reset(Projection::Quota).await.unwrap();
    assert_eq!(store.quota(a, "2024-05").await.unwrap(), None);
    let names: Vec<String> = store
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["policy.metering", "xp"]);
    assert_eq!(store.user_xp(a).await.unwrap().unwrap().xp, 3);
    // The guard is gone: the rebuild starts from sequence 1. The tier went with the rows, so
    // an exceeded event alone finds no tier.
    assert_eq!(
        store
            .apply(
                "quota",
                &[(
                    k.clone(),
                    vec![Change::QuotaExceeded {
                        user_id: a,
                        period: "2024-05".into()
                    }]
                )]
            )
            .await
            .unwrap(),
        vec![ApplyOutcome::Applied]
    );
    assert_eq!(
        store.quota(a, "2024-05").await.unwrap().unwrap().tier,
        Tier::Free
    );
    // Resetting an empty model is fine; the other projections' rows stay.
    for p in Projection::ALL {
        if p != Projection::Xp {
            store.reset(p).await.unwrap();
        }
    }
    assert_eq!(store.user_xp(a).await.unwrap().unwrap().xp, 3);
    store.reset(Projection::Xp).await.unwrap();
    assert_eq!(store.user_xp(a).await.unwrap(), None);
}

/// Applies `items` for `consumer` in the given order through `store`, retrying `Gap` items at
/// the back of the queue; returns the number of `Applied` outcomes.
async fn deliver(
    store: &SqliteReadModels,
    consumer: &str,
    items: &[(EventKey, Vec<Change>)],
    order: Vec<usize>,
    batch: usize,
) -> usize {
    let mut queue: VecDeque<usize> = order.into();
    let mut applied = 0;
    let mut rounds = 0;
    while !queue.is_empty() {
        rounds += 1;
        assert!(rounds < 100_000, "delivery does not progress");
        let take: Vec<usize> = queue.drain(..batch.min(queue.len())).collect();
        let batch_items: Vec<_> = take.iter().map(|&i| items[i].clone()).collect();
        let outcomes = store.apply(consumer, &batch_items).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_handles_on_one_file_apply_each_event_exactly_once() {
    let (dir, first) = open();
    let second = SqliteReadModels::open(first.path()).unwrap();
    let a = user(1);
    // 3 aggregates × 20 events, positions interleaved round-robin.
    let items: Vec<(EventKey, Vec<Change>)> = (0..60u64)
        .map(|i| {
            let agg = user(100 + (i % 3) as u128);
            (
                key("content", agg, i / 3 + 1, i + 1),
                vec![xp(a, 1), board("all-time", a, 1)],
            )
        })
        .collect();
    let forward: Vec<usize> = (0..items.len()).collect();
    let backward: Vec<usize> = forward.iter().rev().copied().collect();
    let (x, y) = tokio::join!(
        {
            let items = items.clone();
            let s = first.clone();
            tokio::spawn(async move { deliver(&s, "xp", &items, forward, 7).await })
        },
        {
            let items = items.clone();
            tokio::spawn(async move { deliver(&second, "xp", &items, backward, 5).await })
        }
    );
    assert_eq!(x.unwrap() + y.unwrap(), 60);
    assert_eq!(first.user_xp(a).await.unwrap().unwrap().xp, 60);
    assert_eq!(
        first.checkpoints().await.unwrap(),
        vec![Checkpoint {
            name: "xp".into(),
            checkpoint: 60,
            applied: 60
        }]
    );
    drop(dir);
}

// ---------------------------------------------------------------------------------------
// Property test: random histories of real domain events, projected with `project`.
// ---------------------------------------------------------------------------------------

const USERS: u128 = 4;
const QUESTIONS: usize = 3;
const TAGS: [&str; 3] = ["go", "rust", "sql"];
const PERIODS: [&str; 2] = ["2024-05", "2024-06"];
const WEEKS: [&str; 3] = [
    "2024-05-01T10:00:00Z",
    "2024-05-09T10:00:00Z",
    "2024-05-31T23:59:59Z",
];

/// One step of a generated history; steps that do not fit the state so far are skipped.
#[derive(Debug, Clone)]
enum Op {
    Question {
        q: usize,
        author: Option<u8>,
        tags: u8,
    },
    Answer {
        q: usize,
        author: Option<u8>,
    },
    Comment {
        target: usize,
    },
    Vote {
        target: usize,
        voter: u8,
        up: bool,
    },
    Accept {
        q: usize,
        pick: usize,
    },
    Xp {
        user: u8,
        amount: i64,
        week: usize,
        tags: u8,
    },
    Subscribe {
        user: u8,
        pro: bool,
    },
    Usage {
        user: u8,
        period: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let author = proptest::option::weighted(0.8, 0..USERS as u8);
    prop_oneof![
        1 => (0..QUESTIONS, author.clone(), 0u8..8).prop_map(|(q, author, tags)| Op::Question {
            q,
            author,
            tags
        }),
        1 => (0..QUESTIONS, author).prop_map(|(q, author)| Op::Answer { q, author }),
        1 => (0..16usize).prop_map(|target| Op::Comment { target }),
        3 => (0..16usize, 0u8..3, any::<bool>()).prop_map(|(target, voter, up)| Op::Vote {
            target,
            voter,
            up
        }),
        1 => (0..QUESTIONS, 0..8usize).prop_map(|(q, pick)| Op::Accept { q, pick }),
        3 => (0..USERS as u8, -5i64..20, 0..WEEKS.len(), 0u8..8).prop_map(
            |(user, amount, week, tags)| Op::Xp {
                user,
                amount,
                week,
                tags
            }
        ),
        1 => (0..USERS as u8, any::<bool>()).prop_map(|(user, pro)| Op::Subscribe { user, pro }),
        3 => (0..USERS as u8, 0..PERIODS.len()).prop_map(|(user, period)| Op::Usage {
            user,
            period
        }),
    ]
}

fn tags_of(mask: u8) -> Vec<String> {
    TAGS.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, t)| t.to_string())
        .collect()
}

/// Builds a committed history (envelopes with sequences and positions) from `ops`.
#[derive(Default)]
struct History {
    events: Vec<(EventEnvelope, Event)>,
    sequences: HashMap<(&'static str, Uuid), u64>,
    questions: BTreeMap<usize, (Uuid, Option<Uuid>, Vec<String>)>,
    content: Vec<(Uuid, Option<Uuid>, Vec<String>)>,
    answers: HashMap<Uuid, Vec<(Uuid, Option<Uuid>)>>,
    accepted: HashMap<Uuid, Uuid>,
    votes: HashMap<(Uuid, Uuid), VoteDirection>,
    tiers: HashMap<Uuid, Tier>,
    used: HashMap<(Uuid, usize), u64>,
}

impl History {
    fn push(&mut self, aggregate_id: Uuid, event: Event) {
        let aggregate_type = event.aggregate_type();
        let seq = self
            .sequences
            .entry((aggregate_type, aggregate_id))
            .or_default();
        *seq += 1;
        let new = NewEvent {
            event_id: Uuid::from_u128(0xe000 + self.events.len() as u128),
            aggregate_type: aggregate_type.into(),
            aggregate_id,
            sequence: *seq,
            event: event.clone(),
            metadata: EventMetadata {
                occurred_at: WEEKS[0].parse().unwrap(),
                correlation_id: Uuid::nil(),
                causation_id: Uuid::nil(),
                actor: Actor::System("test".into()),
            },
        };
        let position = self.events.len() as u64 + 1;
        let env = new.into_envelope(position, WEEKS[0].parse().unwrap());
        self.events.push((env, event));
    }

    fn build(ops: &[Op]) -> Self {
        let mut h = History::default();
        let mut next_answer = 0u128;
        for op in ops {
            match *op {
                Op::Question { q, author, tags } => {
                    if h.questions.contains_key(&q) {
                        continue;
                    }
                    let id = Uuid::from_u128(0x100 + q as u128);
                    let author = author.map(|u| user(u as u128));
                    let tags = tags_of(tags);
                    h.questions.insert(q, (id, author, tags.clone()));
                    h.content.push((id, author, tags.clone()));
                    h.push(
                        id,
                        Event::QuestionPosted(QuestionPosted {
                            question_id: id,
                            author_id: author,
                            title: "t".into(),
                            body: String::new(),
                            tags,
                            area_id: None,
                        }),
                    );
                }
                Op::Answer { q, author } => {
                    let Some((qid, _, tags)) = h.questions.get(&q).cloned() else {
                        continue;
                    };
                    next_answer += 1;
                    let id = Uuid::from_u128(0x200 + next_answer);
                    let author = author.map(|u| user(u as u128));
                    h.answers.entry(qid).or_default().push((id, author));
                    h.content.push((id, author, tags.clone()));
                    h.push(
                        id,
                        Event::AnswerSubmitted(AnswerSubmitted {
                            answer_id: id,
                            question_id: qid,
                            author_id: author,
                            body: String::new(),
                            tags,
                            area_id: None,
                        }),
                    );
                }
                Op::Comment { target } => {
                    if h.content.is_empty() {
                        continue;
                    }
                    let (id, author, tags) = h.content[target % h.content.len()].clone();
                    h.push(
                        id,
                        Event::CommentAdded(CommentAdded {
                            comment_id: Uuid::from_u128(0x300 + h.events.len() as u128),
                            content_id: id,
                            author_id: author,
                            text: "c".into(),
                            tags,
                            area_id: None,
                        }),
                    );
                }
                Op::Vote { target, voter, up } => {
                    if h.content.is_empty() {
                        continue;
                    }
                    let (id, author, tags) = h.content[target % h.content.len()].clone();
                    let voter = Uuid::from_u128(0x400 + voter as u128);
                    let dir = if up {
                        VoteDirection::Up
                    } else {
                        VoteDirection::Down
                    };
                    let previous = h.votes.insert((id, voter), dir);
                    if previous == Some(dir) {
                        continue; // the same vote again is a no-op
                    }
                    let v = ContentVoted {
                        content_id: id,
                        voter_id: voter,
                        previous,
                        content_author_id: author,
                        tags,
                        area_id: None,
                        on_answer: false,
                        score: None,
                    };
                    h.push(
                        id,
                        if up {
                            Event::ContentUpvoted(v)
                        } else {
                            Event::ContentDownvoted(v)
                        },
                    );
                }
                Op::Accept { q, pick } => {
                    let Some((qid, qauthor, tags)) = h.questions.get(&q).cloned() else {
                        continue;
                    };
                    let Some(answers) = h.answers.get(&qid).filter(|a| !a.is_empty()) else {
                        continue;
                    };
                    if h.accepted.contains_key(&qid) {
                        continue;
                    }
                    let (aid, aauthor) = answers[pick % answers.len()];
                    h.accepted.insert(qid, aid);
                    h.push(
                        qid,
                        Event::AnswerAccepted(AnswerAccepted {
                            question_id: qid,
                            answer_id: aid,
                            question_author_id: qauthor,
                            answer_author_id: aauthor,
                            tags,
                            area_id: None,
                        }),
                    );
                }
                Op::Xp {
                    user: u,
                    amount,
                    week,
                    tags,
                } => {
                    let id = user(u as u128);
                    h.push(
                        id,
                        Event::XpEarned(XpEarned {
                            user_id: id,
                            amount,
                            source_event_id: Uuid::nil(),
                            source_event_type: "knowledge.content.upvoted".into(),
                            source_occurred_at: WEEKS[week].parse().unwrap(),
                            tags: tags_of(tags),
                            total_xp: 0,
                            activity: None,
                            area_id: None,
                        }),
                    );
                }
                Op::Subscribe { user: u, pro } => {
                    let id = user(u as u128);
                    if h.tiers.contains_key(&id) {
                        continue;
                    }
                    let tier = if pro { Tier::Pro } else { Tier::Free };
                    h.tiers.insert(id, tier);
                    h.push(
                        id,
                        Event::SubscriptionCreated(SubscriptionCreated { user_id: id, tier }),
                    );
                }
                Op::Usage { user: u, period } => {
                    let id = user(u as u128);
                    let tier = h.tiers.get(&id).copied().unwrap_or_default();
                    let limit = if tier == Tier::Pro { 4 } else { 2 };
                    let used = h.used.entry((id, period)).or_default();
                    *used += 1;
                    let used = *used;
                    h.push(
                        id,
                        Event::UsageRecorded(UsageRecorded {
                            user_id: id,
                            period: PERIODS[period].into(),
                            source_event_id: Uuid::nil(),
                            source_event_type: "knowledge.comment.added".into(),
                            tier,
                            used,
                            limit: Some(limit),
                        }),
                    );
                    if used == limit + 1 {
                        h.push(
                            id,
                            Event::QuotaExceeded(QuotaExceeded {
                                user_id: id,
                                period: PERIODS[period].into(),
                                tier,
                                used,
                                limit,
                            }),
                        );
                    }
                }
            }
        }
        h
    }

    /// What `consumer` receives: every event, with the projection's changes.
    /// A policy's name gets no changes (it only records the events in its guard).
    fn items(&self, consumer: &str) -> Vec<(EventKey, Vec<Change>)> {
        let projection = Projection::from_name(consumer);
        self.events
            .iter()
            .map(|(env, e)| {
                let changes = projection.map_or_else(Vec::new, |p| project(p, env, e));
                (EventKey::of(env), changes)
            })
            .collect()
    }
}

/// An independent in-memory fold of changes in position order: the expected exports.
#[derive(Default)]
struct Reference {
    xp: BTreeMap<Uuid, (i64, u64, u64, u64)>,
    boards: BTreeMap<String, BTreeMap<Uuid, i64>>,
    content: BTreeMap<Uuid, ContentRow>,
    tiers: HashMap<Uuid, Tier>,
    quota: BTreeMap<(Uuid, String), QuotaRow>,
    tags: BTreeMap<String, (u64, u64)>,
}

impl Reference {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Xp {
                user_id,
                xp,
                questions,
                answers,
                accepted_answers,
            } => {
                let r = self.xp.entry(*user_id).or_default();
                r.0 += xp;
                r.1 = r.1.checked_add_signed(*questions).unwrap();
                r.2 = r.2.checked_add_signed(*answers).unwrap();
                r.3 = r.3.checked_add_signed(*accepted_answers).unwrap();
            }
            Change::Leaderboard { board, user_id, xp } => {
                *self
                    .boards
                    .entry(board.clone())
                    .or_default()
                    .entry(*user_id)
                    .or_default() += xp;
            }
            Change::Content(d) => {
                let r = self.content.entry(d.content_id).or_insert(ContentRow {
                    content_id: d.content_id,
                    kind: None,
                    question_id: None,
                    author_id: None,
                    score: 0,
                    upvotes: 0,
                    downvotes: 0,
                    answer_count: 0,
                    comment_count: 0,
                    accepted_answer_id: None,
                });
                r.kind = r.kind.take().or(d.kind.map(str::to_string));
                r.question_id = r.question_id.or(d.question_id);
                r.author_id = r.author_id.or(d.author_id);
                r.accepted_answer_id = r.accepted_answer_id.or(d.accepted_answer_id);
                r.upvotes += d.upvotes;
                r.downvotes += d.downvotes;
                r.score = r.upvotes - r.downvotes;
                r.answer_count += d.answers;
                r.comment_count += d.comments;
            }
            Change::Usage {
                user_id,
                period,
                tier,
                used,
                limit,
            } => {
                let k = (*user_id, period.clone());
                match self.quota.get_mut(&k) {
                    None => {
                        self.quota.insert(
                            k,
                            QuotaRow {
                                user_id: *user_id,
                                period: period.clone(),
                                tier: *tier,
                                used: *used,
                                limit: *limit,
                                exceeded: false,
                            },
                        );
                    }
                    Some(r) => {
                        let order = |used: u64, tier: Tier, limit: Option<u64>| {
                            (used, tier.as_str(), limit.map_or(-1, |l| l as i64))
                        };
                        if order(*used, *tier, *limit) > order(r.used, r.tier, r.limit) {
                            r.tier = *tier;
                            r.limit = *limit;
                        }
                        r.used = r.used.max(*used);
                    }
                }
            }
            Change::QuotaExceeded { user_id, period } => {
                let tier = self.tiers.get(user_id).copied().unwrap_or(Tier::Free);
                self.quota
                    .entry((*user_id, period.clone()))
                    .or_insert(QuotaRow {
                        user_id: *user_id,
                        period: period.clone(),
                        tier,
                        used: 0,
                        limit: None,
                        exceeded: false,
                    })
                    .exceeded = true;
            }
            Change::Tier { user_id, tier } => {
                self.tiers.insert(*user_id, *tier);
            }
            Change::Tag {
                tag,
                questions,
                answers,
            } => {
                let r = self.tags.entry(tag.clone()).or_default();
                r.0 = r.0.checked_add_signed(*questions).unwrap();
                r.1 = r.1.checked_add_signed(*answers).unwrap();
            }
        }
    }

    fn leaderboard_rows(&self) -> Vec<LeaderboardRow> {
        let mut rows = vec![];
        for (board, users) in &self.boards {
            let mut entries: Vec<(Uuid, i64)> = users.iter().map(|(u, x)| (*u, *x)).collect();
            entries.sort_by_key(|&(u, x)| (std::cmp::Reverse(x), u));
            rows.extend(
                entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, (user_id, xp))| LeaderboardRow {
                        board: board.clone(),
                        rank: i as u64 + 1,
                        user_id,
                        xp,
                    }),
            );
        }
        rows
    }

    fn exports(&self) -> Vec<Vec<Value>> {
        fn json<T: serde::Serialize>(rows: impl IntoIterator<Item = T>) -> Vec<Value> {
            rows.into_iter()
                .map(|r| serde_json::to_value(r).unwrap())
                .collect()
        }
        vec![
            json(self.xp.iter().map(|(u, r)| XpRow {
                user_id: *u,
                xp: r.0,
                level: level_for_xp(r.0),
                questions: r.1,
                answers: r.2,
                accepted_answers: r.3,
            })),
            json(self.leaderboard_rows()),
            json(self.quota.values()),
            json(self.content.values()),
            json(self.tags.iter().map(|(t, r)| TagRow {
                tag: t.clone(),
                questions: r.0,
                answers: r.1,
            })),
        ]
    }
}

/// SplitMix64: a tiny deterministic generator for delivery orders.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// The consumers of the property test: the four projections and a policy (no changes).
fn consumers() -> Vec<&'static str> {
    let mut c: Vec<&str> = Projection::ALL.iter().map(|p| p.name()).collect();
    c.push("policy.gamification");
    c
}

async fn shuffled_delivery_equals_reference(ops: Vec<Op>, seed: u64) {
    let history = History::build(&ops);
    let n = history.events.len();
    let mut reference = Reference::default();
    for consumer in Projection::ALL {
        for (_, changes) in history.items(consumer.name()) {
            for c in &changes {
                reference.apply(c);
            }
        }
    }
    let expected = reference.exports();

    // Once, in position order, in one batch per consumer.
    let (_d1, in_order) = open();
    for consumer in consumers() {
        let items = history.items(consumer);
        let out = in_order.apply(consumer, &items).await.unwrap();
        assert!(out.iter().all(|o| *o == ApplyOutcome::Applied));
    }
    let (models, _) = snapshot(&in_order).await;
    assert_eq!(models, expected);

    // Shuffled, duplicated, in random batches through two handles; then redelivered.
    let (_d2, shuffled) = open();
    let other = SqliteReadModels::open(shuffled.path()).unwrap();
    let mut rng = Rng(seed);
    for consumer in consumers() {
        let items = history.items(consumer);
        let mut order: Vec<usize> = (0..n).collect();
        for i in 0..n {
            if rng.below(3) == 0 {
                order.push(i);
            }
        }
        rng.shuffle(&mut order);
        // Random batches handed to one of two "workers" (handles); Gap items go back into
        // the queue at a random place and are retried until everything is applied.
        let mut queue: VecDeque<usize> = order.into();
        let mut applied = 0;
        let mut rounds = 0;
        while !queue.is_empty() {
            rounds += 1;
            assert!(rounds < 100_000, "delivery does not progress");
            let k = 1 + rng.below(queue.len().min(8));
            let take: Vec<usize> = queue.drain(..k).collect();
            let store = if rng.below(2) == 0 { &shuffled } else { &other };
            let batch: Vec<_> = take.iter().map(|&i| items[i].clone()).collect();
            let outcomes = store.apply(consumer, &batch).await.unwrap();
            for (i, o) in take.into_iter().zip(outcomes) {
                match o {
                    ApplyOutcome::Applied => applied += 1,
                    ApplyOutcome::Duplicate => {}
                    ApplyOutcome::Gap { expected } => {
                        assert!(expected < items[i].0.sequence);
                        let at = rng.below(queue.len() + 1);
                        queue.insert(at, i);
                    }
                }
            }
        }
        assert_eq!(applied, n, "{consumer}: every event applied exactly once");
        let mut again: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut again);
        let batch: Vec<_> = again.iter().map(|&i| items[i].clone()).collect();
        let out = other.apply(consumer, &batch).await.unwrap();
        assert!(out.iter().all(|o| *o == ApplyOutcome::Duplicate));
    }
    let (models, checkpoints) = snapshot(&shuffled).await;
    assert_eq!(models, expected);
    let mut names = consumers();
    names.sort();
    if n > 0 {
        assert_eq!(
            checkpoints,
            names
                .iter()
                .map(|c| Checkpoint {
                    name: c.to_string(),
                    checkpoint: n as u64,
                    applied: n as u64,
                })
                .collect::<Vec<_>>()
        );
    }
    // Point queries agree with the exports.
    for row in reference.leaderboard_rows() {
        assert_eq!(
            shuffled.rank(&row.board, row.user_id).await.unwrap(),
            Some(row)
        );
    }
    for (user_id, r) in &reference.xp {
        assert_eq!(shuffled.user_xp(*user_id).await.unwrap().unwrap().xp, r.0);
    }
    for row in reference.content.values() {
        assert_eq!(
            shuffled.content(row.content_id).await.unwrap().as_ref(),
            Some(row)
        );
    }
    for row in reference.quota.values() {
        assert_eq!(
            shuffled
                .quota(row.user_id, &row.period)
                .await
                .unwrap()
                .as_ref(),
            Some(row)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn shuffled_duplicated_redelivery_equals_the_reference_fold(
        ops in proptest::collection::vec(op(), 0..60),
        seed in any::<u64>(),
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(shuffled_delivery_equals_reference(ops, seed));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Ranks, pages at every offset and "around me" equal a plain sort of the summed XP, on
    /// boards whose count trie splits deep (ids sharing 8-byte prefixes, large ties).
    #[test]
    fn ranks_pages_and_around_me_equal_a_full_sort(
        users in 1usize..400,
        seed in any::<u64>(),
        tied in any::<bool>(),
    ) {
        // Mixed XP, or one tie per board (split as soon as it holds more than 64 entries).
        let h = if tied { ranking::ties(users, seed) } else { ranking::history(users, seed) };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("ranks.db");
                let store = SqliteReadModels::open(&path).unwrap();
                ranking::apply_and_check(&store, &h, 1).await;
                // A file written before the trie existed: opening it builds the trie.
                drop(store);
                rusqlite::Connection::open(&path)
                    .unwrap()
                    .execute("DELETE FROM rm_leaderboard_tree", [])
                    .unwrap();
                ranking::check(&SqliteReadModels::open(&path).unwrap(), &h, 3).await;
            });
    }
}

/// Rebuilds beside the live read model (blue/green), for a one-table model (`xp`) and one
/// with its count trie (`leaderboard`); see `rebuilds/mod.rs`.
#[tokio::test]
async fn rebuilds_beside_the_live_version_switch_atomically_resume_and_cancel() {
    for projection in [Projection::Xp, Projection::Leaderboard] {
        let (_dir, store) = open();
        rebuilds::blue_green(&store, projection).await;
    }
}

/// A file written before rebuilds existed (no `state` column) opens, keeps its checkpoints,
/// and can then be rebuilt beside the live version.
#[tokio::test]
async fn files_from_before_rebuilds_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tektree.db");
    {
        let store = SqliteReadModels::open(&path).unwrap();
        let out = store
            .apply("xp", &[(key("user", user(1), 1, 1), vec![xp(user(1), 7)])])
            .await
            .unwrap();
        assert_eq!(out, vec![ApplyOutcome::Applied]);
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE old_checkpoint AS SELECT consumer, checkpoint, applied FROM consumer_checkpoint;
         DROP TABLE consumer_checkpoint;
         CREATE TABLE consumer_checkpoint (
             consumer TEXT NOT NULL PRIMARY KEY,
             checkpoint INTEGER NOT NULL DEFAULT 0,
             applied INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
         INSERT INTO consumer_checkpoint SELECT * FROM old_checkpoint;
         DROP TABLE old_checkpoint;",
    )
    .unwrap();
    drop(conn);
    let store = SqliteReadModels::open(&path).unwrap();
    let cp = store.checkpoints().await.unwrap();
    assert_eq!((cp[0].name.as_str(), cp[0].checkpoint), ("xp", 1));
    let out = store
        .apply("xp", &[(key("user", user(1), 1, 1), vec![xp(user(1), 7)])])
        .await
        .unwrap();
    assert_eq!(out, vec![ApplyOutcome::Duplicate]);
    store.rebuild_begin(Projection::Xp).await.unwrap();
    store
        .rebuild_apply(
            Projection::Xp,
            &[(key("user", user(1), 1, 1), vec![xp(user(1), 9)])],
        )
        .await
        .unwrap();
    store.rebuild_switch(Projection::Xp).await.unwrap();
    assert_eq!(store.user_xp(user(1)).await.unwrap().unwrap().xp, 9);
}

/// `users` users with XP 1, 2, … on the all-time board: as many `(board, xp)` groups.
fn distinct_xp(users: u64) -> ranking::History {
    let mut h = ranking::History {
        batches: vec![vec![]],
        sums: BTreeMap::new(),
    };
    for i in 1..=users {
        let id = user(0xd15_0000 + u128::from(i));
        h.sums.insert(("all-time".to_string(), id), i as i64);
        h.batches[0].push((
            key("profile", id, 1, i),
            vec![board("all-time", id, i as i64)],
        ));
        if i % 100 == 0 {
            h.batches.push(vec![]);
        }
    }
    h
}

/// A leaderboard rebuild writes entries only until it first reaches the head, then builds its
/// count trie from them in chunks of groups (its seal) and moves entries in it from then on:
/// the switched board answers every rank, page and around-me like a plain sort, for a mixed
/// history (over a thousand `(board, xp)` groups: several chunks) and for one big tie (split
/// nodes).
#[tokio::test]
async fn a_leaderboard_rebuild_seals_its_trie_in_chunks_and_ranks_exactly() {
    for (h, stride) in [
        (distinct_xp(1_300), 29),
        (ranking::history(400, 0x5eed_00a1), 7),
        (ranking::ties(300, 0x5eed_00a2), 7),
    ] {
        let (_dir, store) = open();
        let n: u64 = h.batches.iter().map(|b| b.len() as u64).sum();
        // The live consumer is one event ahead of the history, so the first switch attempt
        // only seals.
        let extra = (key("profile", user(u128::MAX), 1, n + 1), vec![]);
        store
            .apply("leaderboard", std::slice::from_ref(&extra))
            .await
            .unwrap();
        store.rebuild_begin(Projection::Leaderboard).await.unwrap();
        let half = h.batches.len() / 2;
        for batch in &h.batches[..half] {
            store
                .rebuild_apply(Projection::Leaderboard, batch)
                .await
                .unwrap();
        }
        assert!(matches!(
            store.rebuild_switch(Projection::Leaderboard).await.unwrap(),
            RebuildSwitch::Behind { live, .. } if live == n + 1
        ));
        for batch in &h.batches[half..] {
            store
                .rebuild_apply(Projection::Leaderboard, batch)
                .await
                .unwrap();
        }
        store
            .rebuild_apply(Projection::Leaderboard, &[extra])
            .await
            .unwrap();
        assert_eq!(
            store.rebuild_switch(Projection::Leaderboard).await.unwrap(),
            RebuildSwitch::Switched
        );
        ranking::check(&store, &h, stride).await;
    }
}

/// Event `p` of the memo test: user `p % 4`'s next event (two aggregate types, so the memo's
/// interned types are exercised), worth `p` XP to that user.
fn memo_event(p: u64) -> (EventKey, Vec<Change>) {
    let u = u128::from(p % 4);
    let ty = if u % 2 == 0 { "user" } else { "profile" };
    let id = user(0x3e30 + u);
    (key(ty, id, (p - 1) / 4 + 1, p), vec![xp(id, p as i64)])
}

fn memo_events(range: impl IntoIterator<Item = u64>) -> Vec<(EventKey, Vec<Change>)> {
    range.into_iter().map(memo_event).collect()
}

/// Per user, the XP of events `range` (the oracle: a plain sum).
fn memo_sums(range: impl IntoIterator<Item = u64>) -> BTreeMap<Uuid, i64> {
    let mut sums = BTreeMap::new();
    for p in range {
        *sums.entry(user(0x3e30 + u128::from(p % 4))).or_default() += p as i64;
    }
    sums
}

async fn memo_read(store: &SqliteReadModels) -> BTreeMap<Uuid, i64> {
    let mut out = BTreeMap::new();
    for u in 0..4 {
        if let Some(row) = store.user_xp(user(0x3e30 + u)).await.unwrap() {
            out.insert(row.user_id, row.xp);
        }
    }
    out
}

fn table_exists(path: &Path, name: &str) -> bool {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )
        .unwrap()
}

fn applied(out: &[ApplyOutcome]) -> bool {
    out.iter().all(|o| *o == ApplyOutcome::Applied)
}

/// An unsealed rebuild keeps its sequence guards in memory (written to `consumer_guard` once,
/// at its seal). The guard semantics must not change: pages applied by another instance on
/// the same file (another process) and by an instance opened after a restart continue the
/// same guards, a duplicate and a gap are told as such, and after the switch the live consumer
/// goes on from exactly the rebuilt guards. A rebuild begun by a version that wrote its guards
/// to `consumer_guard` resumes from them.
#[tokio::test]
async fn an_unsealed_rebuild_keeps_its_guards_in_memory_with_the_same_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tektree.db");
    let a = SqliteReadModels::open(&path).unwrap();
    assert!(applied(&a.apply("xp", &memo_events(1..=40)).await.unwrap()));
    a.rebuild_begin(Projection::Xp).await.unwrap();
    assert!(table_exists(&path, "rebuild_guard_log_xp"));
    assert!(applied(
        &a.rebuild_apply(Projection::Xp, &memo_events(1..=12))
            .await
            .unwrap()
    ));
    // Another instance continues the same aggregates.
    let b = SqliteReadModels::open(&path).unwrap();
    assert!(applied(
        &b.rebuild_apply(Projection::Xp, &memo_events(13..=20))
            .await
            .unwrap()
    ));
    // The first instance sees what the second applied: 13 is a duplicate, 25 (its user's
    // 7th event while the 6th, 21, is not applied) a gap; 21..=24 apply.
    let (k25, _) = memo_event(25);
    assert_eq!(k25.sequence, 7);
    let out = a
        .rebuild_apply(
            Projection::Xp,
            &[memo_event(13), memo_event(25)]
                .into_iter()
                .chain(memo_events(21..=24))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            vec![ApplyOutcome::Duplicate, ApplyOutcome::Gap { expected: 6 }],
            vec![ApplyOutcome::Applied; 4]
        ]
        .concat()
    );
    drop((a, b));
    // After a restart: resumes at 24 and goes on.
    let c = SqliteReadModels::open(&path).unwrap();
    let resumed = c.rebuild_begin(Projection::Xp).await.unwrap();
    assert_eq!((resumed.checkpoint, resumed.applied), (24, 24));
    assert!(applied(
        &c.rebuild_apply(Projection::Xp, &memo_events(25..=40))
            .await
            .unwrap()
    ));
    assert_eq!(
        c.rebuild_switch(Projection::Xp).await.unwrap(),
        RebuildSwitch::Switched
    );
    assert!(!table_exists(&path, "rebuild_guard_log_xp"));
    assert_eq!(memo_read(&c).await, memo_sums(1..=40));
    // The live consumer goes on from the sealed guards.
    let out = c.apply("xp", &memo_events(37..=44)).await.unwrap();
    assert_eq!(
        out,
        [
            vec![ApplyOutcome::Duplicate; 4],
            vec![ApplyOutcome::Applied; 4]
        ]
        .concat()
    );
    assert_eq!(memo_read(&c).await, memo_sums(1..=44));

    // A rebuild begun before guards were kept in memory: its guards in `consumer_guard`, no
    // log table.
    let begun = c.rebuild_begin(Projection::Xp).await.unwrap();
    assert!(applied(
        &c.rebuild_apply(Projection::Xp, &memo_events(1..=8))
            .await
            .unwrap()
    ));
    drop(c);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("DROP TABLE rebuild_guard_log_xp")
        .unwrap();
    for u in 0..4u128 {
        let (k, _) = memo_event(u64::try_from(4 + u).unwrap());
        conn.execute(
            "INSERT INTO consumer_guard VALUES (?1, ?2, ?3, 2)",
            rusqlite::params![
                format!("xp#g{}", begun.generation),
                k.aggregate_type,
                k.aggregate_id.to_string()
            ],
        )
        .unwrap();
    }
    drop(conn);
    let d = SqliteReadModels::open(&path).unwrap();
    d.rebuild_begin(Projection::Xp).await.unwrap();
    assert_eq!(
        d.rebuild_apply(Projection::Xp, &memo_events([8]))
            .await
            .unwrap(),
        vec![ApplyOutcome::Duplicate]
    );
    assert!(applied(
        &d.rebuild_apply(Projection::Xp, &memo_events(9..=44))
            .await
            .unwrap()
    ));
    assert_eq!(
        d.rebuild_switch(Projection::Xp).await.unwrap(),
        RebuildSwitch::Switched
    );
    assert_eq!(memo_read(&d).await, memo_sums(1..=44));
    let out = d.apply("xp", &memo_events(44..=45)).await.unwrap();
    assert_eq!(out, vec![ApplyOutcome::Duplicate, ApplyOutcome::Applied]);
}
