//! Operator endpoints (issue #4): dead letters and projection rebuilds over HTTP.
//!
//! They reuse what `tektree-replay` runs ([`worker::redrive`], [`replay::rebuild`]) but inside
//! the API process, so they also reach the dead letters of the in-process bus of
//! `tektree serve`, which no other process can see. Access by role (401 without a valid token,
//! 403 `forbidden` with too low a role):
//!
//! | Method | Path | Role |
//! |---|---|---|
//! | GET | `/v1/admin/dead-letters?group=&limit=` | `moderator` or `admin` |
//! | POST | `/v1/admin/dead-letters/{id}/redrive` | `admin` |
//! | POST | `/v1/admin/projections/{name}/rebuild` | `admin` |

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tektree_domain::EventEnvelope;
use tektree_projections::{Projection, UnknownProjection};

use super::extract::{ApiPath, ApiQuery};
use super::identity::{Admin, Moderator};
use super::problem::Problem;
use crate::app::App;
use crate::replay::{self, ReplayError};
use crate::worker::{self, Processed, RedriveError};

/// Default page size of `GET /v1/admin/dead-letters`.
pub const DEFAULT_DEAD_LETTER_LIMIT: usize = 100;
/// Largest page size of `GET /v1/admin/dead-letters`.
pub const MAX_DEAD_LETTER_LIMIT: usize = 1000;

/// `?group=&limit=` of `GET /v1/admin/dead-letters`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeadLetterQuery {
    /// Only this consumer group (`xp`, `policy.gamification`, …); default every group.
    pub group: Option<String>,
    /// 1..=1000, default 100.
    pub limit: Option<usize>,
}

/// One dead letter: an event a consumer group gave up on after its delivery limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterView {
    /// Id on the bus (pass it to the redrive endpoint).
    pub id: String,
    /// The consumer group that gave up.
    pub group: String,
    /// The last error.
    pub reason: String,
    /// How many deliveries had failed.
    pub delivery_count: u64,
    /// The event.
    pub envelope: EventEnvelope,
}

/// `GET /v1/admin/dead-letters` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterPage {
    /// Oldest first, at most `limit`.
    pub dead_letters: Vec<DeadLetterView>,
}

/// `POST /v1/admin/dead-letters/{id}/redrive` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedriveResponse {
    /// The dead letter, now removed from the bus.
    pub id: String,
    /// `applied`, or `duplicate` when its group had applied it already.
    pub result: String,
}

/// `POST /v1/admin/projections/{name}/rebuild` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildResponse {
    /// The projection.
    pub projection: String,
    /// Events replayed into the new version by this call (fewer than stored when it resumed
    /// a rebuild left in progress).
    pub events: u64,
    /// The new version's generation (1 for the first rebuild of the projection, then 2, …).
    pub generation: u64,
    /// The position it resumed from (0 for a new rebuild).
    pub resumed_from: u64,
}

/// `GET /v1/admin/dead-letters?group=&limit=` (moderator or admin).
///
/// # Errors
/// 401/403; 400 `invalid_query` for a limit outside 1..=1000 or an unknown group; 503 `bus`.
pub async fn dead_letters(
    State(app): State<Arc<App>>,
    _: Moderator,
    ApiQuery(q): ApiQuery<DeadLetterQuery>,
) -> Result<Json<DeadLetterPage>, Problem> {
    let limit = q.limit.unwrap_or(DEFAULT_DEAD_LETTER_LIMIT);
    if !(1..=MAX_DEAD_LETTER_LIMIT).contains(&limit) {
        return Err(Problem::invalid_query(format!(
            "limit must be 1..={MAX_DEAD_LETTER_LIMIT}, got {limit}"
        )));
    }
    if let Some(g) = &q.group {
        if app.consumer(g).is_none() {
            return Err(Problem::invalid_query(format!(
                "unknown group {g:?}: expected xp, leaderboard, quota, content, policy.gamification or policy.subscription"
            )));
        }
    }
    let list = app
        .bus
        .dead_letters(q.group.as_deref(), limit)
        .await
        .map_err(|e| Problem::unavailable("bus", &e))?;
    Ok(Json(DeadLetterPage {
        dead_letters: list
            .into_iter()
            .map(|d| DeadLetterView {
                id: d.id,
                group: d.group,
                reason: d.reason,
                delivery_count: d.delivery_count,
                envelope: d.envelope,
            })
            .collect(),
    }))
}

