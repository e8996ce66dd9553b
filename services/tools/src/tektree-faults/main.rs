//! `tektree-faults`: the fault harness of issue #4 (see docs/reliability.md).
//!
//! Starts real `redis-server` / `nats-server -js` processes with persistence on, runs `tektree`
//! as separate processes (API, relay, one worker process per consumer group and two for the
//! busiest groups), drives a seeded random command workload over HTTP while it SIGKILLs and
//! restarts processes, stops and restarts the bus server, and poisons one or two events for a
//! projection. Then it lets the pipeline settle, re-drives the dead letters and checks the
//! invariants: every command answered 2xx is stored exactly once where it was told, every
//! aggregate is in order, every consumer applied every event exactly once, the dead letters held
//! exactly the poison events, every read model equals a fresh rebuild from a copy of the store,
//! and the `content`, `xp` and `leaderboard` read models hold what an independent oracle
//! computes from the acknowledged commands alone (`oracle.rs`). It prints one JSON summary line
//! on stdout and exits 1 when anything mismatched.

/// The global allocator: mimalloc. A rebuild frees a page of decoded events at a time, and
/// glibc's malloc spent about a quarter of a rebuild's CPU in `malloc`/`free` and their
/// free-list consolidation (`perf`, docs/performance.md, issue #14).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod check;
mod faults;
mod oracle;
mod procs;
mod rng;
mod run;
mod store;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use crate::faults::FaultCounts;
use crate::run::{BusKind, RunConfig, RunReport};
use crate::store::{parse_store, StoreSpec};

/// Which buses to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BusChoice {
    /// Redis Streams only.
    Redis,
    /// NATS JetStream only.
    Nats,
    /// Redis, then NATS.
    Both,
}

#[derive(Parser, Debug)]
#[command(
    name = "tektree-faults",
    version,
    about = "Fault harness: tektree processes on real Redis/NATS under SIGKILLs, bus restarts and poison events, then invariant checks"
)]
struct Cli {
    /// Seed of the workload and the fault plan (default: from the clock; printed in the
    /// summary so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Commands per bus in the small mode (warm-up included).
    #[arg(long, default_value_t = 300)]
    commands: u64,
    /// Faults per bus, poison events not counted (default: 8; with --long one per 6 s).
    #[arg(long)]
    faults: Option<u64>,
    /// Long mode: keep the workload and the faults going this long per bus (`90s`, `30m`,
    /// `1h`, `1h30m`); --commands is then ignored.
    #[arg(long, value_parser = parse_duration)]
    long: Option<Duration>,
    /// Bus.
    #[arg(long, value_enum, default_value = "both")]
    bus: BusChoice,
    /// Store: `sqlite` (a file in the run's directory), `mongodb` (a SecantusDB server the
    /// harness starts with `--sync-on-commit`, and SIGKILLs and restarts as a fault), or a
    /// `mongodb://HOST:PORT/?replicaSet=NAME` URI (a database per run on that server, left
    /// there; no server faults).
    #[arg(long, default_value = "sqlite", value_parser = parse_store)]
    store: StoreSpec,
    /// Directory for the runs' stores, bus data and logs (kept). Default: a temporary
    /// directory, removed at the end (unless --keep and something failed).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Keep the temporary directory (logs, store, bus data) when a run fails.
    #[arg(long)]
    keep: bool,
    /// The `tektree` binary (default: next to this executable).
    #[arg(long)]
    tektree: Option<PathBuf>,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// `tektree api` processes; the clients send each request (and each retry) to the next
    /// one, so a retried command may be answered by another API than its first attempt.
    #[arg(long, default_value_t = 1)]
    apis: usize,
    /// `tektree relay` processes publishing from the same store to the same bus.
    #[arg(long, default_value_t = 1)]
    relays: usize,
    /// Commands started per second over all clients (0: as fast as the API answers). Spreads
    /// the small mode's faults over its workload.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Bound on each wait for the pipeline to settle.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    settle_timeout: Duration,
}

/// `90`, `90s`, `30m`, `1h`, `1h30m`, `2m30s`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 30m, 1h30m"))?;
        number.clear();
        total += match c {
            's' => n,
            'm' => n * 60,
            'h' => n * 3600,
            _ => return Err(format!("invalid duration unit {c:?} in {s:?} (s, m, h)")),
        };
    }
    if !number.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: a number without a unit at the end"
        ));
    }
    Ok(Duration::from_secs(total))
}

