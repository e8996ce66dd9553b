//! Polar webhook payloads and what each means for the subscription aggregate.
//!
//! A payload is `{"type": "...", "timestamp": "<ISO 8601>", "data": {...}}` (Polar, *Webhook
//! events*; the Standard Webhooks payload structure). [`action`] maps a verified payload to a
//! [`BillingAction`], a pure decision the HTTP layer turns into one subscription command:
//!
//! | Polar `type` | `data` | action |
//! |---|---|---|
//! | `subscription.created`, `.updated`, `.active`, `.uncanceled`, `.canceled`, `.revoked`, `.past_due` | a subscription | by its `status` (below) |
//! | `order.paid` | an order | [`BillingAction::InvoicePaid`] (`id`, `total_amount` in minor units, `currency`) |
//! | anything else (`checkout.*`, `customer.*`, `order.created`, `order.refunded`, `benefit*`, …) | | [`BillingAction::Ignore`] |
//!
//! Subscription `status` (Polar's enum: `incomplete`, `incomplete_expired`, `trialing`,
//! `active`, `past_due`, `canceled`, `unpaid`):
//! - `active`, `trialing` → [`BillingAction::ChangeTier`] to the tier of `product_id`;
//! - `canceled`, `unpaid`, `incomplete_expired` → [`BillingAction::Cancel`];
//! - `incomplete`, `past_due`, and statuses Polar may add later → [`BillingAction::Ignore`]
//!   (access continues while Polar retries the payment; `subscription.revoked` follows if it
//!   gives up).
//!
//! Deciding by `status` rather than by event type follows Polar's semantics: a customer who
//! cancels "at period end" gets `subscription.canceled` with `status: "active"` and keeps the
//! tier until the period ends, when `subscription.revoked` arrives with `status: "canceled"`;
//! an immediate cancellation arrives with `status: "canceled"` at once.
//!
//! The TekTree user is `data.customer.external_id` (set from the checkout's
//! `external_customer_id`) or else `data.metadata.tektree_user_id` (copied by Polar from the
//! checkout's metadata); when both are present they must agree.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use tektree_domain::Tier;
use uuid::Uuid;

use super::config::TierProducts;

/// Metadata key carrying the TekTree user id (set on every checkout).
pub const USER_METADATA_KEY: &str = "tektree_user_id";
/// Metadata key carrying the tier bought (set on every checkout; informational).
pub const TIER_METADATA_KEY: &str = "tektree_tier";

/// A Polar webhook payload, `data` still raw.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WebhookEvent {
    /// Event type, e.g. `subscription.updated`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event occurred (not the delivery attempt), if sent.
    #[serde(default)]
    pub timestamp: Option<DateTime<Utc>>,
    /// The event's object (subscription, order, …).
    #[serde(default)]
    pub data: Value,
}

/// The customer embedded in subscriptions and orders (fields we read).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PolarCustomer {
    /// Polar's customer id.
    #[serde(default)]
    pub id: Option<String>,
    /// Our id for the customer (the TekTree user id), from the checkout's
    /// `external_customer_id`.
    #[serde(default)]
    pub external_id: Option<String>,
}

