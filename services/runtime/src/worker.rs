//! The runtime of every [`Consumer`] (projections, policies, the live feed).
//!
//! A worker joins its consumer group on the bus and loops: take a batch (reclaimed pending
//! deliveries first, then new ones), merge it with deliveries it is holding back, and process
//! them in position order: [`Consumer::handle`] each event (a projection computes its changes;
//! a policy issues its idempotent commands; the live feed publishes its messages), then apply
//! the batch's changes with the sequence guards and checkpoint in one read-model transaction.
//!
//! Deliveries are acknowledged only after that commit (`Applied` or `Duplicate`). A `Gap`
//! (an earlier event of the same aggregate is not applied yet, e.g. it is with another worker of
//! the group) is held back and retried; if the worker dies, the bus hands its unacknowledged
//! deliveries to another worker after `min_idle`. So a killed worker loses nothing and a
//! redelivered event changes nothing.
//!
//! ## Poison events and dead letters
//! An event whose processing fails for a reason retrying cannot fix (it does not decode, a policy
//! command is rejected, an injected fault) is retried up to `max_deliver` times (default 5), then
//! set aside as a **dead letter** of the consumer's group on the bus ([`Bus::dead_letter`]) and
//! acknowledged; the worker moves on. Its guard is *not* advanced, so later events of the same
//! aggregate wait (held, unacknowledged) instead of being applied out of order; every other
//! aggregate proceeds. [`redrive`] (`tektree-replay redrive ID`) applies a dead letter once its
//! cause is fixed, which releases the waiting events. Transient failures (storage, bus,
//! expected-version conflicts) are retried with backoff for as long as they last and never
//! dead-lettered.
//!
//! A worker survives a bus outage: joining the group, reading, acknowledging and
//! dead-lettering are retried with backoff (10 ms doubling to 2 s) for as long as the bus is
//! unreachable, and the worker resumes where its group left off once it is back.
//!
//! ## Test-only fault hook
//! When the environment variable [`KILL_AFTER_APPLY_ENV`] (`TEKTREE_KILL_AFTER_APPLY=<n>`) is
//! set, the process aborts right after its `n`-th read-model commit that applied something
//! (counted over every consumer of the process) and before acknowledging the deliveries it
//! applied: the crash window between a read-model write and its acknowledgement, hit on
//! purpose. It exists for the fault harness (`tektree-faults`, docs/reliability.md); never
//! set it in production.
//!
//! [`Bus::dead_letter`]: tektree_outbox::Bus::dead_letter

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tektree_outbox::{BusError, Delivery, Subscription, SubscriptionOptions};
use tektree_projections::{ApplyOutcome, Change, EventKey, ReadModelError};
use tokio::sync::watch;

use crate::app::App;
pub use crate::consumer::Consumer;
use crate::consumer::Failure;

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
    /// Permanent failures of one event before it becomes a dead letter. Default 5.
    pub max_deliver: u64,
    /// Fault injection for tests and fault drills: processing an event with one of these ids
    /// fails permanently (as a poison message would). Default empty.
    pub fail_on: Vec<uuid::Uuid>,
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
            max_deliver: 5,
            fail_on: Vec::new(),
        }
    }
}

/// Environment variable of the test-only fault hook (see the [module docs](self)): abort the
/// process right after the `n`-th read-model commit that applied something, before its
/// acknowledgement.
pub const KILL_AFTER_APPLY_ENV: &str = "TEKTREE_KILL_AFTER_APPLY";

