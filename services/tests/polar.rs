//! Polar billing (issue #6) through the full HTTP path: `tektree_services::api::router` over a
//! temporary SQLite store, calling a fake Polar on a loopback port (`common::fake_polar`).
//!
//! Checkout: happy path, refusals, breaker (opens, fails fast, half-open recovery), time-outs,
//! 429 and 4xx handling. Webhooks: subscription and order events become subscription events;
//! duplicates, ignored types and every verification failure write nothing (the store's head
//! position is compared around each request).

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use chrono::Utc;
use common::fake_polar::{self, FakePolar, Mode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tektree_domain::{Subscription, Tier};
use tektree_services::api;
use tektree_services::api::auth::Role;
use tektree_services::api::ratelimit::RateLimiter;
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tektree_services::billing::breaker::{BreakerConfig, BreakerState};
use tektree_services::billing::webhook::WebhookSecret;
use tektree_services::billing::{Billing, BillingConfig, TierProducts};
use tower::ServiceExt;
use uuid::Uuid;

const TOKEN: &str = "polar_oat_test_token";
const SECRET: &str = "polar_whs_current_0123456789abcdefghij";
const OLD_SECRET: &str = "polar_whs_previous_9876543210zyxwvuts";
const PRO: &str = "prod_pro_0001";
const TEAM: &str = "prod_team_0002";
const ENTERPRISE: &str = "prod_ent_0003";

/// Request headers of a delivery.
type Headers = Vec<(&'static str, String)>;

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
}

impl Resp {
    fn code(&self) -> &str {
        self.json["type"]
            .as_str()
            .and_then(|t| t.strip_prefix("https://tektree.dev/problems/"))
            .unwrap_or("")
    }

    fn is_problem(&self) -> bool {
        self.headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v == "application/problem+json")
    }

    fn retry_after(&self) -> Option<u64> {
        self.headers
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().parse().unwrap())
    }
}

struct H {
    app: App,
    state: ApiState,
    router: Router,
    fake: FakePolar,
    _dir: tempfile::TempDir,
}

fn breaker(threshold: u32, attempts: u32, cool_down: Duration) -> BreakerConfig {
    BreakerConfig {
        failure_threshold: threshold,
        cool_down,
        max_attempts: attempts,
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        call_timeout: Duration::from_secs(10),
    }
}

fn config(fake: &FakePolar, token: &str, secrets: &[&str], b: BreakerConfig) -> BillingConfig {
    let mut c = BillingConfig::new(
        token,
        secrets
            .iter()
            .map(|s| WebhookSecret::parse(s).unwrap())
            .collect(),
        TierProducts {
            pro: Some(PRO.into()),
            team: Some(TEAM.into()),
            enterprise: Some(ENTERPRISE.into()),
        },
    );
    c.api_base = fake.base_url.clone();
    c.success_url = Some("https://app.tektree.dev/billing/done?checkout={CHECKOUT_ID}".into());
    c.breaker = b;
    c
}

impl H {
    /// An app with billing against a fresh fake, accepting `secrets`.
    async fn with(secrets: &[&str], b: BreakerConfig) -> H {
        let fake = FakePolar::start(TOKEN).await;
        let billing = Billing::new(config(&fake, TOKEN, secrets, b)).unwrap();
        H::open(fake, billing).await
    }

    async fn new() -> H {
        H::with(&[SECRET], breaker(5, 3, Duration::from_secs(3600))).await
    }

    async fn open(fake: FakePolar, billing: Billing) -> H {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tektree.db");
        let mut security = Security::ephemeral();
        security.rate_limiter = RateLimiter::disabled();
        let app = App::open(
            &format!("sqlite://{}", path.display()),
            "memory",
            Default::default(),
        )
        .await
        .unwrap();
        let state = ApiState::new(app.clone())
            .with_security(security)
            .with_billing(billing);
        H {
            router: api::router(state.clone()),
            app,
            state,
            fake,
            _dir: dir,
        }
    }

