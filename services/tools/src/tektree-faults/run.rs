//! One run on one bus: servers, processes, warm-up and poison, workload under faults, settle,
//! checks.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tektree_domain::Rules;
use tektree_outbox::test_support::{NatsServer, RedisServer, Stop};
use tektree_services::app::App;
use tokio::sync::watch;

use crate::check::{self, Mismatches, Poison};
use crate::faults::{self, FaultCounts, Server, Servers};
use crate::oracle;
use crate::procs::{Procs, Role};
use crate::rng::Rng;
use crate::store::{RunStore, StoreSpec};
use crate::workload::Workload;

/// Consumer groups with two worker processes (the most work), so that a group's deliveries
/// are shared (and reclaimed) between processes; every other group has one.
const BUSY_GROUPS: [&str; 3] = ["xp", "content", "policy.gamification"];
/// The policies' consumer groups (the projections' come from `Projection::ALL`).
const POLICY_GROUPS: [&str; 2] = ["policy.gamification", "policy.subscription"];

/// Every consumer group and its number of worker processes: every projection (a new one gets
/// its worker without a change here) and both policies.
fn workers() -> Vec<(&'static str, usize)> {
    tektree_projections::Projection::ALL
        .iter()
        .map(|p| p.name())
        .chain(POLICY_GROUPS)
        .map(|g| (g, if BUSY_GROUPS.contains(&g) { 2 } else { 1 }))
        .collect()
}
/// Ordinary users and questions of the warm-up.
const WARM_UP_USERS: usize = 24;
/// See [`WARM_UP_USERS`].
const WARM_UP_QUESTIONS: usize = 6;
/// The clients pause while a consumer (other than a poisoned one) lags more than this many
/// positions behind the store's head, and resume below [`RESUME_LAG`].
const PAUSE_LAG: u64 = 2_000;
/// See [`PAUSE_LAG`].
const RESUME_LAG: u64 = 500;
/// No re-drive before this long after the last fault or process exit: a worker killed between
/// dead-lettering a delivery and acknowledging it leaves it pending for the group's `min_idle`
/// (10 s); it must be reclaimed (and found already dead-lettered) before the re-drive.
const QUIET_BEFORE_REDRIVE: Duration = Duration::from_secs(15);

pub use tektree_tools::BusKind;

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Which bus.
    pub bus: BusKind,
    /// Which store.
    pub store: StoreSpec,
    /// Seed of the workload and the fault plan.
    pub seed: u64,
    /// Commands in all (small mode; ignored with `long`).
    pub commands: u64,
    /// Faults to inject (poison events not included).
    pub faults: u64,
    /// Long mode: keep the workload and the faults going this long.
    pub long: Option<Duration>,
    /// Concurrent HTTP clients.
    pub clients: usize,
    /// `tektree api` processes (the clients spread their requests over them).
    pub apis: usize,
    /// `tektree relay` processes.
    pub relays: usize,
    /// Commands started per second over all clients (0: no limit).
    pub rate: f64,
    /// The `tektree` binary.
    pub tektree: PathBuf,
    /// This run's directory (store, bus data, logs).
    pub dir: PathBuf,
    /// Bound on each settle.
    pub settle_timeout: Duration,
}

/// What one run did and found.
#[derive(Debug)]
pub struct RunReport {
    /// Which bus.
    pub bus: BusKind,
    /// Which store (`sqlite`, `mongodb`).
    pub store: &'static str,
    /// `tektree api` and `tektree relay` processes.
    pub processes: (usize, usize),
    /// Commands sent.
    pub commands: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Not answered 2xx, by status and problem type.
    pub refused: BTreeMap<String, u64>,
    /// Requests sent again (connection errors, 5xx, conflicts, rate limits).
    pub retries: u64,
    /// `429 rate_limited` answers waited out.
    pub rate_limited: u64,
    /// Events in the store at the end.
    pub events: u64,
    /// Faults injected.
    pub faults: FaultCounts,
    /// Processes that exited by themselves (and were restarted).
    pub exits: u64,
    /// Mismatches by category.
    pub mismatches: BTreeMap<String, u64>,
    /// Wall time.
    pub duration: Duration,
}

impl RunReport {
    /// Total mismatches.
    pub fn mismatch_total(&self) -> u64 {
        self.mismatches.values().sum()
    }
}