/// Longest wait between two attempts after a transient failure.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Errors that stop a worker (transient errors are retried inside the loop instead).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Joining the consumer group failed for a reason retrying cannot fix (invalid bus URL or
    /// an unusable bus configuration).
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Joins the consumer group, retrying transport failures with backoff until it succeeds or
/// `shutdown` turns `true` (`Ok(None)`).
async fn subscribe(
    app: &App,
    opts: &SubscriptionOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Box<dyn Subscription>>, WorkerError> {
    let mut backoff = Duration::from_millis(10);
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        match app.bus.subscribe(opts.clone()).await {
            Ok(sub) => return Ok(Some(sub)),
            Err(e @ BusError::Transport(_)) => {
                tracing::warn!(consumer = %opts.group, error = %e, retry_in = ?backoff,
                    "joining the consumer group failed; retrying");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The limit of the test-only fault hook, read once from [`KILL_AFTER_APPLY_ENV`].
fn kill_after_apply() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let n = std::env::var(KILL_AFTER_APPLY_ENV)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        tracing::warn!(
            n,
            "{KILL_AFTER_APPLY_ENV} is set: this process aborts after its {n}th read-model \
             commit, before acknowledging it (test-only fault hook)"
        );
        Some(n)
    })
}

/// Counts a read-model commit that applied something, and aborts the process when the
/// test-only fault hook says so (before the caller acknowledges anything).
fn count_apply_commit(consumer: &str) {
    static COMMITS: AtomicU64 = AtomicU64::new(0);
    let Some(limit) = kill_after_apply() else {
        return;
    };
    let n = COMMITS.fetch_add(1, Ordering::SeqCst) + 1;
    if n >= limit {
        tracing::error!(consumer, commits = n,
            "{KILL_AFTER_APPLY_ENV} reached: aborting between the read-model commit and its acknowledgement");
        std::process::abort();
    }
}

/// Runs `consumer` until `shutdown` turns `true`.
///
/// # Errors
/// [`WorkerError::Bus`] if the subscription cannot be created for a reason retrying cannot
/// fix; transport failures (the bus is down) and storage errors are logged and retried with
/// backoff, also while joining the group.
pub async fn run(
    app: &App,
    consumer: Arc<dyn Consumer>,
    cfg: WorkerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let name = consumer.name().to_string();
    let mut opts = SubscriptionOptions::new(name.clone(), cfg.consumer.clone());
    opts.min_idle = cfg.min_idle;
    let Some(mut sub) = subscribe(app, &opts, &mut shutdown).await? else {
        tracing::info!(consumer = %name, "consumer stopped before joining its group");
        return Ok(());
    };
    let mut held: BTreeMap<u64, Delivery> = BTreeMap::new();
    // Permanent failures so far, by position.
    let mut failures: HashMap<u64, u64> = HashMap::new();
    let mut backoff = Duration::from_millis(10);
    let mut held_wait = Duration::from_millis(20);
    tracing::info!(consumer = %name, worker = %cfg.consumer, "consumer started");
    while !*shutdown.borrow() {
        // With deliveries held back, come back soon to retry them, but slower and slower while
        // nothing progresses (e.g. an aggregate waiting behind a dead letter): 20 ms → 500 ms.
        let block = if held.is_empty() {
            cfg.block
        } else {
            held_wait
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
                // Not an envelope at all (not even a position): nothing can ever apply it, and
                // there is no envelope to dead-letter. Log it loudly and skip it.
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
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        }
        if held.is_empty() {
            continue;
        }
        let deliveries: Vec<Delivery> = std::mem::take(&mut held).into_values().collect();
        let results = match process(app, consumer.as_ref(), &deliveries, &cfg.fail_on).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "processing failed; will retry");
                for d in deliveries {
                    held.insert(d.envelope.position, d);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if results.contains(&Processed::Applied) {
            count_apply_commit(&name);
        }
        let mut ack = Vec::new();
        let mut transient = false;
        for (d, r) in deliveries.into_iter().zip(results) {
            match r {
                Processed::Applied | Processed::Duplicate => {
                    failures.remove(&d.envelope.position);
                    ack.push(d.id);
                }
                Processed::Gap => {
                    held.insert(d.envelope.position, d);
                }
                Processed::Transient(reason) => {
                    tracing::warn!(consumer = %name, position = d.envelope.position, %reason, "will retry");
                    transient = true;
                    held.insert(d.envelope.position, d);
                }
                Processed::Poison(reason) => {
                    match set_aside(app, &name, cfg.max_deliver, &mut failures, d, &reason).await {
                        Next::Ack(id) => ack.push(id),
                        Next::Hold(d) => {
                            held.insert(d.envelope.position, d);
                        }
                        Next::Retry(d) => {
                            transient = true;
                            held.insert(d.envelope.position, d);
                        }
                    }
                }
            }
        }
        held_wait = if ack.is_empty() {
            (held_wait * 2).min(Duration::from_millis(500))
        } else {
            Duration::from_millis(20)
        };
        if !ack.is_empty() {
            metrics::counter!("tektree_consumer_acked_total", "consumer" => name.clone())
                .increment(ack.len() as u64);
            if let Err(e) = sub.ack(&ack).await {
                // Unacknowledged deliveries come back and are dropped as duplicates.
                tracing::warn!(consumer = %name, error = %e, "ack failed");
            }
        }
        if transient {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            backoff = Duration::from_millis(10);
        }
    }
    tracing::info!(consumer = %name, "consumer stopped");
    Ok(())
}

/// What the worker does next with a delivery.
enum Next {
    /// Acknowledge it (by delivery id).
    Ack(String),
    /// Hold it for the next round.
    Hold(Delivery),
    /// Hold it and back off (the bus failed).
    Retry(Delivery),
}

/// A delivery that failed for good (`reason`): held for another attempt until it has failed
/// `max_deliver` times (counted in `failures` by position, or by the bus's delivery count),
/// then set aside as a dead letter of `group` and acknowledged — unless an earlier delivery
/// of the same event was set aside already (a worker killed between the dead letter and the
/// acknowledgement), which is only acknowledged.
async fn set_aside(
    app: &App,
    group: &str,
    max_deliver: u64,
    failures: &mut HashMap<u64, u64>,
    d: Delivery,
    reason: &str,
) -> Next {
    let position = d.envelope.position;
    let n = failures.entry(position).or_insert(0);
    *n += 1;
    let attempts = (*n).max(d.delivery_count);
    if attempts < max_deliver {
        return Next::Hold(d);
    }
    match already_dead_lettered(app, group, &d).await {
        Ok(false) => {}
        Ok(true) => {
            tracing::warn!(consumer = %group, position, event_id = %d.envelope.event_id,
                "already dead-lettered by an earlier delivery; acknowledging");
            failures.remove(&position);
            return Next::Ack(d.id);
        }
        Err(e) => {
            tracing::warn!(consumer = %group, error = %e, "listing dead letters failed; will retry");
            return Next::Retry(d);
        }
    }
    let mut dead = d.clone();
    dead.delivery_count = attempts;
    match app.bus.dead_letter(group, &dead, reason).await {
        Ok(()) => {
            tracing::error!(consumer = %group, position, event_id = %d.envelope.event_id,
                %reason, attempts, "dead-lettered; later events of its aggregate wait for a re-drive");
            metrics::counter!("tektree_dead_letters_total", "consumer" => group.to_string())
                .increment(1);
            failures.remove(&position);
            Next::Ack(d.id)
        }
        Err(e) => {
            tracing::warn!(consumer = %group, error = %e, "dead-lettering failed; will retry");
            Next::Retry(d)
        }
    }
}

/// `true` when `group` already holds a dead letter of `delivery`'s event.
async fn already_dead_lettered(
    app: &App,
    group: &str,
    delivery: &Delivery,
) -> Result<bool, BusError> {
    Ok(app
        .bus
        .dead_letters(Some(group), usize::MAX)
        .await?
        .iter()
        .any(|dl| dl.envelope.event_id == delivery.envelope.event_id))
}

/// Why processing a batch failed as a whole (nothing in it was acknowledged).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The read-model store failed.
    #[error(transparent)]
    ReadModels(#[from] ReadModelError),
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// Applied (its changes and guard committed).
    Applied,
    /// Applied before; nothing changed.
    Duplicate,
    /// An earlier event of its aggregate is not applied yet; retry later.
    Gap,
    /// Failed for a reason that may pass (storage, conflict); retry with backoff.
    Transient(String),
    /// Failed for a reason retrying cannot fix (undecodable, rejected command, injected
    /// fault); dead-lettered after `max_deliver` attempts.
    Poison(String),
}

impl From<ApplyOutcome> for Processed {
    fn from(o: ApplyOutcome) -> Self {
        match o {
            ApplyOutcome::Applied => Processed::Applied,
            ApplyOutcome::Duplicate => Processed::Duplicate,
            ApplyOutcome::Gap { .. } => Processed::Gap,
        }
    }
}

/// Processes `deliveries` (position order) for `consumer`; one result per delivery.
///
/// Events listed in `fail_on` fail as [`Processed::Poison`] (fault injection).
///
/// # Errors
/// [`ProcessError`] when the read-model store fails; nothing was applied.
pub async fn process(
    app: &App,
    consumer: &dyn Consumer,
    deliveries: &[Delivery],
    fail_on: &[uuid::Uuid],
) -> Result<Vec<Processed>, ProcessError> {
    let name = consumer.name();
    let mut items: Vec<(EventKey, Vec<Change>)> = Vec::with_capacity(deliveries.len());
    // `None` = goes to the read-model store (its outcome decides); `Some` = decided here.
    let mut decided: Vec<Option<Processed>> = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        let env = &d.envelope;
        if fail_on.contains(&env.event_id) {
            decided.push(Some(Processed::Poison(format!(
                "injected fault on event {}",
                env.event_id
            ))));
            continue;
        }
        let event = match env.decode() {
            Ok(e) => e,
            Err(e) => {
                decided.push(Some(Processed::Poison(format!("undecodable event: {e}"))));
                continue;
            }
        };
        match consumer.handle(env, &event).await {
            Ok(changes) => {
                items.push((EventKey::of(env), changes));
                decided.push(None);
            }
            Err(Failure::Poison(reason)) => decided.push(Some(Processed::Poison(reason))),
            Err(Failure::Transient(reason)) => decided.push(Some(Processed::Transient(reason))),
        }
    }
    let applied = app.read_models.apply(name, &items).await?;
    let mut applied = applied.into_iter();
    Ok(decided
        .into_iter()
        .map(|d| {
            d.unwrap_or_else(|| {
                applied
                    .next()
                    .map(Processed::from)
                    .unwrap_or(Processed::Gap)
            })
        })
        .collect())
}

