//! Cross-aggregate lookups a [`crate::Content`] command needs, behind a small trait.

use async_trait::async_trait;
use uuid::Uuid;

/// What a command needs to know about an existing question.
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionFacts {
    /// The question's author, if known.
    pub author_id: Option<Uuid>,
    /// The question's tags.
    pub tags: Vec<String>,
    /// The question's area, if any.
    pub area_id: Option<Uuid>,
}

/// What a command needs to know about an existing answer.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerFacts {
    /// The question the answer belongs to.
    pub question_id: Uuid,
    /// The answer's author, if known.
    pub author_id: Option<Uuid>,
}

/// Read-only lookups of other aggregates (cqrs-es `Services`). Questions, answers and users are
/// never deleted and these facts never change, so answering from committed state is safe
/// without a cross-aggregate transaction.
#[async_trait]
pub trait KnowledgeServices: Send + Sync {
    /// The question `id`, or `None` if no question has that id.
    async fn question(&self, id: Uuid) -> Result<Option<QuestionFacts>, String>;
    /// The answer `id`, or `None` if no answer has that id.
    async fn answer(&self, id: Uuid) -> Result<Option<AnswerFacts>, String>;
    /// Whether a user with this id is registered.
    async fn user_exists(&self, id: Uuid) -> Result<bool, String>;
    /// Whether an area with this id exists.
    async fn area_exists(&self, id: Uuid) -> Result<bool, String>;
}

/// Services for aggregates that need none.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoServices;
