//! The bus on NATS JetStream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State as ConnectionState;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{ContextBuilder, PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{
    self, DeleteMessageErrorKind, DiscardPolicy, RawMessageErrorKind, RetentionPolicy, StorageType,
};
use async_nats::jetstream::{self, Context, ErrorCode};
use async_nats::{Client, ConnectOptions, HeaderMap, ServerAddr};
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use tektree_domain::EventEnvelope;
use tektree_event_store::StoreIdentity;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::bus::{Bus, BusError, Delivery, Subscription, SubscriptionOptions};

/// Name of the events stream used by [`NatsBus::connect`].
pub const DEFAULT_NATS_STREAM: &str = "TEKTREE_EVENTS";
/// Subject prefix of the events stream used by [`NatsBus::connect`]: the stream captures
/// `tektree.events.>`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "tektree.events";
/// Name of the dead-letter stream used by [`NatsBus::connect`].
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "TEKTREE_DEADLETTER";
/// Subject prefix of the dead-letter stream used by [`NatsBus::connect`]: a dead letter of
/// group `g` is published to `tektree.deadletter.<g>`.
pub const DEFAULT_DEAD_LETTER_PREFIX: &str = "tektree.deadletter";
/// JetStream's publish deduplication window (`duplicate_window`) of both streams: a message
/// whose `Nats-Msg-Id` was seen within this window is acknowledged as a duplicate and not
/// stored again.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// `max_ack_pending` of every consumer: how many deliveries a group may hold unacknowledged
/// (across its consumers) before JetStream stops handing out more.
pub const MAX_ACK_PENDING: i64 = 10_000;

/// Header carrying the event's position on every message of the events stream.
pub const HEADER_POSITION: &str = "Tektree-Position";
/// Header of a dead letter: the consumer group that gave up on the event.
pub const HEADER_GROUP: &str = "Tektree-Group";
/// Header of a dead letter: why the group gave up.
pub const HEADER_REASON: &str = "Tektree-Reason";
/// Header of a dead letter: the delivery count when the group gave up.
pub const HEADER_DELIVERY_COUNT: &str = "Tektree-Delivery-Count";
/// Key of the store binding (a JSON [`StoreIdentity`]) in the bucket `<stream>_STORE`.
pub const STORE_KEY: &str = "identity";
/// JetStream's deduplication header.
const HEADER_MSG_ID: &str = "Nats-Msg-Id";

/// Time allowed to establish the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one JetStream API request, publish acknowledgement or double ack.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest `expires` of a pull request (a `block` below this, including zero, is rounded up:
/// a call finding nothing then waits this long).
const MIN_EXPIRES: Duration = Duration::from_millis(10);
/// An idle subscription looks for its durable consumer (deleted with its stream?) at most this
/// often.
const CONSUMER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Shortest `ack_wait` given to a consumer (a `min_idle` below this is rounded up).
const MIN_ACK_WAIT: Duration = Duration::from_millis(10);
/// At most this many publish rounds per [`Bus::publish`] when other publishers keep
/// appending between our rounds.
const MAX_PUBLISH_ROUNDS: usize = 8;
/// When looking for the highest published position, at most this many messages are
/// inspected backwards from the end of the stream (messages without a position, published by
/// someone else, are skipped).
const MAX_SCAN_BACK: u64 = 1_000;
/// At most this many double acks in flight per [`Subscription::ack`].
const ACK_CONCURRENCY: usize = 64;
/// A subscription forgets held (delivered, unacknowledged) messages once it holds more than
/// this many, dropping those held for longer than [`STALE_HOLD_MIN`] / 4 × `ack_wait`.
const HELD_PRUNE_ABOVE: usize = 4_096;
/// See [`HELD_PRUNE_ABOVE`].
const STALE_HOLD_MIN: Duration = Duration::from_secs(300);
/// Longest accepted dead-letter reason, in bytes (longer ones are cut at a char boundary).
const MAX_REASON_BYTES: usize = 2_048;
/// `expires` of the pull request listing dead letters.
const LISTING_EXPIRES: Duration = Duration::from_millis(100);
/// How long an idle listing consumer of the dead-letter stream survives should its
/// deletion fail.
const LISTING_INACTIVE_THRESHOLD: Duration = Duration::from_secs(30);

