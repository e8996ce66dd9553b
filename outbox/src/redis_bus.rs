//! The bus on Redis Streams.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamPendingCountReply;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, Pipeline, RedisError, Value};
use tektree_domain::EventEnvelope;
use tektree_event_store::StoreIdentity;
use tokio::sync::Mutex;

use crate::bus::{Bus, BusError, Delivery, Subscription, SubscriptionOptions};

/// Stream key used by [`RedisBus::connect`].
pub const DEFAULT_STREAM: &str = "tektree:events";

/// Name of the stream entry field that holds the envelope JSON.
const FIELD: &str = "envelope";
/// Time allowed to establish a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one request (or pipeline) to be answered, on top of any `BLOCK`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many `XAUTOCLAIM` calls per [`Subscription::next_batch`], bounding the work
/// spent scanning a large pending entries list (Redis scans up to `10 × COUNT` entries per call).
const MAX_CLAIM_CALLS: usize = 4;

/// A [`Bus`] on one Redis stream (Redis ≥ 6.2 for `XAUTOCLAIM`; tested on 7.0).
///
/// Layout: one stream (key [`DEFAULT_STREAM`] unless built with [`RedisBus::with_stream`]).
/// The event at position `p` is the entry with the explicit id `<p>-0` and one field,
/// `envelope`, holding the envelope JSON (the shape documented on [`EventEnvelope`]).
/// [`Delivery::id`] is that entry id, e.g. `"42-0"`.
///
/// - **Store binding.** The key [`RedisBus::store_key`] holds the store identity the stream
///   carries ([`Bus::bind_store`], `SET NX`; see [`crate::binding`]).
/// - **Dedup by position, no hole.** [`Bus::publish_after`] is one Lua script (`EVAL`, atomic
///   in Redis): it reads the stream's last generated id, refuses with [`BusError::Behind`] when
///   that is below the floor (the stream lost entries: `FLUSHALL`, a restart without
///   persistence), and adds only the events above it, so an event is stored at most once
///   whoever publishes it, and never above a hole.
/// - **Consumer groups** are Redis consumer groups, created at id `0` (the start of the
///   stream) on first subscribe. `next_batch` is `XAUTOCLAIM` (pending entries idle for
///   `min_idle`) then `XREADGROUP … >`; `ack` is `XACK`.
///
/// Connections: the bus keeps one multiplexed connection for publishing; each subscription
/// opens its own, because `XREADGROUP … BLOCK` holds its connection for the blocking time.
/// A connection that failed at the transport level (I/O error, timeout) is replaced on the
/// next call.
pub struct RedisBus {
    client: Client,
    stream: String,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL is left out on purpose: it may carry a password.
        f.debug_struct("RedisBus")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl RedisBus {
    /// Connects to the Redis server at `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS when the `redis` crate is built with TLS) and uses the stream
    /// [`DEFAULT_STREAM`].
    ///
    /// # Errors
    /// [`BusError::InvalidUrl`] when `url` does not parse; [`BusError::Transport`] when the
    /// server cannot be reached or does not answer `PING`.
    pub async fn connect(url: &str) -> Result<RedisBus, BusError> {
        RedisBus::with_stream(url, DEFAULT_STREAM).await
    }

    /// Like [`RedisBus::connect`], on the stream `key` instead of [`DEFAULT_STREAM`] (tests use
    /// a unique key per test to share one server).
    ///
    /// # Errors
    /// As [`RedisBus::connect`].
    pub async fn with_stream(url: &str, key: impl Into<String>) -> Result<RedisBus, BusError> {
        let client = Client::open(url).map_err(|_| BusError::InvalidUrl(url.into()))?;
        let mut conn = open_connection(&client).await?;
        let _: String = exec(&mut conn, Req::Cmd(&redis::cmd("PING")), RESPONSE_TIMEOUT)
            .await
            .map_err(Failure::into_bus_error)?;
        Ok(RedisBus {
            client,
            stream: key.into(),
            conn: Mutex::new(Some(conn)),
        })
    }

    /// The stream key this bus publishes to and reads from.
    pub fn stream_key(&self) -> &str {
        &self.stream
    }

    /// Runs one request on the shared connection, replacing the connection after a transport
    /// failure.
    async fn exec<T: FromRedisValue>(&self, req: Req<'_>) -> Result<T, Failure> {
        let mut conn = {
            let mut slot = self.conn.lock().await;
            match slot.as_ref() {
                Some(conn) => conn.clone(),
                None => {
                    let conn = open_connection(&self.client)
                        .await
                        .map_err(Failure::Connect)?;
                    *slot = Some(conn.clone());
                    conn
                }
            }
        };
        let result = exec(&mut conn, req, RESPONSE_TIMEOUT).await;
        if let Err(failure) = &result {
            if failure.needs_reconnect() {
                *self.conn.lock().await = None;
            }
        }
        result
    }

    /// The stream's last generated id as a position (its milliseconds part); 0 when the stream
    /// does not exist or has no entry yet.
    async fn last_position(&self) -> Result<u64, BusError> {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("STREAM").arg(&self.stream);
        match self.exec::<HashMap<String, Value>>(Req::Cmd(&cmd)).await {
            Ok(info) => {
                let id = info
                    .get("last-generated-id")
                    .and_then(value_to_string)
                    .ok_or_else(|| {
                        BusError::Transport("XINFO STREAM reply without last-generated-id".into())
                    })?;
                id_position(&id).ok_or_else(|| {
                    BusError::Transport(format!("unexpected last-generated-id {id:?}"))
                })
            }
            Err(Failure::Redis(e)) if e.to_string().contains("no such key") => Ok(0),
            Err(failure) => Err(failure.into_bus_error()),
        }
    }

    /// One `EVAL` of [`PUBLISH_SCRIPT`]: reads the stream's last generated id, refuses when it
    /// is below `floor`, and adds the events above it, each with the explicit id
    /// `<position>-0` — atomically, so no other publisher (and no `FLUSHALL`) comes in between.
    async fn publish_script(&self, floor: u64, events: &[EventEnvelope]) -> Result<(), BusError> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(PUBLISH_SCRIPT)
            .arg(1)
            .arg(&self.stream)
            .arg(floor)
            .arg(FIELD);
        for event in events {
            let json = serde_json::to_vec(event).map_err(|e| {
                BusError::Transport(format!(
                    "encoding the envelope at position {}: {e}",
                    event.position
                ))
            })?;
            eval.arg(event.position).arg(json);
        }
        let (added, last): (i64, i64) = self
            .exec(Req::Cmd(&eval))
            .await
            .map_err(Failure::into_bus_error)?;
        let last = u64::try_from(last).unwrap_or(0);
        if added < 0 {
            return Err(BusError::Behind { last, floor });
        }
        tracing::trace!(stream = %self.stream, added, last, "published");
        Ok(())
    }
}

