//! Polar API client: checkout creation, through a [`CircuitBreaker`].
//!
//! Endpoint (Polar API reference, *Checkouts → Create Checkout Session*):
//! `POST {base}/v1/checkouts/` with `Authorization: Bearer <organization access token>` (scope
//! `checkouts:write`) and a JSON body [`CheckoutCreate`]; `201 Created` with the checkout
//! object ([`Checkout`]: `id`, `url`, `status`, `expires_at`, …). Base URLs: production
//! [`PRODUCTION_API`], sandbox [`SANDBOX_API`].
//!
//! Errors are classified for the breaker ([`Outcome`]): 429 and 5xx, time-outs and connection
//! errors are retried and count as failures; other 4xx (our request or token was refused) are
//! neither retried nor counted against Polar's health. Retrying a checkout creation after a
//! time-out may create a second checkout session; that is harmless (an unused session expires
//! and charges nothing).
//!
//! Metrics: `tektree_polar_requests_total{operation, status}` per attempt (`status` = the HTTP
//! status code, `transport` or `decode`), besides the breaker's (see [`super::breaker`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, ACCEPT, RETRY_AFTER};
use serde::{Deserialize, Serialize};

use super::breaker::{BreakerConfig, CallError, CircuitBreaker, Outcome};

/// Polar's production API.
pub const PRODUCTION_API: &str = "https://api.polar.sh";
/// Polar's sandbox API (test payments).
pub const SANDBOX_API: &str = "https://sandbox-api.polar.sh";
/// Longest upstream error body kept (for logs), in bytes.
const MAX_ERROR_BODY: usize = 512;

/// Body of `POST /v1/checkouts/` (the fields we send; Polar accepts more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutCreate {
    /// Product ids offered; the first is selected. We send exactly one: the tier's product.
    pub products: Vec<String>,
    /// Our id of the customer (the TekTree user id): Polar creates or finds the customer with
    /// this `external_id` and echoes it as `customer.external_id` in webhooks.
    pub external_customer_id: String,
    /// Key-value metadata; Polar copies a checkout's metadata to the resulting order and
    /// subscription (we set `tektree_user_id` and `tektree_tier`).
    pub metadata: BTreeMap<String, String>,
    /// Where Polar sends the customer after paying (may contain `{CHECKOUT_ID}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_url: Option<String>,
}

/// The checkout object of Polar's answer (fields we read; others are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    /// Checkout session id.
    pub id: String,
    /// Hosted checkout page to send the customer to.
    pub url: String,
    /// `open`, `expired`, `confirmed`, `succeeded` or `failed`.
    pub status: String,
    /// When the session expires (ISO 8601, UTC).
    pub expires_at: DateTime<Utc>,
    /// The selected product.
    #[serde(default)]
    pub product_id: Option<String>,
}

/// A failed attempt at a Polar call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolarError {
    /// Polar answered with a non-2xx status.
    #[error("Polar answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// `Retry-After` (seconds form), if sent.
        retry_after: Option<Duration>,
        /// The start of the body (for logs; never shown to API clients).
        body: String,
    },
    /// No answer: connection refused or reset, DNS, TLS.
    #[error("Polar unreachable: {0}")]
    Transport(String),
    /// A 2xx whose body is not the documented shape.
    #[error("unexpected Polar response: {0}")]
    Decode(String),
}

