//! `tektree`: the TekTree Core binary. See `tektree --help` and README.md.

/// The global allocator: mimalloc. A rebuild frees a page of decoded events at a time, and
/// glibc's malloc spent about a quarter of a rebuild's CPU in `malloc`/`free` and their
/// free-list consolidation (`perf`, docs/performance.md, issue #14).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tektree_projections::ReadModel;
use tektree_services::api::auth::{
    unix_now, Role, DEFAULT_AUDIENCE, DEFAULT_ISSUER, DEFAULT_LEEWAY_SECS, DEFAULT_TOKEN_TTL_SECS,
};
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tektree_services::billing::{Billing, BillingArgs};
use tektree_services::config::{
    load_rules, redact_url, SecurityOptions, DEFAULT_BUS, DEFAULT_RATE_LIMIT, DEFAULT_STORE,
};
use tektree_services::export::{self, Format};
use tektree_services::live::{Live, LiveConfig, Notifier};
use tektree_services::worker::WorkerConfig;
use tektree_services::{api, import, restore};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(
    name = "tektree",
    version,
    about = "TekTree Core: event-sourced CQRS engine"
)]
struct Cli {
    /// Event store: `sqlite://PATH` (events, outbox, read models in one file) or
    /// `mongodb://HOST[:PORT]/[DB]?replicaSet=NAME` (a replica set; see docs/mongodb.md).
    #[arg(long, global = true, env = "TEKTREE_STORE", default_value = DEFAULT_STORE)]
    store: String,
    /// Bus: `memory` (in-process), `redis://HOST:PORT` or `nats://HOST:PORT` (JetStream).
    #[arg(long, global = true, env = "TEKTREE_BUS", default_value = DEFAULT_BUS)]
    bus: String,
    /// TOML file with `[xp]`, `[quota]` and `[gamification]` rules (docs/config.md); defaults
    /// per issues #2 and #6 (`config/gamification.toml`).
    #[arg(long, global = true, env = "TEKTREE_RULES")]
    rules: Option<PathBuf>,
    /// Save an aggregate snapshot every N events (0 = never); loads then fold at most N−1
    /// events after a restart (docs/architecture.md, "Snapshots").
    #[arg(long, global = true, env = "TEKTREE_SNAPSHOT_INTERVAL",
          default_value_t = tektree_commands::DEFAULT_SNAPSHOT_INTERVAL)]
    snapshot_interval: u64,
    #[command(flatten)]
    security: SecurityArgs,
    /// How long a query sent with `min_position` / `X-Min-Position` waits for its read models
    /// before answering 503 `stale_read_model` (milliseconds; read-your-writes).
    #[arg(
        long,
        global = true,
        env = "TEKTREE_READ_WAIT_MS",
        default_value_t = 1000
    )]
    read_wait_ms: u64,
    /// A consumer with lag > 0 whose checkpoint has not moved for this long is reported
    /// stalled (`GET /v1/projections`, `/healthz` degraded, metric `tektree_consumer_stalled`).
    #[arg(long, global = true, env = "TEKTREE_STALL_AFTER_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    stall_after_secs: u64,
    #[command(subcommand)]
    command: Command,
}

