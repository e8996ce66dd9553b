//! The MongoDB rows (issue #11): `append_mongodb` (the append workload, 16 clients, on a
//! `MongoStore`), `relay_mongodb` (the outbox those runs left, published to Redis Streams) and
//! `projection_mongodb` (a small corpus applied by each projection's worker into
//! `MongoReadModels`).
//!
//! The server is the replica set named by `MONGODB_URI`, else a throwaway SecantusDB
//! (`secantusd-py`, a MongoDB wire-protocol server written in Python) started on a free
//! loopback port by `tektree_outbox::test_support::MongoServer`, as the Redis and NATS servers
//! are. Every line names the server as `buildInfo` reports it (`server`): SecantusDB is far
//! slower than `mongod`, so its rows compare runs with each other, not with other stores.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tektree_domain::Rules;
use tektree_event_store::mongo::{connect_client, ServerBuild};
use tektree_outbox::test_support::MongoServer;
use tektree_projections::{MongoReadModels, Projection};
use tektree_services::app::App;

use crate::relay::{self, BusKind};
use crate::stats::{rate, round1, summarize, Latencies};
use crate::{append, corpus, projection, with_latencies, workload, Out};

/// How to get a server when none is running: what the skipped and error lines say.
pub const INSTALL_HINT: &str = "install SecantusDB with `pip install SecantusDB==0.7.0b3` \
    (scripts/test installs it into .venv), or set MONGODB_URI to a MongoDB replica set";

/// Concurrent clients of `append_mongodb` (as the SQLite row it is compared with).
const CLIENTS: usize = 16;

/// The environment variable naming the `secantusd-py` executable (as `MongoServer` reads it).
const SECANTUSD_ENV: &str = "TEKTREE_TEST_SECANTUSD";

/// The deployment the MongoDB rows run on.
pub struct Deployment {
    /// The throwaway server (killed when dropped), or the handle of `MONGODB_URI`.
    server: MongoServer,
    /// What `buildInfo` says.
    build: ServerBuild,
}

impl Deployment {
    /// `mongodb://…/<database>?…` on this deployment.
    fn uri(&self, database: &str) -> String {
        self.server.uri_with_database(database)
    }

    /// The fields every MongoDB line carries: `server` ([`server_label`]), `server_build`
    /// (`buildInfo` in full) and where the server came from.
    fn fields(&self) -> Value {
        let origin = if self.server.port().is_some() {
            "started by tektree-bench (secantusd-py on 127.0.0.1, data in a temporary directory)"
        } else {
            "MONGODB_URI"
        };
        json!({
            "store": "mongodb",
            "server": server_label(&self.build),
            "server_build": self.build.to_string(),
            "server_origin": origin,
        })
    }
}

/// The server's name and version for the lines: `SecantusDB 0.7.0b3` (its own version, not
/// the MongoDB version it speaks) or `mongod 7.0.14`.
pub fn server_label(build: &ServerBuild) -> String {
    match &build.secantus {
        Some(v) => format!("SecantusDB {v}"),
        None => format!("mongod {}", build.version),
    }
}

/// Where `MongoServer::start` would find `secantusd-py`: `explicit`
/// (`TEKTREE_TEST_SECANTUSD`) when set, else the first directory of `path` (`PATH`), else
/// `venv_bin`, holding an executable (`is_executable`).
pub fn find_secantusd(
    explicit: Option<OsString>,
    path: Option<OsString>,
    venv_bin: &Path,
    is_executable: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return is_executable(&p).then_some(p);
    }
    path.map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([venv_bin.to_path_buf()])
        .map(|dir| dir.join("secantusd-py"))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The server named by `MONGODB_URI`, or a throwaway SecantusDB; `Ok(None)` when
/// `MONGODB_URI` is unset and `secantusd-py` is not installed.
///
/// # Errors
/// When the server does not start or does not answer `buildInfo`.
pub async fn deployment() -> Result<Option<Deployment>> {
    let given = std::env::var("MONGODB_URI").is_ok_and(|u| !u.trim().is_empty());
    if !given {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin");
        let found = find_secantusd(
            std::env::var_os(SECANTUSD_ENV),
            std::env::var_os("PATH"),
            &venv,
            is_executable,
        );
        let Some(binary) = found else {
            return Ok(None);
        };
        eprintln!("tektree-bench: mongodb: starting {}", binary.display());
    }
    let started = tokio::task::spawn_blocking(|| std::panic::catch_unwind(MongoServer::start))
        .await
        .context("starting the MongoDB server")?;
    let server = started.map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the MongoDB server did not start".into());
        anyhow::anyhow!("{why}; {INSTALL_HINT}")
    })?;
    let (client, _) = connect_client(&server.url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("connecting to {}", server.url))?;
    let build = ServerBuild::of(&client).await.context("buildInfo")?;
    eprintln!("tektree-bench: mongodb: {build} at {}", server.url);
    Ok(Some(Deployment { server, build }))
}

