//! Scenario 4, **replay**: `tektree_services::replay::rebuild_beside` of one projection over
//! the corpus (a new version beside the live one, pages of `--replay-page` events, one
//! read-model transaction per page, then the switch), run in a
//! child process (`tektree-bench --replay-child STORE --projection NAME`, exactly what
//! `tektree-replay rebuild` does) so that its peak RSS (`VmHWM`) is the rebuild's own.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tektree_event_store::SqliteStore;
use tektree_projections::{ReadModelStore, SqliteReadModels};
use tektree_services::replay::rebuild_beside_paged;

use crate::machine::peak_rss_kib;
use tektree_event_store::EventLog;

/// The child's work: rebuilds `projection` in the SQLite file `store` and returns
/// `{"events", "secs", "peak_rss_kib"}`. Checks that every event was applied (the
/// projection's checkpoint is at the head and its applied count equals the events read), so
/// a store whose per-aggregate sequences had gaps (events held back) cannot pass for fast.
///
/// # Errors
/// Store, read-model or decoding failures; an event not applied.
pub async fn child(store: &Path, projection: &str, page: usize) -> Result<Value> {
    let events = SqliteStore::open(store)?;
    let read_models = SqliteReadModels::open(store)?;
    let started = Instant::now();
    let report = rebuild_beside_paged(&events, &read_models, projection.parse()?, page, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .await?;
    if !report.switched {
        bail!("rebuild of {projection} did not switch");
    }
    let n = report.events;
    let secs = started.elapsed().as_secs_f64();
    let head = events.head().await?.position;
    let checkpoint = read_models
        .checkpoints()
        .await?
        .into_iter()
        .find(|c| c.name == projection)
        .context("no checkpoint after the rebuild")?;
    if checkpoint.applied != n || checkpoint.checkpoint != head {
        bail!(
            "rebuild of {projection} applied {} of {n} events, checkpoint {} of head {head}",
            checkpoint.applied,
            checkpoint.checkpoint
        );
    }
    Ok(json!({"events": n, "secs": secs, "peak_rss_kib": peak_rss_kib()}))
}

/// Runs the child for `projection` over `store`; `(events, seconds, peak RSS KiB)`.
///
/// # Errors
/// When the child fails or prints no result.
pub async fn run_once(store: &Path, projection: &str, page: usize) -> Result<(u64, f64, u64)> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let out = tokio::process::Command::new(exe)
        .arg("--replay-child")
        .arg(store)
        .arg("--projection")
        .arg(projection)
        .arg("--replay-page")
        .arg(page.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running the rebuild child")?;
    if !out.status.success() {
        bail!(
            "rebuild child for {projection} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .context("the rebuild child printed nothing")?;
    let v: Value = serde_json::from_str(line).context("the rebuild child's output")?;
    Ok((
        v["events"].as_u64().unwrap_or(0),
        v["secs"].as_f64().unwrap_or(0.0),
        v["peak_rss_kib"].as_u64().unwrap_or(0),
    ))
}
