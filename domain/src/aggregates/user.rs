//! The `user` aggregate: registration.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::check_text;
use crate::error::DomainError;
use crate::events::{Event, UserRegistered};
use crate::services::NoServices;

/// A registered user. Aggregate type `user`, id = user id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// `Some` once registered.
    pub display_name: Option<String>,
}

/// Commands on [`User`].
#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    /// Register `user_id` with a display name (1..=100 characters). Repeating an identical
    /// registration is a no-op; a different name for an existing id is a conflict.
    Register {
        /// The id (= aggregate id).
        user_id: Uuid,
        /// Display name.
        display_name: String,
    },
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
        let UserCommand::Register {
            user_id,
            display_name,
        } = command;
        check_text("display_name", &display_name, 1, 100)?;
        match &self.display_name {
            Some(existing) if *existing == display_name => Ok(()),
            Some(_) => Err(DomainError::Conflict(format!(
                "user {user_id} is already registered with another display name"
            ))),
            None => {
                let e = Event::UserRegistered(UserRegistered {
                    user_id,
                    display_name,
                });
                sink.write(e, self).await;
                Ok(())
            }
        }
    }

    fn apply(&mut self, event: Event) {
        if let Event::UserRegistered(e) = event {
            self.display_name = Some(e.display_name);
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
        })
    }

    #[test]
    fn registers_once_and_repeat_is_a_no_op() {
        let id = Uuid::new_v4();
        let cmd = || UserCommand::Register {
            user_id: id,
            display_name: "Ada".into(),
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
            })
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "conflict");
        let r = TestFramework::<User>::with(NoServices)
            .given_no_previous_events()
            .when(UserCommand::Register {
                user_id: id,
                display_name: String::new(),
            })
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "invalid");
    }
}
