//! Stall detection over HTTP (issue #14): a consumer with lag > 0 whose checkpoint does not
//! move for the threshold is flagged in `GET /v1/projections`, degrades `GET /healthz` and is
//! 1 in the metric `tektree_consumer_stalled`; once the workers run and catch up, none is.
//! On SQLite with the in-process bus and on MongoDB (SecantusDB) with NATS JetStream (real
//! servers started by the test); the router driven in-process.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tektree_domain::Rules;
use tektree_outbox::test_support::NatsServer;
use tektree_services::api;
use tektree_services::api::auth::Authenticator;
use tektree_services::api::cors::CorsOrigins;
use tektree_services::api::ratelimit::RateLimiter;
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tektree_test_servers::MongoServer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;
use uuid::Uuid;

async fn call(router: &axum::Router, req: Request<Body>) -> (StatusCode, String) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn get(router: &axum::Router, uri: &str) -> (StatusCode, String) {
    call(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn json_of(router: &axum::Router, uri: &str) -> Value {
    let (status, text) = get(router, uri).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// `(name, lag, stalled)` of every consumer.
async fn consumers(router: &axum::Router) -> Vec<(String, u64, bool)> {
    let status = json_of(router, "/v1/projections").await;
    status["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(
                c.get("stalled_for_secs").is_some(),
                c["stalled"] == json!(true),
                "{c}"
            );
            (
                c["name"].as_str().unwrap().to_string(),
                c["lag"].as_u64().unwrap(),
                c["stalled"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_consumer_without_progress_is_flagged_until_it_catches_up() {
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("t.db").display());
    let mongodb = mongo.uri_with_database(&format!("tektree_stall_{}", std::process::id()));
    for (url, bus) in [
        (sqlite.as_str(), "memory"),
        (mongodb.as_str(), nats.url.as_str()),
    ] {
        scenario(url, bus).await;
    }
}

/// The whole check on one store and bus.
async fn scenario(url: &str, bus: &str) {
    let app = App::open(url, bus, Rules::default())
        .await
        .unwrap_or_else(|e| panic!("open {url} on {bus}: {e}"))
        .with_stall_threshold(Duration::from_millis(400));
    let state = ApiState::new(app.clone()).with_security(Security {
        auth: Authenticator::ephemeral(),
        rate_limiter: RateLimiter::disabled(),
        cors: CorsOrigins::none(),
    });
    let router = api::router(state.clone());

    // Nothing committed: no lag, nothing stalled, however long.
    let idle = consumers(&router).await;
    assert!(idle.len() >= 7, "{idle:?}");
    assert!(idle.iter().all(|(_, lag, stalled)| *lag == 0 && !stalled));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(consumers(&router).await.iter().all(|(_, _, s)| !s));
    assert_eq!(json_of(&router, "/healthz").await, json!({"status": "ok"}));

    // A command commits; no worker runs. The first sight of the lag starts the clock (idle
    // time before it does not count); unmoved for the threshold, every consumer is stalled.
    let user = Uuid::new_v4();
    let token = state.security.auth.mint(user, &[], 3600).unwrap();
    let (status, text) = call(
        &router,
        Request::post("/v1/users")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(r#"{"display_name":"Ada"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let lagging = consumers(&router).await;
    assert!(
        lagging.iter().all(|(_, lag, s)| *lag > 0 && !s),
        "{lagging:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = consumers(&router).await;
    assert!(
        stalled.iter().all(|(_, lag, s)| *lag > 0 && *s),
        "{stalled:?}"
    );
    let health = json_of(&router, "/healthz").await;
    assert_eq!(health["status"], "degraded");
    let names: Vec<Value> = stalled.iter().map(|(n, _, _)| json!(n)).collect();
    assert_eq!(health["stalled"], json!(names));
    let (_, metrics) = get(&router, "/metrics").await;
    assert!(
        metrics.contains("tektree_consumer_stalled{consumer=\"xp\"} 1"),
        "{metrics}"
    );

    // The workers run and catch up: nothing is stalled any more.
    app.seed_in_process_bus().await.unwrap();
    let (stop, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(rx, &mut tasks);
    app.settle(Duration::from_secs(30)).await.unwrap();
    let caught_up = consumers(&router).await;
    assert!(
        caught_up.iter().all(|(_, lag, s)| *lag == 0 && !s),
        "{caught_up:?}"
    );
    assert_eq!(json_of(&router, "/healthz").await, json!({"status": "ok"}));
    let (_, metrics) = get(&router, "/metrics").await;
    assert!(
        metrics.contains("tektree_consumer_stalled{consumer=\"xp\"} 0"),
        "{metrics}"
    );
    stop.send(true).unwrap();
    while tasks.join_next().await.is_some() {}
}