/// `POST /v1/admin/dead-letters/{id}/redrive` (admin): applies the dead letter for its group
/// as the live worker would and removes it ([`worker::redrive`]).
///
/// # Errors
/// 401/403; 404 `not_found` for an unknown id; 409 `redrive.gap` when an earlier event of the
/// aggregate is not applied yet, `redrive.failed` when it fails again, `redrive.unknown_group`
/// when no consumer has its group; 503 `bus`. The dead letter stays on the bus on any error.
pub async fn redrive(
    State(app): State<Arc<App>>,
    Admin(admin): Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RedriveResponse>, Problem> {
    let conflict = |code: &str, e: &RedriveError| {
        Problem::new(
            StatusCode::CONFLICT,
            code,
            "Re-drive refused",
            e.to_string(),
        )
    };
    let result = worker::redrive(&app, &id).await.map_err(|e| match &e {
        RedriveError::NotFound(_) => Problem::not_found(e.to_string()),
        RedriveError::Gap(_) => conflict("redrive.gap", &e),
        RedriveError::Failed(_) => conflict("redrive.failed", &e),
        RedriveError::UnknownGroup(_) => conflict("redrive.unknown_group", &e),
        RedriveError::Backend(_) => Problem::unavailable("bus", &e),
    })?;
    let result = match result {
        Processed::Duplicate => "duplicate",
        _ => "applied",
    };
    tracing::info!(dead_letter = %id, result, admin = %admin.user, "dead letter re-driven");
    Ok(Json(RedriveResponse {
        id,
        result: result.into(),
    }))
}

/// `POST /v1/admin/projections/{name}/rebuild` (admin): rebuilds the projection beside its
/// live read model and switches to it ([`replay::rebuild_beside`]; queries keep the live
/// version until then), answering when done. The rebuild runs in its own task, so it
/// completes even if the client disconnects; a rebuild left in progress (by this endpoint or
/// `tektree-replay rebuild`) is resumed.
///
/// # Errors
/// 401/403; 404 `not_found` for a name other than a projection's; 503 `store` /
/// `read_models`; 500 `decode` for an undecodable stored event, `history` for a broken
/// stored history (the rebuild stays in progress, unswitched).
pub async fn rebuild(
    State(app): State<Arc<App>>,
    Admin(admin): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<RebuildResponse>, Problem> {
    let projection: Projection = name
        .parse()
        .map_err(|e: UnknownProjection| Problem::not_found(e.to_string()))?;
    let (store, read_models) = (app.store.clone(), app.read_models.clone());
    tracing::info!(projection = %name, admin = %admin.user, "rebuild requested");
    let report = tokio::spawn(async move {
        replay::rebuild_beside(store.as_ref(), read_models.as_ref(), projection, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .await
    })
    .await
    .map_err(|e| Problem::internal("rebuild", &e))?
    .map_err(|e| match e {
        ReplayError::Store(s) => s.into(),
        ReplayError::ReadModels(r) => r.into(),
        e @ ReplayError::Decode { .. } => Problem::internal("decode", &e),
        e @ ReplayError::History { .. } => Problem::internal("history", &e),
    })?;
    tracing::info!(projection = %name, events = report.events, generation = report.generation,
        "rebuild done");
    Ok(Json(RebuildResponse {
        projection: name,
        events: report.events,
        generation: report.generation,
        resumed_from: report.resumed_from,
    }))
}
