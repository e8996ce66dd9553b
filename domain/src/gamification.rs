//! Achievements, quests and streaks (issue #6): the rules (declared in a config file) and the
//! progress a gamification profile keeps to evaluate them.
//!
//! Progress is folded from the profile's own `gamification.xp.earned` events, each of which
//! records the [`Activity`] that earned it, so unlocking is decided inside the `profile`
//! aggregate: exactly once per user (the aggregate remembers what it unlocked), also under
//! redelivery (commands are idempotent by source event) and replay (projections read the
//! stored unlock events; nothing is re-decided).
//!
//! Every condition is *monotone in the set of recorded activities*: counts and the longest run
//! of active days only grow, and [`Condition::AnswerScore`] reads the score each vote event
//! carries (the content aggregate's count right after that vote), so the highest score seen is
//! the highest the answer ever had once all its votes are recorded. What is unlocked therefore
//! does not depend on the order in which a user's activities arrive. That is what lets the import be checked against values computed
//! directly from the dump (`services/tests/stackexchange.rs`).
//!
//! The default rules are `config/gamification.toml`, embedded at build time.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::Activity;

/// The default rules file, embedded (`config/gamification.toml`).
pub const DEFAULT_RULES_TOML: &str = include_str!("../../config/gamification.toml");

/// Counter names a [`Condition::Count`] may name (see [`Activity::counter`]).
pub const COUNTERS: [&str; 8] = [
    "question",
    "answer",
    "comment",
    "discussion",
    "insight",
    "resource",
    "accepted_answer",
    "answer_vote",
];

/// When a goal's condition holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// At least `at_least` activities counted under `activity` (one of [`COUNTERS`]); for a
    /// weekly quest, within one ISO week of the activities' `occurred_at`.
    Count {
        /// Counter name.
        activity: String,
        /// Threshold (≥ 1).
        at_least: u64,
    },
    /// One of the user's answers reached a score (upvotes − downvotes) of at least `at_least`.
    AnswerScore {
        /// Threshold.
        at_least: i64,
    },
    /// The user was active (authored content) on `days` consecutive UTC days.
    Streak {
        /// Run length in days (≥ 1).
        days: u32,
    },
}

/// How often a goal can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Repeat {
    /// Once per user.
    #[default]
    Once,
    /// Once per user and ISO week (quests with a [`Condition::Count`] only).
    Weekly,
}

/// An achievement or quest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goal {
    /// Stable id, 1..=60 characters of `a-z`, `0-9`, `-`; unique across achievements and quests.
    pub id: String,
    /// Display name.
    pub name: String,
    /// When it is reached.
    pub condition: Condition,
    /// XP awarded (by the gamification policy) when reached. Default 0.
    #[serde(default)]
    pub xp_reward: i64,
    /// Once or weekly. Default once.
    #[serde(default)]
    pub repeat: Repeat,
}

/// The `[gamification]` rules: achievements, quests and streak milestones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GamificationRules {
    /// Unlocked once each (`gamification.achievement.unlocked`).
    pub achievements: Vec<Goal>,
    /// Completed once, or once per week (`gamification.quest.completed`).
    pub quests: Vec<Goal>,
    /// Run lengths in days that emit `gamification.streak.milestone` when first reached.
    pub streak_milestones: Vec<u32>,
}

/// The rules file's shape without the container default (parsing [`GamificationRules`] itself
/// would fill missing lists from `Default`, which parses the file again).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddedRules {
    achievements: Vec<Goal>,
    quests: Vec<Goal>,
    streak_milestones: Vec<u32>,
}

impl Default for GamificationRules {
    fn default() -> Self {
        // The embedded file is checked by a unit test.
        let r: EmbeddedRules =
            toml::from_str(DEFAULT_RULES_TOML).expect("config/gamification.toml parses");
        GamificationRules {
            achievements: r.achievements,
            quests: r.quests,
            streak_milestones: r.streak_milestones,
        }
    }
}

