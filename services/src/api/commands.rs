//! Command endpoints: registration, questions, answers, comments, votes, accepting.
//!
//! Each request becomes one command on one aggregate, run by the
//! [`CommandHandler`](tektree_commands::CommandHandler) with `occurred_at` = now (UTC), a new
//! `command_id` (the causation id of the events) and the request's correlation id. A command
//! that commits events answers **201**; one that changes nothing (an identical repeat) answers
//! **200** with an empty `events` list. Nothing is written when a command is refused.
//!
//! Every endpoint honours `Idempotency-Key` ([`super::idempotency`]): a retry with the same key
//! and request gets the first response again (with `Idempotent-Replayed: true`) and writes
//! nothing.

use std::sync::Arc;

use axum::extract::State;
use serde::{Deserialize, Serialize};
use tektree_domain::events::Preferences;
use tektree_domain::{Content, ContentCommand, NoServices, User, UserCommand, VoteDirection};
use uuid::Uuid;

use super::extract::{ApiJson, ApiPath};
use super::problem::Problem;
use crate::app::App;
pub use tektree_http::command::{meta, run, CommandRequest, CommandResponse, CommittedEvent};

/// `POST /v1/users` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// The new user's id; defaults to the token's subject (`sub`) and must equal it when given:
    /// a user registers only themselves.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// Display name, 1..=100 characters.
    pub display_name: String,
    /// Preferences; omitted fields take their defaults (issue #6).
    #[serde(default)]
    pub preferences: Option<Preferences>,
}

/// `POST /v1/questions` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionBody {
    /// Question id; default a new v4.
    #[serde(default)]
    pub question_id: Option<Uuid>,
    /// Title, 1..=300 characters.
    pub title: String,
    /// Body text.
    pub body: String,
    /// At most 10 tags (normalised to lower case).
    pub tags: Vec<String>,
    /// The knowledge area; it must exist (404 `not_found.area`).
    #[serde(default)]
    pub area_id: Option<Uuid>,
}

/// `POST /v1/questions/{id}/answers` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    /// Answer id; default a new v4.
    #[serde(default)]
    pub answer_id: Option<Uuid>,
    /// Body text, at least 1 character.
    pub body: String,
}

/// `POST /v1/content/{id}/comments` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommentBody {
    /// Comment id; default a new v4.
    #[serde(default)]
    pub comment_id: Option<Uuid>,
    /// Text, 1..=600 characters.
    pub text: String,
}

/// `POST /v1/content/{id}/votes` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoteBody {
    /// `up` or `down`.
    pub direction: VoteDirection,
}

/// `POST /v1/questions/{id}/accept` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptBody {
    /// The accepted answer; it must belong to the question.
    pub answer_id: Uuid,
}

/// `POST /v1/users`: registers a user (actor = the registered user).
///
/// # Errors
/// 401 without a valid token, 403 when `user_id` is not the token's subject, 409 for an
/// existing id with another display name, 422 for an invalid name.
pub async fn register(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("register", &[], &body);
    let user_id = req.user();
    if let Some(b) = body.user_id.filter(|b| *b != user_id) {
        return Err(Problem::forbidden(format!(
            "the token's subject {user_id} may not register user {b}"
        )));
    }
    let cmd = UserCommand::Register {
        user_id,
        display_name: body.display_name,
        preferences: body.preferences.unwrap_or_default(),
    };
    req.run::<User>(&app, user_id, cmd, &NoServices, key).await
}

/// `POST /v1/questions`: posts a question authored by the caller.
///
/// # Errors
/// 401 without a valid token, 404 when the caller is not registered, 409 when the id is taken by
/// other content, 422 for invalid fields, 429 over quota.
pub async fn post_question(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiJson(body): ApiJson<QuestionBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("post_question", &[], &body);
    let question_id = body.question_id.unwrap_or_else(Uuid::new_v4);
    let cmd = ContentCommand::PostQuestion {
        question_id,
        author_id: Some(req.user()),
        title: body.title,
        body: body.body,
        tags: body.tags,
        area_id: body.area_id,
        actor: req.actor(),
    };
    req.run::<Content>(&app, question_id, cmd, &app.knowledge, key)
        .await
}

/// `POST /v1/questions/{id}/answers`: answers question `id` as the caller.
///
/// # Errors
/// 401, 404 (`not_found.question`, `not_found.user`), 409, 422, 429.
pub async fn submit_answer(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiPath(question_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AnswerBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("submit_answer", &[question_id], &body);
    let answer_id = body.answer_id.unwrap_or_else(Uuid::new_v4);
    let cmd = ContentCommand::SubmitAnswer {
        answer_id,
        question_id,
        author_id: Some(req.user()),
        body: body.body,
        actor: req.actor(),
    };
    req.run::<Content>(&app, answer_id, cmd, &app.knowledge, key)
        .await
}

/// `POST /v1/content/{id}/comments`: comments on question or answer `id` as the caller.
///
/// # Errors
/// 401, 404 (`not_found.content`, `not_found.user`), 422, 429.
pub async fn add_comment(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiPath(content_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CommentBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("add_comment", &[content_id], &body);
    let comment_id = body.comment_id.unwrap_or_else(Uuid::new_v4);
    let cmd = ContentCommand::AddComment {
        content_id,
        comment_id,
        author_id: Some(req.user()),
        text: body.text,
        actor: req.actor(),
    };
    req.run::<Content>(&app, content_id, cmd, &app.knowledge, key)
        .await
}

/// `POST /v1/content/{id}/votes`: the caller votes on question or answer `id`; a vote in the
/// other direction replaces the caller's earlier vote, the same vote again is a no-op (200).
///
/// # Errors
/// 401, 404 (`not_found.content`, `not_found.user`), 422.
pub async fn vote(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiPath(content_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<VoteBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("vote", &[content_id], &body);
    let cmd = ContentCommand::Vote {
        content_id,
        voter_id: req.user(),
        direction: body.direction,
        actor: req.actor(),
    };
    req.run::<Content>(&app, content_id, cmd, &app.knowledge, key)
        .await
}

/// `POST /v1/questions/{id}/accept`: the question's author accepts an answer.
///
/// # Errors
/// 401, 403 when the caller is not the question's author, 404 (`not_found.question`,
/// `not_found.answer`), 409 when another answer is accepted or the answer belongs to another
/// question.
pub async fn accept_answer(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiPath(question_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AcceptBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("accept_answer", &[question_id], &body);
    let cmd = ContentCommand::AcceptAnswer {
        question_id,
        answer_id: body.answer_id,
        actor: req.actor(),
    };
    req.run::<Content>(&app, question_id, cmd, &app.knowledge, key)
        .await
}
