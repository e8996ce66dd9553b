//! The `user` aggregate: registration, profile, sessions and e-mail verification.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::check_text;
use crate::error::DomainError;
use crate::events::{
    Event, Preferences, UserAuthenticated, UserEmailVerified, UserProfileUpdated, UserRegistered,
};
use crate::services::NoServices;

/// A registered user. Aggregate type `user`, id = user id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// `Some` once registered.
    pub display_name: Option<String>,
    /// Biography.
    pub bio: String,
    /// Location.
    pub location: String,
    /// Website URL.
    pub website: String,
    /// Current e-mail address, if any.
    pub email: Option<String>,
    /// Whether `email` is verified.
    pub email_verified: bool,
    /// Preferences.
    pub preferences: Preferences,
    /// Sessions opened (`user.authenticated` events).
    pub sessions: u64,
}

/// Commands on [`User`].
#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    /// Register `user_id` with a display name (1..=100 characters). Repeating a registration
    /// with the same name is a no-op; a different name for an existing id is a conflict.
    Register {
        /// The id (= aggregate id).
        user_id: Uuid,
        /// Display name.
        display_name: String,
        /// Preferences (validated: `language` 2..=35 characters of letters, digits, `-`).
        preferences: Preferences,
    },
    /// Change profile fields; only fields that differ from the current ones are recorded, and
    /// a command changing nothing is a no-op. Fails with 404 for an unregistered user.
    UpdateProfile(UserProfileUpdated),
    /// Record that the user opened a session with a verified token (`method`, `issuer`).
    Authenticate {
        /// The user (= aggregate id).
        user_id: Uuid,
        /// `jwt_hs256` or `jwt_rs256`.
        method: String,
        /// Token issuer.
        issuer: String,
    },
    /// Mark `email` verified; it must be the user's current address (409 otherwise). A repeat
    /// is a no-op.
    VerifyEmail {
        /// The user (= aggregate id).
        user_id: Uuid,
        /// The verified address.
        email: String,
    },
}

fn check_preferences(p: &Preferences) -> Result<(), DomainError> {
    let ok = (2..=35).contains(&p.language.len())
        && p.language
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !ok {
        return Err(DomainError::Invalid(format!(
            "preferences.language {:?} must be a BCP 47 tag (2..=35 of letters, digits, -)",
            p.language
        )));
    }
    Ok(())
}

fn check_email(email: &str) -> Result<(), DomainError> {
    let parts: Vec<&str> = email.split('@').collect();
    let ok = email.len() <= 254
        && parts.len() == 2
        && !parts[0].is_empty()
        && parts[1].contains('.')
        && !email.chars().any(char::is_whitespace);
    if !ok {
        return Err(DomainError::Invalid(format!(
            "email {email:?} must be one address of at most 254 characters"
        )));
    }
    Ok(())
}

fn check_website(url: &str) -> Result<(), DomainError> {
    let ok = url.is_empty()
        || ((url.starts_with("https://") || url.starts_with("http://"))
            && url.len() <= 200
            && !url.chars().any(char::is_whitespace));
    if !ok {
        return Err(DomainError::Invalid(
            "website must be an http(s) URL of at most 200 characters, or empty".into(),
        ));
    }
    Ok(())
}

impl User {
    fn require_registered(&self, id: Uuid) -> Result<(), DomainError> {
        if self.display_name.is_none() {
            return Err(DomainError::NotFound { what: "user", id });
        }
        Ok(())
    }

