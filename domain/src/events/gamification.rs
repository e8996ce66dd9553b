//! Payloads of the `gamification.*` events (aggregate `profile`).

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the recipient of an XP award did (or had done to their content), recorded on
/// `gamification.xp.earned` so that the profile can count towards achievements, quests and
/// streaks from its own events (issue #6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Activity {
    /// Posted a question.
    Question,
    /// Submitted an answer.
    Answer {
        /// The answer.
        answer_id: Uuid,
    },
    /// Added a comment.
    Comment,
    /// Started a discussion.
    Discussion,
    /// Shared an insight.
    Insight,
    /// Uploaded a resource.
    Resource,
    /// One of the recipient's answers was accepted.
    AnswerAccepted {
        /// The answer.
        answer_id: Uuid,
    },
    /// A vote on one of the recipient's answers changed its score by `score_delta`
    /// (−2..=2: a vote replacing the opposite vote moves the score by 2) to `score`.
    AnswerVote {
        /// The answer.
        answer_id: Uuid,
        /// Score change.
        score_delta: i64,
        /// The answer's score after the vote (the vote event's `score`); absent when the vote
        /// event predates it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        score: Option<i64>,
    },
}

impl Activity {
    /// The counter name of the activity (`question`, `answer`, `comment`, `discussion`,
    /// `insight`, `resource`, `accepted_answer`, `answer_vote`), as used by
    /// [`crate::gamification::Condition::Count`].
    pub fn counter(&self) -> &'static str {
        match self {
            Activity::Question => "question",
            Activity::Answer { .. } => "answer",
            Activity::Comment => "comment",
            Activity::Discussion => "discussion",
            Activity::Insight => "insight",
            Activity::Resource => "resource",
            Activity::AnswerAccepted { .. } => "accepted_answer",
            Activity::AnswerVote { .. } => "answer_vote",
        }
    }

    /// Whether the activity is something the user authored themselves: only those make a UTC
    /// day an *active day* of a streak (votes and accepts received do not).
    pub fn is_authored(&self) -> bool {
        !matches!(
            self,
            Activity::AnswerAccepted { .. } | Activity::AnswerVote { .. }
        )
    }
}

/// `gamification.xp.earned`. Aggregate: `profile` (id = user id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XpEarned {
    /// The user awarded (= aggregate id).
    pub user_id: Uuid,
    /// XP delta; negative for a downvote, 0 when only `activity` is recorded. Units: XP points.
    pub amount: i64,
    /// The domain event that earned it.
    pub source_event_id: Uuid,
    /// `event_type` of the source event.
    pub source_event_type: String,
    /// `occurred_at` of the source event (drives weekly leaderboards, quests and streaks).
    pub source_occurred_at: DateTime<Utc>,
    /// Tags of the content involved (drives `tag:NAME` leaderboards).
    pub tags: Vec<String>,
    /// XP total after this award.
    pub total_xp: i64,
    /// Area of the content involved, if any (drives `area:ID` leaderboards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
    /// What the user did, if the source is an activity that counts towards achievements.
    /// Absent in events stored before issue #6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<Activity>,
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

/// `gamification.achievement.unlocked`: exactly once per user and achievement (issue #6).
/// Aggregate: `profile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AchievementUnlocked {
    /// The user (= aggregate id).
    pub user_id: Uuid,
    /// Achievement id from the rules (e.g. `first-answer`).
    pub achievement_id: String,
    /// Its display name.
    pub name: String,
    /// XP the gamification policy awards for it (source = this event).
    pub xp_reward: i64,
    /// The domain event whose activity completed the condition.
    pub source_event_id: Uuid,
    /// `occurred_at` of that event.
    pub unlocked_at: DateTime<Utc>,
}

/// `gamification.quest.completed`: once per user, quest and period. Aggregate: `profile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestCompleted {
    /// The user (= aggregate id).
    pub user_id: Uuid,
    /// Quest id from the rules (e.g. `weekly-answers`).
    pub quest_id: String,
    /// Its display name.
    pub name: String,
    /// The period completed: ISO week `YYYY-Www` for weekly quests, `once` for one-off quests.
    pub period: String,
    /// XP the gamification policy awards for it.
    pub xp_reward: i64,
    /// The domain event whose activity completed it.
    pub source_event_id: Uuid,
    /// `occurred_at` of that event.
    pub completed_at: DateTime<Utc>,
}

/// `gamification.streak.milestone`: the user's longest run of consecutive active UTC days
/// reached `days` for the first time. Aggregate: `profile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreakMilestone {
    /// The user (= aggregate id).
    pub user_id: Uuid,
    /// The milestone reached (one of the rules' `streak_milestones`).
    pub days: u32,
    /// First UTC day of the run that reached it.
    pub first_day: NaiveDate,
    /// Last UTC day of that run (its length is ≥ `days`).
    pub last_day: NaiveDate,
    /// The domain event whose day completed the run.
    pub source_event_id: Uuid,
}
