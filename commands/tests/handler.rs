//! Command handling against a real SQLite event store.

use std::sync::Arc;

use chrono::Utc;
use tektree_commands::policies::{Gamification, Metering, Policy};
use tektree_commands::{CommandError, CommandHandler, CommandMeta, StoreServices};
use tektree_domain::{
    Actor, Content, ContentCommand, Event, KnowledgeServices, NoServices, Profile, QuotaRules,
    User, UserCommand, VoteDirection, XpRules,
};
use tektree_event_store::{EventStore, SqliteStore};
use uuid::Uuid;

fn setup() -> (
    tempfile::TempDir,
    CommandHandler,
    Arc<dyn KnowledgeServices>,
) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap());
    let handler = CommandHandler::new(store);
    let services: Arc<dyn KnowledgeServices> = Arc::new(StoreServices::new(handler.clone()));
    (dir, handler, services)
}

fn meta() -> CommandMeta {
    CommandMeta::new(Actor::importer(), Utc::now())
}

async fn register(h: &CommandHandler, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    let cmd = UserCommand::Register {
        user_id: id,
        display_name: name.into(),
        preferences: Default::default(),
    };
    h.execute::<User>(id, cmd, &NoServices, &meta())
        .await
        .unwrap();
    id
}

async fn question(h: &CommandHandler, s: &Arc<dyn KnowledgeServices>, author: Uuid) -> Uuid {
    let q = Uuid::new_v4();
    let cmd = ContentCommand::PostQuestion {
        question_id: q,
        author_id: Some(author),
        title: "Why?".into(),
        body: String::new(),
        tags: vec!["rome".into()],
        actor: Actor::User(author),
        area_id: None,
    };
    h.execute::<Content>(q, cmd, s, &meta()).await.unwrap();
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_votes_on_one_post_all_commit_with_contiguous_sequences() {
    let (_d, h, s) = setup();
    let author = register(&h, "author").await;
    let q = question(&h, &s, author).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (h, s) = (h.clone().with_max_attempts(50), s.clone());
        tasks.push(tokio::spawn(async move {
            let cmd = ContentCommand::Vote {
                content_id: q,
                voter_id: Uuid::new_v4(),
                direction: VoteDirection::Up,
                actor: Actor::importer(),
            };
            h.execute::<Content>(q, cmd, &s, &meta()).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().events.len(), 1);
    }
    let events = h.store().load("content", q).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=17).collect::<Vec<_>>());
    let (state, version) = h.load::<Content>(q).await.unwrap();
    assert_eq!((state.votes.len(), version), (16, 17));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_beyond_the_attempt_bound_answer_conflict_and_write_nothing() {
    let (_d, h, s) = setup();
    let author = register(&h, "author").await;
    let q = question(&h, &s, author).await;
    // One attempt only: with 16 racing writers some must lose and report Conflict.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (h, s) = (h.clone().with_max_attempts(1), s.clone());
        tasks.push(tokio::spawn(async move {
            let cmd = ContentCommand::Vote {
                content_id: q,
                voter_id: Uuid::new_v4(),
                direction: VoteDirection::Down,
                actor: Actor::importer(),
            };
            h.execute::<Content>(q, cmd, &s, &meta()).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(CommandError::Conflict { attempts, .. }) => assert_eq!(attempts, 1),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let events = h.store().load("content", q).await.unwrap();
    assert_eq!(
        events.len(),
        1 + ok,
        "exactly the successful votes were written"
    );
}

#[tokio::test]
async fn rejected_commands_write_nothing() {
    let (_d, h, s) = setup();
    let before = h.store().head().await.unwrap();
    let missing = Uuid::new_v4();
    let cmd = ContentCommand::Vote {
        content_id: missing,
        voter_id: Uuid::new_v4(),
        direction: VoteDirection::Up,
        actor: Actor::importer(),
    };
    let err = h
        .execute::<Content>(missing, cmd, &s, &meta())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found.content");
    assert_eq!(h.store().head().await.unwrap(), before);
}

#[tokio::test]
async fn gamification_awards_once_per_source_and_keeps_correlation() {
    let (_d, h, s) = setup();
    let author = register(&h, "author").await;
    let q = question(&h, &s, author).await;
    let posted = h.store().load("content", q).await.unwrap().remove(0);
    let policy = Gamification::new(h.clone(), XpRules::default(), Default::default());
    let event = posted.decode().unwrap();
    policy.react(&posted, &event).await.unwrap();
    policy.react(&posted, &event).await.unwrap(); // redelivery
    let profile = h.store().load("profile", author).await.unwrap();
    // The award and, as it is the author's first question, the `first-question` achievement
    // of the default rules; the redelivery added nothing.
    assert_eq!(profile.len(), 2);
    let Event::AchievementUnlocked(a) = profile[1].decode().unwrap() else {
        panic!(
            "achievement.unlocked expected, got {}",
            profile[1].event_type
        )
    };
    assert_eq!(
        (a.achievement_id.as_str(), a.source_event_id),
        ("first-question", posted.event_id)
    );
    assert_eq!(profile[1].correlation_id, posted.correlation_id);
    assert_eq!(profile[0].correlation_id, posted.correlation_id);
    assert_eq!(profile[0].causation_id, posted.event_id);
    assert_eq!(profile[0].actor.to_string(), "system:policy.gamification");
    let Event::XpEarned(e) = profile[0].decode().unwrap() else {
        panic!("xp.earned expected")
    };
    assert_eq!(
        (e.amount, e.total_xp, e.tags),
        (2, 2, vec!["rome".to_string()])
    );
    let (p, _) = h.load::<Profile>(author).await.unwrap();
    assert_eq!(p.xp, 2);
}

#[tokio::test]
async fn metering_opens_free_subscription_and_meters_authors_once() {
    let (_d, h, s) = setup();
    let author = register(&h, "author").await;
    let policy = Metering::new(
        h.clone(),
        QuotaRules {
            free: Some(1),
            ..Default::default()
        },
    );
    let reg = h.store().load("user", author).await.unwrap().remove(0);
    policy.react(&reg, &reg.decode().unwrap()).await.unwrap();
    for _ in 0..2 {
        let q = question(&h, &s, author).await;
        let posted = h.store().load("content", q).await.unwrap().remove(0);
        let e = posted.decode().unwrap();
        policy.react(&posted, &e).await.unwrap();
        policy.react(&posted, &e).await.unwrap();
    }
    let types: Vec<String> = h
        .store()
        .load("subscription", author)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types,
        [
            "payment.subscription.created",
            "payment.usage.recorded",
            "payment.usage.recorded",
            "payment.quota.exceeded"
        ]
    );
}

#[tokio::test]
async fn cached_state_catches_up_with_another_process_writes() {
    let (_d, h1, s1) = setup();
    // A second handler with its own cache on the same store stands for another process.
    let h2 = CommandHandler::new(h1.store().clone());
    let s2: Arc<dyn KnowledgeServices> = Arc::new(StoreServices::new(h2.clone()));
    let author = register(&h1, "author").await;
    let q = question(&h1, &s1, author).await;
    let voter = Uuid::new_v4();
    let vote = |d| ContentCommand::Vote {
        content_id: q,
        voter_id: voter,
        direction: d,
        actor: Actor::importer(),
    };
    // h1 caches the question at version 1; h2 then votes.
    h1.load::<Content>(q).await.unwrap();
    let o = h2
        .execute::<Content>(q, vote(VoteDirection::Up), &s2, &meta())
        .await
        .unwrap();
    assert_eq!(o.events.len(), 1);
    // h1 must see h2's vote: the same vote again is a no-op, the other direction replaces it.
    let o = h1
        .execute::<Content>(q, vote(VoteDirection::Up), &s1, &meta())
        .await
        .unwrap();
    assert!(o.events.is_empty(), "h1 saw the vote committed through h2");
    let o = h1
        .execute::<Content>(q, vote(VoteDirection::Down), &s1, &meta())
        .await
        .unwrap();
    let Event::ContentDownvoted(e) = o.events[0].decode().unwrap() else {
        panic!("downvote expected")
    };
    assert_eq!(e.previous, Some(VoteDirection::Up));
    assert_eq!(o.version, 3);
}
