use uuid::Uuid;

/// Errors of an [`crate::EventStore`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency failure: the aggregate is at `actual`, not `expected`.
    #[error(
        "expected version {expected} of {aggregate_type}/{aggregate_id}, but it is at {actual}"
    )]
    Conflict {
        /// Aggregate type.
        aggregate_type: String,
        /// Aggregate id.
        aggregate_id: Uuid,
        /// The version the writer expected.
        expected: u64,
        /// The version found (may be unknown = `expected + 1` when the backend only reports a
        /// duplicate key).
        actual: u64,
    },
    /// A stored row could not be decoded (corrupt or from a newer build).
    #[error("corrupt stored event at position {position}: {reason}")]
    Corrupt {
        /// Where.
        position: u64,
        /// Why.
        reason: String,
    },
    /// A live idempotency record with this key is already stored (another request with the
    /// same `Idempotency-Key` committed first); nothing was written.
    #[error("idempotency key {key:?} is already recorded")]
    IdempotencyKeyExists {
        /// The scope-qualified key.
        key: String,
    },
    /// The storage backend failed (I/O, lock timeout, connection). Retryable by the caller.
    #[error("event store backend: {0}")]
    Backend(String),
}
