//! The `tektree` processes under test: spawned, SIGKILLed, restarted, and watched for exits.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Environment variables of `tektree` that the harness sets itself (or wants unset): removed
/// from every child's environment first, so that the caller's shell cannot change the run.
const SCRUBBED_ENV: &[&str] = &[
    "TEKTREE_STORE",
    "TEKTREE_BUS",
    "TEKTREE_RULES",
    "TEKTREE_FAIL_ON",
    "TEKTREE_KILL_AFTER_APPLY",
    "TEKTREE_RATE_LIMIT",
    "TEKTREE_JWT_HS256_SECRET",
];

/// A process that exited by itself sooner than this after its start is restarted only after
/// [`RESTART_DELAY`] (it probably failed to start, e.g. while the bus is down).
const QUICK_EXIT: Duration = Duration::from_secs(2);
/// See [`QUICK_EXIT`].
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// What a process does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `tektree api`.
    Api,
    /// `tektree relay`.
    Relay,
    /// `tektree worker --projection <group>`.
    Worker(String),
}

/// One `tektree` process (and its successors after restarts).
#[derive(Debug)]
pub struct Proc {
    /// Name, also of its log file (`logs/<name>.log`, appended across restarts).
    pub name: String,
    /// What it does.
    pub role: Role,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Extra environment (a fault hook) until the hook fires or the harness restarts the
    /// process otherwise; kept across restarts after a failed start.
    once_env: Vec<(String, String)>,
    child: Option<Child>,
    started: Instant,
    /// Restart it at this instant (it exited by itself).
    restart_at: Option<Instant>,
    /// The current incarnation runs with `TEKTREE_KILL_AFTER_APPLY`.
    abort_armed: bool,
}

/// What [`Procs::poll`] saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcStats {
    /// Processes that exited without being killed by the harness (restarted).
    pub unexpected_exits: u64,
    /// Workers that aborted through `TEKTREE_KILL_AFTER_APPLY` (restarted without it).
    pub worker_aborts: u64,
    /// Relays that aborted through `TEKTREE_KILL_AFTER_PUBLISH` (restarted without it).
    pub relay_aborts: u64,
    /// SIGKILLs sent by the harness.
    pub kills: u64,
    /// Store restores made by the harness ([`Procs::restore_all`]).
    pub restores: u64,
}

/// Every process of one run.
#[derive(Debug)]
pub struct Procs {
    exe: PathBuf,
    common: Vec<String>,
    logdir: PathBuf,
    procs: Vec<Proc>,
    /// Counters.
    pub stats: ProcStats,
    /// When a process last exited or was killed.
    pub last_disturbance: Instant,
    /// One line per exit, for the report.
    pub exit_log: Vec<String>,
}

impl Procs {
    /// Processes of the `tektree` binary `exe`, each run with `common` arguments first
    /// (`--store … --bus …`), logging to `logdir`.
    pub fn new(exe: PathBuf, common: Vec<String>, logdir: PathBuf) -> Result<Procs> {
        std::fs::create_dir_all(&logdir)
            .with_context(|| format!("creating {}", logdir.display()))?;
        Ok(Procs {
            exe,
            common,
            logdir,
            procs: Vec::new(),
            stats: ProcStats::default(),
            last_disturbance: Instant::now(),
            exit_log: Vec::new(),
        })
    }

