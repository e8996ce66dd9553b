//! The `tektree-replay` binary against a real SQLite store built through the command path.

use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tektree_domain::{
    Actor, Content, ContentCommand, NoServices, Rules, User, UserCommand, VoteDirection,
};
use tektree_projections::ReadModel;
use tektree_runtime::app::App;
use tektree_runtime::worker::Consumer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

fn replay(store: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tektree-replay"))
        .args(["--store", store])
        .args(args)
        .output()
        .expect("run tektree-replay");
    assert!(
        out.status.success(),
        "tektree-replay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn exports(app: &App) -> Vec<Vec<serde_json::Value>> {
    let mut all = vec![];
    for m in [
        ReadModel::Xp,
        ReadModel::Leaderboard,
        ReadModel::Quota,
        ReadModel::Content,
        ReadModel::Tags,
    ] {
        all.push(app.read_models.export(m, None, 10_000).await.unwrap().rows);
    }
    all
}

/// A small live history: users, questions, answers, votes (one replaced), an accept.
async fn build_history(app: &App) -> (Uuid, Uuid) {
    let meta = || tektree_commands::CommandMeta::new(Actor::importer(), Utc::now());
    let mut users = vec![];
    for i in 0..5 {
        let id = Uuid::new_v4();
        let cmd = UserCommand::Register {
            user_id: id,
            display_name: format!("user{i}"),
            preferences: Default::default(),
        };
        app.handler
            .execute::<User>(id, cmd, &NoServices, &meta())
            .await
            .unwrap();
        users.push(id);
    }
    let q = Uuid::new_v4();
    let cmd = ContentCommand::PostQuestion {
        question_id: q,
        author_id: Some(users[0]),
        title: "Why?".into(),
        body: String::new(),
        tags: vec!["rome".into(), "sources".into()],
        actor: Actor::User(users[0]),
        area_id: None,
    };
    app.handler
        .execute::<Content>(q, cmd, &app.knowledge, &meta())
        .await
        .unwrap();
    let mut answers = vec![];
    for u in &users[1..] {
        let a = Uuid::new_v4();
        let cmd = ContentCommand::SubmitAnswer {
            answer_id: a,
            question_id: q,
            author_id: Some(*u),
            body: "Because.".into(),
            actor: Actor::User(*u),
        };
        app.handler
            .execute::<Content>(a, cmd, &app.knowledge, &meta())
            .await
            .unwrap();
        answers.push(a);
    }
    for (i, a) in answers.iter().enumerate() {
        for (j, voter) in users.iter().enumerate() {
            let direction = if (i + j) % 3 == 0 {
                VoteDirection::Down
            } else {
                VoteDirection::Up
            };
            for d in [direction, VoteDirection::Up] {
                let cmd = ContentCommand::Vote {
                    content_id: *a,
                    voter_id: *voter,
                    direction: d,
                    actor: Actor::User(*voter),
                };
                app.handler
                    .execute::<Content>(*a, cmd, &app.knowledge, &meta())
                    .await
                    .unwrap();
            }
        }
    }
    let cmd = ContentCommand::AcceptAnswer {
        question_id: q,
        answer_id: answers[1],
        actor: Actor::User(users[0]),
    };
    app.handler
        .execute::<Content>(q, cmd, &app.knowledge, &meta())
        .await
        .unwrap();
    (q, answers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_status_and_events_over_a_live_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, "memory", Rules::default()).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    let (q, accepted) = build_history(&app).await;
    app.settle(Duration::from_secs(120)).await.unwrap();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let live = exports(&app).await;
    assert!(live.iter().all(|rows| !rows.is_empty()));

    // status: every consumer caught up with the head.
    let status: serde_json::Value =
        serde_json::from_str(&replay(&store, &["status", "--json"])).unwrap();
    let head = app.store.head().await.unwrap().position;
    assert_eq!(status["head_position"], head);
    let consumers = status["consumers"].as_array().unwrap();
    let names: Vec<&str> = consumers
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let want: Vec<String> = app
        .consumers()
        .iter()
        .map(|c: &std::sync::Arc<dyn Consumer>| c.name().to_string())
        .collect();
    assert_eq!(names, want);
    assert!(consumers
        .iter()
        .all(|c| c["lag"] == 0 && c["checkpoint"] == head));

    // rebuild --all from the store gives the live read models back.
    let out = replay(&store, &["rebuild", "--all", "--quiet"]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One line per projection: xp, leaderboard, quota, content, tags; each rebuilt beside
    // the live version (generation 1) and switched.
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(|l| l["events"] == head
        && l["switched"] == true
        && l["generation"] == 1
        && l["resumed_from"] == 0));
    assert_eq!(exports(&app).await, live);
    // status lists the rebuilds, switched, with their speed.
    let status: serde_json::Value =
        serde_json::from_str(&replay(&store, &["status", "--json"])).unwrap();
    let rebuilds = status["rebuilds"].as_array().unwrap();
    assert_eq!(rebuilds.len(), 5);
    for r in rebuilds {
        assert_eq!(
            (&r["phase"], &r["checkpoint"]),
            (&json!("switched"), &json!(head))
        );
        assert!(r["events_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["eta_secs"].is_null());
    }
    // Nothing in progress to cancel; the stopped-world rebuild gives the same read models.
    let cancel: serde_json::Value =
        serde_json::from_str(&replay(&store, &["rebuild", "xp", "--cancel"])).unwrap();
    assert_eq!(cancel, json!({"projection": "xp", "cancelled": false}));
    let out = replay(&store, &["rebuild", "--all", "--in-place", "--quiet"]);
    assert_eq!(out.lines().count(), 5);
    assert_eq!(exports(&app).await, live);

    // events --aggregate prints the question's history in sequence order.
    let out = replay(&store, &["events", "--aggregate", &format!("content/{q}")]);
    let events: Vec<tektree_domain::EventEnvelope> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["knowledge.question.posted", "knowledge.answer.accepted"]
    );
    assert_eq!(events[1].payload["answer_id"], accepted.to_string());
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2]
    );

    // Events written by this build are current: upcast (the default) and `--stored` print
    // the same lines, `user.registered` at version 2 with its preferences. (Stored older
    // versions: services/tests/upcasting.rs.)
    let limit = head.to_string();
    let upcast = replay(&store, &["events", "--limit", &limit]);
    assert_eq!(upcast.lines().count() as u64, head);
    assert_eq!(
        replay(&store, &["events", "--limit", &limit, "--stored"]),
        upcast
    );
    let registered: Vec<tektree_domain::EventEnvelope> = upcast
        .lines()
        .map(|l| serde_json::from_str::<tektree_domain::EventEnvelope>(l).unwrap())
        .filter(|e| e.event_type == "user.registered")
        .collect();
    assert_eq!(registered.len(), 5);
    for e in &registered {
        assert_eq!(e.event_version, 2);
        assert_eq!(e.payload["preferences"]["language"], "en");
    }
}