/// Why a re-drive did not apply a dead letter.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// No consumer of that group name.
    #[error("no consumer named {0:?}")]
    UnknownGroup(String),
    /// No dead letter with that id.
    #[error("no dead letter {0:?}")]
    NotFound(String),
    /// An earlier event of the aggregate is not applied yet.
    #[error("an earlier event of {0} is not applied yet by this consumer; re-drive it first")]
    Gap(String),
    /// It failed again.
    #[error("it failed again: {0}")]
    Failed(String),
    /// Bus or read-model failure.
    #[error("{0}")]
    Backend(String),
}

/// Applies the dead letter `id` for its group (as the live worker would, without fault
/// injection) and removes it from the bus. Later events of the same aggregate, held by live
/// workers, then apply on their next attempt.
///
/// # Errors
/// [`RedriveError`]; the dead letter stays on the bus.
pub async fn redrive(app: &App, id: &str) -> Result<Processed, RedriveError> {
    let dead = app
        .bus
        .dead_letters(None, usize::MAX)
        .await
        .map_err(|e| RedriveError::Backend(e.to_string()))?
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| RedriveError::NotFound(id.into()))?;
    let consumer = app
        .consumer(&dead.group)
        .ok_or_else(|| RedriveError::UnknownGroup(dead.group.clone()))?;
    let delivery = Delivery {
        id: dead.id.clone(),
        envelope: dead.envelope.clone(),
        delivery_count: dead.delivery_count,
    };
    let result = process(app, consumer.as_ref(), &[delivery], &[])
        .await
        .map_err(|e| RedriveError::Backend(e.to_string()))?
        .remove(0);
    match &result {
        Processed::Applied | Processed::Duplicate => {
            app.bus
                .remove_dead_letter(&dead.id)
                .await
                .map_err(|e| RedriveError::Backend(e.to_string()))?;
            Ok(result)
        }
        Processed::Gap => Err(RedriveError::Gap(format!(
            "{}/{}",
            dead.envelope.aggregate_type, dead.envelope.aggregate_id
        ))),
        Processed::Transient(r) | Processed::Poison(r) => Err(RedriveError::Failed(r.clone())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use async_trait::async_trait;
    use tektree_domain::Rules;
    use tektree_outbox::faulty::{BusFault, FaultyBus};
    use tektree_outbox::{Bus, MemoryBus};

    use super::*;

    /// Refuses the first `failures` subscriptions as if the bus were down.
    struct FlakySubscribe {
        failures: AtomicU64,
        error: fn() -> BusError,
    }

    #[async_trait]
    impl BusFault for FlakySubscribe {
        async fn subscribe(
            &self,
            inner: &dyn Bus,
            options: SubscriptionOptions,
        ) -> Result<Box<dyn Subscription>, BusError> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err((self.error)());
            }
            inner.subscribe(options).await
        }
    }

    async fn app_with(bus: FlakySubscribe) -> (tempfile::TempDir, App) {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite://{}", dir.path().join("t.db").display());
        let mut app = App::open(&store, "memory", Rules::default()).await.unwrap();
        app.bus = Arc::new(FaultyBus::new(Arc::new(MemoryBus::new()), bus));
        (dir, app)
    }

    /// Before, a transport failure while joining the group ended the consumer (and a worker
    /// process running only that consumer exited with status 0).
    #[tokio::test]
    async fn joining_the_group_is_retried_while_the_bus_is_unreachable() {
        let (_dir, app) = app_with(FlakySubscribe {
            failures: AtomicU64::new(3),
            error: || BusError::Transport("connection refused".into()),
        })
        .await;
        let (_tx, mut rx) = watch::channel(false);
        let opts = SubscriptionOptions::new("xp", "w-1");
        assert!(subscribe(&app, &opts, &mut rx).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_configuration_error_while_joining_is_not_retried() {
        let (_dir, app) = app_with(FlakySubscribe {
            failures: AtomicU64::new(1),
            error: || BusError::Config("stream with work-queue retention".into()),
        })
        .await;
        let (_tx, mut rx) = watch::channel(false);
        let opts = SubscriptionOptions::new("xp", "w-1");
        assert!(matches!(
            subscribe(&app, &opts, &mut rx).await,
            Err(WorkerError::Bus(BusError::Config(_)))
        ));
    }

    #[tokio::test]
    async fn shutdown_while_the_bus_is_unreachable_stops_joining() {
        let (_dir, app) = app_with(FlakySubscribe {
            failures: AtomicU64::new(u64::MAX),
            error: || BusError::Transport("connection refused".into()),
        })
        .await;
        let (tx, mut rx) = watch::channel(false);
        let opts = SubscriptionOptions::new("xp", "w-1");
        let stop = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(true).unwrap();
            tx
        });
        assert!(subscribe(&app, &opts, &mut rx).await.unwrap().is_none());
        drop(stop.await.unwrap());
    }

    /// A delivery whose event the group already set aside (a worker died between dead-lettering
    /// and acknowledging it) is acknowledged without a second dead letter.
    #[tokio::test]
    async fn an_event_is_dead_lettered_once_per_group() {
        let (_dir, app) = app_with(FlakySubscribe {
            failures: AtomicU64::new(0),
            error: || BusError::Transport(String::new()),
        })
        .await;
        let envelope = tektree_outbox::conformance::envelope(1);
        let delivery = Delivery {
            id: "1".into(),
            envelope,
            delivery_count: 5,
        };
        assert!(!already_dead_lettered(&app, "xp", &delivery).await.unwrap());
        app.bus
            .dead_letter("xp", &delivery, "poison")
            .await
            .unwrap();
        assert!(already_dead_lettered(&app, "xp", &delivery).await.unwrap());
        assert!(!already_dead_lettered(&app, "content", &delivery)
            .await
            .unwrap());
    }
}
