//! The domain events of the event catalog (`docs/event-catalog.md`).
//!
//! Every variant of [`Event`] has a stable `event_type` string (public contract, issues #2 and
//! #6), a current `event_version`, and a payload struct that is stored as the envelope's
//! `payload` JSON object. Payloads carry the facts downstream policies and projections need (for
//! example a vote carries the content's author and tags) so that consumers never have to query
//! another aggregate.
//!
//! Older stored versions are turned into the current shape by the upcasters of
//! [`crate::upcast`] on every decode.

mod gamification;
mod knowledge;
mod payment;
mod user;

pub use gamification::{
    AchievementUnlocked, Activity, LevelUp, QuestCompleted, StreakMilestone, XpEarned,
};
pub use knowledge::{
    AnswerAccepted, AnswerSubmitted, AreaCreated, CommentAdded, ContentLiked, ContentVoted,
    DiscussionStarted, InsightShared, QuestionPosted, ResourceUploaded, VoteDirection,
};
pub use payment::{
    InvoicePaid, QuotaExceeded, SubscriptionCancelled, SubscriptionCreated,
    SubscriptionTierChanged, UsageRecorded,
};
pub use user::{
    Preferences, UserAuthenticated, UserEmailVerified, UserProfileUpdated, UserRegistered,
};

use serde::{Deserialize, Serialize};

/// Every domain event. Serialised adjacently tagged as
/// `{"event_type": "...", "payload": {...}}`; the store keeps the two parts in separate columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
#[allow(missing_docs)]
pub enum Event {
    #[serde(rename = "user.registered")]
    UserRegistered(UserRegistered),
    #[serde(rename = "user.profile.updated")]
    UserProfileUpdated(UserProfileUpdated),
    #[serde(rename = "user.authenticated")]
    UserAuthenticated(UserAuthenticated),
    #[serde(rename = "user.email.verified")]
    UserEmailVerified(UserEmailVerified),
    #[serde(rename = "knowledge.area.created")]
    AreaCreated(AreaCreated),
    #[serde(rename = "knowledge.question.posted")]
    QuestionPosted(QuestionPosted),
    #[serde(rename = "knowledge.answer.submitted")]
    AnswerSubmitted(AnswerSubmitted),
    #[serde(rename = "knowledge.discussion.started")]
    DiscussionStarted(DiscussionStarted),
    #[serde(rename = "knowledge.insight.shared")]
    InsightShared(InsightShared),
    #[serde(rename = "knowledge.resource.uploaded")]
    ResourceUploaded(ResourceUploaded),
    #[serde(rename = "knowledge.comment.added")]
    CommentAdded(CommentAdded),
    #[serde(rename = "knowledge.content.upvoted")]
    ContentUpvoted(ContentVoted),
    #[serde(rename = "knowledge.content.downvoted")]
    ContentDownvoted(ContentVoted),
    #[serde(rename = "knowledge.content.liked")]
    ContentLiked(ContentLiked),
    #[serde(rename = "knowledge.answer.accepted")]
    AnswerAccepted(AnswerAccepted),
    #[serde(rename = "gamification.xp.earned")]
    XpEarned(XpEarned),
    #[serde(rename = "gamification.level.up")]
    LevelUp(LevelUp),
    #[serde(rename = "gamification.achievement.unlocked")]
    AchievementUnlocked(AchievementUnlocked),
    #[serde(rename = "gamification.quest.completed")]
    QuestCompleted(QuestCompleted),
    #[serde(rename = "gamification.streak.milestone")]
    StreakMilestone(StreakMilestone),
    #[serde(rename = "payment.subscription.created")]
    SubscriptionCreated(SubscriptionCreated),
    #[serde(rename = "payment.subscription.upgraded")]
    SubscriptionUpgraded(SubscriptionTierChanged),
    #[serde(rename = "payment.subscription.downgraded")]
    SubscriptionDowngraded(SubscriptionTierChanged),
    #[serde(rename = "payment.subscription.cancelled")]
    SubscriptionCancelled(SubscriptionCancelled),
    #[serde(rename = "payment.usage.recorded")]
    UsageRecorded(UsageRecorded),
    #[serde(rename = "payment.quota.exceeded")]
    QuotaExceeded(QuotaExceeded),
    #[serde(rename = "payment.invoice.paid")]
    InvoicePaid(InvoicePaid),
}

