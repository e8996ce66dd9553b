//! The outbox relay: moves committed events from the event store's outbox to the bus.
//!
//! One round ([`relay_once`]) reads the oldest unpublished outbox records in position order,
//! publishes them, and only then marks them published. A relay killed at any instant
//! therefore loses nothing: records not yet marked are read and published again on restart,
//! and the bus drops the ones it already has (every [`Bus`] deduplicates by position). The
//! loop ([`run`]) retries failures with backoff and never skips a record.
//!
//! ## Upcasting (issue #6)
//!
//! The relay publishes every record **upcast** to the current version of its type
//! ([`EventEnvelope::upcast`], `docs/event-catalog.md` "Versions and upcasters"): a
//! `user.registered` stored at version 1 goes on the bus as version 2 with default
//! `preferences`, so consumers only ever see current shapes. Only `event_version` and `payload`
//! change; `position`, ids and everything else are the stored ones, and the outbox is read and
//! marked exactly as without upcasting. The store is never rewritten. Upcasting is
//! deterministic, so a record published again after a crash is the same message. Messages that
//! builds before issue #6 already put on a durable bus keep their stored shape; consumers read
//! them the same, because decoding upcasts too.
//!
//! A record this build cannot upcast — a type outside its catalog or an `event_version` newer
//! than it knows, i.e. written by a newer build sharing the store — is **published unchanged**
//! (stored type, version and payload) and marked like every other record: it is neither
//! dropped, nor retried forever (which would stall the outbox behind it), nor "fixed" by
//! guessing. Each such record is logged (`tracing` warn, with its position, type, version and
//! the reason) and counted in [`METRIC_NOT_UPCAST`]. Consumers then treat it as they treat any
//! undecodable event: the worker's decode fails, it retries `max_deliver` times and sets the
//! event aside as a dead letter of its group (`tektree-replay dead-letters`), holding back later
//! events of that aggregate only; once a build that knows the type/version runs, `tektree-replay
//! redrive ID` applies it (decoding upcasts it then).
//!
//! Test-only fault hook: when the environment variable [`KILL_AFTER_PUBLISH_ENV`]
//! (`TEKTREE_KILL_AFTER_PUBLISH=<n>`) is set, the process aborts in its `n`-th round that
//! published something, right after the bus accepted the records and before they are marked
//! published — the relay's crash window, hit on purpose by the fault harness (`tektree-faults`,
//! docs/reliability.md). Never set it in production.
//!
//! Metrics (through the `metrics` facade; the process installs the exporter):
//! - counter `tektree_relay_published_total`: outbox records published and marked;
//! - gauge `tektree_relay_backlog`: outbox records not yet published, as last seen;
//! - counter `tektree_relay_errors_total`: failed rounds;
//! - counter `tektree_relay_not_upcast_total`: records published unchanged because this build
//!   cannot upcast them (see above).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tektree_domain::events::catalog_entry;
use tektree_domain::EventEnvelope;
use tektree_event_store::{EventStore, StoreError};
use tokio::sync::watch;

use crate::bus::{Bus, BusError};
use crate::recovery::{self, ConsumerCheckpoints};

/// Name of the counter of published outbox records.
pub const METRIC_PUBLISHED: &str = "tektree_relay_published_total";
/// Name of the gauge of unpublished outbox records.
pub const METRIC_BACKLOG: &str = "tektree_relay_backlog";
/// Name of the counter of failed relay rounds.
pub const METRIC_ERRORS: &str = "tektree_relay_errors_total";
/// Name of the counter of outbox records published unchanged because this build cannot upcast
/// them (unknown type or unsupported version; see the [module docs](self)).
pub const METRIC_NOT_UPCAST: &str = "tektree_relay_not_upcast_total";

/// First wait after a failed round; doubled after each further failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The backlog gauge is refreshed from the store at most this often while busy.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// While the outbox is empty, the bus is checked for lost events ([`recovery::check`]) at most
/// this often.
const BUS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Environment variable of the test-only fault hook (see the [module docs](self)).
pub const KILL_AFTER_PUBLISH_ENV: &str = "TEKTREE_KILL_AFTER_PUBLISH";

