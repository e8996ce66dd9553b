//! The `profile` aggregate: a user's gamification profile (XP and level).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::events::{Event, LevelUp, XpEarned};
use crate::rules::level_for_xp;
use crate::services::NoServices;

/// XP state of one user. Aggregate type `profile`, id = user id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Current XP total (no floor).
    pub xp: i64,
    /// Source events already awarded: a source delivered twice awards once (issue #2 §4).
    pub awarded: BTreeSet<Uuid>,
}

/// Commands on [`Profile`].
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileCommand {
    /// Award `amount` XP for `source_event_id`. A repeated source id is a no-op. Emits
    /// `gamification.xp.earned`, and `gamification.level.up` when the level rises.
    AwardXp {
        /// The user (= aggregate id).
        user_id: Uuid,
        /// XP delta (non-zero).
        amount: i64,
        /// Source domain event.
        source_event_id: Uuid,
        /// Its type.
        source_event_type: String,
        /// Its `occurred_at`.
        source_occurred_at: DateTime<Utc>,
        /// Tags of the content involved.
        tags: Vec<String>,
    },
}

impl Aggregate for Profile {
    const TYPE: &'static str = "profile";
    type Command = ProfileCommand;
    type Event = Event;
    type Error = DomainError;
    type Services = NoServices;

    async fn handle(
        &mut self,
        command: ProfileCommand,
        _: &NoServices,
        sink: &EventSink<Self>,
    ) -> Result<(), DomainError> {
        let ProfileCommand::AwardXp {
            user_id,
            amount,
            source_event_id,
            source_event_type,
            source_occurred_at,
            tags,
        } = command;
        if self.awarded.contains(&source_event_id) {
            return Ok(());
        }
        let before = level_for_xp(self.xp);
        let total_xp = self.xp.saturating_add(amount);
        let earned = XpEarned {
            user_id,
            amount,
            source_event_id,
            source_event_type,
            source_occurred_at,
            tags,
            total_xp,
        };
        sink.write(Event::XpEarned(earned), self).await;
        let after = level_for_xp(total_xp);
        if after > before {
            let up = LevelUp {
                user_id,
                from_level: before,
                to_level: after,
                total_xp,
            };
            sink.write(Event::LevelUp(up), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Event) {
        if let Event::XpEarned(e) = event {
            self.xp = e.total_xp;
            self.awarded.insert(e.source_event_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn award(user: Uuid, src: Uuid, amount: i64) -> ProfileCommand {
        ProfileCommand::AwardXp {
            user_id: user,
            amount,
            source_event_id: src,
            source_event_type: "knowledge.content.upvoted".into(),
            source_occurred_at: DateTime::UNIX_EPOCH,
            tags: vec![],
        }
    }

    fn earned(user: Uuid, src: Uuid, amount: i64, total: i64) -> Event {
        Event::XpEarned(XpEarned {
            user_id: user,
            amount,
            source_event_id: src,
            source_event_type: "knowledge.content.upvoted".into(),
            source_occurred_at: DateTime::UNIX_EPOCH,
            tags: vec![],
            total_xp: total,
        })
    }

    #[test]
    fn crossing_100_xp_levels_up_and_repeat_source_awards_once() {
        let (u, s1, s2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        TestFramework::<Profile>::with(NoServices)
            .given(vec![earned(u, s1, 95, 95)])
            .when(award(u, s2, 10))
            .then_expect_events(vec![
                earned(u, s2, 10, 105),
                Event::LevelUp(LevelUp {
                    user_id: u,
                    from_level: 1,
                    to_level: 2,
                    total_xp: 105,
                }),
            ]);
        TestFramework::<Profile>::with(NoServices)
            .given(vec![earned(u, s1, 95, 95)])
            .when(award(u, s1, 95))
            .then_expect_events(vec![]);
    }

    #[test]
    fn xp_has_no_floor_and_falling_does_not_level_up() {
        let (u, s1) = (Uuid::new_v4(), Uuid::new_v4());
        TestFramework::<Profile>::with(NoServices)
            .given_no_previous_events()
            .when(award(u, s1, -2))
            .then_expect_events(vec![earned(u, s1, -2, -2)]);
    }
}
