//! Caller identity.
//!
//! Until JWT authentication lands, the caller names itself with the header
//! `X-User-Id: <uuid>`; the command then runs as `Actor::User(<uuid>)`. The header is trusted
//! as is: deploy the API behind a gateway that sets it.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tektree_domain::Actor;
use uuid::Uuid;

use super::problem::Problem;

/// Name of the identity header.
pub const USER_ID_HEADER: &str = "x-user-id";

/// The calling user, required: a missing or invalid `X-User-Id` → 401 `unauthenticated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller(pub Uuid);

impl Caller {
    /// The actor of commands issued by this caller.
    pub fn actor(self) -> Actor {
        Actor::User(self.0)
    }
}

/// The calling user, if any: missing → `None`; present but invalid → 401 `unauthenticated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybeCaller(pub Option<Uuid>);

/// Reads `X-User-Id`: `Ok(None)` when absent, a 401 problem when not a UUID.
pub fn user_id_header(parts: &Parts) -> Result<Option<Uuid>, Problem> {
    let Some(value) = parts.headers.get(USER_ID_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
        .map(Some)
        .ok_or_else(|| Problem::unauthenticated("the X-User-Id header is not a UUID"))
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        user_id_header(parts)?
            .map(Caller)
            .ok_or_else(|| Problem::unauthenticated("the X-User-Id header is required"))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for MaybeCaller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        user_id_header(parts).map(MaybeCaller)
    }
}