/// Drops `database` (ignoring failures: the bench's databases are throwaway; on a
/// `MONGODB_URI` deployment a failure leaves it behind, which stderr says).
async fn drop_database(dep: &Deployment, database: &str) {
    let dropped = async {
        let (client, _) = connect_client(&dep.server.url)
            .await
            .map_err(|e| e.to_string())?;
        client
            .database(database)
            .drop()
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = dropped {
        eprintln!("tektree-bench: mongodb: dropping {database}: {e}");
    }
}

/// A database name of this process: `tektree_bench_<pid>_<what>`.
fn database(what: &str) -> String {
    format!("tektree_bench_{}_{what}", std::process::id())
}

/// What the `append_mongodb` and `relay_mongodb` runs measured.
#[derive(Default)]
struct AppendRelay {
    commands_per_s: Vec<f64>,
    events_per_s: Vec<f64>,
    latencies: Latencies,
    conflict_retries: u64,
    refused: u64,
    commands: u64,
    relayed_per_s: Vec<f64>,
    relayed: u64,
    split: relay::Split,
}

/// `append_mongodb` and `relay_mongodb`: each run appends `commands` workload commands with
/// 16 clients to a fresh database, then relays that database's outbox to Redis (`redis`: its
/// URL, or why there is none), then drops the database.
///
/// # Errors
/// Store or bus failures, or a relay that did not publish every appended event.
pub async fn append_and_relay(
    out: &mut Out,
    dep: &Deployment,
    runs: usize,
    commands: u64,
    seed: u64,
    redis: &Result<String, String>,
) -> Result<()> {
    let work = workload::generate(seed, commands);
    eprintln!(
        "tektree-bench: append_mongodb: {} commands per run, {CLIENTS} clients",
        work.len()
    );
    let mut m = AppendRelay::default();
    for run in 0..runs {
        let db = database(&format!("a{run}"));
        let result: Result<()> = async {
            let app = App::open(&dep.uri(&db), "memory", Rules::default()).await?;
            let done = append::execute(&app, &work, CLIENTS).await?;
            let secs = done.elapsed.as_secs_f64();
            m.commands_per_s.push(rate(done.commands, secs));
            m.events_per_s.push(rate(done.events, secs));
            m.conflict_retries += done.conflict_retries;
            m.refused += done.refused;
            m.commands = done.commands;
            m.latencies.extend(done.latencies);
            if let Ok(url) = redis {
                let (count, secs, split) =
                    relay::relay_all(app.store.as_ref(), BusKind::Redis, url, true).await?;
                if count != done.events {
                    bail!(
                        "relay_mongodb published {count} of the {} appended events",
                        done.events
                    );
                }
                m.relayed_per_s.push(rate(count, secs));
                m.relayed = count;
                m.split.add(&split);
            }
            Ok(())
        }
        .await;
        drop_database(dep, &db).await;
        result?;
    }
    m.emit(out, dep, redis);
    Ok(())
}

impl AppendRelay {
    /// The `append_mongodb` and `relay_mongodb` lines, and their ratios to the SQLite rows.
    fn emit(self, out: &mut Out, dep: &Deployment, redis: &Result<String, String>) {
        let mut base = with_latencies(
            json!({"scenario": "append_mongodb", "clients": CLIENTS, "unit": "commands/s",
                "n": self.commands,
                "events_per_s_median": round1(summarize(&self.events_per_s).median),
                "conflict_retries": self.conflict_retries, "refused": self.refused,
                "note": "the append workload on a fresh database per run (dropped after the run's relay_mongodb)"}),
            &self.latencies,
        );
        merge(&mut base, dep.fields());
        out.metric("append_mongodb_c16", base, &self.commands_per_s);
        match redis {
            Ok(_) => {
                let mut base = json!({"scenario": "relay_mongodb", "bus": "redis",
                    "unit": "events/s", "n": self.relayed,
                    "batch": tektree_outbox::RelayConfig::default().batch,
                    "time_share": self.split.shares(),
                    "note": "the outbox each append_mongodb run left: rounds of read pending, XADD (MULTI), mark published (one updateMany, w: majority, j: true), each step timed"});
                merge(&mut base, dep.fields());
                out.metric("relay_mongodb_redis", base, &self.relayed_per_s);
            }
            Err(reason) => {
                out.emit(&json!({"scenario": "relay_mongodb", "bus": "redis", "skipped": reason}))
            }
        }
        out.ratio("append_mongodb_c16", "append_c16", None);
        out.ratio("relay_mongodb_redis", "relay_redis", None);
    }
}

/// `projection_mongodb`: a corpus of about `events` events (built in SQLite in `dir`, as the
/// SQLite rows' corpus, policies included) applied by each projection's worker into a fresh
/// MongoDB database per run (dropped afterwards).
///
/// # Errors
/// Corpus, read-model or bus failures.
pub async fn projections(
    out: &mut Out,
    dep: &Deployment,
    runs: usize,
    events: u64,
    seed: u64,
    dir: &Path,
) -> Result<()> {
    let corpus_dir = dir.join("mongodb-corpus");
    std::fs::create_dir_all(&corpus_dir)
        .with_context(|| format!("creating {}", corpus_dir.display()))?;
    let c = corpus::build(&corpus_dir, seed, events, CLIENTS).await?;
    let stored = corpus::all_events(&c.app).await?;
    eprintln!(
        "tektree-bench: projection_mongodb: {} events per run and projection",
        stored.len()
    );
    for name in Projection::ALL {
        let mut rates = Vec::new();
        for run in 0..runs {
            let db = database(&format!("p{run}_{name}"));
            let read_models = Arc::new(MongoReadModels::connect(&dep.server.url, &db).await?);
            let applied = projection::run_into(&c.app, &stored, name, read_models).await;
            drop_database(dep, &db).await;
            let (count, secs) = applied?;
            rates.push(rate(count, secs));
        }
        let mut base = json!({"scenario": "projection_mongodb", "projection": name,
            "unit": "events/s", "n": stored.len(), "batch": 256,
            "note": "a corpus of its own (the SQLite rows' generator at this size), one MongoDB transaction per batch, a fresh database per run"});
        merge(&mut base, dep.fields());
        out.metric(&format!("projection_mongodb_{name}"), base, &rates);
        out.ratio(
            &format!("projection_mongodb_{name}"),
            &format!("projection_{name}"),
            None,
        );
    }
    drop(c.app);
    corpus::remove_db(&c.path);
    Ok(())
}

/// Adds `extra`'s fields to the object `v`.
fn merge(v: &mut Value, extra: Value) {
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_label_names_secantusdb_by_its_own_version_and_mongod_by_its_version() {
        let secantus = ServerBuild {
            version: "8.2.11".into(),
            secantus: Some("0.7.0b3".into()),
        };
        assert_eq!(server_label(&secantus), "SecantusDB 0.7.0b3");
        let mongod = ServerBuild {
            version: "7.0.14".into(),
            secantus: None,
        };
        assert_eq!(server_label(&mongod), "mongod 7.0.14");
    }

    #[test]
    fn secantusd_is_looked_up_like_the_test_servers_do() {
        let present: HashSet<PathBuf> = [
            PathBuf::from("/b/secantusd-py"),
            PathBuf::from("/venv/bin/secantusd-py"),
            PathBuf::from("/x/secantusd-py"),
        ]
        .into();
        let exec = |p: &Path| present.contains(p);
        let venv = Path::new("/venv/bin");
        let path = || Some(OsString::from("/a:/b"));
        // PATH first, in order.
        assert_eq!(
            find_secantusd(None, path(), venv, exec),
            Some(PathBuf::from("/b/secantusd-py"))
        );
        // Then the virtual environment.
        assert_eq!(
            find_secantusd(None, Some(OsString::from("/a")), venv, exec),
            Some(PathBuf::from("/venv/bin/secantusd-py"))
        );
        // The variable wins, and names the executable itself (an empty one is unset).
        assert_eq!(
            find_secantusd(Some("/x/secantusd-py".into()), path(), venv, exec),
            Some(PathBuf::from("/x/secantusd-py"))
        );
        assert_eq!(
            find_secantusd(Some("/missing".into()), path(), venv, exec),
            None
        );
        assert_eq!(
            find_secantusd(Some(OsString::new()), path(), venv, exec),
            Some(PathBuf::from("/b/secantusd-py"))
        );
        // Nowhere.
        assert_eq!(find_secantusd(None, None, Path::new("/nope"), exec), None);
    }

    #[test]
    fn merge_adds_the_server_fields() {
        let mut v = json!({"scenario": "append_mongodb", "n": 3});
        merge(&mut v, json!({"server": "SecantusDB 0.7.0b3"}));
        assert_eq!(
            v,
            json!({"scenario": "append_mongodb", "n": 3, "server": "SecantusDB 0.7.0b3"})
        );
    }
}