impl GamificationRules {
    /// Checks ids (well formed, unique), counter names, thresholds, and that only quests with
    /// a count condition repeat weekly.
    ///
    /// # Errors
    /// A message naming the first offending goal.
    pub fn validate(&self) -> Result<(), String> {
        let mut ids = BTreeSet::new();
        let all = self.achievements.iter().map(|g| (g, false));
        for (g, quest) in all.chain(self.quests.iter().map(|g| (g, true))) {
            let ok_id = (1..=60).contains(&g.id.len())
                && g.id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok_id {
                return Err(format!("goal id {:?} must be 1..=60 of a-z 0-9 -", g.id));
            }
            if !ids.insert(g.id.as_str()) {
                return Err(format!("goal id {:?} is declared twice", g.id));
            }
            match &g.condition {
                Condition::Count { activity, at_least } => {
                    if !COUNTERS.contains(&activity.as_str()) {
                        return Err(format!(
                            "goal {:?}: unknown activity {activity:?} (one of {COUNTERS:?})",
                            g.id
                        ));
                    }
                    if *at_least == 0 {
                        return Err(format!("goal {:?}: at_least must be ≥ 1", g.id));
                    }
                }
                Condition::Streak { days: 0 } => {
                    return Err(format!("goal {:?}: days must be ≥ 1", g.id));
                }
                _ => {}
            }
            if g.repeat == Repeat::Weekly
                && (!quest || !matches!(g.condition, Condition::Count { .. }))
            {
                return Err(format!(
                    "goal {:?}: only quests with a count condition may repeat weekly",
                    g.id
                ));
            }
        }
        if self.streak_milestones.contains(&0) {
            return Err("streak milestones must be ≥ 1 day".into());
        }
        Ok(())
    }
}

/// ISO week of an instant (UTC), `YYYY-Www`.
pub fn iso_week(t: DateTime<Utc>) -> String {
    let w = t.iso_week();
    format!("{:04}-W{:02}", w.year(), w.week())
}

/// What a profile has done so far, folded from its `gamification.xp.earned` activities and
/// its unlock events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// All-time count per counter name.
    pub counts: BTreeMap<String, u64>,
    /// Count per `"YYYY-Www/counter"`.
    pub weekly: BTreeMap<String, u64>,
    /// Sum of the score changes seen per answer of the user (in arrival order).
    pub answer_scores: BTreeMap<Uuid, i64>,
    /// Highest score any of the user's answers ever had (from the votes' `score`).
    pub best_answer_score: i64,
    /// UTC days on which the user authored content.
    pub active_days: BTreeSet<NaiveDate>,
    /// The longest run of consecutive active days (first, last), if any.
    pub longest_run: Option<(NaiveDate, NaiveDate)>,
    /// Keys of reached goals: the goal id, or `id@period` for quests.
    pub reached: BTreeSet<String>,
    /// Streak milestones emitted.
    pub milestones: BTreeSet<u32>,
}

fn run_len(run: (NaiveDate, NaiveDate)) -> u32 {
    (run.1 - run.0).num_days() as u32 + 1
}

impl Progress {
    /// Length in days of [`Progress::longest_run`] (0 without active days).
    pub fn longest_streak(&self) -> u32 {
        self.longest_run.map(run_len).unwrap_or(0)
    }

    /// Folds one activity that occurred at `at`.
    pub fn record(&mut self, activity: &Activity, at: DateTime<Utc>) {
        let counter = activity.counter();
        *self.counts.entry(counter.into()).or_default() += 1;
        *self
            .weekly
            .entry(format!("{}/{counter}", iso_week(at)))
            .or_default() += 1;
        if let Activity::AnswerVote {
            answer_id,
            score_delta,
            score,
        } = activity
        {
            let s = self.answer_scores.entry(*answer_id).or_default();
            *s += score_delta;
            // The score the content aggregate counted, when the vote carries it: exact whatever
            // the order of arrival; else the running sum of the deltas seen so far.
            self.best_answer_score = self.best_answer_score.max(score.unwrap_or(*s));
        }
        if activity.is_authored() {
            let day = at.date_naive();
            if self.active_days.insert(day) {
                let run = self.run_through(day);
                if run_len(run) > self.longest_streak() {
                    self.longest_run = Some(run);
                }
            }
        }
    }

    /// The run of consecutive active days containing `day` (an active day).
    fn run_through(&self, day: NaiveDate) -> (NaiveDate, NaiveDate) {
        let (mut first, mut last) = (day, day);
        while let Some(d) = first.checked_sub_days(Days::new(1)) {
            if !self.active_days.contains(&d) {
                break;
            }
            first = d;
        }
        while let Some(d) = last.checked_add_days(Days::new(1)) {
            if !self.active_days.contains(&d) {
                break;
            }
            last = d;
        }
        (first, last)
    }

