//! The domain events of the event catalog (`docs/event-catalog.md`).
//!
//! Every variant of [`Event`] has a stable `event_type` string (public contract, issue #2 §1)
//! and a payload struct that is stored as the envelope's `payload` JSON object. Payloads carry
//! the facts downstream policies and projections need (for example a vote carries the content's
//! author and tags) so that consumers never have to query another aggregate.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::rules::Tier;

/// Current schema version of every event type; stored as `event_version`.
pub const EVENT_VERSION: u32 = 1;

/// Direction of a vote on content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VoteDirection {
    /// `+1` to the content's score.
    Up,
    /// `-1` to the content's score.
    Down,
}

impl VoteDirection {
    /// Score contribution: `+1` or `-1`.
    pub fn score(self) -> i64 {
        match self {
            VoteDirection::Up => 1,
            VoteDirection::Down => -1,
        }
    }
}

/// `user.registered`: a user joined. Aggregate: `user`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRegistered {
    /// The new user's id (= aggregate id).
    pub user_id: Uuid,
    /// Public display name, 1..=100 characters.
    pub display_name: String,
}

/// `knowledge.question.posted`. Aggregate: `content` (id = question id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionPosted {
    /// Question id (= aggregate id).
    pub question_id: Uuid,
    /// Author; `None` when the source has no owner (a deleted Stack Exchange user).
    pub author_id: Option<Uuid>,
    /// Title text, 1..=300 characters.
    pub title: String,
    /// Body text (HTML as in the Stack Exchange dump), at most 65,536 bytes.
    pub body: String,
    /// Tag names, lower case, without the `<>` delimiters of the dump.
    pub tags: Vec<String>,
}

/// `knowledge.answer.submitted`. Aggregate: `content` (id = answer id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerSubmitted {
    /// Answer id (= aggregate id).
    pub answer_id: Uuid,
    /// The question answered; it existed when the answer was submitted.
    pub question_id: Uuid,
    /// Author of the answer, if known.
    pub author_id: Option<Uuid>,
    /// Body text, at most 65,536 bytes.
    pub body: String,
    /// The question's tags (answers take their question's tags, issue #2 §5).
    pub tags: Vec<String>,
}

/// `knowledge.comment.added`. Aggregate: `content` (id = the commented question or answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommentAdded {
    /// Comment id (unique per content aggregate).
    pub comment_id: Uuid,
    /// The commented question or answer (= aggregate id).
    pub content_id: Uuid,
    /// Comment author, if known.
    pub author_id: Option<Uuid>,
    /// Comment text, at most 65,536 bytes.
    pub text: String,
    /// Tags of the content (its question's tags for an answer).
    pub tags: Vec<String>,
}

/// `knowledge.content.upvoted` / `knowledge.content.downvoted`. Aggregate: `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentVoted {
    /// The voted question or answer (= aggregate id).
    pub content_id: Uuid,
    /// The voter: a user id, or for anonymous source votes (Stack Exchange dumps) the vote id.
    pub voter_id: Uuid,
    /// The voter's earlier vote on this content that this vote replaces (one vote per voter).
    pub previous: Option<VoteDirection>,
    /// Author of the voted content, if known.
    pub content_author_id: Option<Uuid>,
    /// Tags of the content.
    pub tags: Vec<String>,
}

/// `knowledge.answer.accepted`. Aggregate: `content` (id = question id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerAccepted {
    /// The question (= aggregate id).
    pub question_id: Uuid,
    /// The accepted answer; it belongs to `question_id`.
    pub answer_id: Uuid,
    /// The question's author, if known.
    pub question_author_id: Option<Uuid>,
    /// The answer's author, if known.
    pub answer_author_id: Option<Uuid>,
    /// The question's tags.
    pub tags: Vec<String>,
}

/// `gamification.xp.earned`. Aggregate: `profile` (id = user id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XpEarned {
    /// The user awarded (= aggregate id).
    pub user_id: Uuid,
    /// XP delta; negative for a downvote. Units: XP points.
    pub amount: i64,
    /// The domain event that earned it.
    pub source_event_id: Uuid,
    /// `event_type` of the source event.
    pub source_event_type: String,
    /// `occurred_at` of the source event (drives weekly leaderboards).
    pub source_occurred_at: DateTime<Utc>,
    /// Tags of the content involved (drives `tag:NAME` leaderboards).
    pub tags: Vec<String>,
    /// XP total after this award.
    pub total_xp: i64,
}

/// `gamification.level.up`. Aggregate: `profile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelUp {
    /// The user (= aggregate id).
    pub user_id: Uuid,
    /// Level before the award.
    pub from_level: u32,
    /// Level after the award (> `from_level`).
    pub to_level: u32,
    /// XP total after the award.
    pub total_xp: i64,
}

/// `payment.subscription.created`. Aggregate: `subscription` (id = user id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionCreated {
    /// Subscriber (= aggregate id).
    pub user_id: Uuid,
    /// Opening tier (Free on registration).
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