    async fn send(&self, uri: &str, headers: &[(&str, String)], body: Vec<u8>) -> Resp {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
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
        Resp {
            status,
            headers,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    fn bearer(&self, user: Uuid, roles: &[Role]) -> (&'static str, String) {
        let token = self.state.security.auth.mint(user, roles, 3600).unwrap();
        ("authorization", format!("Bearer {token}"))
    }

    async fn register(&self) -> Uuid {
        let user = Uuid::new_v4();
        let r = self
            .send(
                "/v1/users",
                &[self.bearer(user, &[])],
                json!({"display_name": "Ada"}).to_string().into_bytes(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json);
        user
    }

    async fn checkout_as(&self, caller: Uuid, roles: &[Role], user: Uuid, body: Value) -> Resp {
        self.send(
            &format!("/v1/subscriptions/{user}/checkout"),
            &[self.bearer(caller, roles)],
            body.to_string().into_bytes(),
        )
        .await
    }

    async fn checkout(&self, user: Uuid, tier: &str) -> Resp {
        self.checkout_as(user, &[], user, json!({ "tier": tier }))
            .await
    }

    async fn head(&self) -> u64 {
        self.app.store.head().await.unwrap().position
    }

    /// Delivers `body` with the given headers.
    async fn deliver(&self, headers: &[(&'static str, String)], body: &[u8]) -> Resp {
        self.send("/v1/webhooks/polar", headers, body.to_vec())
            .await
    }

    /// Delivers `body` signed now with `secret`, as message `id`.
    async fn deliver_signed(&self, secret: &str, id: &str, body: &[u8]) -> Resp {
        let h = fake_polar::signed_headers(secret, id, Utc::now().timestamp(), body);
        self.deliver(&h, body).await
    }

    /// The stored payloads of the user's subscription events, in order.
    async fn subscription_events(&self, user: Uuid) -> Vec<(String, Value)> {
        let all = self.app.store.read_all(0, 10_000).await.unwrap();
        all.into_iter()
            .filter(|e| e.aggregate_type == "subscription" && e.aggregate_id == user)
            .map(|e| (e.event_type, e.payload))
            .collect()
    }

    async fn tier(&self, user: Uuid) -> Tier {
        let (s, _) = self.app.handler.load::<Subscription>(user).await.unwrap();
        s.tier.unwrap_or_default()
    }

    fn breaker_state(&self) -> BreakerState {
        self.state
            .billing
            .service()
            .unwrap()
            .client
            .breaker()
            .state()
    }

    /// Waits (polling) until the breaker's cool-down has passed. Bounded; asserts no duration.
    async fn await_half_open(&self) {
        for _ in 0..1000 {
            if self.breaker_state() == BreakerState::HalfOpen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the breaker never became half-open");
    }
}

// ---------------------------------------------------------------------------------------------
// Checkout.

/// The happy path: 201 with Polar's URL; Polar saw the bearer token, the tier's product, the
/// user as `external_customer_id` and in the metadata, and the success URL. No event is
/// written (the tier changes on the webhook).
#[tokio::test]
async fn checkout_returns_the_polar_url_and_sends_product_and_customer() {
    let h = H::new().await;
    let user = h.register().await;
    let head = h.head().await;
    let r = h.checkout(user, "team").await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json);
    assert_eq!(r.json["tier"], "team");
    let url = r.json["url"].as_str().unwrap();
    assert!(
        url.starts_with("https://sandbox.polar.sh/checkout/polar_c_"),
        "{url}"
    );
    assert!(r.json["checkout_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(r.json["expires_at"]
        .as_str()
        .unwrap()
        .parse::<chrono::DateTime<Utc>>()
        .is_ok());
    let seen = h.fake.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(seen[0].body["products"], json!([TEAM]));
    assert_eq!(seen[0].body["external_customer_id"], user.to_string());
    assert_eq!(
        seen[0].body["metadata"]["tektree_user_id"],
        user.to_string()
    );
    assert_eq!(seen[0].body["metadata"]["tektree_tier"], "team");
    assert_eq!(
        seen[0].body["success_url"],
        "https://app.tektree.dev/billing/done?checkout={CHECKOUT_ID}"
    );
    assert_eq!(h.head().await, head);
    // An admin may start a checkout for someone else.
    let admin = Uuid::new_v4();
    let r = h
        .checkout_as(admin, &[Role::Admin], user, json!({"tier": "pro"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json);
    assert_eq!(h.fake.requests()[1].body["products"], json!([PRO]));
}

/// Refusals happen before Polar is called: another user (403), `free` (422), unknown fields
/// (422), an unregistered user (404), no token (401), billing off (503).
#[tokio::test]
async fn checkout_refusals_never_reach_polar() {
    let h = H::new().await;
    let user = h.register().await;
    let other = h.register().await;
    let r = h
        .checkout_as(other, &[], user, json!({"tier": "pro"}))
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = h.checkout(user, "free").await;
    assert_eq!(
        (r.status, r.code()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "billing.tier_not_for_sale"
        )
    );
    let r = h
        .checkout_as(user, &[], user, json!({"tier": "pro", "price": 1}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    let r = h.checkout(user, "platinum").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let ghost = Uuid::new_v4();
    let r = h.checkout(ghost, "pro").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "not_found.user")
    );
    let r = h
        .send(
            &format!("/v1/subscriptions/{user}/checkout"),
            &[],
            br#"{"tier": "pro"}"#.to_vec(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.fake.request_count(), 0);

    let off = H::open(FakePolar::start(TOKEN).await, Billing::disabled()).await;
    let u = off.register().await;
    let r = off.checkout(u, "pro").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "billing_unconfigured")
    );
    assert!(r.is_problem());
    let r = off.deliver(&[], b"{}").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "billing_unconfigured")
    );
}

/// 5xx are retried; after `failure_threshold` consecutive failures the breaker opens, and
/// later calls fail fast with 503 `billing.circuit_open` + `Retry-After` without reaching
/// Polar (its request count stops growing), even once Polar is healthy again.
#[tokio::test]
async fn breaker_opens_after_failures_and_then_fails_fast() {
    let h = H::with(&[SECRET], breaker(3, 3, Duration::from_secs(3600))).await;
    let user = h.register().await;
    h.fake.set_mode(Mode::Status(500));
    let r = h.checkout(user, "pro").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_GATEWAY, "billing.upstream")
    );
    assert!(r.is_problem());
    assert!(r.retry_after().is_some_and(|s| s >= 1));
    assert_eq!(h.fake.request_count(), 3, "three attempts");
    assert_eq!(h.breaker_state(), BreakerState::Open);
    h.fake.set_mode(Mode::Normal);
    for _ in 0..3 {
        let r = h.checkout(user, "pro").await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "billing.circuit_open")
        );
        assert!(r.retry_after().is_some_and(|s| s > 1));
    }
    assert_eq!(
        h.fake.request_count(),
        3,
        "an open breaker never calls Polar"
    );
}

/// After the cool-down one probe goes through: a failed probe reopens the breaker, a
/// successful one closes it and checkouts work again.
#[tokio::test]
async fn half_open_probe_reopens_on_failure_and_recovers_on_success() {
    let h = H::with(&[SECRET], breaker(1, 1, Duration::from_millis(50))).await;
    let user = h.register().await;
    h.fake.set_mode(Mode::Status(503));
    let r = h.checkout(user, "pro").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(h.fake.request_count(), 1);
    assert_ne!(h.breaker_state(), BreakerState::Closed);
    // Failed probe: one more request, open again.
    h.await_half_open().await;
    let r = h.checkout(user, "pro").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(h.fake.request_count(), 2);
    assert_ne!(h.breaker_state(), BreakerState::Closed);
    // Successful probe: closed.
    h.fake.set_mode(Mode::Normal);
    h.await_half_open().await;
    let r = h.checkout(user, "pro").await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json);
    assert_eq!(h.fake.request_count(), 3);
    assert_eq!(h.breaker_state(), BreakerState::Closed);
    let r = h.checkout(user, "team").await;
    assert_eq!(r.status, StatusCode::CREATED);
}

