//! The `profile` aggregate: a user's gamification profile — XP, level, and the progress that
//! unlocks achievements, completes quests and reaches streak milestones (issue #6).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::events::{
    AchievementUnlocked, Activity, Event, LevelUp, QuestCompleted, StreakMilestone, XpEarned,
};
use crate::gamification::{GamificationRules, Progress};
use crate::rules::level_for_xp;

/// Gamification state of one user. Aggregate type `profile`, id = user id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Current XP total (no floor).
    pub xp: i64,
    /// Source events already awarded: a source delivered twice awards once (issue #2 §4).
    pub awarded: BTreeSet<Uuid>,
    /// Counters, active days and reached goals.
    pub progress: Progress,
}

/// Commands on [`Profile`]. Services: the [`GamificationRules`].
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileCommand {
    /// Award `amount` XP for `source_event_id` and record its `activity`. A repeated source id
    /// is a no-op, as is an award of 0 XP without an activity. Emits `gamification.xp.earned`;
    /// `gamification.level.up` when the level rises; and, when the activity completes them,
    /// `gamification.achievement.unlocked` (once per achievement),
    /// `gamification.quest.completed` (once per quest and period) and
    /// `gamification.streak.milestone` (once per milestone).
    AwardXp {
        /// The user (= aggregate id).
        user_id: Uuid,
        /// XP delta.
        amount: i64,
        /// Source domain event.
        source_event_id: Uuid,
        /// Its type.
        source_event_type: String,
        /// Its `occurred_at`.
        source_occurred_at: DateTime<Utc>,
        /// Tags of the content involved.
        tags: Vec<String>,
        /// Area of the content involved.
        area_id: Option<Uuid>,
        /// What the user did, if it counts towards achievements.
        activity: Option<Activity>,
    },
}

impl Profile {
    /// Emits the unlocks, completions and milestones that the state now satisfies and that
    /// were not reached before. Every goal is checked (not just those the last activity
    /// touched), so a goal added to the rules later is reached at the user's next activity.
    async fn reach_goals(
        &mut self,
        rules: &GamificationRules,
        user_id: Uuid,
        source_event_id: Uuid,
        at: DateTime<Utc>,
        sink: &EventSink<Self>,
    ) {
        for (goal, quest) in rules
            .achievements
            .iter()
            .map(|g| (g, false))
            .chain(rules.quests.iter().map(|g| (g, true)))
        {
            let (key, period) = Progress::key(goal, quest, at);
            if self.progress.reached.contains(&key) || !self.progress.holds(goal, at) {
                continue;
            }
            let e = if quest {
                Event::QuestCompleted(QuestCompleted {
                    user_id,
                    quest_id: goal.id.clone(),
                    name: goal.name.clone(),
                    period,
                    xp_reward: goal.xp_reward,
                    source_event_id,
                    completed_at: at,
                })
            } else {
                Event::AchievementUnlocked(AchievementUnlocked {
                    user_id,
                    achievement_id: goal.id.clone(),
                    name: goal.name.clone(),
                    xp_reward: goal.xp_reward,
                    source_event_id,
                    unlocked_at: at,
                })
            };
            sink.write(e, self).await;
        }
        let mut milestones = rules.streak_milestones.clone();
        milestones.sort_unstable();
        for days in milestones {
            let Some((first_day, last_day)) = self.progress.longest_run else {
                break;
            };
            if self.progress.milestones.contains(&days) || self.progress.longest_streak() < days {
                continue;
            }
            let e = StreakMilestone {
                user_id,
                days,
                first_day,
                last_day,
                source_event_id,
            };
            sink.write(Event::StreakMilestone(e), self).await;
        }
    }
}

impl Aggregate for Profile {
    const TYPE: &'static str = "profile";
    type Command = ProfileCommand;
    type Event = Event;
    type Error = DomainError;
    type Services = GamificationRules;