/// The publish script (see [`RedisBus::publish_script`]): `KEYS[1]` the stream; `ARGV[1]` the
/// floor, `ARGV[2]` the entry field, then position/envelope pairs in ascending position order.
/// Returns `{added, last}`, with `added = -1` when the stream ends below the floor. Positions
/// stay below 2^53, exact in Lua's numbers.
const PUBLISH_SCRIPT: &str = r"
local last = 0
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
if type(info) == 'table' and not info.err then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = tonumber(string.match(info[i + 1], '^(%d+)'))
    end
  end
end
if last < tonumber(ARGV[1]) then return {-1, last} end
local added = 0
for i = 3, #ARGV, 2 do
  local p = tonumber(ARGV[i])
  if p > last then
    redis.call('XADD', KEYS[1], ARGV[i] .. '-0', ARGV[2], ARGV[i + 1])
    last = p
    added = added + 1
  end
end
return {added, last}
";

#[async_trait]
impl Bus for RedisBus {
    async fn publish_after(&self, floor: u64, events: &[EventEnvelope]) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        self.publish_script(floor, events).await
    }

    async fn subscribe(
        &self,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let mut sub = RedisSubscription {
            client: self.client.clone(),
            conn: None,
            stream: self.stream.clone(),
            options,
            claim_cursor: "0-0".into(),
            buffered: VecDeque::new(),
        };
        sub.ensure_group().await?;
        Ok(Box::new(sub))
    }

    async fn last_published(&self) -> Result<u64, BusError> {
        self.last_position().await
    }

    async fn bound_store(&self) -> Result<Option<StoreIdentity>, BusError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.store_key());
        let value: Option<String> = self
            .exec(Req::Cmd(&cmd))
            .await
            .map_err(Failure::into_bus_error)?;
        value
            .map(|v| {
                serde_json::from_str(&v).map_err(|e| BusError::Decode {
                    id: self.store_key(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    async fn bind_store(&self, identity: &StoreIdentity) -> Result<StoreIdentity, BusError> {
        let body = serde_json::to_string(identity)
            .map_err(|e| BusError::Transport(format!("encode the store identity: {e}")))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.store_key()).arg(body).arg("NX");
        let _: Option<String> = self
            .exec(Req::Cmd(&cmd))
            .await
            .map_err(Failure::into_bus_error)?;
        self.bound_store().await?.ok_or_else(|| {
            BusError::Transport(format!("{} vanished right after SET NX", self.store_key()))
        })
    }

    async fn empty_and_rebind(
        &self,
        from: &StoreIdentity,
        to: &StoreIdentity,
    ) -> Result<bool, BusError> {
        let mut get = redis::cmd("GET");
        get.arg(self.store_key());
        let raw: Option<String> = self
            .exec(Req::Cmd(&get))
            .await
            .map_err(Failure::into_bus_error)?;
        let Some(raw) = raw else { return Ok(false) };
        if serde_json::from_str::<StoreIdentity>(&raw).ok().as_ref() != Some(from) {
            return Ok(false);
        }
        let body = serde_json::to_string(to)
            .map_err(|e| BusError::Transport(format!("encode the store identity: {e}")))?;
        // One script: nobody sees the stream emptied but the binding unchanged, or the reverse.
        let mut eval = redis::cmd("EVAL");
        eval.arg(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then \
               redis.call('DEL', KEYS[2], KEYS[3]) \
               redis.call('SET', KEYS[1], ARGV[2]) \
               return 1 \
             else return 0 end",
        )
        .arg(3)
        .arg(self.store_key())
        .arg(&self.stream)
        .arg(self.dead_letter_key())
        .arg(raw)
        .arg(body);
        let done: i64 = self
            .exec(Req::Cmd(&eval))
            .await
            .map_err(Failure::into_bus_error)?;
        Ok(done == 1)
    }

    async fn last_event(&self) -> Result<Option<EventEnvelope>, BusError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(&self.stream).arg("+").arg("-").arg("COUNT").arg(1);
        let reply: redis::streams::StreamRangeReply = self
            .exec(Req::Cmd(&cmd))
            .await
            .map_err(Failure::into_bus_error)?;
        reply
            .ids
            .first()
            .map(|entry| {
                entry
                    .map
                    .get(FIELD)
                    .and_then(|v| match v {
                        Value::BulkString(b) => serde_json::from_slice(b).ok(),
                        _ => None,
                    })
                    .ok_or_else(|| BusError::Decode {
                        id: entry.id.clone(),
                        reason: "entry without a valid envelope".into(),
                    })
            })
            .transpose()
    }

    async fn dead_letter(
        &self,
        group: &str,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError> {
        let body = serde_json::to_vec(&delivery.envelope)
            .map_err(|e| BusError::Transport(format!("encode dead letter: {e}")))?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.dead_letter_key())
            .arg("*")
            .arg("group")
            .arg(group)
            .arg("reason")
            .arg(reason)
            .arg("delivery_count")
            .arg(delivery.delivery_count)
            .arg("envelope")
            .arg(body);
        self.exec::<String>(Req::Cmd(&cmd))
            .await
            .map_err(Failure::into_bus_error)?;
        Ok(())
    }

    async fn dead_letters(
        &self,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::DeadLetter>, BusError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.dead_letter_key()).arg("-").arg("+");
        let reply: redis::streams::StreamRangeReply = self
            .exec(Req::Cmd(&cmd))
            .await
            .map_err(Failure::into_bus_error)?;
        let mut out = Vec::new();
        for entry in reply.ids {
            let field = |k: &str| entry.map.get(k).and_then(value_to_string);
            let envelope = entry
                .map
                .get("envelope")
                .and_then(|v| match v {
                    Value::BulkString(b) => serde_json::from_slice(b).ok(),
                    _ => None,
                })
                .ok_or_else(|| BusError::Decode {
                    id: entry.id.clone(),
                    reason: "dead letter without a valid envelope".into(),
                })?;
            let dl = crate::DeadLetter {
                id: entry.id.clone(),
                group: field("group").unwrap_or_default(),
                reason: field("reason").unwrap_or_default(),
                delivery_count: field("delivery_count")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
                envelope,
            };
            if group.is_none_or(|g| dl.group == g) {
                out.push(dl);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError> {
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(self.dead_letter_key()).arg(id);
        let n: u64 = self
            .exec(Req::Cmd(&cmd))
            .await
            .map_err(Failure::into_bus_error)?;
        Ok(n > 0)
    }
}

impl RedisBus {
    /// The dead-letter stream: `<stream>:deadletter` (fields `group`, `reason`,
    /// `delivery_count`, `envelope`).
    pub fn dead_letter_key(&self) -> String {
        format!("{}:deadletter", self.stream)
    }

    /// The key holding the [`StoreIdentity`] the stream is bound to (`<stream>:store`, JSON
    /// `{"store_id": "<uuid>", "epoch": n}`), set once with `SET NX`.
    pub fn store_key(&self) -> String {
        format!("{}:store", self.stream)
    }
}

/// One consumer of a [`RedisBus`] group, on its own connection.
struct RedisSubscription {
    client: Client,
    conn: Option<MultiplexedConnection>,
    stream: String,
    options: SubscriptionOptions,
    /// Where the next `XAUTOCLAIM` scan of the pending entries list resumes (`0-0` = start).
    claim_cursor: String,
    /// Entries read from Redis but not yet returned: those after an undecodable one.
    buffered: VecDeque<RawEntry>,
}

/// A stream entry as read, before decoding.
struct RawEntry {
    /// Entry id, `<position>-0`.
    id: String,
    /// The `envelope` field's bytes, or why there is none.
    body: Result<Vec<u8>, String>,
    /// Delivery count (1 for a new entry).
    delivery_count: u64,
}

impl RawEntry {
    fn decode(&self) -> Result<Delivery, BusError> {
        let decode_error = |reason: String| BusError::Decode {
            id: self.id.clone(),
            reason,
        };
        let body = self.body.as_ref().map_err(|r| decode_error(r.clone()))?;
        let envelope: EventEnvelope =
            serde_json::from_slice(body).map_err(|e| decode_error(e.to_string()))?;
        if id_position(&self.id) != Some(envelope.position) {
            return Err(decode_error(format!(
                "envelope position {} does not match the entry id",
                envelope.position
            )));
        }
        Ok(Delivery {
            id: self.id.clone(),
            envelope,
            delivery_count: self.delivery_count,
        })
    }
}

impl RedisSubscription {
    /// Runs one request on this subscription's connection (opening it if needed), replacing
    /// the connection after a transport failure.
    async fn exec<T: FromRedisValue>(
        &mut self,
        req: Req<'_>,
        timeout: Duration,
    ) -> Result<T, Failure> {
        if self.conn.is_none() {
            self.conn = Some(
                open_connection(&self.client)
                    .await
                    .map_err(Failure::Connect)?,
            );
        }
        let conn = self.conn.as_mut().expect("connection opened above");
        let result = exec(conn, req, timeout).await;
        if let Err(failure) = &result {
            if failure.needs_reconnect() {
                self.conn = None;
            }
        }
        result
    }

    /// Like [`RedisSubscription::exec`]; when Redis answers `NOGROUP` (the stream or the group
    /// was deleted since subscribing), recreates the group and retries once.
    async fn exec_in_group<T: FromRedisValue>(
        &mut self,
        cmd: &Cmd,
        timeout: Duration,
    ) -> Result<T, BusError> {
        match self.exec(Req::Cmd(cmd), timeout).await {
            Err(Failure::Redis(e)) if is_code(&e, "NOGROUP") => {
                tracing::warn!(
                    stream = %self.stream,
                    group = %self.options.group,
                    "consumer group missing (the stream or the group was deleted, or Redis lost \
                     its data); recreating it at the start of the stream"
                );
                metrics::counter!(crate::recovery::METRIC_BUS_RECREATED, "what" => "group")
                    .increment(1);
                self.ensure_group().await?;
                self.exec(Req::Cmd(cmd), timeout)
                    .await
                    .map_err(Failure::into_bus_error)
            }
            other => other.map_err(Failure::into_bus_error),
        }
    }

    /// `XGROUP CREATE <key> <group> 0 MKSTREAM`, tolerating an existing group.
    async fn ensure_group(&mut self) -> Result<(), BusError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.stream)
            .arg(&self.options.group)
            .arg("0")
            .arg("MKSTREAM");
        match self.exec::<()>(Req::Cmd(&cmd), RESPONSE_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(Failure::Redis(e)) if is_code(&e, "BUSYGROUP") => Ok(()),
            Err(failure) => Err(failure.into_bus_error()),
        }
    }

    /// Up to `max` pending entries of the group idle for at least `min_idle`, now claimed by
    /// this consumer, with their delivery counts.
    async fn reclaim(&mut self, max: usize) -> Result<Vec<RawEntry>, BusError> {
        let min_idle_ms = u64::try_from(self.options.min_idle.as_millis()).unwrap_or(u64::MAX);
        let mut claimed = Vec::new();
        for _ in 0..MAX_CLAIM_CALLS {
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(&self.stream)
                .arg(&self.options.group)
                .arg(&self.options.consumer)
                .arg(min_idle_ms)
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(max - claimed.len());
            let reply: Value = self.exec_in_group(&cmd, RESPONSE_TIMEOUT).await?;
            let (cursor, entries) = parse_autoclaim(reply)?;
            self.claim_cursor = cursor;
            claimed.extend(entries);
            if claimed.len() >= max || self.claim_cursor == "0-0" {
                break;
            }
        }
        if claimed.is_empty() {
            return Ok(claimed);
        }
        // XAUTOCLAIM increments the delivery counts but does not report them: ask XPENDING,
        // one exact-id range per claimed entry, in one round trip.
        let mut pipe = redis::pipe();
        for entry in &claimed {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.options.group)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1);
        }
        let replies: Vec<StreamPendingCountReply> = self
            .exec(Req::Pipe(&pipe), RESPONSE_TIMEOUT)
            .await
            .map_err(Failure::into_bus_error)?;
        for (entry, reply) in claimed.iter_mut().zip(replies) {
            // A reclaimed entry has been delivered at least twice; 2 is the honest lower bound
            // should it have been acknowledged in between.
            entry.delivery_count = reply
                .ids
                .first()
                .map_or(2, |p| (p.times_delivered as u64).max(2));
        }
        Ok(claimed)
    }

    /// Up to `max` entries never delivered to the group, waiting up to `block` (`None`: not at
    /// all) when there are none.
    async fn read_new(
        &mut self,
        max: usize,
        block: Option<Duration>,
    ) -> Result<Vec<RawEntry>, BusError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.options.group)
            .arg(&self.options.consumer)
            .arg("COUNT")
            .arg(max);
        let mut timeout = RESPONSE_TIMEOUT;
        if let Some(block) = block.filter(|b| !b.is_zero()) {
            // BLOCK 0 would wait forever: round sub-millisecond blocks up to 1 ms.
            let ms = u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1);
            cmd.arg("BLOCK").arg(ms);
            timeout += block;
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(">");
        let reply: Value = self.exec_in_group(&cmd, timeout).await?;
        parse_read(reply)
    }

    /// Returns up to `max` buffered entries decoded, stopping before an undecodable one; an
    /// undecodable entry at the front is removed and returned as [`BusError::Decode`].
    fn drain_buffer(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(raw) = self.buffered.front() else {
                break;
            };
            match raw.decode() {
                Ok(delivery) => {
                    self.buffered.pop_front();
                    out.push(delivery);
                }
                Err(e) if out.is_empty() => {
                    self.buffered.pop_front();
                    tracing::warn!(stream = %self.stream, error = %e, "undecodable bus message");
                    return Err(e);
                }
                // Reported on the next call, after the good ones before it.
                Err(_) => break,
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next_batch(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        if self.buffered.is_empty() {
            let mut raw = self.reclaim(max).await?;
            if raw.len() < max {
                let block = raw.is_empty().then_some(block);
                let fresh = self.read_new(max - raw.len(), block).await?;
                raw.extend(fresh);
            }
            self.buffered.extend(raw);
        }
        self.drain_buffer(max)
    }

    async fn ack(&mut self, ids: &[String]) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.stream).arg(&self.options.group).arg(ids);
        let _: u64 = self.exec_in_group(&cmd, RESPONSE_TIMEOUT).await?;
        Ok(())
    }
}

