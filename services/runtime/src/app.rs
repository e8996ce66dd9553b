//! The application: ports wired to adapters chosen by URL.

use std::sync::Arc;
use std::time::Duration;

use tektree_commands::policies::{self, Policy};
use tektree_commands::{CommandHandler, StoreServices};
use tektree_domain::{KnowledgeServices, Rules};
use tektree_event_store::mongo::MongoStore;
use tektree_event_store::{EventStore, SqliteStore};
use tektree_outbox::binding::{bind, BindError};
use tektree_outbox::recovery::{self, ConsumerCheckpoints};
use tektree_outbox::relay::{self, RelayConfig};
use tektree_outbox::{open_bus, Bus, BusError};
use tektree_projections::{MongoReadModels, Projection, ReadModelStore, SqliteReadModels};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{ConfigError, StoreUrl};
use crate::consumer::{self, Consumer};
use crate::progress::{self, ConsumerProgress, Progress, StallWatch};
use crate::worker::{self, WorkerConfig};

/// [`open_bus`], retrying transport failures for up to `patience`.
async fn open_bus_waiting(url: &str, patience: Duration) -> Result<Arc<dyn Bus>, BusError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(100);
    loop {
        match open_bus(url).await {
            Err(BusError::Transport(e)) if tokio::time::Instant::now() + backoff <= deadline => {
                tracing::warn!(error = %e, retry_in = ?backoff, "bus unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Errors opening or running the application.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The event store could not be opened.
    #[error(transparent)]
    Store(#[from] tektree_event_store::StoreError),
    /// The read-model store could not be opened.
    #[error(transparent)]
    ReadModels(#[from] tektree_projections::ReadModelError),
    /// The bus could not be opened.
    #[error(transparent)]
    Bus(#[from] tektree_outbox::BusError),
    /// The bus carries another store's events, or this store's from another epoch
    /// ([`tektree_outbox::binding`]); nothing was published or consumed.
    #[error(transparent)]
    Binding(tektree_outbox::binding::BindError),
    /// Waiting for the pipeline to settle timed out.
    #[error("pipeline did not settle within {0:?}: {1}")]
    NotSettled(Duration, String),
}

/// Every port, wired.
#[derive(Clone)]
pub struct App {
    /// Event store (events + outbox).
    pub store: Arc<dyn EventStore>,
    /// Read models and consumer checkpoints.
    pub read_models: Arc<dyn ReadModelStore>,
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// `true` when `bus` is the in-process bus (lost on exit; re-seeded from the store).
    pub in_process_bus: bool,
    /// Command handler over `store`.
    pub handler: CommandHandler,
    /// Cross-aggregate lookups for content commands.
    pub knowledge: Arc<dyn KnowledgeServices>,
    /// XP and quota rules.
    pub rules: Rules,
    /// Consumers beyond the projections and policies, added by [`App::with_consumer`] (the
    /// `live` feed of the HTTP API's process, for one).
    pub extra_consumers: Vec<Arc<dyn Consumer>>,
    /// Stall detection's memory ([`crate::progress`]), shared by clones of the app.
    pub stalls: Arc<StallWatch>,
    /// The relay's settings: [`RelayConfig::default`] (an idle outbox polled every 5 ms) on
    /// SQLite; every [`MONGO_RELAY_IDLE_POLL`] on MongoDB, where an idle poll is a query to
    /// the server (and a sequencing pass).
    pub relay: RelayConfig,
}

/// How often the relay polls an idle MongoDB outbox: 50 ms.
pub const MONGO_RELAY_IDLE_POLL: Duration = Duration::from_millis(50);

impl App {
    /// Opens the store named by `store_url` (`sqlite://PATH` or `mongodb://…`) and the bus named
    /// by `bus_url` (`memory`, `redis://…`, `nats://…`), and checks that the bus carries this
    /// store's events, binding a new bus to the store ([`tektree_outbox::binding::bind`]).
    ///
    /// # Errors
    /// [`AppError`] when either cannot be opened; [`AppError::Binding`] when the bus belongs to
    /// another store (or another epoch of this one).
    pub async fn open(store_url: &str, bus_url: &str, rules: Rules) -> Result<App, AppError> {
        App::open_waiting(store_url, bus_url, rules, Duration::ZERO).await
    }

    /// [`App::open`], but an unreachable bus ([`BusError::Transport`]: connection refused,
    /// server restarting) is retried with backoff (100 ms doubling to 2 s) for up to
    /// `bus_patience` before giving up. The `tektree` binary waits 60 s, so that processes
    /// started while Redis or NATS restart come up once the bus is back instead of exiting
    /// (found by the fault harness, docs/reliability.md). Other errors fail at once.
    ///
    /// # Errors
    /// As [`App::open`].
    pub async fn open_waiting(
        store_url: &str,
        bus_url: &str,
        rules: Rules,
        bus_patience: Duration,
    ) -> Result<App, AppError> {
        let mut relay = RelayConfig::default();
        let (store, read_models): (Arc<dyn EventStore>, Arc<dyn ReadModelStore>) =
            match StoreUrl::parse(store_url)? {
                StoreUrl::Sqlite(path) => {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            tektree_event_store::StoreError::Backend(format!(
                                "create {}: {e}",
                                dir.display()
                            ))
                        })?;
                    }
                    (
                        Arc::new(SqliteStore::open(&path)?),
                        Arc::new(SqliteReadModels::open(&path)?),
                    )
                }
                StoreUrl::Mongo { uri, db } => {
                    relay.idle_poll = MONGO_RELAY_IDLE_POLL;
                    (
                        Arc::new(MongoStore::connect(&uri, &db).await?),
                        Arc::new(MongoReadModels::connect(&uri, &db).await?),
                    )
                }
            };
        let bus = open_bus_waiting(bus_url, bus_patience).await?;
        bind(store.as_ref(), bus.as_ref())
            .await
            .map_err(|e| match e {
                BindError::Bus(e) => AppError::Bus(e),
                BindError::Store(e) => AppError::Store(e),
                refused => AppError::Binding(refused),
            })?;
        let handler = CommandHandler::new(store.clone()).with_quota_rules(rules.quota.clone());
        let knowledge: Arc<dyn KnowledgeServices> = Arc::new(StoreServices::new(handler.clone()));
        Ok(App {
            store,
            read_models,
            bus,
            in_process_bus: bus_url == "memory",
            handler,
            knowledge,
            rules,
            extra_consumers: Vec::new(),
            stalls: Arc::new(StallWatch::default()),
            relay,
        })
    }

    /// This application with `consumer` run after the projections and policies (by
    /// [`App::spawn_pipeline`], counted by [`App::settle`] and the checkpoints). A consumer
    /// of the same name is replaced.
    pub fn with_consumer(mut self, consumer: Arc<dyn Consumer>) -> App {
        self.extra_consumers.retain(|c| c.name() != consumer.name());
        self.extra_consumers.push(consumer);
        self
    }

    /// This application with aggregate snapshots every `interval` events (0 = off; default
    /// [`tektree_commands::DEFAULT_SNAPSHOT_INTERVAL`]). Replaces the command handler (and the
    /// lookups built on it); call it before cloning the app into tasks.
    pub fn with_snapshot_interval(mut self, interval: u64) -> App {
        self.handler = self.handler.clone().with_snapshot_interval(interval);
        self.knowledge = Arc::new(StoreServices::new(self.handler.clone()));
        self
    }

    /// This application reporting a consumer as stalled after `threshold` without progress
    /// while it lags (default [`DEFAULT_STALL_AFTER`](crate::progress::DEFAULT_STALL_AFTER)).
    pub fn with_stall_threshold(mut self, threshold: Duration) -> App {
        self.stalls = Arc::new(StallWatch::new(threshold));
        self
    }

    /// The store's head and every consumer's checkpoint, lag and stall (observed now, see
    /// [`crate::progress`]); also sets the consumer gauges. Checkpoints are read before the
    /// head, so a lag is never negative.
    ///
    /// # Errors
    /// [`AppError::ReadModels`] or [`AppError::Store`] when either cannot be read.
    pub async fn progress(&self) -> Result<Progress, AppError> {
        let checkpoints = self.read_models.checkpoints().await?;
        let head = self.store.last_position().await?;
        let now = std::time::Instant::now();
        let consumers = self
            .consumers()
            .iter()
            .map(|c| {
                let cp = checkpoints.iter().find(|k| k.name == c.name());
                let checkpoint = cp.map_or(0, |k| k.checkpoint);
                let lag = head.saturating_sub(checkpoint);
                ConsumerProgress {
                    name: c.name().to_string(),
                    checkpoint,
                    applied: cp.map_or(0, |k| k.applied),
                    lag,
                    stalled_for: self.stalls.observe(c.name(), checkpoint, lag, now),
                }
            })
            .collect();
        let p = Progress { head, consumers };
        progress::record_metrics(&p, &self.stalls, now);
        Ok(p)
    }

    /// The policies, by consumer name.
    pub fn policies(&self) -> Vec<Arc<dyn Policy>> {
        policies::all(&self.handler, &self.rules)
    }

    /// Every consumer: the four projections and the two policies, then those added with
    /// [`App::with_consumer`] (the `live` feed when the process serves live updates).
    pub fn consumers(&self) -> Vec<Arc<dyn Consumer>> {
        let mut v: Vec<Arc<dyn Consumer>> = Projection::ALL.map(consumer::projection).into();
        v.extend(self.policies().into_iter().map(consumer::policy));
        v.extend(self.extra_consumers.iter().cloned());
        v
    }

    /// The consumer named `name` (`xp`, `policy.gamification`, …).
    pub fn consumer(&self, name: &str) -> Option<Arc<dyn Consumer>> {
        self.consumers().into_iter().find(|c| c.name() == name)
    }

    /// For the in-process bus only: publishes every stored event above the lowest consumer
    /// checkpoint, so that events published by an earlier process (whose in-memory bus died
    /// with it) but not yet applied reach every consumer again. Consumers drop the ones they
    /// already applied (sequence guard).
    ///
    /// # Errors
    /// Store, read-model or bus errors.
    pub async fn seed_in_process_bus(&self) -> Result<(), AppError> {
        if !self.in_process_bus {
            return Ok(());
        }
        let from = self
            .checkpoints()
            .lowest_checkpoint()
            .await
            .map_err(|e| AppError::Store(tektree_event_store::StoreError::Backend(e)))?;
        let head = self.store.head().await?.position;
        recovery::republish(
            self.store.as_ref(),
            self.bus.as_ref(),
            (from, 0),
            head,
            SEED_BATCH,
        )
        .await
        .map_err(|e| match e {
            relay::RelayError::Bus(e) => AppError::Bus(e),
            relay::RelayError::Store(e) => AppError::Store(e),
            other => AppError::Bus(BusError::Transport(other.to_string())),
        })?;
        Ok(())
    }

    /// Where this app's consumers stand (the lowest of their checkpoints), for the relay's
    /// recovery of a bus that lost events ([`recovery`]).
    pub fn checkpoints(&self) -> Arc<dyn ConsumerCheckpoints> {
        Arc::new(AppCheckpoints {
            read_models: self.read_models.clone(),
            consumers: self
                .consumers()
                .iter()
                .map(|c| c.name().to_string())
                .collect(),
        })
    }

    /// Runs the relay and every consumer in this process until `shutdown` turns `true`
    /// (`tektree serve`).
    pub fn spawn_pipeline(&self, shutdown: watch::Receiver<bool>, tasks: &mut JoinSet<()>) {
        self.spawn_relay(shutdown.clone(), tasks);
        for c in self.consumers() {
            self.spawn_consumer(c, WorkerConfig::default(), shutdown.clone(), tasks);
        }
    }

    /// Spawns the outbox relay.
    pub fn spawn_relay(&self, shutdown: watch::Receiver<bool>, tasks: &mut JoinSet<()>) {
        let (store, bus) = (self.store.clone(), self.bus.clone());
        let checkpoints = Some(self.checkpoints());
        let cfg = self.relay.clone();
        tasks.spawn(async move {
            if let Err(e) = relay::run(store, bus, cfg, checkpoints, shutdown).await {
                tracing::error!(error = %e, "relay stopped");
            }
        });
    }

    /// Spawns one consumer.
    pub fn spawn_consumer(
        &self,
        consumer: Arc<dyn Consumer>,
        cfg: WorkerConfig,
        shutdown: watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
    ) {
        let app = self.clone();
        tasks.spawn(async move {
            let name = consumer.name().to_string();
            if let Err(e) = worker::run(&app, consumer, cfg, shutdown).await {
                tracing::error!(consumer = %name, error = %e, "consumer stopped");
            }
        });
    }

    /// Waits until the outbox is empty, every consumer's checkpoint equals the store's head
    /// position, and the head stayed the same across one more check (policies append events
    /// of their own). Polls every 50 ms for at most `timeout`.
    ///
    /// # Errors
    /// [`AppError::NotSettled`] with the last observed state.
    pub async fn settle(&self, timeout: Duration) -> Result<(), AppError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut stable_head = None;
        loop {
            // The highest position only: `head()` also counts the events, a full scan on SQLite.
            let head = self.store.last_position().await?;
            let backlog = self.store.outbox_backlog().await?;
            let cps = self.read_models.checkpoints().await?;
            let names: Vec<String> = self.consumers().iter().map(|c| c.name().into()).collect();
            let behind: Vec<String> = names
                .iter()
                .filter_map(|n| {
                    let cp = cps.iter().find(|c| &c.name == n).map(|c| c.checkpoint);
                    (cp.unwrap_or(0) < head).then(|| format!("{n}@{}", cp.unwrap_or(0)))
                })
                .collect();
            if backlog == 0 && behind.is_empty() {
                if stable_head == Some(head) {
                    return Ok(());
                }
                stable_head = Some(head);
            } else {
                stable_head = None;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AppError::NotSettled(
                    timeout,
                    format!(
                        "head {}, outbox backlog {backlog}, behind: {}",
                        head,
                        behind.join(", ")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Events read and published per page when seeding the in-process bus.
const SEED_BATCH: usize = 1000;

/// [`ConsumerCheckpoints`] of an app: the lowest checkpoint among its consumers and every
/// consumer the read-model store has a checkpoint for (a consumer that never applied anything
/// counts as 0).
struct AppCheckpoints {
    read_models: Arc<dyn ReadModelStore>,
    consumers: Vec<String>,
}

#[async_trait::async_trait]
impl ConsumerCheckpoints for AppCheckpoints {
    async fn lowest_checkpoint(&self) -> Result<u64, String> {
        let known = self
            .read_models
            .checkpoints()
            .await
            .map_err(|e| e.to_string())?;
        let ours = self
            .consumers
            .iter()
            .map(|name| {
                known
                    .iter()
                    .find(|k| &k.name == name)
                    .map_or(0, |k| k.checkpoint)
            })
            .min();
        let theirs = known.iter().map(|k| k.checkpoint).min();
        Ok(ours.into_iter().chain(theirs).min().unwrap_or(0))
    }
}