/// One row of the catalog: `event_type`, emitting aggregate type, current `event_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The stable `event_type` string.
    pub event_type: &'static str,
    /// The aggregate type that emits it.
    pub aggregate_type: &'static str,
    /// The version new events are written with; older stored versions are upcast to it.
    pub version: u32,
}

const fn entry(
    event_type: &'static str,
    aggregate_type: &'static str,
    version: u32,
) -> CatalogEntry {
    CatalogEntry {
        event_type,
        aggregate_type,
        version,
    }
}

/// The whole catalog, in catalog order (the order of `docs/event-catalog.md`).
pub const CATALOG: [CatalogEntry; 27] = [
    entry("user.registered", "user", 2),
    entry("user.profile.updated", "user", 1),
    entry("user.authenticated", "user", 1),
    entry("user.email.verified", "user", 1),
    entry("knowledge.area.created", "area", 1),
    entry("knowledge.question.posted", "content", 1),
    entry("knowledge.answer.submitted", "content", 1),
    entry("knowledge.discussion.started", "content", 1),
    entry("knowledge.insight.shared", "content", 1),
    entry("knowledge.resource.uploaded", "content", 1),
    entry("knowledge.comment.added", "content", 1),
    entry("knowledge.content.upvoted", "content", 1),
    entry("knowledge.content.downvoted", "content", 1),
    entry("knowledge.content.liked", "content", 1),
    entry("knowledge.answer.accepted", "content", 1),
    entry("gamification.xp.earned", "profile", 1),
    entry("gamification.level.up", "profile", 1),
    entry("gamification.achievement.unlocked", "profile", 1),
    entry("gamification.quest.completed", "profile", 1),
    entry("gamification.streak.milestone", "profile", 1),
    entry("payment.subscription.created", "subscription", 1),
    entry("payment.subscription.upgraded", "subscription", 1),
    entry("payment.subscription.downgraded", "subscription", 1),
    entry("payment.subscription.cancelled", "subscription", 1),
    entry("payment.usage.recorded", "subscription", 1),
    entry("payment.quota.exceeded", "subscription", 1),
    entry("payment.invoice.paid", "subscription", 1),
];

/// Every `event_type` string of the catalog, in catalog order.
pub const EVENT_TYPES: [&str; 27] = {
    let mut out = [""; 27];
    let mut i = 0;
    while i < 27 {
        out[i] = CATALOG[i].event_type;
        i += 1;
    }
    out
};

/// The catalog entry of `event_type`, if it is in the catalog.
pub fn catalog_entry(event_type: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.event_type == event_type)
}

/// An envelope's `event_type` / `payload` could not be decoded into an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// `event_type` is not in the catalog.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// `event_version` is newer than this build understands, or older with no upcaster.
    #[error("unsupported event_version {version} of {event_type:?}")]
    UnsupportedVersion {
        /// The type.
        event_type: String,
        /// The stored version.
        version: u32,
    },
    /// The payload does not match the type's schema (after upcasting).
    #[error("invalid payload for {event_type:?}: {source}")]
    Payload {
        /// The type.
        event_type: String,
        /// serde's reason.
        source: serde_json::Error,
    },
}

