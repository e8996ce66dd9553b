//! `Idempotency-Key` over HTTP (issue #4): a retried request returns the first response and
//! appends nothing — also after the API restarts on the same store file and when the retries
//! race each other. Router over a real SQLite file, driven with `tower::ServiceExt::oneshot`.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tektree_domain::Rules;
use tektree_services::api;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tower::ServiceExt;
use uuid::Uuid;

struct Api {
    app: App,
    state: ApiState,
    router: Router,
}

async fn open(path: &Path) -> Api {
    let app = App::open(
        &format!("sqlite://{}", path.display()),
        "memory",
        Rules::default(),
    )
    .await
    .unwrap();
    let state = ApiState::new(app.clone());
    Api {
        router: api::router(state.clone()),
        app,
        state,
    }
}

struct Resp {
    status: StatusCode,
    replayed: bool,
    content_type: String,
    json: Value,
}

impl Api {
    fn token(&self, user: Uuid) -> String {
        self.state.security.auth.mint(user, &[], 3600).unwrap()
    }

    async fn post(&self, uri: &str, user: Uuid, key: Option<&str>, body: &Value) -> Resp {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token(user)),
            )
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = self
            .router
            .clone()
            .oneshot(
                req.body(Body::from(serde_json::to_vec(body).unwrap()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let replayed = resp
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            replayed,
            content_type,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn events(&self) -> u64 {
        self.app.store.head().await.unwrap().events
    }

    /// Posts a question (without a key) as `author`; returns its id.
    async fn question(&self, author: Uuid) -> String {
        let r = self
            .post(
                "/v1/questions",
                author,
                None,
                &json!({"title": "t", "body": "b", "tags": []}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
        r.json["aggregate_id"].as_str().unwrap().to_string()
    }

    async fn register(&self) -> Uuid {
        let u = Uuid::new_v4();
        let r = self
            .post("/v1/users", u, None, &json!({"display_name": "retrier"}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
        u
    }
}

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("tektree.db")
}

#[tokio::test]
async fn a_retried_command_gets_the_first_response_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let api = open(&db(&dir)).await;
    let user = api.register().await;
    // No question_id in the body: the server picks one, and the retry must not pick another.
    let body = json!({"title": "Why retry?", "body": "b", "tags": ["http"]});
    let first = api.post("/v1/questions", user, Some("q-1"), &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.json);
    assert!(!first.replayed);
    let after = api.events().await;

    let retry = api.post("/v1/questions", user, Some("q-1"), &body).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed, "the retry is marked Idempotent-Replayed");
    assert_eq!(retry.json, first.json);
    assert_eq!(api.events().await, after);

    // Without a key the same body is a new question.
    let fresh = api.post("/v1/questions", user, None, &body).await;
    assert_eq!(fresh.status, StatusCode::CREATED);
    assert_ne!(fresh.json["aggregate_id"], first.json["aggregate_id"]);
}

#[tokio::test]
async fn the_record_survives_a_restart_of_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (user, first, q) = {
        let api = open(&db(&dir)).await;
        let user = api.register().await;
        let q = api.question(user).await;
        let first = api
            .post(
                &format!("/v1/questions/{q}/answers"),
                user,
                Some("answer-1"),
                &json!({"body": "42"}),
            )
            .await;
        assert_eq!(first.status, StatusCode::CREATED, "{}", first.json);
        (user, first, q)
    };
    // A new process (no caches) on the same file.
    let api = open(&db(&dir)).await;
    let before = api.events().await;
    let retry = api
        .post(
            &format!("/v1/questions/{q}/answers"),
            user,
            Some("answer-1"),
            &json!({"body": "42"}),
        )
        .await;
    assert!(retry.replayed);
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.json, first.json);
    assert_eq!(api.events().await, before);
}

#[tokio::test]
async fn a_key_reused_with_another_body_is_refused_with_422_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let api = open(&db(&dir)).await;
    let user = api.register().await;
    let q = json!({"title": "one", "body": "b", "tags": []});
    assert_eq!(
        api.post("/v1/questions", user, Some("k"), &q).await.status,
        StatusCode::CREATED
    );
    let before = api.events().await;
    let other = json!({"title": "two", "body": "b", "tags": []});
    let r = api.post("/v1/questions", user, Some("k"), &other).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.content_type, "application/problem+json");
    assert!(r.json["type"]
        .as_str()
        .unwrap()
        .ends_with("/idempotency_key_reused"));
    // The same key on another route is another request as well.
    let qid = Uuid::new_v4();
    let r = api
        .post(
            &format!("/v1/content/{qid}/votes"),
            user,
            Some("k"),
            &json!({"direction": "up"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.json);
    assert_eq!(api.events().await, before);

    // Keys are per caller: another user may use "k".
    let other_user = api.register().await;
    let before = api.events().await;
    let r = api
        .post("/v1/questions", other_user, Some("k"), &other)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert!(!r.replayed);
    assert_eq!(api.events().await, before + 1);
}

#[tokio::test]
async fn invalid_keys_are_refused_with_400_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let api = open(&db(&dir)).await;
    let user = api.register().await;
    let before = api.events().await;
    let long = "k".repeat(256);
    for bad in ["", "has space", long.as_str(), "\"\""] {
        let r = api
            .post(
                "/v1/questions",
                user,
                Some(bad),
                &json!({"title": "t", "body": "b", "tags": []}),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "key {bad:?}: {}", r.json);
        assert_eq!(r.content_type, "application/problem+json");
        assert!(r.json["type"]
            .as_str()
            .unwrap()
            .ends_with("/invalid_idempotency_key"));
    }
    assert_eq!(api.events().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_retries_commit_once() {
    let dir = tempfile::tempdir().unwrap();
    let api = std::sync::Arc::new(open(&db(&dir)).await);
    let user = api.register().await;
    let before = api.events().await;
    let body = json!({"title": "raced", "body": "b", "tags": []});
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let api = api.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            api.post("/v1/questions", user, Some("race"), &body).await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert!(replies.iter().all(|r| r.status == StatusCode::CREATED));
    assert_eq!(replies.iter().filter(|r| !r.replayed).count(), 1);
    assert!(replies.iter().all(|r| r.json == replies[0].json));
    assert_eq!(api.events().await, before + 1);
}

#[tokio::test]
async fn a_repeated_vote_with_a_key_answers_like_the_first_time() {
    let dir = tempfile::tempdir().unwrap();
    let api = open(&db(&dir)).await;
    let author = api.register().await;
    let voter = api.register().await;
    let q = api.question(author).await;
    let uri = format!("/v1/content/{q}/votes");
    let up = json!({"direction": "up"});
    let first = api.post(&uri, voter, Some("v1"), &up).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The voter turns the vote down; the retry of "v1" must not turn it up again.
    let down = api
        .post(&uri, voter, None, &json!({"direction": "down"}))
        .await;
    assert_eq!(down.status, StatusCode::CREATED);
    let before = api.events().await;
    let retry = api.post(&uri, voter, Some("v1"), &up).await;
    assert!(retry.replayed);
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.json, first.json);
    assert_eq!(api.events().await, before);
}
