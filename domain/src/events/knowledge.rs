//! Payloads of the `knowledge.*` events (aggregates `area` and `content`).
//!
//! Every content event carries the content's `area_id` (absent when the content belongs to no
//! area, and in events stored before areas existed) so that `area:ID` leaderboards need no
//! lookup.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

/// `knowledge.area.created`: a knowledge area that groups content. Aggregate: `area`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AreaCreated {
    /// Area id (= aggregate id).
    pub area_id: Uuid,
    /// Name, 1..=100 characters.
    pub name: String,
    /// URL slug: 1..=60 characters of `a-z`, `0-9` and `-`.
    pub slug: String,
    /// Description, 0..=2,000 characters.
    pub description: String,
    /// The moderator or admin who created it; `None` for system actors.
    pub created_by: Option<Uuid>,
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
    /// The area, if any (it existed when the question was posted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
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
    /// The question's area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
}

/// `knowledge.discussion.started`: an open-ended discussion thread. Aggregate: `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscussionStarted {
    /// Discussion id (= aggregate id).
    pub discussion_id: Uuid,
    /// Author.
    pub author_id: Option<Uuid>,
    /// Title, 1..=300 characters.
    pub title: String,
    /// Body, at most 65,536 bytes.
    pub body: String,
    /// Tags (as for questions).
    pub tags: Vec<String>,
    /// The area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
}

/// `knowledge.insight.shared`: a short piece of knowledge shared without a question.
/// Aggregate: `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsightShared {
    /// Insight id (= aggregate id).
    pub insight_id: Uuid,
    /// Author.
    pub author_id: Option<Uuid>,
    /// Title, 1..=300 characters.
    pub title: String,
    /// Body, 1..=65,536 bytes.
    pub body: String,
    /// Tags.
    pub tags: Vec<String>,
    /// The area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
}

/// `knowledge.resource.uploaded`: a file's metadata and content hash. The bytes stay outside
/// the event store (object storage at `storage_url`). Aggregate: `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceUploaded {
    /// Resource id (= aggregate id).
    pub resource_id: Uuid,
    /// Uploader.
    pub author_id: Option<Uuid>,
    /// Title, 1..=300 characters.
    pub title: String,
    /// Original file name, 1..=255 characters, no `/`.
    pub file_name: String,
    /// Media type (RFC 6838 `type/subtype`), e.g. `application/pdf`.
    pub media_type: String,
    /// Size in bytes (≥ 1).
    pub size_bytes: u64,
    /// SHA-256 of the bytes, 64 lower-case hex digits.
    pub sha256: String,
    /// Where the bytes are stored (`https://` or `s3://` URL), if already known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_url: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// The area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
}

/// `knowledge.comment.added`. Aggregate: `content` (id = the commented content).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommentAdded {
    /// Comment id (unique per content aggregate).
    pub comment_id: Uuid,
    /// The commented content (= aggregate id).
    pub content_id: Uuid,
    /// Comment author, if known.
    pub author_id: Option<Uuid>,
    /// Comment text, at most 65,536 bytes.
    pub text: String,
    /// Tags of the content (its question's tags for an answer).
    pub tags: Vec<String>,
    /// The content's area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
}

/// `knowledge.content.upvoted` / `knowledge.content.downvoted`. Aggregate: `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentVoted {
    /// The voted content (= aggregate id).
    pub content_id: Uuid,
    /// The voter: a user id, or for anonymous source votes (Stack Exchange dumps) the vote id.
    pub voter_id: Uuid,
    /// The voter's earlier vote on this content that this vote replaces (one vote per voter).
    pub previous: Option<VoteDirection>,
    /// Author of the voted content, if known.
    pub content_author_id: Option<Uuid>,
    /// Tags of the content.
    pub tags: Vec<String>,
    /// The content's area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
    /// `true` when the voted content is an answer (drives the "answer reaching score 10"
    /// achievement). Absent (false) in events stored before issue #6.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_answer: bool,
    /// The content's score (upvotes − downvotes) right after this vote, as the content
    /// aggregate counted it. Absent in events stored before issue #6. With it, whether an
    /// answer ever reached a score does not depend on the order in which the votes reach a
    /// consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<i64>,
}

/// `knowledge.content.liked`: a user liked content (once per user and content). Aggregate:
/// `content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentLiked {
    /// The liked content (= aggregate id).
    pub content_id: Uuid,
    /// Who liked it.
    pub user_id: Uuid,
    /// Author of the content, if known.
    pub content_author_id: Option<Uuid>,
    /// Tags of the content.
    pub tags: Vec<String>,
    /// The content's area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
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
    /// The question's area, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area_id: Option<Uuid>,
}
