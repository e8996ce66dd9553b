//! The `subscription` aggregate: a user's tier and monthly usage metering.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::events::{
    Event, InvoicePaid, QuotaExceeded, SubscriptionCancelled, SubscriptionCreated,
    SubscriptionTierChanged, UsageRecorded,
};
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
    /// Invoices already recorded paid.
    pub invoices: BTreeSet<String>,
    /// The billing provider's id of the current paid subscription, if any.
    pub polar_subscription_id: Option<String>,
    /// The newest Polar event `timestamp` that changed the tier; older tier changes and
    /// cancellations are stale and ignored.
    pub polar_event_at: Option<DateTime<Utc>>,
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
    /// Move to `tier` (from the billing provider). Emits `payment.subscription.upgraded` or
    /// `.downgraded` by the order Free < Pro < Team < Enterprise; the tier in force is a
    /// no-op. A subscription not yet opened counts as Free. A change whose `polar_event_at` is
    /// older than that of the last tier change or cancellation is stale (a webhook delivered
    /// out of order) and a no-op.
    ChangeTier {
        /// Subscriber (= aggregate id).
        user_id: Uuid,
        /// New tier.
        tier: Tier,
        /// The provider's subscription id.
        polar_subscription_id: Option<String>,
        /// The provider event's `timestamp`, if the change comes from one.
        polar_event_at: Option<DateTime<Utc>>,
    },
    /// End the paid subscription: back to Free (`payment.subscription.cancelled`). A no-op on
    /// Free, and when stale (as for `ChangeTier`).
    Cancel {
        /// Subscriber (= aggregate id).
        user_id: Uuid,
        /// The provider's subscription id.
        polar_subscription_id: Option<String>,
        /// The provider event's `timestamp`, if the cancellation comes from one.
        polar_event_at: Option<DateTime<Utc>>,
    },
    /// Record a paid invoice (`payment.invoice.paid`); a repeated `invoice_id` is a no-op.
    RecordInvoicePaid {
        /// Subscriber (= aggregate id).
        user_id: Uuid,
        /// The provider's order / invoice id, 1..=200 characters.
        invoice_id: String,
        /// Amount in the currency's minor unit.
        amount_minor: u64,
        /// ISO 4217 code (normalised to lower case; 3 letters).
        currency: String,
    },
}

/// The metering period of an instant: its UTC calendar month, `YYYY-MM`.
pub fn period_of(t: DateTime<Utc>) -> String {
    t.format("%Y-%m").to_string()
}