/// Every domain event. Serialised adjacently tagged as
/// `{"event_type": "...", "payload": {...}}`; the store keeps the two parts in separate columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
#[allow(missing_docs)]
pub enum Event {
    #[serde(rename = "user.registered")]
    UserRegistered(UserRegistered),
    #[serde(rename = "knowledge.question.posted")]
    QuestionPosted(QuestionPosted),
    #[serde(rename = "knowledge.answer.submitted")]
    AnswerSubmitted(AnswerSubmitted),
    #[serde(rename = "knowledge.comment.added")]
    CommentAdded(CommentAdded),
    #[serde(rename = "knowledge.content.upvoted")]
    ContentUpvoted(ContentVoted),
    #[serde(rename = "knowledge.content.downvoted")]
    ContentDownvoted(ContentVoted),
    #[serde(rename = "knowledge.answer.accepted")]
    AnswerAccepted(AnswerAccepted),
    #[serde(rename = "gamification.xp.earned")]
    XpEarned(XpEarned),
    #[serde(rename = "gamification.level.up")]
    LevelUp(LevelUp),
    #[serde(rename = "payment.subscription.created")]
    SubscriptionCreated(SubscriptionCreated),
    #[serde(rename = "payment.usage.recorded")]
    UsageRecorded(UsageRecorded),
    #[serde(rename = "payment.quota.exceeded")]
    QuotaExceeded(QuotaExceeded),
}

/// Every `event_type` string of the catalog, in catalog order.
pub const EVENT_TYPES: [&str; 12] = [
    "user.registered",
    "knowledge.question.posted",
    "knowledge.answer.submitted",
    "knowledge.comment.added",
    "knowledge.content.upvoted",
    "knowledge.content.downvoted",
    "knowledge.answer.accepted",
    "gamification.xp.earned",
    "gamification.level.up",
    "payment.subscription.created",
    "payment.usage.recorded",
    "payment.quota.exceeded",
];

/// An envelope's `event_type` / `payload` could not be decoded into an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// `event_type` is not in the catalog.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// `event_version` is newer than this build understands and no upcaster applies.
    #[error("unsupported event_version {version} of {event_type:?}")]
    UnsupportedVersion {
        /// The type.
        event_type: String,
        /// The stored version.
        version: u32,
    },
    /// The payload does not match the type's schema.
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
        match self {
            Event::UserRegistered(_) => EVENT_TYPES[0],
            Event::QuestionPosted(_) => EVENT_TYPES[1],
            Event::AnswerSubmitted(_) => EVENT_TYPES[2],
            Event::CommentAdded(_) => EVENT_TYPES[3],
            Event::ContentUpvoted(_) => EVENT_TYPES[4],
            Event::ContentDownvoted(_) => EVENT_TYPES[5],
            Event::AnswerAccepted(_) => EVENT_TYPES[6],
            Event::XpEarned(_) => EVENT_TYPES[7],
            Event::LevelUp(_) => EVENT_TYPES[8],
            Event::SubscriptionCreated(_) => EVENT_TYPES[9],
            Event::UsageRecorded(_) => EVENT_TYPES[10],
            Event::QuotaExceeded(_) => EVENT_TYPES[11],
        }
    }

    /// The aggregate type that emits this event: `user`, `content`, `profile` or
    /// `subscription`.
    pub fn aggregate_type(&self) -> &'static str {
        match self {
            Event::UserRegistered(_) => "user",
            Event::QuestionPosted(_)
            | Event::AnswerSubmitted(_)
            | Event::CommentAdded(_)
            | Event::ContentUpvoted(_)
            | Event::ContentDownvoted(_)
            | Event::AnswerAccepted(_) => "content",
            Event::XpEarned(_) | Event::LevelUp(_) => "profile",
            Event::SubscriptionCreated(_) | Event::UsageRecorded(_) | Event::QuotaExceeded(_) => {
                "subscription"
            }
        }
    }

    /// The payload as a JSON object (the envelope's `payload`).
    pub fn to_payload(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => m.remove("payload").unwrap_or_default(),
            // Serialising plain structs of strings, numbers and uuids cannot fail.
            _ => unreachable!("event serialises to an object"),
        }
    }

    /// Decodes a stored `event_type`, `event_version` and `payload`.
    ///
    /// # Errors
    /// [`DecodeError`] when the type is unknown, the version unsupported or the payload invalid.
    pub fn decode(
        event_type: &str,
        event_version: u32,
        payload: &serde_json::Value,
    ) -> Result<Event, DecodeError> {
        if !EVENT_TYPES.contains(&event_type) {
            return Err(DecodeError::UnknownType(event_type.into()));
        }
        if event_version != EVENT_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                event_type: event_type.into(),
                version: event_version,
            });
        }
        let tagged = serde_json::json!({ "event_type": event_type, "payload": payload });
        serde_json::from_value(tagged).map_err(|source| DecodeError::Payload {
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
        EVENT_VERSION.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_through_decode() {
        let e = Event::QuestionPosted(QuestionPosted {
            question_id: Uuid::new_v4(),
            author_id: None,
            title: "t".into(),
            body: String::new(),
            tags: vec!["a".into()],
        });
        let p = e.to_payload();
        assert!(p.get("event_type").is_none());
        assert_eq!(Event::decode(e.event_type(), 1, &p).unwrap(), e);
    }

    #[test]
    fn decode_rejects_unknown_type_version_and_fields() {
        let p = serde_json::json!({"user_id": Uuid::nil(), "display_name": "x"});
        assert!(Event::decode("user.registered", 1, &p).is_ok());
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
