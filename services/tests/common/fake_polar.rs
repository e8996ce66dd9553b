//! A fake Polar for tests (Polar itself is unreachable from our machines): an axum server on a
//! free loopback port that speaks the documented shapes of `POST /v1/checkouts/` (Polar API
//! reference, *Create Checkout Session*: bearer token, JSON body with `products`,
//! `external_customer_id`, `metadata`, `success_url`; `201` with the checkout object), records
//! every request, and can be told to fail (status codes, answers slower than the client's time
//! limit, 429 with `Retry-After`).
//!
//! It also builds webhook deliveries the way Polar sends them: payloads
//! `{"type","timestamp","data"}` and Standard Webhooks headers signed with HMAC-SHA256 keyed by
//! the secret's UTF-8 bytes (what Polar's SDKs verify). The signer here is written
//! independently of `tektree_services::billing::webhook`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use chrono::{SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// How the fake answers `POST /v1/checkouts/`.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// As Polar: 401 for a wrong token, 422 for an invalid body, else 201.
    Normal,
    /// This status with a Polar-style error body.
    Status(u16),
    /// Sleeps this long, then answers as [`Mode::Normal`].
    Slow(Duration),
    /// 429 with `Retry-After: <secs>`.
    TooMany { retry_after_secs: u64 },
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The JSON body (`Null` when not JSON).
    pub body: Value,
}

struct Shared {
    token: String,
    mode: Mutex<Mode>,
    requests: Mutex<Vec<Recorded>>,
}

/// A running fake; stopped when dropped.
pub struct FakePolar {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakePolar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePolar {
    /// Starts a fake accepting `token` as its organization access token.
    pub async fn start(token: &str) -> FakePolar {
        let shared = Arc::new(Shared {
            token: token.to_string(),
            mode: Mutex::new(Mode::Normal),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/checkouts/", post(create_checkout))
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakePolar {
            base_url: format!("http://{addr}"),
            shared,
            task,
        }
    }

    /// Changes how the next requests are answered.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }
}

fn error(status: StatusCode, kind: &str, detail: &str) -> Response {
    (status, Json(json!({"error": kind, "detail": detail}))).into_response()
}

/// Polar's validation error shape (FastAPI / pydantic): `{"detail": [{"type","loc","msg"}]}`.
fn validation(loc: &str, msg: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"type": "value_error", "loc": ["body", loc], "msg": msg}]})),
    )
        .into_response()
}

async fn create_checkout(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.requests.lock().unwrap().push(Recorded {
        authorization: authorization.clone(),
        body: json.clone(),
    });
    let mode = shared.mode.lock().unwrap().clone();
    match mode {
        Mode::Status(s) => {
            let status = StatusCode::from_u16(s).unwrap();
            return error(status, "Error", "failure injected by the test");
        }
        Mode::TooMany { retry_after_secs } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "rate limit exceeded",
            );
            r.headers_mut()
                .insert("retry-after", retry_after_secs.to_string().parse().unwrap());
            return r;
        }
        Mode::Slow(d) => tokio::time::sleep(d).await,
        Mode::Normal => {}
    }
    if authorization.as_deref() != Some(&format!("Bearer {}", shared.token)) {
        return error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "invalid access token",
        );
    }
    let Some(obj) = json.as_object() else {
        return validation("body", "Input should be a valid dictionary");
    };
    let products: Vec<String> = match obj.get("products").and_then(Value::as_array) {
        Some(a) if !a.is_empty() && a.iter().all(Value::is_string) => {
            a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
        }
        _ => return validation("products", "List should have at least 1 item"),
    };
    if let Some(m) = obj.get("metadata") {
        let ok = m.as_object().is_some_and(|m| {
            m.values()
                .all(|v| v.is_string() || v.is_number() || v.is_boolean())
        });
        if !ok {
            return validation("metadata", "Input should be a valid dictionary");
        }
    }
    let now = Utc::now();
    let id = Uuid::new_v4();
    let client_secret = format!("polar_c_{}", Uuid::new_v4().simple());
    let ts = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let answer = json!({
        "id": id.to_string(),
        "created_at": ts(now),
        "modified_at": null,
        "payment_processor": "stripe",
        "status": "open",
        "client_secret": client_secret,
        "url": format!("https://sandbox.polar.sh/checkout/{client_secret}"),
        "expires_at": ts(now + chrono::Duration::hours(1)),
        "success_url": obj.get("success_url").cloned().unwrap_or(json!("https://polar.sh")),
        "embed_origin": null,
        "amount": 1900,
        "discount_amount": 0,
        "net_amount": 1900,
        "tax_amount": null,
        "total_amount": 1900,
        "currency": "usd",
        "product_id": products[0],
        "products": products.iter().map(|p| json!({"id": p})).collect::<Vec<_>>(),
        "external_customer_id": obj.get("external_customer_id").cloned().unwrap_or(Value::Null),
        "customer_id": null,
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    });
    (StatusCode::CREATED, Json(answer)).into_response()
}

