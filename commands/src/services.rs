//! [`KnowledgeServices`] answered from the event store.

use async_trait::async_trait;
use tektree_domain::aggregates::content::ContentKind;
use tektree_domain::{AnswerFacts, Area, Content, KnowledgeServices, QuestionFacts, User};
use uuid::Uuid;

use crate::handler::CommandHandler;

/// Looks up questions, answers, users and areas by loading their aggregates.
#[derive(Clone)]
pub struct StoreServices {
    handler: CommandHandler,
}

impl StoreServices {
    /// Lookups through `handler`'s store.
    pub fn new(handler: CommandHandler) -> Self {
        StoreServices { handler }
    }
}

#[async_trait]
impl KnowledgeServices for StoreServices {
    async fn question(&self, id: Uuid) -> Result<Option<QuestionFacts>, String> {
        let (c, _) = self
            .handler
            .load::<Content>(id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(match c.kind {
            Some(ContentKind::Question { .. }) => Some(QuestionFacts {
                author_id: c.author_id,
                tags: c.tags,
                area_id: c.area_id,
            }),
            _ => None,
        })
    }

    async fn answer(&self, id: Uuid) -> Result<Option<AnswerFacts>, String> {
        let (c, _) = self
            .handler
            .load::<Content>(id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(match c.kind {
            Some(ContentKind::Answer { question_id }) => Some(AnswerFacts {
                question_id,
                author_id: c.author_id,
            }),
            _ => None,
        })
    }

    async fn user_exists(&self, id: Uuid) -> Result<bool, String> {
        let (u, _) = self
            .handler
            .load::<User>(id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(u.display_name.is_some())
    }

    async fn area_exists(&self, id: Uuid) -> Result<bool, String> {
        let (a, _) = self
            .handler
            .load::<Area>(id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(a.created.is_some())
    }
}
