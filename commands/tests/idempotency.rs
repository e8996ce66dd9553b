//! Idempotency keys (issue #4): a retried request returns the first outcome and appends
//! nothing, also when the retries race each other, on a real SQLite store.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use tektree_commands::{CommandError, CommandHandler, CommandMeta, StoreServices};
use tektree_domain::{
    Actor, Content, ContentCommand, KnowledgeServices, NoServices, User, UserCommand, VoteDirection,
};
use tektree_event_store::{EventStore, IdempotencyKey, SqliteStore};
use uuid::Uuid;

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<dyn EventStore>,
    handler: CommandHandler,
    services: Arc<dyn KnowledgeServices>,
}

fn setup() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap());
    let handler = CommandHandler::new(store.clone());
    let services: Arc<dyn KnowledgeServices> = Arc::new(StoreServices::new(handler.clone()));
    Env {
        _dir: dir,
        store,
        handler,
        services,
    }
}

fn key(k: &str, fingerprint: &str, at: DateTime<Utc>) -> IdempotencyKey {
    IdempotencyKey {
        key: k.to_string(),
        fingerprint: fingerprint.to_string(),
        created_at: at,
        expires_at: at + Duration::hours(24),
    }
}

async fn register(env: &Env) -> Uuid {
    let id = Uuid::new_v4();
    let cmd = UserCommand::Register {
        user_id: id,
        display_name: "asker".into(),
        preferences: Default::default(),
    };
    let m = CommandMeta::new(Actor::User(id), Utc::now());
    env.handler
        .execute::<User>(id, cmd, &NoServices, &m)
        .await
        .unwrap();
    id
}

fn post(author: Uuid, question_id: Uuid, title: &str) -> ContentCommand {
    ContentCommand::PostQuestion {
        question_id,
        author_id: Some(author),
        title: title.into(),
        body: "body".into(),
        tags: vec!["rust".into()],
        actor: Actor::User(author),
        area_id: None,
    }
}

async fn head(env: &Env) -> u64 {
    env.store.head().await.unwrap().events
}