    /// Starts a process; returns its index.
    pub fn add(
        &mut self,
        name: &str,
        role: Role,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<usize> {
        let mut p = Proc {
            name: name.to_string(),
            role,
            args,
            env,
            once_env: Vec::new(),
            child: None,
            started: Instant::now(),
            restart_at: None,
            abort_armed: false,
        };
        spawn(&self.exe, &self.common, &self.logdir, &mut p)?;
        self.procs.push(p);
        Ok(self.procs.len() - 1)
    }

    /// Indices of the processes whose role matches `pred`.
    pub fn with_role(&self, pred: impl Fn(&Role) -> bool) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| pred(&self.procs[i].role))
            .collect()
    }

    /// The name of process `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.procs[i].name
    }

    /// SIGKILLs process `i` and starts it again at once, with `once_env` added for the new
    /// incarnation only.
    pub fn kill_restart(&mut self, i: usize, once_env: Vec<(String, String)>) -> Result<()> {
        self.kill(i);
        self.procs[i].once_env = once_env;
        spawn(&self.exe, &self.common, &self.logdir, &mut self.procs[i])
    }

    /// SIGKILLs process `i` (if it runs) and waits for it.
    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i].child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                self.stats.kills += 1;
            }
            let _ = child.wait();
        }
        self.last_disturbance = Instant::now();
    }

    /// Notices processes that exited by themselves and restarts them (after a short delay when
    /// they exited right after starting). Returns one line per exit seen.
    pub fn poll(&mut self) -> Result<Vec<String>> {
        let mut seen = Vec::new();
        let now = Instant::now();
        for i in 0..self.procs.len() {
            let exited = match self.procs[i].child.as_mut() {
                Some(child) => child.try_wait().context("checking a child process")?,
                None => None,
            };
            if let Some(status) = exited {
                self.procs[i].child = None;
                self.last_disturbance = now;
                let p = &mut self.procs[i];
                let ran = now.duration_since(p.started);
                // A hook that fired is gone; one that did not (the process failed to start,
                // e.g. while the bus is down) stays armed for the next incarnation.
                if p.abort_armed && status.signal() == Some(libc_sigabrt()) {
                    if p.role == Role::Relay {
                        self.stats.relay_aborts += 1;
                    } else {
                        self.stats.worker_aborts += 1;
                    }
                    seen.push(format!(
                        "{} aborted by its fault hook ({}) after {:.1} s (restarting)",
                        p.name,
                        p.once_env
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        ran.as_secs_f64()
                    ));
                    p.once_env.clear();
                } else {
                    self.stats.unexpected_exits += 1;
                    let line = format!(
                        "{} exited by itself with {status} after {:.1} s (restarting; see logs/{}.log)",
                        p.name,
                        ran.as_secs_f64(),
                        p.name
                    );
                    self.exit_log.push(line.clone());
                    seen.push(line);
                }
                p.restart_at = Some(if ran < QUICK_EXIT {
                    now + RESTART_DELAY
                } else {
                    now
                });
            }
            if self.procs[i].child.is_none() && self.procs[i].restart_at.is_some_and(|at| at <= now)
            {
                spawn(&self.exe, &self.common, &self.logdir, &mut self.procs[i])?;
            }
        }
        Ok(seen)
    }

    /// Restarts every process still armed with a fault hook without it (they would abort while
    /// the pipeline settles). Returns their names.
    pub fn disarm(&mut self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for i in 0..self.procs.len() {
            if self.procs[i].once_env.is_empty() {
                continue;
            }
            if self.procs[i].child.is_some() {
                self.kill_restart(i, Vec::new())?;
            } else {
                // Waiting to be restarted: it will be, without the hook.
                self.procs[i].once_env.clear();
            }
            names.push(self.procs[i].name.clone());
        }
        Ok(names)
    }

    /// Restores the store while every process is stopped, then starts them again: SIGKILLs
    /// them all, runs `tektree backup` to a new file beside the logs and `tektree restore
    /// --from` it on a SQLite store (on MongoDB `tektree restore` in place, which only raises the
    /// epoch), and restarts every process (without armed hooks). Returns what `tektree restore`
    /// printed.
    pub fn restore_all(&mut self) -> Result<String> {
        for i in 0..self.procs.len() {
            self.kill(i);
            self.procs[i].once_env.clear();
        }
        self.stats.restores += 1;
        let restored = if self.common.iter().any(|a| a.starts_with("sqlite://")) {
            let backup = self
                .logdir
                .join(format!("backup-{}.db", self.stats.restores));
            let backup = backup.to_string_lossy().to_string();
            self.run(&["backup", &backup])?;
            self.run(&["restore", "--from", &backup])
        } else {
            self.run(&["restore"])
        };
        for i in 0..self.procs.len() {
            spawn(&self.exe, &self.common, &self.logdir, &mut self.procs[i])?;
        }
        self.last_disturbance = Instant::now();
        restored
    }

    /// Runs `tektree <common> <args>` to its end; its stdout, or an error with its stderr.
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.exe);
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        let out = cmd
            .args(&self.common)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running tektree {}", args.join(" ")))?;
        if !out.status.success() {
            anyhow::bail!(
                "tektree {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// SIGKILLs every process; none is restarted afterwards.
    pub fn kill_all(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
            self.procs[i].restart_at = None;
        }
    }
}

/// Starts (or restarts) `p`: `exe <common> <p.args>`, stderr appended to its log.
fn spawn(exe: &Path, common: &[String], logdir: &Path, p: &mut Proc) -> Result<()> {
    let log = logdir.join(format!("{}.log", p.name));
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(exe);
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    cmd.args(common)
        .args(&p.args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .envs(p.once_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} ({})", p.name, exe.display()))?;
    p.child = Some(child);
    p.started = Instant::now();
    p.restart_at = None;
    p.abort_armed = !p.once_env.is_empty();
    Ok(())
}

/// SIGABRT's number (6 on every Unix the harness runs on).
fn libc_sigabrt() -> i32 {
    6
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}