/// A [`Bus`] on NATS JetStream (tested on nats-server 2.9.10 and 2.15.1; needs ≥ 2.9).
///
/// Layout (details and the reasoning in `docs/nats.md`):
/// - **One events stream** (default [`DEFAULT_NATS_STREAM`], subjects
///   `<prefix>.>` with prefix [`DEFAULT_SUBJECT_PREFIX`]), created idempotently when the bus
///   connects: limits retention, file storage, no maximum age, size or count, discard old,
///   [`DUPLICATE_WINDOW`] of 2 minutes. The stream is a transport, not the source of truth
///   (that is the event store), so nothing expires by default; an operator may add limits.
/// - The event at position `p` of aggregate `(type, id)` is one message on subject
///   `<prefix>.<type>.<id>` (the type with characters other than `[A-Za-z0-9_-]` replaced by
///   `_`), payload the envelope JSON (the shape documented on [`EventEnvelope`]), headers
///   `Nats-Msg-Id: <event_id>` and [`HEADER_POSITION`]`: <p>`. One stream means one sequence:
///   stream order = publish order = position order, for every aggregate and across them.
/// - [`Delivery::id`] is the message's stream sequence in decimal, e.g. `"42"`.
///
/// **Publishing** ([`Bus::publish`]) sends every event of the batch without waiting, then
/// awaits every acknowledgement in order, and returns only when JetStream acknowledged them
/// all: the relay marks outbox rows only after that. Dedup by position: the bus keeps the
/// highest published position and the stream's last sequence (read from the stream at
/// connect and again after any failure or conflict) and drops events at or below that
/// position. The first event of a round carries `Nats-Expected-Last-Sequence` (the stream's
/// last sequence as known), each further one `Nats-Expected-Last-Msg-Id` (the previous
/// event's id): JetStream stores an event only right behind the one before it, so when
/// someone else appended meanwhile it refuses the rest of the round, and the bus rereads the
/// stream's end and publishes what is still above it. Concurrent publishers therefore never
/// store a position twice or out of order. On top, the `Nats-Msg-Id` window drops a
/// republished event within [`DUPLICATE_WINDOW`]; an acknowledgement flagged duplicate counts
/// as published.
///
/// **Store binding**: the key [`STORE_KEY`] of the key-value bucket `<stream>_STORE` holds the
/// store identity the stream carries ([`Bus::bind_store`]; see [`crate::binding`]).
///
/// **Consumer groups** are durable pull consumers, one per group, named after the group
/// (characters other than `[A-Za-z0-9_-]`, e.g. `.`, replaced by `_`: `projection.xp` →
/// `projection_xp`; two groups differing only there share one consumer). Each is created
/// (or updated) on [`Bus::subscribe`] with explicit acks, `deliver_policy` all (a new group
/// starts at the beginning of the stream), `ack_wait` = [`SubscriptionOptions::min_idle`],
/// `max_ack_pending` [`MAX_ACK_PENDING`] and no `max_deliver` limit; the last subscriber's
/// settings win. Every worker bound to the same consumer shares its messages.
/// JetStream itself hands a delivery not acknowledged within `ack_wait` out again (to any
/// worker of the group), with a rising [`Delivery::delivery_count`], and never gives up on it:
/// the worker counts failures and dead-letters a poison event itself
/// ([`NatsBus::dead_letter`], then acknowledge). There is deliberately no JetStream
/// `max_deliver` limit: a worker holds a delivery that waits for an earlier event of its
/// aggregate without acknowledging it, and had JetStream stopped redelivering it and that
/// worker died, the event would be lost to the group. (With a limit, nats-server 2.9.10 was
/// also seen to leave a pull unanswered for seconds and then report delivery count 1 again.)
/// Acknowledgements are double acks ([`Subscription::ack`] returns once the server confirmed
/// them); acknowledging an id twice, or an unknown id, is harmless.
///
/// **Dead letters** go to a second stream (default [`DEFAULT_DEAD_LETTER_STREAM`], subjects
/// `tektree.deadletter.<group>`), same retention; see [`NatsBus::dead_letter`].
#[derive(Clone)]
pub struct NatsBus {
    shared: Arc<Shared>,
}

/// What the bus and its subscriptions share.
struct Shared {
    client: Client,
    js: Context,
    /// Events stream name and subject prefix (subjects `<prefix>.>`).
    stream: String,
    prefix: String,
    /// Dead-letter stream name and subject prefix.
    dl_stream: String,
    dl_prefix: String,
    /// What this bus knows about the end of the events stream; held for a whole publish.
    publish: Mutex<PublishState>,
}

/// The end of the events stream as last seen.
#[derive(Debug, Clone, Copy, Default)]
struct PublishState {
    /// Highest position published.
    last_position: u64,
    /// The stream's last sequence.
    last_seq: u64,
    /// `false` when the above may be out of date (at start, after a failure or a conflict):
    /// they are read from the stream before the next publish.
    fresh: bool,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL is left out on purpose: it may carry credentials.
        f.debug_struct("NatsBus")
            .field("stream", &self.shared.stream)
            .field("subject_prefix", &self.shared.prefix)
            .field("dead_letter_stream", &self.shared.dl_stream)
            .finish_non_exhaustive()
    }
}

/// One dead letter, as listed by [`NatsBus::dead_letters`].
#[derive(Debug, Clone, PartialEq)]
pub struct NatsDeadLetter {
    /// Sequence of the dead letter in the dead-letter stream; pass it to
    /// [`NatsBus::remove_dead_letter`].
    pub seq: u64,
    /// The consumer group that gave up on the event.
    pub group: String,
    /// Why it gave up.
    pub reason: String,
    /// How many times the group had been handed the event.
    pub delivery_count: u64,
    /// The event.
    pub envelope: EventEnvelope,
}

impl NatsBus {
    /// Connects to the NATS server at `url` (`nats://[user:password@]host:port`, or `tls://…`)
    /// and uses the streams [`DEFAULT_NATS_STREAM`] (subjects `tektree.events.>`) and
    /// [`DEFAULT_DEAD_LETTER_STREAM`] (subjects `tektree.deadletter.>`), creating them if
    /// missing.
    ///
    /// # Errors
    /// [`BusError::InvalidUrl`] when `url` does not parse; [`BusError::Transport`] when the
    /// server cannot be reached, has JetStream disabled, or a JetStream request fails;
    /// [`BusError::Config`] when a stream exists with a configuration this adapter cannot
    /// work with (subjects not covering its prefix, retention other than limits).
    pub async fn connect(url: &str) -> Result<NatsBus, BusError> {
        NatsBus::with_prefix(url, DEFAULT_NATS_STREAM, DEFAULT_SUBJECT_PREFIX).await
    }

