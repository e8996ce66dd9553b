//! Load → decide → append, with bounded retry on expected-version conflicts.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use tektree_domain::{Actor, DomainError, Event, EventEnvelope, EventMetadata, NewEvent};
use tektree_event_store::{EventStore, IdempotencyKey, IdempotencyRecord, StoreError};
use tracing::Instrument;
use uuid::Uuid;

use crate::cache::StateCache;
use crate::error::CommandError;

/// Correlation data of one command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandMeta {
    /// Unique id of this command; the causation id of the events it emits.
    pub command_id: Uuid,
    /// Correlation id (from the request, or the source event's for policy commands).
    pub correlation_id: Uuid,
    /// Issuer.
    pub actor: Actor,
    /// Domain time of the fact (now for API commands, the dump's date for imports).
    pub occurred_at: DateTime<Utc>,
}

impl CommandMeta {
    /// Metadata for a fresh command by `actor` at `occurred_at` with new ids.
    pub fn new(actor: Actor, occurred_at: DateTime<Utc>) -> Self {
        let id = Uuid::new_v4();
        CommandMeta {
            command_id: id,
            correlation_id: id,
            actor,
            occurred_at,
        }
    }

    /// Metadata for a policy command caused by `source`: same correlation id and domain time,
    /// causation = the source event.
    pub fn caused_by(source: &EventEnvelope, actor: Actor) -> Self {
        CommandMeta {
            command_id: source.event_id,
            correlation_id: source.correlation_id,
            actor,
            occurred_at: source.occurred_at,
        }
    }

    fn metadata(&self) -> EventMetadata {
        EventMetadata {
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id,
            causation_id: self.command_id,
            actor: self.actor.clone(),
        }
    }
}

/// What a committed command produced. `events` is empty when the command changed nothing
/// (an idempotent repeat).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Aggregate type.
    pub aggregate_type: &'static str,
    /// Aggregate id.
    pub aggregate_id: Uuid,
    /// Committed events, in sequence order.
    pub events: Vec<EventEnvelope>,
    /// Aggregate version after the command.
    pub version: u64,
}

/// Runs commands against aggregates stored in an [`EventStore`].
#[derive(Clone)]
pub struct CommandHandler {
    store: Arc<dyn EventStore>,
    max_attempts: u32,
    cache: Arc<StateCache>,
}

