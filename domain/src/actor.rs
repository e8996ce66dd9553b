//! Who issued a command.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The principal on whose behalf a command runs; recorded as the envelope's `actor`.
///
/// Text form (envelope field, logs): `user:<uuid>` or `system:<name>` (for example
/// `system:importer`, `system:policy.gamification`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Actor {
    /// An authenticated end user acting as themselves.
    User(Uuid),
    /// A trusted internal process (importer, policy). System actors are metered but never
    /// refused for quota (issue #2 §4) and may act for users whose identity the source lacks
    /// (for example a Stack Exchange accept on a question whose owner was deleted).
    System(String),
}

impl Actor {
    /// The importer's actor, `system:importer`.
    pub fn importer() -> Self {
        Actor::System("importer".into())
    }

    /// `true` for [`Actor::System`].
    pub fn is_system(&self) -> bool {
        matches!(self, Actor::System(_))
    }

    /// The user id for [`Actor::User`].
    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Actor::User(id) => Some(*id),
            Actor::System(_) => None,
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::User(id) => write!(f, "user:{id}"),
            Actor::System(name) => write!(f, "system:{name}"),
        }
    }
}

/// Error parsing an [`Actor`] from text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid actor {0:?}: expected `user:<uuid>` or `system:<name>`")]
pub struct ParseActorError(pub String);

impl FromStr for Actor {
    type Err = ParseActorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("user:") {
            return Uuid::parse_str(rest)
                .map(Actor::User)
                .map_err(|_| ParseActorError(s.into()));
        }
        match s.strip_prefix("system:") {
            Some(name) if !name.is_empty() => Ok(Actor::System(name.into())),
            _ => Err(ParseActorError(s.into())),
        }
    }
}

impl From<Actor> for String {
    fn from(a: Actor) -> String {
        a.to_string()
    }
}

impl TryFrom<String> for Actor {
    type Error = ParseActorError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let id = Uuid::new_v4();
        for a in [Actor::User(id), Actor::importer()] {
            assert_eq!(a.to_string().parse::<Actor>().unwrap(), a);
        }
        assert!("user:nope".parse::<Actor>().is_err());
        assert!("system:".parse::<Actor>().is_err());
        assert!("root".parse::<Actor>().is_err());
    }
}