    async fn handle(
        &mut self,
        command: ProfileCommand,
        rules: &GamificationRules,
        sink: &EventSink<Self>,
    ) -> Result<(), DomainError> {
        let ProfileCommand::AwardXp {
            user_id,
            amount,
            source_event_id,
            source_event_type,
            source_occurred_at,
            tags,
            area_id,
            activity,
        } = command;
        if self.awarded.contains(&source_event_id) || (amount == 0 && activity.is_none()) {
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
            area_id,
            activity,
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
        if activity.is_some() {
            self.reach_goals(rules, user_id, source_event_id, source_occurred_at, sink)
                .await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::XpEarned(e) => {
                self.xp = e.total_xp;
                self.awarded.insert(e.source_event_id);
                if let Some(a) = &e.activity {
                    self.progress.record(a, e.source_occurred_at);
                }
            }
            Event::AchievementUnlocked(e) => {
                self.progress.reached.insert(e.achievement_id);
            }
            Event::QuestCompleted(e) => {
                self.progress
                    .reached
                    .insert(format!("{}@{}", e.quest_id, e.period));
            }
            Event::StreakMilestone(e) => {
                self.progress.milestones.insert(e.days);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gamification::GamificationRules;
    use cqrs_es::test::TestFramework;

    fn award(user: Uuid, src: Uuid, amount: i64) -> ProfileCommand {
        ProfileCommand::AwardXp {
            user_id: user,
            amount,
            source_event_id: src,
            source_event_type: "knowledge.content.upvoted".into(),
            source_occurred_at: DateTime::UNIX_EPOCH,
            tags: vec![],
            area_id: None,
            activity: None,
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
            area_id: None,
            activity: None,
        })
    }

    #[test]
    fn crossing_100_xp_levels_up_and_repeat_source_awards_once() {
        let (u, s1, s2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        TestFramework::<Profile>::with(GamificationRules::default())
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
        TestFramework::<Profile>::with(GamificationRules::default())
            .given(vec![earned(u, s1, 95, 95)])
            .when(award(u, s1, 95))
            .then_expect_events(vec![]);
    }

    #[test]
    fn xp_has_no_floor_and_falling_does_not_level_up() {
        let (u, s1) = (Uuid::new_v4(), Uuid::new_v4());
        TestFramework::<Profile>::with(GamificationRules::default())
            .given_no_previous_events()
            .when(award(u, s1, -2))
            .then_expect_events(vec![earned(u, s1, -2, -2)]);
    }

    fn answered(user: Uuid, src: Uuid, at: &str) -> ProfileCommand {
        ProfileCommand::AwardXp {
            user_id: user,
            amount: 5,
            source_event_id: src,
            source_event_type: "knowledge.answer.submitted".into(),
            source_occurred_at: at.parse().unwrap(),
            tags: vec![],
            area_id: None,
            activity: Some(Activity::Answer { answer_id: src }),
        }
    }

    /// Folds `commands` through the aggregate (as the store would) and returns every event.
    fn run(commands: Vec<ProfileCommand>) -> Vec<Event> {
        let rules = GamificationRules::default();
        let mut history: Vec<Event> = Vec::new();
        for c in commands {
            let new = TestFramework::<Profile>::with(rules.clone())
                .given(history.clone())
                .when(c)
                .inspect_result()
                .unwrap();
            history.extend(new);
        }
        history
    }

    fn unlocked(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::AchievementUnlocked(a) => Some(a.achievement_id.clone()),
                Event::QuestCompleted(q) => Some(format!("{}@{}", q.quest_id, q.period)),
                Event::StreakMilestone(m) => Some(format!("streak:{}", m.days)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn first_answer_unlocks_once_and_a_redelivered_source_unlocks_nothing() {
        let (u, a1, a2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let first = answered(u, a1, "2024-03-04T10:00:00Z");
        let events = run(vec![
            first.clone(),
            first, // redelivery of the same source
            answered(u, a2, "2024-03-04T11:00:00Z"),
        ]);
        assert_eq!(unlocked(&events), vec!["first-answer".to_string()]);
        let Some(Event::AchievementUnlocked(a)) = events.get(1) else {
            panic!("unlock follows the first award: {events:?}")
        };
        assert_eq!((a.source_event_id, a.xp_reward), (a1, 5));
    }

    #[test]
    fn a_weekly_quest_completes_once_per_iso_week_and_ten_answers_unlock() {
        // 2024-03-04 is a Monday; three answers that week complete the weekly quest once,
        // a fourth does not again; three more the next week complete it again.
        let u = Uuid::new_v4();
        let mut cmds = Vec::new();
        for d in ["04", "05", "06", "07", "11", "12", "13", "14", "15", "16"] {
            cmds.push(answered(
                u,
                Uuid::new_v4(),
                &format!("2024-03-{d}T09:00:00Z"),
            ));
        }
        let got = unlocked(&run(cmds));
        assert_eq!(
            got,
            vec![
                "first-answer",
                "weekly-contributor@2024-W10",
                "weekly-contributor@2024-W11",
                "ten-answers",
            ]
        );
    }

    #[test]
    fn seven_consecutive_active_days_reach_the_milestone_and_the_achievement() {
        let u = Uuid::new_v4();
        // Days 1..=7 of March 2024, delivered out of order; the gap day 8 is missing.
        let mut cmds = Vec::new();
        for d in [3, 1, 2, 7, 5, 4, 6] {
            let mut c = answered(u, Uuid::new_v4(), &format!("2024-03-{d:02}T23:59:59Z"));
            let ProfileCommand::AwardXp { activity, .. } = &mut c;
            *activity = Some(Activity::Comment);
            cmds.push(c);
        }
        let events = run(cmds);
        let got = unlocked(&events);
        assert_eq!(got, vec!["streak-7".to_string(), "streak:7".to_string()]);
        let m = events
            .iter()
            .find_map(|e| match e {
                Event::StreakMilestone(m) => Some(m.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(m.first_day.to_string(), "2024-03-01");
        assert_eq!(m.last_day.to_string(), "2024-03-07");
    }
}
