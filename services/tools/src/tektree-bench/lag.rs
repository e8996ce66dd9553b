//! Scenario **lag**: end-to-end lag, commit → visible in each read model, at a fixed offered
//! load. In-process, as `tektree serve` runs it: an [`App`] on a fresh SQLite store with the
//! in-process bus, the relay and every consumer (four projections, two policies) spawned by
//! [`App::spawn_pipeline`]. The append workload is offered open-loop by
//! [`append::pace`](crate::append::pace); for each command the instant its append returned
//! (committed) and the global position of its last event are kept. A watcher reads every
//! projection's checkpoint (the low-water mark: every position ≤ it is applied) about every
//! millisecond and records when each value was first seen; a command is visible in a read model
//! once that checkpoint reaches its last position, and its lag is that instant minus its commit
//! instant. The sampling makes each lag an upper bound by up to one period (plus the
//! checkpoint read itself).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tektree_domain::Rules;
use tektree_projections::{Projection, ReadModelStore};
use tektree_services::app::App;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::append::{pace, send};
use crate::corpus::remove_db;
use crate::stats::Latencies;
use crate::workload::Workload;

/// Period of the checkpoint watcher.
const SAMPLE_EVERY: Duration = Duration::from_millis(1);
/// How long the projections may take to catch up with the last command.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(300);

/// What one run measured.
#[derive(Debug, Default)]
pub struct LagRun {
    /// Commands offered.
    pub commands: u64,
    /// Commands refused for good (none expected), with the first reasons.
    pub refused: u64,
    /// The first few refusal reasons.
    pub refusals: Vec<String>,
    /// Time from the first due time to the last command's commit.
    pub elapsed: Duration,
    /// Latency of the appends themselves, from each command's due time to its commit.
    pub append_latencies: Latencies,
    /// Per projection (in [`Projection::ALL`] order): the lag of every committed command.
    pub lags: Vec<Latencies>,
    /// Per projection: commands whose position the projection had not reached when the
    /// watcher gave up (after [`CATCH_UP_PATIENCE`]).
    pub not_visible: Vec<u64>,
}

/// When each projection's checkpoint reached each value: per projection, `(checkpoint, first
/// seen)` in increasing order.
type Seen = Vec<Vec<(u64, Instant)>>;

/// Samples every projection's checkpoint each [`SAMPLE_EVERY`] until all of them reach
/// `target` (which stays `u64::MAX` while commands are still being sent) or
/// [`CATCH_UP_PATIENCE`] after the target was set.
async fn watch_checkpoints(
    read_models: Arc<dyn ReadModelStore>,
    target: Arc<AtomicU64>,
) -> Result<Seen> {
    let mut seen: Seen = vec![Vec::new(); Projection::ALL.len()];
    let mut last = vec![0u64; Projection::ALL.len()];
    let mut deadline = None;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let checkpoints = read_models.checkpoints().await?;
        let now = Instant::now();
        for (i, name) in Projection::ALL.iter().enumerate() {
            let cp = checkpoints
                .iter()
                .find(|c| c.name == name.name())
                .map_or(0, |c| c.checkpoint);
            if cp > last[i] {
                last[i] = cp;
                seen[i].push((cp, now));
            }
        }
        let target = target.load(Ordering::Acquire);
        if target != u64::MAX {
            if last.iter().all(|cp| *cp >= target) {
                return Ok(seen);
            }
            if now >= *deadline.get_or_insert(now + CATCH_UP_PATIENCE) {
                return Ok(seen);
            }
        }
    }
}

/// The first instant at which `seen` (one projection's samples) reached `position`.
fn visible_at(seen: &[(u64, Instant)], position: u64) -> Option<Instant> {
    let i = seen.partition_point(|(cp, _)| *cp < position);
    seen.get(i).map(|(_, t)| *t)
}

/// One run: `workload` offered at `per_s` commands/s (at most `max_in_flight` at once) to a
/// fresh store at `path` with the whole pipeline running.
///
/// # Errors
/// Store, read-model or bus errors; a failed task.
pub async fn run_once(
    path: &Path,
    workload: &Workload,
    per_s: f64,
    max_in_flight: usize,
) -> Result<LagRun> {
    remove_db(path);
    let app = App::open(
        &format!("sqlite://{}", path.display()),
        "memory",
        Rules::default(),
    )
    .await?;
    let (stop, stopped) = watch::channel(false);
    let mut pipeline = JoinSet::new();
    app.spawn_pipeline(stopped, &mut pipeline);
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let watcher = tokio::spawn(watch_checkpoints(app.read_models.clone(), target.clone()));

    let started = Instant::now();
    let sent = pace(workload, per_s, max_in_flight, |cmd, at| {
        let app = app.clone();
        async move {
            let (result, _retries) = send(&app, &cmd, at).await;
            let committed = Instant::now();
            let last = result
                .map(|o| o.events.last().map(|e| e.position))
                .map_err(|e| e.to_string());
            (committed, last)
        }
    })
    .await;
    let sent = match sent {
        Ok(s) => s,
        Err(e) => {
            watcher.abort();
            let _ = stop.send(true);
            pipeline.shutdown().await;
            return Err(e);
        }
    };
    let mut run = LagRun {
        commands: sent.len() as u64,
        ..LagRun::default()
    };
    let mut committed = Vec::with_capacity(sent.len());
    let mut last_commit = started;
    for (latency, (at, result)) in sent {
        match result {
            Ok(Some(position)) => {
                run.append_latencies.push(latency);
                last_commit = last_commit.max(at);
                committed.push((at, position));
            }
            // An identical repeat commits nothing; the fresh workload has none.
            Ok(None) => {}
            Err(e) => {
                run.refused += 1;
                if run.refusals.len() < 5 {
                    run.refusals.push(e);
                }
            }
        }
    }
    run.elapsed = last_commit - started;
    let max_position = committed.iter().map(|(_, p)| *p).max().unwrap_or(0);
    target.store(max_position, Ordering::Release);
    let seen = watcher.await.context("the checkpoint watcher failed")?;
    let _ = stop.send(true);
    pipeline.shutdown().await;
    drop(app);
    remove_db(path);
    let seen = seen?;
    for samples in &seen {
        let mut lags = Latencies::default();
        let mut missing = 0;
        for (at, position) in &committed {
            match visible_at(samples, *position) {
                Some(t) => lags.push(t.saturating_duration_since(*at)),
                None => missing += 1,
            }
        }
        run.lags.push(lags);
        run.not_visible.push(missing);
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_visible_once_the_checkpoint_reaches_it() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let seen = vec![(3, at(1)), (7, at(2)), (9, at(5))];
        assert_eq!(visible_at(&seen, 1), Some(at(1)));
        assert_eq!(visible_at(&seen, 3), Some(at(1)));
        assert_eq!(visible_at(&seen, 4), Some(at(2)));
        assert_eq!(visible_at(&seen, 9), Some(at(5)));
        assert_eq!(visible_at(&seen, 10), None);
    }
}
