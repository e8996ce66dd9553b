//! Idempotency records: what a command request with an `Idempotency-Key` committed, so that a
//! retry of the same request returns the first response and appends nothing.
//!
//! A record is written **in the same transaction** as the events it describes
//! ([`IdempotencyStore::append_idempotent`](crate::IdempotencyStore::append_idempotent)), so a crash can
//! never leave events without their record or a record without its events. A command that
//! committed nothing (an idempotent repeat) is recorded on its own with
//! [`IdempotencyStore::put_idempotency_record`](crate::IdempotencyStore::put_idempotency_record).
//!
//! Keys expire: a record whose `expires_at` has passed is ignored and replaced by the next
//! request with its key (the HTTP layer sets 24 hours, see `docs/api.md`; the header follows
//! the IETF draft *The Idempotency-Key HTTP Header Field*).

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The key of one request, before the store knows what the request commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Scope-qualified key, unique per client: the HTTP layer uses
    /// `<caller user id>:<Idempotency-Key header>`. At most [`MAX_KEY_BYTES`] bytes.
    pub key: String,
    /// Fingerprint of the request (the HTTP layer: lowercase hex SHA-256 of route, path and
    /// body). A later request with the same key and another fingerprint is a misuse.
    pub fingerprint: String,
    /// When the first request was handled (store clock of the caller).
    pub created_at: DateTime<Utc>,
    /// From this instant on the record is ignored and may be replaced.
    pub expires_at: DateTime<Utc>,
}

/// Longest accepted scope-qualified key, in bytes (a UUID, a colon and a 255-byte header).
pub const MAX_KEY_BYTES: usize = 300;

/// What a keyed request committed: enough to rebuild its response from the stored events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The request's key, fingerprint and lifetime.
    pub key: IdempotencyKey,
    /// Aggregate type the command ran on.
    pub aggregate_type: String,
    /// Aggregate id the command ran on.
    pub aggregate_id: Uuid,
    /// Sequence of the first committed event (`version + 1` when `event_count` is 0).
    pub first_sequence: u64,
    /// Number of events the request committed (0 for a no-op).
    pub event_count: u64,
    /// Aggregate version after the request.
    pub version: u64,
}

impl IdempotencyRecord {
    /// The record of a batch of `event_count` events appended at `expected_version`.
    pub fn for_append(
        key: IdempotencyKey,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected_version: u64,
        event_count: u64,
    ) -> Self {
        IdempotencyRecord {
            key,
            aggregate_type: aggregate_type.to_string(),
            aggregate_id,
            first_sequence: expected_version + 1,
            event_count,
            version: expected_version + event_count,
        }
    }

    /// Whether the record is still in force at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        now < self.key.expires_at
    }
}
