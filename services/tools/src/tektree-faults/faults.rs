//! Fault injection: SIGKILL + restart of the API, the relay or a worker, a worker armed to
//! abort between a read-model commit and its acknowledgement, a stop + restart of the bus
//! server, a bus server that loses all its data and a store restored from a backup (issue #12),
//! and (on a MongoDB server the harness started) a SIGKILL + restart of the store's server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tektree_outbox::relay::KILL_AFTER_PUBLISH_ENV;
use tektree_outbox::test_support::{
    restart_nats_empty, MongoServer, NatsServer, RedisServer, ServerError, Stop,
};
use tektree_services::worker::KILL_AFTER_APPLY_ENV;

use crate::procs::{Procs, Role};
use crate::rng::Rng;

/// A server process of a run, started with persistence.
#[derive(Debug)]
pub enum Server {
    /// `redis-server` with `--appendonly yes --appendfsync always` (the bus).
    Redis(RedisServer),
    /// `nats-server -js` with a file store (the bus).
    Nats(NatsServer),
    /// `secantusd-py --sync-on-commit` (the store).
    Mongo(MongoServer),
}

impl Server {
    /// Its URL (for MongoDB: the connection string without a database).
    pub fn url(&self) -> String {
        match self {
            Server::Redis(s) => s.url.clone(),
            Server::Nats(s) => s.url.clone(),
            Server::Mongo(s) => s.url.clone(),
        }
    }

    /// Stops it (see [`Stop`]).
    pub fn stop(&mut self, how: Stop) -> Result<(), ServerError> {
        match self {
            Server::Redis(s) => s.stop(how),
            Server::Nats(s) => s.stop(how),
            Server::Mongo(s) => s.stop(how),
        }
    }

    fn restart(&mut self) -> Result<(), ServerError> {
        match self {
            Server::Redis(s) => s.restart(),
            Server::Nats(s) => s.restart(),
            Server::Mongo(s) => s.restart(),
        }
    }
}

/// The servers a fault may stop: the bus, and the store's server when the harness started it.
#[derive(Clone)]
pub struct Servers {
    /// The bus server.
    pub bus: Arc<Mutex<Server>>,
    /// The MongoDB server of the store, when the harness started one.
    pub store: Option<Arc<Mutex<Server>>>,
}

/// Kinds of injected faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL the API and restart it.
    ApiKill,
    /// SIGKILL the relay and restart it.
    RelayKill,
    /// SIGKILL a random worker and restart it.
    WorkerKill,
    /// SIGKILL a random worker and restart it with `TEKTREE_KILL_AFTER_APPLY=<n>`: it aborts
    /// right after its n-th read-model commit, before acknowledging.
    WorkerAbort,
    /// SIGKILL the relay and restart it with `TEKTREE_KILL_AFTER_PUBLISH=<n>`: it aborts right
    /// after its n-th publish, before marking the records published.
    RelayAbort,
    /// Stop the bus server (SIGKILL or SIGTERM), wait 1–4 s, start it again on the same port
    /// with the same data.
    BusRestart,
    /// SIGKILL the store's MongoDB server, wait 1–4 s, start it again on the same port with
    /// the same data directory (only when the harness started the server).
    StoreRestart,
    /// The bus server loses all its data while running: Redis `FLUSHALL`, every NATS
    /// JetStream stream deleted (events, dead letters, the store binding's bucket). The relay
    /// must find the loss and republish what the consumers have not applied
    /// (`tektree_outbox::recovery`).
    BusWipe,
    /// Every process stopped, the store backed up and restored from that backup (`tektree
    /// backup` + `tektree restore --from`; on MongoDB `tektree restore` in place), every
    /// process started again: the epoch rises, the bus is emptied and refilled from the store
    /// (issue #12). The backup is taken with every process stopped, so no acknowledged command
    /// is lost (the restore to an older point is `services/tests/restore.rs`).
    Restore,
}

impl FaultKind {
    /// Whether it stops a server for a while (one such outage at a time).
    pub fn is_outage(self) -> bool {
        matches!(self, FaultKind::BusRestart | FaultKind::StoreRestart)
    }
}