    /// Like [`NatsBus::connect`], on the events stream `stream_name` with subjects
    /// `<subject_prefix>.>` (tests use unique names to share one server, see
    /// [`crate::test_support::unique_nats_names`]).
    ///
    /// The dead-letter stream's names derive from these: `stream_name` with its `_EVENTS`
    /// suffix replaced by `_DEADLETTER` (or `_DEADLETTER` appended), and `subject_prefix` with
    /// its `.events` suffix replaced by `.deadletter` (or `_deadletter` appended), so
    /// `TEKTREE_EVENTS` / `tektree.events` give `TEKTREE_DEADLETTER` / `tektree.deadletter`.
    ///
    /// # Errors
    /// As [`NatsBus::connect`]; [`BusError::Config`] also when `stream_name` is not a valid
    /// stream name or `subject_prefix` not a valid subject without wildcards.
    pub async fn with_prefix(
        url: &str,
        stream_name: impl Into<String>,
        subject_prefix: impl Into<String>,
    ) -> Result<NatsBus, BusError> {
        let stream = stream_name.into();
        let prefix = subject_prefix.into();
        if !is_valid_stream_name(&stream) {
            return Err(BusError::Config(format!(
                "invalid JetStream stream name {stream:?}"
            )));
        }
        if !is_valid_prefix(&prefix) {
            return Err(BusError::Config(format!(
                "invalid subject prefix {prefix:?}: dot-separated non-empty tokens without \
                 wildcards or whitespace expected"
            )));
        }
        let (dl_stream, dl_prefix) = dead_letter_names(&stream, &prefix);
        let addr: ServerAddr = url.parse().map_err(|_| BusError::InvalidUrl(url.into()))?;
        let client = ConnectOptions::new()
            .connection_timeout(CONNECT_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(addr)
            .await
            .map_err(|e| BusError::Transport(format!("connecting to nats: {e}")))?;
        let js = ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        let shared = Shared {
            client,
            js,
            stream,
            prefix,
            dl_stream,
            dl_prefix,
            publish: Mutex::new(PublishState::default()),
        };
        shared.ensure_stream(StreamKind::Events).await?;
        shared.ensure_stream(StreamKind::DeadLetters).await?;
        {
            let mut state = shared.publish.lock().await;
            shared.refresh(&mut state).await?;
        }
        Ok(NatsBus {
            shared: Arc::new(shared),
        })
    }

    /// The events stream's name.
    pub fn stream_name(&self) -> &str {
        &self.shared.stream
    }

    /// The events stream's subject prefix (the stream captures `<prefix>.>`).
    pub fn subject_prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The dead-letter stream's name.
    pub fn dead_letter_stream_name(&self) -> &str {
        &self.shared.dl_stream
    }

    /// The dead-letter stream's subject prefix (dead letters of group `g` go to
    /// `<prefix>.<g>`).
    pub fn dead_letter_prefix(&self) -> &str {
        &self.shared.dl_prefix
    }

    /// The subject an event is published to: `<prefix>.<aggregate_type>.<aggregate_id>`.
    pub fn subject_for(&self, event: &EventEnvelope) -> String {
        self.shared.subject_for(event)
    }

    /// The durable consumer name of consumer group `group` (`.` and other characters not in
    /// `[A-Za-z0-9_-]` replaced by `_`).
    pub fn consumer_name(group: &str) -> String {
        token(group)
    }

    /// Records that consumer group `group` gave up on `delivery` for `reason`: publishes the
    /// envelope to `<dead-letter prefix>.<group>` on the dead-letter stream, with headers
    /// [`HEADER_GROUP`], [`HEADER_REASON`] (control characters replaced by spaces, cut at
    /// 2 KiB), [`HEADER_POSITION`] and [`HEADER_DELIVERY_COUNT`], and returns once JetStream
    /// acknowledged it. `Nats-Msg-Id` is `<group>:<event_id>:<delivery_count>`, so repeating
    /// the call for the same delivery within [`DUPLICATE_WINDOW`] stores it once.
    ///
    /// The caller then acknowledges the delivery on its subscription; a dead letter is not an
    /// acknowledgement.
    ///
    /// # Errors
    /// [`BusError::Transport`] when the publish is not acknowledged.
    pub async fn dead_letter(
        &self,
        group: &str,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError> {
        let shared = &self.shared;
        shared.check_connected()?;
        let envelope = &delivery.envelope;
        let json = serde_json::to_vec(envelope).map_err(|e| {
            BusError::Transport(format!(
                "encoding the envelope at position {}: {e}",
                envelope.position
            ))
        })?;
        let subject = format!("{}.{}", shared.dl_prefix, token(group));
        let mut headers = HeaderMap::new();
        let msg_id = format!("{group}:{}:{}", envelope.event_id, delivery.delivery_count);
        headers.insert(HEADER_MSG_ID, header_safe(&msg_id, MAX_REASON_BYTES));
        headers.insert(HEADER_GROUP, header_safe(group, MAX_REASON_BYTES));
        headers.insert(HEADER_REASON, header_safe(reason, MAX_REASON_BYTES));
        headers.insert(HEADER_POSITION, envelope.position.to_string());
        headers.insert(HEADER_DELIVERY_COUNT, delivery.delivery_count.to_string());
        let publish = PublishMessage::build()
            .payload(json.into())
            .headers(headers);
        let ack = shared
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| BusError::Transport(format!("publishing a dead letter: {e}")))?;
        let ack = ack
            .await
            .map_err(|e| BusError::Transport(format!("dead letter not acknowledged: {e}")))?;
        tracing::warn!(
            stream = %shared.dl_stream,
            group,
            position = envelope.position,
            delivery_count = delivery.delivery_count,
            seq = ack.sequence,
            duplicate = ack.duplicate,
            reason,
            "event dead-lettered"
        );
        Ok(())
    }

    /// Up to `limit` dead letters, oldest first: all groups' when `group` is `None`, else only
    /// `group`'s. Reads the dead-letter stream through a short-lived ephemeral consumer (no
    /// acknowledgements), deleted afterwards. Messages on the dead-letter stream that are not
    /// dead letters written by [`NatsBus::dead_letter`] are skipped (logged).
    ///
    /// # Errors
    /// [`BusError::Transport`] when JetStream cannot be read.
    pub async fn dead_letters(
        &self,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NatsDeadLetter>, BusError> {
        let shared = &self.shared;
        shared.check_connected()?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stream = shared.get_stream(&shared.dl_stream).await?;
        let filter_subject = group.map_or_else(
            || format!("{}.>", shared.dl_prefix),
            |g| format!("{}.{}", shared.dl_prefix, token(g)),
        );
        let consumer: PullConsumer = stream
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                filter_subject,
                inactive_threshold: LISTING_INACTIVE_THRESHOLD,
                memory_storage: true,
                description: Some("tektree dead-letter listing".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| transport("creating a dead-letter listing consumer", e))?;
        let fetched = fetch(&consumer, limit, LISTING_EXPIRES).await;
        let name = consumer.cached_info().name.clone();
        if let Err(e) = stream.delete_consumer(&name).await {
            tracing::debug!(consumer = %name, error = %e, "deleting a listing consumer failed");
        }
        let mut out = Vec::new();
        for message in fetched? {
            let seq = match message.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter listing got a non-JetStream message");
                    continue;
                }
            };
            match parse_dead_letter(seq, &message) {
                Ok(dl) if group.is_none_or(|g| g == dl.group) => out.push(dl),
                Ok(_) => {}
                Err(reason) => tracing::warn!(
                    stream = %shared.dl_stream,
                    seq,
                    reason,
                    "skipping a message of the dead-letter stream that is not a dead letter"
                ),
            }
        }
        Ok(out)
    }

