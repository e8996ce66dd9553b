//! Scenario 3, **projection**: the corpus's events, already on an in-process bus, consumed by
//! one projection's consumer group the way a worker does it — `next_batch` of the workers'
//! default 256, `worker::process` (change function + one guarded read-model transaction with
//! `synchronous=FULL`), acknowledge — into a fresh SQLite read-model file, until every event
//! is applied. [`run_into`] does the same into any read-model store (the MongoDB row,
//! `crate::mongo`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tektree_domain::EventEnvelope;
use tektree_outbox::{Bus, MemoryBus, SubscriptionOptions};
use tektree_projections::{Projection, ReadModelStore, SqliteReadModels};
use tektree_services::app::App;
use tektree_services::worker::{self, Processed, WorkerConfig};

use crate::corpus::remove_db;

/// Applies `events` to projection `name` in a fresh read-model file in `dir`;
/// `(events, seconds)` of the consuming part (publishing to the bus is not timed).
///
/// # Errors
/// Read-model or bus failures.
pub async fn run_once(
    app: &App,
    events: &[EventEnvelope],
    name: Projection,
    dir: &Path,
) -> Result<(u64, f64)> {
    let path = dir.join(format!("projection-{name}.db"));
    remove_db(&path);
    let read_models = Arc::new(SqliteReadModels::open(&path)?);
    let applied = run_into(app, events, name, read_models).await;
    remove_db(&path);
    applied
}

/// Applies `events` to projection `name` in `read_models` (empty, or at least without this
/// projection's checkpoint) as the worker does; `(events, seconds)` of the consuming part
/// (publishing to the in-process bus is not timed). `app` provides everything but the read
/// models and the bus. Any store: the SQLite file of [`run_once`] or a MongoDB database
/// (`crate::mongo`).
///
/// # Errors
/// Read-model or bus failures, or an event the worker would not acknowledge.
pub async fn run_into(
    app: &App,
    events: &[EventEnvelope],
    name: Projection,
    read_models: Arc<dyn ReadModelStore>,
) -> Result<(u64, f64)> {
    let bus = Arc::new(MemoryBus::new());
    for chunk in events.chunks(1000) {
        bus.publish(chunk).await?;
    }
    let app = App {
        read_models,
        bus: bus.clone(),
        ..app.clone()
    };
    let consumer = name;
    let cfg = WorkerConfig::default();
    let mut sub = bus
        .subscribe(SubscriptionOptions::new(name.name(), cfg.consumer.clone()))
        .await?;
    let total = events.len() as u64;
    let mut done = 0u64;
    let started = Instant::now();
    while done < total {
        let batch = sub.next_batch(cfg.batch, Duration::from_millis(50)).await?;
        if batch.is_empty() {
            bail!("projection {name}: the bus ran dry after {done} of {total} events");
        }
        let results = worker::process(&app, &consumer, &batch, &[]).await?;
        let mut ack = Vec::with_capacity(batch.len());
        for (d, r) in batch.into_iter().zip(results) {
            match r {
                Processed::Applied | Processed::Duplicate => ack.push(d.id),
                other => bail!(
                    "projection {name}: unexpected {other:?} at {}",
                    d.envelope.position
                ),
            }
        }
        done += ack.len() as u64;
        sub.ack(&ack).await?;
    }
    Ok((done, started.elapsed().as_secs_f64()))
}

/// Events/s of decoding and the change function alone (no store), for the same events: how
/// much of a projection's time is its own CPU.
pub fn change_functions_only(events: &[EventEnvelope], name: Projection) -> f64 {
    let started = Instant::now();
    let mut changes = 0usize;
    for env in events {
        if let Ok(event) = env.decode() {
            changes += tektree_projections::project(name, env, &event).len();
        }
    }
    std::hint::black_box(changes);
    crate::stats::rate(events.len() as u64, started.elapsed().as_secs_f64())
}
