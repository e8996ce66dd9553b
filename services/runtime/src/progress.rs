//! Consumer progress and **stall detection**: a consumer is stalled when it has events to
//! apply (lag > 0) and its checkpoint has not moved for the stall threshold (default 10 s,
//! `tektree --stall-after-secs`). A stalled consumer is flagged in `GET /v1/projections`,
//! turns `GET /healthz` `degraded`, and shows in the metrics `tektree_consumer_stalled`
//! (0/1), `tektree_consumer_lag` (events) and `tektree_consumer_seconds_since_progress`, each
//! labelled `consumer`.
//!
//! Progress is observed whenever [`App::progress`](crate::app::App::progress) runs (the
//! status, health and metrics endpoints call it): the stall clock of a consumer starts at the
//! first observation that sees it lagging at a checkpoint (a new checkpoint, or lag after an
//! observation without lag), so "no progress for N seconds" holds between two observations at
//! least N seconds apart that both saw the same checkpoint and lag (checkpoints never move
//! backwards). Time spent idle (lag 0) never counts, and the first observation never reports a
//! stall; a stall is reported late by at most the time between observations, never early.
//! Works whichever process runs the workers: it reads the checkpoints the workers commit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default stall threshold: 10 s (issue #14).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(10);

/// One consumer's progress at one observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerProgress {
    /// Consumer name (`xp`, `policy.gamification`, …).
    pub name: String,
    /// Every event with position ≤ this has been applied (0 before the first).
    pub checkpoint: u64,
    /// Number of events applied.
    pub applied: u64,
    /// `head − checkpoint`: events committed but not yet applied.
    pub lag: u64,
    /// How long the checkpoint has not moved while lag > 0, once that reached the threshold;
    /// `None` when the consumer is not stalled.
    pub stalled_for: Option<Duration>,
}

/// The store's head and every consumer's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The store's highest committed position.
    pub head: u64,
    /// Every consumer, in [`App::consumers`](crate::app::App::consumers) order.
    pub consumers: Vec<ConsumerProgress>,
}

impl Progress {
    /// The names of the stalled consumers.
    pub fn stalled(&self) -> Vec<&str> {
        self.consumers
            .iter()
            .filter(|c| c.stalled_for.is_some())
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// The memory of stall detection: per consumer, the last checkpoint seen and since when.
#[derive(Debug)]
pub struct StallWatch {
    threshold: Duration,
    /// Per consumer: the checkpoint and since when it has been seen lagging there (`None`
    /// when last seen without lag).
    seen: Mutex<HashMap<String, (u64, Option<Instant>)>>,
}

impl Default for StallWatch {
    fn default() -> Self {
        StallWatch::new(DEFAULT_STALL_AFTER)
    }
}

impl StallWatch {
    /// A watch that reports a stall after `threshold` without progress.
    pub fn new(threshold: Duration) -> Self {
        StallWatch {
            threshold,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// The threshold.
    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    /// Records that consumer `name` was at `checkpoint` with `lag` at `now`; returns how long
    /// it has been stalled when it is (seen lagging at the same checkpoint for ≥ the
    /// threshold).
    pub fn observe(&self, name: &str, checkpoint: u64, lag: u64, now: Instant) -> Option<Duration> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if lag == 0 {
            seen.insert(name.to_string(), (checkpoint, None));
            return None;
        }
        let since = match seen.get(name) {
            Some((cp, Some(since))) if *cp == checkpoint => *since,
            _ => {
                seen.insert(name.to_string(), (checkpoint, Some(now)));
                now
            }
        };
        let still = now.saturating_duration_since(since);
        (still >= self.threshold).then_some(still)
    }
}

/// Publishes `p` as the consumer gauges (see the module docs).
pub(crate) fn record_metrics(p: &Progress, watch: &StallWatch, now: Instant) {
    let seen = watch
        .seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for c in &p.consumers {
        let labels = [("consumer", c.name.clone())];
        metrics::gauge!("tektree_consumer_lag", &labels).set(c.lag as f64);
        metrics::gauge!("tektree_consumer_stalled", &labels).set(if c.stalled_for.is_some() {
            1.0
        } else {
            0.0
        });
        let idle = match seen.get(&c.name) {
            Some((_, Some(since))) => now.saturating_duration_since(*since).as_secs_f64(),
            _ => 0.0,
        };
        metrics::gauge!("tektree_consumer_seconds_since_progress", &labels).set(idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_needs_lag_and_an_unmoved_checkpoint_for_the_threshold() {
        let w = StallWatch::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // First sight: never stalled.
        assert_eq!(w.observe("xp", 5, 3, at(0)), None);
        assert_eq!(w.observe("xp", 5, 3, at(9)), None);
        assert_eq!(w.observe("xp", 5, 3, at(10)), Some(Duration::from_secs(10)));
        assert_eq!(w.observe("xp", 5, 3, at(25)), Some(Duration::from_secs(25)));
        // Progress resets the clock.
        assert_eq!(w.observe("xp", 6, 3, at(26)), None);
        assert_eq!(w.observe("xp", 6, 3, at(35)), None);
        assert_eq!(w.observe("xp", 6, 3, at(36)), Some(Duration::from_secs(10)));
        // Caught up: an idle consumer is not stalled, however long…
        assert_eq!(w.observe("xp", 6, 0, at(100)), None);
        assert_eq!(w.observe("xp", 6, 0, at(200)), None);
        // … and idle time does not count once it lags again at the same checkpoint.
        assert_eq!(w.observe("xp", 6, 2, at(201)), None);
        assert_eq!(w.observe("xp", 6, 2, at(210)), None);
        assert_eq!(
            w.observe("xp", 6, 2, at(211)),
            Some(Duration::from_secs(10))
        );
        // Consumers are independent.
        assert_eq!(w.observe("content", 6, 1, at(211)), None);
    }
}
