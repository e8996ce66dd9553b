//! User endpoints of issue #6: profile updates, sessions and e-mail verification.
//!
//! | Method | Path | Event |
//! |---|---|---|
//! | PATCH | `/v1/users/{id}` | `user.profile.updated` |
//! | POST | `/v1/sessions` | `user.authenticated` |
//! | POST | `/v1/users/{id}/email/verify` | `user.email.verified` |
//!
//! A user changes only their own profile; an admin may change anyone's. Like every command
//! endpoint they answer 201 with the committed events, 200 when nothing changed, and honour
//! `Idempotency-Key`.

use std::sync::Arc;

use axum::extract::State;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tektree_domain::events::{Preferences, UserProfileUpdated};
use tektree_domain::{NoServices, User, UserCommand};
use uuid::Uuid;

use super::auth::Role;
use super::commands::{meta, run, CommandResponse};
use super::correlation::Correlation;
use super::extract::{ApiJson, ApiPath};
use super::idempotency::IdempotencyHeader;
use super::identity::Principal;
use super::problem::Problem;
use super::security::Security;
use crate::app::App;

/// `PATCH /v1/users/{id}` body: the fields to change (absent = unchanged; at least one).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    /// Display name, 1..=100 characters.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Biography, 0..=2,000 characters.
    #[serde(default)]
    pub bio: Option<String>,
    /// Location, 0..=100 characters.
    #[serde(default)]
    pub location: Option<String>,
    /// `http(s)://` URL of at most 200 characters, or empty to clear.
    #[serde(default)]
    pub website: Option<String>,
    /// New e-mail address (unverified until `POST /v1/users/{id}/email/verify`).
    #[serde(default)]
    pub email: Option<String>,
    /// The whole preferences object (omitted fields take their defaults).
    #[serde(default)]
    pub preferences: Option<Preferences>,
}

/// `POST /v1/sessions` and `POST /v1/users/{id}/email/verify` take an empty JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// The caller may act on `user`: themselves, or any user for an admin.
fn require_self_or_admin(p: &Principal, user: Uuid) -> Result<(), Problem> {
    if p.user == user || p.has_role(Role::Admin) {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "user {} may not change user {user}",
            p.user
        )))
    }
}

/// `PATCH /v1/users/{id}`: changes profile fields of user `id`.
///
/// # Errors
/// 401, 403 (another user, not admin), 404 `not_found.user`, 422 for an empty body or invalid
/// fields.
pub async fn update_profile(
    State(app): State<Arc<App>>,
    principal: Principal,
    correlation: Correlation,
    ApiPath(user_id): ApiPath<Uuid>,
    idem: IdempotencyHeader,
    ApiJson(body): ApiJson<ProfileBody>,
) -> Result<CommandResponse, Problem> {
    require_self_or_admin(&principal, user_id)?;
    if body == ProfileBody::default() {
        return Err(Problem::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "Invalid command",
            "name at least one field to change",
        ));
    }
    let now = Utc::now();
    let key = idem.key(
        Some(principal.user),
        "update_profile",
        &[user_id],
        &body,
        now,
    );
    let cmd = UserCommand::UpdateProfile(UserProfileUpdated {
        user_id,
        display_name: body.display_name,
        bio: body.bio,
        location: body.location,
        website: body.website,
        email: body.email,
        preferences: body.preferences,
    });
    let m = meta(principal.actor(), correlation, now);
    run::<User>(&app, user_id, cmd, &NoServices, &m, key.as_ref()).await
}

/// `POST /v1/sessions`: records that the caller opened a session with this token
/// (`user.authenticated`, `method` = `jwt_hs256` or `jwt_rs256`, `issuer` = the accepted `iss`).
///
/// # Errors
/// 401, 404 `not_found.user` for an unregistered caller.
pub async fn open_session(
    State(app): State<Arc<App>>,
    State(security): State<Arc<Security>>,
    principal: Principal,
    correlation: Correlation,
    idem: IdempotencyHeader,
    ApiJson(body): ApiJson<EmptyBody>,
) -> Result<CommandResponse, Problem> {
    let now = Utc::now();
    let key = idem.key(Some(principal.user), "open_session", &[], &body, now);
    let auth = &security.auth;
    let cmd = UserCommand::Authenticate {
        user_id: principal.user,
        method: format!("jwt_{:?}", auth.algorithm()).to_lowercase(),
        issuer: auth.issuer().to_string(),
    };
    let m = meta(principal.actor(), correlation, now);
    run::<User>(&app, principal.user, cmd, &NoServices, &m, key.as_ref()).await
}

/// `POST /v1/users/{id}/email/verify`: the caller (user `id`) proves their current address with
/// a token whose issuer asserts it: the OpenID Connect claims `email` (equal to the address on
/// the profile) and `email_verified: true`.
///
/// # Errors
/// 401; 403 for another user's id or a token without a verified `email` claim; 404
/// `not_found.user`; 409 when the claimed address is not the profile's current one.
pub async fn verify_email(
    State(app): State<Arc<App>>,
    principal: Principal,
    correlation: Correlation,
    ApiPath(user_id): ApiPath<Uuid>,
    idem: IdempotencyHeader,
    ApiJson(body): ApiJson<EmptyBody>,
) -> Result<CommandResponse, Problem> {
    if principal.user != user_id {
        return Err(Problem::forbidden(format!(
            "user {} may not verify the address of user {user_id}",
            principal.user
        )));
    }
    let Some(email) = principal.verified_email.clone() else {
        return Err(Problem::forbidden(
            "the token carries no verified `email` claim (`email` with `email_verified: true`)",
        ));
    };
    let now = Utc::now();
    let key = idem.key(Some(principal.user), "verify_email", &[user_id], &body, now);
    let cmd = UserCommand::VerifyEmail { user_id, email };
    let m = meta(principal.actor(), correlation, now);
    run::<User>(&app, user_id, cmd, &NoServices, &m, key.as_ref()).await
}