/// The API's security options (docs/config.md, "Security"; issue #4). Used by `serve`, `api`
/// and `token`.
#[derive(Args, Clone)]
struct SecurityArgs {
    /// HS256 shared secret for bearer tokens (at least 32 bytes). Default: the secret file next
    /// to the SQLite store (`<store>.jwt-secret`, created on first start).
    #[arg(long, global = true, env = "TEKTREE_JWT_HS256_SECRET", hide_env_values = true,
          conflicts_with_all = ["jwt_hs256_secret_file", "jwt_rs256_public_key"])]
    jwt_hs256_secret: Option<String>,
    /// File holding the HS256 secret (trailing whitespace ignored).
    #[arg(
        long,
        global = true,
        env = "TEKTREE_JWT_HS256_SECRET_FILE",
        conflicts_with = "jwt_rs256_public_key"
    )]
    jwt_hs256_secret_file: Option<PathBuf>,
    /// PEM file of the RS256 public key: tokens are then verified with RS256 only.
    #[arg(long, global = true, env = "TEKTREE_JWT_RS256_PUBLIC_KEY")]
    jwt_rs256_public_key: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, global = true, env = "TEKTREE_JWT_ISSUER", default_value = DEFAULT_ISSUER)]
    jwt_issuer: String,
    /// Required `aud` claim.
    #[arg(long, global = true, env = "TEKTREE_JWT_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    jwt_audience: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    #[arg(long, global = true, env = "TEKTREE_JWT_LEEWAY_SECS", default_value_t = DEFAULT_LEEWAY_SECS)]
    jwt_leeway_secs: u64,
    /// Per-user command rate limits: `memory` (this process), `redis://HOST:PORT[/DB]` (shared
    /// by every API instance) or `off`.
    #[arg(long, global = true, env = "TEKTREE_RATE_LIMIT", default_value = DEFAULT_RATE_LIMIT)]
    rate_limit: String,
    /// An origin allowed by CORS, e.g. `https://app.example.com` (repeatable; the environment
    /// variable takes a comma-separated list). Default: none, no CORS headers.
    #[arg(
        long = "cors-origin",
        global = true,
        env = "TEKTREE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
}

impl std::fmt::Debug for SecurityArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.options(), f)
    }
}

