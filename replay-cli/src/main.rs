//! `tektree-replay`: operator tool. See `tektree-replay --help` and docs/replay.md.

/// The global allocator: mimalloc. A rebuild frees a page of decoded events at a time, and
/// glibc's malloc spent about a quarter of a rebuild's CPU in `malloc`/`free` and their
/// free-list consolidation (`perf`, docs/performance.md, issue #14).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tektree_projections::{Projection, RebuildPhase, RebuildStatus};
use tektree_runtime::app::App;
use tektree_runtime::config::{load_rules, DEFAULT_BUS, DEFAULT_STORE};
use tektree_runtime::replay::{events, rebuild, rebuild_beside, EventForm, EventSelection};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    name = "tektree-replay",
    version,
    about = "Rebuild projections and inspect event history"
)]
struct Cli {
    /// Event store: `sqlite://PATH` or `mongodb://…` (see docs/mongodb.md).
    #[arg(long, global = true, env = "TEKTREE_STORE", default_value = DEFAULT_STORE)]
    store: String,
    /// Bus holding dead letters: `memory`, `redis://…` or `nats://…` (only `dead-letters` and
    /// `redrive` use it).
    #[arg(long, global = true, env = "TEKTREE_BUS", default_value = DEFAULT_BUS)]
    bus: String,
    /// Rules file (only needed to list policy consumers; read models do not depend on it).
    #[arg(long, global = true, env = "TEKTREE_RULES")]
    rules: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Rebuild a projection from the event store (not the bus) beside its live read model,
    /// while the server keeps running, and switch to it once it has caught up (blue/green).
    /// Ctrl-C stops it after the current page; run the same command again to resume.
    Rebuild {
        /// `xp`, `leaderboard`, `quota`, `content` or `tags`.
        projection: Option<Projection>,
        /// Rebuild all five.
        #[arg(long, conflicts_with = "projection")]
        all: bool,
        /// No progress bar (for scripts and CI).
        #[arg(long)]
        quiet: bool,
        /// Stopped-world rebuild: reset the live read model and replay into it (stop the
        /// projection's workers first; queries see it partially rebuilt meanwhile).
        #[arg(long, conflicts_with = "cancel")]
        in_place: bool,
        /// Cancel the rebuild in progress (its rows are dropped; the live read model is
        /// untouched).
        #[arg(long)]
        cancel: bool,
    },
    /// Every consumer's checkpoint and lag behind the store's head.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List dead letters (events a consumer group gave up on) as JSON lines.
    DeadLetters {
        /// Only this group (`xp`, `policy.gamification`, …).
        #[arg(long)]
        group: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Apply a dead letter for its group now (after fixing its cause) and remove it.
    Redrive {
        /// The dead letter's id (from `dead-letters`).
        id: String,
    },
    /// Print events as JSON lines, upcast to the current version of each type (as the relay
    /// publishes them and consumers read them).
    Events {
        /// `TYPE/ID`, e.g. `content/5b0e…`: one aggregate's history.
        #[arg(long)]
        aggregate: Option<String>,
        /// Start after this global position (without --aggregate).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events (without --aggregate).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the events exactly as stored (stored `event_version` and payload), without
        /// upcasting older versions.
        #[arg(long)]
        stored: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let app = App::open(&cli.store, &cli.bus, load_rules(cli.rules.as_deref())?)
        .await
        .with_context(|| format!("opening {}", cli.store))?;
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Rebuild {
            projection,
            all,
            quiet,
            in_place,
            cancel,
        } => {
            let names: Vec<Projection> = match (projection, all) {
                (_, true) => Projection::ALL.into(),
                (Some(p), false) => vec![p],
                (None, false) => bail!("name a projection or pass --all"),
            };
            let how = if cancel {
                How::Cancel
            } else if in_place {
                How::InPlace
            } else {
                How::Beside
            };
            rebuild_command(&app, &names, how, quiet, &mut out).await?;
        }
        Command::Status { json } => {
            let head = app.store.head().await?;
            let cps = app.read_models.checkpoints().await?;
            let names: Vec<String> = app.consumers().iter().map(|c| c.name().into()).collect();
            let rows: Vec<serde_json::Value> = names
                .iter()
                .map(|n| {
                    let cp = cps.iter().find(|c| &c.name == n);
                    let checkpoint = cp.map(|c| c.checkpoint).unwrap_or(0);
                    serde_json::json!({
                        "name": n,
                        "checkpoint": checkpoint,
                        "applied": cp.map(|c| c.applied).unwrap_or(0),
                        "lag": head.position.saturating_sub(checkpoint),
                    })
                })
                .collect();
            let backlog = app.store.outbox_backlog().await?;
            let rebuilds = rebuild_rows(&app, head.position).await?;
            if json {
                let v = serde_json::json!({"head_position": head.position, "events": head.events,
                    "outbox_backlog": backlog, "consumers": rows, "rebuilds": rebuilds});
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "head position {}  events {}  outbox backlog {}",
                    head.position, head.events, backlog
                )?;
                writeln!(
                    out,
                    "{:<22} {:>12} {:>12} {:>10}",
                    "consumer", "checkpoint", "applied", "lag"
                )?;
                for r in rows {
                    writeln!(
                        out,
                        "{:<22} {:>12} {:>12} {:>10}",
                        r["name"].as_str().unwrap_or(""),
                        r["checkpoint"],
                        r["applied"],
                        r["lag"]
                    )?;
                }
                print_rebuilds(&rebuilds, &mut out)?;
            }
        }
        Command::DeadLetters { group, limit } => {
            for d in app.bus.dead_letters(group.as_deref(), limit).await? {
                let v = serde_json::json!({"id": d.id, "group": d.group, "reason": d.reason,
                    "delivery_count": d.delivery_count, "envelope": d.envelope});
                writeln!(out, "{v}")?;
            }
        }
        Command::Redrive { id } => {
            let r = tektree_runtime::worker::redrive(&app, &id).await?;
            writeln!(out, "{{\"redriven\":\"{id}\",\"result\":\"{r:?}\"}}")?;
        }
        Command::Events {
            aggregate,
            after,
            limit,
            stored,
        } => {
            let selection = match aggregate {
                Some(a) => {
                    let (t, id) = a
                        .split_once('/')
                        .context("--aggregate takes TYPE/ID, e.g. content/<uuid>")?;
                    let id = Uuid::parse_str(id).with_context(|| format!("invalid id {id:?}"))?;
                    EventSelection::Aggregate {
                        aggregate_type: t.into(),
                        aggregate_id: id,
                    }
                }
                None => EventSelection::After { after, limit },
            };
            let form = if stored {
                EventForm::Stored
            } else {
                EventForm::Upcast
            };
            for e in events(app.store.as_ref(), &selection, form).await? {
                writeln!(out, "{}", serde_json::to_string(&e)?)?;
            }
        }
    }
    Ok(())
}