impl Outcome for PolarError {
    /// 429, 5xx and transport errors.
    fn is_retryable(&self) -> bool {
        match self {
            PolarError::Status { status, .. } => *status == 429 || *status >= 500,
            PolarError::Transport(_) => true,
            PolarError::Decode(_) => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            PolarError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Polar client: base URL, access token, HTTP client, breaker. Cheap to clone.
#[derive(Clone)]
pub struct PolarClient {
    http: reqwest::Client,
    base_url: String,
    token: Arc<str>,
    breaker: Arc<CircuitBreaker>,
}

impl std::fmt::Debug for PolarClient {
    /// Never shows the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolarClient")
            .field("base_url", &self.base_url)
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// `Retry-After` in its delay-seconds form (RFC 9110 §10.2.3); the date form is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

impl PolarClient {
    /// A client of the API at `base_url` (no trailing slash needed) with `token`, its calls
    /// under a breaker named `polar` with `breaker` settings. Connecting is limited to the
    /// per-attempt time limit; redirects are not followed (the API does not redirect, and the
    /// bearer token must not travel elsewhere).
    ///
    /// # Errors
    /// The HTTP client could not be built (TLS initialisation).
    pub fn new(base_url: &str, token: &str, breaker: BreakerConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(breaker.call_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tektree/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(PolarClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            token: token.into(),
            breaker: Arc::new(CircuitBreaker::new("polar", breaker)),
        })
    }

    /// The breaker of this client's calls.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The API base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Creates a checkout session (`POST /v1/checkouts/`).
    ///
    /// # Errors
    /// [`CallError::Open`] without calling Polar when the breaker is open; the last attempt's
    /// [`CallError::Timeout`] or [`CallError::Failed`] ([`PolarError`]) otherwise.
    pub async fn create_checkout(
        &self,
        request: &CheckoutCreate,
    ) -> Result<Checkout, CallError<PolarError>> {
        let url = format!("{}/v1/checkouts/", self.base_url);
        self.breaker
            .call(|| async {
                let result = self.post_once::<Checkout>(&url, request).await;
                let status = match &result {
                    Ok(_) => "201".to_string(),
                    Err(PolarError::Status { status, .. }) => status.to_string(),
                    Err(PolarError::Transport(_)) => "transport".into(),
                    Err(PolarError::Decode(_)) => "decode".into(),
                };
                metrics::counter!("tektree_polar_requests_total", "operation" => "create_checkout", "status" => status).increment(1);
                result
            })
            .await
    }

    async fn post_once<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &impl Serialize,
    ) -> Result<T, PolarError> {
        let resp = self
            .http
            .post(url)
            .bearer_auth(&*self.token)
            .header(ACCEPT, "application/json")
            .json(body)
            .send()
            .await
            .map_err(|e| PolarError::Transport(e.without_url().to_string()))?;
        let status = resp.status();
        let hint = retry_after(resp.headers());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| PolarError::Transport(e.without_url().to_string()))?;
        if !status.is_success() {
            let mut body = String::from_utf8_lossy(&bytes).into_owned();
            if body.len() > MAX_ERROR_BODY {
                let mut end = MAX_ERROR_BODY;
                while !body.is_char_boundary(end) {
                    end -= 1;
                }
                body.truncate(end);
            }
            return Err(PolarError::Status {
                status: status.as_u16(),
                retry_after: hint,
                body,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| PolarError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_for_the_breaker() {
        let status = |s: u16| PolarError::Status {
            status: s,
            retry_after: None,
            body: String::new(),
        };
        for s in [429, 500, 502, 503, 504] {
            assert!(status(s).is_retryable() && status(s).is_failure(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422] {
            assert!(!status(s).is_retryable() && !status(s).is_failure(), "{s}");
        }
        assert!(PolarError::Transport("reset".into()).is_failure());
        assert!(!PolarError::Decode("x".into()).is_retryable());
        let throttled = PolarError::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
            body: String::new(),
        };
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn retry_after_reads_delay_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn the_checkout_body_has_polars_field_names_and_the_answer_decodes() {
        let body = CheckoutCreate {
            products: vec!["prod_1".into()],
            external_customer_id: "u".into(),
            metadata: BTreeMap::from([("tektree_user_id".into(), "u".into())]),
            success_url: None,
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"products": ["prod_1"], "external_customer_id": "u",
                               "metadata": {"tektree_user_id": "u"}})
        );
        let answer = serde_json::json!({
            "id": "c1", "url": "https://polar.sh/checkout/x", "status": "open",
            "expires_at": "2023-11-07T05:31:56Z", "client_secret": "s", "amount": 123,
            "product_id": "prod_1"
        });
        let c: Checkout = serde_json::from_value(answer).unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.product_id.as_deref(), Some("prod_1"));
    }
}