/// A request: one command or a pipeline.
#[derive(Clone, Copy)]
enum Req<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
}

/// Why a request failed.
enum Failure {
    /// Opening the connection failed.
    Connect(BusError),
    /// Redis or the connection answered an error.
    Redis(RedisError),
    /// No answer within the allowed time.
    Timeout(Duration),
}

impl Failure {
    /// `true` when the connection may be unusable and must be replaced.
    fn needs_reconnect(&self) -> bool {
        match self {
            Failure::Connect(_) | Failure::Timeout(_) => true,
            Failure::Redis(e) => !matches!(e.kind(), redis::ErrorKind::Server(_)),
        }
    }

    fn into_bus_error(self) -> BusError {
        match self {
            Failure::Connect(e) => e,
            Failure::Redis(e) => BusError::Transport(e.to_string()),
            Failure::Timeout(t) => {
                BusError::Transport(format!("no answer from redis within {t:?}"))
            }
        }
    }
}

/// A new multiplexed connection without the client's own response timeout (requests are
/// bounded by [`exec`] instead, because a blocking `XREADGROUP` needs more than the default).
async fn open_connection(client: &Client) -> Result<MultiplexedConnection, BusError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| BusError::Transport(format!("connecting to redis: {e}")))
}

/// Runs `req` on `conn`, giving up after `timeout`.
async fn exec<T: FromRedisValue>(
    conn: &mut MultiplexedConnection,
    req: Req<'_>,
    timeout: Duration,
) -> Result<T, Failure> {
    let answer = match req {
        Req::Cmd(cmd) => tokio::time::timeout(timeout, cmd.query_async(conn)).await,
        Req::Pipe(pipe) => tokio::time::timeout(timeout, pipe.query_async(conn)).await,
    };
    match answer {
        Ok(result) => result.map_err(Failure::Redis),
        Err(_) => Err(Failure::Timeout(timeout)),
    }
}

