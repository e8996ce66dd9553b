//! The `live` consumer: committed events → [`Notification`]s → the fan-out.
//!
//! It is a [`Consumer`] run by the worker runtime like the projections and policies:
//! its own consumer group and checkpoint `live` on the bus, the same retries, and
//! [`App::settle`](tektree_runtime::app::App::settle) waits for it. For each event it
//! 1. skips events recorded more than [`LiveConfig::max_age`](super::LiveConfig::max_age) ago
//!    (a consumer catching up after a long stop, or a new group reading the log from the start,
//!    pushes no stale news; clients re-read the REST queries when they connect);
//! 2. builds the event's messages ([`notifications`]);
//! 3. for `gamification.xp.earned`, adds one `rank.changed` per board the event credits (the
//!    boards of the `leaderboard` projection, so new board kinds follow by themselves): the
//!    user's row on the board, read from the leaderboard read model **after** waiting (up to
//!    [`LiveConfig::rank_wait`](super::LiveConfig::rank_wait)) for the `leaderboard`
//!    checkpoint to reach the event. The rank is thus at least as new as the event, and may
//!    already include later events (eventually consistent). When the leaderboard projection
//!    is stuck, the rank of the moment is sent after that wait — and no further waits are made
//!    until its checkpoint moves again, so a stuck projection does not stall live updates;
//! 4. publishes them, in order, to the fan-out.
//!
//! Delivery is **at least once**: a redelivered or retried event publishes its messages again
//! (clients deduplicate by `event_id`, `type` and `board`). A fan-out or read-model failure
//! fails the event transiently (the worker retries it with backoff; it is never
//! dead-lettered for that).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::json;
use tektree_domain::{Event, EventEnvelope};
use tektree_projections::{project, Change, Projection, ReadModelStore};
use tokio::time::Instant;

use tektree_runtime::consumer::{Consumer, Failure};

use super::message::{notifications, Notification, RANK_CHANGED};
use super::Live;

/// Consumer group and checkpoint name of the live notifier.
pub const CONSUMER: &str = "live";

/// The `live` consumer (module docs). Built by [`App::consumers`](tektree_runtime::app::App::consumers)
/// when the app has [`Live`] updates.
pub struct Notifier {
    live: Arc<Live>,
    read_models: Arc<dyn ReadModelStore>,
    /// Highest `leaderboard` checkpoint seen.
    leaderboard_seen: AtomicU64,
    /// The `leaderboard` checkpoint at which the last wait gave up (no new wait until it moves).
    stalled_at: Mutex<Option<u64>>,
}

impl Notifier {
    /// A notifier publishing through `live` and reading ranks from `read_models`.
    pub fn new(live: Arc<Live>, read_models: Arc<dyn ReadModelStore>) -> Self {
        Notifier {
            live,
            read_models,
            leaderboard_seen: AtomicU64::new(0),
            stalled_at: Mutex::new(None),
        }
    }

    /// The messages for `envelope`, ranks included (steps 1–3 of the module docs).
    ///
    /// # Errors
    /// [`Failure::Transient`] when the read models fail.
    pub async fn messages(
        &self,
        envelope: &EventEnvelope,
        event: &Event,
    ) -> Result<Vec<Notification>, Failure> {
        let cfg = self.live.config();
        let age = chrono::Utc::now().signed_duration_since(envelope.recorded_at);
        if age.to_std().is_ok_and(|a| a > cfg.max_age) {
            metrics::counter!("tektree_live_stale_events_skipped_total").increment(1);
            return Ok(vec![]);
        }
        let mut out = notifications(envelope, event, cfg.quota_warning_percent);
        if let Event::XpEarned(e) = event {
            let boards: Vec<String> = project(Projection::Leaderboard, envelope, event)
                .into_iter()
                .filter_map(|c| match c {
                    Change::Leaderboard { board, .. } => Some(board),
                    _ => None,
                })
                .collect();
            if !boards.is_empty() {
                self.wait_for_leaderboard(envelope.position).await?;
            }
            for board in boards {
                let row = self
                    .read_models
                    .rank(&board, e.user_id)
                    .await
                    .map_err(transient)?;
                if let Some(row) = row {
                    out.push(Notification::new(
                        RANK_CHANGED,
                        e.user_id,
                        envelope,
                        json!({"board": row.board, "xp": row.xp, "rank": row.rank}),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Waits until the `leaderboard` checkpoint reaches `position`, for at most `rank_wait`
    /// (polling 5 ms doubling to 100 ms); `false` when it gave up.
    async fn wait_for_leaderboard(&self, position: u64) -> Result<bool, Failure> {
        if self.leaderboard_seen.load(Ordering::Relaxed) >= position {
            return Ok(true);
        }
        let deadline = Instant::now() + self.live.config().rank_wait;
        let mut delay = std::time::Duration::from_millis(5);
        loop {
            let cp = self
                .read_models
                .checkpoints()
                .await
                .map_err(transient)?
                .into_iter()
                .find(|c| c.name == "leaderboard")
                .map_or(0, |c| c.checkpoint);
            self.leaderboard_seen.fetch_max(cp, Ordering::Relaxed);
            if cp >= position {
                return Ok(true);
            }
            {
                let mut stalled = self.stalled_at.lock().unwrap_or_else(|p| p.into_inner());
                if *stalled == Some(cp) {
                    return Ok(false);
                }
                if Instant::now() + delay > deadline {
                    tracing::warn!(position, leaderboard_checkpoint = cp,
                        "live: the leaderboard projection did not reach the event in time; sending the rank of the moment");
                    *stalled = Some(cp);
                    return Ok(false);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_millis(100));
        }
    }
}

/// A read-model or fan-out failure: transient, the worker retries it.
fn transient(e: impl std::fmt::Display) -> Failure {
    Failure::Transient(format!("live: {e}"))
}

#[async_trait]
impl Consumer for Notifier {
    fn name(&self) -> &str {
        CONSUMER
    }

    async fn handle(
        &self,
        envelope: &EventEnvelope,
        event: &Event,
    ) -> Result<Vec<Change>, Failure> {
        let out = self.messages(envelope, event).await?;
        if out.is_empty() {
            return Ok(vec![]);
        }
        self.live.publish(&out).await.map_err(transient)?;
        for n in &out {
            metrics::counter!("tektree_live_published_total", "type" => n.kind.clone())
                .increment(1);
        }
        Ok(vec![])
    }
}