    /// The update with only the fields that change the current state (validated).
    fn changes(&self, u: UserProfileUpdated) -> Result<UserProfileUpdated, DomainError> {
        if let Some(n) = &u.display_name {
            check_text("display_name", n, 1, 100)?;
        }
        if let Some(b) = &u.bio {
            check_text("bio", b, 0, 2000)?;
        }
        if let Some(l) = &u.location {
            check_text("location", l, 0, 100)?;
        }
        if let Some(w) = &u.website {
            check_website(w)?;
        }
        if let Some(e) = &u.email {
            check_email(e)?;
        }
        if let Some(p) = &u.preferences {
            check_preferences(p)?;
        }
        Ok(UserProfileUpdated {
            user_id: u.user_id,
            display_name: u
                .display_name
                .filter(|n| Some(n) != self.display_name.as_ref()),
            bio: u.bio.filter(|b| *b != self.bio),
            location: u.location.filter(|l| *l != self.location),
            website: u.website.filter(|w| *w != self.website),
            email: u.email.filter(|e| Some(e) != self.email.as_ref()),
            preferences: u.preferences.filter(|p| *p != self.preferences),
        })
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = Event;
    type Error = DomainError;
    type Services = NoServices;

    async fn handle(
        &mut self,
        command: UserCommand,
        _: &NoServices,
        sink: &EventSink<Self>,
    ) -> Result<(), DomainError> {
        match command {
            UserCommand::Register {
                user_id,
                display_name,
                preferences,
            } => {
                check_text("display_name", &display_name, 1, 100)?;
                check_preferences(&preferences)?;
                match &self.display_name {
                    Some(existing) if *existing == display_name => {}
                    Some(_) => {
                        return Err(DomainError::Conflict(format!(
                            "user {user_id} is already registered with another display name"
                        )))
                    }
                    None => {
                        let e = Event::UserRegistered(UserRegistered {
                            user_id,
                            display_name,
                            preferences,
                        });
                        sink.write(e, self).await;
                    }
                }
            }
            UserCommand::UpdateProfile(update) => {
                self.require_registered(update.user_id)?;
                let changes = self.changes(update)?;
                let unchanged = UserProfileUpdated {
                    user_id: changes.user_id,
                    ..Default::default()
                };
                if changes != unchanged {
                    sink.write(Event::UserProfileUpdated(changes), self).await;
                }
            }
            UserCommand::Authenticate {
                user_id,
                method,
                issuer,
            } => {
                self.require_registered(user_id)?;
                check_text("method", &method, 1, 40)?;
                check_text("issuer", &issuer, 1, 200)?;
                let e = UserAuthenticated {
                    user_id,
                    method,
                    issuer,
                };
                sink.write(Event::UserAuthenticated(e), self).await;
            }
            UserCommand::VerifyEmail { user_id, email } => {
                self.require_registered(user_id)?;
                check_email(&email)?;
                match &self.email {
                    Some(current) if *current == email => {
                        if !self.email_verified {
                            let e = UserEmailVerified { user_id, email };
                            sink.write(Event::UserEmailVerified(e), self).await;
                        }
                    }
                    _ => {
                        return Err(DomainError::Conflict(format!(
                            "{email:?} is not user {user_id}'s current e-mail address"
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::UserRegistered(e) => {
                self.display_name = Some(e.display_name);
                self.preferences = e.preferences;
            }
            Event::UserProfileUpdated(e) => {
                if let Some(n) = e.display_name {
                    self.display_name = Some(n);
                }
                if let Some(b) = e.bio {
                    self.bio = b;
                }
                if let Some(l) = e.location {
                    self.location = l;
                }
                if let Some(w) = e.website {
                    self.website = w;
                }
                if let Some(m) = e.email {
                    self.email = Some(m);
                    self.email_verified = false;
                }
                if let Some(p) = e.preferences {
                    self.preferences = p;
                }
            }
            Event::UserAuthenticated(_) => self.sessions += 1,
            Event::UserEmailVerified(_) => self.email_verified = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn registered(id: Uuid, name: &str) -> Event {
        Event::UserRegistered(UserRegistered {
            user_id: id,
            display_name: name.into(),
            preferences: Preferences::default(),
        })
    }

    #[test]
    fn registers_once_and_repeat_is_a_no_op() {
        let id = Uuid::new_v4();
        let cmd = || UserCommand::Register {
            user_id: id,
            display_name: "Ada".into(),
            preferences: Preferences::default(),
        };
        TestFramework::<User>::with(NoServices)
            .given_no_previous_events()
            .when(cmd())
            .then_expect_events(vec![registered(id, "Ada")]);
        TestFramework::<User>::with(NoServices)
            .given(vec![registered(id, "Ada")])
            .when(cmd())
            .then_expect_events(vec![]);
    }

    #[test]
    fn other_name_for_existing_user_conflicts_and_empty_name_is_invalid() {
        let id = Uuid::new_v4();
        let r = TestFramework::<User>::with(NoServices)
            .given(vec![registered(id, "Ada")])
            .when(UserCommand::Register {
                user_id: id,
                display_name: "Bob".into(),
                preferences: Preferences::default(),
            })
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "conflict");
        let r = TestFramework::<User>::with(NoServices)
            .given_no_previous_events()
            .when(UserCommand::Register {
                user_id: id,
                display_name: String::new(),
                preferences: Preferences::default(),
            })
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "invalid");
    }

    #[test]
    fn profile_update_records_only_changes_and_a_new_email_must_be_verified_again() {
        let id = Uuid::new_v4();
        let update = |email: &str, bio: &str| {
            UserCommand::UpdateProfile(UserProfileUpdated {
                user_id: id,
                display_name: Some("Ada".into()),
                bio: Some(bio.into()),
                email: Some(email.into()),
                ..Default::default()
            })
        };
        // The display name is unchanged, so only bio and e-mail are recorded.
        TestFramework::<User>::with(NoServices)
            .given(vec![registered(id, "Ada")])
            .when(update("ada@example.org", "Maths"))
            .then_expect_events(vec![Event::UserProfileUpdated(UserProfileUpdated {
                user_id: id,
                bio: Some("Maths".into()),
                email: Some("ada@example.org".into()),
                ..Default::default()
            })]);
        let changed = Event::UserProfileUpdated(UserProfileUpdated {
            user_id: id,
            email: Some("ada@example.org".into()),
            ..Default::default()
        });
        let verified = Event::UserEmailVerified(UserEmailVerified {
            user_id: id,
            email: "ada@example.org".into(),
        });
        let verify = |email: &str| UserCommand::VerifyEmail {
            user_id: id,
            email: email.into(),
        };
        TestFramework::<User>::with(NoServices)
            .given(vec![registered(id, "Ada"), changed.clone()])
            .when(verify("ada@example.org"))
            .then_expect_events(vec![verified.clone()]);
        // Verifying again is a no-op; another address is a conflict.
        TestFramework::<User>::with(NoServices)
            .given(vec![
                registered(id, "Ada"),
                changed.clone(),
                verified.clone(),
            ])
            .when(verify("ada@example.org"))
            .then_expect_events(vec![]);
        let r = TestFramework::<User>::with(NoServices)
            .given(vec![registered(id, "Ada"), changed])
            .when(verify("bob@example.org"))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "conflict");
        // Bad input is refused; an unregistered user is not found.
        let r = TestFramework::<User>::with(NoServices)
            .given(vec![registered(id, "Ada")])
            .when(update("not-an-address", ""))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "invalid");
        let r = TestFramework::<User>::with(NoServices)
            .given_no_previous_events()
            .when(update("ada@example.org", ""))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "not_found.user");
    }

    #[test]
    fn each_session_is_recorded_for_registered_users_only() {
        let id = Uuid::new_v4();
        let auth = || UserCommand::Authenticate {
            user_id: id,
            method: "jwt_hs256".into(),
            issuer: "tektree".into(),
        };
        let e = Event::UserAuthenticated(UserAuthenticated {
            user_id: id,
            method: "jwt_hs256".into(),
            issuer: "tektree".into(),
        });
        TestFramework::<User>::with(NoServices)
            .given(vec![registered(id, "Ada"), e.clone()])
            .when(auth())
            .then_expect_events(vec![e]);
        let r = TestFramework::<User>::with(NoServices)
            .given_no_previous_events()
            .when(auth())
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "not_found.user");
    }
}