/// `true` for a Redis error with the given code (first word of the message).
fn is_code(e: &RedisError, code: &str) -> bool {
    e.code() == Some(code) || e.to_string().contains(code)
}

/// The position of entry id `<ms>-<seq>` (its milliseconds part).
fn id_position(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    seq.parse::<u64>().ok()?;
    ms.parse().ok()
}

/// The text of a string-like reply value.
fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn protocol_error(what: &str, v: &Value) -> BusError {
    BusError::Transport(format!("unexpected redis reply to {what}: {v:?}"))
}

/// Parses one stream entry `[id, [field, value, …]]`; `None` for the nil a deleted entry
/// leaves in Redis 6.2's XAUTOCLAIM reply.
fn parse_entry(v: Value) -> Result<Option<RawEntry>, BusError> {
    let Value::Array(mut parts) = v else {
        return if v == Value::Nil {
            Ok(None)
        } else {
            Err(protocol_error("a stream entry", &v))
        };
    };
    if parts.len() != 2 {
        return Err(protocol_error("a stream entry", &Value::Array(parts)));
    }
    let fields = parts.pop().expect("length checked");
    let id = value_to_string(&parts[0])
        .filter(|id| id_position(id).is_some())
        .ok_or_else(|| protocol_error("a stream entry id", &parts[0]))?;
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        Value::Nil => Vec::new(),
        other => return Err(protocol_error("stream entry fields", &other)),
    };
    let body = pairs
        .into_iter()
        .find(|(k, _)| value_to_string(k).as_deref() == Some(FIELD))
        .map(|(_, v)| match v {
            Value::BulkString(b) => Ok(b),
            Value::SimpleString(s) => Ok(s.into_bytes()),
            other => Err(format!("field `{FIELD}` is not a string: {other:?}")),
        })
        .unwrap_or_else(|| Err(format!("no `{FIELD}` field")));
    Ok(Some(RawEntry {
        id,
        body,
        delivery_count: 1,
    }))
}