const KINDS: [FaultKind; 8] = [
    FaultKind::ApiKill,
    FaultKind::RelayKill,
    FaultKind::WorkerKill,
    FaultKind::WorkerAbort,
    FaultKind::RelayAbort,
    FaultKind::BusRestart,
    FaultKind::BusWipe,
    FaultKind::Restore,
];

/// Faults injected (and, for `worker_abort`, fired), by kind.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct FaultCounts {
    /// API SIGKILLs.
    pub api_kill: u64,
    /// Relay SIGKILLs.
    pub relay_kill: u64,
    /// Worker SIGKILLs at random instants.
    pub worker_kill: u64,
    /// Workers that aborted between a read-model commit and its acknowledgement.
    pub worker_abort: u64,
    /// Relays that aborted between publishing and marking the records published.
    pub relay_abort: u64,
    /// Bus server stops + restarts.
    pub bus_restart: u64,
    /// Store server SIGKILLs + restarts.
    pub store_restart: u64,
    /// Bus servers that lost all their data.
    pub bus_wipe: u64,
    /// Store backups restored with every process stopped.
    pub restore: u64,
    /// Poison events.
    pub poison: u64,
}

impl FaultCounts {
    /// All faults.
    pub fn total(&self) -> u64 {
        self.api_kill
            + self.relay_kill
            + self.worker_kill
            + self.worker_abort
            + self.relay_abort
            + self.bus_restart
            + self.store_restart
            + self.bus_wipe
            + self.restore
            + self.poison
    }

    /// Sum of two counts.
    pub fn add(&self, o: &FaultCounts) -> FaultCounts {
        FaultCounts {
            api_kill: self.api_kill + o.api_kill,
            relay_kill: self.relay_kill + o.relay_kill,
            worker_kill: self.worker_kill + o.worker_kill,
            worker_abort: self.worker_abort + o.worker_abort,
            relay_abort: self.relay_abort + o.relay_abort,
            bus_restart: self.bus_restart + o.bus_restart,
            store_restart: self.store_restart + o.store_restart,
            bus_wipe: self.bus_wipe + o.bus_wipe,
            restore: self.restore + o.restore,
            poison: self.poison + o.poison,
        }
    }
}

/// `n` fault kinds: every kind once in a shuffled round, round after round, so that a run of at
/// least eight faults (nine with `store_server`) has each kind. `store_server`: the harness
/// started the store's server, so [`FaultKind::StoreRestart`] is among the kinds.
pub fn plan(rng: &mut Rng, n: u64, store_server: bool) -> Vec<FaultKind> {
    let mut out = Vec::new();
    while (out.len() as u64) < n {
        let mut round = KINDS.to_vec();
        if store_server {
            round.push(FaultKind::StoreRestart);
        }
        rng.shuffle(&mut round);
        out.extend(round);
    }
    out.truncate(n as usize);
    out
}

/// What [`inject`] did.
pub struct Injected {
    /// A line for the log.
    pub line: String,
    /// For an outage ([`FaultKind::is_outage`]): still going on. It ends (the server is
    /// restarted) when this task finishes; other faults may be injected meanwhile.
    pub outage: Option<tokio::task::JoinHandle<Result<String>>>,
}