#[tokio::test]
async fn a_retry_returns_the_first_outcome_and_appends_nothing() {
    let env = setup();
    let author = register(&env).await;
    let now = Utc::now();
    let k = key(&format!("{author}:q1"), "fp-1", now);
    // The API generates a new id per request when the body has none: the retry's id differs.
    let (first, replayed) = env
        .handler
        .execute_idempotent::<Content>(
            Uuid::new_v4(),
            post(author, Uuid::new_v4(), "t"),
            &env.services,
            &CommandMeta::new(Actor::User(author), now),
            &k,
        )
        .await
        .unwrap();
    assert!(!replayed);
    assert_eq!(first.events.len(), 1);
    let after_first = head(&env).await;

    let retry_id = Uuid::new_v4();
    let (again, replayed) = env
        .handler
        .execute_idempotent::<Content>(
            retry_id,
            post(author, retry_id, "t"),
            &env.services,
            &CommandMeta::new(Actor::User(author), now + Duration::seconds(5)),
            &key(&k.key, "fp-1", now + Duration::seconds(5)),
        )
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(again, first, "the retry gets the first outcome");
    assert_eq!(head(&env).await, after_first, "the retry appended nothing");
    let (q, _) = env.handler.load::<Content>(retry_id).await.unwrap();
    assert!(q.kind.is_none(), "the retry's own id was never created");
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_refused_and_writes_nothing() {
    let env = setup();
    let author = register(&env).await;
    let now = Utc::now();
    let q = Uuid::new_v4();
    env.handler
        .execute_idempotent::<Content>(
            q,
            post(author, q, "first"),
            &env.services,
            &CommandMeta::new(Actor::User(author), now),
            &key("k", "fp-first", now),
        )
        .await
        .unwrap();
    let before = head(&env).await;
    let other = Uuid::new_v4();
    let err = env
        .handler
        .execute_idempotent::<Content>(
            other,
            post(author, other, "second"),
            &env.services,
            &CommandMeta::new(Actor::User(author), now),
            &key("k", "fp-second", now),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, CommandError::IdempotencyKeyReused { ref key } if key == "k"),
        "{err:?}"
    );
    assert_eq!(err.code(), "idempotency_key_reused");
    assert_eq!(head(&env).await, before);
    // The same key on another aggregate type is also another request.
    let err = env
        .handler
        .execute_idempotent::<User>(
            author,
            UserCommand::Register {
                user_id: author,
                display_name: "asker".into(),
                preferences: Default::default(),
            },
            &NoServices,
            &CommandMeta::new(Actor::User(author), now),
            &key("k", "fp-first", now),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::IdempotencyKeyReused { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_retries_commit_once_and_all_get_the_winners_outcome() {
    let env = Arc::new(setup());
    let author = register(&env).await;
    let now = Utc::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            env.handler
                .execute_idempotent::<Content>(
                    id,
                    post(author, id, "raced"),
                    &env.services,
                    &CommandMeta::new(Actor::User(author), now),
                    &key("race", "fp", now),
                )
                .await
                .unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let executed = outcomes.iter().filter(|(_, replayed)| !replayed).count();
    assert_eq!(executed, 1, "exactly one request ran the command");
    let first = &outcomes[0].0;
    assert!(outcomes.iter().all(|(o, _)| o == first));
    let questions = env
        .store
        .read_all(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "knowledge.question.posted")
        .count();
    assert_eq!(questions, 1);
}

#[tokio::test]
async fn a_no_op_is_recorded_and_an_expired_key_runs_again() {
    let env = setup();
    let author = register(&env).await;
    let voter = register(&env).await;
    let q = Uuid::new_v4();
    let m = CommandMeta::new(Actor::User(author), Utc::now());
    env.handler
        .execute::<Content>(q, post(author, q, "t"), &env.services, &m)
        .await
        .unwrap();
    let vote = |d| ContentCommand::Vote {
        content_id: q,
        voter_id: voter,
        direction: d,
        actor: Actor::User(voter),
    };
    let now = Utc::now();
    let vm = CommandMeta::new(Actor::User(voter), now);
    env.handler
        .execute::<Content>(q, vote(VoteDirection::Up), &env.services, &vm)
        .await
        .unwrap();
    // The same vote again is a no-op; with a key its outcome is recorded.
    let k = key("noop", "fp-up", now);
    let (noop, replayed) = env
        .handler
        .execute_idempotent::<Content>(q, vote(VoteDirection::Up), &env.services, &vm, &k)
        .await
        .unwrap();
    assert!(!replayed);
    assert!(noop.events.is_empty());
    // The voter changes the vote; a retry of the keyed no-op still answers the no-op and does
    // not flip the vote back.
    env.handler
        .execute::<Content>(q, vote(VoteDirection::Down), &env.services, &vm)
        .await
        .unwrap();
    let before = head(&env).await;
    let (again, replayed) = env
        .handler
        .execute_idempotent::<Content>(q, vote(VoteDirection::Up), &env.services, &vm, &k)
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(again, noop);
    assert_eq!(head(&env).await, before);

    // After expiry the key is new again: the vote runs (and flips back to up).
    let later = now + Duration::hours(24);
    let (ran, replayed) = env
        .handler
        .execute_idempotent::<Content>(
            q,
            vote(VoteDirection::Up),
            &env.services,
            &vm,
            &key("noop", "fp-up", later),
        )
        .await
        .unwrap();
    assert!(!replayed);
    assert_eq!(ran.events.len(), 1);
    assert_eq!(head(&env).await, before + 1);
}

#[tokio::test]
async fn a_refused_command_records_nothing_and_its_retry_runs() {
    let env = setup();
    let author = register(&env).await;
    let q = Uuid::new_v4();
    let a = Uuid::new_v4();
    let now = Utc::now();
    let answer = ContentCommand::SubmitAnswer {
        answer_id: a,
        question_id: q,
        author_id: Some(author),
        body: "42".into(),
        actor: Actor::User(author),
    };
    let m = CommandMeta::new(Actor::User(author), now);
    let k = key("answer", "fp", now);
    let err = env
        .handler
        .execute_idempotent::<Content>(a, answer.clone(), &env.services, &m, &k)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found.question");
    assert_eq!(
        env.store.idempotency_record("answer", now).await.unwrap(),
        None
    );
    env.handler
        .execute::<Content>(q, post(author, q, "t"), &env.services, &m)
        .await
        .unwrap();
    let (o, replayed) = env
        .handler
        .execute_idempotent::<Content>(a, answer, &env.services, &m, &k)
        .await
        .unwrap();
    assert!(!replayed);
    assert_eq!(o.events.len(), 1);
}