impl CommandHandler {
    /// A handler over `store` with the default of 5 attempts per command and a cache of up to
    /// 50,000 folded aggregate states.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        CommandHandler {
            store,
            max_attempts: 5,
            cache: Arc::new(StateCache::new(50_000)),
        }
    }

    /// Replaces the state cache with one of `capacity` aggregates (0 disables it: every load
    /// folds the aggregate's whole history).
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = Arc::new(StateCache::new(capacity));
        self
    }

    /// Sets the number of attempts on expected-version conflicts (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Attempts per command before [`CommandError::Conflict`].
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Loads aggregate `A` with id `id`: its state and version (0 = no events).
    ///
    /// # Errors
    /// [`CommandError::Store`] or [`CommandError::Decode`].
    pub async fn load<A>(&self, id: Uuid) -> Result<(A, u64), CommandError>
    where
        A: Aggregate<Event = Event> + Clone + 'static,
    {
        let (mut state, cached) = self
            .cache
            .get::<A>(A::TYPE, id)
            .unwrap_or_else(|| (A::default(), 0));
        let stored = self
            .store
            .load_after(A::TYPE, id, cached)
            .await
            .map_err(CommandError::Store)?;
        let version = stored.last().map(|e| e.sequence).unwrap_or(cached);
        let fresh = !stored.is_empty();
        for env in stored {
            let event = env.decode().map_err(|source| CommandError::Decode {
                event_id: env.event_id,
                source,
            })?;
            state.apply(event);
        }
        if fresh {
            self.cache.put(A::TYPE, id, state.clone(), version);
        }
        Ok((state, version))
    }

    /// Executes `command` on aggregate `A`/`id` with `services`.
    ///
    /// # Errors
    /// [`CommandError::Rejected`] when the aggregate refuses; [`CommandError::Conflict`] after
    /// `max_attempts` expected-version conflicts; store / decode errors otherwise. Nothing is
    /// written on error.
    pub async fn execute<A>(
        &self,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
    ) -> Result<Outcome, CommandError>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone,
    {
        self.run::<A>(id, command, services, meta, None)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// [`CommandHandler::execute`] for a request with an idempotency `key`: the first request
    /// with the key runs the command and stores the key's [`IdempotencyRecord`] in the same
    /// transaction as its events; every later request with the key and the same fingerprint,
    /// until `key.expires_at`, gets the first outcome back (rebuilt from the stored events)
    /// and writes nothing. The `bool` is `true` for such a replay.
    ///
    /// Concurrent first requests with one key are safe: the store admits one record per key,
    /// the loser finds the winner's record and replays it.
    ///
    /// # Errors
    /// As [`CommandHandler::execute`], and [`CommandError::IdempotencyKeyReused`] when the key
    /// is live with another fingerprint. Refused commands store no record: a retry runs again.
    pub async fn execute_idempotent<A>(
        &self,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
        key: &IdempotencyKey,
    ) -> Result<(Outcome, bool), CommandError>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone,
    {
        if let Some(outcome) = self.replay_idempotent::<A>(key).await? {
            return Ok((outcome, true));
        }
        self.run::<A>(id, command, services, meta, Some(key)).await
    }

    /// The outcome recorded for `key` if a record is live at `key.created_at`, rebuilt from
    /// the stored events; `None` when the key is new (or expired).
    ///
    /// # Errors
    /// [`CommandError::IdempotencyKeyReused`] when the record has another fingerprint (or is
    /// for another aggregate type); store errors.
    pub async fn replay_idempotent<A>(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<Outcome>, CommandError>
    where
        A: Aggregate<Event = Event> + 'static,
    {
        let Some(record) = self
            .store
            .idempotency_record(&key.key, key.created_at)
            .await
            .map_err(CommandError::Store)?
        else {
            return Ok(None);
        };
        self.replay_record::<A>(key, record).await.map(Some)
    }

    async fn replay_record<A>(
        &self,
        key: &IdempotencyKey,
        record: IdempotencyRecord,
    ) -> Result<Outcome, CommandError>
    where
        A: Aggregate<Event = Event> + 'static,
    {
        if record.key.fingerprint != key.fingerprint || record.aggregate_type != A::TYPE {
            return Err(CommandError::IdempotencyKeyReused {
                key: key.key.clone(),
            });
        }
        let mut events = if record.event_count == 0 {
            Vec::new()
        } else {
            self.store
                .load_after(A::TYPE, record.aggregate_id, record.first_sequence - 1)
                .await
                .map_err(CommandError::Store)?
        };
        events.truncate(record.event_count as usize);
        if events.len() as u64 != record.event_count {
            return Err(CommandError::Store(StoreError::Backend(format!(
                "idempotency record {:?} names {} events from {}/{} sequence {}, {} are stored",
                key.key,
                record.event_count,
                A::TYPE,
                record.aggregate_id,
                record.first_sequence,
                events.len()
            ))));
        }
        metrics::counter!("tektree_idempotent_replays_total", "aggregate" => A::TYPE).increment(1);
        Ok(Outcome {
            aggregate_type: A::TYPE,
            aggregate_id: record.aggregate_id,
            events,
            version: record.version,
        })
    }

    /// Load → handle → append with retries; with a `key`, the append carries the idempotency
    /// record, and a lost race for the key replays the winner's outcome.
    async fn run<A>(
        &self,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
        key: Option<&IdempotencyKey>,
    ) -> Result<(Outcome, bool), CommandError>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone,
    {
        let span = tracing::info_span!(
            "command",
            aggregate_type = A::TYPE,
            aggregate_id = %id,
            command_id = %meta.command_id,
            correlation_id = %meta.correlation_id,
            actor = %meta.actor,
        );
        async move {
            for attempt in 1..=self.max_attempts {
                let (mut state, version) = self.load::<A>(id).await?;
                let sink = EventSink::default();
                state.handle(command.clone(), services, &sink).await?;
                let events = sink.collect().await;
                if events.is_empty() {
                    let outcome = Outcome {
                        aggregate_type: A::TYPE,
                        aggregate_id: id,
                        events: vec![],
                        version,
                    };
                    let Some(key) = key else {
                        return Ok((outcome, false));
                    };
                    let mine = IdempotencyRecord::for_append(key.clone(), A::TYPE, id, version, 0);
                    let stored = self
                        .store
                        .put_idempotency_record(mine.clone())
                        .await
                        .map_err(CommandError::Store)?;
                    // Backends may round timestamps: compare what the response is made of.
                    let same = stored.key.fingerprint == mine.key.fingerprint
                        && stored.aggregate_id == mine.aggregate_id
                        && stored.event_count == 0
                        && stored.version == version;
                    if same {
                        return Ok((outcome, false));
                    }
                    return Ok((self.replay_record::<A>(key, stored).await?, true));
                }
                let new: Vec<NewEvent> = events
                    .into_iter()
                    .enumerate()
                    .map(|(i, event)| NewEvent {
                        event_id: Uuid::new_v4(),
                        aggregate_type: A::TYPE.to_string(),
                        aggregate_id: id,
                        sequence: version + 1 + i as u64,
                        event,
                        metadata: meta.metadata(),
                    })
                    .collect();
                let appended = match key {
                    None => self.store.append(A::TYPE, id, version, new).await,
                    Some(k) => {
                        self.store
                            .append_idempotent(A::TYPE, id, version, new, k.clone())
                            .await
                    }
                };
                match appended {
                    Ok(committed) => {
                        let new_version = committed.last().map(|e| e.sequence).unwrap_or(version);
                        // `state` has applied the new events (EventSink::write applies them).
                        self.cache.put(A::TYPE, id, state, new_version);
                        metrics::counter!("tektree_commands_total", "aggregate" => A::TYPE, "result" => "committed").increment(1);
                        return Ok((
                            Outcome {
                                aggregate_type: A::TYPE,
                                aggregate_id: id,
                                events: committed,
                                version: new_version,
                            },
                            false,
                        ));
                    }
                    Err(e @ StoreError::IdempotencyKeyExists { .. }) => {
                        let Some(key) = key else {
                            return Err(CommandError::Store(e));
                        };
                        return match self.replay_idempotent::<A>(key).await? {
                            Some(outcome) => Ok((outcome, true)),
                            // The winner's record expired in between: treat as a conflict.
                            None => Err(CommandError::Conflict {
                                aggregate: format!("{}/{id}", A::TYPE),
                                attempts: attempt,
                            }),
                        };
                    }
                    Err(StoreError::Conflict { .. }) => {
                        tracing::debug!(attempt, "expected-version conflict; retrying");
                        metrics::counter!("tektree_command_conflicts_total", "aggregate" => A::TYPE).increment(1);
                        // Back off a little, growing with the attempt, to let the winner finish.
                        tokio::time::sleep(std::time::Duration::from_millis(
                            (attempt as u64) * (1 + rand_jitter(id, attempt)),
                        ))
                        .await;
                    }
                    Err(e) => return Err(CommandError::Store(e)),
                }
            }
            Err(CommandError::Conflict {
                aggregate: format!("{}/{id}", A::TYPE),
                attempts: self.max_attempts,
            })
        }
        .instrument(span)
        .await
    }
}

/// A cheap deterministic jitter of 0..=4 ms from the aggregate id and attempt (no RNG dependency).
fn rand_jitter(id: Uuid, attempt: u32) -> u64 {
    let b = id.as_bytes();
    (b[(attempt as usize) % 16] as u64 + std::process::id() as u64) % 5
}
