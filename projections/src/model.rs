//! Read-model rows, as returned by queries and written by `tektree export`.
//! Field names are the public HTTP/JSON contract.

use serde::{Deserialize, Serialize};
use tektree_domain::Tier;
use uuid::Uuid;

/// The four read models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadModel {
    /// `xp`: [`XpRow`].
    Xp,
    /// `leaderboard`: [`LeaderboardRow`] plus `board`.
    Leaderboard,
    /// `quota`: [`QuotaRow`].
    Quota,
    /// `content`: [`ContentRow`].
    Content,
}

impl std::str::FromStr for ReadModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xp" => Ok(ReadModel::Xp),
            "leaderboard" => Ok(ReadModel::Leaderboard),
            "quota" => Ok(ReadModel::Quota),
            "content" => Ok(ReadModel::Content),
            _ => Err(format!(
                "unknown read model {s:?}: expected xp, leaderboard, quota or content"
            )),
        }
    }
}

/// `GET /v1/users/{id}/xp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XpRow {
    /// The user.
    pub user_id: Uuid,
    /// XP total (may be negative).
    pub xp: i64,
    /// `⌊√(max(xp,0)/100)⌋ + 1`.
    pub level: u32,
    /// Questions posted.
    pub questions: u64,
    /// Answers submitted.
    pub answers: u64,
    /// The user's answers that were accepted.
    pub accepted_answers: u64,
}

/// One entry of a leaderboard page or a rank query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderboardRow {
    /// `all-time`, `weekly:YYYY-Www` or `tag:NAME`.
    pub board: String,
    /// 1-based rank: XP descending, then user id ascending.
    pub rank: u64,
    /// The user.
    pub user_id: Uuid,
    /// XP earned on this board.
    pub xp: i64,
}

/// `GET /v1/users/{id}/quota`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaRow {
    /// The user.
    pub user_id: Uuid,
    /// `YYYY-MM` (UTC).
    pub period: String,
    /// Tier in force.
    pub tier: Tier,
    /// Metered units used in the period.
    pub used: u64,
    /// Monthly limit; `null` = unlimited.
    pub limit: Option<u64>,
    /// Whether `payment.quota.exceeded` was emitted for the period.
    pub exceeded: bool,
}

/// `GET /v1/content/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentRow {
    /// Question or answer id.
    pub content_id: Uuid,
    /// `question` or `answer`; `null` if only counters arrived so far.
    pub kind: Option<String>,
    /// For answers: the question.
    pub question_id: Option<Uuid>,
    /// Author, if known.
    pub author_id: Option<Uuid>,
    /// `upvotes − downvotes`.
    pub score: i64,
    /// Current upvotes.
    pub upvotes: i64,
    /// Current downvotes.
    pub downvotes: i64,
    /// Answers (questions only; 0 for answers).
    pub answer_count: i64,
    /// Comments on this content.
    pub comment_count: i64,
    /// Accepted answer (questions only).
    pub accepted_answer_id: Option<Uuid>,
}

/// A consumer's progress: `GET /v1/projections`, `tektree-replay status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Consumer name (`xp`, `leaderboard`, `quota`, `content`, `policy.gamification`, …).
    pub name: String,
    /// Low-water mark: every event with position ≤ this is applied.
    pub checkpoint: u64,
    /// Number of events applied.
    pub applied: u64,
}