    /// Deletes the dead letter at sequence `seq` of the dead-letter stream (after it was
    /// replayed or judged irrelevant). Returns `false` when there is no such message.
    ///
    /// # Errors
    /// [`BusError::Transport`] when JetStream does not answer.
    pub async fn remove_dead_letter(&self, seq: u64) -> Result<bool, BusError> {
        let shared = &self.shared;
        shared.check_connected()?;
        let stream = shared.get_stream(&shared.dl_stream).await?;
        match stream.delete_message(seq).await {
            Ok(deleted) => Ok(deleted),
            Err(e) => match e.kind() {
                DeleteMessageErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::NO_MESSAGE_FOUND
                        || js.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED =>
                {
                    Ok(false)
                }
                _ => Err(transport("deleting a dead letter", e)),
            },
        }
    }
}

/// Which of the two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Events,
    DeadLetters,
}

impl Shared {
    /// `Err(Transport)` right away while the client is disconnected (instead of waiting for a
    /// request timeout).
    fn check_connected(&self) -> Result<(), BusError> {
        if self.client.connection_state() == ConnectionState::Disconnected {
            Err(BusError::Transport("not connected to nats".into()))
        } else {
            Ok(())
        }
    }

    fn subject_for(&self, event: &EventEnvelope) -> String {
        format!(
            "{}.{}.{}",
            self.prefix,
            token(&event.aggregate_type),
            event.aggregate_id
        )
    }

    /// The configuration this adapter creates a stream with.
    fn stream_config(&self, kind: StreamKind) -> stream::Config {
        let (name, prefix, description) = match kind {
            StreamKind::Events => (&self.stream, &self.prefix, "tektree committed events"),
            StreamKind::DeadLetters => (
                &self.dl_stream,
                &self.dl_prefix,
                "tektree dead letters: events a consumer group gave up on",
            ),
        };
        stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            description: Some(description.into()),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: 1,
            // No max_age, max_messages, max_bytes: the store is the source of truth and the
            // stream its transport; nothing expires unless an operator says so.
            ..Default::default()
        }
    }

    /// Gets the stream, creating it with [`Shared::stream_config`] if missing, and checks
    /// that an existing one is usable.
    async fn ensure_stream(&self, kind: StreamKind) -> Result<stream::Stream, BusError> {
        let wanted = self.stream_config(kind);
        let stream = self
            .js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| transport(&format!("creating the stream {}", wanted.name), e))?;
        check_stream_config(&wanted, &stream.cached_info().config)?;
        Ok(stream)
    }

    /// The stream `name` (recreated if it was deleted since connecting).
    async fn get_stream(&self, name: &str) -> Result<stream::Stream, BusError> {
        match self.js.get_stream(name).await {
            Ok(stream) => Ok(stream),
            Err(e) if is_stream_not_found(&e.kind()) => {
                let kind = if name == self.stream {
                    StreamKind::Events
                } else {
                    StreamKind::DeadLetters
                };
                tracing::warn!(
                    stream = name,
                    "stream missing (deleted, or the server lost its data); recreating it"
                );
                metrics::counter!(crate::recovery::METRIC_BUS_RECREATED, "what" => "stream")
                    .increment(1);
                self.ensure_stream(kind).await
            }
            Err(e) => Err(transport(&format!("reading the stream {name}"), e)),
        }
    }

    /// Reads the end of the events stream into `state`: its last sequence and the highest
    /// position found scanning back from there (messages without a position are skipped).
    async fn refresh(&self, state: &mut PublishState) -> Result<(), BusError> {
        let stream = self.get_stream(&self.stream).await?;
        let last_seq = stream.cached_info().state.last_sequence;
        let last_position = self
            .last_positioned(&stream)
            .await?
            .map_or(0, |(_, p, _)| p);
        *state = PublishState {
            last_position,
            last_seq,
            fresh: true,
        };
        Ok(())
    }

    /// The sequence, position and payload of the last message of `stream` that carries a
    /// position, scanning back from the stream's end (at most [`MAX_SCAN_BACK`] messages;
    /// messages without a position are skipped); `None` for an empty stream.
    async fn last_positioned(
        &self,
        stream: &stream::Stream,
    ) -> Result<Option<(u64, u64, Vec<u8>)>, BusError> {
        let info = stream.cached_info();
        if info.state.messages == 0 {
            return Ok(None);
        }
        let last_seq = info.state.last_sequence;
        let floor = info.state.first_sequence.max(1);
        let mut seq = last_seq;
        let mut scanned = 0;
        while seq >= floor && scanned < MAX_SCAN_BACK {
            match stream.get_raw_message(seq).await {
                Ok(message) => {
                    if let Some(p) = stored_position(&message.headers, &message.payload) {
                        return Ok(Some((seq, p, message.payload.to_vec())));
                    }
                }
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(transport("reading the stream's last message", e)),
            }
            seq -= 1;
            scanned += 1;
        }
        tracing::warn!(
            stream = %self.stream,
            last_seq,
            scanned,
            "no event position found at the end of the stream"
        );
        Ok(None)
    }

    /// The name of the key-value bucket holding the store binding: the events stream's name
    /// with `_STORE` appended (`TEKTREE_EVENTS_STORE`).
    fn store_bucket_name(&self) -> String {
        format!("{}_STORE", self.stream)
    }

    /// The key-value bucket holding the store binding (key [`STORE_KEY`]), created if missing.
    ///
    /// The bucket's stream is created here with the key-value layout (`KV_<bucket>`, subjects
    /// `$KV.<bucket>.>`, one message per subject, rollups, direct gets) rather than with
    /// `create_key_value`, whose account query this client cannot parse from nats-server
    /// 2.9 (Debian 12's); the bucket is then opened as a key-value store.
    async fn store_bucket(&self) -> Result<async_nats::jetstream::kv::Store, BusError> {
        self.check_connected()?;
        let bucket = self.store_bucket_name();
        let config = stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: StorageType::File,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| transport("creating the store binding's bucket", e))?;
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| transport("opening the store binding's bucket", e))
    }

    /// One publish round: sends the events of `events` above `state.last_position`, then
    /// awaits every acknowledgement in order, advancing `state` on each. The first event
    /// expects the stream's last sequence to be `state.last_seq`, each further one expects the
    /// stream's last message id to be the previous event's id: JetStream stores an event only
    /// right after the one before it, so when one is refused none after it can be stored out of
    /// order. Returns `Ok(true)` when all were stored (or acknowledged as duplicates),
    /// `Ok(false)` when JetStream refused some because the stream's end moved (`state` is then
    /// stale: reread it and go again).
    async fn publish_round(
        &self,
        state: &mut PublishState,
        events: &[EventEnvelope],
    ) -> Result<bool, BusError> {
        let mut pending: Vec<(u64, PublishAckFuture)> = Vec::new();
        let mut send_error = None;
        let mut last = state.last_position;
        let mut previous: Option<&EventEnvelope> = None;
        for event in events {
            if event.position <= last {
                continue;
            }
            last = event.position;
            let json = match serde_json::to_vec(event) {
                Ok(json) => json,
                Err(e) => {
                    send_error = Some(BusError::Transport(format!(
                        "encoding the envelope at position {}: {e}",
                        event.position
                    )));
                    break;
                }
            };
            let message = PublishMessage::build()
                .payload(json.into())
                .message_id(event.event_id.to_string())
                .header(HEADER_POSITION, event.position.to_string());
            let message = match previous {
                None => message.expected_last_sequence(state.last_seq),
                Some(previous) => message.expected_last_message_id(previous.event_id.to_string()),
            };
            match self.js.send_publish(self.subject_for(event), message).await {
                Ok(ack) => pending.push((event.position, ack)),
                Err(e) => {
                    send_error = Some(transport("publishing", e));
                    break;
                }
            }
            previous = Some(event);
        }
        // Every acknowledgement is awaited, also after a failure, so none is left behind.
        let mut all_stored = true;
        let mut ack_error = None;
        for (position, ack) in pending {
            match ack.await {
                Ok(ack) if ack.duplicate => {
                    // Stored before (within the window): published, but the stream did not
                    // grow; `last_seq` is unknown now.
                    state.last_position = state.last_position.max(position);
                    state.fresh = false;
                }
                Ok(ack) => {
                    state.last_position = state.last_position.max(position);
                    state.last_seq = ack.sequence;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                    ) =>
                {
                    all_stored = false;
                    state.fresh = false;
                }
                Err(e) => {
                    state.fresh = false;
                    ack_error.get_or_insert_with(|| {
                        transport(&format!("acknowledgement of position {position}"), e)
                    });
                }
            }
        }
        if let Some(e) = send_error.or(ack_error) {
            state.fresh = false;
            return Err(e);
        }
        Ok(all_stored)
    }
}

