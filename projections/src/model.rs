//! Read-model rows, as returned by queries and written by `tektree export`.
//! Field names are the public HTTP/JSON contract.

use serde::{Deserialize, Serialize};
use tektree_domain::Tier;
use uuid::Uuid;

/// The read models.
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
    /// `tags`: [`TagRow`].
    Tags,
}

impl ReadModel {
    /// Every read model, in the order of [`Projection::ALL`](crate::Projection::ALL) (each is
    /// the read model of the projection with the same name).
    pub const ALL: [ReadModel; 5] = [
        ReadModel::Xp,
        ReadModel::Leaderboard,
        ReadModel::Quota,
        ReadModel::Content,
        ReadModel::Tags,
    ];

    /// The name, as `tektree export` takes it: `xp`, `leaderboard`, `quota`, `content`, `tags`.
    pub const fn name(self) -> &'static str {
        match self {
            ReadModel::Xp => "xp",
            ReadModel::Leaderboard => "leaderboard",
            ReadModel::Quota => "quota",
            ReadModel::Content => "content",
            ReadModel::Tags => "tags",
        }
    }

    /// The fields of the model's rows in output order (the HTTP field names): the columns of
    /// `tektree export --format csv`. Kept beside the row types, so a new read model is
    /// described in this one file.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            ReadModel::Xp => &[
                "user_id",
                "xp",
                "level",
                "questions",
                "answers",
                "accepted_answers",
            ],
            ReadModel::Leaderboard => &["board", "rank", "user_id", "xp"],
            ReadModel::Quota => &["user_id", "period", "tier", "used", "limit", "exceeded"],
            ReadModel::Content => &[
                "content_id",
                "kind",
                "question_id",
                "author_id",
                "score",
                "upvotes",
                "downvotes",
                "answer_count",
                "comment_count",
                "accepted_answer_id",
            ],
            ReadModel::Tags => &["tag", "questions", "answers"],
        }
    }
}

impl std::str::FromStr for ReadModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ReadModel::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown read model {s:?}: expected xp, leaderboard, quota, content or tags"
                )
            })
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

/// `GET /v1/tags/{tag}`: how much a tag is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRow {
    /// The tag, lower case (as questions carry it).
    pub tag: String,
    /// Questions posted with the tag.
    pub questions: u64,
    /// Answers submitted to questions with the tag.
    pub answers: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The CSV columns are the fields of the rows the queries and the JSON export return.
    #[test]
    fn columns_are_the_fields_of_each_row() {
        let id = Uuid::from_u128(1);
        let rows = [
            (
                ReadModel::Xp,
                serde_json::to_value(XpRow {
                    user_id: id,
                    xp: 1,
                    level: 1,
                    questions: 0,
                    answers: 0,
                    accepted_answers: 0,
                }),
            ),
            (
                ReadModel::Leaderboard,
                serde_json::to_value(LeaderboardRow {
                    board: "all-time".into(),
                    rank: 1,
                    user_id: id,
                    xp: 1,
                }),
            ),
            (
                ReadModel::Quota,
                serde_json::to_value(QuotaRow {
                    user_id: id,
                    period: "2026-12".into(),
                    tier: Tier::Free,
                    used: 0,
                    limit: None,
                    exceeded: false,
                }),
            ),
            (
                ReadModel::Content,
                serde_json::to_value(ContentRow {
                    content_id: id,
                    kind: None,
                    question_id: None,
                    author_id: None,
                    score: 0,
                    upvotes: 0,
                    downvotes: 0,
                    answer_count: 0,
                    comment_count: 0,
                    accepted_answer_id: None,
                }),
            ),
            (
                ReadModel::Tags,
                serde_json::to_value(TagRow {
                    tag: "rust".into(),
                    questions: 0,
                    answers: 0,
                }),
            ),
        ];
        for (model, row) in rows {
            let row = row.unwrap();
            let mut fields: Vec<&str> = row
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let mut columns = model.columns().to_vec();
            fields.sort_unstable();
            columns.sort_unstable();
            assert_eq!(columns, fields, "{model:?}");
        }
    }
}
