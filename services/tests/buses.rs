//! The same command history through every bus (in-process, Redis Streams, NATS JetStream —
//! real servers) gives identical read models, and a rebuild from the store gives them again.

use std::time::Duration;

use tektree_commands::CommandMeta;
use tektree_domain::{
    Actor, Content, ContentCommand, NoServices, Rules, User, UserCommand, VoteDirection,
};
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_projections::{ReadModel, PROJECTIONS};
use tektree_services::app::App;
use tektree_services::replay::rebuild;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

fn id(kind: &str, n: usize) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("test:{kind}:{n}").as_bytes())
}

/// A deterministic history: 6 users, 3 questions, 9 answers, comments, votes with
/// replacements, accepts. Ids are fixed so that every bus run produces comparable rows.
async fn drive(app: &App) {
    let meta = || CommandMeta::new(Actor::importer(), "2024-01-07T12:00:00Z".parse().unwrap());
    for u in 0..6 {
        let cmd = UserCommand::Register {
            user_id: id("user", u),
            display_name: format!("user{u}"),
            preferences: Default::default(),
        };
        app.handler
            .execute::<User>(id("user", u), cmd, &NoServices, &meta())
            .await
            .unwrap();
    }
    for q in 0..3 {
        let cmd = ContentCommand::PostQuestion {
            question_id: id("q", q),
            author_id: Some(id("user", q)),
            title: format!("question {q}"),
            body: String::new(),
            tags: vec![format!("t{q}"), "common".into()],
            actor: Actor::importer(),
            area_id: None,
        };
        app.handler
            .execute::<Content>(id("q", q), cmd, &app.knowledge, &meta())
            .await
            .unwrap();
        for a in 0..3 {
            let n = q * 3 + a;
            let cmd = ContentCommand::SubmitAnswer {
                answer_id: id("a", n),
                question_id: id("q", q),
                author_id: Some(id("user", (n + 1) % 6)),
                body: "answer".into(),
                actor: Actor::importer(),
            };
            app.handler
                .execute::<Content>(id("a", n), cmd, &app.knowledge, &meta())
                .await
                .unwrap();
            for v in 0..6 {
                for d in [VoteDirection::Up, VoteDirection::Down] {
                    if (n + v) % 3 == 0 && d == VoteDirection::Down {
                        continue;
                    }
                    let cmd = ContentCommand::Vote {
                        content_id: id("a", n),
                        voter_id: id("user", v),
                        direction: if (n * v) % 4 == 0 {
                            d
                        } else {
                            VoteDirection::Up
                        },
                        actor: Actor::importer(),
                    };
                    app.handler
                        .execute::<Content>(id("a", n), cmd, &app.knowledge, &meta())
                        .await
                        .unwrap();
                }
            }
            let cmd = ContentCommand::AddComment {
                content_id: id("a", n),
                comment_id: id("c", n),
                author_id: Some(id("user", v_of(n))),
                text: "comment".into(),
                actor: Actor::importer(),
            };
            app.handler
                .execute::<Content>(id("a", n), cmd, &app.knowledge, &meta())
                .await
                .unwrap();
        }
        let cmd = ContentCommand::AcceptAnswer {
            question_id: id("q", q),
            answer_id: id("a", q * 3 + 1),
            actor: Actor::importer(),
        };
        app.handler
            .execute::<Content>(id("q", q), cmd, &app.knowledge, &meta())
            .await
            .unwrap();
    }
}

fn v_of(n: usize) -> usize {
    (n * 5) % 6
}

async fn exports(app: &App) -> Vec<Vec<serde_json::Value>> {
    let mut all = vec![];
    for m in [
        ReadModel::Xp,
        ReadModel::Leaderboard,
        ReadModel::Quota,
        ReadModel::Content,
    ] {
        all.push(app.read_models.export(m, None, 100_000).await.unwrap().rows);
    }
    all
}

async fn run(bus: &str) -> Vec<Vec<serde_json::Value>> {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, bus, Rules::default()).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    drive(&app).await;
    app.settle(Duration::from_secs(300)).await.unwrap();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let live = exports(&app).await;
    for p in PROJECTIONS {
        rebuild(app.store.as_ref(), app.read_models.as_ref(), p, |_| {})
            .await
            .unwrap();
    }
    assert_eq!(exports(&app).await, live, "{bus}: rebuild equals live");
    live
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bus_gives_identical_read_models() {
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let memory = run("memory").await;
    assert!(memory.iter().all(|rows| !rows.is_empty()));
    assert_eq!(memory[0].len(), 6, "one xp row per registered user");
    assert_eq!(run(&redis.url).await, memory, "redis vs in-process");
    assert_eq!(run(&nats.url).await, memory, "nats vs in-process");
}

/// A process started while its bus is down (Redis restarting) waits for it instead of failing
/// (found by the fault harness); without patience it fails at once with a transport error.
#[tokio::test]
async fn opening_waits_for_a_bus_that_comes_up_later() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let port = tektree_outbox::test_support::restartable_port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = App::open(&store, &url, Rules::default()).await.err();
    assert!(
        matches!(
            err,
            Some(tektree_services::app::AppError::Bus(
                tektree_outbox::BusError::Transport(_)
            ))
        ),
        "{err:?}"
    );
    let data = dir.path().join("redis");
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        RedisServer::start_persistent_on(port, data).unwrap()
    });
    let app = App::open_waiting(&store, &url, Rules::default(), Duration::from_secs(60))
        .await
        .unwrap();
    let server = starter.join().unwrap();
    assert!(!app.in_process_bus);
    // The bus works: publishing the head (nothing) and reading the last published position.
    assert_eq!(app.bus.last_published().await.unwrap(), 0);
    drop(server);
}
