//! The consumer runtime shared by projection workers and policies.
//!
//! A worker joins its consumer group on the bus and loops: take a batch (reclaimed pending
//! deliveries first, then new ones), merge it with deliveries it is holding back, and process
//! them in position order:
//! - a **projection** computes each event's changes ([`tektree_projections::project`]) and
//!   applies the batch with its sequence guard and checkpoint in one read-model transaction;
//! - a **policy** issues its (idempotent) commands for each event, then records the event in its
//!   guard and checkpoint.
//!
//! Deliveries are acknowledged only after that commit (`Applied` or `Duplicate`). A `Gap`
//! (an earlier event of the same aggregate is not applied yet, e.g. it is with another worker of
//! the group) is held back and retried; if the worker dies, the bus hands its unacknowledged
//! deliveries to another worker after `min_idle`. So a killed worker loses nothing and a
//! redelivered event changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tektree_commands::policies::Policy;
use tektree_outbox::{BusError, Delivery, SubscriptionOptions};
use tektree_projections::{project, ApplyOutcome, Change, EventKey, ReadModelError};
use tokio::sync::watch;
use tracing::Instrument;

use crate::app::App;

/// A consumer: one projection or one policy. Its name is its consumer group and checkpoint.
#[derive(Clone)]
pub enum Consumer {
    /// A projection by name (`xp`, `leaderboard`, `quota`, `content`).
    Projection(&'static str),
    /// A policy.
    Policy(Arc<dyn Policy>),
}

impl Consumer {
    /// Consumer-group / checkpoint name.
    pub fn name(&self) -> &str {
        match self {
            Consumer::Projection(n) => n,
            Consumer::Policy(p) => p.name(),
        }
    }
}

/// Tuning of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's name within its group; unique per process. Default `w-<pid>-<random>`.
    pub consumer: String,
    /// Deliveries per batch. Default 256.
    pub batch: usize,
    /// Longest wait for new deliveries when idle. Default 200 ms.
    pub block: Duration,
    /// Idle time after which another worker's unacknowledged deliveries are reclaimed.
    /// Default 10 s.
    pub min_idle: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            consumer: format!(
                "w-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            batch: 256,
            block: Duration::from_millis(200),
            min_idle: Duration::from_secs(10),
        }
    }
}

/// Errors that stop a worker (transient errors are retried inside the loop instead).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Joining the consumer group failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Runs `consumer` until `shutdown` turns `true`.
///
/// # Errors
/// [`WorkerError::Bus`] if the subscription cannot be created; later transport and storage
/// errors are logged and retried with backoff.
pub async fn run(
    app: &App,
    consumer: Consumer,
    cfg: WorkerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let name = consumer.name().to_string();
    let mut opts = SubscriptionOptions::new(name.clone(), cfg.consumer.clone());
    opts.min_idle = cfg.min_idle;
    let mut sub = app.bus.subscribe(opts).await?;
    let mut held: BTreeMap<u64, Delivery> = BTreeMap::new();
    let mut backoff = Duration::from_millis(10);
    tracing::info!(consumer = %name, worker = %cfg.consumer, "consumer started");
    while !*shutdown.borrow() {
        let block = if held.is_empty() {
            cfg.block
        } else {
            Duration::from_millis(20)
        };
        let batch = tokio::select! {
            r = sub.next_batch(cfg.batch, block) => r,
            _ = shutdown.changed() => break,
        };
        match batch {
            Ok(b) => {
                for d in b {
                    held.insert(d.envelope.position, d);
                }
            }
            Err(BusError::Decode { id, reason }) => {
                // Not an envelope: it can never be applied. Log it loudly and skip it.
                tracing::error!(consumer = %name, message = %id, %reason, "undecodable bus message skipped");
                metrics::counter!("tektree_undecodable_messages_total", "consumer" => name.clone())
                    .increment(1);
                if let Err(e) = sub.ack(&[id]).await {
                    tracing::warn!(consumer = %name, error = %e, "ack of undecodable message failed");
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "bus read failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        if held.is_empty() {
            continue;
        }
        let deliveries: Vec<Delivery> = std::mem::take(&mut held).into_values().collect();
        match process(app, &consumer, &deliveries).await {
            Ok(outcomes) => {
                backoff = Duration::from_millis(10);
                let mut ack = Vec::new();
                for (d, o) in deliveries.into_iter().zip(outcomes) {
                    match o {
                        ApplyOutcome::Applied | ApplyOutcome::Duplicate => ack.push(d.id),
                        ApplyOutcome::Gap { .. } => {
                            held.insert(d.envelope.position, d);
                        }
                    }
                }
                if !ack.is_empty() {
                    metrics::counter!("tektree_consumer_acked_total", "consumer" => name.clone())
                        .increment(ack.len() as u64);
                    if let Err(e) = sub.ack(&ack).await {
                        // Unacknowledged deliveries come back and are dropped as duplicates.
                        tracing::warn!(consumer = %name, error = %e, "ack failed");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "processing failed; will retry");
                for d in deliveries {
                    held.insert(d.envelope.position, d);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    tracing::info!(consumer = %name, "consumer stopped");
    Ok(())
}

/// Why processing a batch failed as a whole (nothing in it was acknowledged).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The read-model store failed.
    #[error(transparent)]
    ReadModels(#[from] ReadModelError),
}

/// Processes `deliveries` (position order) for `consumer`; one outcome per delivery.
///
/// Undecodable events are logged and recorded with no changes (they cannot ever be applied).
/// A policy command that fails is treated as a gap: the event is retried later.
///
/// # Errors
/// [`ProcessError`] when the read-model store fails; nothing was applied.
pub async fn process(
    app: &App,
    consumer: &Consumer,
    deliveries: &[Delivery],
) -> Result<Vec<ApplyOutcome>, ProcessError> {
    let name = consumer.name();
    let mut items: Vec<(EventKey, Vec<Change>)> = Vec::with_capacity(deliveries.len());
    let mut failed: Vec<bool> = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        let env = &d.envelope;
        let key = EventKey::of(env);
        let event = match env.decode() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(consumer = %name, position = env.position, error = %e,
                    "undecodable event skipped");
                metrics::counter!("tektree_undecodable_events_total", "consumer" => name.to_string())
                    .increment(1);
                items.push((key, vec![]));
                failed.push(false);
                continue;
            }
        };
        match consumer {
            Consumer::Projection(p) => {
                items.push((key, project(p, env, &event)));
                failed.push(false);
            }
            Consumer::Policy(policy) => {
                let span = tracing::info_span!("policy", policy = name,
                    event_id = %env.event_id, correlation_id = %env.correlation_id,
                    causation_id = %env.causation_id);
                match policy.react(env, &event).instrument(span).await {
                    Ok(()) => {
                        items.push((key, vec![]));
                        failed.push(false);
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %name, position = env.position, error = %e,
                            "policy command failed; will retry");
                        failed.push(true);
                    }
                }
            }
        }
    }
    let applied = app.read_models.apply(name, &items).await?;
    let mut applied = applied.into_iter();
    Ok(failed
        .into_iter()
        .map(|f| {
            if f {
                ApplyOutcome::Gap { expected: 0 }
            } else {
                applied.next().unwrap_or(ApplyOutcome::Gap { expected: 0 })
            }
        })
        .collect())
}