/// An answer slower than the per-attempt limit is a time-out: retried, counted as a failure,
/// answered 502.
#[tokio::test]
async fn slow_polar_times_out_and_opens_the_breaker() {
    let mut b = breaker(2, 2, Duration::from_secs(3600));
    b.call_timeout = Duration::from_millis(100);
    let h = H::with(&[SECRET], b).await;
    let user = h.register().await;
    h.fake.set_mode(Mode::Slow(Duration::from_secs(30)));
    let r = h.checkout(user, "pro").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_GATEWAY, "billing.upstream")
    );
    assert_eq!(h.fake.request_count(), 2);
    assert_eq!(h.breaker_state(), BreakerState::Open);
    let r = h.checkout(user, "pro").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.fake.request_count(), 2);
}

/// 429 with a `Retry-After` longer than the backoff cap is not retried; the client gets 502
/// with Polar's `Retry-After`.
#[tokio::test]
async fn polar_429_passes_its_retry_after_on() {
    let h = H::new().await;
    let user = h.register().await;
    h.fake.set_mode(Mode::TooMany {
        retry_after_secs: 7,
    });
    let r = h.checkout(user, "pro").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_GATEWAY, "billing.upstream")
    );
    assert_eq!(r.retry_after(), Some(7));
    assert_eq!(h.fake.request_count(), 1);
}

