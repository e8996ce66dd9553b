//! Operational endpoints: liveness (`/healthz`) and consumer progress (`/v1/projections`).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::problem::Problem;
use crate::app::{App, AppError};

/// `GET /healthz` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `degraded` when a consumer is stalled (failures are 503 problems).
    pub status: String,
    /// The stalled consumers (absent when none): lag > 0 and no progress for the stall
    /// threshold ([`tektree_runtime::progress`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stalled: Vec<String>,
}

/// Progress of one consumer in [`ProjectionsStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    /// Consumer name (`xp`, `leaderboard`, `quota`, `content`, `tags`, `policy.gamification`,
    /// `policy.subscription`, `live`).
    pub name: String,
    /// Every event with position ≤ this has been applied (0 before the first).
    pub checkpoint: u64,
    /// Number of events applied.
    pub applied: u64,
    /// `head_position − checkpoint`: events committed but not yet applied.
    pub lag: u64,
    /// Whether the consumer is stalled: lag > 0 and the checkpoint unmoved for the stall
    /// threshold (`--stall-after-secs`, default 10).
    pub stalled: bool,
    /// With `stalled`: seconds since the checkpoint last moved (as observed by this process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_for_secs: Option<u64>,
}

/// `GET /v1/projections` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionsStatus {
    /// The store's highest committed position.
    pub head_position: u64,
    /// Every consumer of the application, in [`App::consumers`] order.
    pub consumers: Vec<ConsumerStatus>,
}

/// `GET /healthz`: 200 `{"status":"ok"}` once the event store and the read models answer;
/// 200 `{"status":"degraded","stalled":[…]}` while a consumer is stalled (the process is
/// alive; the stall is the workers' to fix).
///
/// # Errors
/// 503 `store` / `read_models` when either fails.
pub async fn healthz(State(app): State<Arc<App>>) -> Result<Json<Health>, Problem> {
    let progress = app.progress().await.map_err(app_problem)?;
    let stalled: Vec<String> = progress.stalled().into_iter().map(String::from).collect();
    Ok(Json(Health {
        status: if stalled.is_empty() { "ok" } else { "degraded" }.into(),
        stalled,
    }))
}

/// `GET /v1/projections`: head position and each consumer's checkpoint, lag and stall.
///
/// # Errors
/// 503 when the store or the read models fail.
pub async fn projections(State(app): State<Arc<App>>) -> Result<Json<ProjectionsStatus>, Problem> {
    let progress = app.progress().await.map_err(app_problem)?;
    let consumers = progress
        .consumers
        .into_iter()
        .map(|c| ConsumerStatus {
            stalled: c.stalled_for.is_some(),
            stalled_for_secs: c.stalled_for.map(|d| d.as_secs()),
            name: c.name,
            checkpoint: c.checkpoint,
            applied: c.applied,
            lag: c.lag,
        })
        .collect();
    Ok(Json(ProjectionsStatus {
        head_position: progress.head,
        consumers,
    }))
}

/// The problem of a failed progress read: the store's or the read models' (503).
fn app_problem(e: AppError) -> Problem {
    match e {
        AppError::Store(e) => e.into(),
        AppError::ReadModels(e) => e.into(),
        other => Problem::unavailable("store", &other),
    }
}
