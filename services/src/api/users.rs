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
use serde::{Deserialize, Serialize};
use tektree_domain::events::{Preferences, UserProfileUpdated};
use tektree_domain::{NoServices, User, UserCommand};
use uuid::Uuid;

use super::auth::Role;
use super::commands::{CommandRequest, CommandResponse};
use super::extract::{ApiJson, ApiPath};
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
    req: CommandRequest,
    ApiPath(user_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<ProfileBody>,
) -> Result<CommandResponse, Problem> {
    require_self_or_admin(&req.principal, user_id)?;
    if body == ProfileBody::default() {
        return Err(Problem::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "Invalid command",
            "name at least one field to change",
        ));
    }
    let key = req.key("update_profile", &[user_id], &body);
    let cmd = UserCommand::UpdateProfile(UserProfileUpdated {
        user_id,
        display_name: body.display_name,
        bio: body.bio,
        location: body.location,
        website: body.website,
        email: body.email,
        preferences: body.preferences,
    });
    req.run::<User>(&app, user_id, cmd, &NoServices, key).await
}

/// `POST /v1/sessions`: records that the caller opened a session with this token
/// (`user.authenticated`, `method` = `jwt_hs256` or `jwt_rs256`, `issuer` = the accepted `iss`).
///
/// # Errors
/// 401, 404 `not_found.user` for an unregistered caller.
pub async fn open_session(
    State(app): State<Arc<App>>,
    State(security): State<Arc<Security>>,
    req: CommandRequest,
    ApiJson(body): ApiJson<EmptyBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("open_session", &[], &body);
    let auth = &security.auth;
    let cmd = UserCommand::Authenticate {
        user_id: req.user(),
        method: format!("jwt_{:?}", auth.algorithm()).to_lowercase(),
        issuer: auth.issuer().to_string(),
    };
    req.run::<User>(&app, req.user(), cmd, &NoServices, key)
        .await
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
    req: CommandRequest,
    ApiPath(user_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<EmptyBody>,
) -> Result<CommandResponse, Problem> {
    if req.user() != user_id {
        return Err(Problem::forbidden(format!(
            "user {} may not verify the address of user {user_id}",
            req.user()
        )));
    }
    let Some(email) = req.principal.verified_email.clone() else {
        return Err(Problem::forbidden(
            "the token carries no verified `email` claim (`email` with `email_verified: true`)",
        ));
    };
    let key = req.key("verify_email", &[user_id], &body);
    let cmd = UserCommand::VerifyEmail { user_id, email };
    req.run::<User>(&app, user_id, cmd, &NoServices, key).await
}
