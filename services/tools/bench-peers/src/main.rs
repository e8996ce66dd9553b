//! `tektree-bench-peers`: the `peers` scenario of `tektree-bench` (issue #5, see
//! docs/performance.md, "Peers").
//!
//! Runs the append scenario's workload — the same generator, included from
//! `services/tools/src/tektree-bench/workload.rs`, so one seed gives the identical command sequence
//! — through cqrs-es's `CqrsFramework` on our own domain aggregates (`User`, `Content`), stored by
//! a peer event repository: `sqlite-es` (SQLite, like our embedded default) or `postgres-es`.
//! The peers write events only; we also write an outbox row per event in the same transaction.
//!
//! As in `append`: N concurrent clients, phase after phase (users → questions → answers →
//! comments → votes → accepts), each client sending its next command once the previous one is
//! committed; a fresh store per run. Durability as ours: SQLite in WAL mode with
//! `synchronous=FULL` and a 10 s busy timeout; PostgreSQL with the server's defaults
//! (`synchronous_commit=on`).
//!
//! Prints one JSON line per (backend, client count) on stdout; progress goes to stderr.

// The bench's generator and statistics, shared rather than copied (this crate is its own
// workspace, so they are included by path).
#[path = "../../src/tektree-bench/clients.rs"]
mod clients;
#[allow(dead_code)]
#[path = "../../src/tektree-faults/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "../../src/tektree-bench/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "../../src/tektree-bench/workload.rs"]
mod workload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use clap::{Parser, ValueEnum};
use cqrs_es::persist::{PersistedEventRepository, PersistedEventStore};
use cqrs_es::{AggregateContext, AggregateError, CqrsFramework, EventStore};
use postgres_es::PostgresEventRepository;
use serde_json::json;
use sqlite_es::SqliteEventRepository;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Executor, PgConnection, Row};
use tektree_domain::aggregates::content::ContentKind;
use tektree_domain::{
    Actor, AnswerFacts, Content, DomainError, KnowledgeServices, NoServices, QuestionFacts, User,
};
use uuid::Uuid;

use crate::clients::{Sent, Tally};
use crate::stats::{rate, round1, summarize, Latencies};
use crate::workload::{Cmd, Workload};

/// Attempts per command: our handler makes up to 5 load → decide → append rounds and the
/// append scenario's client up to 20 such calls; cqrs-es makes one round per `execute`, so the
/// client here makes up to 5 × 20.
const ATTEMPTS: u64 = 100;

