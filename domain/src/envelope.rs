//! The stored event envelope (issue #2 §1).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::actor::Actor;
use crate::events::{DecodeError, Event};

/// Correlation data carried from a command to every event it causes (and on through policies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Domain time of the fact (for imports: the dump's date).
    pub occurred_at: DateTime<Utc>,
    /// Shared by every event of one business transaction (an HTTP request and all policy
    /// reactions to it). From the `X-Correlation-Id` header, else new.
    pub correlation_id: Uuid,
    /// What directly caused the event: the command id, or for policy commands the source
    /// event's `event_id`.
    pub causation_id: Uuid,
    /// Who issued the command.
    pub actor: Actor,
}

/// An event produced by a command, before the store assigns `position` and `recorded_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id (UUIDv4).
    pub event_id: Uuid,
    /// `user`, `content`, `profile` or `subscription`.
    pub aggregate_type: String,
    /// The aggregate instance.
    pub aggregate_id: Uuid,
    /// Per-aggregate sequence, from 1, contiguous.
    pub sequence: u64,
    /// The domain event.
    pub event: Event,
    /// Correlation data.
    pub metadata: EventMetadata,
}

/// A committed event, as read from the store and published on the bus.
///
/// JSON shape (bus messages, `tektree-replay events`):
/// `{"event_id","event_type","event_version","aggregate_type","aggregate_id","sequence",
/// "position","occurred_at","recorded_at","correlation_id","causation_id","actor","payload"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventEnvelope {
    /// Unique id (UUID).
    pub event_id: Uuid,
    /// Catalog name, e.g. `knowledge.question.posted`.
    pub event_type: String,
    /// Payload schema version (per type, see [`crate::events::CATALOG`]); older versions are
    /// upcast on read ([`crate::upcast`]).
    pub event_version: u32,
    /// `user`, `area`, `content`, `profile` or `subscription`.
    pub aggregate_type: String,
    /// The aggregate instance.
    pub aggregate_id: Uuid,
    /// Per-aggregate sequence, from 1, contiguous.
    pub sequence: u64,
    /// Global position: assigned by the store, strictly increasing in commit order, from 1.
    pub position: u64,
    /// Domain time.
    pub occurred_at: DateTime<Utc>,
    /// Commit time (store clock).
    pub recorded_at: DateTime<Utc>,
    /// See [`EventMetadata::correlation_id`].
    pub correlation_id: Uuid,
    /// See [`EventMetadata::causation_id`].
    pub causation_id: Uuid,
    /// `user:<uuid>` or `system:<name>`.
    pub actor: Actor,
    /// The event's payload object.
    pub payload: serde_json::Value,
}

/// A committed event as a rebuild reads it: its key, type and version, and its payload as
/// the JSON text the store holds (not parsed, not upcast), without the envelope's metadata.
/// [`StoredEvent::decode`] reads it into an [`Event`] without building a
/// `serde_json::Value` (issue #14: a rebuild decodes every stored event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Global position.
    pub position: u64,
    /// `user`, `area`, `content`, `profile` or `subscription`.
    pub aggregate_type: String,
    /// The aggregate instance.
    pub aggregate_id: Uuid,
    /// Per-aggregate sequence.
    pub sequence: u64,
    /// Catalog name.
    pub event_type: String,
    /// Payload schema version as stored.
    pub event_version: u32,
    /// The payload object's JSON text, as stored.
    pub payload: String,
}

impl StoredEvent {
    /// The domain event, upcast to the current version of its type ([`Event::decode_str`]).
    ///
    /// # Errors
    /// [`DecodeError`] for an unknown type, an unsupported version or an invalid payload.
    pub fn decode(&self) -> Result<Event, DecodeError> {
        Event::decode_str(&self.event_type, self.event_version, &self.payload)
    }
}

impl From<&EventEnvelope> for StoredEvent {
    fn from(e: &EventEnvelope) -> Self {
        StoredEvent {
            position: e.position,
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id,
            sequence: e.sequence,
            event_type: e.event_type.clone(),
            event_version: e.event_version,
            payload: e.payload.to_string(),
        }
    }
}

impl NewEvent {
    /// The envelope this event gets once committed at `position` at `recorded_at`.
    pub fn into_envelope(self, position: u64, recorded_at: DateTime<Utc>) -> EventEnvelope {
        EventEnvelope {
            event_id: self.event_id,
            event_type: self.event.event_type().to_string(),
            event_version: self.event.event_version(),
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            position,
            occurred_at: self.metadata.occurred_at,
            recorded_at,
            correlation_id: self.metadata.correlation_id,
            causation_id: self.metadata.causation_id,
            actor: self.metadata.actor,
            payload: self.event.to_payload(),
        }
    }
}

impl EventEnvelope {
    /// Decodes the payload into a domain [`Event`].
    ///
    /// # Errors
    /// [`DecodeError`] for an unknown type, unsupported version or invalid payload.
    pub fn decode(&self) -> Result<Event, DecodeError> {
        Event::decode(&self.event_type, self.event_version, &self.payload)
    }

    /// This envelope with its payload upcast to the current version of its type (unchanged
    /// when it is current). The relay publishes and `tektree-replay events` prints upcast
    /// envelopes, so that consumers and operators only ever see current shapes.
    ///
    /// # Errors
    /// [`DecodeError`] for an unknown type or unsupported version.
    pub fn upcast(mut self) -> Result<EventEnvelope, DecodeError> {
        let payload = std::mem::take(&mut self.payload);
        let (version, payload) =
            crate::upcast::upcast(&self.event_type, self.event_version, payload)?;
        self.event_version = version;
        self.payload = payload;
        Ok(self)
    }

    /// Metadata to give events caused by this one (same correlation id, causation = this id).
    pub fn caused_metadata(&self, actor: Actor) -> EventMetadata {
        EventMetadata {
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id,
            causation_id: self.event_id,
            actor,
        }
    }
}
