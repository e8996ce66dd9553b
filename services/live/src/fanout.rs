//! The fan-out: how a message published by the `live` consumer (in whichever process runs it)
//! reaches every API instance.
//!
//! Chosen by the bus URL, so that no further server is needed:
//!
//! | bus URL | fan-out | published with |
//! |---|---|---|
//! | `memory` | an in-process `tokio::sync::broadcast` channel (capacity 4,096) | `send` |
//! | `redis://…` | Redis pub/sub channel `<channel>` (default `tektree.live`) | `PUBLISH` |
//! | `nats://…` | NATS core subject `<channel>` (no JetStream) | `PUBLISH` + flush |
//!
//! All three are **at most once**: an instance that is not subscribed at the moment of the
//! publish (it is restarting, its connection is down) never gets that message. That is the
//! right trade for live updates: the bus and the read models stay the source of truth, and a
//! client that reconnects re-reads the REST queries. An instance whose in-process receiver lags
//! more than 4,096 messages behind skips the oldest ones (counted in
//! `tektree_live_fanout_lagged_total`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use tokio::sync::{broadcast, watch, Mutex};

use super::LiveError;

/// Capacity of the in-process broadcast channel, in messages.
pub const MEMORY_CAPACITY: usize = 4096;
/// Time allowed to connect, and for a publish or a subscription to be confirmed.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How often the Redis subscriber pings its connection (a dead one is replaced).
const REDIS_PING_EVERY: Duration = Duration::from_secs(15);
/// Longest wait between two attempts to (re)subscribe.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// One fan-out transport (module docs).
pub enum Fanout {
    /// In-process broadcast (bus `memory`).
    Memory(broadcast::Sender<String>),
    /// Redis pub/sub.
    Redis {
        /// The server.
        client: Client,
        /// Channel name.
        channel: String,
        /// Publishing connection, opened on first use and replaced after a failure.
        conn: Mutex<Option<MultiplexedConnection>>,
    },
    /// NATS core publish/subscribe.
    Nats {
        /// The connection (reconnects by itself, re-subscribing).
        client: async_nats::Client,
        /// Subject.
        subject: String,
    },
}

impl std::fmt::Debug for Fanout {
    /// Names the transport and channel, never the URL (it may carry a password).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fanout::Memory(_) => f.write_str("Fanout::Memory"),
            Fanout::Redis { channel, .. } => write!(f, "Fanout::Redis({channel})"),
            Fanout::Nats { subject, .. } => write!(f, "Fanout::Nats({subject})"),
        }
    }
}

impl Fanout {
    /// The fan-out that goes with the bus `bus_url` (`memory`, `redis://…`, `rediss://…`,
    /// `nats://…`), on `channel` (a Redis channel or a NATS subject without wildcards).
    ///
    /// # Errors
    /// [`LiveError::InvalidUrl`] for another URL or an invalid NATS subject;
    /// [`LiveError::Transport`] when the NATS server cannot be reached (Redis connects on
    /// first use).
    pub async fn open(bus_url: &str, channel: &str) -> Result<Fanout, LiveError> {
        if bus_url == "memory" {
            return Ok(Fanout::Memory(broadcast::channel(MEMORY_CAPACITY).0));
        }
        if bus_url.starts_with("redis://") || bus_url.starts_with("rediss://") {
            let client =
                Client::open(bus_url).map_err(|_| LiveError::InvalidUrl(redact(bus_url)))?;
            return Ok(Fanout::Redis {
                client,
                channel: channel.to_string(),
                conn: Mutex::new(None),
            });
        }
        if bus_url.starts_with("nats://") || bus_url.starts_with("tls://") {
            let valid = !channel.is_empty()
                && channel
                    .split('.')
                    .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ', '\t']));
            if !valid {
                return Err(LiveError::InvalidUrl(format!(
                    "invalid NATS subject {channel:?} for live updates"
                )));
            }
            let addr: async_nats::ServerAddr = bus_url
                .parse()
                .map_err(|_| LiveError::InvalidUrl(redact(bus_url)))?;
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(TIMEOUT)
                .connect(addr)
                .await
                .map_err(|e| LiveError::Transport(format!("connecting to nats: {e}")))?;
            return Ok(Fanout::Nats {
                client,
                subject: channel.to_string(),
            });
        }
        Err(LiveError::InvalidUrl(redact(bus_url)))
    }

