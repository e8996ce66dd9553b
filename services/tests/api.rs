//! HTTP API tests: the router over a real temporary SQLite store with the in-process bus,
//! driven with `tower::ServiceExt::oneshot`. Commands carry a bearer token minted with the
//! app's authenticator; rate limits are off here (they are tested in `security.rs`).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use chrono::{DateTime, Datelike, Utc};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tektree_domain::{level_for_xp, period_of, Event, EventEnvelope, Rules};
use tektree_event_store::Head;
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

/// A router over a fresh store, optionally with the relay, projections and policies running.
struct Harness {
    app: App,
    state: ApiState,
    router: Router,
    pipeline: Option<(watch::Sender<bool>, JoinSet<()>)>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(rules: Rules, with_pipeline: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tektree.db");
        let app = App::open(&format!("sqlite://{}", path.display()), "memory", rules)
            .await
            .unwrap();
        let state = ApiState::new(app.clone()).with_security(Security {
            auth: Authenticator::ephemeral(),
            rate_limiter: RateLimiter::disabled(),
            cors: CorsOrigins::none(),
        });
        let pipeline = if with_pipeline {
            app.seed_in_process_bus().await.unwrap();
            let (tx, rx) = watch::channel(false);
            let mut tasks = JoinSet::new();
            app.spawn_pipeline(rx, &mut tasks);
            Some((tx, tasks))
        } else {
            None
        };
        Harness {
            router: api::router(state.clone()),
            app,
            state,
            pipeline,
            _dir: dir,
        }
    }

    async fn settle(&self) {
        self.app.settle(Duration::from_secs(30)).await.unwrap();
    }

    async fn head(&self) -> Head {
        self.app.store.head().await.unwrap()
    }