#[test]
fn unknown_projection_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let out = Command::new(env!("CARGO_BIN_EXE_tektree-replay"))
        .args(["--store", &store, "rebuild", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown projection \"nope\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_redriven_through_the_cli() {
    let redis = tektree_outbox::test_support::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, &redis.url, Rules::default())
        .await
        .unwrap();
    let (q, _) = build_history(&app).await;
    // Set the question's first event aside as a dead letter of `content`, as a worker would.
    let posted = app.store.load("content", q).await.unwrap().remove(0);
    let delivery = tektree_outbox::Delivery {
        id: posted.position.to_string(),
        envelope: posted.clone(),
        delivery_count: 5,
    };
    app.bus
        .dead_letter("content", &delivery, "handler failed")
        .await
        .unwrap();
    let with_bus = |args: &[&str]| {
        let mut v = vec!["--bus", redis.url.as_str()];
        v.extend_from_slice(args);
        replay(&store, &v)
    };
    let listed: Vec<serde_json::Value> = with_bus(&["dead-letters", "--group", "content"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["reason"], "handler failed");
    assert_eq!(
        listed[0]["envelope"]["event_id"],
        posted.event_id.to_string()
    );
    assert!(with_bus(&["dead-letters", "--group", "xp"]).is_empty());
    let id = listed[0]["id"].as_str().unwrap().to_string();
    let out = with_bus(&["redrive", &id]);
    assert!(out.contains("Applied"), "{out}");
    assert!(with_bus(&["dead-letters"]).is_empty());
    let row = app.read_models.content(q).await.unwrap().unwrap();
    assert_eq!(row.kind.as_deref(), Some("question"));
}
