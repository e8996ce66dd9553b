//! The billing endpoints (contract in `docs/api.md`, "Billing (Polar)"; operations in
//! `docs/billing.md`). Every error is a [`Problem`].
//!
//! - [`checkout`]: `POST /v1/subscriptions/{user}/checkout` creates a Polar checkout for a paid
//!   tier and answers its URL. Behind the command guard (body size, token, rate limit).
//! - [`webhook()`]: `POST /v1/webhooks/polar` receives Polar's webhooks: reads the raw body (at
//!   most [`BODY_LIMIT`] bytes), verifies the signature **before parsing anything**
//!   ([`super::webhook::verify`]), maps the event ([`super::events::action`]) and runs one
//!   subscription command idempotently, keyed by `webhook-id`: the dedupe record is written in
//!   the same transaction as the events, so a redelivery answers 200 and writes nothing, and
//!   the same id with another body is refused (409 `webhook.id_reused`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tektree_commands::{CommandError, CommandMeta};
use tektree_domain::{Actor, Subscription, SubscriptionCommand, Tier, User};
use tektree_event_store::IdempotencyKey;
use uuid::Uuid;

use super::breaker::CallError;
use super::client::{CheckoutCreate, PolarError};
use super::events::{self, BillingAction, TIER_METADATA_KEY, USER_METADATA_KEY};
use super::webhook::{self, WebhookError};
use super::{Billing, BillingService};
use tektree_http::auth::Role;
use tektree_http::command::CommittedEvent;
use tektree_http::correlation::Correlation;
use tektree_http::extract::{ApiJson, ApiPath};
use tektree_http::idempotency::REPLAYED_HEADER;
use tektree_http::identity::Principal;
use tektree_http::problem::Problem;
use tektree_http::security::{payload_too_large, read_body_limited};
use tektree_http::BODY_LIMIT;
use tektree_runtime::app::App;

/// How long a `webhook-id` is remembered: 30 days. Polar retries a failed delivery up to 10
/// times with exponential backoff and lets operators redeliver from its dashboard; a month
/// covers both. (The signature's 5-minute window already refuses old captures.)
pub const WEBHOOK_DEDUPE_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The actor of commands caused by Polar webhooks: `system:polar`.
pub const POLAR_ACTOR: &str = "polar";

/// 503 `billing_unconfigured`.
fn unconfigured() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "billing_unconfigured",
        "Billing unconfigured",
        "billing is not configured on this server",
    )
}

fn service(billing: &Billing) -> Result<&BillingService, Problem> {
    billing.service().ok_or_else(unconfigured)
}

/// Whole seconds, rounded up, at least 1 (for `Retry-After`).
fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// `POST /v1/subscriptions/{user}/checkout` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// The tier to buy: `pro`, `team` or `enterprise`.
    pub tier: Tier,
}

/// `201` answer of a checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutResponse {
    /// Polar's checkout session id.
    pub checkout_id: String,
    /// The hosted checkout page to send the user to.
    pub url: String,
    /// The tier being bought.
    pub tier: Tier,
    /// When the checkout session expires (UTC).
    pub expires_at: DateTime<Utc>,
}

/// The problem for a failed Polar call: 503 `billing.circuit_open` when the breaker refused
/// (nothing was sent to Polar), else 502 `billing.upstream`; both with `Retry-After` (the
/// breaker's remaining cool-down, Polar's own hint, or 1 s). Causes are logged, not returned.
fn upstream_problem(svc: &BillingService, e: CallError<PolarError>) -> Problem {
    match e {
        CallError::Open { retry_after } => {
            tracing::warn!(retry_after = ?retry_after, "Polar circuit open; checkout refused");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "billing.circuit_open",
                "Payment provider unavailable",
                "calls to the payment provider are paused after repeated failures; retry later",
            )
            .with_retry_after(ceil_secs(retry_after))
        }
        e => {
            let hint = match &e {
                CallError::Failed { error, .. } => super::breaker::Outcome::retry_after(error),
                _ => None,
            };
            let (attempts, cause) = match &e {
                CallError::Failed { error, attempts } => (*attempts, error.to_string()),
                CallError::Timeout { attempts, limit } => {
                    (*attempts, format!("timed out after {limit:?}"))
                }
                CallError::Open { .. } => unreachable!("handled above"),
            };
            tracing::error!(attempts, error = %cause, "Polar call failed");
            let retry = svc
                .client
                .breaker()
                .retry_after_at(tokio::time::Instant::now())
                .or(hint)
                .unwrap_or(Duration::from_secs(1));
            Problem::new(
                StatusCode::BAD_GATEWAY,
                "billing.upstream",
                "Payment provider error",
                "the payment provider did not create the checkout; retry later",
            )
            .with_retry_after(ceil_secs(retry))
        }
    }
}