/// SQLite busy timeout, as our store's.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// sqlite-es's DDL (its `migrations/20221114171845_init.sql`, without the test rows).
const SQLITE_DDL: &str = "
CREATE TABLE events (
  aggregate_type text NOT NULL,
  aggregate_id   text NOT NULL,
  sequence       integer CHECK (sequence >= 0) NOT NULL,
  event_type     text NOT NULL,
  event_version  text NOT NULL,
  payload        text NOT NULL,
  metadata       text NOT NULL,
  PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;
CREATE TABLE snapshots (
  aggregate_type   text NOT NULL,
  aggregate_id     text NOT NULL,
  last_sequence    integer CHECK (last_sequence >= 0) NOT NULL,
  current_snapshot integer CHECK (current_snapshot >= 0) NOT NULL,
  payload          text NOT NULL,
  PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
) STRICT;";

/// postgres-es's DDL (its `db/init.sql`, without the test rows and user).
const POSTGRES_DDL: &str = "
CREATE TABLE events (
  aggregate_type text NOT NULL,
  aggregate_id   text NOT NULL,
  sequence       bigint CHECK (sequence >= 0) NOT NULL,
  event_type     text NOT NULL,
  event_version  text NOT NULL,
  payload        json NOT NULL,
  metadata       json NOT NULL,
  PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots (
  aggregate_type   text NOT NULL,
  aggregate_id     text NOT NULL,
  last_sequence    bigint CHECK (last_sequence >= 0) NOT NULL,
  current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
  payload          json NOT NULL,
  PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn peer(self) -> &'static str {
        match self {
            Backend::Sqlite => "cqrs-es+sqlite-es",
            Backend::Postgres => "cqrs-es+postgres-es",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "tektree-bench-peers",
    version,
    about = "The append workload of tektree-bench through cqrs-es with sqlite-es / postgres-es: one JSON line per (backend, clients) on stdout"
)]
struct Cli {
    /// Commands of the workload per run (as `tektree-bench --commands`).
    #[arg(long, default_value_t = 4_000)]
    commands: u64,
    /// Concurrent clients (repeatable or comma-separated; default 1,16,64).
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// Runs per client count.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seed of the workload (as `tektree-bench --seed`).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Backends (repeatable or comma-separated; default both).
    #[arg(long, value_delimiter = ',')]
    backend: Vec<Backend>,
    /// Directory of the SQLite files (`peer-sqlite-c<N>.db`, removed after each run).
    #[arg(long, alias = "sqlite-path", default_value = ".")]
    workdir: PathBuf,
    /// PostgreSQL server; each run creates and drops a database `tektree_peers_<pid>_<n>`.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Connections in the peer's pool (default 10, what `default_sqlite_pool` and
    /// `default_postgress_pool` use; 0 = one per client).
    #[arg(long, default_value_t = 10)]
    pool_size: u32,
}

/// [`KnowledgeServices`] answered by loading the aggregates through the peer's event store,
/// as our `StoreServices` does through our handler (which has an aggregate cache; cqrs-es's
/// `PersistedEventStore` replays the aggregate's events on every load).
struct PeerKnowledge<R: PersistedEventRepository> {
    content: PersistedEventStore<R, Content>,
    users: PersistedEventStore<R, User>,
}

#[async_trait]
impl<R: PersistedEventRepository + 'static> KnowledgeServices for PeerKnowledge<R> {
    async fn question(&self, id: Uuid) -> Result<Option<QuestionFacts>, String> {
        let mut ctx = self
            .content
            .load_aggregate(&id.to_string())
            .await
            .map_err(|e| e.to_string())?;
        let c = ctx.aggregate();
        Ok(match c.kind {
            Some(ContentKind::Question { .. }) => Some(QuestionFacts {
                author_id: c.author_id,
                tags: c.tags.clone(),
                area_id: c.area_id,
            }),
            _ => None,
        })
    }

    async fn answer(&self, id: Uuid) -> Result<Option<AnswerFacts>, String> {
        let mut ctx = self
            .content
            .load_aggregate(&id.to_string())
            .await
            .map_err(|e| e.to_string())?;
        let c = ctx.aggregate();
        Ok(match c.kind {
            Some(ContentKind::Answer { question_id }) => Some(AnswerFacts {
                question_id,
                author_id: c.author_id,
            }),
            _ => None,
        })
    }

    async fn user_exists(&self, id: Uuid) -> Result<bool, String> {
        let mut ctx = self
            .users
            .load_aggregate(&id.to_string())
            .await
            .map_err(|e| e.to_string())?;
        Ok(ctx.aggregate().display_name.is_some())
    }

    /// The benchmark workload creates no areas (its questions name none), so no area exists.
    async fn area_exists(&self, _id: Uuid) -> Result<bool, String> {
        Ok(false)
    }
}

/// The two frameworks of one store.
struct Peer<R: PersistedEventRepository> {
    users: CqrsFramework<User, PersistedEventStore<R, User>>,
    content: CqrsFramework<Content, PersistedEventStore<R, Content>>,
}

impl<R: PersistedEventRepository + 'static> Peer<R> {
    /// Frameworks with plain event stores (what `sqlite_cqrs` / `postgres_cqrs` build), each
    /// on a repository from `repo`.
    fn new(repo: impl Fn() -> R) -> Self {
        let knowledge: Arc<dyn KnowledgeServices> = Arc::new(PeerKnowledge {
            content: PersistedEventStore::new_event_store(repo()),
            users: PersistedEventStore::new_event_store(repo()),
        });
        Peer {
            users: CqrsFramework::new(
                PersistedEventStore::new_event_store(repo()),
                vec![],
                NoServices,
            ),
            content: CqrsFramework::new(
                PersistedEventStore::new_event_store(repo()),
                vec![],
                knowledge,
            ),
        }
    }

    /// Sends `cmd` with retries; `(result, retries)`.
    async fn send(
        &self,
        cmd: &Cmd,
        at: chrono::DateTime<chrono::Utc>,
    ) -> (Result<(), AggregateError<DomainError>>, u64) {
        // What our `CommandMeta` attaches to every event.
        let command_id = Uuid::new_v4().to_string();
        let metadata = HashMap::from([
            ("command_id".to_string(), command_id.clone()),
            ("correlation_id".to_string(), command_id),
            ("actor".to_string(), Actor::importer().to_string()),
            ("occurred_at".to_string(), at.to_rfc3339()),
        ]);
        let mut retries = 0;
        loop {
            let r = match cmd {
                Cmd::User(id, c) => {
                    self.users
                        .execute_with_metadata(&id.to_string(), c.clone(), metadata.clone())
                        .await
                }
                Cmd::Content(id, c) => {
                    self.content
                        .execute_with_metadata(&id.to_string(), c.clone(), metadata.clone())
                        .await
                }
            };
            match r {
                Ok(()) => return (Ok(()), retries),
                Err(
                    AggregateError::AggregateConflict
                    | AggregateError::DatabaseConnectionError(_)
                    | AggregateError::UnexpectedError(_)
                    | AggregateError::UserError(DomainError::Lookup(_)),
                ) if retries + 1 < ATTEMPTS => {
                    retries += 1;
                    // As our handler backs off between its attempts.
                    tokio::time::sleep(Duration::from_millis(1 + retries % 5)).await;
                }
                Err(e) => return (Err(e), retries),
            }
        }
    }
}