impl Subscription {
    /// Whether a provider event at `at` is older than the last one that changed the tier.
    fn is_stale(&self, at: Option<DateTime<Utc>>) -> bool {
        matches!((at, self.polar_event_at), (Some(at), Some(last)) if at < last)
    }

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
            SubscriptionCommand::ChangeTier {
                user_id,
                tier,
                polar_subscription_id,
                polar_event_at,
            } => {
                if self.is_stale(polar_event_at) {
                    return Ok(());
                }
                let from = self.tier.unwrap_or_default();
                let e = SubscriptionTierChanged {
                    user_id,
                    from,
                    to: tier,
                    polar_subscription_id,
                    polar_event_at,
                };
                match tier.cmp(&from) {
                    std::cmp::Ordering::Equal => {}
                    std::cmp::Ordering::Greater => {
                        sink.write(Event::SubscriptionUpgraded(e), self).await
                    }
                    std::cmp::Ordering::Less => {
                        sink.write(Event::SubscriptionDowngraded(e), self).await
                    }
                }
            }
            SubscriptionCommand::Cancel {
                user_id,
                polar_subscription_id,
                polar_event_at,
            } => {
                let from = self.tier.unwrap_or_default();
                if from != Tier::Free && !self.is_stale(polar_event_at) {
                    let e = SubscriptionCancelled {
                        user_id,
                        from,
                        polar_subscription_id,
                        polar_event_at,
                    };
                    sink.write(Event::SubscriptionCancelled(e), self).await;
                }
            }
            SubscriptionCommand::RecordInvoicePaid {
                user_id,
                invoice_id,
                amount_minor,
                currency,
            } => {
                if invoice_id.is_empty() || invoice_id.chars().count() > 200 {
                    return Err(DomainError::Invalid(
                        "invoice_id must be 1..=200 characters".into(),
                    ));
                }
                let currency = currency.to_ascii_lowercase();
                if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_lowercase()) {
                    return Err(DomainError::Invalid(format!(
                        "currency {currency:?} must be an ISO 4217 code"
                    )));
                }
                if !self.invoices.contains(&invoice_id) {
                    let e = InvoicePaid {
                        user_id,
                        invoice_id,
                        amount_minor,
                        currency,
                        tier: self.tier.unwrap_or_default(),
                    };
                    sink.write(Event::InvoicePaid(e), self).await;
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
            Event::SubscriptionUpgraded(e) | Event::SubscriptionDowngraded(e) => {
                self.tier = Some(e.to);
                if e.polar_subscription_id.is_some() {
                    self.polar_subscription_id = e.polar_subscription_id;
                }
                self.polar_event_at = self.polar_event_at.max(e.polar_event_at);
            }
            Event::SubscriptionCancelled(e) => {
                self.tier = Some(Tier::Free);
                self.polar_subscription_id = None;
                self.polar_event_at = self.polar_event_at.max(e.polar_event_at);
            }
            Event::InvoicePaid(e) => {
                self.invoices.insert(e.invoice_id);
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

    #[test]
    fn tier_changes_go_up_and_down_in_tier_order_and_cancel_returns_to_free() {
        let u = Uuid::new_v4();
        let created = Event::SubscriptionCreated(SubscriptionCreated {
            user_id: u,
            tier: Tier::Free,
        });
        let change = |tier| SubscriptionCommand::ChangeTier {
            user_id: u,
            tier,
            polar_subscription_id: Some("sub_1".into()),
            polar_event_at: None,
        };
        let changed = |from, to| SubscriptionTierChanged {
            user_id: u,
            from,
            to,
            polar_subscription_id: Some("sub_1".into()),
            polar_event_at: None,
        };
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(vec![created.clone()])
            .when(change(Tier::Team))
            .then_expect_events(vec![Event::SubscriptionUpgraded(changed(
                Tier::Free,
                Tier::Team,
            ))]);
        let on_team = vec![
            created.clone(),
            Event::SubscriptionUpgraded(changed(Tier::Free, Tier::Team)),
        ];
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(on_team.clone())
            .when(change(Tier::Pro))
            .then_expect_events(vec![Event::SubscriptionDowngraded(changed(
                Tier::Team,
                Tier::Pro,
            ))]);
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(on_team.clone())
            .when(change(Tier::Team))
            .then_expect_events(vec![]);
        let cancel = || SubscriptionCommand::Cancel {
            user_id: u,
            polar_subscription_id: None,
            polar_event_at: None,
        };
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(on_team)
            .when(cancel())
            .then_expect_events(vec![Event::SubscriptionCancelled(SubscriptionCancelled {
                user_id: u,
                from: Tier::Team,
                polar_subscription_id: None,
                polar_event_at: None,
            })]);
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(vec![created])
            .when(cancel())
            .then_expect_events(vec![]);
    }

    #[test]
    fn an_invoice_is_recorded_once_and_bad_currency_is_refused() {
        let u = Uuid::new_v4();
        let pay = |currency: &str| SubscriptionCommand::RecordInvoicePaid {
            user_id: u,
            invoice_id: "ord_1".into(),
            amount_minor: 1900,
            currency: currency.into(),
        };
        let paid = Event::InvoicePaid(InvoicePaid {
            user_id: u,
            invoice_id: "ord_1".into(),
            amount_minor: 1900,
            currency: "usd".into(),
            tier: Tier::Free,
        });
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given_no_previous_events()
            .when(pay("USD"))
            .then_expect_events(vec![paid.clone()]);
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(vec![paid])
            .when(pay("usd"))
            .then_expect_events(vec![]);
        let r = TestFramework::<Subscription>::with(QuotaRules::default())
            .given_no_previous_events()
            .when(pay("dollars"))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "invalid");
    }

    #[test]
    fn a_provider_event_older_than_the_last_tier_change_is_ignored() {
        let u = Uuid::new_v4();
        let t = |s: &str| Some(s.parse::<DateTime<Utc>>().unwrap());
        let team_at_t2 = Event::SubscriptionUpgraded(SubscriptionTierChanged {
            user_id: u,
            from: Tier::Free,
            to: Tier::Team,
            polar_subscription_id: Some("sub_1".into()),
            polar_event_at: t("2025-01-02T00:00:00Z"),
        });
        // An older `subscription.updated` (to Pro) and an older cancellation arrive late.
        let change = |at| SubscriptionCommand::ChangeTier {
            user_id: u,
            tier: Tier::Pro,
            polar_subscription_id: Some("sub_1".into()),
            polar_event_at: at,
        };
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(vec![team_at_t2.clone()])
            .when(change(t("2025-01-01T00:00:00Z")))
            .then_expect_events(vec![]);
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(vec![team_at_t2.clone()])
            .when(SubscriptionCommand::Cancel {
                user_id: u,
                polar_subscription_id: Some("sub_1".into()),
                polar_event_at: t("2025-01-01T00:00:00Z"),
            })
            .then_expect_events(vec![]);
        // A newer one applies.
        TestFramework::<Subscription>::with(QuotaRules::default())
            .given(vec![team_at_t2])
            .when(change(t("2025-01-03T00:00:00Z")))
            .then_expect_events(vec![Event::SubscriptionDowngraded(
                SubscriptionTierChanged {
                    user_id: u,
                    from: Tier::Team,
                    to: Tier::Pro,
                    polar_subscription_id: Some("sub_1".into()),
                    polar_event_at: t("2025-01-03T00:00:00Z"),
                },
            )]);
    }
}