/// Counts a round that published something and aborts the process when the test-only fault
/// hook says so (before the records are marked published).
fn count_publish() {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static ROUNDS: AtomicU64 = AtomicU64::new(0);
    let limit = *LIMIT.get_or_init(|| {
        let n = std::env::var(KILL_AFTER_PUBLISH_ENV)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        tracing::warn!(
            n,
            "{KILL_AFTER_PUBLISH_ENV} is set: this process aborts after its {n}th publish, \
             before marking the records published (test-only fault hook)"
        );
        Some(n)
    });
    let Some(limit) = limit else { return };
    let n = ROUNDS.fetch_add(1, Ordering::SeqCst) + 1;
    if n >= limit {
        tracing::error!(
            rounds = n,
            "{KILL_AFTER_PUBLISH_ENV} reached: aborting between publishing and marking"
        );
        std::process::abort();
    }
}

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The event store failed (reading the outbox or marking records).
    #[error("relay: {0}")]
    Store(#[from] StoreError),
    /// The bus failed to accept the events.
    #[error("relay: {0}")]
    Bus(#[from] BusError),
    /// The bus ends below what the store marked published: the broker lost events
    /// ([`crate::recovery`]). [`run`] recovers from it by republishing.
    #[error(
        "relay: the bus ends at position {bus_last}, but the store marked every event up to \
         {published_through} published: the broker lost events"
    )]
    BusBehind {
        /// The bus's last position.
        bus_last: u64,
        /// The store's published floor ([`crate::recovery::published_through`]).
        published_through: u64,
    },
    /// While recovering a lost bus, the bus turned out to be bound to another store (or epoch)
    /// ([`crate::binding::BindError`]'s text).
    #[error("relay: {0}")]
    Refused(String),
    /// While recovering a lost bus, the consumers' checkpoints could not be read.
    #[error("relay: reading the consumers' checkpoints: {0}")]
    Consumers(String),
}

impl RelayError {
    /// `false` when retrying cannot help: a stored record is corrupt
    /// ([`StoreError::Corrupt`]; the relay may not skip it), or a lost bus was bound to another
    /// store meanwhile ([`RelayError::Refused`]); the relay stops.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            RelayError::Store(StoreError::Corrupt { .. }) | RelayError::Refused(_)
        )
    }
}

/// Settings of [`run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Most outbox records published per round (per [`relay_once`]). Default 500; 0 is
    /// treated as 1.
    pub batch: usize,
    /// How long to sleep when the outbox is empty before looking again. Default 5 ms: the
    /// delay a commit that finds the relay idle adds to its lag (measured by `tektree-bench
    /// --scenario lag`: at 250 commands/s the p99 lag went from 73 ms with 50 ms to 20 ms).
    pub idle_poll: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 500,
            idle_poll: Duration::from_millis(5),
        }
    }
}

/// `stored` as the relay publishes it: upcast to the current version of its type, or unchanged
/// (logged and counted in [`METRIC_NOT_UPCAST`]) when this build cannot upcast it. See the
/// [module docs](self).
pub fn for_publishing(stored: EventEnvelope) -> EventEnvelope {
    // Fast path: a record already at its type's current version is published as stored.
    if catalog_entry(&stored.event_type).is_some_and(|e| e.version == stored.event_version) {
        return stored;
    }
    match stored.clone().upcast() {
        Ok(current) => current,
        Err(e) => {
            metrics::counter!(METRIC_NOT_UPCAST).increment(1);
            tracing::warn!(
                position = stored.position,
                event_id = %stored.event_id,
                event_type = %stored.event_type,
                event_version = stored.event_version,
                error = %e,
                "outbox record published unchanged: this build cannot upcast it; consumers \
                 will dead-letter it until a build that knows it re-drives it"
            );
            stored
        }
    }
}

/// One relay round: publishes up to `batch` of the oldest unpublished outbox records (in
/// position order) to `bus`, each upcast by [`for_publishing`], then marks them published in
/// `store`.
///
/// The bus must hold every record before the first one (all of them are marked published),
/// which [`Bus::publish_after`] checks atomically with the publish: a bus that ends lower lost
/// events, and publishing above the hole would hide it for good ([`crate::recovery`]).
///
/// Returns how many records were published and marked (0 when the outbox is empty). Also
/// increments the counter [`METRIC_PUBLISHED`] by that number.
///
/// # Errors
/// [`RelayError::BusBehind`] when the bus lost events (nothing published; [`run`] recovers);
/// [`RelayError::Store`] when reading or marking fails; [`RelayError::Bus`] when publishing
/// fails. Either way nothing is marked that the bus has not accepted, so calling again is safe:
/// records published but not marked are published again and dropped by the bus as duplicates.
pub async fn relay_once(
    store: &dyn EventStore,
    bus: &dyn Bus,
    batch: usize,
) -> Result<usize, RelayError> {
    let pending = store.outbox_pending(batch).await?;
    let Some(first) = pending.first() else {
        return Ok(0);
    };
    let floor = first.position.saturating_sub(1);
    // Upcasting keeps every position, so the records marked below are exactly those read.
    let positions: Vec<u64> = pending.iter().map(|e| e.position).collect();
    let pending: Vec<EventEnvelope> = pending.into_iter().map(for_publishing).collect();
    bus.publish_after(floor, &pending)
        .await
        .map_err(|e| recovery::behind_error(e, floor))?;
    count_publish();
    store.outbox_mark_published(&positions).await?;
    metrics::counter!(METRIC_PUBLISHED).increment(positions.len() as u64);
    tracing::trace!(
        count = positions.len(),
        first = positions.first().copied().unwrap_or_default(),
        last = positions.last().copied().unwrap_or_default(),
        "relayed outbox records"
    );
    Ok(positions.len())
}

