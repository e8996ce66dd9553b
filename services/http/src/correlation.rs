//! Correlation ids, the per-request tracing span and HTTP metrics.
//!
//! Every request gets a correlation id: the `X-Correlation-Id` header if it is a UUID, else a
//! new v4 (a header that is present but not a UUID → 400 `invalid_header`). The id is echoed in
//! the response's `X-Correlation-Id`, recorded on the request's span, and becomes the
//! `correlation_id` of every event the request's command (and the policies reacting to it)
//! commits.

use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use uuid::Uuid;

use crate::problem::Problem;

/// Name of the correlation header.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The request's correlation id (set by [`middleware`]; a new one if the middleware did not
/// run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Correlation(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Correlation {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Correlation>()
            .copied()
            .unwrap_or_else(|| Correlation(Uuid::new_v4())))
    }
}

/// Middleware: assigns the correlation id, runs the request in a `http_request` span
/// (`method`, `route`, `correlation_id`), echoes the id, logs the outcome and counts
/// `tektree_http_requests_total{method,route,status}` and
/// `tektree_http_request_duration_seconds{method,route}`.
pub async fn middleware(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let header = req
        .headers()
        .get(CORRELATION_HEADER)
        .map(|v| v.to_str().ok().and_then(|s| Uuid::parse_str(s.trim()).ok()));
    let span = tracing::info_span!(
        "http_request",
        method = %method,
        route = %route,
        correlation_id = tracing::field::Empty,
    );
    let resp = match header {
        Some(None) => {
            Problem::invalid_header("the X-Correlation-Id header is not a UUID").into_response()
        }
        _ => {
            let id = header.flatten().unwrap_or_else(Uuid::new_v4);
            span.record("correlation_id", tracing::field::display(id));
            req.extensions_mut().insert(Correlation(id));
            let mut resp = next.run(req).instrument(span.clone()).await;
            if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
                resp.headers_mut().insert(CORRELATION_HEADER, v);
            }
            resp
        }
    };
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request finished"
        )
    });
    metrics::counter!("tektree_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
    .increment(1);
    metrics::histogram!("tektree_http_request_duration_seconds",
        "method" => method, "route" => route)
    .record(elapsed.as_secs_f64());
    resp
}
