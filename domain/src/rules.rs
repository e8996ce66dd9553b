//! XP and quota rules (issue #2 §4), configurable from a TOML file (see `docs/config.md`).

use serde::{Deserialize, Serialize};

use crate::gamification::GamificationRules;

/// Subscription tier, ordered Free < Pro < Team < Enterprise (an upgrade moves up).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Opened on registration. Default limit 100 units/month.
    #[default]
    Free,
    /// Default limit 1,000 units/month.
    Pro,
    /// Default limit 5,000 units/month.
    Team,
    /// Unlimited by default.
    Enterprise,
}

impl Tier {
    /// Lower-case name (`free`, `pro`, `team`, `enterprise`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Team => "team",
            Tier::Enterprise => "enterprise",
        }
    }
}

/// XP awarded per domain event, in XP points. Defaults are issue #2 §4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct XpRules {
    /// `user.registered` → the user. Default 1.
    pub registration: i64,
    /// `knowledge.question.posted` → its author. Default 2.
    pub question_posted: i64,
    /// `knowledge.answer.submitted` → its author. Default 5.
    pub answer_submitted: i64,
    /// `knowledge.comment.added` → its author. Default 1.
    pub comment_added: i64,
    /// `knowledge.content.upvoted` → the content's author. Default 10.
    pub upvoted: i64,
    /// `knowledge.content.downvoted` → the content's author. Default −2.
    pub downvoted: i64,
    /// `knowledge.answer.accepted` → the answer's author. Default 15 (0 for a self-accept).
    pub accepted_answer: i64,
    /// `knowledge.answer.accepted` → the question's author. Default 2 (0 for a self-accept).
    pub accepted_question: i64,
    /// `knowledge.discussion.started` → its author. Default 3 (issue #6).
    pub discussion_started: i64,
    /// `knowledge.insight.shared` → its author. Default 3 (issue #6).
    pub insight_shared: i64,
    /// `knowledge.resource.uploaded` → its uploader. Default 3 (issue #6).
    pub resource_uploaded: i64,
    /// `knowledge.content.liked` → the content's author. Default 2 (issue #6).
    pub liked: i64,
}

impl Default for XpRules {
    fn default() -> Self {
        XpRules {
            registration: 1,
            question_posted: 2,
            answer_submitted: 5,
            comment_added: 1,
            upvoted: 10,
            downvoted: -2,
            accepted_answer: 15,
            accepted_question: 2,
            discussion_started: 3,
            insight_shared: 3,
            resource_uploaded: 3,
            liked: 2,
        }
    }
}

/// Monthly metered units (questions + answers + comments) per tier; `None` = unlimited.
/// Defaults are issue #2 §4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaRules {
    /// Default `Some(100)`.
    pub free: Option<u64>,
    /// Default `Some(1000)`.
    pub pro: Option<u64>,
    /// Default `Some(5000)`.
    pub team: Option<u64>,
    /// Default `None` (unlimited).
    pub enterprise: Option<u64>,
}

impl Default for QuotaRules {
    fn default() -> Self {
        QuotaRules {
            free: Some(100),
            pro: Some(1000),
            team: Some(5000),
            enterprise: None,
        }
    }
}

impl QuotaRules {
    /// The monthly limit of `tier`; `None` = unlimited.
    pub fn limit(&self, tier: Tier) -> Option<u64> {
        match tier {
            Tier::Free => self.free,
            Tier::Pro => self.pro,
            Tier::Team => self.team,
            Tier::Enterprise => self.enterprise,
        }
    }
}

/// All configurable rules; the `[xp]`, `[quota]` and `[gamification]` tables of the config
/// file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// XP per event.
    pub xp: XpRules,
    /// Monthly limits per tier.
    pub quota: QuotaRules,
    /// Achievements, quests and streak milestones (default: `config/gamification.toml`).
    pub gamification: GamificationRules,
}

/// Level for an XP total: `⌊√(max(xp, 0) / 100)⌋ + 1` (issue #2 §4).
///
/// Computed in integers (no floating-point rounding at perfect squares): level 1 below 100 XP,
/// 2 from 100, 3 from 400, 4 from 900.
pub fn level_for_xp(xp: i64) -> u32 {
    let q = (xp.max(0) / 100) as u64;
    // Integer square root by correction of the float estimate.
    let mut r = (q as f64).sqrt() as u64;
    while r * r > q {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= q {
        r += 1;
    }
    r as u32 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn level_boundaries() {
        assert_eq!(level_for_xp(-50), 1);
        assert_eq!(level_for_xp(0), 1);
        assert_eq!(level_for_xp(99), 1);
        assert_eq!(level_for_xp(100), 2);
        assert_eq!(level_for_xp(399), 2);
        assert_eq!(level_for_xp(400), 3);
        assert_eq!(level_for_xp(900), 4);
    }

    proptest! {
        #[test]
        fn level_matches_definition(xp in -1_000_000i64..100_000_000) {
            let l = level_for_xp(xp) as i64 - 1;
            let q = xp.max(0) / 100;
            prop_assert!(l * l <= q && (l + 1) * (l + 1) > q);
        }
    }

    #[test]
    fn rules_parse_partial_toml_shape() {
        let r: Rules = serde_json::from_value(serde_json::json!({"xp": {"upvoted": 7}})).unwrap();
        assert_eq!(r.xp.upvoted, 7);
        assert_eq!(r.xp.downvoted, -2);
        assert_eq!(r.quota.limit(Tier::Enterprise), None);
        assert!(serde_json::from_value::<Rules>(serde_json::json!({"xp": {"nope": 1}})).is_err());
    }
}
