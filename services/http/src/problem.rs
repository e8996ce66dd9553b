//! RFC 9457 problem details: the one error shape of the API.
//!
//! Every error response has `Content-Type: application/problem+json` and the body
//! `{"type","title","status","detail"}`, where `type` is
//! `https://tektree.dev/problems/<code>` and `<code>` is a stable reason code
//! (`malformed_json`, `not_found.question`, `quota_exceeded`, …; see `docs/api.md`).
//! Server-side failures (5xx) carry a short fixed `detail`; the cause is logged, not returned.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tektree_commands::CommandError;
use tektree_domain::DomainError;
use tektree_event_store::StoreError;
use tektree_projections::ReadModelError;

/// Prefix of every problem `type` URI.
pub const PROBLEM_TYPE_BASE: &str = "https://tektree.dev/problems/";

/// Media type of problem responses.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// An error response (RFC 9457 problem details).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable reason code; the suffix of the `type` URI.
    pub code: String,
    /// Short, human-readable summary of the problem type.
    pub title: String,
    /// Explanation specific to this occurrence.
    pub detail: String,
    /// `Retry-After` in seconds, if the client should retry later.
    pub retry_after: Option<u64>,
    /// RFC 9457 extension members, serialised beside the standard ones (for example the
    /// checkpoints of a `stale_read_model` problem); boxed, so that a `Result<_, Problem>`
    /// stays small.
    pub extensions: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

/// The JSON body of a [`Problem`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemBody {
    /// `https://tektree.dev/problems/<code>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// Explanation specific to this occurrence.
    pub detail: String,
    /// Extension members ([`Problem::extensions`]), at the top level of the object.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem with `status`, reason `code`, `title` and `detail`.
    pub fn new(
        status: StatusCode,
        code: impl Into<String>,
        title: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            code: code.into(),
            title: title.into(),
            detail: detail.into(),
            retry_after: None,
            extensions: None,
        }
    }

    /// Adds the extension member `name` (one of RFC 9457 §3.2; never a standard member name).
    pub fn with_extension(mut self, name: &str, value: serde_json::Value) -> Self {
        self.extensions
            .get_or_insert_with(Default::default)
            .insert(name.to_string(), value);
        self
    }

    /// Adds a `Retry-After` header of `seconds`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 404 `not_found`: a route or a read-model row that does not exist.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", "Not found", detail)
    }

    /// 400 `invalid_path`: a path segment is malformed (not a UUID, unknown board, …).
    pub fn invalid_path(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "Invalid path parameter",
            detail,
        )
    }

    /// 400 `invalid_query`: a query parameter is malformed or out of range.
    pub fn invalid_query(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "Invalid query parameter",
            detail,
        )
    }

    /// 400 `invalid_header`: a request header is malformed.
    pub fn invalid_header(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            "Invalid request header",
            detail,
        )
    }

    /// 401 `unauthenticated`: the caller's identity is missing or invalid.
    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Unauthenticated",
            detail,
        )
    }

    /// 403 `forbidden`: the caller may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 503 with reason `code` and a fixed, non-revealing detail; `cause` is only logged.
    pub fn unavailable(code: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(code, error = %cause, "backend unavailable");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "Service unavailable",
            "storage is temporarily unavailable; retry later",
        )
    }

    /// 500 with reason `code` and a fixed detail; `cause` is only logged.
    pub fn internal(code: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(code, error = %cause, "internal error");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code,
            "Internal server error",
            "the server failed to process the request",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            type_uri: format!("{PROBLEM_TYPE_BASE}{}", self.code),
            title: self.title.clone(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            extensions: self.extensions.as_deref().cloned().unwrap_or_default(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<DomainError> for Problem {
    /// `Invalid` → 422, `NotFound` → 404, `Conflict` → 409, `Forbidden` → 403, `Lookup` → 503.
    fn from(e: DomainError) -> Self {
        let code = e.code();
        match e {
            DomainError::Invalid(m) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, "Invalid command", m)
            }
            DomainError::NotFound { what, id } => Problem::new(
                StatusCode::NOT_FOUND,
                code,
                "Referenced entity not found",
                format!("{what} {id} does not exist"),
            ),
            DomainError::Conflict(m) => Problem::new(StatusCode::CONFLICT, code, "Conflict", m),
            DomainError::Forbidden(m) => Problem::new(StatusCode::FORBIDDEN, code, "Forbidden", m),
            DomainError::Lookup(m) => Problem::unavailable(&code, &m),
        }
    }
}

impl From<CommandError> for Problem {
    /// Rejections as [`DomainError`]; exhausted retries → 409; a reused idempotency key → 422;
    /// a post over the quota → 429 `quota_exceeded` with `Retry-After`; store failures → 503;
    /// undecodable or corrupt stored events → 500.
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Rejected(d) => d.into(),
            CommandError::Conflict { aggregate, attempts } => Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "Concurrent modification",
                format!(
                    "{aggregate} kept changing concurrently ({attempts} attempts); retry the request"
                ),
            ),
            e @ CommandError::Decode { .. } => Problem::internal(&e.code(), &e),
            CommandError::IdempotencyKeyReused { .. } => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency key reused",
                "this Idempotency-Key was used for a different request within its lifetime; \
                 use a new key for a new request",
            ),
            CommandError::QuotaExceeded(q) => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                "Quota exceeded",
                q.to_string(),
            )
            .with_retry_after(q.retry_after_secs),
            CommandError::Store(s) => s.into(),
        }
    }
}

impl From<StoreError> for Problem {
    /// Backend failures → 503 `store`; corrupt rows → 500 `store`; a stray conflict → 409.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "Concurrent modification",
                "the aggregate changed concurrently; retry the request",
            ),
            e @ StoreError::Corrupt { .. } => Problem::internal("store", &e),
            // The command handler resolves this case itself; seeing it here is a bug.
            e @ StoreError::IdempotencyKeyExists { .. } => Problem::internal("store", &e),
            e @ StoreError::Backend(_) => Problem::unavailable("store", &e),
        }
    }
}

impl From<ReadModelError> for Problem {
    /// Backend failures → 503 `read_models`; invalid arguments → 400 `invalid_query`.
    fn from(e: ReadModelError) -> Self {
        match e {
            ReadModelError::Invalid(m) => Problem::invalid_query(m),
            e @ ReadModelError::Backend(_) => Problem::unavailable("read_models", &e),
        }
    }
}

/// Fallback for unknown routes: 404 `not_found`.
pub async fn route_not_found() -> Problem {
    Problem::not_found("no such route")
}

/// Fallback for a known route with an unsupported method: 405 `method_not_allowed`
/// (axum adds the `Allow` header).
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
        "this route does not support the request method",
    )
}