/// Runs the relay until `shutdown` turns `true` (or its sender is dropped).
///
/// Loops [`relay_once`] with `cfg.batch`: immediately again after a round that published
/// something, after `cfg.idle_poll` when the outbox was empty, and after a backoff (100 ms
/// doubling to 5 s, reset by a successful round) when a round failed. Failures are logged
/// (`tracing` warn) and retried; no record is ever skipped. A round in progress is finished
/// before shutting down. Updates the gauge [`METRIC_BACKLOG`] (from
/// [`OutboxStore::outbox_backlog`], at most once a second while busy; 0 when a round finds the
/// outbox empty) and the counter [`METRIC_ERRORS`].
///
/// A bus that lost events ([`RelayError::BusBehind`], from a round or from the check made once
/// a second while the outbox is empty) is recovered with [`recovery::recover`], republishing
/// from the lowest of `checkpoints` (everything after the bus's end when `None`).
///
/// # Errors
/// Only for a failure retrying cannot fix ([`RelayError::is_retryable`] is `false`: a corrupt
/// stored record, which the relay must not skip, or a lost bus that another store bound
/// meanwhile). Returns `Ok(())` on shutdown.
pub async fn run(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    cfg: RelayConfig,
    checkpoints: Option<Arc<dyn ConsumerCheckpoints>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let batch = cfg.batch.max(1);
    let mut backoff = BACKOFF_MIN;
    let mut backlog_at: Option<Instant> = None;
    let mut bus_checked_at: Option<Instant> = None;
    tracing::info!(batch, idle_poll = ?cfg.idle_poll, "outbox relay started");
    loop {
        // `has_changed` fails once the sender is gone: nobody can ask for a shutdown any more.
        if *shutdown.borrow_and_update() || shutdown.has_changed().is_err() {
            break;
        }
        let mut round = relay_once(store.as_ref(), bus.as_ref(), batch).await;
        if matches!(round, Ok(0)) && bus_checked_at.is_none_or(|at| at.elapsed() >= BUS_CHECK_EVERY)
        {
            bus_checked_at = Some(Instant::now());
            round = recovery::check(store.as_ref(), bus.as_ref())
                .await
                .map(|()| 0);
        }
        if let Err(RelayError::BusBehind {
            bus_last,
            published_through,
        }) = round
        {
            round = recovery::recover(
                store.as_ref(),
                bus.as_ref(),
                checkpoints.as_deref(),
                (bus_last, published_through),
                batch,
            )
            .await
            .map(|loss| loss.republished as usize);
        }
        let wait = match round {
            Ok(0) => {
                backoff = BACKOFF_MIN;
                metrics::gauge!(METRIC_BACKLOG).set(0.0);
                backlog_at = None;
                Some(cfg.idle_poll)
            }
            Ok(_) => {
                backoff = BACKOFF_MIN;
                if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
                    backlog_at = Some(Instant::now());
                    match store.outbox_backlog().await {
                        Ok(n) => metrics::gauge!(METRIC_BACKLOG).set(n as f64),
                        Err(e) => tracing::debug!(error = %e, "reading the outbox backlog failed"),
                    }
                }
                None
            }
            Err(e) if !e.is_retryable() => {
                metrics::counter!(METRIC_ERRORS).increment(1);
                tracing::error!(error = %e, "outbox relay stopped: retrying cannot help");
                return Err(e);
            }
            Err(e) => {
                metrics::counter!(METRIC_ERRORS).increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay round failed; retrying");
                let wait = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                Some(wait)
            }
        };
        if let Some(wait) = wait {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
    }
    tracing::info!("outbox relay stopped");
    Ok(())
}
