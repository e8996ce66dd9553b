//! Issue #6, "Done when": every event type of the catalog (`docs/event-catalog.md`,
//! `tektree_domain::events::EVENT_TYPES`) is produced through the HTTP API — requests to
//! `tektree_services::api::router` and signed Polar webhooks — over real parts: a temporary
//! SQLite file, the in-process bus and the running pipeline (relay, projections, policies). The
//! new endpoints of issue #6 refuse bad input and write nothing; a replay of the store rebuilds
//! read models byte-equal to the live ones; identical repeats answer 200 and write nothing.
//!
//! Expected values come from the documentation (default XP rules of `docs/event-catalog.md` and
//! `domain/src/rules.rs` docs, the rules file given here), never from the code under test.

#[allow(dead_code)]
#[path = "common/fake_polar.rs"]
mod fake_polar;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use chrono::{DateTime, Datelike, Utc};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tektree_domain::events::EVENT_TYPES;
use tektree_domain::{EventEnvelope, GamificationRules, QuotaRules, Rules};
use tektree_projections::{ReadModel, ReadModelStore, SqliteReadModels};
use tektree_services::api;
use tektree_services::api::auth::{unix_now, Authenticator, Role};
use tektree_services::api::cors::CorsOrigins;
use tektree_services::api::ratelimit::RateLimiter;
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tektree_services::billing::webhook::WebhookSecret;
use tektree_services::billing::{Billing, BillingConfig, TierProducts};
use tektree_services::export::{export, Format};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;
use uuid::Uuid;

const POLAR_TOKEN: &str = "polar_oat_catalog_test";
const POLAR_SECRET: &str = "polar_whs_catalog_0123456789abcdefghij";
const PRO: &str = "prod_pro_catalog";
const TEAM: &str = "prod_team_catalog";
const ENTERPRISE: &str = "prod_ent_catalog";
/// Monthly limit of the Free tier in these tests' rules.
const FREE_QUOTA: u64 = 3;
/// A bound against a stuck pipeline, not a speed assertion.
const SETTLE: Duration = Duration::from_secs(120);
/// The read models, by projection name.
const MODELS: [(&str, ReadModel); 5] = [
    ("xp", ReadModel::Xp),
    ("leaderboard", ReadModel::Leaderboard),
    ("quota", ReadModel::Quota),
    ("content", ReadModel::Content),
    ("tags", ReadModel::Tags),
];
const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// The rules file of these tests (what `--rules` would load):
/// - `quota.free = 3`, so that a Free user can pass the limit;
/// - `gamification.streak_milestones = [1]`: the default milestones (7, 30, 100 consecutive UTC
///   days) cannot be reached through the HTTP API, whose commands all happen "now" (the API
///   takes no `occurred_at`); with a 1-day milestone, one active day emits
///   `gamification.streak.milestone`. Achievements and quests keep their defaults
///   (`config/gamification.toml`).
fn rules() -> Rules {
    Rules {
        quota: QuotaRules {
            free: Some(FREE_QUOTA),
            ..QuotaRules::default()
        },
        gamification: GamificationRules {
            streak_milestones: vec![1],
            ..GamificationRules::default()
        },
        ..Rules::default()
    }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
    text: String,
}

impl Resp {
    /// Asserts a `application/problem+json` answer with `status` and problem code `code`.
    #[track_caller]
    fn problem(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.headers
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap()),
            Some("application/problem+json"),
            "{}",
            self.text
        );
        assert_eq!(
            self.json["type"],
            format!("https://tektree.dev/problems/{code}"),
            "{}",
            self.text
        );
        assert_eq!(self.json["status"], status.as_u16(), "{}", self.text);
    }

    /// Asserts 201 and returns the committed event types.
    #[track_caller]
    fn created(&self) -> Vec<String> {
        assert_eq!(self.status, StatusCode::CREATED, "{}", self.text);
        self.event_types()
    }

    /// Asserts an idempotent repeat: 200 with no events.
    #[track_caller]
    fn unchanged(&self) {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text);
        assert_eq!(self.json["events"], json!([]), "{}", self.text);
    }

    fn event_types(&self) -> Vec<String> {
        self.json["events"]
            .as_array()
            .unwrap_or_else(|| panic!("no events in {}", self.text))
            .iter()
            .map(|e| e["event_type"].as_str().unwrap().to_string())
            .collect()
    }

    /// The `aggregate_id` of a command answer.
    fn id(&self) -> Uuid {
        self.json["aggregate_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no aggregate_id in {}", self.text))
            .parse()
            .unwrap()
    }
}

/// The router over a fresh SQLite file with billing; the pipeline runs once started.
struct H {
    app: App,
    state: ApiState,
    router: Router,
    pipeline: Option<(watch::Sender<bool>, JoinSet<()>)>,
    dir: tempfile::TempDir,
}