impl Event {
    /// The stable `event_type` string.
    pub fn event_type(&self) -> &'static str {
        self.entry().event_type
    }

    /// The current `event_version` of this event's type (what new events are stored with).
    pub fn event_version(&self) -> u32 {
        self.entry().version
    }

    /// The aggregate type that emits this event: `user`, `area`, `content`, `profile` or
    /// `subscription`.
    pub fn aggregate_type(&self) -> &'static str {
        self.entry().aggregate_type
    }

    fn entry(&self) -> &'static CatalogEntry {
        let i = match self {
            Event::UserRegistered(_) => 0,
            Event::UserProfileUpdated(_) => 1,
            Event::UserAuthenticated(_) => 2,
            Event::UserEmailVerified(_) => 3,
            Event::AreaCreated(_) => 4,
            Event::QuestionPosted(_) => 5,
            Event::AnswerSubmitted(_) => 6,
            Event::DiscussionStarted(_) => 7,
            Event::InsightShared(_) => 8,
            Event::ResourceUploaded(_) => 9,
            Event::CommentAdded(_) => 10,
            Event::ContentUpvoted(_) => 11,
            Event::ContentDownvoted(_) => 12,
            Event::ContentLiked(_) => 13,
            Event::AnswerAccepted(_) => 14,
            Event::XpEarned(_) => 15,
            Event::LevelUp(_) => 16,
            Event::AchievementUnlocked(_) => 17,
            Event::QuestCompleted(_) => 18,
            Event::StreakMilestone(_) => 19,
            Event::SubscriptionCreated(_) => 20,
            Event::SubscriptionUpgraded(_) => 21,
            Event::SubscriptionDowngraded(_) => 22,
            Event::SubscriptionCancelled(_) => 23,
            Event::UsageRecorded(_) => 24,
            Event::QuotaExceeded(_) => 25,
            Event::InvoicePaid(_) => 26,
        };
        &CATALOG[i]
    }

    /// The payload as a JSON object (the envelope's `payload`).
    pub fn to_payload(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => m.remove("payload").unwrap_or_default(),
            // Serialising plain structs of strings, numbers and uuids cannot fail.
            _ => unreachable!("event serialises to an object"),
        }
    }

    /// Decodes a stored `event_type`, `event_version` and `payload`, upcasting older versions
    /// to the current shape first ([`crate::upcast::upcast`]).
    ///
    /// # Errors
    /// [`DecodeError`] when the type is unknown, the version unsupported or the payload invalid.
    pub fn decode(
        event_type: &str,
        event_version: u32,
        payload: &serde_json::Value,
    ) -> Result<Event, DecodeError> {
        let current = catalog_entry(event_type)
            .ok_or_else(|| DecodeError::UnknownType(event_type.into()))?
            .version;
        if event_version == current {
            return Self::decode_current(event_type, payload);
        }
        let (_, payload) = crate::upcast::upcast(event_type, event_version, payload.clone())?;
        Self::decode_current(event_type, &payload)
    }

    /// [`Event::decode`] of a payload given as its stored JSON text: at the current version
    /// the variant's fields are read straight from the text (no `serde_json::Value` is built:
    /// the text is checked to be one JSON value, then fed with the type to the enum's
    /// adjacently tagged deserializer, tag first); an older version is parsed and upcast.
    ///
    /// # Errors
    /// As [`Event::decode`]; [`DecodeError::Payload`] when `payload` is not one JSON value.
    pub fn decode_str(
        event_type: &str,
        event_version: u32,
        payload: &str,
    ) -> Result<Event, DecodeError> {
        use serde::Deserialize;
        use serde_json::value::RawValue;
        let invalid = |source| DecodeError::Payload {
            event_type: event_type.into(),
            source,
        };
        let current = catalog_entry(event_type)
            .ok_or_else(|| DecodeError::UnknownType(event_type.into()))?
            .version;
        if event_version != current {
            let value: serde_json::Value = serde_json::from_str(payload).map_err(invalid)?;
            return Self::decode(event_type, event_version, &value);
        }
        let raw: &RawValue = serde_json::from_str(payload).map_err(invalid)?;
        let tag = serde_json::value::to_raw_value(event_type).map_err(invalid)?;
        let entries = [("event_type", &*tag), ("payload", raw)];
        let map =
            serde::de::value::MapDeserializer::<_, serde_json::Error>::new(entries.into_iter());
        Event::deserialize(map).map_err(invalid)
    }

    /// Decodes a payload at the current version of `event_type`, borrowing it: the type and
    /// the payload are fed to the enum's adjacently tagged deserializer as a two-entry map,
    /// tag first, so the variant's fields are read straight from `payload` (no copy of the
    /// payload, no buffering).
    fn decode_current(event_type: &str, payload: &serde_json::Value) -> Result<Event, DecodeError> {
        use serde::Deserialize;
        let tag = serde_json::Value::String(event_type.to_owned());
        let entries = [("event_type", &tag), ("payload", payload)];
        let map =
            serde::de::value::MapDeserializer::<_, serde_json::Error>::new(entries.into_iter());
        Event::deserialize(map).map_err(|source| DecodeError::Payload {
            event_type: event_type.into(),
            source,
        })
    }
}