/// A 4xx from Polar (here: a wrong access token → 401) is neither retried nor a breaker
/// failure: the breaker stays closed however often it happens.
#[tokio::test]
async fn polar_4xx_is_not_retried_and_does_not_open_the_breaker() {
    let fake = FakePolar::start(TOKEN).await;
    let billing = Billing::new(config(
        &fake,
        "polar_oat_wrong",
        &[SECRET],
        breaker(2, 3, Duration::from_secs(3600)),
    ))
    .unwrap();
    let h = H::open(fake, billing).await;
    let user = h.register().await;
    for n in 1..=4 {
        let r = h.checkout(user, "pro").await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_GATEWAY, "billing.upstream")
        );
        assert_eq!(h.fake.request_count(), n);
    }
    assert_eq!(h.breaker_state(), BreakerState::Closed);
}

// ---------------------------------------------------------------------------------------------
// Webhooks: events.

/// `subscription.created` (team) upgrades, `subscription.updated` (pro) downgrades; the events
/// carry the tiers and Polar's subscription id; the aggregate's tier follows.
#[tokio::test]
async fn subscription_created_and_updated_change_the_tier() {
    let h = H::new().await;
    let user = h.register().await;
    let body = fake_polar::subscription_event("subscription.created", "active", TEAM, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &body)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json["status"], "processed");
    assert_eq!(
        r.json["events"][0]["event_type"],
        "payment.subscription.upgraded"
    );
    assert_eq!(h.tier(user).await, Tier::Team);

    let body = fake_polar::subscription_event("subscription.updated", "active", PRO, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &body)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(
        r.json["events"][0]["event_type"],
        "payment.subscription.downgraded"
    );
    assert_eq!(h.tier(user).await, Tier::Pro);

    let events = h.subscription_events(user).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "payment.subscription.upgraded",
            "payment.subscription.downgraded"
        ]
    );
    assert_eq!(events[0].1["to"], "team");
    assert_eq!(events[1].1["from"], "team");
    assert_eq!(events[1].1["to"], "pro");
    assert_eq!(events[1].1["polar_subscription_id"], "sub_5d1a0b9c");
    // The same tier again changes nothing.
    let body = fake_polar::subscription_event("subscription.active", "active", PRO, user);
    let head = h.head().await;
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &body)
        .await;
    assert_eq!((r.status, &r.json["events"]), (StatusCode::OK, &json!([])));
    assert_eq!(h.head().await, head);
}