    /// `memory`, `redis` or `nats`.
    pub fn transport(&self) -> &'static str {
        match self {
            Fanout::Memory(_) => "memory",
            Fanout::Redis { .. } => "redis",
            Fanout::Nats { .. } => "nats",
        }
    }

    /// Publishes `payloads` in order. Returns once the transport accepted them (Redis: the
    /// `PUBLISH`es were answered; NATS: the server acknowledged a flush; memory: at once).
    ///
    /// # Errors
    /// [`LiveError::Transport`] (retryable; some prefix may have been published).
    pub async fn publish(&self, payloads: &[String]) -> Result<(), LiveError> {
        if payloads.is_empty() {
            return Ok(());
        }
        match self {
            Fanout::Memory(tx) => {
                for p in payloads {
                    // No receiver (no API instance in this process) is not an error.
                    let _ = tx.send(p.clone());
                }
                Ok(())
            }
            Fanout::Redis {
                client,
                channel,
                conn,
            } => {
                let mut slot = conn.lock().await;
                let mut c = match slot.take() {
                    Some(c) => c,
                    None => redis_connect(client).await?,
                };
                let mut pipe = redis::pipe();
                for p in payloads {
                    pipe.cmd("PUBLISH").arg(channel).arg(p).ignore();
                }
                match tokio::time::timeout(TIMEOUT, pipe.query_async::<()>(&mut c)).await {
                    Ok(Ok(())) => {
                        *slot = Some(c);
                        Ok(())
                    }
                    Ok(Err(e)) => Err(LiveError::Transport(format!("redis PUBLISH: {e}"))),
                    Err(_) => Err(LiveError::Transport("redis PUBLISH timed out".into())),
                }
            }
            Fanout::Nats { client, subject } => {
                for p in payloads {
                    client
                        .publish(subject.clone(), p.clone().into())
                        .await
                        .map_err(|e| LiveError::Transport(format!("nats publish: {e}")))?;
                }
                match tokio::time::timeout(TIMEOUT, client.flush()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(LiveError::Transport(format!("nats flush: {e}"))),
                    Err(_) => Err(LiveError::Transport("nats flush timed out".into())),
                }
            }
        }
    }

    /// Subscribes and hands every received payload to `deliver`, forever: after a lost
    /// connection it subscribes again with backoff (10 ms doubling to 2 s). `ready` is `true`
    /// while subscribed. Returns only when the in-process channel is closed.
    pub async fn run_subscriber(
        self: Arc<Self>,
        ready: watch::Sender<bool>,
        deliver: impl Fn(String) + Send,
    ) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let outcome = match self.as_ref() {
                Fanout::Memory(tx) => {
                    let mut rx = tx.subscribe();
                    ready.send_replace(true);
                    loop {
                        match rx.recv().await {
                            Ok(p) => deliver(p),
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::warn!(
                                    skipped = n,
                                    "live fan-out receiver lagged; messages skipped"
                                );
                                metrics::counter!("tektree_live_fanout_lagged_total").increment(n);
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                }
                Fanout::Redis {
                    client, channel, ..
                } => redis_subscription(client, channel, &ready, &deliver).await,
                Fanout::Nats { client, subject } => {
                    nats_subscription(client, subject, &ready, &deliver).await
                }
            };
            ready.send_replace(false);
            match outcome {
                Ok(()) => {
                    tracing::warn!(
                        transport = self.transport(),
                        "live fan-out subscription ended; subscribing again"
                    );
                    backoff = Duration::from_millis(10);
                }
                Err(e) => {
                    tracing::warn!(transport = self.transport(), error = %e, retry_in = ?backoff,
                        "live fan-out subscription failed; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// One Redis subscription, until its connection is lost (`Ok`) or cannot be set up (`Err`).
async fn redis_subscription(
    client: &Client,
    channel: &str,
    ready: &watch::Sender<bool>,
    deliver: &(impl Fn(String) + Send),
) -> Result<(), LiveError> {
    let setup = async {
        let mut ps = client.get_async_pubsub().await?;
        ps.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(ps)
    };
    let ps = match tokio::time::timeout(TIMEOUT, setup).await {
        Ok(Ok(ps)) => ps,
        Ok(Err(e)) => return Err(LiveError::Transport(format!("redis SUBSCRIBE: {e}"))),
        Err(_) => return Err(LiveError::Transport("redis SUBSCRIBE timed out".into())),
    };
    let (mut sink, mut stream) = ps.split();
    ready.send_replace(true);
    let mut ping = tokio::time::interval(REDIS_PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(m) => match m.get_payload::<String>() {
                    Ok(p) => deliver(p),
                    Err(e) => tracing::warn!(error = %e, "live fan-out message is not text; skipped"),
                },
                None => return Ok(()),
            },
            _ = ping.tick() => {
                let alive = tokio::time::timeout(TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return Err(LiveError::Transport("redis subscriber connection does not answer PING".into()));
                }
            }
        }
    }
}

/// One NATS subscription, until it ends (`Ok`) or cannot be set up (`Err`). The client
/// re-subscribes by itself after a reconnect, so this normally runs for the process' life.
async fn nats_subscription(
    client: &async_nats::Client,
    subject: &str,
    ready: &watch::Sender<bool>,
    deliver: &(impl Fn(String) + Send),
) -> Result<(), LiveError> {
    let mut sub = client
        .subscribe(subject.to_string())
        .await
        .map_err(|e| LiveError::Transport(format!("nats subscribe: {e}")))?;
    // The subscription is registered with the server once a flush round trip completed.
    match tokio::time::timeout(TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(LiveError::Transport(format!("nats flush: {e}"))),
        Err(_) => return Err(LiveError::Transport("nats flush timed out".into())),
    }
    ready.send_replace(true);
    while let Some(m) = sub.next().await {
        match String::from_utf8(m.payload.to_vec()) {
            Ok(p) => deliver(p),
            Err(_) => tracing::warn!("live fan-out message is not UTF-8; skipped"),
        }
    }
    Ok(())
}

/// A publishing connection to Redis.
async fn redis_connect(client: &Client) -> Result<MultiplexedConnection, LiveError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| LiveError::Transport(format!("connecting to redis: {e}")))
}

/// `url` without its user information (which may hold a password).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