/// A Polar subscription (fields we read).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PolarSubscription {
    /// Subscription id.
    pub id: String,
    /// Polar's status (see the module docs).
    pub status: String,
    /// The subscribed product.
    pub product_id: String,
    /// The customer.
    #[serde(default)]
    pub customer: Option<PolarCustomer>,
    /// Metadata copied from the checkout.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// A Polar order (fields we read).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PolarOrder {
    /// Order id (our invoice id).
    pub id: String,
    /// `paid`, `pending`, `refunded`, `partially_refunded`.
    #[serde(default)]
    pub status: Option<String>,
    /// Amount charged, taxes included, in the currency's minor units (cents).
    pub total_amount: u64,
    /// ISO 4217 code, as Polar sends it (lower case, e.g. `usd`).
    pub currency: String,
    /// The product bought.
    #[serde(default)]
    pub product_id: Option<String>,
    /// The subscription renewed or created, if any.
    #[serde(default)]
    pub subscription_id: Option<String>,
    /// `purchase`, `subscription_create`, `subscription_cycle`, `subscription_update`.
    #[serde(default)]
    pub billing_reason: Option<String>,
    /// The customer.
    #[serde(default)]
    pub customer: Option<PolarCustomer>,
    /// Metadata copied from the checkout.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// What a webhook asks of the subscription aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BillingAction {
    /// Set the user's tier (no event when unchanged).
    ChangeTier {
        /// The user (= subscription aggregate id).
        user_id: Uuid,
        /// New tier.
        tier: Tier,
        /// Polar's subscription id.
        polar_subscription_id: String,
    },
    /// Back to Free.
    Cancel {
        /// The user.
        user_id: Uuid,
        /// Polar's subscription id.
        polar_subscription_id: String,
    },
    /// Record a paid order.
    InvoicePaid {
        /// The user.
        user_id: Uuid,
        /// Polar's order id.
        invoice_id: String,
        /// Total in minor units.
        amount_minor: u64,
        /// Currency code as sent.
        currency: String,
    },
    /// Nothing to do.
    Ignore {
        /// Why (for the response and logs).
        reason: String,
    },
}

impl BillingAction {
    /// The user the action is for (`None` for [`BillingAction::Ignore`]).
    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            BillingAction::ChangeTier { user_id, .. }
            | BillingAction::Cancel { user_id, .. }
            | BillingAction::InvoicePaid { user_id, .. } => Some(*user_id),
            BillingAction::Ignore { .. } => None,
        }
    }
}

/// Why a verified payload cannot be acted on. The HTTP layer answers 422 and writes nothing,
/// so that Polar retries the delivery (after the configuration or data is fixed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The body is not a Polar event, or `data` lacks a field the type requires.
    #[error("invalid webhook payload: {0}")]
    Invalid(String),
    /// Neither `customer.external_id` nor `metadata.tektree_user_id` names a user.
    #[error("the event names no TekTree user (customer.external_id / metadata.tektree_user_id)")]
    NoUser,
    /// The named user id is not a UUID.
    #[error("the event's user id {0:?} is not a UUID")]
    InvalidUser(String),
    /// `customer.external_id` and `metadata.tektree_user_id` disagree.
    #[error("customer.external_id {external_id} and metadata.tektree_user_id {metadata} differ")]
    UserMismatch {
        /// From the customer.
        external_id: Uuid,
        /// From the metadata.
        metadata: Uuid,
    },
    /// The product is not configured for any tier.
    #[error("product {0:?} is not configured for any tier")]
    UnknownProduct(String),
}

impl PayloadError {
    /// Stable reason code: `webhook.invalid_payload`, `webhook.no_user`, `webhook.user_mismatch`,
    /// `webhook.unknown_product`.
    pub fn code(&self) -> &'static str {
        match self {
            PayloadError::Invalid(_) => "webhook.invalid_payload",
            PayloadError::NoUser | PayloadError::InvalidUser(_) => "webhook.no_user",
            PayloadError::UserMismatch { .. } => "webhook.user_mismatch",
            PayloadError::UnknownProduct(_) => "webhook.unknown_product",
        }
    }
}

/// Parses a verified body.
///
/// # Errors
/// [`PayloadError::Invalid`] when it is not a JSON object with a string `type`.
pub fn parse(body: &[u8]) -> Result<WebhookEvent, PayloadError> {
    serde_json::from_slice(body).map_err(|e| PayloadError::Invalid(e.to_string()))
}

fn user_of(
    customer: Option<&PolarCustomer>,
    metadata: &Map<String, Value>,
) -> Result<Uuid, PayloadError> {
    let parse =
        |s: &str| Uuid::parse_str(s.trim()).map_err(|_| PayloadError::InvalidUser(s.into()));
    let external = customer
        .and_then(|c| c.external_id.as_deref())
        .filter(|s| !s.is_empty())
        .map(parse)
        .transpose()?;
    let meta = match metadata.get(USER_METADATA_KEY) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse(s)?),
        Some(other) => return Err(PayloadError::InvalidUser(other.to_string())),
    };
    match (external, meta) {
        (Some(e), Some(m)) if e != m => Err(PayloadError::UserMismatch {
            external_id: e,
            metadata: m,
        }),
        (Some(u), _) | (None, Some(u)) => Ok(u),
        (None, None) => Err(PayloadError::NoUser),
    }
}

