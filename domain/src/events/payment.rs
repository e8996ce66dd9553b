//! Payloads of the `payment.*` events (aggregate `subscription`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::rules::Tier;

/// `payment.subscription.created`. Aggregate: `subscription` (id = user id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionCreated {
    /// Subscriber (= aggregate id).
    pub user_id: Uuid,
    /// Opening tier (Free on registration).
    pub tier: Tier,
}

/// `payment.subscription.upgraded` / `payment.subscription.downgraded`: the tier changed
/// (up or down in the order Free < Pro < Team < Enterprise). Aggregate: `subscription`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionTierChanged {
    /// Subscriber (= aggregate id).
    pub user_id: Uuid,
    /// Tier before.
    pub from: Tier,
    /// Tier after (≠ `from`).
    pub to: Tier,
    /// The billing provider's subscription id (Polar), if the change came from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polar_subscription_id: Option<String>,
    /// The `timestamp` of the Polar webhook event that caused the change, if any: older events
    /// delivered later are ignored (see `SubscriptionCommand::ChangeTier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polar_event_at: Option<DateTime<Utc>>,
}

/// `payment.subscription.cancelled`: the paid subscription ended; the user is back on Free.
/// Aggregate: `subscription`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionCancelled {
    /// Subscriber (= aggregate id).
    pub user_id: Uuid,
    /// The tier that ended (never Free).
    pub from: Tier,
    /// The billing provider's subscription id, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polar_subscription_id: Option<String>,
    /// The `timestamp` of the Polar webhook event that caused it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polar_event_at: Option<DateTime<Utc>>,
}

/// `payment.invoice.paid`: an invoice (Polar order) was paid; once per `invoice_id`.
/// Aggregate: `subscription`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvoicePaid {
    /// Subscriber (= aggregate id).
    pub user_id: Uuid,
    /// The provider's invoice / order id, 1..=200 characters.
    pub invoice_id: String,
    /// Amount paid in the currency's minor unit (cents for USD).
    pub amount_minor: u64,
    /// ISO 4217 currency code, lower case (e.g. `usd`).
    pub currency: String,
    /// Tier in force when paid.
    pub tier: Tier,
}

/// `payment.usage.recorded`: one metered question, answer or comment. Aggregate: `subscription`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRecorded {
    /// Subscriber (= aggregate id).
    pub user_id: Uuid,
    /// UTC calendar month of the source event's `occurred_at`, `YYYY-MM`.
    pub period: String,
    /// The metered domain event.
    pub source_event_id: Uuid,
    /// `event_type` of the metered event.
    pub source_event_type: String,
    /// Tier in force.
    pub tier: Tier,
    /// Units used in `period` including this one.
    pub used: u64,
    /// The tier's monthly limit; `None` = unlimited.
    pub limit: Option<u64>,
}

/// `payment.quota.exceeded`: usage crossed the limit; at most once per user and period.
/// Aggregate: `subscription`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaExceeded {
    /// Subscriber (= aggregate id).
    pub user_id: Uuid,
    /// `YYYY-MM`.
    pub period: String,
    /// Tier in force.
    pub tier: Tier,
    /// Units used (= `limit + 1` at the crossing).
    pub used: u64,
    /// The limit crossed.
    pub limit: u64,
}