/// `POST /v1/subscriptions/{user}/checkout`: creates a Polar checkout for `tier` with the
/// tier's product, `external_customer_id` = the user id and metadata `tektree_user_id`,
/// `tektree_tier` (so that webhooks name the user), and answers 201 [`CheckoutResponse`].
/// Writes no event: the tier changes when Polar's webhook reports the subscription.
///
/// # Errors
/// 401 without a valid token; 403 `forbidden` unless the caller is `user` or an admin; 400
/// `invalid_path`; 422 `invalid_body` (body not `{"tier": …}`), 422
/// `billing.tier_not_for_sale` (`free`, or a tier without a configured product); 404
/// `not_found.user` (not registered); 503 `billing_unconfigured`; 503 `billing.circuit_open`
/// and 502 `billing.upstream` with `Retry-After` when Polar fails.
pub async fn checkout(
    State(app): State<Arc<App>>,
    State(billing): State<Billing>,
    principal: Principal,
    ApiPath(user_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> Result<Response, Problem> {
    if principal.user != user_id && !principal.has_role(Role::Admin) {
        return Err(Problem::forbidden(format!(
            "the token's subject {} may not buy a subscription for user {user_id}",
            principal.user
        )));
    }
    let svc = service(&billing)?;
    let product = svc.config.products.product_for(body.tier).ok_or_else(|| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "billing.tier_not_for_sale",
            "Tier not for sale",
            format!("the `{}` tier cannot be bought", body.tier.as_str()),
        )
    })?;
    let (user, _) = app.handler.load::<User>(user_id).await?;
    if user.display_name.is_none() {
        return Err(tektree_domain::DomainError::NotFound {
            what: "user",
            id: user_id,
        }
        .into());
    }
    let request = CheckoutCreate {
        products: vec![product.to_string()],
        external_customer_id: user_id.to_string(),
        metadata: [
            (USER_METADATA_KEY.to_string(), user_id.to_string()),
            (
                TIER_METADATA_KEY.to_string(),
                body.tier.as_str().to_string(),
            ),
        ]
        .into(),
        success_url: svc.config.success_url.clone(),
    };
    let checkout = svc
        .client
        .create_checkout(&request)
        .await
        .map_err(|e| upstream_problem(svc, e))?;
    tracing::info!(%user_id, tier = body.tier.as_str(), checkout_id = %checkout.id, "Polar checkout created");
    Ok((
        StatusCode::CREATED,
        Json(CheckoutResponse {
            checkout_id: checkout.id,
            url: checkout.url,
            tier: body.tier,
            expires_at: checkout.expires_at,
        }),
    )
        .into_response())
}

/// Answer of an accepted webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookResponse {
    /// The delivery's `webhook-id`.
    pub webhook_id: String,
    /// `processed` (200; `events` may be empty when nothing changed), `duplicate` (200: this
    /// id was processed before; nothing written) or `ignored` (202: the event needs no
    /// command).
    pub status: String,
    /// Why an event was ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The subscription aggregate (= user id) the command ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_id: Option<Uuid>,
    /// Events committed by the delivery (for a duplicate: by the first delivery).
    #[serde(default)]
    pub events: Vec<CommittedEvent>,
}

fn count(result: &str) {
    metrics::counter!("tektree_polar_webhooks_total", "result" => result.to_string()).increment(1);
}