    async fn stop(mut self) {
        if let Some((tx, mut tasks)) = self.pipeline.take() {
            tx.send(true).unwrap();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Sends a raw request.
    async fn raw(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, String)],
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            json,
            text,
        }
    }

    /// `Authorization: Bearer <token for user>`.
    fn bearer(&self, user: Uuid) -> (&'static str, String) {
        let token = self.state.security.auth.mint(user, &[], 3600).unwrap();
        ("authorization", format!("Bearer {token}"))
    }

    /// POSTs `body` as JSON, with a token for `user` if given.
    async fn post(&self, uri: &str, user: Option<Uuid>, body: Value) -> Resp {
        let headers: Vec<(&str, String)> = user.map(|u| vec![self.bearer(u)]).unwrap_or_default();
        self.raw(
            Method::POST,
            uri,
            &headers,
            Some("application/json"),
            serde_json::to_vec(&body).unwrap(),
        )
        .await
    }

    async fn get(&self, uri: &str) -> Resp {
        self.raw(Method::GET, uri, &[], None, vec![]).await
    }

    /// Registers a user named `name` with a new id.
    async fn register(&self, name: &str) -> Uuid {
        let id = Uuid::new_v4();
        let r = self
            .post("/v1/users", Some(id), json!({ "display_name": name }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        id
    }

    /// Every stored event, decoded.
    async fn events(&self) -> Vec<(EventEnvelope, Event)> {
        let all = self.app.store.read_all(0, 100_000).await.unwrap();
        all.into_iter()
            .map(|e| {
                let ev = e.decode().unwrap();
                (e, ev)
            })
            .collect()
    }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
    text: String,
}

impl Resp {
    /// Asserts a problem+json response with `status` and type suffix `code`.
    fn assert_problem(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{}",
            self.text
        );
        assert_eq!(
            self.json["type"],
            format!("https://tektree.dev/problems/{code}"),
            "{}",
            self.text
        );
        assert_eq!(self.json["status"], status.as_u16());
        assert!(self.json["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(self.json["detail"].as_str().is_some());
        assert_eq!(self.json.as_object().unwrap().len(), 4, "{}", self.text);
    }

    fn event_types(&self) -> Vec<String> {
        self.json["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_type"].as_str().unwrap().to_string())
            .collect()
    }
}

fn weekly_board(t: DateTime<Utc>) -> String {
    let w = t.iso_week();
    format!("weekly:{:04}-W{:02}", w.year(), w.week())
}

#[tokio::test]
async fn happy_path_updates_every_read_model() {
    let h = Harness::new(Rules::default(), true).await;
    let xp = Rules::default().xp;
    let asker = h.register("Ada").await;
    let answerer = h.register("Bob").await;
    let commenter = h.register("Cy").await;

    let q = Uuid::new_v4();
    let r = h
        .post(
            "/v1/questions",
            Some(asker),
            json!({"question_id": q, "title": "Why Rust?", "body": "Tell me.", "tags": ["Rust", "async"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json["aggregate_type"], "content");
    assert_eq!(r.json["aggregate_id"], q.to_string());
    assert_eq!(r.json["version"], 1);
    assert_eq!(r.event_types(), ["knowledge.question.posted"]);
    assert_eq!(r.json["events"][0]["sequence"], 1);
    assert!(r.json["events"][0]["position"].as_u64().unwrap() >= 1);

    let r = h
        .post(
            &format!("/v1/questions/{q}/answers"),
            Some(answerer),
            json!({"body": "Because."}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.event_types(), ["knowledge.answer.submitted"]);
    let a: Uuid = r.json["aggregate_id"].as_str().unwrap().parse().unwrap();

    let r = h
        .post(
            &format!("/v1/content/{q}/comments"),
            Some(commenter),
            json!({"text": "Good question"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.event_types(), ["knowledge.comment.added"]);
    assert_eq!(r.json["version"], 2);

    for (voter, content) in [(commenter, a), (asker, a), (answerer, q)] {
        let r = h
            .post(
                &format!("/v1/content/{content}/votes"),
                Some(voter),
                json!({"direction": "up"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.event_types(), ["knowledge.content.upvoted"]);
    }

    let r = h
        .post(
            &format!("/v1/questions/{q}/accept"),
            Some(asker),
            json!({"answer_id": a}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.event_types(), ["knowledge.answer.accepted"]);

    h.settle().await;

    // XP from the rules, with the rewards of the achievements each reaches (issue #6): the
    // asker's first question; the answerer's first answer and first accepted answer.
    let asker_xp = xp.registration
        + xp.question_posted
        + xp.upvoted
        + xp.accepted_question
        + reward("first-question");
    let answerer_xp = xp.registration
        + xp.answer_submitted
        + 2 * xp.upvoted
        + xp.accepted_answer
        + reward("first-answer")
        + reward("first-accepted-answer");
    let commenter_xp = xp.registration + xp.comment_added;
    let r = h.get(&format!("/v1/users/{asker}/xp")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json,
        json!({"user_id": asker, "xp": asker_xp, "level": level_for_xp(asker_xp),
               "questions": 1, "answers": 0, "accepted_answers": 0})
    );
    let r = h.get(&format!("/v1/users/{answerer}/xp")).await;
    assert_eq!(
        r.json,
        json!({"user_id": answerer, "xp": answerer_xp, "level": level_for_xp(answerer_xp),
               "questions": 0, "answers": 1, "accepted_answers": 1})
    );
    let r = h.get(&format!("/v1/users/{commenter}/xp")).await;
    assert_eq!(r.json["xp"], commenter_xp);

    // All-time leaderboard: everyone, by XP.
    let r = h.get("/v1/leaderboards/all-time").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json,
        json!({"board": "all-time", "limit": 20, "offset": 0, "entries": [
            {"board": "all-time", "rank": 1, "user_id": answerer, "xp": answerer_xp},
            {"board": "all-time", "rank": 2, "user_id": asker, "xp": asker_xp},
            {"board": "all-time", "rank": 3, "user_id": commenter, "xp": commenter_xp},
        ]})
    );
    let r = h.get("/v1/leaderboards/all-time?limit=1&offset=1").await;
    assert_eq!(r.json["limit"], 1);
    assert_eq!(r.json["offset"], 1);
    assert_eq!(r.json["entries"].as_array().unwrap().len(), 1);
    assert_eq!(r.json["entries"][0]["user_id"], asker.to_string());

    // Tag board (tags are lower-cased; registration XP and achievement rewards carry no tags).
    let r = h.get("/v1/leaderboards/tag:Rust").await;
    assert_eq!(r.json["board"], "tag:rust");
    let entries = r.json["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        entries[0]["xp"],
        answerer_xp - xp.registration - reward("first-answer") - reward("first-accepted-answer")
    );
    assert_eq!(
        entries[1]["xp"],
        asker_xp - xp.registration - reward("first-question")
    );
    assert_eq!(entries[2]["xp"], commenter_xp - xp.registration);

    // Rank queries.
    let r = h
        .get(&format!("/v1/leaderboards/all-time/users/{asker}"))
        .await;
    assert_eq!(
        r.json,
        json!({"board": "all-time", "rank": 2, "user_id": asker, "xp": asker_xp})
    );
    let r = h
        .get(&format!("/v1/leaderboards/tag:async/users/{answerer}"))
        .await;
    assert_eq!(r.json["rank"], 1);
    // Around me: the entries above and below, clipped at the board's ends.
    let row = |rank: u64, user: Uuid, xp: &Value| json!({"board": "all-time", "rank": rank, "user_id": user, "xp": xp});
    let (xa, xb, xc) = (json!(answerer_xp), json!(asker_xp), json!(commenter_xp));
    let r = h
        .get(&format!("/v1/leaderboards/all-time/users/{asker}?around=1"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json,
        json!({"board": "all-time", "rank": 2, "user_id": asker, "xp": asker_xp, "around": [
            row(1, answerer, &xa), row(2, asker, &xb), row(3, commenter, &xc)]})
    );
    let r = h
        .get(&format!(
            "/v1/leaderboards/all-time/users/{answerer}?around=0"
        ))
        .await;
    assert_eq!(r.json["around"], json!([row(1, answerer, &xa)]));
    let r = h
        .get(&format!(
            "/v1/leaderboards/all-time/users/{commenter}?around=50"
        ))
        .await;
    assert_eq!(
        r.json["around"],
        json!([
            row(1, answerer, &xa),
            row(2, asker, &xb),
            row(3, commenter, &xc)
        ])
    );
    for bad in ["51", "-1", "x"] {
        h.get(&format!(
            "/v1/leaderboards/all-time/users/{asker}?around={bad}"
        ))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    }
    h.get(&format!("/v1/leaderboards/tag:nope/users/{asker}?around=2"))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    let r = h
        .get(&format!("/v1/leaderboards/tag:nope/users/{answerer}"))
        .await;
    r.assert_problem(StatusCode::NOT_FOUND, "not_found");

    // Weekly board of the question's week: XP earned by events of that week.
    let events = h.events().await;
    let posted_at = events
        .iter()
        .find(|(e, _)| e.event_type == "knowledge.question.posted")
        .unwrap()
        .0
        .occurred_at;
    let week = weekly_board(posted_at);
    let asker_week: i64 = events
        .iter()
        .filter_map(|(_, ev)| match ev {
            // Achievement rewards count all-time only (docs/gamification.md).
            Event::XpEarned(x)
                if x.user_id == asker
                    && weekly_board(x.source_occurred_at) == week
                    && x.source_event_type != "gamification.achievement.unlocked" =>
            {
                Some(x.amount)
            }
            _ => None,
        })
        .sum();
    let r = h
        .get(&format!("/v1/leaderboards/{week}/users/{asker}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["xp"], asker_week);

    // Content rows.
    let r = h.get(&format!("/v1/content/{q}")).await;
    assert_eq!(
        r.json,
        json!({"content_id": q, "kind": "question", "question_id": null, "author_id": asker,
               "score": 1, "upvotes": 1, "downvotes": 0, "answer_count": 1,
               "comment_count": 1, "accepted_answer_id": a})
    );
    let r = h.get(&format!("/v1/content/{a}")).await;
    assert_eq!(
        r.json,
        json!({"content_id": a, "kind": "answer", "question_id": q, "author_id": answerer,
               "score": 2, "upvotes": 2, "downvotes": 0, "answer_count": 0,
               "comment_count": 0, "accepted_answer_id": null})
    );

    // Tag counts: the question's tags as stored (lower case), the answer counted under each.
    for tag in ["rust", "Rust", "%20RUST"] {
        let r = h.get(&format!("/v1/tags/{tag}")).await;
        assert_eq!(r.status, StatusCode::OK, "{tag}: {}", r.text);
        assert_eq!(r.json, json!({"tag": "rust", "questions": 1, "answers": 1}));
    }
    let r = h.get("/v1/tags/async").await;
    assert_eq!(
        r.json,
        json!({"tag": "async", "questions": 1, "answers": 1})
    );
    h.get("/v1/tags/never-used")
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    h.get("/v1/tags/no%20spaces")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_tag");

    // Quota: one metered unit each, in the month of the posts.
    let period = period_of(posted_at);
    for user in [asker, answerer, commenter] {
        let r = h
            .get(&format!("/v1/users/{user}/quota?period={period}"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            r.json,
            json!({"user_id": user, "period": period, "tier": "free", "used": 1,
                   "limit": Rules::default().quota.free, "exceeded": false})
        );
    }
    let before = period_of(Utc::now());
    let r = h.get(&format!("/v1/users/{asker}/quota")).await;
    if before == period && period_of(Utc::now()) == period {
        assert_eq!(r.json["used"], 1);
    }
    let r = h
        .get(&format!("/v1/users/{asker}/quota?period=1999-01"))
        .await;
    r.assert_problem(StatusCode::NOT_FOUND, "not_found");

    // Projections: every consumer caught up with the head.
    let head = h.head().await;
    let r = h.get("/v1/projections").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["head_position"], head.position);
    let names: Vec<&str> = r.json["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "xp",
            "leaderboard",
            "quota",
            "content",
            "tags",
            "policy.gamification",
            "policy.subscription"
        ]
    );
    for c in r.json["consumers"].as_array().unwrap() {
        assert_eq!(c["checkpoint"], head.position, "{c}");
        assert_eq!(c["applied"], head.events, "{c}");
        assert_eq!(c["lag"], 0, "{c}");
    }

    h.stop().await;
}

#[tokio::test]
async fn identical_repeats_answer_200_and_commit_nothing() {
    let h = Harness::new(Rules::default(), true).await;
    let ada = h.register("Ada").await;
    let bob = h.register("Bob").await;
    let (q, a, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let question = json!({"question_id": q, "title": "T", "body": "", "tags": ["rome"]});
    let answer = json!({"answer_id": a, "body": "B"});
    let comment = json!({"comment_id": c, "text": "C"});
    let a_uri = format!("/v1/questions/{q}/answers");
    let c_uri = format!("/v1/content/{q}/comments");
    let v_uri = format!("/v1/content/{a}/votes");
    let acc_uri = format!("/v1/questions/{q}/accept");
    let requests: Vec<(&str, Uuid, Value)> = vec![
        ("/v1/questions", ada, question),
        (&a_uri, bob, answer),
        (&c_uri, bob, comment),
        (&v_uri, ada, json!({"direction": "up"})),
        (&acc_uri, ada, json!({"answer_id": a})),
    ];
    let mut versions = vec![];
    for (uri, user, body) in &requests {
        let r = h.post(uri, Some(*user), body.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{uri}: {}", r.text);
        versions.push(r.json["version"].clone());
    }
    h.settle().await;
    let head = h.head().await;
    for ((uri, user, body), version) in requests.iter().zip(versions) {
        let r = h.post(uri, Some(*user), body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.text);
        assert_eq!(r.json["events"], json!([]));
        assert!(r.json["version"].as_u64().unwrap() >= version.as_u64().unwrap());
    }
    let r = h
        .post("/v1/users", Some(ada), json!({"display_name": "Ada"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["version"], 1);
    assert_eq!(r.json["events"], json!([]));
    h.settle().await;
    assert_eq!(h.head().await, head);
    h.stop().await;
}

#[tokio::test]
async fn a_second_vote_replaces_the_first() {
    let h = Harness::new(Rules::default(), true).await;
    let xp = Rules::default().xp;
    let ada = h.register("Ada").await;
    let bob = h.register("Bob").await;
    let r = h
        .post(
            "/v1/questions",
            Some(ada),
            json!({"title": "T", "body": "", "tags": []}),
        )
        .await;
    let q = r.json["aggregate_id"].as_str().unwrap().to_string();
    let vote = |d: &'static str| {
        let uri = format!("/v1/content/{q}/votes");
        let h = &h;
        async move { h.post(&uri, Some(bob), json!({"direction": d})).await }
    };
    let r = vote("up").await;
    assert_eq!(r.event_types(), ["knowledge.content.upvoted"]);
    h.settle().await;
    let base = xp.registration + xp.question_posted + reward("first-question");
    assert_eq!(
        h.get(&format!("/v1/users/{ada}/xp")).await.json["xp"],
        base + xp.upvoted
    );
    let c = h.get(&format!("/v1/content/{q}")).await.json;
    assert_eq!(
        (c["score"].clone(), c["upvotes"].clone()),
        (json!(1), json!(1))
    );

    let r = vote("down").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.event_types(), ["knowledge.content.downvoted"]);
    h.settle().await;
    assert_eq!(
        h.get(&format!("/v1/users/{ada}/xp")).await.json["xp"],
        base + xp.downvoted
    );
    let c = h.get(&format!("/v1/content/{q}")).await.json;
    assert_eq!(c["score"], -1);
    assert_eq!(c["upvotes"], 0);
    assert_eq!(c["downvotes"], 1);

    let r = vote("down").await;
    assert_eq!(r.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test]
async fn bad_input_is_a_problem_and_writes_nothing() {
    let h = Harness::new(Rules::default(), false).await;
    let ada = h.register("Ada").await;
    let r = h
        .post(
            "/v1/questions",
            Some(ada),
            json!({"title": "T", "body": "", "tags": []}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let q = r.json["aggregate_id"].as_str().unwrap().to_string();
    let head = h.head().await;
    let user = vec![h.bearer(ada)];
    let json_ct = Some("application/json");

    // Malformed JSON → 400.
    let r = h
        .raw(
            Method::POST,
            "/v1/questions",
            &user,
            json_ct,
            b"{\"title\":".to_vec(),
        )
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "malformed_json");
    // Wrong types, missing fields, unknown fields, bad enum value → 422.
    for body in [
        json!({"title": 5, "body": "", "tags": []}),
        json!({"title": "T", "body": ""}),
        json!({"title": "T", "body": "", "tags": [], "extra": 1}),
        json!({"question_id": "not-a-uuid", "title": "T", "body": "", "tags": []}),
    ] {
        let r = h.post("/v1/questions", Some(ada), body).await;
        r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    }
    let r = h
        .post(
            &format!("/v1/content/{q}/votes"),
            Some(ada),
            json!({"direction": "sideways"}),
        )
        .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    // Domain validation → 422 `invalid`.
    let r = h
        .post(
            "/v1/questions",
            Some(ada),
            json!({"title": "", "body": "", "tags": []}),
        )
        .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid");
    let r = h
        .post(
            "/v1/users",
            Some(Uuid::new_v4()),
            json!({"display_name": ""}),
        )
        .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid");
    // Missing / wrong Content-Type → 415.
    let body = serde_json::to_vec(&json!({"title": "T", "body": "", "tags": []})).unwrap();
    let r = h
        .raw(Method::POST, "/v1/questions", &user, None, body.clone())
        .await;
    r.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let r = h
        .raw(
            Method::POST,
            "/v1/questions",
            &user,
            Some("text/plain"),
            body,
        )
        .await;
    r.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // Body over 64 KiB → 413.
    let big =
        serde_json::to_vec(&json!({"title": "T", "body": "x".repeat(api::BODY_LIMIT), "tags": []}))
            .unwrap();
    let r = h
        .raw(Method::POST, "/v1/questions", &user, json_ct, big)
        .await;
    r.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // Missing or invalid token → 401 (`X-User-Id` is not read any more).
    let r = h
        .post(
            "/v1/questions",
            None,
            json!({"title": "T", "body": "", "tags": []}),
        )
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    let r = h
        .raw(
            Method::POST,
            "/v1/questions",
            &[("authorization", "Bearer ada".to_string())],
            json_ct,
            b"{}".to_vec(),
        )
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    let r = h
        .raw(
            Method::POST,
            "/v1/questions",
            &[("x-user-id", ada.to_string())],
            json_ct,
            serde_json::to_vec(&json!({"title": "T", "body": "", "tags": []})).unwrap(),
        )
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    // Invalid correlation header → 400.
    let r = h
        .raw(
            Method::POST,
            "/v1/questions",
            &[h.bearer(ada), ("x-correlation-id", "abc".into())],
            json_ct,
            serde_json::to_vec(&json!({"title": "T", "body": "", "tags": []})).unwrap(),
        )
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "invalid_header");
    // Invalid path ids → 400.
    let r = h
        .post("/v1/questions/123/answers", Some(ada), json!({"body": "B"}))
        .await;
    r.assert_problem(StatusCode::BAD_REQUEST, "invalid_path");
    for uri in [
        "/v1/users/nope/xp".to_string(),
        "/v1/content/nope".to_string(),
        format!("/v1/leaderboards/all-time/users/{}", "x"),
        "/v1/leaderboards/monthly".to_string(),
        "/v1/leaderboards/weekly:2024-W60".to_string(),
        format!("/v1/leaderboards/tag:a%20b/users/{ada}"),
    ] {
        h.get(&uri)
            .await
            .assert_problem(StatusCode::BAD_REQUEST, "invalid_path");
    }
    // Invalid query values → 400.
    for uri in [
        "/v1/leaderboards/all-time?limit=0".to_string(),
        "/v1/leaderboards/all-time?limit=101".to_string(),
        "/v1/leaderboards/all-time?limit=abc".to_string(),
        "/v1/leaderboards/all-time?offset=-1".to_string(),
        format!("/v1/users/{ada}/quota?period=2024-13"),
        format!("/v1/users/{ada}/quota?period=24-01"),
    ] {
        h.get(&uri)
            .await
            .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    }
    // Unknown route → 404; wrong method → 405.
    h.get("/v1/nothing-here")
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    h.post("/v2/questions", Some(ada), json!({}))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    let r = h.get("/v1/questions").await;
    r.assert_problem(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(r.headers[header::ALLOW], "POST");
    h.raw(
        Method::DELETE,
        &format!("/v1/content/{q}"),
        &[],
        None,
        vec![],
    )
    .await
    .assert_problem(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    // Read-model misses → 404.
    h.get(&format!("/v1/users/{}/xp", Uuid::new_v4()))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    h.get(&format!("/v1/content/{}", Uuid::new_v4()))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");

    assert_eq!(h.head().await, head);
    h.stop().await;
}

#[tokio::test]
async fn missing_references_and_permissions_are_refused() {
    let h = Harness::new(Rules::default(), false).await;
    let ada = h.register("Ada").await;
    let bob = h.register("Bob").await;
    let post_q = |user| {
        let h = &h;
        async move {
            let r = h
                .post(
                    "/v1/questions",
                    Some(user),
                    json!({"title": "T", "body": "", "tags": []}),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
            r.json["aggregate_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap()
        }
    };
    let q1 = post_q(ada).await;
    let q2 = post_q(ada).await;
    let r = h
        .post(
            &format!("/v1/questions/{q1}/answers"),
            Some(bob),
            json!({"body": "B"}),
        )
        .await;
    let a1: Uuid = r.json["aggregate_id"].as_str().unwrap().parse().unwrap();
    let head = h.head().await;
    let missing = Uuid::new_v4();

    h.post(
        &format!("/v1/questions/{missing}/answers"),
        Some(bob),
        json!({"body": "B"}),
    )
    .await
    .assert_problem(StatusCode::NOT_FOUND, "not_found.question");
    h.post(
        &format!("/v1/content/{missing}/votes"),
        Some(bob),
        json!({"direction": "up"}),
    )
    .await
    .assert_problem(StatusCode::NOT_FOUND, "not_found.content");
    h.post(
        &format!("/v1/content/{missing}/comments"),
        Some(bob),
        json!({"text": "C"}),
    )
    .await
    .assert_problem(StatusCode::NOT_FOUND, "not_found.content");
    h.post(
        &format!("/v1/questions/{q1}/accept"),
        Some(ada),
        json!({"answer_id": missing}),
    )
    .await
    .assert_problem(StatusCode::NOT_FOUND, "not_found.answer");
    // An answer of another question.
    h.post(
        &format!("/v1/questions/{q2}/accept"),
        Some(ada),
        json!({"answer_id": a1}),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "conflict");
    // Accept by someone other than the question's author.
    h.post(
        &format!("/v1/questions/{q1}/accept"),
        Some(bob),
        json!({"answer_id": a1}),
    )
    .await
    .assert_problem(StatusCode::FORBIDDEN, "forbidden");
    // An unregistered caller.
    h.post(
        "/v1/questions",
        Some(missing),
        json!({"title": "T", "body": "", "tags": []}),
    )
    .await
    .assert_problem(StatusCode::NOT_FOUND, "not_found.user");
    // Reusing a question id for an answer.
    h.post(
        &format!("/v1/questions/{q1}/answers"),
        Some(bob),
        json!({"answer_id": q2, "body": "B"}),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "conflict");
    // Registration: token and body must agree; an existing id keeps its name.
    h.post(
        "/v1/users",
        Some(ada),
        json!({"user_id": bob, "display_name": "Eve"}),
    )
    .await
    .assert_problem(StatusCode::FORBIDDEN, "forbidden");
    h.post("/v1/users", Some(ada), json!({"display_name": "Eve"}))
        .await
        .assert_problem(StatusCode::CONFLICT, "conflict");
    assert_eq!(h.head().await, head);

    // Registration ids: the token's `sub`, which the body may repeat; a token is required.
    let id = Uuid::new_v4();
    let r = h
        .post(
            "/v1/users",
            Some(id),
            json!({"user_id": id, "display_name": "Dan"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json["aggregate_type"], "user");
    assert_eq!(r.json["aggregate_id"], id.to_string());
    assert_eq!(r.event_types(), ["user.registered"]);
    let fay = Uuid::new_v4();
    let r = h
        .post("/v1/users", Some(fay), json!({"display_name": "Fay"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json["aggregate_id"], fay.to_string());
    let head = h.head().await;
    h.post(
        "/v1/users",
        None,
        json!({"user_id": Uuid::new_v4(), "display_name": "Gus"}),
    )
    .await
    .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    h.post("/v1/users", None, json!({"display_name": "Gus"}))
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(h.head().await, head);
    h.stop().await;
}

#[tokio::test]
async fn over_quota_posts_are_refused_with_429() {
    let mut rules = Rules::default();
    rules.quota.free = Some(1);
    let h = Harness::new(rules, true).await;
    let ada = h.register("Ada").await;
    let q = Uuid::new_v4();
    let question = json!({"question_id": q, "title": "T", "body": "", "tags": []});
    let r = h.post("/v1/questions", Some(ada), question.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    h.settle().await;
    let head = h.head().await;

    let r = h
        .post(
            "/v1/questions",
            Some(ada),
            json!({"title": "T2", "body": "", "tags": []}),
        )
        .await;
    r.assert_problem(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=31 * 86_400).contains(&retry), "{retry}");
    h.post(
        &format!("/v1/questions/{q}/answers"),
        Some(ada),
        json!({"body": "B"}),
    )
    .await
    .assert_problem(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    h.post(
        &format!("/v1/content/{q}/comments"),
        Some(ada),
        json!({"text": "C"}),
    )
    .await
    .assert_problem(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    // Votes are not metered; an exact repeat of a committed post creates nothing.
    let r = h
        .post(
            &format!("/v1/content/{q}/votes"),
            Some(ada),
            json!({"direction": "up"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = h.post("/v1/questions", Some(ada), question).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    h.settle().await;

    // Only the vote (and the policies' reactions to it) were written.
    let events = h.events().await;
    let new: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e.position > head.position)
        .map(|(e, _)| e.event_type.as_str())
        .collect();
    assert!(new.contains(&"knowledge.content.upvoted"), "{new:?}");
    assert!(
        !new.iter()
            .any(|t| t.starts_with("knowledge.") && *t != "knowledge.content.upvoted"),
        "{new:?}"
    );
    let period = period_of(events.last().unwrap().0.occurred_at);
    let r = h
        .get(&format!("/v1/users/{ada}/quota?period={period}"))
        .await;
    assert_eq!(r.json["used"], 1);
    assert_eq!(r.json["limit"], 1);
    assert_eq!(r.json["exceeded"], false);
    h.stop().await;
}

#[tokio::test]
async fn correlation_id_is_echoed_and_recorded() {
    let h = Harness::new(Rules::default(), false).await;
    let id = Uuid::new_v4();
    let cid = Uuid::new_v4();
    let r = h
        .raw(
            Method::POST,
            "/v1/users",
            &[h.bearer(id), ("x-correlation-id", cid.to_string())],
            Some("application/json"),
            br#"{"display_name":"Ada"}"#.to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.headers["x-correlation-id"], cid.to_string());
    let events = h.events().await;
    let (env, _) = &events[0];
    assert_eq!(env.correlation_id, cid);
    assert_ne!(env.causation_id, cid);
    assert_eq!(env.actor.to_string(), format!("user:{id}"));
    assert_eq!(r.json["events"][0]["event_id"], env.event_id.to_string());
    assert_eq!(r.json["events"][0]["position"], env.position);

    // Without the header a new id is made and echoed, also on errors.
    let r = h.get("/v1/nowhere").await;
    let echoed: Uuid = r.headers["x-correlation-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(echoed, cid);
    h.stop().await;
}

#[tokio::test]
async fn health_projections_and_metrics_on_an_empty_store() {
    let h = Harness::new(Rules::default(), false).await;
    let r = h.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json, json!({"status": "ok"}));

    let r = h.get("/v1/projections").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["head_position"], 0);
    let consumers = r.json["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), h.app.consumers().len());
    for c in consumers {
        assert_eq!(c["checkpoint"], 0);
        assert_eq!(c["applied"], 0);
        assert_eq!(c["lag"], 0);
    }

    // Events not yet applied show up as lag.
    h.register("Ada").await;
    let r = h.get("/v1/projections").await;
    assert_eq!(r.json["head_position"], 1);
    for c in r.json["consumers"].as_array().unwrap() {
        assert_eq!(c["lag"], 1, "{c}");
    }

    let r = h.get("/v1/leaderboards/all-time").await;
    assert_eq!(
        r.json,
        json!({"board": "all-time", "limit": 20, "offset": 0, "entries": []})
    );

    // A second router in the same process shares the recorder.
    let other = api::router(h.state.clone());
    let resp = other
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("tektree_http_requests_total"), "{text}");
    h.stop().await;
}

#[tokio::test]
async fn serve_answers_over_tcp_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let app = App::open(
        &format!("sqlite://{}", path.display()),
        "memory",
        Rules::default(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(ApiState::new(app), listener, async {
        let _ = rx.await;
    }));
    let r = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// The XP reward of achievement `id` in the default rules (configuration, `config/gamification.toml`).
fn reward(id: &str) -> i64 {
    Rules::default()
        .gamification
        .achievements
        .iter()
        .find(|g| g.id == id)
        .unwrap_or_else(|| panic!("achievement {id} in the default rules"))
        .xp_reward
}