#[async_trait]
impl Bus for NatsBus {
    /// See [`Bus::publish_after`]: the floor is checked against the stream's end as read
    /// before the round, and each round expects that end (its last sequence), so a stream
    /// deleted and recreated meanwhile fails the round, is read again and ends below the floor.
    async fn publish_after(&self, floor: u64, events: &[EventEnvelope]) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        shared.check_connected()?;
        let mut state = shared.publish.lock().await;
        for round in 0..MAX_PUBLISH_ROUNDS {
            if !state.fresh {
                shared.refresh(&mut state).await?;
            }
            if state.last_position < floor {
                state.fresh = false;
                return Err(BusError::Behind {
                    last: state.last_position,
                    floor,
                });
            }
            if events.iter().all(|e| e.position <= state.last_position) {
                return Ok(());
            }
            if shared.publish_round(&mut state, events).await? {
                return Ok(());
            }
            tracing::debug!(
                stream = %shared.stream,
                round,
                "the stream's end moved while publishing (another publisher); retrying"
            );
        }
        Err(BusError::Transport(format!(
            "publishing to {}: the stream's end kept moving for {MAX_PUBLISH_ROUNDS} rounds",
            shared.stream
        )))
    }

    async fn subscribe(
        &self,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.shared.check_connected()?;
        let mut sub = NatsSubscription {
            shared: self.shared.clone(),
            durable: token(&options.group),
            ack_wait: options.min_idle.max(MIN_ACK_WAIT),
            options,
            consumer: None,
            buffered: VecDeque::new(),
            held: HashMap::new(),
            consumer_checked: None,
        };
        sub.consumer().await?;
        Ok(Box::new(sub))
    }

    async fn last_published(&self) -> Result<u64, BusError> {
        let shared = &self.shared;
        shared.check_connected()?;
        let mut state = shared.publish.lock().await;
        shared.refresh(&mut state).await?;
        Ok(state.last_position)
    }

    async fn bound_store(&self) -> Result<Option<StoreIdentity>, BusError> {
        let kv = self.shared.store_bucket().await?;
        let value = kv
            .get(STORE_KEY)
            .await
            .map_err(|e| transport("reading the store binding", e))?;
        value
            .map(|v| {
                serde_json::from_slice(&v).map_err(|e| BusError::Decode {
                    id: format!("{}/{STORE_KEY}", self.shared.store_bucket_name()),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    async fn bind_store(&self, identity: &StoreIdentity) -> Result<StoreIdentity, BusError> {
        let kv = self.shared.store_bucket().await?;
        let body = serde_json::to_vec(identity)
            .map_err(|e| BusError::Transport(format!("encode the store identity: {e}")))?;
        match kv.create(STORE_KEY, body.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(transport("binding the stream to its store", e)),
        }
        self.bound_store().await?.ok_or_else(|| {
            BusError::Transport("the store binding vanished right after it was made".into())
        })
    }

    async fn empty_and_rebind(
        &self,
        from: &StoreIdentity,
        to: &StoreIdentity,
    ) -> Result<bool, BusError> {
        let shared = &self.shared;
        let kv = shared.store_bucket().await?;
        let Some(entry) = kv
            .entry(STORE_KEY)
            .await
            .map_err(|e| transport("reading the store binding", e))?
        else {
            return Ok(false);
        };
        if serde_json::from_slice::<StoreIdentity>(&entry.value)
            .ok()
            .as_ref()
            != Some(from)
        {
            return Ok(false);
        }
        let mut state = shared.publish.lock().await;
        for name in [&shared.stream, &shared.dl_stream] {
            match shared.js.delete_stream(name.as_str()).await {
                Ok(_) => {}
                Err(e) if is_stream_not_found(&e.kind()) => {}
                Err(e) => return Err(transport(&format!("deleting the stream {name}"), e)),
            }
        }
        state.fresh = false;
        let body = serde_json::to_vec(to)
            .map_err(|e| BusError::Transport(format!("encode the store identity: {e}")))?;
        // Only if nobody replaced the binding meanwhile (its revision is unchanged).
        match kv.update(STORE_KEY, body.into(), entry.revision).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                Ok(false)
            }
            Err(e) => Err(transport("replacing the store binding", e)),
        }
    }

    async fn last_event(&self) -> Result<Option<EventEnvelope>, BusError> {
        let shared = &self.shared;
        shared.check_connected()?;
        let stream = shared.get_stream(&shared.stream).await?;
        let Some((seq, _, payload)) = shared.last_positioned(&stream).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&payload)
            .map(Some)
            .map_err(|e| BusError::Decode {
                id: seq.to_string(),
                reason: e.to_string(),
            })
    }

    async fn dead_letter(
        &self,
        group: &str,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError> {
        NatsBus::dead_letter(self, group, delivery, reason).await
    }

    async fn dead_letters(
        &self,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::DeadLetter>, BusError> {
        // JetStream takes a pull batch size as a signed 32-bit integer.
        Ok(
            NatsBus::dead_letters(self, group, limit.min(i32::MAX as usize))
                .await?
                .into_iter()
                .map(|d| crate::DeadLetter {
                    id: d.seq.to_string(),
                    group: d.group,
                    reason: d.reason,
                    delivery_count: d.delivery_count,
                    envelope: d.envelope,
                })
                .collect(),
        )
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError> {
        match id.parse::<u64>() {
            Ok(seq) => NatsBus::remove_dead_letter(self, seq).await,
            Err(_) => Ok(false),
        }
    }
}

/// One worker of a [`NatsBus`] consumer group.
struct NatsSubscription {
    shared: Arc<Shared>,
    options: SubscriptionOptions,
    /// The durable consumer's name.
    durable: String,
    ack_wait: Duration,
    /// The consumer, `None` until (re)created.
    consumer: Option<PullConsumer>,
    /// Messages fetched but not yet returned: those after an undecodable one.
    buffered: VecDeque<jetstream::Message>,
    /// Messages returned (or reported undecodable) and not yet acknowledged, by
    /// [`Delivery::id`].
    held: HashMap<String, Held>,
    /// When the consumer was last looked for after an empty fetch ([`CONSUMER_CHECK_EVERY`]).
    consumer_checked: Option<Instant>,
}

/// A delivered message kept so it can be acknowledged.
struct Held {
    message: jetstream::Message,
    since: Instant,
}

impl NatsSubscription {
    /// The durable consumer, created or updated (idempotently) on first use and after a
    /// failure.
    async fn consumer(&mut self) -> Result<PullConsumer, BusError> {
        if let Some(consumer) = &self.consumer {
            return Ok(consumer.clone());
        }
        let config = pull::Config {
            durable_name: Some(self.durable.clone()),
            description: Some(format!("tektree consumer group {}", self.options.group)),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            deliver_policy: DeliverPolicy::All,
            max_deliver: -1, // unlimited: see the type's docs
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        let stream = self.shared.get_stream(&self.shared.stream).await?;
        let consumer: PullConsumer = stream.create_consumer(config).await.map_err(|e| {
            transport(
                &format!(
                    "creating the consumer {} of {}",
                    self.durable,
                    stream_name(&stream)
                ),
                e,
            )
        })?;
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    /// Up to `max` messages from the group: what is available now, or, when nothing is, what
    /// arrives first within `block` (see [`fetch`]).
    async fn fetch(
        &mut self,
        max: usize,
        block: Duration,
    ) -> Result<Vec<jetstream::Message>, BusError> {
        let consumer = self.consumer().await?;
        let result = fetch(&consumer, max, block).await;
        match &result {
            // The consumer may have been deleted: recreate it on the next call.
            Err(_) => self.consumer = None,
            // A pull request to a consumer deleted with its stream just expires empty: look,
            // at most once per CONSUMER_CHECK_EVERY (an idle worker fetches every ~200 ms).
            Ok(fetched)
                if fetched.is_empty()
                    && self
                        .consumer_checked
                        .is_none_or(|at| at.elapsed() >= CONSUMER_CHECK_EVERY) =>
            {
                self.consumer_checked = Some(Instant::now());
                self.check_consumer().await?;
            }
            Ok(_) => {}
        }
        result
    }

    /// Forgets the consumer (so that the next fetch recreates it, at the start of the stream)
    /// when the server no longer has it: its stream was deleted, or the server lost its data.
    async fn check_consumer(&mut self) -> Result<(), BusError> {
        use async_nats::jetstream::context::ConsumerInfoErrorKind;
        let stream = self.shared.get_stream(&self.shared.stream).await?;
        match stream.consumer_info(&self.durable).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                ) =>
            {
                tracing::warn!(
                    stream = %self.shared.stream,
                    consumer = %self.durable,
                    "durable consumer missing (its stream was deleted, or the server lost its \
                     data); recreating it at the start of the stream"
                );
                metrics::counter!(crate::recovery::METRIC_BUS_RECREATED, "what" => "consumer")
                    .increment(1);
                self.consumer = None;
                Ok(())
            }
            Err(e) => Err(transport("reading the consumer's info", e)),
        }
    }

    /// Returns up to `max` buffered messages decoded, stopping before an undecodable one; an
    /// undecodable message at the front is removed and returned as [`BusError::Decode`] (and
    /// kept, so acknowledging its id skips it).
    fn drain_buffer(&mut self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(message) = self.buffered.front() else {
                break;
            };
            let decoded = decode(message);
            let message = match decoded {
                Err(_) if !out.is_empty() => break, // reported on the next call
                _ => self.buffered.pop_front().expect("front exists"),
            };
            match decoded {
                Ok(delivery) => {
                    self.hold(delivery.id.clone(), message);
                    out.push(delivery);
                }
                Err(e) => {
                    if let BusError::Decode { id, .. } = &e {
                        self.hold(id.clone(), message);
                    }
                    tracing::warn!(
                        stream = %self.shared.stream,
                        group = %self.options.group,
                        error = %e,
                        "undecodable bus message"
                    );
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn hold(&mut self, id: String, message: jetstream::Message) {
        if self.held.len() >= HELD_PRUNE_ABOVE {
            let stale = (self.ack_wait * 4).max(STALE_HOLD_MIN);
            let before = self.held.len();
            self.held.retain(|_, h| h.since.elapsed() < stale);
            tracing::debug!(
                group = %self.options.group,
                forgotten = before - self.held.len(),
                "forgot deliveries held unacknowledged for longer than {stale:?}"
            );
        }
        self.held.insert(
            id,
            Held {
                message,
                since: Instant::now(),
            },
        );
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next_batch(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        if self.buffered.is_empty() {
            self.shared.check_connected()?;
            let fetched = self.fetch(max, block).await?;
            self.buffered.extend(fetched);
        }
        self.drain_buffer(max)
    }

    async fn ack(&mut self, ids: &[String]) -> Result<(), BusError> {
        // Like XACK, ids this subscription does not hold are ignored.
        let taken: Vec<(String, Held)> = ids
            .iter()
            .filter_map(|id| self.held.remove(id).map(|h| (id.clone(), h)))
            .collect();
        if taken.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.shared.check_connected() {
            self.held.extend(taken);
            return Err(e);
        }
        // Double acks: each returns once the server processed it, so an acknowledged
        // delivery is never handed out again. Acknowledging twice is harmless.
        let results: Vec<(String, Held, Result<(), String>)> = futures::stream::iter(taken)
            .map(|(id, held)| async move {
                let result =
                    match tokio::time::timeout(REQUEST_TIMEOUT, held.message.double_ack()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
                    };
                (id, held, result)
            })
            .buffer_unordered(ACK_CONCURRENCY)
            .collect()
            .await;
        let mut failed = 0usize;
        let mut first_error = None;
        for (id, held, result) in results {
            if let Err(e) = result {
                failed += 1;
                first_error.get_or_insert(e);
                self.held.insert(id, held);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(BusError::Transport(format!(
                "{failed} acknowledgement(s) failed: {e}"
            ))),
        }
    }
}

/// Sends one pull request for up to `max` messages with `no_wait` and `expires` set, and
/// collects the answer. nats-server (2.9.10 measured) then delivers what is available at once;
/// when nothing is, it waits up to `expires` for the first message(s); either way it ends the
/// request (status 408) as soon as nothing more is available, without waiting to fill the
/// batch. `expires` also bounds a `no_wait` request the server would otherwise leave
/// unanswered (seen on 2.9.10 for the first pull after a message reached a `max_deliver` limit).
async fn fetch(
    consumer: &PullConsumer,
    max: usize,
    expires: Duration,
) -> Result<Vec<jetstream::Message>, BusError> {
    let expires = expires.max(MIN_EXPIRES);
    let collect = async {
        consumer
            .fetch()
            .max_messages(max)
            .expires(expires)
            .messages()
            .await
            .map_err(|e| transport("pull request", e))?
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| BusError::Transport(format!("pull request: {e}")))
    };
    let limit = REQUEST_TIMEOUT + expires;
    match tokio::time::timeout(limit, collect).await {
        Ok(result) => result,
        Err(_) => Err(BusError::Transport(format!(
            "no answer to a pull request within {limit:?}"
        ))),
    }
}

/// The delivery a message of the events stream carries.
fn decode(message: &jetstream::Message) -> Result<Delivery, BusError> {
    let info = message
        .info()
        .map_err(|e| BusError::Transport(format!("not a JetStream delivery: {e}")))?;
    let id = info.stream_sequence.to_string();
    let delivery_count = u64::try_from(info.delivered).unwrap_or(1).max(1);
    let decode_error = |reason: String| BusError::Decode {
        id: id.clone(),
        reason,
    };
    let envelope: EventEnvelope =
        serde_json::from_slice(&message.payload).map_err(|e| decode_error(e.to_string()))?;
    if let Some(header) = message
        .headers
        .as_ref()
        .and_then(|h| h.get(HEADER_POSITION))
    {
        if header.as_str().parse::<u64>().ok() != Some(envelope.position) {
            return Err(decode_error(format!(
                "envelope position {} does not match the {HEADER_POSITION} header {:?}",
                envelope.position,
                header.as_str()
            )));
        }
    }
    Ok(Delivery {
        id,
        envelope,
        delivery_count,
    })
}

/// The position of a stored message: its [`HEADER_POSITION`] header, else its envelope's;
/// `None` for a message that is neither.
fn stored_position(headers: &HeaderMap, payload: &[u8]) -> Option<u64> {
    if let Some(value) = headers.get(HEADER_POSITION) {
        if let Ok(position) = value.as_str().parse() {
            return Some(position);
        }
    }
    serde_json::from_slice::<EventEnvelope>(payload)
        .ok()
        .map(|e| e.position)
}

/// A dead letter from its message, or why it is not one.
fn parse_dead_letter(seq: u64, message: &jetstream::Message) -> Result<NatsDeadLetter, String> {
    let headers = message.headers.as_ref().ok_or("no headers")?;
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .ok_or_else(|| format!("no {name} header"))
    };
    let group = header(HEADER_GROUP)?;
    let reason = header(HEADER_REASON)?;
    let delivery_count = header(HEADER_DELIVERY_COUNT)?
        .parse()
        .map_err(|e| format!("{HEADER_DELIVERY_COUNT}: {e}"))?;
    let envelope: EventEnvelope =
        serde_json::from_slice(&message.payload).map_err(|e| e.to_string())?;
    Ok(NatsDeadLetter {
        seq,
        group,
        reason,
        delivery_count,
        envelope,
    })
}

/// Checks an existing stream's configuration: its subjects must cover ours and its retention
/// must be limits (work-queue or interest retention would delete messages other groups still
/// need); other differences (storage, duplicate window, limits) are the operator's choice and
/// only logged.
fn check_stream_config(wanted: &stream::Config, actual: &stream::Config) -> Result<(), BusError> {
    let name = &wanted.name;
    for subject in &wanted.subjects {
        if !actual.subjects.contains(subject) {
            return Err(BusError::Config(format!(
                "stream {name} exists with subjects {:?}, without {subject:?}",
                actual.subjects
            )));
        }
    }
    if actual.retention != RetentionPolicy::Limits {
        return Err(BusError::Config(format!(
            "stream {name} exists with {:?} retention; consumer groups need limits retention",
            actual.retention
        )));
    }
    if actual.subjects.len() > wanted.subjects.len() {
        tracing::warn!(stream = %name, subjects = ?actual.subjects, "stream has extra subjects");
    }
    if actual.storage != wanted.storage {
        tracing::warn!(stream = %name, storage = ?actual.storage, "stream is not file-backed");
    }
    if actual.duplicate_window != wanted.duplicate_window {
        tracing::warn!(
            stream = %name,
            duplicate_window = ?actual.duplicate_window,
            expected = ?wanted.duplicate_window,
            "stream has another duplicate window"
        );
    }
    if !actual.max_age.is_zero() || actual.max_messages > 0 || actual.max_bytes > 0 {
        tracing::info!(
            stream = %name,
            max_age = ?actual.max_age,
            max_messages = actual.max_messages,
            max_bytes = actual.max_bytes,
            "stream has operator-set limits: events beyond them leave the bus (not the store)"
        );
    }
    Ok(())
}

fn is_stream_not_found(kind: &async_nats::jetstream::context::GetStreamErrorKind) -> bool {
    matches!(
        kind,
        async_nats::jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

fn stream_name(stream: &stream::Stream) -> &str {
    &stream.cached_info().config.name
}

fn transport(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Transport(format!("{what}: {e}"))
}

/// `s` as one subject token / consumer name: characters other than `[A-Za-z0-9_-]` replaced
/// by `_`; `_` for the empty string.
fn token(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `s` fit for a header value: control characters replaced by spaces, cut to at most
/// `max_bytes` bytes at a character boundary.
fn header_safe(s: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_bytes));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    out
}

/// The dead-letter stream's name and subject prefix for an events stream's.
fn dead_letter_names(stream: &str, prefix: &str) -> (String, String) {
    let dl_stream = stream.strip_suffix("_EVENTS").map_or_else(
        || format!("{stream}_DEADLETTER"),
        |base| format!("{base}_DEADLETTER"),
    );
    let dl_prefix = prefix.strip_suffix(".events").map_or_else(
        || format!("{prefix}_deadletter"),
        |base| format!("{base}.deadletter"),
    );
    (dl_stream, dl_prefix)
}

fn is_valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
        })
}

fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_consumer_names() {
        assert_eq!(token("projection.xp"), "projection_xp");
        assert_eq!(token("policy.gamification"), "policy_gamification");
        assert_eq!(token("a b*c>d/é"), "a_b_c_d__");
        assert_eq!(token(""), "_");
        assert_eq!(token("user-1_x"), "user-1_x");
        assert_eq!(NatsBus::consumer_name("projection.xp"), "projection_xp");
    }

    #[test]
    fn dead_letter_names_derive_from_the_events_names() {
        assert_eq!(
            dead_letter_names(DEFAULT_NATS_STREAM, DEFAULT_SUBJECT_PREFIX),
            (
                DEFAULT_DEAD_LETTER_STREAM.to_string(),
                DEFAULT_DEAD_LETTER_PREFIX.to_string()
            )
        );
        assert_eq!(
            dead_letter_names("X", "a.b"),
            ("X_DEADLETTER".to_string(), "a.b_deadletter".to_string())
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(is_valid_stream_name("TEKTREE_EVENTS"));
        assert!(!is_valid_stream_name("a.b"));
        assert!(!is_valid_stream_name(""));
        assert!(!is_valid_stream_name("a b"));
        assert!(is_valid_prefix("tektree.events"));
        assert!(!is_valid_prefix("tektree..events"));
        assert!(!is_valid_prefix("tektree.*"));
        assert!(!is_valid_prefix("tektree.>"));
        assert!(!is_valid_prefix(""));
    }

    #[test]
    fn header_values_are_single_line_and_bounded() {
        assert_eq!(header_safe("a\r\nb", 100), "a  b");
        assert_eq!(header_safe("ééé", 5), "éé");
    }

    /// A bus whose idea of the stream's end is wrong (another publisher appended meanwhile,
    /// unseen) still stores each position once: the `Nats-Msg-Id` window and the
    /// expected-last-sequence check catch the republished events.
    #[tokio::test]
    async fn stale_view_of_the_stream_end_stores_each_position_once() {
        let server = crate::test_support::NatsServer::start();
        let names = crate::test_support::unique_nats_names();
        let bus = NatsBus::with_prefix(&server.url, &names.stream, &names.subject_prefix)
            .await
            .unwrap();
        let events = crate::conformance::envelopes;
        bus.publish(&events(1..=5)).await.unwrap();
        for stale in [
            PublishState {
                last_position: 1,
                last_seq: 1,
                fresh: true,
            },
            PublishState {
                last_position: 2,
                last_seq: 2,
                fresh: true,
            },
        ] {
            *bus.shared.publish.lock().await = stale;
            bus.publish(&events(1..=7)).await.unwrap();
        }
        let stream = bus.shared.get_stream(&names.stream).await.unwrap();
        let state = &stream.cached_info().state;
        assert_eq!((state.messages, state.last_sequence), (7, 7));
        for seq in 1..=7 {
            let message = stream.get_raw_message(seq).await.unwrap();
            assert_eq!(
                stored_position(&message.headers, &message.payload),
                Some(seq)
            );
        }
        assert_eq!(bus.last_published().await.unwrap(), 7);
    }
}