/// The problem of a refused delivery, counted and logged.
fn refused(p: Problem) -> Problem {
    count(&p.code);
    tracing::warn!(code = %p.code, detail = %p.detail, "Polar webhook refused");
    p
}

fn verification_problem(e: WebhookError) -> Problem {
    let status = match e {
        WebhookError::NoSupportedSignature | WebhookError::SignatureMismatch => {
            StatusCode::FORBIDDEN
        }
        _ => StatusCode::BAD_REQUEST,
    };
    Problem::new(status, e.code(), "Webhook not verified", e.to_string())
}

fn payload_problem(e: events::PayloadError) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        e.code(),
        "Webhook not processable",
        e.to_string(),
    )
}

/// The command of an action (`None` for [`BillingAction::Ignore`]).
/// The command `action` asks for; `event_at` is the webhook event's `timestamp` (tier changes
/// and cancellations older than the last applied one are ignored by the aggregate).
fn command(
    action: BillingAction,
    event_at: Option<DateTime<Utc>>,
) -> Option<(Uuid, SubscriptionCommand)> {
    Some(match action {
        BillingAction::ChangeTier {
            user_id,
            tier,
            polar_subscription_id,
        } => (
            user_id,
            SubscriptionCommand::ChangeTier {
                user_id,
                tier,
                polar_subscription_id: Some(polar_subscription_id),
                polar_event_at: event_at,
            },
        ),
        BillingAction::Cancel {
            user_id,
            polar_subscription_id,
        } => (
            user_id,
            SubscriptionCommand::Cancel {
                user_id,
                polar_subscription_id: Some(polar_subscription_id),
                polar_event_at: event_at,
            },
        ),
        BillingAction::InvoicePaid {
            user_id,
            invoice_id,
            amount_minor,
            currency,
        } => (
            user_id,
            SubscriptionCommand::RecordInvoicePaid {
                user_id,
                invoice_id,
                amount_minor,
                currency,
            },
        ),
        BillingAction::Ignore { .. } => return None,
    })
}

/// The dedupe key of a delivery: `polar-webhook:<webhook-id>`, fingerprint = lowercase hex
/// SHA-256 of the raw body, alive [`WEBHOOK_DEDUPE_TTL`] from `now`.
pub fn dedupe_key(webhook_id: &str, body: &[u8], now: DateTime<Utc>) -> IdempotencyKey {
    let digest = Sha256::new()
        .chain_update(b"polar-webhook\0")
        .chain_update(body)
        .finalize();
    let ttl = chrono::Duration::from_std(WEBHOOK_DEDUPE_TTL).unwrap_or(chrono::Duration::days(30));
    IdempotencyKey {
        key: format!("polar-webhook:{webhook_id}"),
        fingerprint: digest.iter().map(|b| format!("{b:02x}")).collect(),
        created_at: now,
        expires_at: now + ttl,
    }
}