/// `subscription.canceled` (immediate: status `canceled`) and `subscription.revoked` cancel; a
/// cancellation at period end (status still `active`) keeps the tier.
#[tokio::test]
async fn subscription_canceled_and_revoked_cancel() {
    let h = H::new().await;
    let user = h.register().await;
    let up = |p: &str| fake_polar::subscription_event("subscription.created", "active", p, user);
    h.deliver_signed(SECRET, &fake_polar::message_id(), &up(PRO))
        .await;
    // Cancel at period end: nothing changes yet.
    let at_end = fake_polar::subscription_event("subscription.canceled", "active", PRO, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &at_end)
        .await;
    assert_eq!((r.status, &r.json["events"]), (StatusCode::OK, &json!([])));
    assert_eq!(h.tier(user).await, Tier::Pro);
    // Immediate cancellation.
    let now = fake_polar::subscription_event("subscription.canceled", "canceled", PRO, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &now)
        .await;
    assert_eq!(
        r.json["events"][0]["event_type"],
        "payment.subscription.cancelled"
    );
    assert_eq!(h.tier(user).await, Tier::Free);
    // Revoked.
    h.deliver_signed(SECRET, &fake_polar::message_id(), &up(ENTERPRISE))
        .await;
    assert_eq!(h.tier(user).await, Tier::Enterprise);
    let revoked =
        fake_polar::subscription_event("subscription.revoked", "canceled", ENTERPRISE, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &revoked)
        .await;
    assert_eq!(
        r.json["events"][0]["event_type"],
        "payment.subscription.cancelled"
    );
    assert_eq!(h.tier(user).await, Tier::Free);
    let events = h.subscription_events(user).await;
    assert_eq!(events.last().unwrap().1["from"], "enterprise");
}

/// `order.paid` records the invoice: id, amount in minor units, currency.
#[tokio::test]
async fn order_paid_records_the_invoice() {
    let h = H::new().await;
    let user = h.register().await;
    let body = fake_polar::order_paid("ord_77", 1900, "usd", PRO, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &body)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json["events"][0]["event_type"], "payment.invoice.paid");
    let events = h.subscription_events(user).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1["invoice_id"], "ord_77");
    assert_eq!(events[0].1["amount_minor"], 1900);
    assert_eq!(events[0].1["currency"], "usd");
}

// ---------------------------------------------------------------------------------------------
// Webhooks: deduplication.

/// A redelivery with the same `webhook-id` (same body; re-signed with a new timestamp as
/// Polar's retries are) answers 200 `duplicate` with `Idempotent-Replayed: true` and writes
/// nothing.
#[tokio::test]
async fn duplicate_webhook_id_answers_200_and_writes_nothing() {
    let h = H::new().await;
    let user = h.register().await;
    let id = fake_polar::message_id();
    let body = fake_polar::order_paid("ord_1", 500, "eur", TEAM, user);
    let first = h.deliver_signed(SECRET, &id, &body).await;
    assert_eq!(first.json["status"], "processed");
    let head = h.head().await;
    for ts in [Utc::now().timestamp(), Utc::now().timestamp() - 60] {
        let headers = fake_polar::signed_headers(SECRET, &id, ts, &body);
        let r = h.deliver(&headers, &body).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
        assert_eq!(r.json["status"], "duplicate");
        assert_eq!(r.headers["idempotent-replayed"], "true");
        assert_eq!(r.json["events"], first.json["events"]);
        assert_eq!(h.head().await, head);
    }
    assert_eq!(h.subscription_events(user).await.len(), 1);
}

/// The same `webhook-id` with another (validly signed) body is refused with 409
/// `webhook.id_reused`, and nothing is written.
#[tokio::test]
async fn same_webhook_id_with_another_body_is_refused() {
    let h = H::new().await;
    let user = h.register().await;
    let id = fake_polar::message_id();
    let a = fake_polar::subscription_event("subscription.created", "active", PRO, user);
    h.deliver_signed(SECRET, &id, &a).await;
    let head = h.head().await;
    let b = fake_polar::subscription_event("subscription.updated", "active", ENTERPRISE, user);
    let r = h.deliver_signed(SECRET, &id, &b).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "webhook.id_reused")
    );
    assert!(r.is_problem());
    assert_eq!(h.head().await, head);
    assert_eq!(h.tier(user).await, Tier::Pro);
}