    /// Whether `goal`'s condition holds now, for the week of `at` when it repeats weekly.
    pub fn holds(&self, goal: &Goal, at: DateTime<Utc>) -> bool {
        match (&goal.condition, goal.repeat) {
            (Condition::Count { activity, at_least }, Repeat::Once) => {
                self.counts.get(activity).copied().unwrap_or(0) >= *at_least
            }
            (Condition::Count { activity, at_least }, Repeat::Weekly) => {
                let key = format!("{}/{activity}", iso_week(at));
                self.weekly.get(&key).copied().unwrap_or(0) >= *at_least
            }
            (Condition::AnswerScore { at_least }, _) => self.best_answer_score >= *at_least,
            (Condition::Streak { days }, _) => self.longest_streak() >= *days,
        }
    }

    /// The key under which reaching `goal` (a quest when `quest`) at `at` is remembered, and the
    /// period written on a `gamification.quest.completed`: `(key, period)`.
    pub fn key(goal: &Goal, quest: bool, at: DateTime<Utc>) -> (String, String) {
        match (quest, goal.repeat) {
            (false, _) => (goal.id.clone(), String::new()),
            (true, Repeat::Once) => (format!("{}@once", goal.id), "once".into()),
            (true, Repeat::Weekly) => {
                let w = iso_week(at);
                (format!("{}@{w}", goal.id), w)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: &str) -> DateTime<Utc> {
        format!("{day}T12:00:00Z").parse().unwrap()
    }

    #[test]
    fn embedded_defaults_parse_validate_and_cover_the_issue() {
        let r = GamificationRules::default();
        r.validate().unwrap();
        let ids: Vec<&str> = r.achievements.iter().map(|g| g.id.as_str()).collect();
        for want in [
            "first-question",
            "first-answer",
            "first-accepted-answer",
            "ten-answers",
            "answer-score-10",
            "streak-7",
            "streak-30",
        ] {
            assert!(ids.contains(&want), "{want}");
        }
        assert!(r.quests.iter().any(|q| q.repeat == Repeat::Weekly));
    }

    #[test]
    fn validation_refuses_bad_goals() {
        let mut r = GamificationRules::default();
        r.quests.push(r.achievements[0].clone());
        assert!(r.validate().unwrap_err().contains("twice"));
        let mut r = GamificationRules::default();
        r.achievements[0].repeat = Repeat::Weekly;
        assert!(r.validate().is_err());
        let mut r = GamificationRules::default();
        r.achievements[0].condition = Condition::Count {
            activity: "nap".into(),
            at_least: 1,
        };
        assert!(r.validate().unwrap_err().contains("unknown activity"));
    }

    #[test]
    fn longest_run_joins_runs_whatever_the_order_of_days() {
        let mut p = Progress::default();
        for d in ["2024-01-03", "2024-01-01", "2024-01-05", "2024-01-02"] {
            p.record(&Activity::Comment, at(d));
        }
        assert_eq!(p.longest_streak(), 3);
        p.record(&Activity::Question, at("2024-01-04"));
        assert_eq!(p.longest_streak(), 5);
        assert_eq!(
            p.longest_run,
            Some(("2024-01-01".parse().unwrap(), "2024-01-05".parse().unwrap()))
        );
        // Received votes and accepts are not activity days.
        let a = Uuid::new_v4();
        p.record(
            &Activity::AnswerVote {
                answer_id: a,
                score_delta: 1,
                score: None,
            },
            at("2024-01-06"),
        );
        assert_eq!(p.longest_streak(), 5);
        assert_eq!(p.best_answer_score, 1);
    }

    #[test]
    fn weekly_counts_are_per_iso_week() {
        let quest = GamificationRules::default()
            .quests
            .into_iter()
            .find(|q| q.repeat == Repeat::Weekly)
            .unwrap();
        let Condition::Count { at_least, .. } = quest.condition else {
            panic!("count quest")
        };
        let mut p = Progress::default();
        // 2024-01-07 is a Sunday (week 1), 2024-01-08 a Monday (week 2).
        for i in 0..at_least {
            let day = if i == 0 { "2024-01-08" } else { "2024-01-07" };
            p.record(
                &Activity::Answer {
                    answer_id: Uuid::new_v4(),
                },
                at(day),
            );
        }
        assert!(!p.holds(&quest, at("2024-01-07")));
        assert!(!p.holds(&quest, at("2024-01-08")));
        assert_eq!(Progress::key(&quest, true, at("2024-01-07")).1, "2024-W01");
    }
}
