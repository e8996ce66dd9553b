//! `tektree-replay`: operator tool. See `tektree-replay --help` and docs/replay.md.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tektree_projections::Projection;
use tektree_runtime::app::App;
use tektree_runtime::config::{load_rules, DEFAULT_BUS, DEFAULT_STORE};
use tektree_runtime::replay::{events, rebuild, EventForm, EventSelection};
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
    /// Reset a projection and rebuild it from the event store (not the bus).
    Rebuild {
        /// `xp`, `leaderboard`, `quota` or `content`.
        projection: Option<Projection>,
        /// Rebuild all four.
        #[arg(long, conflicts_with = "projection")]
        all: bool,
        /// No progress bar (for scripts and CI).
        #[arg(long)]
        quiet: bool,
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
        } => {
            let names: Vec<Projection> = match (projection, all) {
                (_, true) => Projection::ALL.into(),
                (Some(p), false) => vec![p],
                (None, false) => bail!("name a projection or pass --all"),
            };
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
                let n = rebuild(app.store.as_ref(), app.read_models.as_ref(), name, |p| {
                    bar.set_position(p)
                })
                .await?;
                bar.finish();
                writeln!(out, "{{\"projection\":\"{name}\",\"events\":{n}}}")?;
            }
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
            if json {
                let v = serde_json::json!({"head_position": head.position, "events": head.events,
                    "outbox_backlog": backlog, "consumers": rows});
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