/// Event types that need no command are acknowledged with 202 `ignored` and write nothing.
#[tokio::test]
async fn ignored_event_types_answer_202_and_write_nothing() {
    let h = H::new().await;
    let user = h.register().await;
    let head = h.head().await;
    for kind in [
        "checkout.created",
        "customer.updated",
        "order.created",
        "benefit_grant.created",
    ] {
        let body = json!({"type": kind, "timestamp": Utc::now(), "data": {"id": "x"}})
            .to_string()
            .into_bytes();
        let id = fake_polar::message_id();
        for _ in 0..2 {
            let r = h.deliver_signed(SECRET, &id, &body).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{kind}: {:?}", r.json);
            assert_eq!(r.json["status"], "ignored");
        }
    }
    let past_due = fake_polar::subscription_event("subscription.past_due", "past_due", PRO, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &past_due)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(h.head().await, head);
}

// ---------------------------------------------------------------------------------------------
// Webhooks: verification failures. Each is a 4xx problem and leaves the head unchanged; the
// delivery id stays unused (a valid delivery with it is processed afterwards).

#[tokio::test]
async fn unsigned_stale_future_wrong_and_tampered_deliveries_are_refused() {
    let h = H::new().await;
    let user = h.register().await;
    let id = fake_polar::message_id();
    let body = fake_polar::subscription_event("subscription.created", "active", TEAM, user);
    let now = Utc::now().timestamp();
    let good = fake_polar::signed_headers(SECRET, &id, now, &body);
    let without = |name: &str| -> Vec<(&'static str, String)> {
        good.iter().filter(|(k, _)| *k != name).cloned().collect()
    };
    let tampered_body =
        fake_polar::subscription_event("subscription.created", "active", ENTERPRISE, user);
    let cases: Vec<(&str, Headers, Vec<u8>, StatusCode, &str)> = vec![
        (
            "unsigned",
            vec![],
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.missing_header",
        ),
        (
            "no signature",
            without("webhook-signature"),
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.missing_header",
        ),
        (
            "no id",
            without("webhook-id"),
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.missing_header",
        ),
        (
            "no timestamp",
            without("webhook-timestamp"),
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.missing_header",
        ),
        (
            "stale",
            fake_polar::signed_headers(SECRET, &id, now - 400, &body),
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.stale",
        ),
        (
            "future",
            fake_polar::signed_headers(SECRET, &id, now + 400, &body),
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.future",
        ),
        (
            "wrong secret",
            fake_polar::signed_headers("polar_whs_someone_else_entirely_000", &id, now, &body),
            body.clone(),
            StatusCode::FORBIDDEN,
            "webhook.signature_mismatch",
        ),
        (
            "tampered body",
            good.clone(),
            tampered_body,
            StatusCode::FORBIDDEN,
            "webhook.signature_mismatch",
        ),
        (
            "malformed timestamp",
            vec![
                ("webhook-id", id.clone()),
                ("webhook-timestamp", "soon".into()),
                ("webhook-signature", good[2].1.clone()),
            ],
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.malformed_header",
        ),
        (
            "malformed signature",
            vec![
                ("webhook-id", id.clone()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", "deadbeef".into()),
            ],
            body.clone(),
            StatusCode::BAD_REQUEST,
            "webhook.malformed_header",
        ),
    ];
    let head = h.head().await;
    for (name, headers, b, status, code) in cases {
        let r = h.deliver(&headers, &b).await;
        assert_eq!((r.status, r.code()), (status, code), "{name}: {:?}", r.json);
        assert!(r.is_problem(), "{name}");
        assert_eq!(h.head().await, head, "{name} wrote something");
    }
    assert_eq!(h.tier(user).await, Tier::Free);
    // Nothing recorded the id: the genuine delivery is processed now.
    let r = h.deliver_signed(SECRET, &id, &body).await;
    assert_eq!(r.json["status"], "processed", "{:?}", r.json);
    assert_eq!(h.tier(user).await, Tier::Team);
}

/// During a rotation both listed secrets verify; once the old one is removed it no longer
/// does. A sender's two signatures in one header (space-separated) also verify.
#[tokio::test]
async fn rotated_secrets_are_accepted_while_listed() {
    let h = H::with(
        &[SECRET, OLD_SECRET],
        breaker(5, 3, Duration::from_secs(3600)),
    )
    .await;
    let user = h.register().await;
    let old = fake_polar::subscription_event("subscription.created", "active", PRO, user);
    let r = h
        .deliver_signed(OLD_SECRET, &fake_polar::message_id(), &old)
        .await;
    assert_eq!(r.json["status"], "processed", "{:?}", r.json);
    let new = fake_polar::subscription_event("subscription.updated", "active", TEAM, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &new)
        .await;
    assert_eq!(r.json["status"], "processed", "{:?}", r.json);
    assert_eq!(h.tier(user).await, Tier::Team);

    // Only the new secret configured: the old one is refused, both signatures together pass.
    let h2 = H::with(&[SECRET], breaker(5, 3, Duration::from_secs(3600))).await;
    let u2 = h2.register().await;
    let body = fake_polar::subscription_event("subscription.created", "active", PRO, u2);
    let id = fake_polar::message_id();
    let head = h2.head().await;
    let r = h2.deliver_signed(OLD_SECRET, &id, &body).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "webhook.signature_mismatch")
    );
    assert_eq!(h2.head().await, head);
    let ts = Utc::now().timestamp();
    let both = format!(
        "{} {}",
        fake_polar::sign(OLD_SECRET.as_bytes(), &id, ts, &body),
        fake_polar::sign(SECRET.as_bytes(), &id, ts, &body)
    );
    let headers = vec![
        ("webhook-id", id.clone()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", both),
    ];
    let r = h2.deliver(&headers, &body).await;
    assert_eq!(r.json["status"], "processed", "{:?}", r.json);
}

