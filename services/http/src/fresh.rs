//! Read-your-writes: a query waits until the read models it reads have applied a global
//! position the client names.
//!
//! Every command response carries `position`, the global position of its last event
//! ([`CommandResponse::position`](crate::command::CommandResponse::position)). A query sent
//! with that position as `?min_position=N` or the header `X-Min-Position: N` is answered only
//! once the checkpoint of every projection it reads is ≥ N (a checkpoint is a low-water mark:
//! every event up to it is applied, `tektree_projections`), waiting up to the configured bound
//! ([`ReadWait`], default 1 s, `--read-wait-ms`). Past the bound the answer is 503
//! `stale_read_model` with the projections' current checkpoints, `Retry-After: 1`, and
//! nothing else. Both forms may be sent; the larger position applies. Without either, a query
//! reads what is there, as before.
//!
//! Checkpoints are polled (first after 1 ms, doubling to at most 20 ms), so it works whichever
//! process runs the workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tektree_projections::Projection;
use tektree_runtime::app::App;

use crate::problem::Problem;

/// The request header of a minimum position.
pub const MIN_POSITION_HEADER: &str = "x-min-position";

/// Default [`ReadWait`]: 1 s.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(1);

/// Longest pause between two checkpoint polls.
const MAX_POLL: Duration = Duration::from_millis(20);

/// How long a query with a minimum position waits for the read models (sub-state of the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadWait(pub Duration);

impl Default for ReadWait {
    fn default() -> Self {
        ReadWait(DEFAULT_READ_WAIT)
    }
}

#[derive(Deserialize)]
struct MinQuery {
    min_position: Option<String>,
}

/// The extractor of a query's freshness: the minimum position asked for (if any) and what it
/// needs to wait for it. Rejects (400 `invalid_query` / `invalid_header`) a value that is not
/// a non-negative integer.
pub struct Fresh {
    min: Option<u64>,
    app: Arc<App>,
    wait: ReadWait,
}

impl<S> FromRequestParts<S> for Fresh
where
    Arc<App>: FromRef<S>,
    ReadWait: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let query = Query::<MinQuery>::try_from_uri(&parts.uri)
            .map_err(|_| Problem::invalid_query("the query string is malformed".to_string()))?
            .0
            .min_position;
        let from_query = query
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    Problem::invalid_query(format!(
                        "min_position must be a non-negative integer, got {v:?}"
                    ))
                })
            })
            .transpose()?;
        let from_header = match parts.headers.get(MIN_POSITION_HEADER) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        Problem::invalid_header(
                            "X-Min-Position must be a non-negative integer".to_string(),
                        )
                    })?,
            ),
        };
        Ok(Fresh {
            min: from_query.max(from_header),
            app: Arc::from_ref(state),
            wait: ReadWait::from_ref(state),
        })
    }
}

impl Fresh {
    /// The minimum position asked for, if any.
    pub fn min_position(&self) -> Option<u64> {
        self.min
    }

    /// Waits until every projection of `reads` has a checkpoint ≥ the minimum position (at once
    /// without one).
    ///
    /// # Errors
    /// 503 `stale_read_model` (extension members `min_position` and `checkpoints`, an object
    /// of projection name → checkpoint; `Retry-After: 1`) when the bound passes first; 503
    /// `read_models` when the checkpoints cannot be read.
    pub async fn wait(&self, reads: &[Projection]) -> Result<(), Problem> {
        let Some(min) = self.min else {
            return Ok(());
        };
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let all = self.app.read_models.checkpoints().await?;
            let behind: Vec<(String, u64)> = reads
                .iter()
                .map(|p| {
                    let name = p.to_string();
                    let cp = all
                        .iter()
                        .find(|c| c.name == name)
                        .map_or(0, |c| c.checkpoint);
                    (name, cp)
                })
                .filter(|(_, cp)| *cp < min)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            let left = self.wait.0.saturating_sub(started.elapsed());
            if left.is_zero() {
                let checkpoints: serde_json::Map<_, _> = behind
                    .iter()
                    .map(|(n, cp)| (n.clone(), json!(cp)))
                    .collect();
                let names: Vec<&str> = behind.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "stale_read_model",
                    "Read model not fresh yet",
                    format!(
                        "the {} read model has not reached position {min} within {} ms; retry",
                        names.join(", "),
                        self.wait.0.as_millis()
                    ),
                )
                .with_retry_after(1)
                .with_extension("min_position", json!(min))
                .with_extension("checkpoints", serde_json::Value::Object(checkpoints)));
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}
