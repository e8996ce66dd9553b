//! The HTTP API (axum): commands, read-model queries, health, projection status and metrics.
//!
//! See `docs/api.md` for the contract. In short:
//! - authentication: commands need `Authorization: Bearer <JWT>` ([`auth`], [`identity`]);
//!   queries are open; admin endpoints need the `moderator` or `admin` role ([`admin`]);
//! - commands pass [`security::command_guard`]: body size, then token, then the per-user
//!   rate limit of the caller's tier ([`ratelimit`]; 429 `rate_limited`);
//! - CORS only for the configured allow-list ([`cors`]);
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
//! | PATCH | `/v1/users/{id}` | [`users::update_profile`] (the user or an admin) |
//! | POST | `/v1/sessions` | [`users::open_session`] |
//! | POST | `/v1/users/{id}/email/verify` | [`users::verify_email`] |
//! | POST | `/v1/areas` | [`knowledge::create_area`] (moderator, admin) |
//! | POST | `/v1/discussions` | [`knowledge::start_discussion`] |
//! | POST | `/v1/insights` | [`knowledge::share_insight`] |
//! | POST | `/v1/resources` | [`knowledge::upload_resource`] |
//! | POST | `/v1/content/{id}/likes` | [`knowledge::like`] |
//! | GET | `/v1/users/{id}/achievements` | [`achievements::user_achievements`] |
//! | GET | `/v1/users/{id}/xp` | [`queries::user_xp`] |
//! | GET | `/v1/users/{id}/quota` | [`queries::user_quota`] |
//! | GET | `/v1/leaderboards/{board}` | [`queries::leaderboard`] |
//! | GET | `/v1/leaderboards/{board}/users/{id}` | [`queries::rank`] |
//! | GET | `/v1/content/{id}` | [`queries::content`] |
//! | GET | `/v1/tags/{tag}` | [`queries::tag`] |
//! | GET | `/v1/projections` | [`status::projections`] |
//! | GET | `/healthz` | [`status::healthz`] |
//! | GET | `/metrics` | [`metrics::metrics`] |
//! | GET | `/v1/admin/dead-letters` | [`admin::dead_letters`] (moderator, admin) |
//! | POST | `/v1/admin/dead-letters/{id}/redrive` | [`admin::redrive`] (admin) |
//! | POST | `/v1/admin/projections/{name}/rebuild` | [`admin::rebuild`] (admin) |
//! | POST | `/v1/subscriptions/{user}/checkout` | [`billing::routes::checkout`] (the user or an admin) |
//! | POST | `/v1/webhooks/polar` | [`billing::routes::webhook`] (Polar's signature, no token) |
//! | GET (WebSocket) | `/ws/notifications` | [`live::socket::notifications`] (token; `docs/live.md`) |
//! | GET (WebSocket) | `/ws/leaderboard?board=` | [`live::socket::leaderboard`] (token; `docs/live.md`) |

pub mod achievements;
pub mod admin;
pub mod commands;
pub mod knowledge;
pub mod metrics;
pub mod queries;
pub mod state;
pub mod status;
pub mod users;

// The building blocks (crate `tektree-http`), under their old paths.
pub use tektree_http::{
    auth, board, correlation, cors, extract, fresh, idempotency, identity, problem, ratelimit,
    security, BODY_LIMIT,
};

use std::future::Future;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{get, patch, post, MethodRouter};
use axum::Router;
use tokio::net::TcpListener;

pub use self::state::ApiState;
use crate::billing;
use crate::live;

/// The API's router over `state`, secured by `state.security` (see [`security`]).
///
/// Installs the process-wide Prometheus recorder on first call (see [`metrics::handle`]), so
/// that metrics recorded before the first scrape are kept.
pub fn router(state: ApiState) -> Router {
    let _ = metrics::handle();
    let cors = state.security.cors.layer();
    let router = Router::new()
        .route("/v1/users", command(&state, commands::register))
        .route("/v1/questions", command(&state, commands::post_question))
        .route(
            "/v1/questions/{id}/answers",
            command(&state, commands::submit_answer),
        )
        .route(
            "/v1/questions/{id}/accept",
            command(&state, commands::accept_answer),
        )
        .route(
            "/v1/content/{id}/comments",
            command(&state, commands::add_comment),
        )
        .route("/v1/content/{id}/votes", command(&state, commands::vote))
        .route(
            "/v1/users/{id}",
            guarded(&state, patch(users::update_profile)),
        )
        .route("/v1/sessions", command(&state, users::open_session))
        .route(
            "/v1/users/{id}/email/verify",
            command(&state, users::verify_email),
        )
        .route("/v1/areas", command(&state, knowledge::create_area))
        .route(
            "/v1/discussions",
            command(&state, knowledge::start_discussion),
        )
        .route("/v1/insights", command(&state, knowledge::share_insight))
        .route("/v1/resources", command(&state, knowledge::upload_resource))
        .route("/v1/content/{id}/likes", command(&state, knowledge::like))
        .route(
            "/v1/users/{id}/achievements",
            get(achievements::user_achievements),
        )
        .merge(queries::routes())
        .route("/v1/projections", get(status::projections))
        .route("/v1/admin/dead-letters", get(admin::dead_letters))
        .route("/v1/admin/dead-letters/{id}/redrive", post(admin::redrive))
        .route("/v1/admin/projections/{name}/rebuild", post(admin::rebuild))
        .route("/healthz", get(status::healthz))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/v1/subscriptions/{user}/checkout",
            command(&state, billing::routes::checkout),
        )
        .route("/v1/webhooks/polar", post(billing::routes::webhook))
        .route("/ws/notifications", get(live::socket::notifications))
        .route("/ws/leaderboard", get(live::socket::leaderboard))
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(correlation::middleware))
        .with_state(state);
    // Outermost, so that preflights are answered before anything else and every answer to an
    // allowed origin (errors included) carries the CORS headers.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// `POST handler` behind [`security::command_guard`] (size → token → rate limit). Only the
/// POST endpoint is guarded, so other methods still get 405.
fn command<H, T>(state: &ApiState, handler: H) -> MethodRouter<ApiState>
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    guarded(state, post(handler))
}

/// `method_router` behind [`security::command_guard`] (for commands on other methods than
/// POST, such as `PATCH /v1/users/{id}`).
fn guarded(state: &ApiState, method_router: MethodRouter<ApiState>) -> MethodRouter<ApiState> {
    method_router.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        security::command_guard,
    ))
}

/// Serves [`router`] on `listener` until `shutdown` completes, then finishes in-flight
/// requests (graceful shutdown).
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    state: ApiState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP API listening");
    }
    // Dropped (and so stopped) when serving ends.
    let purger = tokio::spawn(idempotency::purge_forever(state.app.store.clone()));
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    purger.abort();
    served
}