/// A `whsec_<base64>` secret (the Standard Webhooks form) keys the HMAC with the decoded bytes.
#[tokio::test]
async fn whsec_secrets_are_base64_decoded() {
    use base64::Engine;
    let key = b"a-standard-webhooks-key-of-32-by";
    let whsec = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let h = H::with(&[&whsec], breaker(5, 3, Duration::from_secs(3600))).await;
    let user = h.register().await;
    let body = fake_polar::order_paid("ord_9", 100, "usd", PRO, user);
    let id = fake_polar::message_id();
    let ts = Utc::now().timestamp();
    let headers = vec![
        ("webhook-id", id.clone()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", fake_polar::sign(key, &id, ts, &body)),
    ];
    let r = h.deliver(&headers, &body).await;
    assert_eq!(r.json["status"], "processed", "{:?}", r.json);
}

/// Verified deliveries that cannot be applied are 422 and write nothing: an unregistered user
/// (processed once the user exists), an unconfigured product, disagreeing user ids, a body
/// that is not a Polar event.
#[tokio::test]
async fn unknown_users_products_and_bad_payloads_are_422_and_write_nothing() {
    let h = H::new().await;
    let ghost = Uuid::new_v4();
    let head = h.head().await;
    let id = fake_polar::message_id();
    let body = fake_polar::subscription_event("subscription.created", "active", PRO, ghost);
    let r = h.deliver_signed(SECRET, &id, &body).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "webhook.unknown_user")
    );
    assert_eq!(h.head().await, head);

    let user = h.register().await;
    let head = h.head().await;
    let other_product =
        fake_polar::subscription_event("subscription.created", "active", "prod_x", user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &other_product)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "webhook.unknown_product")
    );
    let mut mixed: Value =
        serde_json::from_slice(&fake_polar::order_paid("ord_2", 1, "usd", PRO, user)).unwrap();
    mixed["data"]["metadata"]["tektree_user_id"] = json!(Uuid::new_v4().to_string());
    let mixed = mixed.to_string().into_bytes();
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &mixed)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "webhook.user_mismatch")
    );
    for bad in [
        &b"not json"[..],
        b"[1,2]",
        br#"{"type": "order.paid", "data": {}}"#,
    ] {
        let r = h
            .deliver_signed(SECRET, &fake_polar::message_id(), bad)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "webhook.invalid_payload"),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(h.head().await, head);
}

