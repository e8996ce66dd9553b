//! Operational endpoints: liveness (`/healthz`) and consumer progress (`/v1/projections`).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::problem::Problem;
use crate::app::App;

/// `GET /healthz` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok` (failures are 503 problems).
    pub status: String,
}

/// Progress of one consumer in [`ProjectionsStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    /// Consumer name (`xp`, `leaderboard`, `quota`, `content`, `policy.gamification`,
    /// `policy.subscription`).
    pub name: String,
    /// Every event with position ≤ this has been applied (0 before the first).
    pub checkpoint: u64,
    /// Number of events applied.
    pub applied: u64,
    /// `head_position − checkpoint`: events committed but not yet applied.
    pub lag: u64,
}

/// `GET /v1/projections` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionsStatus {
    /// The store's highest committed position.
    pub head_position: u64,
    /// Every consumer of the application, in [`App::consumers`] order.
    pub consumers: Vec<ConsumerStatus>,
}

/// `GET /healthz`: 200 `{"status":"ok"}` once the event store answers a head read.
///
/// # Errors
/// 503 `store` when the store fails.
pub async fn healthz(State(app): State<Arc<App>>) -> Result<Json<Health>, Problem> {
    app.store.head().await?;
    Ok(Json(Health {
        status: "ok".into(),
    }))
}

/// `GET /v1/projections`: head position and each consumer's checkpoint and lag.
///
/// # Errors
/// 503 when the store or the read models fail.
pub async fn projections(State(app): State<Arc<App>>) -> Result<Json<ProjectionsStatus>, Problem> {
    // Checkpoints first: a head read afterwards is at least as new, so lag is never negative.
    let checkpoints = app.read_models.checkpoints().await?;
    let head = app.store.head().await?.position;
    let consumers = app
        .consumers()
        .iter()
        .map(|c| {
            let cp = checkpoints.iter().find(|k| k.name == c.name());
            let checkpoint = cp.map(|k| k.checkpoint).unwrap_or(0);
            ConsumerStatus {
                name: c.name().to_string(),
                checkpoint,
                applied: cp.map(|k| k.applied).unwrap_or(0),
                lag: head.saturating_sub(checkpoint),
            }
        })
        .collect();
    Ok(Json(ProjectionsStatus {
        head_position: head,
        consumers,
    }))
}
