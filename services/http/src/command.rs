//! What every command endpoint shares: the [`CommandRequest`] extractor (caller, correlation
//! id, `Idempotency-Key`, time received), the one way to run its command ([`run`], over
//! [`CommandHandler::submit`](tektree_commands::CommandHandler::submit)) and the
//! [`CommandResponse`] (201 with the committed events, 200 for a repeat that changed nothing,
//! `Idempotent-Replayed: true` for a stored response).

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use tektree_commands::{CommandError, CommandMeta, Metering, Outcome};
use tektree_domain::{Actor, DomainError, Event, EventEnvelope};
use tektree_event_store::IdempotencyKey;
use tektree_runtime::app::App;
use uuid::Uuid;

use crate::correlation::Correlation;
use crate::idempotency::{IdempotencyHeader, REPLAYED_HEADER};
use crate::identity::Principal;
use crate::problem::Problem;
use crate::security::Security;

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

impl From<EventEnvelope> for CommittedEvent {
    fn from(e: EventEnvelope) -> Self {
        CommittedEvent {
            event_id: e.event_id,
            event_type: e.event_type,
            sequence: e.sequence,
            position: e.position,
        }
    }
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
    /// The global position of the last event of `events`; for a repeat that committed nothing,
    /// the store's last position when it was answered (at or after the earlier request's
    /// events). Send it back as `?min_position=` or `X-Min-Position` to read your own write
    /// ([`crate::fresh`]).
    #[serde(default)]
    pub position: u64,
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
            position: o.events.last().map_or(0, |e| e.position),
            events: o.events.into_iter().map(CommittedEvent::from).collect(),
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
pub fn meta(actor: Actor, correlation: Correlation, now: DateTime<Utc>) -> CommandMeta {
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
pub async fn run<A>(
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
    let mut response = CommandResponse {
        replayed,
        ..outcome.into()
    };
    if response.events.is_empty() {
        response.position = app.store.last_position().await?;
    }
    Ok(response)
}