impl H {
    /// An app with [`rules`] and Polar billing (webhooks only: no checkout is made, so no
    /// fake Polar server is needed). The pipeline is not running yet ([`H::start`]).
    async fn open() -> H {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tektree.db");
        let mut billing = BillingConfig::new(
            POLAR_TOKEN,
            vec![WebhookSecret::parse(POLAR_SECRET).unwrap()],
            TierProducts {
                pro: Some(PRO.into()),
                team: Some(TEAM.into()),
                enterprise: Some(ENTERPRISE.into()),
            },
        );
        // Never called: the tests make no checkout.
        billing.api_base = "http://127.0.0.1:9".into();
        let app = App::open(&format!("sqlite://{}", path.display()), "memory", rules())
            .await
            .unwrap();
        let state = ApiState::new(app.clone())
            .with_security(Security {
                auth: Authenticator::ephemeral(),
                rate_limiter: RateLimiter::disabled(),
                cors: CorsOrigins::none(),
            })
            .with_billing(Billing::new(billing).unwrap());
        H {
            router: api::router(state.clone()),
            app,
            state,
            pipeline: None,
            dir,
        }
    }

    /// Starts the relay and every consumer (as `tektree serve` does).
    async fn start(&mut self) {
        self.app.seed_in_process_bus().await.unwrap();
        let (tx, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        self.app.spawn_pipeline(rx, &mut tasks);
        self.pipeline = Some((tx, tasks));
    }

    /// [`H::open`] with the pipeline running.
    async fn started() -> H {
        let mut h = H::open().await;
        h.start().await;
        h
    }

    async fn settle(&self) {
        self.app.settle(SETTLE).await.unwrap();
    }

    async fn stop(mut self) {
        if let Some((tx, mut tasks)) = self.pipeline.take() {
            tx.send(true).unwrap();
            while tasks.join_next().await.is_some() {}
        }
    }

    async fn head(&self) -> u64 {
        self.app.store.head().await.unwrap().position
    }

    async fn events(&self) -> Vec<EventEnvelope> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or(0, |e: &EventEnvelope| e.position);
            let page = self.app.store.read_all(after, 1000).await.unwrap();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    fn token(&self, user: Uuid, roles: &[Role]) -> String {
        self.state.security.auth.mint(user, roles, 3600).unwrap()
    }

    /// A token carrying the OpenID Connect claims `email` and `email_verified`.
    fn email_token(&self, user: Uuid, email: &str, verified: bool) -> String {
        let auth = &self.state.security.auth;
        let mut claims = auth.claims(user, &[], unix_now(), 3600);
        claims.email = Some(email.into());
        claims.email_verified = verified;
        auth.sign(&claims).unwrap()
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Resp {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, v);
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
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Resp {
            status,
            headers,
            json: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    /// `method uri` with a JSON body as `token`.
    async fn call(&self, method: Method, uri: &str, token: &str, body: Value) -> Resp {
        self.send(method, uri, Some(token), &[], body.to_string().into_bytes())
            .await
    }

    /// `POST uri` as `user` (no roles).
    async fn post(&self, uri: &str, user: Uuid, body: Value) -> Resp {
        let t = self.token(user, &[]);
        self.call(Method::POST, uri, &t, body).await
    }

    /// `method uri` with raw body bytes as `user`.
    async fn raw(&self, method: Method, uri: &str, user: Uuid, body: &[u8]) -> Resp {
        let t = self.token(user, &[]);
        self.send(method, uri, Some(&t), &[], body.to_vec()).await
    }

    async fn get(&self, uri: &str) -> Resp {
        self.send(Method::GET, uri, None, &[], vec![]).await
    }

    async fn register(&self, name: &str) -> Uuid {
        let user = Uuid::new_v4();
        let r = self
            .post("/v1/users", user, json!({ "display_name": name }))
            .await;
        assert_eq!(r.created(), ["user.registered"]);
        user
    }

    /// Delivers a Polar webhook signed now with the configured secret.
    async fn webhook(&self, body: &[u8]) -> Resp {
        let headers = fake_polar::signed_headers(
            POLAR_SECRET,
            &fake_polar::message_id(),
            Utc::now().timestamp(),
            body,
        );
        self.send(
            Method::POST,
            "/v1/webhooks/polar",
            None,
            &headers,
            body.to_vec(),
        )
        .await
    }

    async fn create_area(&self, moderator: Uuid, body: Value) -> Resp {
        let t = self.token(moderator, &[Role::Moderator]);
        self.call(Method::POST, "/v1/areas", &t, body).await
    }

    /// Every read model exported as JSON lines and as CSV (`tektree export`).
    async fn exports(read_models: &dyn ReadModelStore) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (name, model) in MODELS {
            for (fmt, format) in [("jsonl", Format::Jsonl), ("csv", Format::Csv)] {
                let mut bytes = Vec::new();
                export(read_models, model, format, &mut bytes)
                    .await
                    .unwrap();
                out.push((format!("{name}.{fmt}"), bytes));
            }
        }
        out
    }
}

/// What [`full_history`] created.
struct History {
    /// Main author (Team, then Pro, then cancelled).
    ada: Uuid,
    /// Answers Ada's question (accepted), asks a question, votes, likes.
    bob: Uuid,
    /// Votes, likes and comments.
    cy: Uuid,
    /// Free user who passes the quota.
    quinn: Uuid,
    area: Uuid,
}

/// Drives, through HTTP requests and signed Polar webhooks only, a history that produces every
/// event type of the catalog. Returns with the pipeline running and settled.
async fn full_history() -> (H, History) {
    let mut h = H::open().await;

    // Quota: the guard refuses a post when the caller's `quota` row (written by the pipeline)
    // shows `used >= limit`, so it trails the store by the pipeline's lag (docs/api.md,
    // "Staleness bound"). The posts below are made before the pipeline starts, i.e. all within
    // that window: all four pass, and metering (exact, in the subscription aggregate) then
    // counts the fourth over the Free limit of 3 → `payment.quota.exceeded`.
    let quinn = h.register("Quinn").await;
    for i in 0..=FREE_QUOTA {
        let r = h
            .post(
                "/v1/questions",
                quinn,
                json!({"title": format!("Quota question {i}"), "body": "?", "tags": ["quota"]}),
            )
            .await;
        assert_eq!(r.created(), ["knowledge.question.posted"]);
    }
    h.start().await;

    let ada = h.register("Ada").await;
    let bob = h.register("Bob").await;
    let cy = h.register("Cy").await;
    let moderator = Uuid::new_v4();
    h.settle().await;

    // Once metered, Quinn's next post is refused and writes nothing.
    let head = h.head().await;
    let r = h
        .post(
            "/v1/questions",
            quinn,
            json!({"title": "One more", "body": "?", "tags": []}),
        )
        .await;
    r.problem(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(h.head().await, head);

    // User: profile, session, e-mail verification.
    let r = h
        .call(
            Method::PATCH,
            &format!("/v1/users/{ada}"),
            &h.token(ada, &[]),
            json!({"bio": "Historian of Rome", "email": "ada@example.org"}),
        )
        .await;
    assert_eq!(r.created(), ["user.profile.updated"]);
    let r = h.post("/v1/sessions", ada, json!({})).await;
    assert_eq!(r.created(), ["user.authenticated"]);
    let r = h
        .call(
            Method::POST,
            &format!("/v1/users/{ada}/email/verify"),
            &h.email_token(ada, "ada@example.org", true),
            json!({}),
        )
        .await;
    assert_eq!(r.created(), ["user.email.verified"]);

    // Billing: Ada buys Team (so her posts are not limited by the Free quota), pays.
    let r = h
        .webhook(&fake_polar::subscription_event(
            "subscription.created",
            "active",
            TEAM,
            ada,
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.event_types(), ["payment.subscription.upgraded"]);
    let r = h
        .webhook(&fake_polar::order_paid(
            "ord_catalog_1",
            4900,
            "usd",
            TEAM,
            ada,
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.event_types(), ["payment.invoice.paid"]);

    // Knowledge.
    let r = h
        .create_area(
            moderator,
            json!({"name": "Roman history", "slug": "roman-history", "description": "Rome"}),
        )
        .await;
    assert_eq!(r.created(), ["knowledge.area.created"]);
    let area = r.id();
    let in_area = |kind: &str, extra: Value| {
        let mut b = json!({"title": format!("A {kind}"), "body": format!("Some {kind}."),
            "tags": ["rome"], "area_id": area});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let r = h
        .post("/v1/questions", ada, in_area("question", json!({})))
        .await;
    assert_eq!(r.created(), ["knowledge.question.posted"]);
    let q1 = r.id();
    let r = h
        .post("/v1/discussions", ada, in_area("discussion", json!({})))
        .await;
    assert_eq!(r.created(), ["knowledge.discussion.started"]);
    let r = h
        .post("/v1/insights", ada, in_area("insight", json!({})))
        .await;
    assert_eq!(r.created(), ["knowledge.insight.shared"]);
    let insight = r.id();
    let resource_body = json!({"title": "Slides", "file_name": "slides.pdf",
        "media_type": "application/pdf", "size_bytes": 482133, "sha256": SHA,
        "storage_url": "s3://tektree-resources/slides.pdf", "tags": ["rome"], "area_id": area});
    let r = h.post("/v1/resources", ada, resource_body).await;
    assert_eq!(r.created(), ["knowledge.resource.uploaded"]);
    let resource = r.id();
    let r = h
        .post(
            "/v1/questions",
            bob,
            json!({"title": "Outside any area", "body": "?", "tags": ["misc"]}),
        )
        .await;
    assert_eq!(r.created(), ["knowledge.question.posted"]);
    let q2 = r.id();
    // Three answers by Ada in one ISO week (weekly quest), two in the area.
    let mut answers = vec![];
    for q in [q1, q1, q2] {
        let r = h
            .post(
                &format!("/v1/questions/{q}/answers"),
                ada,
                json!({"body": "An answer."}),
            )
            .await;
        assert_eq!(r.created(), ["knowledge.answer.submitted"]);
        answers.push(r.id());
    }
    let (a1, a2, a3) = (answers[0], answers[1], answers[2]);
    let r = h
        .post(
            &format!("/v1/questions/{q1}/answers"),
            bob,
            json!({"body": "Bob's answer."}),
        )
        .await;
    assert_eq!(r.created(), ["knowledge.answer.submitted"]);
    let b1 = r.id();
    let r = h
        .post(
            &format!("/v1/content/{q1}/comments"),
            cy,
            json!({"text": "Good point."}),
        )
        .await;
    assert_eq!(r.created(), ["knowledge.comment.added"]);
    for (voter, content, direction, event) in [
        (bob, q1, "up", "knowledge.content.upvoted"),
        (bob, a1, "up", "knowledge.content.upvoted"),
        (bob, a2, "up", "knowledge.content.upvoted"),
        (cy, q1, "up", "knowledge.content.upvoted"),
        (cy, a1, "up", "knowledge.content.upvoted"),
        (cy, a3, "up", "knowledge.content.upvoted"),
        (cy, b1, "down", "knowledge.content.downvoted"),
    ] {
        let r = h
            .post(
                &format!("/v1/content/{content}/votes"),
                voter,
                json!({ "direction": direction }),
            )
            .await;
        assert_eq!(r.created(), [event]);
    }
    for (user, content) in [(bob, insight), (cy, resource)] {
        let r = h
            .post(&format!("/v1/content/{content}/likes"), user, json!({}))
            .await;
        assert_eq!(r.created(), ["knowledge.content.liked"]);
    }
    let r = h
        .post(
            &format!("/v1/questions/{q1}/accept"),
            ada,
            json!({ "answer_id": b1 }),
        )
        .await;
    assert_eq!(r.created(), ["knowledge.answer.accepted"]);
    h.settle().await;

    // Billing: Team → Pro, then an immediate cancellation (back to Free).
    let r = h
        .webhook(&fake_polar::subscription_event(
            "subscription.updated",
            "active",
            PRO,
            ada,
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.event_types(), ["payment.subscription.downgraded"]);
    let r = h
        .webhook(&fake_polar::subscription_event(
            "subscription.canceled",
            "canceled",
            PRO,
            ada,
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.event_types(), ["payment.subscription.cancelled"]);
    h.settle().await;
    // Back on Free (limit 3) with more posts than that this month: the next post is refused at
    // once, and writes nothing (the guard reads the subscription's current tier).
    let head = h.head().await;
    h.post(
        "/v1/questions",
        ada,
        json!({"title": "One more", "body": "?", "tags": []}),
    )
    .await
    .problem(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    assert_eq!(h.head().await, head);

    (
        h,
        History {
            ada,
            bob,
            cy,
            quinn,
            area,
        },
    )
}

fn payload_user(e: &EventEnvelope) -> Option<Uuid> {
    e.payload["user_id"].as_str().and_then(|s| s.parse().ok())
}

/// The stored events of `event_type` whose payload names `user`.
fn of<'a>(events: &'a [EventEnvelope], event_type: &str, user: Uuid) -> Vec<&'a EventEnvelope> {
    events
        .iter()
        .filter(|e| e.event_type == event_type && payload_user(e) == Some(user))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalog_event_type_is_produced_through_the_http_api() {
    let (h, x) = full_history().await;
    let events = h.events().await;
    let stored: BTreeSet<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let catalog: BTreeSet<&str> = EVENT_TYPES.into_iter().collect();
    let missing: Vec<&&str> = catalog.difference(&stored).collect();
    let unknown: Vec<&&str> = stored.difference(&catalog).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "missing from the store: {missing:?}; not in the catalog: {unknown:?}"
    );
    assert_eq!(stored, catalog);

    // The gamification and payment events concern the users the history aimed them at.
    for (event_type, user, n) in [
        ("user.email.verified", x.ada, 1),
        ("payment.subscription.created", x.ada, 1),
        ("payment.subscription.upgraded", x.ada, 1),
        ("payment.subscription.downgraded", x.ada, 1),
        ("payment.subscription.cancelled", x.ada, 1),
        ("payment.invoice.paid", x.ada, 1),
        ("payment.quota.exceeded", x.quinn, 1),
        ("payment.quota.exceeded", x.ada, 0),
        ("gamification.level.up", x.ada, 1),
        ("gamification.quest.completed", x.ada, 1),
        ("gamification.streak.milestone", x.ada, 1),
        ("gamification.achievement.unlocked", x.ada, 2),
        ("gamification.achievement.unlocked", x.bob, 3),
        ("gamification.achievement.unlocked", x.cy, 0),
    ] {
        assert_eq!(
            of(&events, event_type, user).len(),
            n,
            "{event_type} of {user}"
        );
    }
    // Quinn's fourth post is the first over the Free limit of 3.
    let exceeded = of(&events, "payment.quota.exceeded", x.quinn);
    assert_eq!(exceeded[0].payload["used"], FREE_QUOTA + 1);
    assert_eq!(exceeded[0].payload["limit"], FREE_QUOTA);
    assert_eq!(exceeded[0].payload["tier"], "free");
    let r = h.get(&format!("/v1/users/{}/quota", x.quinn)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        (&r.json["used"], &r.json["limit"], &r.json["exceeded"]),
        (&json!(FREE_QUOTA + 1), &json!(FREE_QUOTA), &json!(true)),
        "{}",
        r.text
    );
    // Ada's level-up: 1 → 2 (she has at least 100 XP; see the leaderboard test for the sum).
    let up = of(&events, "gamification.level.up", x.ada);
    assert_eq!(
        (&up[0].payload["from_level"], &up[0].payload["to_level"]),
        (&json!(1), &json!(2))
    );
    // The 1-day streak milestone of the rules file.
    let streak = of(&events, "gamification.streak.milestone", x.ada);
    assert_eq!(streak[0].payload["days"], 1);
    // The cancellation left Ada on Free.
    let cancelled = of(&events, "payment.subscription.cancelled", x.ada);
    assert_eq!(cancelled[0].payload["from"], "pro");
    h.stop().await;
}

/// The ISO week `YYYY-Www` of `t` (computed here with chrono, independently of the domain).
fn iso_week(t: DateTime<Utc>) -> String {
    let w = t.iso_week();
    format!("{:04}-W{:02}", w.year(), w.week())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_store_rebuilds_the_same_read_models() {
    let (h, x) = full_history().await;
    let live = H::exports(h.app.read_models.as_ref()).await;
    assert!(live.iter().all(|(_, bytes)| !bytes.is_empty()));
    let stored = h.events().await.len() as u64;

    // 1. Into a fresh read-model store, as `tektree-replay rebuild` does.
    let fresh = SqliteReadModels::open(h.dir.path().join("rebuilt.db")).unwrap();
    for (name, _) in MODELS {
        let n = tektree_services::replay::rebuild(
            h.app.store.as_ref(),
            &fresh,
            name.parse().unwrap(),
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(n, stored, "{name}");
    }
    let rebuilt = H::exports(&fresh).await;
    for ((name, a), (_, b)) in live.iter().zip(&rebuilt) {
        assert!(
            a == b,
            "{name} differs after a rebuild\nlive:\n{}\nrebuilt:\n{}",
            String::from_utf8_lossy(a),
            String::from_utf8_lossy(b)
        );
    }

    // 2. Beside the live version, through `POST /v1/admin/projections/{name}/rebuild`.
    let admin = h.token(Uuid::new_v4(), &[Role::Admin]);
    for (name, _) in MODELS {
        let r = h
            .call(
                Method::POST,
                &format!("/v1/admin/projections/{name}/rebuild"),
                &admin,
                json!({}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json["events"], stored, "{}", r.text);
        assert_eq!(
            (&r.json["generation"], &r.json["resumed_from"]),
            (&json!(1), &json!(0)),
            "{}",
            r.text
        );
    }
    h.settle().await;
    let again = H::exports(h.app.read_models.as_ref()).await;
    for ((name, a), (_, b)) in live.iter().zip(&again) {
        assert!(
            a == b,
            "{name} differs after a rebuild beside the live version"
        );
    }

    // Ada's achievements: the first question and answer, the weekly quest of the week of her
    // answers, the 1-day streak milestone.
    let events = h.events().await;
    let third_answer = events
        .iter()
        .filter(|e| {
            e.event_type == "knowledge.answer.submitted"
                && e.payload["author_id"] == json!(x.ada.to_string())
        })
        .nth(2)
        .expect("Ada's third answer");
    let r = h.get(&format!("/v1/users/{}/achievements", x.ada)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json["achievements"],
        json!(["first-answer", "first-question"]),
        "{}",
        r.text
    );
    assert_eq!(
        r.json["quests"],
        json!([format!(
            "weekly-contributor@{}",
            iso_week(third_answer.occurred_at)
        )]),
        "{}",
        r.text
    );
    assert_eq!(r.json["streak_milestones"], json!([1]), "{}", r.text);
    assert_eq!(r.json["counts"]["answer"], 3, "{}", r.text);
    assert_eq!(r.json["counts"]["question"], 1, "{}", r.text);
    let r = h.get(&format!("/v1/users/{}/achievements", x.bob)).await;
    assert_eq!(
        r.json["achievements"],
        json!(["first-accepted-answer", "first-answer", "first-question"]),
        "{}",
        r.text
    );

    // The area board counts XP earned on content in the area, by the default XP rules:
    // Ada: question 2 + discussion 3 + insight 3 + resource 3 + two answers 2×5 + her accepted
    //      question 2 + five upvotes on her area content 5×10 + two likes 2×2 = 77
    //      (her third answer, to Bob's question outside the area, and achievement / quest
    //      rewards do not count);
    // Bob: answer 5 + accepted 15 + one downvote −2 = 18; Cy: comment 1.
    let r = h.get(&format!("/v1/leaderboards/area:{}", x.area)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let entries: Vec<(u64, String, i64)> = r.json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["rank"].as_u64().unwrap(),
                e["user_id"].as_str().unwrap().to_string(),
                e["xp"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (1, x.ada.to_string(), 77),
            (2, x.bob.to_string(), 18),
            (3, x.cy.to_string(), 1)
        ],
        "{}",
        r.text
    );
    // All-time XP of Ada: registration 1 + area 77 + third answer 5 + its upvote 10 +
    // first-question 5 + first-answer 5 + weekly quest 10 = 113 (level 2).
    let r = h.get(&format!("/v1/users/{}/xp", x.ada)).await;
    assert_eq!(
        (&r.json["xp"], &r.json["level"]),
        (&json!(113), &json!(2)),
        "{}",
        r.text
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_endpoints_refuse_bad_input_and_write_nothing() {
    let h = H::started().await;
    let ada = h.register("Ada").await;
    let bob = h.register("Bob").await;
    let moderator = Uuid::new_v4();
    let r = h
        .call(
            Method::PATCH,
            &format!("/v1/users/{ada}"),
            &h.token(ada, &[]),
            json!({"email": "ada@example.org"}),
        )
        .await;
    assert_eq!(r.created(), ["user.profile.updated"]);
    let r = h
        .create_area(moderator, json!({"name": "Rome", "slug": "rome"}))
        .await;
    assert_eq!(r.created(), ["knowledge.area.created"]);
    h.settle().await;
    let head = h.head().await;

    let me = format!("/v1/users/{ada}");
    let verify = format!("/v1/users/{ada}/email/verify");
    let missing = Uuid::new_v4();
    let like = format!("/v1/content/{missing}/likes");
    let text = json!({"title": "T", "body": "B", "tags": []});
    let resource = json!({"title": "Slides", "file_name": "s.pdf", "media_type": "application/pdf",
        "size_bytes": 10, "sha256": SHA});
    let with = |base: &Value, k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };

    // Malformed JSON → 400 `malformed_json`; an unknown field → 422 `invalid_body`.
    let endpoints: [(Method, &str, Value); 8] = [
        (Method::PATCH, me.as_str(), json!({"bio": "x"})),
        (Method::POST, "/v1/sessions", json!({})),
        (Method::POST, verify.as_str(), json!({})),
        (Method::POST, "/v1/areas", json!({"name": "N", "slug": "n"})),
        (Method::POST, "/v1/discussions", text.clone()),
        (Method::POST, "/v1/insights", text.clone()),
        (Method::POST, "/v1/resources", resource.clone()),
        (Method::POST, like.as_str(), json!({})),
    ];
    for (method, uri, valid) in &endpoints {
        let token = h.token(ada, &[Role::Moderator]);
        // The valid body cut short before its closing brace; single quotes; not JSON at all.
        let valid_text = valid.to_string();
        let cut = valid_text.as_bytes()[..valid_text.len() - 1].to_vec();
        for body in [cut, b"{'bio': 'x'}".to_vec(), b"bio=x".to_vec()] {
            let r = h
                .send(method.clone(), uri, Some(&token), &[], body.clone())
                .await;
            r.problem(StatusCode::BAD_REQUEST, "malformed_json");
        }
        let r = h
            .call(
                method.clone(),
                uri,
                &token,
                with(valid, "surprise", json!(1)),
            )
            .await;
        r.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
        assert_eq!(h.head().await, head, "{method} {uri}");
    }

    let mut refusals: Vec<(Resp, StatusCode, &str)> = vec![];
    // PATCH /v1/users/{id}: another user; nothing to change; an invalid address.
    let r = h
        .raw(
            Method::PATCH,
            &format!("/v1/users/{bob}"),
            ada,
            br#"{"bio": "mine now"}"#,
        )
        .await;
    refusals.push((r, StatusCode::FORBIDDEN, "forbidden"));
    let r = h.raw(Method::PATCH, &me, ada, b"{}").await;
    refusals.push((r, StatusCode::UNPROCESSABLE_ENTITY, "invalid"));
    let r = h
        .raw(Method::PATCH, &me, ada, br#"{"email": "not an address"}"#)
        .await;
    refusals.push((r, StatusCode::UNPROCESSABLE_ENTITY, "invalid"));
    // POST /v1/sessions by an unregistered caller.
    let r = h.raw(Method::POST, "/v1/sessions", missing, b"{}").await;
    refusals.push((r, StatusCode::NOT_FOUND, "not_found.user"));
    // Verification: no `email` claim; `email_verified` false; another user's id; another
    // address than the profile's.
    let r = h.raw(Method::POST, &verify, ada, b"{}").await;
    refusals.push((r, StatusCode::FORBIDDEN, "forbidden"));
    let t = h.email_token(ada, "ada@example.org", false);
    let r = h.call(Method::POST, &verify, &t, json!({})).await;
    refusals.push((r, StatusCode::FORBIDDEN, "forbidden"));
    let t = h.email_token(bob, "ada@example.org", true);
    let r = h.call(Method::POST, &verify, &t, json!({})).await;
    refusals.push((r, StatusCode::FORBIDDEN, "forbidden"));
    let t = h.email_token(ada, "someone@example.org", true);
    let r = h.call(Method::POST, &verify, &t, json!({})).await;
    refusals.push((r, StatusCode::CONFLICT, "conflict"));
    // Areas: a plain user; a bad slug.
    let r = h
        .post("/v1/areas", ada, json!({"name": "Mine", "slug": "mine"}))
        .await;
    refusals.push((r, StatusCode::FORBIDDEN, "forbidden"));
    let r = h
        .create_area(moderator, json!({"name": "Bad", "slug": "Not A Slug"}))
        .await;
    refusals.push((r, StatusCode::UNPROCESSABLE_ENTITY, "invalid"));
    // Unknown area.
    for uri in ["/v1/discussions", "/v1/insights"] {
        let r = h
            .post(uri, ada, with(&text, "area_id", json!(missing)))
            .await;
        refusals.push((r, StatusCode::NOT_FOUND, "not_found.area"));
    }
    let r = h
        .post(
            "/v1/resources",
            ada,
            with(&resource, "area_id", json!(missing)),
        )
        .await;
    refusals.push((r, StatusCode::NOT_FOUND, "not_found.area"));
    // An empty insight; bad hash, media type, size, storage URL.
    let r = h
        .post("/v1/insights", ada, with(&text, "body", json!("")))
        .await;
    refusals.push((r, StatusCode::UNPROCESSABLE_ENTITY, "invalid"));
    for (k, v) in [
        ("sha256", json!("abc")),
        ("sha256", json!("z".repeat(64))),
        ("media_type", json!("pdf")),
        ("media_type", json!("application/")),
        ("size_bytes", json!(0)),
        ("storage_url", json!("ftp://example.org/s.pdf")),
    ] {
        let r = h.post("/v1/resources", ada, with(&resource, k, v)).await;
        refusals.push((r, StatusCode::UNPROCESSABLE_ENTITY, "invalid"));
    }
    // A like on content that does not exist.
    let r = h.raw(Method::POST, &like, ada, b"{}").await;
    refusals.push((r, StatusCode::NOT_FOUND, "not_found.content"));
    // No token at all.
    let r = h
        .send(
            Method::POST,
            "/v1/insights",
            None,
            &[],
            text.to_string().into(),
        )
        .await;
    refusals.push((r, StatusCode::UNAUTHORIZED, "unauthenticated"));

    for (i, (r, status, code)) in refusals.iter().enumerate() {
        assert!(r.status == *status, "refusal {i}: {}", r.text);
        r.problem(*status, code);
    }
    h.settle().await;
    assert_eq!(h.head().await, head, "a refusal wrote events");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_repeats_change_nothing() {
    let h = H::started().await;
    let ada = h.register("Ada").await;
    let bob = h.register("Bob").await;
    let area_body = json!({"area_id": Uuid::new_v4(), "name": "Rome", "slug": "rome",
        "description": "Ancient Rome"});
    let r = h.create_area(Uuid::new_v4(), area_body.clone()).await;
    assert_eq!(r.created(), ["knowledge.area.created"]);
    let r = h
        .call(
            Method::PATCH,
            &format!("/v1/users/{ada}"),
            &h.token(ada, &[]),
            json!({"email": "ada@example.org"}),
        )
        .await;
    assert_eq!(r.created(), ["user.profile.updated"]);
    let verify = format!("/v1/users/{ada}/email/verify");
    let email_token = h.email_token(ada, "ada@example.org", true);
    let r = h.call(Method::POST, &verify, &email_token, json!({})).await;
    assert_eq!(r.created(), ["user.email.verified"]);
    let r = h
        .post(
            "/v1/insights",
            ada,
            json!({"title": "Cite sources", "body": "Livy.", "area_id": area_body["area_id"]}),
        )
        .await;
    assert_eq!(r.created(), ["knowledge.insight.shared"]);
    let like = format!("/v1/content/{}/likes", r.id());
    let r = h.post(&like, bob, json!({})).await;
    assert_eq!(r.created(), ["knowledge.content.liked"]);
    h.settle().await;
    let head = h.head().await;

    // The same like, verification and area (by the same or another moderator) again.
    h.post(&like, bob, json!({})).await.unchanged();
    h.call(Method::POST, &verify, &email_token, json!({}))
        .await
        .unchanged();
    let fresh_token = h.email_token(ada, "ada@example.org", true);
    h.call(Method::POST, &verify, &fresh_token, json!({}))
        .await
        .unchanged();
    h.create_area(Uuid::new_v4(), area_body.clone())
        .await
        .unchanged();
    // The same profile values again change nothing either.
    h.call(
        Method::PATCH,
        &format!("/v1/users/{ada}"),
        &h.token(ada, &[]),
        json!({"email": "ada@example.org"}),
    )
    .await
    .unchanged();
    h.settle().await;
    assert_eq!(h.head().await, head, "a repeat wrote events");

    // The same area id with other data is a conflict, and writes nothing either.
    let mut other = area_body.clone();
    other["name"] = json!("Greece");
    h.create_area(Uuid::new_v4(), other)
        .await
        .problem(StatusCode::CONFLICT, "conflict");
    assert_eq!(h.head().await, head);
    h.stop().await;
}

/// docs/api.md ("Bad input"): a body that is not JSON — including one cut short — is 400
/// `malformed_json`, even when the part before the cut already names an unknown field (found by
/// this test: the typed decode used to report the unknown field first, 422 `invalid_body`;
/// `decode_json` now checks the syntax first). Nothing is written either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_short_bodies_with_an_unknown_field_are_malformed_json() {
    let h = H::open().await;
    let ada = h.register("Ada").await;
    let head = h.head().await;
    for uri in ["/v1/sessions", "/v1/discussions"] {
        let r = h.raw(Method::POST, uri, ada, br#"{"surprise": "#).await;
        assert_eq!(h.head().await, head);
        r.problem(StatusCode::BAD_REQUEST, "malformed_json");
    }
}

/// A Free user refused at the quota buys Pro (limit 1,000) through Polar; the next post passes.
/// (The guard reads the month's `quota` row, which only `payment.usage.recorded` updates; after
/// an upgrade the row still says `free`, limit 3, used 3, so the guard must not trust it alone —
/// `services/src/api/quota.rs` now asks the subscription aggregate before refusing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_lifts_the_quota_refusal() {
    let h = H::started().await;
    let user = h.register("Quinn").await;
    let post = |i: u64| json!({"title": format!("Question {i}"), "body": "?", "tags": []});
    for i in 0..FREE_QUOTA {
        assert_eq!(
            h.post("/v1/questions", user, post(i)).await.created(),
            ["knowledge.question.posted"]
        );
        h.settle().await;
    }
    h.post("/v1/questions", user, post(FREE_QUOTA))
        .await
        .problem(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    let r = h
        .webhook(&fake_polar::subscription_event(
            "subscription.created",
            "active",
            PRO,
            user,
        ))
        .await;
    assert_eq!(r.event_types(), ["payment.subscription.upgraded"]);
    h.settle().await;
    assert_eq!(
        h.post("/v1/questions", user, post(FREE_QUOTA))
            .await
            .created(),
        ["knowledge.question.posted"]
    );
    h.settle().await;
    let r = h.get(&format!("/v1/users/{user}/quota")).await;
    assert_eq!(r.json["tier"], "pro", "{}", r.text);
    h.stop().await;
}
