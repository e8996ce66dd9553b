//! Scenario 2, **relay**: the corpus's outbox published to Redis Streams and to NATS JetStream
//! by `relay_once` rounds of the relay's default batch (500), each round publishing and then
//! marking its records in the SQLite store (`synchronous=FULL`), until the outbox is empty.
//! [`relay_all`] does the same for any store (the MongoDB row, `crate::mongo`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tektree_event_store::{EventStore, SqliteStore};
use tektree_outbox::relay::relay_once;
use tektree_outbox::test_support::{unique_nats_names, unique_stream_key};
use tektree_outbox::{Bus, NatsBus, RedisBus, RelayConfig};

use crate::corpus::{copy_db, remove_db};

pub use tektree_tools::BusKind;

/// Relays a fresh copy of `corpus`'s outbox to a fresh stream on the bus at `url`;
/// `(events, seconds, split)`. With `breakdown`, the rounds are `relay_once`'s steps timed
/// one by one (the split is empty otherwise).
///
/// # Errors
/// Store or bus failures.
pub async fn run_once(
    corpus: &Path,
    dir: &Path,
    kind: BusKind,
    url: &str,
    breakdown: bool,
) -> Result<(u64, f64, Split)> {
    let copy = dir.join(format!("relay-{}.db", kind.name()));
    copy_db(corpus, &copy)?;
    let store = SqliteStore::open(&copy)?;
    let relayed = relay_all(&store, kind, url, breakdown).await;
    drop(store);
    remove_db(&copy);
    relayed
}

/// Relays everything pending in `store`'s outbox to a fresh stream on the bus at `url`, in
/// rounds of the relay's default batch until the outbox is empty, then deletes the stream;
/// `(events, seconds, split)`. With `breakdown`, the rounds are `relay_once`'s steps timed
/// one by one (the split is empty otherwise). Any store: the SQLite copy of [`run_once`] or
/// the MongoDB store the `append_mongodb` runs filled.
///
/// # Errors
/// Store or bus failures.
pub async fn relay_all(
    store: &dyn EventStore,
    kind: BusKind,
    url: &str,
    breakdown: bool,
) -> Result<(u64, f64, Split)> {
    let (bus, cleanup): (Arc<dyn Bus>, Cleanup) = match kind {
        BusKind::Redis => {
            let key = format!("tektree-bench:{}", unique_stream_key());
            let bus = RedisBus::with_stream(url, key.clone()).await?;
            (Arc::new(bus), Cleanup::Redis(key))
        }
        BusKind::Nats => {
            let names = unique_nats_names();
            let bus = NatsBus::with_prefix(url, names.stream.clone(), names.subject_prefix).await?;
            let dl = bus.dead_letter_stream_name().to_string();
            (Arc::new(bus), Cleanup::Nats(vec![names.stream, dl]))
        }
    };
    let batch = RelayConfig::default().batch;
    let started = Instant::now();
    let mut count = 0u64;
    let mut split = Split::default();
    loop {
        let n = if breakdown {
            split.round(store, bus.as_ref(), batch).await?
        } else {
            relay_once(store, bus.as_ref(), batch)
                .await
                .context("relay round")?
        };
        if n == 0 {
            break;
        }
        count += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(bus);
    cleanup.run(url).await;
    Ok((count, secs, split))
}

/// Seconds spent in each step of the relay's rounds (a breakdown run: the steps of
/// `relay_once`, timed one by one).
#[derive(Debug, Clone, Copy, Default)]
pub struct Split {
    /// `OutboxStore::outbox_pending`.
    pub read_s: f64,
    /// `Bus::publish`.
    pub publish_s: f64,
    /// `OutboxStore::outbox_mark_published` (one durable transaction).
    pub mark_s: f64,
}

impl Split {
    /// Adds `other`'s times to these.
    pub fn add(&mut self, other: &Split) {
        self.read_s += other.read_s;
        self.publish_s += other.publish_s;
        self.mark_s += other.mark_s;
    }

    /// Each step's share of their total, to three decimals: `{"read_outbox", "publish",
    /// "mark_published"}` (all 0 when nothing was timed).
    pub fn shares(&self) -> Value {
        let total = self.read_s + self.publish_s + self.mark_s;
        let share = |x: f64| {
            if total > 0.0 {
                (x / total * 1000.0).round() / 1000.0
            } else {
                0.0
            }
        };
        json!({"read_outbox": share(self.read_s), "publish": share(self.publish_s),
            "mark_published": share(self.mark_s)})
    }

    async fn round(
        &mut self,
        store: &dyn EventStore,
        bus: &dyn Bus,
        batch: usize,
    ) -> Result<usize> {
        let t = Instant::now();
        let pending = store.outbox_pending(batch).await?;
        self.read_s += t.elapsed().as_secs_f64();
        if pending.is_empty() {
            return Ok(0);
        }
        let t = Instant::now();
        bus.publish(&pending).await?;
        self.publish_s += t.elapsed().as_secs_f64();
        let positions: Vec<u64> = pending.iter().map(|e| e.position).collect();
        let t = Instant::now();
        store.outbox_mark_published(&positions).await?;
        self.mark_s += t.elapsed().as_secs_f64();
        Ok(positions.len())
    }
}

/// What to delete on the server after a run.
pub enum Cleanup {
    /// A Redis key.
    Redis(String),
    /// JetStream streams.
    Nats(Vec<String>),
}

impl Cleanup {
    /// Deletes it, ignoring failures (a throwaway server is removed anyway).
    pub async fn run(self, url: &str) {
        match self {
            Cleanup::Redis(key) => {
                if let Ok(client) = redis::Client::open(url) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
                    }
                }
            }
            Cleanup::Nats(streams) => {
                if let Ok(client) = async_nats::connect(url).await {
                    let js = async_nats::jetstream::new(client);
                    for s in streams {
                        let _ = js.delete_stream(&s).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_survive_an_empty_split() {
        let mut s = Split {
            read_s: 1.0,
            publish_s: 2.0,
            mark_s: 1.0,
        };
        s.add(&Split {
            read_s: 1.0,
            publish_s: 0.0,
            mark_s: 3.0,
        });
        assert_eq!(
            s.shares(),
            json!({"read_outbox": 0.25, "publish": 0.25, "mark_published": 0.5})
        );
        assert_eq!(
            Split::default().shares(),
            json!({"read_outbox": 0.0, "publish": 0.0, "mark_published": 0.0})
        );
    }
}