impl SecurityArgs {
    fn options(&self) -> SecurityOptions {
        SecurityOptions {
            jwt_hs256_secret: self.jwt_hs256_secret.clone(),
            jwt_hs256_secret_file: self.jwt_hs256_secret_file.clone(),
            jwt_rs256_public_key: self.jwt_rs256_public_key.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_audience: self.jwt_audience.clone(),
            jwt_leeway_secs: self.jwt_leeway_secs,
            rate_limit: self.rate_limit.clone(),
            cors_origins: self.cors_origins.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// API, relay, policies and projection workers in one process.
    Serve {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Import a Stack Exchange dump directory through the command path after start-up.
        #[arg(long)]
        import: Option<PathBuf>,
        /// Site name for the import's ids (default: the directory name).
        #[arg(long, requires = "import")]
        site: Option<String>,
        #[command(flatten)]
        billing: BillingArgs,
    },
    /// Only the HTTP API.
    Api {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        billing: BillingArgs,
    },
    /// Only the outbox relay (needs a shared bus such as redis://).
    Relay,
    /// Projection and policy workers (needs a shared bus such as redis://).
    Worker {
        /// Run only this consumer (`xp`, `leaderboard`, `quota`, `content`,
        /// `policy.gamification`, `policy.subscription`, `live`); default: all.
        #[arg(long)]
        projection: Option<String>,
        /// Fault injection for tests: fail permanently on these event ids (comma-separated), so
        /// that they end as dead letters after the delivery limit.
        #[arg(long, env = "TEKTREE_FAIL_ON", value_delimiter = ',')]
        fail_on: Vec<uuid::Uuid>,
    },
    /// Import data through the command path.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Print a signed HS256 bearer token (for development and scripts), e.g.
    /// `TOKEN=$(tektree token --user UUID)`. Uses the configured HS256 secret, else the secret
    /// file next to the store (created if missing), with the configured issuer and audience.
    Token {
        /// The user (`sub` claim).
        #[arg(long)]
        user: uuid::Uuid,
        /// A role for the `roles` claim (repeatable); default none, which means `user`.
        #[arg(long = "role", value_enum)]
        roles: Vec<Role>,
        /// Lifetime in seconds (`exp` = `iat` + this).
        #[arg(long, default_value_t = DEFAULT_TOKEN_TTL_SECS, value_parser = clap::value_parser!(u64).range(1..))]
        ttl_secs: u64,
    },
    /// Copy the SQLite store to a new file PATH, in one consistent step while other processes
    /// go on writing (read models included). MongoDB stores are backed up with mongodump or a
    /// storage snapshot (docs/operations.md).
    Backup {
        /// The backup file to create (never overwritten).
        path: PathBuf,
    },
    /// Put a backup in place of the store (stop every process using it first) and raise the
    /// store's epoch: the bus is emptied and refilled from the store, read models ahead of it
    /// are rebuilt. Without --from, mark a store put back by other means (a file copy,
    /// mongorestore, a snapshot) as restored.
    Restore {
        /// The SQLite backup file (made by `tektree backup`).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Write a read model (`xp`, `leaderboard`, `quota`, `content`, `tags`) to stdout or a file.
    Export {
        /// Read model.
        read_model: ReadModel,
        /// `jsonl` or `csv`.
        #[arg(long, default_value = "jsonl")]
        format: Format,
        /// Output file (default stdout).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ImportSource {
    /// A Stack Exchange data dump directory (Users.xml, Posts.xml, Comments.xml, Votes.xml).
    Stackexchange {
        /// Dump directory.
        dir: PathBuf,
        /// Site name for ids (default: the directory name).
        #[arg(long)]
        site: Option<String>,
    },
}

/// How long a starting process waits for an unreachable bus (see [`App::open_waiting`]).
const BUS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

fn shutdown_channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let tx2 = tx.clone();
    tokio::spawn(async move {
        let term = async {
            #[cfg(unix)]
            {
                if let Ok(mut s) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    s.recv().await;
                }
            }
            #[cfg(not(unix))]
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
        tracing::info!("shutting down");
        let _ = tx2.send(true);
    });
    (tx, rx)
}

async fn wait(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            break;
        }
    }
}

fn require_shared_bus(app: &App, what: &str) -> Result<()> {
    if app.in_process_bus {
        bail!("`tektree {what}` runs as its own process and needs a shared bus (--bus redis://…); with the in-process bus use `tektree serve`");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let options = cli.security.options();
    if let Command::Token {
        user,
        roles,
        ttl_secs,
    } = &cli.command
    {
        let (auth, _) = options.authenticator(&cli.store)?;
        let token = auth
            .sign(&auth.claims(*user, roles, unix_now(), *ttl_secs))
            .context("`tektree token` signs HS256 tokens; with --jwt-rs256-public-key tokens come from the identity provider holding the private key")?;
        println!("{token}");
        return Ok(());
    }
    // Backup and restore work on the store before (and instead of) opening the app.
    match &cli.command {
        Command::Backup { path } => {
            let report = restore::backup(&cli.store, path).await?;
            println!(
                "backed up {} (head {}) to {}",
                report.identity,
                report.head,
                path.display()
            );
            return Ok(());
        }
        Command::Restore { from } => {
            let rules = load_rules(cli.rules.as_deref())?;
            let done = restore::restore(&cli.store, &cli.bus, from.as_deref(), rules).await?;
            println!(
                "restored: now {} (head {}); replaced {}; read models rebuilt: {}",
                done.restored,
                done.head,
                done.replaced
                    .map_or_else(|| "nothing".to_string(), |r| r.to_string()),
                if done.rebuilt.is_empty() {
                    "none".to_string()
                } else {
                    done.rebuilt.join(", ")
                }
            );
            return Ok(());
        }
        _ => {}
    }
    // Install the Prometheus recorder before any worker records a metric.
    let _ = api::metrics::handle();
    let rules = load_rules(cli.rules.as_deref())?;
    let (store_shown, bus_shown) = (redact_url(&cli.store), redact_url(&cli.bus));
    let app = App::open_waiting(&cli.store, &cli.bus, rules, BUS_PATIENCE)
        .await
        .with_context(|| format!("opening store {store_shown} and bus {bus_shown}"))?
        .with_snapshot_interval(cli.snapshot_interval)
        .with_stall_threshold(Duration::from_secs(cli.stall_after_secs));
    // The HTTP API's state (security, live updates, billing) for the processes that serve it.
    // Live updates (docs/live.md): the API instances push to WebSockets, the workers feed them;
    // the fan-out follows the bus (in-process, Redis pub/sub or NATS core).
    let (app, api) = match &cli.command {
        Command::Serve { billing, .. } | Command::Api { billing, .. } => {
            let state = ApiState::new(app)
                .with_security(secure(&options, &cli.store).await?)
                .with_live(live(&cli.bus).await?)
                .with_billing(Billing::from_args(billing).context("configuring Polar billing")?)
                .with_read_wait(api::fresh::ReadWait(Duration::from_millis(
                    cli.read_wait_ms,
                )));
            (state.app.as_ref().clone(), Some(state))
        }
        Command::Worker { .. } => {
            let live = Arc::new(live(&cli.bus).await?);
            let notifier = Arc::new(Notifier::new(live, app.read_models.clone()));
            (app.with_consumer(notifier), None)
        }
        _ => (app, None),
    };
    match cli.command {
        Command::Serve {
            listen,
            import: dump,
            site,
            ..
        } => {
            let (_tx, rx) = shutdown_channel();
            let mut tasks = JoinSet::new();
            app.seed_in_process_bus().await?;
            app.spawn_pipeline(rx.clone(), &mut tasks);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(%listen, store = %store_shown, bus = %bus_shown, "serving");
            let state = api.context("the API state of `serve`")?;
            let server = tokio::spawn(api::serve(state, listener, wait(rx.clone())));
            if let Some(dir) = dump {
                let report =
                    import::import_with_pipeline_running(&app, &dir, site.as_deref()).await?;
                println!("{report}");
                app.settle(Duration::from_secs(3600)).await?;
                tracing::info!("import settled; read models are up to date");
            }
            server.await??;
            tasks.shutdown().await;
        }
        Command::Api { listen, .. } => {
            let (_tx, rx) = shutdown_channel();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(%listen, "serving API only");
            let state = api.context("the API state of `api`")?;
            api::serve(state, listener, wait(rx)).await?;
        }
        Command::Relay => {
            require_shared_bus(&app, "relay")?;
            let (_tx, rx) = shutdown_channel();
            let mut tasks = JoinSet::new();
            app.spawn_relay(rx.clone(), &mut tasks);
            while tasks.join_next().await.is_some() {}
        }
        Command::Worker {
            projection,
            fail_on,
        } => {
            require_shared_bus(&app, "worker")?;
            let consumers = match projection {
                Some(name) => vec![app.consumer(&name).with_context(|| {
                    format!("unknown consumer {name:?}: expected xp, leaderboard, quota, content, policy.gamification, policy.subscription or live")
                })?],
                None => app.consumers(),
            };
            let (_tx, rx) = shutdown_channel();
            let mut tasks = JoinSet::new();
            for c in consumers {
                let cfg = WorkerConfig {
                    fail_on: fail_on.clone(),
                    ..WorkerConfig::default()
                };
                app.spawn_consumer(c, cfg, rx.clone(), &mut tasks);
            }
            while tasks.join_next().await.is_some() {}
        }
        Command::Import {
            source: ImportSource::Stackexchange { dir, site },
        } => {
            let report = import::run_import_cli(&app, &dir, site.as_deref()).await?;
            println!("{report}");
        }
        Command::Export {
            read_model,
            format,
            output,
        } => {
            let n = match output {
                Some(path) => {
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(f);
                    export::export(app.read_models.as_ref(), read_model, format, &mut w).await?
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    export::export(app.read_models.as_ref(), read_model, format, &mut w).await?
                }
            };
            tracing::info!(rows = n, "exported");
        }
        // Done above, before the store was opened.
        Command::Token { .. } | Command::Backup { .. } | Command::Restore { .. } => {}
    }
    Ok(())
}

/// The live-update hub over `bus` (its fan-out channel follows the bus kind).
async fn live(bus: &str) -> Result<Live> {
    Live::open(bus, LiveConfig::default())
        .await
        .with_context(|| format!("opening the live-update fan-out on {}", redact_url(bus)))
}

/// The API's security from `options` (key, rate limits, CORS); logs where the key came from,
/// never the key.
async fn secure(options: &SecurityOptions, store: &str) -> Result<Security> {
    let (security, key_source) = options
        .security(store)
        .await
        .context("configuring API security")?;
    tracing::info!(
        key = %key_source,
        issuer = %security.auth.issuer(),
        audience = %security.auth.audience(),
        leeway_secs = security.auth.leeway_secs(),
        rate_limit = %redact_url(&options.rate_limit),
        cors_origins = ?security.cors.origins(),
        "API security"
    );
    Ok(security)
}
