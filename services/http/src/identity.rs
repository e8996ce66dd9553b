//! Caller identity, from the verified JWT (issue #4).
//!
//! Every extractor here reads `Authorization: Bearer <JWT>` and verifies it with the
//! application's [`Authenticator`](crate::auth::Authenticator) (`ApiState::security`); the
//! result is cached in the request's extensions, so several extractors (and the command guard
//! of [`security`](super::security)) verify a token once per request. The `X-User-Id` header of
//! the pre-JWT API is no longer read.
//!
//! | extractor | needs | rejection |
//! |---|---|---|
//! | [`Principal`] | a valid token | 401 `unauthenticated` + `WWW-Authenticate: Bearer` |
//! | [`Caller`] | a valid token (the user is `sub`) | 401 as above |
//! | [`Moderator`] | role `moderator` or `admin` | 401 as above; 403 `forbidden` |
//! | [`Admin`] | role `admin` | 401 as above; 403 `forbidden` |

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use tektree_domain::Actor;
use uuid::Uuid;

use crate::auth::{AuthError, Role};
use crate::security::Security;

/// The authenticated caller: the token's `sub` and its roles (sorted, without duplicates;
/// `[User]` when the token carries none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user (`sub`).
    pub user: Uuid,
    /// Roles (`roles` claim).
    pub roles: Vec<Role>,
    /// The `email` claim when the token also carries `email_verified: true` (OpenID Connect
    /// Core 1.0 §5.1 standard claims), else `None`. Read by `POST /v1/users/{id}/email/verify`.
    pub verified_email: Option<String>,
}

impl Principal {
    /// Whether the caller holds `role` or a higher one (`admin` ⊇ `moderator` ⊇ `user`); every
    /// caller is a `user`.
    pub fn has_role(&self, role: Role) -> bool {
        role == Role::User || self.roles.iter().any(|r| *r >= role)
    }

    /// The actor of commands issued by this caller: `Actor::User(user)`.
    pub fn actor(&self) -> Actor {
        Actor::User(self.user)
    }

    /// Verifies the request's bearer token once (cached in the extensions).
    async fn from_parts(parts: &mut Parts, security: &Security) -> Result<Principal, AuthError> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        let p = security.auth.authenticate(&parts.headers)?;
        parts.extensions.insert(p.clone());
        Ok(p)
    }

    /// [`AuthError::Forbidden`] unless the caller holds `role` (see [`has_role`](Self::has_role)).
    ///
    /// # Errors
    /// 403 `forbidden` naming the missing role.
    pub fn require(&self, role: Role) -> Result<(), AuthError> {
        if self.has_role(role) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "this operation requires the `{role}` role"
            )))
        }
    }
}

impl<S> FromRequestParts<S> for Principal
where
    Arc<Security>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let security = Arc::<Security>::from_ref(state);
        Principal::from_parts(parts, &security).await
    }
}

/// The calling user (`sub` of a valid token), required: a missing or invalid token → 401
/// `unauthenticated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller(pub Uuid);

impl Caller {
    /// The actor of commands issued by this caller.
    pub fn actor(self) -> Actor {
        Actor::User(self.0)
    }
}

impl<S> FromRequestParts<S> for Caller
where
    Arc<Security>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Principal::from_request_parts(parts, state)
            .await
            .map(|p| Caller(p.user))
    }
}

/// A caller with role `moderator` or `admin`; otherwise 403 `forbidden` (401 without a valid
/// token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moderator(pub Principal);

impl<S> FromRequestParts<S> for Moderator
where
    Arc<Security>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let p = Principal::from_request_parts(parts, state).await?;
        p.require(Role::Moderator)?;
        Ok(Moderator(p))
    }
}

/// A caller with role `admin`; otherwise 403 `forbidden` (401 without a valid token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin(pub Principal);

impl<S> FromRequestParts<S> for Admin
where
    Arc<Security>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let p = Principal::from_request_parts(parts, state).await?;
        p.require(Role::Admin)?;
        Ok(Admin(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_cumulative() {
        let p = |roles: Vec<Role>| Principal {
            user: Uuid::new_v4(),
            roles,
            verified_email: None,
        };
        let user = p(vec![Role::User]);
        let moderator = p(vec![Role::Moderator]);
        let admin = p(vec![Role::Admin]);
        assert!(user.has_role(Role::User) && !user.has_role(Role::Moderator));
        assert!(moderator.has_role(Role::Moderator) && !moderator.has_role(Role::Admin));
        assert!(admin.has_role(Role::Moderator) && admin.has_role(Role::Admin));
        assert!(matches!(
            user.require(Role::Moderator),
            Err(AuthError::Forbidden(_))
        ));
        assert!(admin.require(Role::Admin).is_ok());
    }
}
