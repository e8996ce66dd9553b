use tektree_domain::events::DecodeError;
use tektree_domain::DomainError;
use tektree_event_store::StoreError;

/// Why a command did not commit. In every case nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The aggregate refused the command (validation, missing reference, rule violation).
    #[error(transparent)]
    Rejected(#[from] DomainError),
    /// Expected-version conflicts persisted through every attempt.
    #[error("expected-version conflict on {aggregate} after {attempts} attempts")]
    Conflict {
        /// `type/id` of the contended aggregate.
        aggregate: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A stored event of the aggregate could not be decoded.
    #[error("stored event {event_id} does not decode: {source}")]
    Decode {
        /// The event.
        event_id: uuid::Uuid,
        /// Why.
        source: DecodeError,
    },
    /// The request's `Idempotency-Key` was first used for a different request (another
    /// fingerprint) and is still live.
    #[error("idempotency key {key:?} was used for a different request")]
    IdempotencyKeyReused {
        /// The scope-qualified key.
        key: String,
    },
    /// A user's metered post over their monthly quota ([`crate::submit`]).
    #[error(transparent)]
    QuotaExceeded(#[from] crate::submit::QuotaExceeded),
    /// The event store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl CommandError {
    /// Stable reason code: the [`DomainError::code`] for rejections, else `conflict`,
    /// `decode`, `idempotency_key_reused`, `quota_exceeded` or `store`.
    pub fn code(&self) -> String {
        match self {
            CommandError::Rejected(e) => e.code(),
            CommandError::Conflict { .. } => "conflict".into(),
            CommandError::Decode { .. } => "decode".into(),
            CommandError::IdempotencyKeyReused { .. } => "idempotency_key_reused".into(),
            CommandError::QuotaExceeded(_) => "quota_exceeded".into(),
            CommandError::Store(_) => "store".into(),
        }
    }
}
