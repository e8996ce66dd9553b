//! The `subscription` aggregate: a user's tier and monthly usage metering.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::events::{Event, QuotaExceeded, SubscriptionCreated, UsageRecorded};
use crate::rules::{QuotaRules, Tier};

/// One user's subscription. Aggregate type `subscription`, id = user id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// `None` until opened. Usage recorded before the subscription opened (possible because
    /// policies see different aggregates in any order) is metered against [`Tier::Free`].
    pub tier: Option<Tier>,
    /// Units used per `YYYY-MM`.
    pub used: BTreeMap<String, u64>,
    /// Periods whose `payment.quota.exceeded` was emitted.
    pub exceeded: BTreeSet<String>,
    /// Source events already metered.
    pub metered: BTreeSet<Uuid>,
}

/// Commands on [`Subscription`].
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionCommand {
    /// Open a subscription at `tier`; a no-op when one is open.
    Open {
        /// Subscriber (= aggregate id).
        user_id: Uuid,
        /// Tier.
        tier: Tier,
    },
    /// Meter one unit for `source_event_id` in the UTC month of `occurred_at`. A repeated source
    /// is a no-op. Emits `payment.usage.recorded`, and `payment.quota.exceeded` the first time
    /// usage passes the tier's limit in that month.
    RecordUsage {
        /// Subscriber (= aggregate id).
        user_id: Uuid,
        /// Metered event.
        source_event_id: Uuid,
        /// Its type.
        source_event_type: String,
        /// Its `occurred_at`.
        occurred_at: DateTime<Utc>,
    },
}

/// The metering period of an instant: its UTC calendar month, `YYYY-MM`.
pub fn period_of(t: DateTime<Utc>) -> String {
    t.format("%Y-%m").to_string()
}

impl Subscription {
    /// Units used in `period`.
    pub fn used_in(&self, period: &str) -> u64 {
        self.used.get(period).copied().unwrap_or(0)
    }
}

impl Aggregate for Subscription {
    const TYPE: &'static str = "subscription";
    type Command = SubscriptionCommand;
    type Event = Event;
    type Error = DomainError;
    type Services = QuotaRules;

    async fn handle(
        &mut self,
        command: SubscriptionCommand,
        rules: &QuotaRules,
        sink: &EventSink<Self>,
    ) -> Result<(), DomainError> {
        match command {
            SubscriptionCommand::Open { user_id, tier } => {
                if self.tier.is_none() {
                    let e = SubscriptionCreated { user_id, tier };
                    sink.write(Event::SubscriptionCreated(e), self).await;
                }
            }
            SubscriptionCommand::RecordUsage {
                user_id,
                source_event_id,
                source_event_type,
                occurred_at,
            } => {
                if self.metered.contains(&source_event_id) {
                    return Ok(());
                }
                let tier = self.tier.unwrap_or_default();
                let period = period_of(occurred_at);
                let used = self.used_in(&period) + 1;
                let limit = rules.limit(tier);
                let e = UsageRecorded {
                    user_id,
                    period: period.clone(),
                    source_event_id,
                    source_event_type,
                    tier,
                    used,
                    limit,
                };
                sink.write(Event::UsageRecorded(e), self).await;
                if let Some(limit) = limit {
                    if used > limit && !self.exceeded.contains(&period) {
                        let e = QuotaExceeded {
                            user_id,
                            period,
                            tier,
                            used,
                            limit,
                        };
                        sink.write(Event::QuotaExceeded(e), self).await;
                    }
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::SubscriptionCreated(e) => self.tier = Some(e.tier),
            Event::UsageRecorded(e) => {
                self.used.insert(e.period, e.used);
                self.metered.insert(e.source_event_id);
            }
            Event::QuotaExceeded(e) => {
                self.exceeded.insert(e.period);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn usage(u: Uuid, src: Uuid, used: u64, limit: Option<u64>) -> Event {
        Event::UsageRecorded(UsageRecorded {
            user_id: u,
            period: "2023-11".into(),
            source_event_id: src,
            source_event_type: "knowledge.comment.added".into(),
            tier: Tier::Free,
            used,
            limit,
        })
    }

    fn record(u: Uuid, src: Uuid) -> SubscriptionCommand {
        SubscriptionCommand::RecordUsage {
            user_id: u,
            source_event_id: src,
            source_event_type: "knowledge.comment.added".into(),
            occurred_at: "2023-11-30T23:59:59Z".parse().unwrap(),
        }
    }

    #[test]
    fn crossing_the_limit_emits_quota_exceeded_once_per_period() {
        let rules = QuotaRules {
            free: Some(1),
            ..Default::default()
        };
        let u = Uuid::new_v4();
        let (s1, s2, s3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        TestFramework::<Subscription>::with(rules.clone())
            .given(vec![usage(u, s1, 1, Some(1))])
            .when(record(u, s2))
            .then_expect_events(vec![
                usage(u, s2, 2, Some(1)),
                Event::QuotaExceeded(QuotaExceeded {
                    user_id: u,
                    period: "2023-11".into(),
                    tier: Tier::Free,
                    used: 2,
                    limit: 1,
                }),
            ]);
        let exceeded = Event::QuotaExceeded(QuotaExceeded {
            user_id: u,
            period: "2023-11".into(),
            tier: Tier::Free,
            used: 2,
            limit: 1,
        });
        TestFramework::<Subscription>::with(rules.clone())
            .given(vec![
                usage(u, s1, 1, Some(1)),
                usage(u, s2, 2, Some(1)),
                exceeded,
            ])
            .when(record(u, s3))
            .then_expect_events(vec![usage(u, s3, 3, Some(1))]);
        // The same source metered twice counts once.
        TestFramework::<Subscription>::with(rules)
            .given(vec![usage(u, s1, 1, Some(1))])
            .when(record(u, s1))
            .then_expect_events(vec![]);
    }

    #[test]
    fn open_is_idempotent_and_period_is_the_utc_month() {
        let u = Uuid::new_v4();
        let created = Event::SubscriptionCreated(SubscriptionCreated {
            user_id: u,
            tier: Tier::Free,
        });
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(vec![created])
            .when(SubscriptionCommand::Open {
                user_id: u,
                tier: Tier::Free,
            })
            .then_expect_events(vec![]);
        assert_eq!(
            period_of("2024-01-01T00:30:00+01:00".parse().unwrap()),
            "2023-12"
        );
    }
}
