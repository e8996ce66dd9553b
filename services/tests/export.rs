//! `tektree export` writes read models with the HTTP field names, as JSON lines and CSV.

use std::process::Command;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::Utc;
use http_body_util::BodyExt;
use tektree_commands::CommandMeta;
use tektree_domain::{Actor, NoServices, Rules, User, UserCommand};
use tektree_services::api;
use tektree_services::api::auth::Authenticator;
use tektree_services::api::cors::CorsOrigins;
use tektree_services::api::ratelimit::RateLimiter;
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;
use uuid::Uuid;

fn export(store: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tektree"))
        .args(["--store", store, "export"])
        .args(args)
        .output()
        .expect("run tektree export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_match_the_http_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = App::open(&store, "memory", Rules::default()).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    let mut users = vec![];
    for name in ["ada", "bob"] {
        let id = Uuid::new_v4();
        let cmd = UserCommand::Register {
            user_id: id,
            display_name: name.into(),
            preferences: Default::default(),
        };
        let meta = CommandMeta::new(Actor::importer(), Utc::now());
        app.handler
            .execute::<User>(id, cmd, &NoServices, &meta)
            .await
            .unwrap();
        users.push(id);
    }
    app.settle(Duration::from_secs(60)).await.unwrap();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}

    // JSON lines: each row is the body the API answers to GET /v1/users/{id}/xp (asked over
    // the router), and holds the values written out here (registration earns 1 XP).
    let router = api::router(ApiState::new(app.clone()).with_security(Security {
        auth: Authenticator::ephemeral(),
        rate_limiter: RateLimiter::disabled(),
        cors: CorsOrigins::none(),
    }));
    let jsonl = export(&store, &["xp", "--format", "jsonl"]);
    let rows: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let id: Uuid = row["user_id"].as_str().unwrap().parse().unwrap();
        assert!(users.contains(&id), "{row}");
        let resp = router
            .clone()
            .oneshot(
                Request::get(format!("/v1/users/{id}/xp"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let http: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(row, &http, "export row vs HTTP body");
        assert_eq!(
            row,
            &serde_json::json!({
                "user_id": id.to_string(), "xp": 1, "level": 1,
                "questions": 0, "answers": 0, "accepted_answers": 0
            })
        );
    }

    // CSV: header of the HTTP field names, one line per row, to a file.
    let path = dir.path().join("xp.csv");
    export(
        &store,
        &["xp", "--format", "csv", "--output", path.to_str().unwrap()],
    );
    let csv = std::fs::read_to_string(&path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("user_id,xp,level,questions,answers,accepted_answers")
    );
    let body: Vec<&str> = lines.collect();
    assert_eq!(body.len(), 2);
    for u in &users {
        assert!(body.contains(&format!("{u},1,1,0,0,0").as_str()), "{csv}");
    }

    // Quota rows exist per metered month; registration alone meters nothing.
    let quota = export(&store, &["quota", "--format", "jsonl"]);
    assert_eq!(quota, "", "no usage yet, so no quota rows");
}
