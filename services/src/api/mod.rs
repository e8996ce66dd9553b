//! The HTTP API (axum): commands, read-model queries, health, projection status and metrics.
//!
//! See `docs/api.md` for the contract. In short:
//! - identity: `X-User-Id: <uuid>` ([`identity`]);
//! - correlation: `X-Correlation-Id: <uuid>` or a new one, echoed ([`correlation`]);
//! - commands answer 201 with the committed events, 200 for an idempotent repeat
//!   ([`commands`]); questions, answers and comments over quota are refused with 429
//!   ([`quota`]);
//! - every error is `application/problem+json` ([`problem`]);
//! - request bodies are limited to [`BODY_LIMIT`] bytes.
//!
//! | Method | Path | Handler |
//! |---|---|---|
//! | POST | `/v1/users` | [`commands::register`] |
//! | POST | `/v1/questions` | [`commands::post_question`] |
//! | POST | `/v1/questions/{id}/answers` | [`commands::submit_answer`] |
//! | POST | `/v1/questions/{id}/accept` | [`commands::accept_answer`] |
//! | POST | `/v1/content/{id}/comments` | [`commands::add_comment`] |
//! | POST | `/v1/content/{id}/votes` | [`commands::vote`] |
//! | GET | `/v1/users/{id}/xp` | [`queries::user_xp`] |
//! | GET | `/v1/users/{id}/quota` | [`queries::user_quota`] |
//! | GET | `/v1/leaderboards/{board}` | [`queries::leaderboard`] |
//! | GET | `/v1/leaderboards/{board}/users/{id}` | [`queries::rank`] |
//! | GET | `/v1/content/{id}` | [`queries::content`] |
//! | GET | `/v1/projections` | [`status::projections`] |
//! | GET | `/healthz` | [`status::healthz`] |
//! | GET | `/metrics` | [`metrics::metrics`] |

pub mod board;
pub mod commands;
pub mod correlation;
pub mod extract;
pub mod identity;
pub mod metrics;
pub mod problem;
pub mod queries;
pub mod quota;
pub mod status;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::app::App;

/// Largest accepted request body: 64 KiB. Larger bodies are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The API's router over `app`.
///
/// Installs the process-wide Prometheus recorder on first call (see [`metrics::handle`]), so
/// that metrics recorded before the first scrape are kept.
pub fn router(app: App) -> Router {
    let _ = metrics::handle();
    Router::new()
        .route("/v1/users", post(commands::register))
        .route("/v1/questions", post(commands::post_question))
        .route("/v1/questions/{id}/answers", post(commands::submit_answer))
        .route("/v1/questions/{id}/accept", post(commands::accept_answer))
        .route("/v1/content/{id}/comments", post(commands::add_comment))
        .route("/v1/content/{id}/votes", post(commands::vote))
        .route("/v1/users/{id}/xp", get(queries::user_xp))
        .route("/v1/users/{id}/quota", get(queries::user_quota))
        .route("/v1/leaderboards/{board}", get(queries::leaderboard))
        .route("/v1/leaderboards/{board}/users/{id}", get(queries::rank))
        .route("/v1/content/{id}", get(queries::content))
        .route("/v1/projections", get(status::projections))
        .route("/healthz", get(status::healthz))
        .route("/metrics", get(metrics::metrics))
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(correlation::middleware))
        .with_state(Arc::new(app))
}

/// Serves [`router`] on `listener` until `shutdown` completes, then finishes in-flight
/// requests (graceful shutdown).
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    app: App,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP API listening");
    }
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}
