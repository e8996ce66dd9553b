//! The API's security settings ([`Security`]: authenticator, rate limiter, CORS allow-list)
//! and the guard every command request passes before its handler ([`command_guard`]).
//!
//! The guard runs, in this order, so that cheap refusals come first and no work is spent on a
//! request that a cheaper check refuses:
//! 1. **size**: the body is read up to [`BODY_LIMIT`] bytes; a
//!    `Content-Length` over it, or a longer (chunked) body, is refused with 413
//!    `payload_too_large` before the token is looked at;
//! 2. **authentication**: the bearer token is verified (401 `unauthenticated`);
//! 3. **rate limit**: the caller's tier comes from their subscription aggregate
//!    ([`CommandHandler::tier_of`](tektree_commands::CommandHandler::tier_of), the same source
//!    as the quota's) and one request is counted against the tier's bucket (429 `rate_limited`
//!    with `Retry-After`; issue #4).
//!
//! The handler then reads the already verified [`Principal`] from the request's extensions.

use std::fmt;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tektree_runtime::app::App;

use crate::auth::Authenticator;
use crate::cors::CorsOrigins;
use crate::identity::Principal;
use crate::problem::Problem;
use crate::ratelimit::{RateLimiter, RateLimits};
use crate::BODY_LIMIT;

/// Authentication, rate limits and CORS of one API (held by the API's state, `ApiState::security`
/// of `tektree-services`).
#[derive(Clone)]
pub struct Security {
    /// Verifies bearer tokens.
    pub auth: Authenticator,
    /// Per-user, per-tier command rate limits.
    pub rate_limiter: RateLimiter,
    /// CORS allow-list (empty = no CORS headers).
    pub cors: CorsOrigins,
}

impl fmt::Debug for Security {
    /// Never shows keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Security")
            .field("auth", &self.auth)
            .field("rate_limiter", &self.rate_limiter)
            .field("cors", &self.cors)
            .finish()
    }
}

impl Security {
    /// The library default of `ApiState::new`: HS256 with a random secret known only to this
    /// value ([`Authenticator::ephemeral`]; mint tokens with `state.security.auth.mint(…)`),
    /// issue #4's rate limits in memory, no CORS. The `tektree` binary replaces it from its
    /// options (docs/config.md).
    pub fn ephemeral() -> Self {
        Security {
            auth: Authenticator::ephemeral(),
            rate_limiter: RateLimiter::in_memory(RateLimits::default()),
            cors: CorsOrigins::none(),
        }
    }
}

/// 413 `payload_too_large` for a body over [`BODY_LIMIT`].
pub fn payload_too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "Payload too large",
        format!("the request body exceeds the limit of {BODY_LIMIT} bytes"),
    )
}

/// Reads `body` completely if it is at most `limit` bytes.
///
/// # Errors
/// 413 `payload_too_large` as soon as more than `limit` bytes arrived; 400 `unreadable_body`
/// when the body stream fails.
pub async fn read_body_limited(body: Body, limit: usize) -> Result<Bytes, Problem> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                "Unreadable request body",
                format!("the body could not be read: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(payload_too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Middleware of the command routes: size, then authentication, then rate limit (module
/// docs). Passes the request on with its body buffered and the [`Principal`] in its
/// extensions.
pub async fn command_guard(
    State(app): State<Arc<App>>,
    State(security): State<Arc<Security>>,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return payload_too_large().into_response();
    }
    let bytes = match read_body_limited(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let principal = match security.auth.authenticate(&parts.headers) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Err(p) = security
        .rate_limiter
        .check(&app.handler, principal.user)
        .await
    {
        return p.into_response();
    }
    parts.extensions.insert::<Principal>(principal);
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
