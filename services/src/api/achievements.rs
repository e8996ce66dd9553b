//! `GET /v1/users/{id}/achievements`: a user's achievements, quests, streaks and activity
//! counts (issue #6).
//!
//! Unlike the other queries this one reads the user's `profile` aggregate (folded from its
//! events through the command handler's cache and snapshots), not a read model: it is exactly
//! as current as the gamification policy, with no projection lag, and it costs one aggregate
//! load per request.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use tektree_domain::{level_for_xp, Profile};
use uuid::Uuid;

use super::extract::ApiPath;
use super::problem::Problem;
use crate::app::App;

/// The longest run of consecutive active UTC days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Streak {
    /// Length in days.
    pub days: u32,
    /// First day of the run.
    pub first_day: NaiveDate,
    /// Last day of the run.
    pub last_day: NaiveDate,
}

/// Response of `GET /v1/users/{id}/achievements`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Achievements {
    /// The user.
    pub user_id: Uuid,
    /// XP total.
    pub xp: i64,
    /// Level of `xp`.
    pub level: u32,
    /// Unlocked achievement ids, sorted.
    pub achievements: Vec<String>,
    /// Completed quests as `id@period` (`period` = `YYYY-Www` or `once`), sorted.
    pub quests: Vec<String>,
    /// Streak milestones reached (days), ascending.
    pub streak_milestones: Vec<u32>,
    /// The longest streak, if the user was ever active.
    pub longest_streak: Option<Streak>,
    /// All-time activity counts by counter name (`question`, `answer`, …).
    pub counts: BTreeMap<String, u64>,
    /// Highest score any of the user's answers reached.
    pub best_answer_score: i64,
}

/// `GET /v1/users/{id}/achievements`.
///
/// # Errors
/// 400 for a bad id; 404 when the user has no gamification profile yet (no XP ever awarded);
/// 503 when the store is unavailable.
pub async fn user_achievements(
    State(app): State<Arc<App>>,
    ApiPath(user_id): ApiPath<Uuid>,
) -> Result<Json<Achievements>, Problem> {
    let (p, version) = app.handler.load::<Profile>(user_id).await?;
    if version == 0 {
        return Err(Problem::not_found(format!(
            "no gamification profile for user {user_id}"
        )));
    }
    let (mut achievements, mut quests) = (Vec::new(), Vec::new());
    for key in &p.progress.reached {
        if key.contains('@') {
            quests.push(key.clone());
        } else {
            achievements.push(key.clone());
        }
    }
    achievements.sort();
    quests.sort();
    Ok(Json(Achievements {
        user_id,
        xp: p.xp,
        level: level_for_xp(p.xp),
        achievements,
        quests,
        streak_milestones: p.progress.milestones.iter().copied().collect(),
        longest_streak: p.progress.longest_run.map(|(first_day, last_day)| Streak {
            days: p.progress.longest_streak(),
            first_day,
            last_day,
        }),
        counts: p.progress.counts.clone(),
        best_answer_score: p.progress.best_answer_score,
    }))
}