fn data<T: serde::de::DeserializeOwned>(event: &WebhookEvent) -> Result<T, PayloadError> {
    T::deserialize(&event.data)
        .map_err(|e| PayloadError::Invalid(format!("{} data: {e}", event.kind)))
}

/// What `event` asks for (module docs), with `products` mapping product ids to tiers.
///
/// # Errors
/// [`PayloadError`] for a handled type whose data is incomplete, names no (or two) users, or an
/// unconfigured product.
pub fn action(
    event: &WebhookEvent,
    products: &TierProducts,
) -> Result<BillingAction, PayloadError> {
    let ignore = |reason: String| Ok(BillingAction::Ignore { reason });
    match event.kind.as_str() {
        "subscription.created"
        | "subscription.updated"
        | "subscription.active"
        | "subscription.uncanceled"
        | "subscription.canceled"
        | "subscription.revoked"
        | "subscription.past_due" => {
            let s: PolarSubscription = data(event)?;
            let user_id = user_of(s.customer.as_ref(), &s.metadata)?;
            match s.status.as_str() {
                "active" | "trialing" => {
                    let tier = products
                        .tier_for(&s.product_id)
                        .ok_or_else(|| PayloadError::UnknownProduct(s.product_id.clone()))?;
                    Ok(BillingAction::ChangeTier {
                        user_id,
                        tier,
                        polar_subscription_id: s.id,
                    })
                }
                "canceled" | "unpaid" | "incomplete_expired" => Ok(BillingAction::Cancel {
                    user_id,
                    polar_subscription_id: s.id,
                }),
                other => ignore(format!("subscription status {other:?} changes no tier")),
            }
        }
        "order.paid" => {
            let o: PolarOrder = data(event)?;
            if let Some(p) = o.product_id.as_deref() {
                if products.tier_for(p).is_none() {
                    return Err(PayloadError::UnknownProduct(p.into()));
                }
            }
            let user_id = user_of(o.customer.as_ref(), &o.metadata)?;
            Ok(BillingAction::InvoicePaid {
                user_id,
                invoice_id: o.id,
                amount_minor: o.total_amount,
                currency: o.currency,
            })
        }
        other => ignore(format!("event type {other:?} is not used")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn products() -> TierProducts {
        TierProducts {
            pro: Some("prod_pro".into()),
            team: Some("prod_team".into()),
            enterprise: None,
        }
    }

    fn sub(kind: &str, status: &str, product: &str, user: Uuid) -> WebhookEvent {
        parse(
            json!({
                "type": kind,
                "timestamp": "2025-01-02T03:04:05.123456Z",
                "data": {
                    "id": "sub_1", "status": status, "product_id": product,
                    "customer": {"id": "cus_1", "external_id": user.to_string()},
                    "metadata": {"tektree_user_id": user.to_string(), "tektree_tier": "pro"},
                    "amount": 1000, "currency": "usd", "cancel_at_period_end": false
                }
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn subscription_status_decides() {
        let u = Uuid::new_v4();
        for kind in [
            "subscription.created",
            "subscription.updated",
            "subscription.active",
        ] {
            assert_eq!(
                action(&sub(kind, "active", "prod_team", u), &products()),
                Ok(BillingAction::ChangeTier {
                    user_id: u,
                    tier: Tier::Team,
                    polar_subscription_id: "sub_1".into()
                })
            );
        }
        assert!(matches!(
            action(
                &sub("subscription.created", "trialing", "prod_pro", u),
                &products()
            ),
            Ok(BillingAction::ChangeTier {
                tier: Tier::Pro,
                ..
            })
        ));
        for status in ["canceled", "unpaid", "incomplete_expired"] {
            assert_eq!(
                action(
                    &sub("subscription.revoked", status, "prod_pro", u),
                    &products()
                ),
                Ok(BillingAction::Cancel {
                    user_id: u,
                    polar_subscription_id: "sub_1".into()
                })
            );
        }
        // Canceled at period end: still active, the tier stays.
        assert!(matches!(
            action(
                &sub("subscription.canceled", "active", "prod_pro", u),
                &products()
            ),
            Ok(BillingAction::ChangeTier {
                tier: Tier::Pro,
                ..
            })
        ));
        for status in ["past_due", "incomplete", "paused_in_some_future"] {
            assert!(matches!(
                action(
                    &sub("subscription.updated", status, "prod_pro", u),
                    &products()
                ),
                Ok(BillingAction::Ignore { .. })
            ));
        }
        assert_eq!(
            action(
                &sub("subscription.active", "active", "prod_x", u),
                &products()
            ),
            Err(PayloadError::UnknownProduct("prod_x".into()))
        );
    }

    #[test]
    fn orders_paid_record_invoices_and_other_types_are_ignored() {
        let u = Uuid::new_v4();
        let order = parse(
            json!({"type": "order.paid", "timestamp": "2025-01-02T03:04:05Z", "data": {
                "id": "ord_1", "status": "paid", "total_amount": 1900, "currency": "usd",
                "product_id": "prod_pro", "subscription_id": "sub_1",
                "billing_reason": "subscription_create",
                "customer": {"external_id": u.to_string()}, "metadata": {}}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            action(&order, &products()),
            Ok(BillingAction::InvoicePaid {
                user_id: u,
                invoice_id: "ord_1".into(),
                amount_minor: 1900,
                currency: "usd".into()
            })
        );
        for kind in [
            "order.created",
            "checkout.updated",
            "customer.state_changed",
            "x",
        ] {
            let e = parse(json!({"type": kind, "data": {}}).to_string().as_bytes()).unwrap();
            assert!(matches!(
                action(&e, &products()),
                Ok(BillingAction::Ignore { .. })
            ));
        }
    }

    #[test]
    fn the_user_comes_from_external_id_or_metadata_and_must_agree() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let c = |id: Option<String>| PolarCustomer {
            id: None,
            external_id: id,
        };
        let m = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(user_of(Some(&c(Some(a.to_string()))), &Map::new()), Ok(a));
        assert_eq!(
            user_of(None, &m(json!({"tektree_user_id": a.to_string()}))),
            Ok(a)
        );
        assert_eq!(
            user_of(
                Some(&c(Some(a.to_string()))),
                &m(json!({"tektree_user_id": b.to_string()}))
            ),
            Err(PayloadError::UserMismatch {
                external_id: a,
                metadata: b
            })
        );
        assert_eq!(
            user_of(Some(&c(None)), &Map::new()),
            Err(PayloadError::NoUser)
        );
        assert!(matches!(
            user_of(Some(&c(Some("42".into()))), &Map::new()),
            Err(PayloadError::InvalidUser(_))
        ));
        assert!(matches!(
            user_of(None, &m(json!({"tektree_user_id": 42}))),
            Err(PayloadError::InvalidUser(_))
        ));
    }

    #[test]
    fn incomplete_payloads_are_invalid() {
        assert!(matches!(parse(b"[]"), Err(PayloadError::Invalid(_))));
        assert!(matches!(
            parse(b"{\"data\": {}}"),
            Err(PayloadError::Invalid(_))
        ));
        let e = parse(br#"{"type": "subscription.updated", "data": {"id": "s"}}"#).unwrap();
        assert!(matches!(
            action(&e, &products()),
            Err(PayloadError::Invalid(_))
        ));
        let e = parse(br#"{"type": "order.paid", "data": {"id": "o", "total_amount": -1, "currency": "usd"}}"#).unwrap();
        assert!(matches!(
            action(&e, &products()),
            Err(PayloadError::Invalid(_))
        ));
    }
}
