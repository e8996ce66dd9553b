//! The one path of every command (HTTP, importer, Polar webhooks, policies): replay an
//! idempotent request, refuse a post over its author's monthly quota, run the command.
//!
//! [`CommandHandler::submit`] does, in order:
//! 1. with an idempotency key that was used before: the first outcome, nothing written
//!    ([`CommandHandler::replay_idempotent`]; before the quota check, so that the retry of a
//!    committed post is never refused);
//! 2. for a command a **user** sends that creates a metered post ([`Metering`]): the quota
//!    check ([`CommandHandler::check_quota`]). System actors (importer, policies, webhooks) are
//!    metered by `policy.subscription` but never refused (issue #2 §4);
//! 3. the command ([`CommandHandler::execute`], or [`CommandHandler::execute_idempotent`] with
//!    a key).
//!
//! The tier is read in one place, [`CommandHandler::tier_of`]: the user's `subscription`
//! aggregate, so an upgrade or a cancellation applies at once (issue #6).

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use cqrs_es::Aggregate;
use tektree_domain::{
    period_of, Actor, AreaCommand, Content, ContentCommand, DomainError, Event, ProfileCommand,
    QuotaRules, Subscription, SubscriptionCommand, Tier, UserCommand,
};
use tektree_event_store::IdempotencyKey;
use uuid::Uuid;

use crate::error::CommandError;
use crate::handler::{CommandHandler, CommandMeta, Outcome};

/// What a metered command creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    /// A question, answer, discussion, insight or resource with this id.
    Post(Uuid),
    /// A comment `comment_id` on content `content_id`.
    Comment {
        /// The commented content.
        content_id: Uuid,
        /// The comment.
        comment_id: Uuid,
    },
}

/// Which commands count against their author's monthly quota: the same posts
/// `policy.subscription` meters (`tektree_domain::policy_rules::metered_user`).
pub trait Metering {
    /// `(author, what it creates)` for a metered command with an author; `None` otherwise.
    fn metered(&self) -> Option<(Uuid, Metered)>;
}

impl Metering for ContentCommand {
    fn metered(&self) -> Option<(Uuid, Metered)> {
        let post = |author: &Option<Uuid>, id: &Uuid| author.map(|a| (a, Metered::Post(*id)));
        match self {
            ContentCommand::PostQuestion {
                question_id: id,
                author_id,
                ..
            }
            | ContentCommand::StartDiscussion {
                discussion_id: id,
                author_id,
                ..
            }
            | ContentCommand::ShareInsight {
                insight_id: id,
                author_id,
                ..
            }
            | ContentCommand::UploadResource {
                resource_id: id,
                author_id,
                ..
            }
            | ContentCommand::SubmitAnswer {
                answer_id: id,
                author_id,
                ..
            } => post(author_id, id),
            ContentCommand::AddComment {
                content_id,
                comment_id,
                author_id,
                ..
            } => author_id.map(|a| {
                (
                    a,
                    Metered::Comment {
                        content_id: *content_id,
                        comment_id: *comment_id,
                    },
                )
            }),
            _ => None,
        }
    }
}

/// Commands of these aggregates are never metered.
macro_rules! not_metered {
    ($($t:ty),*) => {$(
        impl Metering for $t {
            fn metered(&self) -> Option<(Uuid, Metered)> {
                None
            }
        }
    )*};
}
not_metered!(
    UserCommand,
    ProfileCommand,
    SubscriptionCommand,
    AreaCommand
);

/// A metered command refused because its author used the month's quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "user {user} used {used} of {limit} units in {period} ({} tier); the quota resets at the start of the next UTC month",
    tier.as_str()
)]
pub struct QuotaExceeded {
    /// The author.
    pub user: Uuid,
    /// Units metered in `period`.
    pub used: u64,
    /// The tier's limit.
    pub limit: u64,
    /// `YYYY-MM` (UTC) of the command's time.
    pub period: String,
    /// The author's tier.
    pub tier: Tier,
    /// Seconds until the next UTC month (at least 1): HTTP's `Retry-After`.
    pub retry_after_secs: u64,
}

/// Seconds from `now` until the start of the next UTC calendar month (at least 1).
pub fn seconds_until_next_month(now: DateTime<Utc>) -> u64 {
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let next = NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(now);
    let ms = (next - now).num_milliseconds().max(0) as u64;
    ms.div_ceil(1000).max(1)
}

