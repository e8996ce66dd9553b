//! Payloads of the `user.*` events (aggregate `user`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user's preferences (issue #6). Every field has a default, so an object may name only the
/// fields it sets; unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Preferences {
    /// Send notification e-mails. Default `true`.
    pub email_notifications: bool,
    /// Send the weekly digest e-mail. Default `false`.
    pub weekly_digest: bool,
    /// Interface language, a BCP 47 tag of 2..=35 characters. Default `"en"`.
    pub language: String,
    /// Show the profile to anonymous readers. Default `true`.
    pub profile_public: bool,
}

impl Default for Preferences {
    fn default() -> Self {
        Preferences {
            email_notifications: true,
            weekly_digest: false,
            language: "en".into(),
            profile_public: true,
        }
    }
}

/// `user.registered` (version 2): a user joined. Aggregate: `user`.
///
/// Version 1 had no `preferences`; its upcaster fills in [`Preferences::default`]
/// (see [`crate::upcast`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRegistered {
    /// The new user's id (= aggregate id).
    pub user_id: Uuid,
    /// Public display name, 1..=100 characters.
    pub display_name: String,
    /// Preferences at registration.
    pub preferences: Preferences,
}

/// `user.profile.updated`: some profile fields changed. Aggregate: `user`. Only changed fields
/// are present (absent = unchanged); at least one is present.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserProfileUpdated {
    /// The user (= aggregate id).
    pub user_id: Uuid,
    /// New display name, 1..=100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// New biography, 0..=2,000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bio: Option<String>,
    /// New location, 0..=100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// New website, an `http(s)://` URL of at most 200 characters, or empty to clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub website: Option<String>,
    /// New e-mail address (at most 254 characters, one `@`); it is unverified until a
    /// `user.email.verified` names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// New preferences (the whole object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferences: Option<Preferences>,
}

/// `user.authenticated`: the user opened a session with a verified token. Aggregate: `user`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserAuthenticated {
    /// The user (= aggregate id).
    pub user_id: Uuid,
    /// How: `jwt_hs256` or `jwt_rs256`.
    pub method: String,
    /// The token's issuer (`iss`).
    pub issuer: String,
}

/// `user.email.verified`: the user's current e-mail address was verified. Aggregate: `user`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEmailVerified {
    /// The user (= aggregate id).
    pub user_id: Uuid,
    /// The verified address (the user's current one).
    pub email: String,
}
