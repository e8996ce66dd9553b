//! A poison event is dead-lettered after `max_deliver` attempts, the worker moves on with every
//! other aggregate while the poisoned aggregate's later events wait, and a re-drive applies it
//! and releases them — ending equal to a rebuild from the store. Run on the in-process bus and on
//! Redis Streams and NATS JetStream (real servers).

use std::time::Duration;

use chrono::Utc;
use tektree_commands::CommandMeta;
use tektree_domain::{
    Actor, Content, ContentCommand, NoServices, Rules, User, UserCommand, VoteDirection,
};
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_projections::{Projection, ReadModel};
use tektree_services::app::App;
use tektree_services::replay::rebuild;
use tektree_services::worker::{self, Processed, WorkerConfig};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

async fn vote(app: &App, q: Uuid, voter: Uuid) -> Uuid {
    let meta = CommandMeta::new(Actor::importer(), Utc::now());
    let cmd = ContentCommand::Vote {
        content_id: q,
        voter_id: voter,
        direction: VoteDirection::Up,
        actor: Actor::importer(),
    };
    let o = app
        .handler
        .execute::<Content>(q, cmd, &app.knowledge, &meta)
        .await
        .unwrap();
    o.events[0].event_id
}

async fn question(app: &App, author: Uuid) -> Uuid {
    let meta = CommandMeta::new(Actor::importer(), Utc::now());
    let q = Uuid::new_v4();
    let cmd = ContentCommand::PostQuestion {
        question_id: q,
        author_id: Some(author),
        title: "t".into(),
        body: String::new(),
        tags: vec![],
        actor: Actor::importer(),
        area_id: None,
    };
    app.handler
        .execute::<Content>(q, cmd, &app.knowledge, &meta)
        .await
        .unwrap();
    q
}

async fn upvotes(app: &App, q: Uuid) -> i64 {
    app.read_models
        .content(q)
        .await
        .unwrap()
        .map(|r| r.upvotes)
        .unwrap_or(-1)
}

async fn scenario(bus: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, bus, Rules::default()).await.unwrap();
    let author = Uuid::new_v4();
    let meta = CommandMeta::new(Actor::importer(), Utc::now());
    let reg = UserCommand::Register {
        user_id: author,
        display_name: "a".into(),
        preferences: Default::default(),
    };
    app.handler
        .execute::<User>(author, reg, &NoServices, &meta)
        .await
        .unwrap();
    let (poisoned, healthy) = (question(&app, author).await, question(&app, author).await);
    let poison = vote(&app, poisoned, Uuid::new_v4()).await;
    for _ in 0..3 {
        vote(&app, poisoned, Uuid::new_v4()).await; // wait behind the poison
        vote(&app, healthy, Uuid::new_v4()).await;
    }

    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_relay(stopped.clone(), &mut tasks);
    for c in app.consumers() {
        let mut cfg = WorkerConfig {
            max_deliver: 3,
            ..WorkerConfig::default()
        };
        if c.name() == "content" {
            cfg.fail_on = vec![poison];
        }
        app.spawn_consumer(c, cfg, stopped.clone(), &mut tasks);
    }

    // The poison becomes exactly one dead letter of `content`; the healthy question is complete.
    let dead = loop {
        let d = app.bus.dead_letters(None, 100).await.unwrap();
        if !d.is_empty() && upvotes(&app, healthy).await == 3 {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.len(), 1, "{bus}: {dead:?}");
    assert_eq!(dead[0].group, "content");
    assert_eq!(dead[0].envelope.event_id, poison);
    assert!(dead[0].delivery_count >= 3);
    assert!(
        dead[0].reason.contains("injected fault"),
        "{}",
        dead[0].reason
    );
    // The poisoned question shows nothing after the poison: its later votes wait.
    assert_eq!(upvotes(&app, poisoned).await, 0, "{bus}");
    // Other consumers were not affected: XP counts all 7 upvotes once settled there.
    let cps = app.read_models.checkpoints().await.unwrap();
    let content_cp = cps.iter().find(|c| c.name == "content").unwrap().checkpoint;
    let head = app.store.head().await.unwrap().position;
    assert!(
        content_cp < head,
        "{bus}: content checkpoint stops before the poison"
    );

    // Re-drive: applied, removed, and the waiting votes follow.
    let r = worker::redrive(&app, &dead[0].id).await.unwrap();
    assert_eq!(r, Processed::Applied);
    assert!(app.bus.dead_letters(None, 100).await.unwrap().is_empty());
    app.settle(Duration::from_secs(120)).await.unwrap();
    assert_eq!(upvotes(&app, poisoned).await, 4, "{bus}");
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}

    // Equal to a rebuild from the store.
    let mut live = vec![];
    for m in [
        ReadModel::Xp,
        ReadModel::Leaderboard,
        ReadModel::Quota,
        ReadModel::Content,
        ReadModel::Tags,
    ] {
        live.push(app.read_models.export(m, None, 10_000).await.unwrap().rows);
    }
    for p in Projection::ALL {
        rebuild(app.store.as_ref(), app.read_models.as_ref(), p, |_| {})
            .await
            .unwrap();
    }
    let mut rebuilt = vec![];
    for m in [
        ReadModel::Xp,
        ReadModel::Leaderboard,
        ReadModel::Quota,
        ReadModel::Content,
        ReadModel::Tags,
    ] {
        rebuilt.push(app.read_models.export(m, None, 10_000).await.unwrap().rows);
    }
    assert_eq!(live, rebuilt, "{bus}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_is_dead_lettered_and_redriven_on_every_bus() {
    scenario("memory").await;
    let redis = RedisServer::start();
    scenario(&redis.url).await;
    let nats = NatsServer::start();
    scenario(&nats.url).await;
}
