//! Live updates over WebSockets (issue #6); the contract is `docs/live.md`.
//!
//! ```text
//!  bus ──► consumer `live` (Notifier, any worker process) ──► fan-out ──► every API instance
//!          event → Notification JSON (+ rank.changed        memory:  broadcast      │ Hub: route by
//!          from the leaderboard read model)                 redis:   PUBLISH        │ user / board into
//!                                                           nats:    core subject   ▼ bounded queues
//!                                                                      /ws/notifications, /ws/leaderboard
//! ```
//!
//! - [`message`]: the messages and the pure event → message mapping;
//! - [`notifier`]: the `live` consumer that publishes them;
//! - [`fanout`]: the transport between the consumer and the API instances, chosen by the bus
//!   URL;
//! - [`hub`]: one instance's sockets and the routing into their bounded queues (slow clients
//!   are dropped);
//! - [`socket`]: the two endpoints (authentication before the upgrade, keep-alive, idle
//!   timeout, board subscriptions).
//!
//! [`Live`] ties them together; the API gets it with
//! `ApiState::with_live` (crate `tektree-services`), which also adds the `live`
//! consumer ([`Notifier`]) to the app's consumers; `tektree worker` adds the consumer alone
//! ([`App::with_consumer`](tektree_runtime::app::App::with_consumer)).

#![deny(missing_docs)]

pub mod fanout;
pub mod hub;
pub mod message;
pub mod notifier;
pub mod socket;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use fanout::Fanout;
pub use hub::{Endpoint, Hub};
pub use message::Notification;
pub use notifier::{Notifier, CONSUMER};

/// Tuning of live updates. Every field has a default (see each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConfig {
    /// Redis pub/sub channel or NATS subject of the fan-out (ignored for the in-process bus).
    /// Every process of one deployment must use the same. Default `tektree.live`.
    pub channel: String,
    /// Messages queued per socket before the socket is dropped as a slow client (close 1008).
    /// Default 256.
    pub queue: usize,
    /// Interval of the server's WebSocket pings; the token is also re-verified at this
    /// interval (an expired token closes the socket with 1008). Default 30 s.
    pub ping_interval: Duration,
    /// A socket from which nothing (not even a pong) arrived for this long is closed with 1001.
    /// Default 90 s (three missed pings).
    pub idle_timeout: Duration,
    /// Boards one `/ws/leaderboard` socket may follow at once. Default 16.
    pub max_boards: usize,
    /// Largest accepted client frame, in bytes. Default 4,096.
    pub max_client_frame: usize,
    /// Share of the monthly limit, in percent (1..=100), whose crossing sends
    /// `quota.warning`. Default 80.
    pub quota_warning_percent: u64,
    /// Events recorded longer ago than this are not pushed (the consumer is catching up).
    /// Default 5 min.
    pub max_age: Duration,
    /// Longest wait of the notifier for the `leaderboard` projection to reach an `xp.earned`
    /// before reading ranks. Default 2 s.
    pub rank_wait: Duration,
    /// Longest wait, at an upgrade, for this instance's fan-out subscription; past it the
    /// upgrade is refused with 503 `live_unavailable`. Default 5 s.
    pub subscribe_timeout: Duration,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            channel: "tektree.live".into(),
            queue: 256,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            max_boards: 16,
            max_client_frame: 4096,
            quota_warning_percent: 80,
            max_age: Duration::from_secs(300),
            rank_wait: Duration::from_secs(2),
            subscribe_timeout: Duration::from_secs(5),
        }
    }
}

/// Why live updates could not be opened or a message not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// The bus URL has no fan-out (or the channel name is invalid for it). Not retryable.
    #[error("live updates: invalid fan-out {0}")]
    InvalidUrl(String),
    /// The fan-out server failed or is unreachable. Retryable.
    #[error("live fan-out transport: {0}")]
    Transport(String),
}

/// Live updates of one process: its fan-out (publishing side for the `live` consumer,
/// subscribing side for the sockets) and its sockets.
///
/// The fan-out subscription is opened on the first WebSocket upgrade and kept for the life of
/// the value (re-opened after a lost connection); dropping the value stops it.
pub struct Live {
    config: LiveConfig,
    fanout: Arc<Fanout>,
    hub: Arc<Hub>,
    ready: watch::Sender<bool>,
    subscriber: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("config", &self.config)
            .field("fanout", &self.fanout)
            .field("sockets", &self.hub.len())
            .finish()
    }
}

impl Live {
    /// Live updates for the bus `bus_url` (`memory`, `redis://…`, `nats://…`; the fan-out is
    /// chosen from it, see [`fanout`]) with `config`.
    ///
    /// # Errors
    /// As [`Fanout::open`].
    pub async fn open(bus_url: &str, config: LiveConfig) -> Result<Live, LiveError> {
        let fanout = Fanout::open(bus_url, &config.channel).await?;
        Ok(Live {
            config,
            fanout: Arc::new(fanout),
            hub: Arc::new(Hub::default()),
            ready: watch::channel(false).0,
            subscriber: Mutex::new(None),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LiveConfig {
        &self.config
    }

    /// `memory`, `redis` or `nats`.
    pub fn transport(&self) -> &'static str {
        self.fanout.transport()
    }

    /// This process' sockets.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// WebSockets currently open on this process.
    pub fn sockets(&self) -> usize {
        self.hub.len()
    }

    /// Publishes `messages`, in order, to every API instance's sockets (what the `live`
    /// consumer does; also usable to push messages of other origins with the same shape).
    ///
    /// # Errors
    /// [`LiveError::Transport`] (retryable).
    pub async fn publish(&self, messages: &[Notification]) -> Result<(), LiveError> {
        let payloads: Vec<String> = messages.iter().map(Notification::to_json).collect();
        self.fanout.publish(&payloads).await
    }

    /// Subscribes this process to the fan-out if it is not yet, and waits up to
    /// [`LiveConfig::subscribe_timeout`] until the subscription is confirmed. Once this
    /// returned `Ok`, every message published afterwards reaches this process' hub (unless
    /// the subscription's connection is lost meanwhile).
    ///
    /// # Errors
    /// [`LiveError::Transport`] when the subscription is not confirmed in time (it keeps
    /// trying in the background).
    pub async fn ensure_subscribed(&self) -> Result<(), LiveError> {
        {
            let mut task = self.subscriber.lock().unwrap_or_else(|p| p.into_inner());
            if task.as_ref().is_none_or(|t| t.is_finished()) {
                let (fanout, hub, ready) =
                    (self.fanout.clone(), self.hub.clone(), self.ready.clone());
                *task = Some(tokio::spawn(async move {
                    fanout
                        .run_subscriber(ready, move |text| hub.route(text))
                        .await;
                }));
            }
        }
        let mut ready = self.ready.subscribe();
        let confirmed = tokio::time::timeout(self.config.subscribe_timeout, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok());
        if confirmed {
            Ok(())
        } else {
            Err(LiveError::Transport(format!(
                "the {} fan-out subscription is not ready",
                self.transport()
            )))
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(t) = self
            .subscriber
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}
