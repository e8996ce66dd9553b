//! The live-update messages ([`Notification`]) and how committed events become them
//! ([`notifications`]).
//!
//! Every message is one JSON object (one WebSocket text frame):
//!
//! ```json
//! {"type": "xp.earned", "user_id": "…", "amount": 2, "total_xp": 102,
//!  "source_event_type": "knowledge.question.posted", "tags": ["rust"],
//!  "event_id": "…", "position": 42, "occurred_at": "2024-05-01T12:00:00Z"}
//! ```
//!
//! `type`, `user_id`, `event_id` (the event that caused the message), `position` (its global
//! position: clients drop a message whose `(event_id, type, board)` they have seen, since
//! delivery is at least once) and `occurred_at` are always present; the other fields depend on
//! `type` (see [`KINDS`] and `docs/live.md`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tektree_domain::{Event, EventEnvelope};
use uuid::Uuid;

/// `xp.earned`: fields `amount` (XP points, negative for a downvote), `total_xp` (after the
/// award), `source_event_type`, `tags`, `area_id` (or `null`). From `gamification.xp.earned`.
pub const XP_EARNED: &str = "xp.earned";
/// `level.up`: fields `from_level`, `to_level`, `total_xp`. From `gamification.level.up`.
pub const LEVEL_UP: &str = "level.up";
/// `achievement.unlocked`: the event payload's fields (`achievement_id`, `name`,
/// `xp_reward`, `source_event_id`, `unlocked_at`). From `gamification.achievement.unlocked`.
pub const ACHIEVEMENT_UNLOCKED: &str = "achievement.unlocked";
/// `quest.completed`: the event payload's fields (`quest_id`, `name`, `period`, `xp_reward`,
/// `source_event_id`, `completed_at`). From `gamification.quest.completed`.
pub const QUEST_COMPLETED: &str = "quest.completed";
/// `streak.milestone`: the event payload's fields (`days`, `first_day`, `last_day`,
/// `source_event_id`). From `gamification.streak.milestone`.
pub const STREAK_MILESTONE: &str = "streak.milestone";
/// `quota.warning`: fields `period` (`YYYY-MM`), `tier`, `used`, `limit` (units) and
/// `percent` (the threshold crossed). From the one `payment.usage.recorded` per user and period
/// whose `used` first reaches the threshold (default 80 % of `limit`).
pub const QUOTA_WARNING: &str = "quota.warning";
/// `quota.exceeded`: fields `period`, `tier`, `used`, `limit`. From `payment.quota.exceeded`.
pub const QUOTA_EXCEEDED: &str = "quota.exceeded";
/// `rank.changed`: fields `board`, `xp` (the user's XP on the board) and `rank` (from 1),
/// read from the leaderboard read model after an `xp.earned` touching the board (see
/// [`Notifier`](super::notifier::Notifier)).
pub const RANK_CHANGED: &str = "rank.changed";

/// Every message `type`, in the order above.
pub const KINDS: [&str; 8] = [
    XP_EARNED,
    LEVEL_UP,
    ACHIEVEMENT_UNLOCKED,
    QUEST_COMPLETED,
    STREAK_MILESTONE,
    QUOTA_WARNING,
    QUOTA_EXCEEDED,
    RANK_CHANGED,
];

/// One live update for one user (or, for [`RANK_CHANGED`], one user's entry on one board).
///
/// Serialised flat: `{"type", "user_id", …fields, "event_id", "position", "occurred_at"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// One of [`KINDS`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The user it is about; `/ws/notifications` of this user receives it (all types but
    /// [`RANK_CHANGED`], which goes to `/ws/leaderboard` subscribers of `board`).
    pub user_id: Uuid,
    /// The event that caused it.
    pub event_id: Uuid,
    /// That event's global position in the store.
    pub position: u64,
    /// That event's domain time.
    pub occurred_at: DateTime<Utc>,
    /// The type's own fields (module docs); never `type`, `user_id`, `event_id`, `position`
    /// or `occurred_at`.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Notification {
    /// A message of `kind` about `user_id` caused by `envelope`, with `fields` (an object;
    /// anything else gives no fields).
    pub fn new(kind: &str, user_id: Uuid, envelope: &EventEnvelope, fields: Value) -> Self {
        let mut fields = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        for reserved in ["type", "user_id", "event_id", "position", "occurred_at"] {
            fields.remove(reserved);
        }
        Notification {
            kind: kind.to_string(),
            user_id,
            event_id: envelope.event_id,
            position: envelope.position,
            occurred_at: envelope.occurred_at,
            fields,
        }
    }

    /// `board` of a [`RANK_CHANGED`] message (`None` for other types).
    pub fn board(&self) -> Option<&str> {
        self.fields.get("board").and_then(Value::as_str)
    }

    /// The JSON text sent to clients.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and a JSON map always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The messages `envelope` (decoded as `event`) causes, except [`RANK_CHANGED`], which needs
/// the leaderboard read model. `quota_warning_percent` is the share of the monthly limit
/// (1..=100) whose crossing gives [`QUOTA_WARNING`]. Pure: the same event always gives the
/// same messages. Events that concern no user's live feed give none.
pub fn notifications(
    envelope: &EventEnvelope,
    event: &Event,
    quota_warning_percent: u64,
) -> Vec<Notification> {
    let one = |kind: &str, user: Uuid, fields: Value| {
        vec![Notification::new(kind, user, envelope, fields)]
    };
    // The payload as the catalog defines it now (upcast), for the forwarded types.
    let payload = || event.to_payload();
    match event {
        Event::XpEarned(e) => one(
            XP_EARNED,
            e.user_id,
            json!({"amount": e.amount, "total_xp": e.total_xp,
                   "source_event_type": e.source_event_type, "tags": e.tags,
                   "area_id": e.area_id}),
        ),
        Event::AchievementUnlocked(e) => one(ACHIEVEMENT_UNLOCKED, e.user_id, payload()),
        Event::QuestCompleted(e) => one(QUEST_COMPLETED, e.user_id, payload()),
        Event::StreakMilestone(e) => one(STREAK_MILESTONE, e.user_id, payload()),
        Event::LevelUp(e) => one(
            LEVEL_UP,
            e.user_id,
            json!({"from_level": e.from_level, "to_level": e.to_level, "total_xp": e.total_xp}),
        ),
        Event::UsageRecorded(e) => match e.limit {
            Some(limit) if crosses(e.used, limit, quota_warning_percent) => one(
                QUOTA_WARNING,
                e.user_id,
                json!({"period": e.period, "tier": e.tier, "used": e.used, "limit": limit,
                       "percent": quota_warning_percent}),
            ),
            _ => vec![],
        },
        Event::QuotaExceeded(e) => one(
            QUOTA_EXCEEDED,
            e.user_id,
            json!({"period": e.period, "tier": e.tier, "used": e.used, "limit": e.limit}),
        ),
        _ => vec![],
    }
}

/// `true` when `used` is the first unit count reaching `percent` % of `limit` (usage grows by
/// one unit per `payment.usage.recorded`, so exactly one record per period crosses).
fn crosses(used: u64, limit: u64, percent: u64) -> bool {
    let reached = |u: u64| u128::from(u) * 100 >= u128::from(limit) * u128::from(percent);
    limit > 0 && used > 0 && reached(used) && !reached(used - 1)
}