impl cqrs_es::DomainEvent for Event {
    fn event_type(&self) -> String {
        Event::event_type(self).to_string()
    }
    fn event_version(&self) -> String {
        Event::event_version(self).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn payload_round_trips_through_decode() {
        let e = Event::QuestionPosted(QuestionPosted {
            question_id: Uuid::new_v4(),
            author_id: None,
            title: "t".into(),
            body: String::new(),
            tags: vec!["a".into()],
            area_id: None,
        });
        let p = e.to_payload();
        assert!(p.get("event_type").is_none());
        assert_eq!(Event::decode(e.event_type(), 1, &p).unwrap(), e);
    }

    /// `decode_str` of the stored text answers as `decode` of the parsed payload: current
    /// and older versions, unknown types and versions, invalid and trailing text.
    #[test]
    fn decode_str_agrees_with_decode() {
        let e = Event::QuestionPosted(QuestionPosted {
            question_id: Uuid::from_u128(7),
            author_id: Some(Uuid::from_u128(8)),
            title: "t \"quoted\"".into(),
            body: "b".into(),
            tags: vec!["a".into(), "b".into()],
            area_id: None,
        });
        let text = e.to_payload().to_string();
        assert_eq!(
            Event::decode_str("knowledge.question.posted", 1, &text).unwrap(),
            e
        );
        let v1 = r#"{"user_id":"00000000-0000-0000-0000-000000000000","display_name":"x"}"#;
        let parsed: serde_json::Value = serde_json::from_str(v1).unwrap();
        assert_eq!(
            Event::decode_str("user.registered", 1, v1).unwrap(),
            Event::decode("user.registered", 1, &parsed).unwrap()
        );
        for (ty, version, text) in [
            ("user.registered", 2, v1),
            ("user.deleted", 1, v1),
            ("user.registered", 9, v1),
            ("knowledge.question.posted", 1, "{"),
            ("knowledge.question.posted", 1, &*format!("{text}, 1")),
        ] {
            let parsed = serde_json::from_str::<serde_json::Value>(text);
            let by_str = Event::decode_str(ty, version, text);
            assert!(by_str.is_err(), "{ty} {version} {text}");
            if let Ok(parsed) = parsed {
                assert_eq!(
                    std::mem::discriminant(&by_str.unwrap_err()),
                    std::mem::discriminant(&Event::decode(ty, version, &parsed).unwrap_err())
                );
            }
        }
    }

    #[test]
    fn decode_rejects_unknown_type_version_and_fields() {
        let p = serde_json::json!({"user_id": Uuid::nil(), "display_name": "x"});
        assert!(Event::decode("user.registered", 1, &p).is_ok());
        // Version 2 requires the preferences that version 1 lacked.
        assert!(matches!(
            Event::decode("user.registered", 2, &p),
            Err(DecodeError::Payload { .. })
        ));
        assert!(matches!(
            Event::decode("user.deleted", 1, &p),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            Event::decode("user.registered", 9, &p),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
        let extra = serde_json::json!({"user_id": Uuid::nil(), "display_name": "x", "z": 1});
        assert!(matches!(
            Event::decode("user.registered", 1, &extra),
            Err(DecodeError::Payload { .. })
        ));
    }
}
