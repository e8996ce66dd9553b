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

use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use tektree_commands::{CommandError, CommandMeta, Metering, Outcome};
use tektree_domain::events::Preferences;
use tektree_domain::{
    Actor, Content, ContentCommand, DomainError, Event, NoServices, User, UserCommand,
    VoteDirection,
};
use tektree_event_store::IdempotencyKey;
use uuid::Uuid;

use super::correlation::Correlation;
use super::extract::{ApiJson, ApiPath};
use super::idempotency::{IdempotencyHeader, REPLAYED_HEADER};
use super::identity::Principal;
use super::problem::Problem;
use super::security::Security;
use crate::app::App;

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

/// One committed event in a [`CommandResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEvent {
    /// Event id.
    pub event_id: Uuid,
    /// Catalog name, e.g. `knowledge.question.posted`.
    pub event_type: String,
    /// Per-aggregate sequence.
    pub sequence: u64,
    /// Global position.
    pub position: u64,
}

/// Response of every command endpoint (201 with events, 200 without).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// `user` or `content`.
    pub aggregate_type: String,
    /// The aggregate the command ran on.
    pub aggregate_id: Uuid,
    /// Aggregate version after the command.
    pub version: u64,
    /// Events committed by this request; empty for an idempotent repeat.
    pub events: Vec<CommittedEvent>,
    /// Whether this is the stored response of an earlier request with the same
    /// `Idempotency-Key` (sent as the header `Idempotent-Replayed: true`, not in the body).
    #[serde(skip)]
    pub replayed: bool,
}

impl From<Outcome> for CommandResponse {
    fn from(o: Outcome) -> Self {
        CommandResponse {
            aggregate_type: o.aggregate_type.to_string(),
            aggregate_id: o.aggregate_id,
            version: o.version,
            events: o
                .events
                .into_iter()
                .map(|e| CommittedEvent {
                    event_id: e.event_id,
                    event_type: e.event_type,
                    sequence: e.sequence,
                    position: e.position,
                })
                .collect(),
            replayed: false,
        }
    }
}

impl IntoResponse for CommandResponse {
    fn into_response(self) -> Response {
        let status = if self.events.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        let replayed = self.replayed;
        let mut resp = (status, Json(self)).into_response();
        if replayed {
            resp.headers_mut().insert(
                REPLAYED_HEADER,
                axum::http::HeaderValue::from_static("true"),
            );
        }
        resp
    }
}

/// What every command request carries besides its path and body: the authenticated caller,
/// the correlation id, the `Idempotency-Key` header and the time it was received. Extracted in
/// that order (401, then 400 for a malformed key), so a handler only builds its command.
pub struct CommandRequest {
    /// The caller (the command route's guard verified the token).
    pub principal: Principal,
    correlation: Correlation,
    idem: IdempotencyHeader,
    /// When the request was received (UTC): the command's `occurred_at`.
    pub now: DateTime<Utc>,
}

impl<S> FromRequestParts<S> for CommandRequest
where
    Arc<Security>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Ok(correlation) = Correlation::from_request_parts(parts, state).await;
        let idem = IdempotencyHeader::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(CommandRequest {
            principal,
            correlation,
            idem,
            now: Utc::now(),
        })
    }
}

impl CommandRequest {
    /// The caller's user id.
    pub fn user(&self) -> Uuid {
        self.principal.user
    }

    /// The actor of the caller's commands: `Actor::User(user)`.
    pub fn actor(&self) -> Actor {
        self.principal.actor()
    }

    /// The request's idempotency key, scoped to the caller and fingerprinted by `route`, the
    /// `path` ids and the decoded `body` ([`IdempotencyHeader::key`]); `None` without one.
    pub fn key<B: Serialize>(
        &self,
        route: &str,
        path: &[Uuid],
        body: &B,
    ) -> Option<IdempotencyKey> {
        self.idem
            .key(Some(self.user()), route, path, body, self.now)
    }

    /// Runs `command` on `A`/`id` as the caller through [`run`] (the one command path), with
    /// `key` from [`CommandRequest::key`].
    ///
    /// # Errors
    /// The command's refusal as a problem.
    pub async fn run<A>(
        &self,
        app: &App,
        id: Uuid,
        command: A::Command,
        services: &A::Services,
        key: Option<IdempotencyKey>,
    ) -> Result<CommandResponse, Problem>
    where
        A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
        A::Command: Clone + Metering,
    {
        let m = meta(self.actor(), Correlation(self.correlation.0), self.now);
        run::<A>(app, id, command, services, &m, key.as_ref()).await
    }
}

/// Metadata of a request's command: new command id, the request's correlation id, now.
pub(crate) fn meta(actor: Actor, correlation: Correlation, now: DateTime<Utc>) -> CommandMeta {
    CommandMeta {
        command_id: Uuid::new_v4(),
        correlation_id: correlation.0,
        actor,
        occurred_at: now,
    }
}

/// Runs `command` on `A`/`id` through the one command path ([`CommandHandler::submit`]:
/// idempotent replay with `key`, the quota for a user's post, the command), logs and converts
/// the result.
///
/// [`CommandHandler::submit`]: tektree_commands::CommandHandler::submit
pub(crate) async fn run<A>(
    app: &App,
    id: Uuid,
    command: A::Command,
    services: &A::Services,
    meta: &CommandMeta,
    key: Option<&IdempotencyKey>,
) -> Result<CommandResponse, Problem>
where
    A: Aggregate<Event = Event, Error = DomainError> + Clone + 'static,
    A::Command: Clone + Metering,
{
    let (outcome, replayed) = app
        .handler
        .submit::<A>(id, command, services, meta, key)
        .await
        .inspect_err(|e: &CommandError| {
            tracing::info!(code = %e.code(), error = %e, "command refused");
        })?;
    tracing::info!(
        aggregate_type = outcome.aggregate_type,
        aggregate_id = %outcome.aggregate_id,
        version = outcome.version,
        events = outcome.events.len(),
        replayed,
        "command handled"
    );
    Ok(CommandResponse {
        replayed,
        ..outcome.into()
    })
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