/// Parses a list of stream entries.
fn parse_entries(v: Value) -> Result<Vec<RawEntry>, BusError> {
    match v {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.extend(parse_entry(item)?);
            }
            Ok(out)
        }
        Value::Nil => Ok(Vec::new()),
        other => Err(protocol_error("a list of stream entries", &other)),
    }
}

/// Parses the reply of `XREADGROUP … STREAMS <key> >` (nil on timeout; RESP2 array of
/// `[key, entries]` or RESP3 map key → entries).
fn parse_read(v: Value) -> Result<Vec<RawEntry>, BusError> {
    let streams: Vec<Value> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams,
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        Value::Attribute { data, .. } => return parse_read(*data),
        other => return Err(protocol_error("XREADGROUP", &other)),
    };
    let mut out = Vec::new();
    for stream in streams {
        match stream {
            Value::Array(mut kv) if kv.len() == 2 => {
                out.extend(parse_entries(kv.pop().expect("length checked"))?);
            }
            other => return Err(protocol_error("XREADGROUP", &other)),
        }
    }
    Ok(out)
}

/// Parses the reply of `XAUTOCLAIM` (`[next-cursor, entries, deleted-ids]`; Redis 6.2 has no
/// third element).
fn parse_autoclaim(v: Value) -> Result<(String, Vec<RawEntry>), BusError> {
    let Value::Array(mut parts) = v else {
        return Err(protocol_error("XAUTOCLAIM", &v));
    };
    if parts.len() < 2 {
        return Err(protocol_error("XAUTOCLAIM", &Value::Array(parts)));
    }
    parts.truncate(2);
    let entries = parse_entries(parts.pop().expect("length checked"))?;
    let cursor = value_to_string(&parts[0])
        .filter(|c| id_position(c).is_some())
        .ok_or_else(|| protocol_error("XAUTOCLAIM cursor", &parts[0]))?;
    Ok((cursor, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_position_takes_the_milliseconds_part() {
        assert_eq!(id_position("42-0"), Some(42));
        assert_eq!(id_position("0-0"), Some(0));
        assert_eq!(id_position("42"), None);
        assert_eq!(id_position("x-0"), None);
        assert_eq!(id_position("1-y"), None);
    }

    #[test]
    fn parse_read_accepts_nil_and_resp2_and_resp3() {
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        let entry = || {
            Value::Array(vec![
                Value::BulkString(b"7-0".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"envelope".to_vec()),
                    Value::BulkString(b"{}".to_vec()),
                ]),
            ])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"k".to_vec()),
            Value::Array(vec![entry()]),
        ])]);
        let got = parse_read(resp2).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "7-0");
        assert_eq!(got[0].body.as_deref().unwrap(), b"{}");
        let resp3 = Value::Map(vec![(
            Value::BulkString(b"k".to_vec()),
            Value::Array(vec![entry()]),
        )]);
        assert_eq!(parse_read(resp3).unwrap().len(), 1);
    }

    #[test]
    fn missing_field_is_a_decode_error_not_a_protocol_error() {
        let entry = Value::Array(vec![
            Value::BulkString(b"3-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"other".to_vec()),
                Value::BulkString(b"x".to_vec()),
            ]),
        ]);
        let raw = parse_entry(entry).unwrap().unwrap();
        match raw.decode() {
            Err(BusError::Decode { id, reason }) => {
                assert_eq!(id, "3-0");
                assert!(reason.contains("envelope"), "{reason}");
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    #[test]
    fn parse_autoclaim_skips_nil_entries() {
        let reply = Value::Array(vec![
            Value::BulkString(b"0-0".to_vec()),
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![]),
        ]);
        let (cursor, entries) = parse_autoclaim(reply).unwrap();
        assert_eq!(cursor, "0-0");
        assert!(entries.is_empty());
    }

    #[tokio::test]
    async fn publish_is_refused_above_a_hole_and_skips_what_the_stream_holds() {
        let server = crate::test_support::RedisServer::start();
        let key = crate::test_support::unique_stream_key();
        let bus = RedisBus::with_stream(&server.url, &key).await.unwrap();
        let events = crate::conformance::envelopes;
        bus.publish(&events(1..=3)).await.unwrap();
        // A publisher that thinks the stream ends lower publishes again what it holds.
        bus.publish_after(0, &events(1..=5)).await.unwrap();
        bus.publish_after(2, &events(3..=5)).await.unwrap();
        assert_eq!(bus.last_published().await.unwrap(), 5);
        let refused = bus.publish_after(7, &events(8..=9)).await;
        assert!(
            matches!(refused, Err(BusError::Behind { last: 5, floor: 7 })),
            "{refused:?}"
        );
        let mut conn = open_connection(&bus.client).await.unwrap();
        let mut xrange = redis::cmd("XRANGE");
        xrange.arg(&key).arg("-").arg("+");
        let entries = parse_entries(
            exec::<Value>(&mut conn, Req::Cmd(&xrange), RESPONSE_TIMEOUT)
                .await
                .ok()
                .unwrap(),
        )
        .unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["1-0", "2-0", "3-0", "4-0", "5-0"]);
        for entry in &entries {
            let delivery = entry.decode().unwrap();
            assert_eq!(
                delivery.envelope,
                crate::conformance::envelope(delivery.envelope.position)
            );
        }
    }
}
