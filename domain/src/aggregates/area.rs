//! The `area` aggregate: a knowledge area that groups content (issue #6). Content posted in an
//! area carries its `area_id`, and XP earned on it also counts on the `area:ID` leaderboard.
//!
//! Slugs are not unique across areas: the id is the identity (a unique slug would need a
//! cross-aggregate index, which the event store does not offer; the HTTP API refuses nothing
//! on that ground).

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::check_text;
use crate::actor::Actor;
use crate::error::DomainError;
use crate::events::{AreaCreated, Event};
use crate::services::NoServices;

/// One area. Aggregate type `area`, id = area id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Area {
    /// `Some` once created.
    pub created: Option<AreaCreated>,
}

/// Commands on [`Area`].
#[derive(Debug, Clone, PartialEq)]
pub enum AreaCommand {
    /// Create an area. An identical repeat is a no-op; other data for an existing id is a
    /// conflict. (Who may create areas — moderators and admins — is checked by the API.)
    Create {
        /// New area id (= aggregate id).
        area_id: Uuid,
        /// Name, 1..=100 characters.
        name: String,
        /// Slug, 1..=60 characters of `a-z`, `0-9`, `-`.
        slug: String,
        /// Description, 0..=2,000 characters.
        description: String,
        /// Issuer.
        actor: Actor,
    },
}

impl Aggregate for Area {
    const TYPE: &'static str = "area";
    type Command = AreaCommand;
    type Event = Event;
    type Error = DomainError;
    type Services = NoServices;

    async fn handle(
        &mut self,
        command: AreaCommand,
        _: &NoServices,
        sink: &EventSink<Self>,
    ) -> Result<(), DomainError> {
        let AreaCommand::Create {
            area_id,
            name,
            slug,
            description,
            actor,
        } = command;
        check_text("name", &name, 1, 100)?;
        check_text("description", &description, 0, 2000)?;
        let slug_ok = (1..=60).contains(&slug.len())
            && slug
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !slug_ok {
            return Err(DomainError::Invalid(format!(
                "slug {slug:?} must be 1..=60 characters of a-z, 0-9, -"
            )));
        }
        let e = AreaCreated {
            area_id,
            name,
            slug,
            description,
            created_by: actor.user_id(),
        };
        match &self.created {
            Some(c) if c.name == e.name && c.slug == e.slug && c.description == e.description => {
                Ok(())
            }
            Some(_) => Err(DomainError::Conflict(format!(
                "area {area_id} already exists"
            ))),
            None => {
                sink.write(Event::AreaCreated(e), self).await;
                Ok(())
            }
        }
    }

    fn apply(&mut self, event: Event) {
        if let Event::AreaCreated(e) = event {
            self.created = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn create(id: Uuid, slug: &str) -> AreaCommand {
        AreaCommand::Create {
            area_id: id,
            name: "Rust".into(),
            slug: slug.into(),
            description: String::new(),
            actor: Actor::User(Uuid::nil()),
        }
    }

    #[test]
    fn creates_once_and_refuses_other_data_and_bad_slugs() {
        let id = Uuid::new_v4();
        let created = Event::AreaCreated(AreaCreated {
            area_id: id,
            name: "Rust".into(),
            slug: "rust".into(),
            description: String::new(),
            created_by: Some(Uuid::nil()),
        });
        TestFramework::<Area>::with(NoServices)
            .given_no_previous_events()
            .when(create(id, "rust"))
            .then_expect_events(vec![created.clone()]);
        TestFramework::<Area>::with(NoServices)
            .given(vec![created.clone()])
            .when(create(id, "rust"))
            .then_expect_events(vec![]);
        let r = TestFramework::<Area>::with(NoServices)
            .given(vec![created])
            .when(create(id, "rust-lang"))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "conflict");
        let r = TestFramework::<Area>::with(NoServices)
            .given_no_previous_events()
            .when(create(id, "Rust Lang"))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "invalid");
    }
}
