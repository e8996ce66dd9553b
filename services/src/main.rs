//! `tektree`: the TekTree Core binary. See `tektree --help` and README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tektree_projections::ReadModel;
use tektree_services::app::App;
use tektree_services::config::{load_rules, DEFAULT_BUS, DEFAULT_STORE};
use tektree_services::export::{self, Format};
use tektree_services::worker::WorkerConfig;
use tektree_services::{api, import};
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
    /// TOML file with `[xp]` and `[quota]` rules (docs/config.md); defaults per issue #2.
    #[arg(long, global = true, env = "TEKTREE_RULES")]
    rules: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
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
    },
    /// Only the HTTP API.
    Api {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Only the outbox relay (needs a shared bus such as redis://).
    Relay,
    /// Projection and policy workers (needs a shared bus such as redis://).
    Worker {
        /// Run only this consumer (`xp`, `leaderboard`, `quota`, `content`,
        /// `policy.gamification`, `policy.subscription`); default: all.
        #[arg(long)]
        projection: Option<String>,
    },
    /// Import data through the command path.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Write a read model (`xp`, `leaderboard`, `quota`, `content`) to stdout or a file.
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
    // Install the Prometheus recorder before any worker records a metric.
    let _ = api::metrics::handle();
    let rules = load_rules(cli.rules.as_deref())?;
    let app = App::open(&cli.store, &cli.bus, rules)
        .await
        .with_context(|| format!("opening store {} and bus {}", cli.store, cli.bus))?;
    match cli.command {
        Command::Serve {
            listen,
            import: dump,
            site,
        } => {
            let (_tx, rx) = shutdown_channel();
            let mut tasks = JoinSet::new();
            app.seed_in_process_bus().await?;
            app.spawn_pipeline(rx.clone(), &mut tasks);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(%listen, store = %cli.store, bus = %cli.bus, "serving");
            let server = tokio::spawn(api::serve(app.clone(), listener, wait(rx.clone())));
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
        Command::Api { listen } => {
            let (_tx, rx) = shutdown_channel();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(%listen, "serving API only");
            api::serve(app, listener, wait(rx)).await?;
        }
        Command::Relay => {
            require_shared_bus(&app, "relay")?;
            let (_tx, rx) = shutdown_channel();
            let mut tasks = JoinSet::new();
            app.spawn_relay(rx.clone(), &mut tasks);
            while tasks.join_next().await.is_some() {}
        }
        Command::Worker { projection } => {
            require_shared_bus(&app, "worker")?;
            let consumers = match projection {
                Some(name) => vec![app.consumer(&name).with_context(|| {
                    format!("unknown consumer {name:?}: expected xp, leaderboard, quota, content, policy.gamification or policy.subscription")
                })?],
                None => app.consumers(),
            };
            let (_tx, rx) = shutdown_channel();
            let mut tasks = JoinSet::new();
            for c in consumers {
                app.spawn_consumer(c, WorkerConfig::default(), rx.clone(), &mut tasks);
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
    }
    Ok(())
}