fn tektree_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("this executable has no directory")?
            .join("tektree"),
    };
    if !path.is_file() {
        bail!(
            "the tektree binary is not at {} (build it with `cargo build -p tektree-services -p tektree-tools`, or pass --tektree PATH)",
            path.display()
        );
    }
    Ok(path)
}

fn run_json(r: &RunReport, seed: u64) -> serde_json::Value {
    json!({
        "bus": r.bus.name(),
        "store": r.store,
        "apis": r.processes.0,
        "relays": r.processes.1,
        "seed": seed,
        "commands": r.commands,
        "ok": r.ok,
        "refused": r.refused.values().sum::<u64>(),
        "retries": r.retries,
        "rate_limited": r.rate_limited,
        "events": r.events,
        "faults": r.faults,
        "faults_total": r.faults.total(),
        "exits": r.exits,
        "mismatches": r.mismatch_total(),
        "mismatch_categories": r.mismatches,
        "duration_s": (r.duration.as_secs_f64() * 10.0).round() / 10.0,
    })
}

async fn main_inner(cli: Cli) -> Result<bool> {
    let started = Instant::now();
    let seed = cli.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(42)
    });
    let tektree = tektree_binary(cli.tektree.clone())?;
    let faults = cli.faults.unwrap_or(match cli.long {
        Some(d) => (d.as_secs() / 6).max(1),
        None => 8,
    });
    let buses: Vec<BusKind> = match cli.bus {
        BusChoice::Redis => vec![BusKind::Redis],
        BusChoice::Nats => vec![BusKind::Nats],
        BusChoice::Both => vec![BusKind::Redis, BusKind::Nats],
    };
    let (root, temp) = match cli.workdir.clone() {
        Some(dir) => (dir, None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("tektree-faults-")
                .tempdir()
                .context("creating a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    eprintln!(
        "tektree-faults: seed {seed}, workdir {}, tektree {}",
        root.display(),
        tektree.display()
    );
    let outcome = run_all(
        &cli_runs(&buses, seed, &cli, faults, &tektree, &root),
        started,
    )
    .await;
    let ok = matches!(outcome, Ok(true));
    if let Some(t) = temp {
        if !ok && cli.keep {
            let kept = t.keep();
            eprintln!("tektree-faults: kept {}", kept.display());
        }
    }
    outcome
}

/// The run settings, one per bus.
fn cli_runs(
    buses: &[BusKind],
    seed: u64,
    cli: &Cli,
    faults: u64,
    tektree: &Path,
    root: &Path,
) -> Vec<RunConfig> {
    buses
        .iter()
        .map(|&bus| RunConfig {
            bus,
            store: cli.store.clone(),
            seed,
            commands: cli.commands,
            faults,
            long: cli.long,
            clients: cli.clients.max(1),
            apis: cli.apis.max(1),
            relays: cli.relays.max(1),
            rate: cli.rate,
            tektree: tektree.to_path_buf(),
            dir: root.join(format!("{}-{seed}", bus.name())),
            settle_timeout: cli.settle_timeout,
        })
        .collect()
}

/// Runs every configuration, prints the summary line; `Ok(true)` when nothing mismatched.
async fn run_all(configs: &[RunConfig], started: Instant) -> Result<bool> {
    let seed = configs.first().map_or(0, |c| c.seed);
    let mut reports = Vec::new();
    for cfg in configs {
        reports.push(run::run(cfg).await?);
    }
    let mismatches: u64 = reports.iter().map(RunReport::mismatch_total).sum();
    let line = if reports.len() == 1 {
        let mut v = run_json(&reports[0], seed);
        v["duration_s"] = json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        v
    } else {
        let faults = reports
            .iter()
            .fold(FaultCounts::default(), |a, r| a.add(&r.faults));
        json!({
            "bus": "both",
            "store": reports.first().map_or("", |r| r.store),
            "seed": seed,
            "commands": reports.iter().map(|r| r.commands).sum::<u64>(),
            "events": reports.iter().map(|r| r.events).sum::<u64>(),
            "faults": faults,
            "faults_total": faults.total(),
            "exits": reports.iter().map(|r| r.exits).sum::<u64>(),
            "mismatches": mismatches,
            "duration_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "runs": reports.iter().map(|r| run_json(r, seed)).collect::<Vec<_>>(),
        })
    };
    println!("{line}");
    Ok(mismatches == 0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tektree-faults: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tektree-faults: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2m5s").unwrap(), Duration::from_secs(125));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("1h5").is_err());
        assert!(parse_duration("").is_err());
    }
}