/// Injects one fault of `kind`.
pub async fn inject(
    kind: FaultKind,
    rng: &mut Rng,
    procs: &Arc<Mutex<Procs>>,
    servers: &Servers,
    counts: &Arc<Mutex<FaultCounts>>,
) -> Result<Injected> {
    let line = |line: String| Injected { line, outage: None };
    match kind {
        FaultKind::ApiKill | FaultKind::RelayKill | FaultKind::WorkerKill => {
            let text = {
                let mut p = procs.lock().expect("procs");
                let candidates = p.with_role(|r| match kind {
                    FaultKind::ApiKill => *r == Role::Api,
                    FaultKind::RelayKill => *r == Role::Relay,
                    _ => matches!(r, Role::Worker(_)),
                });
                let i = candidates[rng.index(candidates.len())];
                p.kill_restart(i, Vec::new())?;
                format!("SIGKILL {} (restarted)", p.name(i))
            };
            let mut c = counts.lock().expect("counts");
            match kind {
                FaultKind::ApiKill => c.api_kill += 1,
                FaultKind::RelayKill => c.relay_kill += 1,
                _ => c.worker_kill += 1,
            }
            Ok(line(text))
        }
        FaultKind::WorkerAbort | FaultKind::RelayAbort => {
            let (env, n) = if kind == FaultKind::WorkerAbort {
                (KILL_AFTER_APPLY_ENV, rng.between(1, 5))
            } else {
                (KILL_AFTER_PUBLISH_ENV, rng.between(1, 3))
            };
            let mut p = procs.lock().expect("procs");
            let candidates = p.with_role(|r| match kind {
                FaultKind::WorkerAbort => matches!(r, Role::Worker(_)),
                _ => *r == Role::Relay,
            });
            let i = candidates[rng.index(candidates.len())];
            p.kill_restart(i, vec![(env.to_string(), n.to_string())])?;
            // Counted when it fires (see `Procs::poll`).
            Ok(line(format!(
                "SIGKILL {} and restart with {env}={n}",
                p.name(i)
            )))
        }
        FaultKind::BusRestart => {
            let how = if rng.percent(50) {
                Stop::Kill
            } else {
                Stop::Term
            };
            outage(rng, kind, &servers.bus, how, counts).await
        }
        FaultKind::StoreRestart => match &servers.store {
            Some(server) => outage(rng, kind, server, Stop::Kill, counts).await,
            None => anyhow::bail!("no store server to restart"),
        },
        FaultKind::Restore => {
            let procs = procs.clone();
            let said =
                tokio::task::spawn_blocking(move || procs.lock().expect("procs").restore_all())
                    .await
                    .context("the restore task")??;
            counts.lock().expect("counts").restore += 1;
            Ok(line(format!(
                "every process stopped, store restored: {said}; restarted"
            )))
        }
        FaultKind::BusWipe => {
            let url = servers.bus.lock().expect("server").url();
            let what = if url.starts_with("redis://") {
                flush_redis(&url).await?
            } else {
                let s = servers.bus.clone();
                tokio::task::spawn_blocking(move || match &mut *s.lock().expect("server") {
                    Server::Nats(n) => restart_nats_empty(n),
                    other => Err(ServerError(format!("no NATS server to wipe: {other:?}"))),
                })
                .await
                .context("the wipe task")??;
                "restarted with its JetStream store deleted (every stream and bucket)".to_string()
            };
            counts.lock().expect("counts").bus_wipe += 1;
            Ok(line(format!("bus server lost its data: {what}")))
        }
    }
}

/// `FLUSHALL` on the Redis server at `url`; says what.
async fn flush_redis(url: &str) -> Result<String> {
    let client = redis::Client::open(url).context("redis url")?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to redis")?;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .context("FLUSHALL")?;
    Ok("FLUSHALL".into())
}

/// Stops `server` (the bus's or the store's, as `kind` says) with `how`, and returns the
/// outage: a task that starts it again on the same port with the same data after 1–4 s.
async fn outage(
    rng: &mut Rng,
    kind: FaultKind,
    server: &Arc<Mutex<Server>>,
    how: Stop,
    counts: &Arc<Mutex<FaultCounts>>,
) -> Result<Injected> {
    let what = if kind == FaultKind::StoreRestart {
        "store"
    } else {
        "bus"
    };
    let outage = Duration::from_millis(rng.between(1000, 4000));
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.lock().expect("server").stop(how))
        .await
        .with_context(|| format!("stopping the {what} server"))??;
    let (server, counts) = (server.clone(), counts.clone());
    let task = tokio::spawn(async move {
        tokio::time::sleep(outage).await;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let s = server.clone();
            match tokio::task::spawn_blocking(move || s.lock().expect("server").restart())
                .await
                .with_context(|| format!("restarting the {what} server"))?
            {
                Ok(()) => break,
                Err(e) if attempts < 5 => {
                    eprintln!("restarting the {what} server failed ({e}); again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut c = counts.lock().expect("counts");
        if kind == FaultKind::StoreRestart {
            c.store_restart += 1;
        } else {
            c.bus_restart += 1;
        }
        Ok(format!(
            "{what} server back after {:.1} s",
            outage.as_secs_f64()
        ))
    });
    Ok(Injected {
        line: format!(
            "{what} server stopped ({how:?}) for {:.1} s",
            outage.as_secs_f64()
        ),
        outage: Some(task),
    })
}