/// A body over the 64 KiB limit is refused with 413 before anything else.
#[tokio::test]
async fn oversize_webhooks_are_refused() {
    let h = H::new().await;
    let body = vec![b' '; 64 * 1024 + 1];
    let headers = fake_polar::signed_headers(SECRET, "msg_big", Utc::now().timestamp(), &body);
    let r = h.deliver(&headers, &body).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

/// The quota guard reads the `quota` read model, which trails a tier change; an upgrade must
/// still lift a Free quota that is used up, at once (the guard asks the subscription aggregate
/// before refusing).
#[tokio::test]
async fn an_upgrade_lifts_a_used_up_free_quota_at_once() {
    let fake = FakePolar::start(TOKEN).await;
    let b = breaker(5, 3, Duration::from_secs(3600));
    let billing = Billing::new(config(&fake, TOKEN, &[SECRET], b)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rules = tektree_domain::Rules::default();
    rules.quota.free = Some(2);
    let mut security = Security::ephemeral();
    security.rate_limiter = RateLimiter::disabled();
    let app = App::open(
        &format!("sqlite://{}", dir.path().join("tektree.db").display()),
        "memory",
        rules,
    )
    .await
    .unwrap();
    let state = ApiState::new(app.clone())
        .with_security(security)
        .with_billing(billing);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    let h = H {
        router: api::router(state.clone()),
        app,
        state,
        fake,
        _dir: dir,
    };
    let user = h.register().await;
    async fn post(h: &H, user: Uuid, n: u32) -> Resp {
        let body = json!({"title": format!("Q{n}"), "body": "", "tags": []});
        h.send(
            "/v1/questions",
            &[h.bearer(user, &[])],
            body.to_string().into_bytes(),
        )
        .await
    }
    for n in 0..2 {
        assert_eq!(post(&h, user, n).await.status, StatusCode::CREATED);
        h.app.settle(Duration::from_secs(60)).await.unwrap();
    }
    let r = post(&h, user, 2).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.json);
    assert_eq!(
        r.json["type"]
            .as_str()
            .map(|t| t.ends_with("quota_exceeded")),
        Some(true)
    );

    let body = fake_polar::subscription_event("subscription.created", "active", PRO, user);
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &body)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    // No settle: the read model may still say Free; the guard must not refuse.
    let r = post(&h, user, 3).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json);
    h.app.settle(Duration::from_secs(60)).await.unwrap();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
}

/// Polar may deliver an older event after a newer one (a manual redelivery, or past its
/// ordering window): a tier change or cancellation older (by the event's `timestamp`) than the
/// last one applied changes nothing.
#[tokio::test]
async fn an_older_subscription_event_delivered_late_changes_nothing() {
    let h = H::new().await;
    let user = h.register().await;
    let at = |kind: &str, status: &str, product: &str, ts: &str| -> Vec<u8> {
        let mut v: Value =
            serde_json::from_slice(&fake_polar::subscription_event(kind, status, product, user))
                .unwrap();
        v["timestamp"] = json!(ts);
        v.to_string().into_bytes()
    };
    let newer = at(
        "subscription.updated",
        "active",
        TEAM,
        "2025-01-02T00:00:00Z",
    );
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &newer)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(h.tier(user).await, Tier::Team);
    let head = h.head().await;
    for older in [
        at(
            "subscription.updated",
            "active",
            PRO,
            "2025-01-01T00:00:00Z",
        ),
        at(
            "subscription.canceled",
            "canceled",
            PRO,
            "2025-01-01T12:00:00Z",
        ),
    ] {
        let r = h
            .deliver_signed(SECRET, &fake_polar::message_id(), &older)
            .await;
        assert_eq!((r.status, &r.json["events"]), (StatusCode::OK, &json!([])));
    }
    assert_eq!(h.tier(user).await, Tier::Team);
    // Only the webhooks' dedupe records were written, no event.
    assert_eq!(h.head().await, head);
    let newest = at(
        "subscription.updated",
        "active",
        PRO,
        "2025-01-03T00:00:00Z",
    );
    let r = h
        .deliver_signed(SECRET, &fake_polar::message_id(), &newest)
        .await;
    assert_eq!(
        r.json["events"][0]["event_type"],
        "payment.subscription.downgraded"
    );
    assert_eq!(h.tier(user).await, Tier::Pro);
}