/// A timestamped log on stderr and in `<dir>/harness.log`.
#[derive(Clone)]
pub struct Log {
    started: Instant,
    tag: &'static str,
    file: Arc<Mutex<std::fs::File>>,
}

impl Log {
    fn new(dir: &Path, tag: &'static str) -> Result<Log> {
        let path = dir.join("harness.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Log {
            started: Instant::now(),
            tag,
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Writes one line.
    pub fn line(&self, msg: impl AsRef<str>) {
        let line = format!(
            "[{:>7.1}s {}] {}",
            self.started.elapsed().as_secs_f64(),
            self.tag,
            msg.as_ref()
        );
        eprintln!("{line}");
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// `name` with the number `k` when there are several (`api`, or `api-1`, `api-2`).
fn numbered(name: &str, k: usize, of: usize) -> String {
    if of > 1 {
        format!("{name}-{k}")
    } else {
        name.to_string()
    }
}

/// Runs once on `cfg.bus`.
pub async fn run(cfg: &RunConfig) -> Result<RunReport> {
    let started = Instant::now();
    if std::fs::read_dir(&cfg.dir).is_ok_and(|mut d| d.next().is_some()) {
        anyhow::bail!(
            "{} is not empty (a run's store and bus data must start empty): choose another --workdir or --seed",
            cfg.dir.display()
        );
    }
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
    let log = Log::new(&cfg.dir, cfg.bus.name())?;
    let mut rng = Rng::new(cfg.seed);
    log.line(format!(
        "run in {} (seed {}, {} faults, {})",
        cfg.dir.display(),
        cfg.seed,
        cfg.faults,
        match cfg.long {
            Some(d) => format!("long mode for {:.0} s", d.as_secs_f64()),
            None => format!("{} commands", cfg.commands),
        }
    ));

    // Servers and the store.
    let data = cfg.dir.join(format!("{}-data", cfg.bus.name()));
    let bus = cfg.bus;
    let (spec, dir, tag) = (
        cfg.store.clone(),
        cfg.dir.clone(),
        format!("{}_{}", cfg.bus.name(), cfg.seed),
    );
    let (server, store, store_server) =
        tokio::task::spawn_blocking(move || -> Result<(Server, RunStore, Option<Server>)> {
            let bus = match bus {
                BusKind::Redis => Server::Redis(RedisServer::start_persistent(data)?),
                BusKind::Nats => Server::Nats(NatsServer::start_persistent(data)?),
            };
            let (store, mongo) = RunStore::prepare(&spec, &dir, &tag)?;
            Ok((bus, store, mongo.map(Server::Mongo)))
        })
        .await??;
    let bus_url = server.url();
    let servers = Servers {
        bus: Arc::new(Mutex::new(server)),
        store: store_server.map(|s| Arc::new(Mutex::new(s))),
    };
    let store_url = store.url();
    let app = App::open(&store_url, &bus_url, Rules::default())
        .await
        .context("opening the store and the bus")?;
    log.line(format!("bus {bus_url}, store {store_url}"));

    // Processes.
    let secret = rng.hex(32);
    let procs = Procs::new(
        cfg.tektree.clone(),
        vec![
            "--store".into(),
            store_url.clone(),
            "--bus".into(),
            bus_url.clone(),
        ],
        cfg.dir.join("logs"),
    )?;
    let procs = Arc::new(Mutex::new(procs));
    let mut bases = Vec::new();
    {
        let mut p = procs.lock().expect("procs");
        for k in 1..=cfg.apis.max(1) {
            // An API is restarted on its port: keep it out of the ephemeral range.
            let port = tektree_outbox::test_support::restartable_port();
            bases.push(format!("http://127.0.0.1:{port}"));
            p.add(
                &numbered("api", k, cfg.apis),
                Role::Api,
                vec!["api".into(), "--listen".into(), format!("127.0.0.1:{port}")],
                vec![("TEKTREE_JWT_HS256_SECRET".into(), secret.clone())],
            )?;
        }
        for k in 1..=cfg.relays.max(1) {
            p.add(
                &numbered("relay", k, cfg.relays),
                Role::Relay,
                vec!["relay".into()],
                vec![],
            )?;
        }
    }
    // Poison: 1–2 events, each for a random projection; those projections' workers start only
    // once the events are known, with `--fail-on`.
    let all = tektree_projections::Projection::ALL;
    let poison_groups: Vec<&str> = (0..rng.between(1, 2))
        .map(|_| all[rng.index(all.len())].name())
        .collect();
    let poisoned: HashSet<String> = poison_groups.iter().map(|s| s.to_string()).collect();
    let start_workers =
        |groups: &dyn Fn(&str) -> bool, fail_on: &BTreeMap<String, Vec<String>>| -> Result<()> {
            let mut p = procs.lock().expect("procs");
            for (group, n) in workers() {
                if !groups(group) {
                    continue;
                }
                for k in 1..=n {
                    let mut args = vec!["worker".into(), "--projection".into(), group.to_string()];
                    if let Some(ids) = fail_on.get(group) {
                        args.push("--fail-on".into());
                        args.push(ids.join(","));
                    }
                    p.add(
                        &format!("worker-{group}-{k}"),
                        Role::Worker(group.to_string()),
                        args,
                        vec![],
                    )?;
                }
            }
            Ok(())
        };
    start_workers(&|g| !poisoned.contains(g), &BTreeMap::new())?;

    let workload = Arc::new(Workload::new(bases, &secret, cfg.rate)?);
    workload
        .wait_healthy(Duration::from_secs(120))
        .await
        .context("waiting for the API")?;
    let candidates = workload
        .warm_up(&mut rng, WARM_UP_USERS, WARM_UP_QUESTIONS)
        .await;
    let mut poison: Vec<Poison> = Vec::new();
    let mut pool = candidates;
    for group in &poison_groups {
        if pool.is_empty() {
            break;
        }
        let (question, e) = pool.remove(rng.index(pool.len()));
        poison.push(Poison {
            group: group.to_string(),
            event_id: e.event_id,
            aggregate_type: "content".into(),
            aggregate_id: question,
            sequence: e.sequence,
        });
    }
    let mut fail_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &poison {
        fail_on
            .entry(p.group.clone())
            .or_default()
            .push(p.event_id.to_string());
        log.line(format!(
            "poison: {} fails on event {} (question {} posted)",
            p.group, p.event_id, p.aggregate_id
        ));
    }
    start_workers(&|g| poisoned.contains(g), &fail_on)?;
    let counts = Arc::new(Mutex::new(FaultCounts {
        poison: poison.len() as u64,
        ..FaultCounts::default()
    }));

    // Background: restart processes that exit; pace the clients; report progress.
    let (stop_tx, stop_rx) = watch::channel(false);
    let monitor = {
        let (procs, log, mut stop) = (procs.clone(), log.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                let lines = procs.lock().expect("procs").poll();
                match lines {
                    Ok(lines) => lines.iter().for_each(|l| log.line(l)),
                    Err(e) => log.line(format!("restarting a process failed: {e:#}")),
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };
    let pacer = {
        let (app, log, workload, mut stop) =
            (app.clone(), log.clone(), workload.clone(), stop_rx.clone());
        let skip = poisoned.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut last_report = Instant::now();
            loop {
                if let Ok(lag) = check::max_lag(&app, &skip).await {
                    let paused = workload.paused.load(Ordering::SeqCst);
                    if !paused && lag > PAUSE_LAG {
                        workload.paused.store(true, Ordering::SeqCst);
                        log.line(format!("pipeline lags {lag} positions: clients pause"));
                    } else if paused && lag < RESUME_LAG {
                        workload.paused.store(false, Ordering::SeqCst);
                        log.line(format!("pipeline lags {lag} positions: clients resume"));
                    }
                    if last_report.elapsed() >= Duration::from_secs(10) {
                        last_report = Instant::now();
                        let c = *counts.lock().expect("counts");
                        let head = app.store.head().await.map(|h| h.position).unwrap_or(0);
                        log.line(format!(
                            "progress: {} commands, head {head}, max lag {lag}, {} faults",
                            workload.completed.load(Ordering::SeqCst),
                            c.total()
                        ));
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };

    // Workload and faults.
    let warm_up_commands = workload.completed.load(Ordering::SeqCst);
    let limit = match cfg.long {
        Some(_) => None,
        None => Some(cfg.commands.saturating_sub(warm_up_commands)),
    };
    let mut clients = Vec::new();
    for i in 0..cfg.clients {
        let (workload, crng) = (workload.clone(), rng.fork(i as u64));
        clients.push(tokio::spawn(
            async move { workload.client(crng, limit).await },
        ));
    }
    let plan = faults::plan(&mut rng, cfg.faults, servers.store.is_some());
    let mut frng = rng.fork(1_000);
    let last_fault = Arc::new(Mutex::new(Instant::now()));
    let injector = {
        let (procs, servers, counts, log, workload, last_fault) = (
            procs.clone(),
            servers.clone(),
            counts.clone(),
            log.clone(),
            workload.clone(),
            last_fault.clone(),
        );
        let (long, total) = (cfg.long, cfg.commands);
        tokio::spawn(async move {
            // When each fault fires: after a number of finished commands (small mode) or at
            // an instant (long mode), both seeded.
            let n = plan.len() as u64;
            let mut at_commands: Vec<u64> = (0..n)
                .map(|_| {
                    let lo = warm_up_commands + 1;
                    let hi = (total * 9 / 10).max(lo);
                    frng.between(lo, hi)
                })
                .collect();
            at_commands.sort_unstable();
            let t0 = Instant::now();
            let mut at_times: Vec<Duration> = (0..n)
                .map(|_| {
                    let span = long.unwrap_or_default().as_millis() as u64;
                    Duration::from_millis(frng.below(span.max(1)))
                })
                .collect();
            at_times.sort_unstable();
            let mut outage: Option<tokio::task::JoinHandle<Result<String>>> = None;
            let end_outage = |outage: Option<tokio::task::JoinHandle<Result<String>>>| {
                let log = log.clone();
                async move {
                    if let Some(task) = outage {
                        match task.await {
                            Ok(Ok(line)) => log.line(line),
                            Ok(Err(e)) => log.line(format!("a server did not come back: {e:#}")),
                            Err(e) => log.line(format!("the outage task failed: {e}")),
                        }
                    }
                }
            };
            for (i, kind) in plan.into_iter().enumerate() {
                loop {
                    let due = match long {
                        Some(_) => t0.elapsed() >= at_times[i],
                        None => workload.completed.load(Ordering::SeqCst) >= at_commands[i],
                    };
                    if due || workload.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if outage.as_ref().is_some_and(|t| t.is_finished()) {
                        end_outage(outage.take()).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if kind.is_outage()
                    || matches!(
                        kind,
                        faults::FaultKind::BusWipe | faults::FaultKind::Restore
                    )
                {
                    // One outage at a time; a wipe and a restore need the servers up.
                    end_outage(outage.take()).await;
                }
                match faults::inject(kind, &mut frng, &procs, &servers, &counts).await {
                    Ok(injected) => {
                        log.line(format!("fault {}: {}", i + 1, injected.line));
                        if injected.outage.is_some() {
                            outage = injected.outage;
                        }
                    }
                    Err(e) => log.line(format!("fault {} ({kind:?}) failed: {e:#}", i + 1)),
                }
                *last_fault.lock().expect("last fault") = Instant::now();
            }
            end_outage(outage.take()).await;
            *last_fault.lock().expect("last fault") = Instant::now();
        })
    };
    if let Some(d) = cfg.long {
        tokio::time::sleep(d).await;
        workload.stop.store(true, Ordering::SeqCst);
        workload.paused.store(false, Ordering::SeqCst);
    }
    for c in clients {
        c.await.context("a client task failed")?;
    }
    // Small mode: faults not reached by the workload happen now; long mode: none are left.
    injector.await.context("the fault task failed")?;
    let _ = stop_tx.send(true);
    pacer.await.context("the pacer failed")?;
    // From here on, the settle loops restart exited processes (`poll`).
    monitor.await.context("the monitor failed")?;
    let stats = workload.stats();
    log.line(format!(
        "workload done: {} commands, {} answered 2xx, {} retried requests",
        stats.sent, stats.ok, stats.retries
    ));

    // Settle, dead letters, re-drive, settle again.
    let mut mismatches = Mismatches::default();
    let disarmed = procs.lock().expect("procs").disarm()?;
    if !disarmed.is_empty() {
        log.line(format!(
            "restarted without their fault hook (it had not fired): {}",
            disarmed.join(", ")
        ));
    }
    let poll = || {
        if let Ok(lines) = procs.lock().expect("procs").poll() {
            lines.iter().for_each(|l| log.line(l));
        }
    };
    loop {
        let last = (*last_fault.lock().expect("last fault"))
            .max(procs.lock().expect("procs").last_disturbance);
        if last.elapsed() >= QUIET_BEFORE_REDRIVE {
            break;
        }
        poll();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expected: HashSet<(String, uuid::Uuid)> = poison
        .iter()
        .map(|p| (p.group.clone(), p.event_id))
        .collect();
    let settled = check::settle(
        &app,
        &poisoned,
        cfg.settle_timeout,
        |dls| {
            dls.iter()
                .map(|d| (d.group.clone(), d.envelope.event_id))
                .collect::<HashSet<_>>()
                .is_superset(&expected)
        },
        poll,
    )
    .await;
    match settled {
        Ok(()) => log.line("settled (poisoned projections excepted)"),
        Err(e) => mismatches.add("settle", format!("before the re-drive: {e:#}")),
    }
    let dls = check::dead_letters(&app).await?;
    check::check_dead_letters(&dls, &poison, &mut mismatches);
    check::check_held_back(&store, &poison, &mut mismatches).await?;
    let redriven = check::redrive_all(&app, &mut mismatches).await?;
    log.line(format!("re-drove {redriven} dead letter(s)"));
    match check::settle(
        &app,
        &HashSet::new(),
        cfg.settle_timeout,
        |dls| dls.is_empty(),
        poll,
    )
    .await
    {
        Ok(()) => log.line("settled"),
        Err(e) => mismatches.add("settle", format!("after the re-drive: {e:#}")),
    }

    // Everything stops; the checks read what is on disk.
    procs.lock().expect("procs").kill_all();
    let (exits, stats_p, exit_log) = {
        let p = procs.lock().expect("procs");
        (p.stats.unexpected_exits, p.stats, p.exit_log.clone())
    };
    {
        let mut c = counts.lock().expect("counts");
        c.worker_abort = stats_p.worker_aborts;
        c.relay_abort = stats_p.relay_aborts;
    }
    let records = workload.records();
    let events = check::check_store(&app, &store, &records, &mut mismatches).await?;
    let leftover = check::dead_letters(&app).await?;
    for d in &leftover {
        mismatches.add(
            "dead_letters",
            format!(
                "dead letter {} of {} (event {}) left after the re-drive",
                d.id, d.group, d.envelope.event_id
            ),
        );
    }
    drop(app);
    let copy_url = store.copy_for_rebuild(&cfg.dir).await?;
    let live =
        check::check_read_models(&cfg.tektree, &store_url, &copy_url, &mut mismatches).await?;
    let oracle = oracle::check(&records, &live, &mut mismatches);
    log.line(format!(
        "oracle: {} content rows, {} users ({} with XP not stated exactly), {} tag boards compared",
        oracle.content, oracle.users, oracle.inexact_users, oracle.tag_boards
    ));
    tokio::task::spawn_blocking(move || -> Result<()> {
        for s in std::iter::once(&servers.bus).chain(servers.store.as_ref()) {
            s.lock().expect("server").stop(Stop::Term)?;
        }
        Ok(())
    })
    .await??;

    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    for r in workload.refusals() {
        *refused
            .entry(format!("{:?} {} {}", r.kind, r.status, r.detail))
            .or_default() += 1;
        if r.status == 0 {
            mismatches.add("unanswered", format!("{:?}: {}", r.kind, r.detail));
        } else if r.status != 409 && !(r.status == 429 && r.detail.ends_with("quota_exceeded")) {
            mismatches.add(
                "refused",
                format!("{:?} answered {}: {}", r.kind, r.status, r.detail),
            );
        }
    }
    for l in &exit_log {
        log.line(format!("exit: {l}"));
    }
    let report = RunReport {
        bus: cfg.bus,
        store: cfg.store.name(),
        processes: (cfg.apis.max(1), cfg.relays.max(1)),
        commands: stats.sent,
        ok: stats.ok,
        refused,
        retries: stats.retries,
        rate_limited: stats.rate_limited,
        events,
        faults: *counts.lock().expect("counts"),
        exits,
        mismatches: mismatches
            .by_category()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        duration: started.elapsed(),
    };
    log.line(format!(
        "done: {} events, {} faults, {} exits, {} mismatches in {:.1} s",
        report.events,
        report.faults.total(),
        report.exits,
        report.mismatch_total(),
        report.duration.as_secs_f64()
    ));
    Ok(report)
}