/// `POST /v1/webhooks/polar`: verifies, deduplicates and applies one Polar webhook (module
/// docs; mapping in [`super::events`]). No bearer token: the signature authenticates Polar.
///
/// Answers 200 [`WebhookResponse`] `processed` or `duplicate`, 202 `ignored`.
///
/// # Errors
/// Nothing is written on any error. 400 `webhook.missing_header`, `webhook.malformed_header`,
/// `webhook.stale`, `webhook.future`; 403 `webhook.signature_mismatch`; 413
/// `payload_too_large`; 422 `webhook.invalid_payload`, `webhook.no_user`,
/// `webhook.user_mismatch`, `webhook.unknown_product`, `webhook.unknown_user` (not
/// registered), `invalid` (the command's values); 409 `webhook.id_reused` (same id, other
/// body); 503 `billing_unconfigured`, `store`.
pub async fn webhook(
    State(app): State<Arc<App>>,
    State(billing): State<Billing>,
    correlation: Correlation,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let svc = service(&billing).map_err(refused)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(refused(payload_too_large()));
    }
    let bytes = read_body_limited(body, BODY_LIMIT).await.map_err(refused)?;
    let now = Utc::now();
    let verified = webhook::verify(
        &headers,
        &bytes,
        &svc.config.webhook_secrets,
        svc.config.webhook_tolerance,
        now.timestamp(),
    )
    .map_err(|e| refused(verification_problem(e)))?;
    let event = events::parse(&bytes).map_err(|e| refused(payload_problem(e)))?;
    let action =
        events::action(&event, &svc.config.products).map_err(|e| refused(payload_problem(e)))?;
    let reason = match &action {
        BillingAction::Ignore { reason } => Some(reason.clone()),
        _ => None,
    };
    let Some((user_id, cmd)) = command(action, event.timestamp) else {
        count("ignored");
        tracing::info!(webhook_id = %verified.id, kind = %event.kind, "Polar webhook ignored");
        let resp = WebhookResponse {
            webhook_id: verified.id,
            status: "ignored".into(),
            reason,
            aggregate_id: None,
            events: vec![],
        };
        return Ok((StatusCode::ACCEPTED, Json(resp)).into_response());
    };
    let (user, _) = app
        .handler
        .load::<User>(user_id)
        .await
        .map_err(|e| refused(e.into()))?;
    if user.display_name.is_none() {
        return Err(refused(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "webhook.unknown_user",
            "Webhook not processable",
            format!("user {user_id} is not registered"),
        )));
    }
    let meta = CommandMeta {
        // Stable across redeliveries: the causation id of the events is the webhook.
        command_id: Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            format!("polar:webhook:{}", verified.id).as_bytes(),
        ),
        correlation_id: correlation.0,
        actor: Actor::System(POLAR_ACTOR.into()),
        occurred_at: event.timestamp.unwrap_or(now),
    };
    let key = dedupe_key(&verified.id, &bytes, now);
    let (outcome, replayed) = match app
        .handler
        .submit::<Subscription>(user_id, cmd, &app.rules.quota, &meta, Some(&key))
        .await
    {
        Ok(r) => r,
        Err(CommandError::IdempotencyKeyReused { .. }) => {
            return Err(refused(Problem::new(
                StatusCode::CONFLICT,
                "webhook.id_reused",
                "Webhook id reused",
                "this webhook-id was processed with a different body",
            )))
        }
        Err(e) => return Err(refused(e.into())),
    };
    let status = if replayed { "duplicate" } else { "processed" };
    count(status);
    tracing::info!(
        webhook_id = %verified.id,
        kind = %event.kind,
        %user_id,
        events = outcome.events.len(),
        replayed,
        "Polar webhook applied"
    );
    let resp = WebhookResponse {
        webhook_id: verified.id,
        status: status.into(),
        reason: None,
        aggregate_id: Some(outcome.aggregate_id),
        events: outcome
            .events
            .into_iter()
            .map(CommittedEvent::from)
            .collect(),
    };
    let mut response = (StatusCode::OK, Json(resp)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_keys_fingerprint_the_raw_body() {
        let now = Utc::now();
        let a = dedupe_key("msg_1", br#"{"a":1}"#, now);
        assert_eq!(a.key, "polar-webhook:msg_1");
        assert_eq!(a.fingerprint.len(), 64);
        assert_eq!(
            a.fingerprint,
            dedupe_key("msg_1", br#"{"a":1}"#, now).fingerprint
        );
        assert_ne!(
            a.fingerprint,
            dedupe_key("msg_1", br#"{"a": 1}"#, now).fingerprint
        );
        assert_eq!(a.expires_at - a.created_at, chrono::Duration::days(30));
        assert!(
            dedupe_key(&"m".repeat(webhook::MAX_ID_LEN), b"", now)
                .key
                .len()
                <= tektree_event_store::MAX_KEY_BYTES
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(ceil_secs(Duration::ZERO), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn verification_failures_are_4xx() {
        for e in [
            WebhookError::MissingHeader("webhook-id"),
            WebhookError::Stale {
                age_secs: 301,
                tolerance_secs: 300,
            },
            WebhookError::SignatureMismatch,
        ] {
            assert!(verification_problem(e).status.is_client_error());
        }
    }
}
