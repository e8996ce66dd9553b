//! Policies (process managers): react to committed events with further commands (issue #2 §4).
//!
//! Each policy is a consumer group on the bus (`policy.gamification`, `policy.subscription`).
//! Every command it issues is idempotent by the source event id (the target aggregate remembers
//! which sources it has handled), so a redelivered source event changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use tektree_domain::policy_rules::{metered_user, xp_awards};
use tektree_domain::{
    Actor, Event, EventEnvelope, GamificationRules, Profile, ProfileCommand, QuotaRules,
    Subscription, SubscriptionCommand, Tier, XpRules,
};

use crate::error::CommandError;
use crate::handler::{CommandHandler, CommandMeta};

/// A process manager reacting to one committed event at a time.
#[async_trait]
pub trait Policy: Send + Sync + 'static {
    /// Consumer-group and checkpoint name, e.g. `policy.gamification`.
    fn name(&self) -> &'static str;

    /// Issues the commands `event` calls for. Idempotent: reacting twice to the same envelope
    /// has the effect of reacting once.
    ///
    /// # Errors
    /// The first [`CommandError`]; the caller retries the event later.
    async fn react(&self, envelope: &EventEnvelope, event: &Event) -> Result<(), CommandError>;
}

/// Awards XP for knowledge activity, registration, unlocked achievements and completed quests
/// (`gamification.xp.earned`, `gamification.level.up`) with [`XpRules`], and records each
/// activity on the profile, which unlocks achievements, completes quests and reaches streak
/// milestones under [`GamificationRules`] (issue #6).
pub struct Gamification {
    handler: CommandHandler,
    rules: XpRules,
    goals: GamificationRules,
}

impl Gamification {
    /// The policy with `rules` and `goals`.
    pub fn new(handler: CommandHandler, rules: XpRules, goals: GamificationRules) -> Self {
        Gamification {
            handler,
            rules,
            goals,
        }
    }
}

#[async_trait]
impl Policy for Gamification {
    fn name(&self) -> &'static str {
        "policy.gamification"
    }

    async fn react(&self, envelope: &EventEnvelope, event: &Event) -> Result<(), CommandError> {
        let meta = CommandMeta::caused_by(envelope, Actor::System(self.name().into()));
        for award in xp_awards(&self.rules, event) {
            let cmd = ProfileCommand::AwardXp {
                user_id: award.user_id,
                amount: award.amount,
                source_event_id: envelope.event_id,
                source_event_type: envelope.event_type.clone(),
                source_occurred_at: envelope.occurred_at,
                tags: award.tags,
                area_id: award.area_id,
                activity: award.activity,
            };
            self.handler
                .submit::<Profile>(award.user_id, cmd, &self.goals, &meta, None)
                .await?;
        }
        Ok(())
    }
}

/// Opens a Free subscription on registration and meters questions, answers and comments against
/// the author's tier (`payment.usage.recorded`, `payment.quota.exceeded`) with [`QuotaRules`].
pub struct Metering {
    handler: CommandHandler,
    rules: QuotaRules,
}

impl Metering {
    /// The policy with `rules`.
    pub fn new(handler: CommandHandler, rules: QuotaRules) -> Self {
        Metering { handler, rules }
    }
}

#[async_trait]
impl Policy for Metering {
    fn name(&self) -> &'static str {
        "policy.subscription"
    }

    async fn react(&self, envelope: &EventEnvelope, event: &Event) -> Result<(), CommandError> {
        let meta = CommandMeta::caused_by(envelope, Actor::System(self.name().into()));
        if let Event::UserRegistered(e) = event {
            let cmd = SubscriptionCommand::Open {
                user_id: e.user_id,
                tier: Tier::Free,
            };
            self.handler
                .submit::<Subscription>(e.user_id, cmd, &self.rules, &meta, None)
                .await?;
        }
        if let Some(user_id) = metered_user(event) {
            let cmd = SubscriptionCommand::RecordUsage {
                user_id,
                source_event_id: envelope.event_id,
                source_event_type: envelope.event_type.clone(),
                occurred_at: envelope.occurred_at,
            };
            self.handler
                .submit::<Subscription>(user_id, cmd, &self.rules, &meta, None)
                .await?;
        }
        Ok(())
    }
}

/// Both policies with `rules`, as trait objects.
pub fn all(handler: &CommandHandler, rules: &tektree_domain::Rules) -> Vec<Arc<dyn Policy>> {
    vec![
        Arc::new(Gamification::new(
            handler.clone(),
            rules.xp.clone(),
            rules.gamification.clone(),
        )),
        Arc::new(Metering::new(handler.clone(), rules.quota.clone())),
    ]
}