/// What `rebuild` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// Beside the live read model, then switch (the default).
    Beside,
    /// Reset and replay in place (`--in-place`).
    InPlace,
    /// Cancel the rebuild in progress (`--cancel`).
    Cancel,
}

/// `rebuild`: one JSON line per projection.
async fn rebuild_command(
    app: &App,
    names: &[Projection],
    how: How,
    quiet: bool,
    out: &mut impl Write,
) -> Result<()> {
    if how == How::Cancel {
        for name in names {
            let cancelled = app.read_models.rebuild_cancel(*name).await?;
            writeln!(
                out,
                "{}",
                serde_json::json!({"projection": name, "cancelled": cancelled})
            )?;
        }
        return Ok(());
    }
    // Ctrl-C: stop after the current page; the rebuild stays in progress, to resume.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let head = app.store.head().await?;
    for name in names {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(head.position)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:40}] {pos}/{len} events {per_sec} eta {eta}",
            )?
            .progress_chars("=> "),
        );
        bar.set_prefix(name.name());
        let line = if how == How::InPlace {
            let n = rebuild(app.store.as_ref(), app.read_models.as_ref(), *name, |p| {
                bar.set_position(p)
            })
            .await?;
            serde_json::json!({"projection": name, "events": n})
        } else {
            let r = rebuild_beside(app.store.as_ref(), app.read_models.as_ref(), *name, |p| {
                bar.set_length(bar.length().unwrap_or(0).max(p));
                bar.set_position(p);
                if interrupted.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .await?;
            serde_json::json!({"projection": name, "events": r.events,
                "generation": r.generation, "resumed_from": r.resumed_from,
                "switched": r.switched})
        };
        bar.finish();
        writeln!(out, "{line}")?;
        if interrupted.load(Ordering::SeqCst) {
            eprintln!("interrupted: run the same command again to resume, or --cancel");
            break;
        }
    }
    Ok(())
}

/// The latest rebuild of each projection for `status`, with its speed (events applied per
/// second since it began) and, while building, the seconds left at that speed to reach
/// `head`.
async fn rebuild_rows(app: &App, head: u64) -> Result<Vec<serde_json::Value>> {
    let now = chrono::Utc::now().timestamp_millis();
    Ok(app
        .read_models
        .rebuilds()
        .await?
        .iter()
        .map(|r: &RebuildStatus| {
            let end = r.finished_at_ms.unwrap_or(now);
            let secs = (end - r.started_at_ms).max(1) as f64 / 1000.0;
            let rate = r.applied as f64 / secs;
            let eta = (r.phase == RebuildPhase::Building && rate > 0.0)
                .then(|| head.saturating_sub(r.checkpoint) as f64 / rate);
            serde_json::json!({"projection": r.projection, "generation": r.generation,
                "phase": r.phase, "checkpoint": r.checkpoint, "applied": r.applied,
                "started_at_ms": r.started_at_ms, "finished_at_ms": r.finished_at_ms,
                "events_per_sec": rate.round(), "eta_secs": eta.map(f64::ceil)})
        })
        .collect())
}

/// The rebuild table of `status`.
fn print_rebuilds(rows: &[serde_json::Value], out: &mut impl Write) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:<12} {:>4} {:<10} {:>12} {:>12} {:>10} {:>8}",
        "rebuild", "gen", "phase", "checkpoint", "applied", "events/s", "eta s"
    )?;
    for r in rows {
        let text = |k: &str| r[k].as_str().unwrap_or("").to_string();
        writeln!(
            out,
            "{:<12} {:>4} {:<10} {:>12} {:>12} {:>10} {:>8}",
            text("projection"),
            r["generation"],
            text("phase"),
            r["checkpoint"],
            r["applied"],
            r["events_per_sec"],
            r["eta_secs"]
                .as_f64()
                .map(|e| e.to_string())
                .unwrap_or("-".into())
        )?;
    }
    Ok(())
}
