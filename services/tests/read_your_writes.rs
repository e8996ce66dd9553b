//! Read-your-writes over HTTP (issue #14): a command response's `position` is the global
//! position of its last event; a query with `?min_position=` or `X-Min-Position` answers once
//! the read model it reads has applied that position, or 503 `stale_read_model` with the
//! current checkpoints after the bound. Real TCP (`api::serve` on a loopback port, reqwest), on
//! SQLite with the in-process bus, Redis Streams and NATS JetStream, and on MongoDB
//! (SecantusDB) with the in-process bus — real servers started by the test.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tektree_domain::Rules;
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_services::api;
use tektree_services::api::auth::Authenticator;
use tektree_services::api::cors::CorsOrigins;
use tektree_services::api::fresh::ReadWait;
use tektree_services::api::ratelimit::RateLimiter;
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tektree_test_servers::MongoServer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

/// One API server on a loopback port over `state`.
struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(state: ApiState) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(api::serve(state, listener, async {
            let _ = rx.await;
        }));
        Server {
            base,
            stop: Some(tx),
            task,
        }
    }

    async fn get(
        &self,
        path: &str,
        header: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = reqwest::Client::new().get(format!("{}{path}", self.base));
        if let Some(h) = header {
            req = req.header("X-Min-Position", h);
        }
        let r = req.send().await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

fn security() -> Security {
    Security {
        auth: Authenticator::ephemeral(),
        rate_limiter: RateLimiter::disabled(),
        cors: CorsOrigins::none(),
    }
}

/// POSTs `body` to `path` as `user`; `(status, body)`.
async fn post(
    base: &str,
    state: &ApiState,
    user: Uuid,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let token = state.security.auth.mint(user, &[], 3600).unwrap();
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

/// Posts a new question tagged `rust` as `user`; asserts 201 and returns its id and the
/// response body.
async fn ask(base: &str, state: &ApiState, user: Uuid) -> (Uuid, Value) {
    let q = Uuid::new_v4();
    let (status, body) = post(
        base,
        state,
        user,
        "/v1/questions",
        json!({"question_id": q, "title": "Why?", "body": "Because.", "tags": ["rust"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (q, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_wait_for_the_position_of_the_callers_last_write() {
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = |name: &str| format!("sqlite://{}", dir.path().join(name).display());
    for (store, bus) in [
        (sqlite("memory.db"), "memory".to_string()),
        (sqlite("redis.db"), redis.url.clone()),
        (sqlite("nats.db"), nats.url.clone()),
        (
            mongo.uri_with_database(&format!("tektree_ryw_{}", std::process::id())),
            "memory".to_string(),
        ),
    ] {
        scenario(&store, &bus).await;
    }
}

/// The whole check on one store and bus.
async fn scenario(url: &str, bus: &str) {
    let app = App::open(url, bus, Rules::default())
        .await
        .unwrap_or_else(|e| panic!("open {url} on {bus}: {e}"));
    // Two servers over one app: a short bound for the stale answers, a long one for the
    // fresh ones (so a slow machine cannot turn them into 503s).
    let short = ApiState::new(app.clone())
        .with_security(security())
        .with_read_wait(ReadWait(Duration::from_millis(300)));
    let long = short
        .clone()
        .with_read_wait(ReadWait(Duration::from_secs(20)));
    let (stale, fresh) = (
        Server::start(short.clone()).await,
        Server::start(long).await,
    );

    // A command's position is its last event's; nothing consumes yet.
    let ada = Uuid::new_v4();
    let (status, body) = post(
        &fresh.base,
        &short,
        ada,
        "/v1/users",
        json!({"display_name": "Ada"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (q, body) = ask(&fresh.base, &short, ada).await;
    let position = body["position"].as_u64().expect("position");
    let events = body["events"].as_array().unwrap();
    assert_eq!(
        position,
        events.last().unwrap()["position"].as_u64().unwrap()
    );
    assert_eq!(position, app.store.last_position().await.unwrap());

    // Without a minimum position: what is there (nothing yet), at once.
    let (status, _, _) = stale.get(&format!("/v1/content/{q}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // With one, by query and by header: 503 after the bound, with the checkpoint.
    for (path, header) in [
        (format!("/v1/content/{q}?min_position={position}"), None),
        (format!("/v1/content/{q}"), Some(position.to_string())),
    ] {
        let started = Instant::now();
        let (status, headers, problem) = stale.get(&path, header.as_deref()).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(
            problem["type"],
            "https://tektree.dev/problems/stale_read_model"
        );
        assert_eq!(problem["min_position"], position);
        assert_eq!(problem["checkpoints"], json!({"content": 0}), "{url} {bus}");
    }
    // Malformed positions: 400, nothing waited for.
    for (path, header, code) in [
        ("?min_position=-1", None, "invalid_query"),
        ("?min_position=x", None, "invalid_query"),
        ("", Some("soon"), "invalid_header"),
    ] {
        let (status, _, problem) = stale.get(&format!("/v1/content/{q}{path}"), header).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
        assert_eq!(
            problem["type"],
            format!("https://tektree.dev/problems/{code}")
        );
    }

    // The pipeline starts: the same query now waits and answers with the write.
    app.seed_in_process_bus().await.unwrap();
    let (stop, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(rx, &mut tasks);
    let (status, _, content) = fresh
        .get(&format!("/v1/content/{q}?min_position={position}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{content}");
    assert_eq!(content["author_id"], json!(ada));

    // Each later write is visible to the query that names its position, with no settling.
    // (A policy's effects, such as the XP a post earns, are later events of their own: the
    // position covers the command's events only.)
    for n in 2..=4 {
        let (q, body) = ask(&fresh.base, &short, ada).await;
        let p = body["position"].as_u64().unwrap();
        let (status, _, content) = fresh
            .get(&format!("/v1/content/{q}?min_position={p}"), None)
            .await;
        assert_eq!(
            (status, &content["author_id"]),
            (StatusCode::OK, &json!(ada))
        );
        let (status, _, tag) = fresh.get("/v1/tags/rust", Some(&p.to_string())).await;
        assert_eq!((status, &tag["questions"]), (StatusCode::OK, &json!(n)));
    }
    let p = app.store.last_position().await.unwrap();
    let (status, _, page) = fresh
        .get(&format!("/v1/leaderboards/all-time?min_position={p}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    // The larger of the two forms applies: a header beyond the head still waits.
    let (status, _, problem) = stale
        .get(
            &format!("/v1/content/{q}?min_position={p}"),
            Some(&(p + 1_000).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(problem["min_position"], p + 1_000);
    assert!(problem["checkpoints"]["content"].as_u64().unwrap() >= p);

    stop.send(true).unwrap();
    while tasks.join_next().await.is_some() {}
    stale.shutdown().await;
    fresh.shutdown().await;
}