// ---------------------------------------------------------------------------------------------
// Webhook deliveries.

/// `v1,<base64 HMAC-SHA256(key, "{id}.{ts}.{body}")>` (Standard Webhooks).
pub fn sign(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The three headers of a delivery signed with Polar's raw `secret` (key = its UTF-8 bytes).
pub fn signed_headers(secret: &str, id: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sign(secret.as_bytes(), id, ts, body)),
    ]
}

/// A new Polar-style message id.
pub fn message_id() -> String {
    format!("msg_{}", Uuid::new_v4().simple())
}

/// A subscription event (`subscription.created`, `.updated`, `.canceled`, `.revoked`, …) as
/// Polar sends it, for the customer with `external_id` = `user`.
pub fn subscription_event(kind: &str, status: &str, product_id: &str, user: Uuid) -> Vec<u8> {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    json!({
        "type": kind,
        "timestamp": now,
        "data": {
            "id": "sub_5d1a0b9c",
            "created_at": now,
            "modified_at": now,
            "amount": 1900,
            "currency": "usd",
            "recurring_interval": "month",
            "status": status,
            "current_period_start": now,
            "current_period_end": null,
            "cancel_at_period_end": status == "active" && kind == "subscription.canceled",
            "canceled_at": null,
            "started_at": now,
            "ends_at": null,
            "ended_at": null,
            "customer_id": "cus_8f2e",
            "product_id": product_id,
            "discount_id": null,
            "checkout_id": "chk_1",
            "metadata": {"tektree_user_id": user.to_string()},
            "customer": {
                "id": "cus_8f2e",
                "external_id": user.to_string(),
                "email": "ada@example.com",
                "metadata": {}
            },
            "product": {"id": product_id, "name": "TekTree", "is_recurring": true}
        }
    })
    .to_string()
    .into_bytes()
}

/// An `order.paid` event as Polar sends it.
pub fn order_paid(
    order_id: &str,
    total_minor: u64,
    currency: &str,
    product_id: &str,
    user: Uuid,
) -> Vec<u8> {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    json!({
        "type": "order.paid",
        "timestamp": now,
        "data": {
            "id": order_id,
            "created_at": now,
            "modified_at": now,
            "status": "paid",
            "paid": true,
            "subtotal_amount": total_minor,
            "discount_amount": 0,
            "net_amount": total_minor,
            "tax_amount": 0,
            "total_amount": total_minor,
            "refunded_amount": 0,
            "currency": currency,
            "billing_reason": "subscription_create",
            "customer_id": "cus_8f2e",
            "product_id": product_id,
            "subscription_id": "sub_5d1a0b9c",
            "checkout_id": "chk_1",
            "metadata": {"tektree_user_id": user.to_string()},
            "customer": {"id": "cus_8f2e", "external_id": user.to_string()}
        }
    })
    .to_string()
    .into_bytes()
}
