//! The closed-loop client pool of the `append` and `http` scenarios and of the cqrs-es peers
//! (`services/tools/bench-peers` includes this file): `clients` tasks share each phase's commands, a
//! client sends its next command once the previous one was answered, and the phases run one
//! after the other (the importer's order: every referenced entity exists first).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::stats::{rate, Latencies};

/// Most failure reasons kept per client, and in all.
const SAMPLES_PER_CLIENT: usize = 3;
const SAMPLES: usize = 5;

/// What sending one command did.
#[derive(Debug)]
pub struct Sent {
    /// Events the command stored (0 when the sender cannot tell), or why it failed for good.
    pub result: Result<u64, String>,
    /// Client-side retries (conflicts and other transient failures) before that result.
    pub retries: u64,
}

/// What one run of all phases did.
#[derive(Debug, Default)]
pub struct Tally {
    /// Commands sent.
    pub sent: u64,
    /// Commands that succeeded.
    pub succeeded: u64,
    /// Events the succeeded commands stored.
    pub events: u64,
    /// Client-side retries.
    pub retries: u64,
    /// Commands that failed for good.
    pub failed: u64,
    /// The first few failure reasons.
    pub failures: Vec<String>,
    /// Wall time of all phases.
    pub elapsed: Duration,
    /// Per-command latency, retries included.
    pub latencies: Latencies,
    /// Commands/s of each phase, in order.
    pub phases: Vec<(&'static str, f64)>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.sent += other.sent;
        self.succeeded += other.succeeded;
        self.events += other.events;
        self.retries += other.retries;
        self.failed += other.failed;
        let room = SAMPLES.saturating_sub(self.failures.len());
        self.failures.extend(other.failures.into_iter().take(room));
        self.latencies.extend(other.latencies);
    }
}

/// Sends every command of `phases` (name, commands) with `clients` concurrent clients through
/// `send`, phase after phase.
///
/// # Errors
/// When a client task fails (panics).
pub async fn run<T, F, Fut>(
    phases: &[(&'static str, Vec<T>)],
    clients: usize,
    send: F,
) -> Result<Tally>
where
    T: Clone + Send + Sync + 'static,
    F: Fn(T) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Sent> + Send,
{
    let mut total = Tally::default();
    let started = Instant::now();
    for (name, commands) in phases {
        let phase_started = Instant::now();
        let commands = Arc::new(commands.clone());
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients.max(1) {
            let (commands, next, send) = (commands.clone(), next.clone(), send.clone());
            tasks.spawn(async move {
                let mut mine = Tally::default();
                while let Some(cmd) = commands.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let t = Instant::now();
                    let sent = send(cmd.clone()).await;
                    mine.latencies.push(t.elapsed());
                    mine.sent += 1;
                    mine.retries += sent.retries;
                    match sent.result {
                        Ok(events) => {
                            mine.succeeded += 1;
                            mine.events += events;
                        }
                        Err(reason) => {
                            mine.failed += 1;
                            if mine.failures.len() < SAMPLES_PER_CLIENT {
                                mine.failures.push(reason);
                            }
                        }
                    }
                }
                mine
            });
        }
        while let Some(done) = tasks.join_next().await {
            let Ok(mine) = done else {
                bail!("a client task failed");
            };
            total.add(mine);
        }
        let secs = phase_started.elapsed().as_secs_f64();
        total.phases.push((name, rate(commands.len() as u64, secs)));
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_command_is_sent_once_phase_after_phase() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let phases = vec![
            ("a", (0..50).collect::<Vec<u32>>()),
            ("b", (50..60).collect()),
        ];
        let tally = run(&phases, 7, move |n: u32| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(n);
                Sent {
                    result: if n % 10 == 3 {
                        Err(format!("refused {n}"))
                    } else {
                        Ok(2)
                    },
                    retries: u64::from(n == 0),
                }
            }
        })
        .await
        .unwrap();
        let seen = seen.lock().unwrap().clone();
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..60).collect::<Vec<_>>(), "each command once");
        // Phase b starts only after every command of phase a was answered.
        let first_b = seen.iter().position(|&n| n >= 50).unwrap();
        assert!(seen[..first_b].iter().all(|&n| n < 50));
        assert_eq!(seen[first_b..].len(), 10);
        assert_eq!((tally.sent, tally.succeeded, tally.failed), (60, 54, 6));
        assert_eq!(tally.events, 108);
        assert_eq!(tally.retries, 1);
        // Reasons are sampled (at most 3 per client, 5 in all), never invented.
        assert!(!tally.failures.is_empty() && tally.failures.len() <= SAMPLES);
        assert!(tally.failures.iter().all(|f| f.starts_with("refused ")));
        assert_eq!(tally.latencies.len(), 60);
        assert_eq!(
            tally.phases.iter().map(|p| p.0).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}