impl CommandHandler {
    /// Runs `command` on `A`/`id` the way every entry point must (module docs): replay with
    /// `key`, quota check for a user's metered post under the handler's
    /// [quota rules](CommandHandler::with_quota_rules), then the command. The `bool` is `true`
    /// for a replayed outcome.
    ///
    /// # Errors
    /// As [`CommandHandler::execute_idempotent`]; [`CommandError::QuotaExceeded`] for a
    /// user's post over the quota (nothing written).
    pub async fn submit<A>(
        &self,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
        key: Option<&IdempotencyKey>,
    ) -> Result<(Outcome, bool), CommandError>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone + Metering,
    {
        if let Some(k) = key {
            if let Some(outcome) = self.replay_idempotent::<A>(k).await? {
                return Ok((outcome, true));
            }
        }
        if let (Actor::User(_), Some((author, what))) = (&meta.actor, command.metered()) {
            self.check_quota(self.quota_rules(), author, meta.occurred_at, what)
                .await?;
        }
        // The key was replayed above: run the command directly (execute_idempotent would look
        // the key up a second time).
        self.run::<A>(id, command, services, meta, key).await
    }

    /// `user`'s current tier: their `subscription` aggregate's, Free when they have none. The
    /// one source of the tier for quotas and rate limits.
    ///
    /// # Errors
    /// [`CommandError::Store`] / [`CommandError::Decode`] when the subscription cannot be
    /// loaded.
    pub async fn tier_of(&self, user: Uuid) -> Result<Tier, CommandError> {
        let (sub, _) = self.load::<Subscription>(user).await?;
        Ok(sub.tier.unwrap_or_default())
    }

    /// Refuses when `user`'s subscription has a limit under `quota` and the month of `now` has
    /// `used >= limit` metered units, unless `what` already exists (an exact repeat of a
    /// committed post creates nothing and is let through). Metering is done by
    /// `policy.subscription`, so `used` trails the store by that consumer's lag: a user can
    /// exceed the limit by at most their posts still in flight.
    ///
    /// # Errors
    /// [`CommandError::QuotaExceeded`] (counted in `tektree_quota_refusals_total`); store and
    /// decode errors of the loads.
    pub async fn check_quota(
        &self,
        quota: &QuotaRules,
        user: Uuid,
        now: DateTime<Utc>,
        what: Metered,
    ) -> Result<(), CommandError> {
        let period = period_of(now);
        let (sub, _) = self.load::<Subscription>(user).await?;
        let tier = sub.tier.unwrap_or_default();
        let Some(limit) = quota.limit(tier) else {
            return Ok(());
        };
        let used = sub.used_in(&period);
        if used < limit || self.already_committed(what).await? {
            return Ok(());
        }
        metrics::counter!("tektree_quota_refusals_total").increment(1);
        Err(CommandError::QuotaExceeded(QuotaExceeded {
            user,
            used,
            limit,
            period,
            tier,
            retry_after_secs: seconds_until_next_month(now),
        }))
    }

    async fn already_committed(&self, what: Metered) -> Result<bool, CommandError> {
        Ok(match what {
            Metered::Post(id) => self.load::<Content>(id).await?.0.kind.is_some(),
            Metered::Comment {
                content_id,
                comment_id,
            } => self
                .load::<Content>(content_id)
                .await?
                .0
                .comments
                .contains(&comment_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_counts_to_the_next_utc_month() {
        let t: DateTime<Utc> = "2024-12-31T23:59:30Z".parse().unwrap();
        assert_eq!(seconds_until_next_month(t), 30);
        let t: DateTime<Utc> = "2024-02-29T00:00:00Z".parse().unwrap();
        assert_eq!(seconds_until_next_month(t), 86_400);
        let t: DateTime<Utc> = "2024-03-31T23:59:59.500Z".parse().unwrap();
        assert_eq!(seconds_until_next_month(t), 1);
    }

    #[test]
    fn posts_and_comments_with_an_author_are_metered_votes_are_not() {
        let (a, q, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let question = ContentCommand::PostQuestion {
            question_id: q,
            author_id: Some(a),
            title: "t".into(),
            body: "b".into(),
            tags: vec![],
            area_id: None,
            actor: Actor::User(a),
        };
        assert_eq!(question.metered(), Some((a, Metered::Post(q))));
        let comment = ContentCommand::AddComment {
            content_id: q,
            comment_id: c,
            author_id: Some(a),
            text: "x".into(),
            actor: Actor::User(a),
        };
        assert_eq!(
            comment.metered(),
            Some((
                a,
                Metered::Comment {
                    content_id: q,
                    comment_id: c
                }
            ))
        );
        let ownerless = ContentCommand::SubmitAnswer {
            answer_id: c,
            question_id: q,
            author_id: None,
            body: "b".into(),
            actor: Actor::importer(),
        };
        assert_eq!(ownerless.metered(), None);
        let vote = ContentCommand::Vote {
            content_id: q,
            voter_id: a,
            direction: tektree_domain::VoteDirection::Up,
            actor: Actor::User(a),
        };
        assert_eq!(vote.metered(), None);
    }
}
