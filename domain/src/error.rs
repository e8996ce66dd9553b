//! The one error type of every aggregate's command handling.

use uuid::Uuid;

/// Why an aggregate refused a command. Nothing is written when a command is refused.
///
/// HTTP mapping (services): `Invalid` → 422, `NotFound` → 404, `Conflict` → 409,
/// `Forbidden` → 403, `Lookup` → 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A field is out of range or malformed.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// A referenced entity does not exist. `what` is `question`, `content`, `answer` or `user`.
    #[error("{what} {id} does not exist")]
    NotFound {
        /// Kind of the missing entity.
        what: &'static str,
        /// Its id.
        id: Uuid,
    },
    /// The command contradicts the aggregate's state (already exists with other data, answer
    /// already accepted, answer belongs to another question).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The actor may not do this (for example accepting on someone else's question).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A cross-aggregate lookup failed (storage error); retryable.
    #[error("lookup failed: {0}")]
    Lookup(String),
}

impl DomainError {
    /// Stable reason code for counters and problem+json `type` suffixes, e.g.
    /// `not_found.question`, `invalid`, `conflict`, `forbidden`, `lookup`.
    pub fn code(&self) -> String {
        match self {
            DomainError::Invalid(_) => "invalid".into(),
            DomainError::NotFound { what, .. } => format!("not_found.{what}"),
            DomainError::Conflict(_) => "conflict".into(),
            DomainError::Forbidden(_) => "forbidden".into(),
            DomainError::Lookup(_) => "lookup".into(),
        }
    }
}
