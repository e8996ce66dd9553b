//! One abstraction for every consumer of the bus: the four projections, the two policies and
//! the live feed.
//!
//! A [`Consumer`] is a name (its consumer group, checkpoint and sequence-guard name) and a
//! handler from one committed event to the read-model [`Change`]s to commit with the event's
//! guard (a projection's changes; none for a policy or the live feed, which act on their own
//! and only record the event). A handler fails with a [`Failure`]: [`Failure::Transient`]
//! (storage, bus, a version conflict: retried with backoff for as long as it lasts) or
//! [`Failure::Poison`] (retrying cannot fix it: dead-lettered after `max_deliver` attempts).
//! The worker runtime ([`crate::worker`]) runs every consumer the same way.

use std::sync::Arc;

use async_trait::async_trait;
use tektree_commands::policies::Policy;
use tektree_commands::CommandError;
use tektree_domain::{Event, EventEnvelope};
use tektree_projections::{project, Change, Projection};
use tracing::Instrument;

/// Why a consumer could not handle an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// May pass (storage, bus, a version conflict): retried with backoff, never dead-lettered.
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying cannot fix it (a rejected command, an undecodable payload): dead-lettered after
    /// the worker's `max_deliver` attempts.
    #[error("poison: {0}")]
    Poison(String),
}

/// A consumer of committed events (module docs).
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Consumer-group, checkpoint and guard name, e.g. `xp` or `policy.gamification`.
    fn name(&self) -> &str;

    /// Handles one event; returns the read-model changes to commit with its guard.
    ///
    /// # Errors
    /// [`Failure`]; nothing of the event is recorded.
    async fn handle(&self, envelope: &EventEnvelope, event: &Event)
        -> Result<Vec<Change>, Failure>;
}

/// A projection is a consumer whose handler is [`project`] (pure: never fails).
#[async_trait]
impl Consumer for Projection {
    fn name(&self) -> &str {
        Projection::name(*self)
    }

    async fn handle(
        &self,
        envelope: &EventEnvelope,
        event: &Event,
    ) -> Result<Vec<Change>, Failure> {
        Ok(project(*self, envelope, event))
    }
}

/// A policy as a consumer: it issues its commands and records the event. A rejected command
/// or an undecodable aggregate is poison; every other command error is transient.
pub struct PolicyConsumer(pub Arc<dyn Policy>);

impl From<CommandError> for Failure {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Rejected(_) | CommandError::Decode { .. } => {
                Failure::Poison(format!("policy command: {e}"))
            }
            e => Failure::Transient(format!("policy command: {e}")),
        }
    }
}

#[async_trait]
impl Consumer for PolicyConsumer {
    fn name(&self) -> &str {
        self.0.name()
    }

    async fn handle(
        &self,
        envelope: &EventEnvelope,
        event: &Event,
    ) -> Result<Vec<Change>, Failure> {
        let span = tracing::info_span!("policy", policy = self.0.name(),
            event_id = %envelope.event_id, correlation_id = %envelope.correlation_id,
            causation_id = %envelope.causation_id);
        self.0.react(envelope, event).instrument(span).await?;
        Ok(vec![])
    }
}

/// `projection` as a shared consumer.
pub fn projection(projection: Projection) -> Arc<dyn Consumer> {
    Arc::new(projection)
}

/// `policy` as a shared consumer.
pub fn policy(policy: Arc<dyn Policy>) -> Arc<dyn Consumer> {
    Arc::new(PolicyConsumer(policy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tektree_domain::DomainError;
    use tektree_event_store::StoreError;

    #[test]
    fn rejected_and_undecodable_are_poison_the_rest_transient() {
        let poison = Failure::from(CommandError::Rejected(DomainError::Invalid(
            "empty title".into(),
        )));
        assert!(matches!(poison, Failure::Poison(_)), "{poison:?}");
        let transient = Failure::from(CommandError::Store(StoreError::Backend("down".into())));
        assert!(matches!(transient, Failure::Transient(_)), "{transient:?}");
    }
}