/// Runs `workload` with `clients` concurrent clients, phase after phase, with the client pool
/// of `append` ([`clients::run`]).
async fn execute<R: PersistedEventRepository + 'static>(
    peer: Arc<Peer<R>>,
    workload: &Workload,
    clients: usize,
) -> Result<Tally> {
    let phases = workload.named_phases();
    clients::run(&phases, clients, move |(cmd, at)| {
        let peer = peer.clone();
        async move {
            let (result, retries) = peer.send(&cmd, at).await;
            Sent {
                // cqrs-es does not say how many events a command stored.
                result: result.map(|()| 0).map_err(|e| e.to_string()),
                retries,
            }
        }
    })
    .await
}

/// Removes a SQLite database and its WAL and shared-memory files.
fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// One run on a fresh SQLite file; `(executed, events stored)`.
async fn run_sqlite(
    path: &Path,
    pool_size: u32,
    workload: &Workload,
    clients: usize,
    report_settings: bool,
) -> Result<(Tally, i64)> {
    remove_db(path);
    // default_sqlite_pool's options, with our store's durability: synchronous=FULL (its
    // default is NORMAL) and our 10 s busy timeout (sqlx's default is 5 s).
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(pool_size)
        .connect_with(options)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    pool.execute(sqlx::raw_sql(SQLITE_DDL))
        .await
        .context("creating sqlite-es's tables")?;
    if report_settings {
        let row = sqlx::query("SELECT * FROM pragma_journal_mode, pragma_synchronous")
            .fetch_one(&pool)
            .await?;
        let (mode, sync): (String, i64) = (row.get(0), row.get(1));
        eprintln!(
            "tektree-bench-peers: sqlite: journal_mode={mode} synchronous={sync} (2 = FULL), pool {pool_size} connections"
        );
    }
    let peer = Arc::new(Peer::new(|| SqliteEventRepository::new(pool.clone())));
    let done = execute(peer, workload, clients).await?;
    let events: i64 = sqlx::query("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?
        .get(0);
    pool.close().await;
    remove_db(path);
    Ok((done, events))
}

/// One run in a fresh database `db` on the server of `admin`; `(executed, events stored)`.
async fn run_postgres(
    admin: &PgConnectOptions,
    db: &str,
    pool_size: u32,
    workload: &Workload,
    clients: usize,
    report_settings: bool,
) -> Result<(Tally, i64)> {
    let mut conn = PgConnection::connect_with(admin)
        .await
        .context("connecting to PostgreSQL")?;
    conn.execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .with_context(|| format!("creating database {db}"))?;
    let result: Result<(Tally, i64)> = async {
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .connect_with(admin.clone().database(db))
            .await
            .with_context(|| format!("connecting to database {db}"))?;
        pool.execute(sqlx::raw_sql(POSTGRES_DDL))
            .await
            .context("creating postgres-es's tables")?;
        if report_settings {
            let row = sqlx::query(
                "SELECT current_setting('synchronous_commit'), current_setting('fsync'), version()",
            )
            .fetch_one(&pool)
            .await?;
            let (sc, fsync, v): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            eprintln!(
                "tektree-bench-peers: postgres: synchronous_commit={sc} fsync={fsync}, pool {pool_size} connections; {v}"
            );
        }
        let peer = Arc::new(Peer::new(|| PostgresEventRepository::new(pool.clone())));
        let done = execute(peer, workload, clients).await?;
        let events: i64 = sqlx::query("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await?
            .get(0);
        pool.close().await;
        Ok((done, events))
    }
    .await;
    let dropped = conn
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await;
    if let Err(e) = dropped {
        eprintln!("tektree-bench-peers: dropping database {db}: {e}");
    }
    result
}

/// All runs of one backend at one client count: the JSON line.
async fn measure(
    cli: &Cli,
    backend: Backend,
    admin: Option<&PgConnectOptions>,
    workload: &Workload,
    clients: usize,
) -> Result<serde_json::Value> {
    let pool_size = if cli.pool_size == 0 {
        clients.max(1) as u32
    } else {
        cli.pool_size
    };
    let mut rates = Vec::new();
    let mut event_rates = Vec::new();
    let mut lat = Latencies::default();
    let (mut commands, mut errors, mut retries, mut events) = (0, 0, 0, 0);
    for run in 0..cli.runs.max(1) {
        let first = run == 0;
        let (done, stored) = match (backend, admin) {
            (Backend::Sqlite, _) => {
                let path = cli.workdir.join(format!("peer-sqlite-c{clients}.db"));
                run_sqlite(&path, pool_size, workload, clients, first).await?
            }
            (Backend::Postgres, Some(admin)) => {
                let db = format!("tektree_peers_{}_c{clients}_r{run}", std::process::id());
                run_postgres(admin, &db, pool_size, workload, clients, first).await?
            }
            (Backend::Postgres, None) => bail!("no PostgreSQL server"),
        };
        let secs = done.elapsed.as_secs_f64();
        eprintln!(
            "tektree-bench-peers: {} clients={clients} run {}: {:.1} commands/s, {} events, {} retries, {} errors",
            backend.peer(),
            run + 1,
            rate(done.sent, secs),
            stored,
            done.retries,
            done.failed
        );
        if !done.failures.is_empty() {
            eprintln!("tektree-bench-peers: errors: {:?}", done.failures);
        }
        rates.push(rate(done.sent, secs));
        event_rates.push(rate(stored.max(0) as u64, secs));
        commands = done.sent;
        errors += done.failed;
        retries += done.retries;
        events = stored;
        lat.extend(done.latencies);
    }
    let s = summarize(&rates);
    let (p50, p99) = lat.p50_p99();
    Ok(json!({
        "scenario": "peers",
        "peer": backend.peer(),
        "clients": clients,
        "unit": "commands/s",
        "median": round1(s.median),
        "min": round1(s.min),
        "max": round1(s.max),
        "runs": rates.len(),
        "p50_us": p50,
        "p99_us": p99,
        "commands": commands,
        "errors": errors,
        "conflict_retries": retries,
        "events": events,
        "events_per_s_median": round1(summarize(&event_rates).median),
        "pool_connections": pool_size,
    }))
}

async fn main_inner(cli: Cli) -> Result<bool> {
    let clients = if cli.clients.is_empty() {
        vec![1, 16, 64]
    } else {
        cli.clients.clone()
    };
    let backends = if cli.backend.is_empty() {
        vec![Backend::Sqlite, Backend::Postgres]
    } else {
        cli.backend.clone()
    };
    std::fs::create_dir_all(&cli.workdir)
        .with_context(|| format!("creating {}", cli.workdir.display()))?;
    let work = workload::generate(cli.seed, cli.commands);
    eprintln!(
        "tektree-bench-peers: {} commands per run, seed {}, clients {clients:?}, {} runs",
        work.len(),
        cli.seed,
        cli.runs
    );
    let mut ok = true;
    for backend in backends {
        let admin = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let probe = async {
                    let opts = PgConnectOptions::from_str(&cli.postgres_url)?;
                    let conn = tokio::time::timeout(
                        Duration::from_secs(5),
                        PgConnection::connect_with(&opts),
                    )
                    .await
                    .context("timed out after 5 s")??;
                    conn.close().await?;
                    anyhow::Ok(opts)
                };
                match probe.await {
                    Ok(opts) => Some(opts),
                    Err(e) => {
                        let reason =
                            format!("PostgreSQL at {} unreachable: {e:#}", cli.postgres_url);
                        eprintln!("tektree-bench-peers: {reason}");
                        println!(
                            "{}",
                            json!({"scenario": "peers", "peer": backend.peer(), "skipped": reason})
                        );
                        continue;
                    }
                }
            }
        };
        for &c in &clients {
            match measure(&cli, backend, admin.as_ref(), &work, c).await {
                Ok(line) => {
                    if line["errors"].as_u64() != Some(0) {
                        ok = false;
                    }
                    println!("{line}");
                }
                Err(e) => {
                    ok = false;
                    eprintln!("tektree-bench-peers: {} clients={c}: {e:#}", backend.peer());
                    println!(
                        "{}",
                        json!({"scenario": "peers", "peer": backend.peer(), "clients": c,
                            "error": format!("{e:#}")})
                    );
                }
            }
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tektree-bench-peers: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tektree-bench-peers: {e:#}");
            ExitCode::from(2)
        }
    }
}
