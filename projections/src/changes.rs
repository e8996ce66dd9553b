//! The projections: pure functions from an event to read-model changes.

use chrono::{DateTime, Datelike, Utc};
use tektree_domain::events::Event;
use tektree_domain::{EventEnvelope, Tier};
use uuid::Uuid;

/// Names of the four projections; each is also its consumer group and checkpoint name.
pub const PROJECTIONS: [&str; 4] = ["xp", "leaderboard", "quota", "content"];

/// A projection name (one of [`PROJECTIONS`]).
pub type ProjectionName = &'static str;

/// Counter deltas and facts for one content row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentDelta {
    /// The row.
    pub content_id: Uuid,
    /// Set when the content is posted: `question` or `answer`.
    pub kind: Option<&'static str>,
    /// Set when an answer is submitted.
    pub question_id: Option<Uuid>,
    /// Set when posted.
    pub author_id: Option<Uuid>,
    /// Δ upvotes.
    pub upvotes: i64,
    /// Δ downvotes.
    pub downvotes: i64,
    /// Δ answer count.
    pub answers: i64,
    /// Δ comment count.
    pub comments: i64,
    /// Set when an answer is accepted.
    pub accepted_answer_id: Option<Uuid>,
}

/// One commutative change to a read model. Score is derived (`upvotes − downvotes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `xp` read model: add to a user's totals.
    Xp {
        /// The user.
        user_id: Uuid,
        /// Δ XP.
        xp: i64,
        /// Δ questions.
        questions: i64,
        /// Δ answers.
        answers: i64,
        /// Δ accepted answers.
        accepted_answers: i64,
    },
    /// `leaderboard` read model: add XP to a user's entry on a board.
    Leaderboard {
        /// Board name.
        board: String,
        /// The user.
        user_id: Uuid,
        /// Δ XP.
        xp: i64,
    },
    /// `content` read model.
    Content(ContentDelta),
    /// `quota` read model: a usage record (`used` is kept as the maximum seen).
    Usage {
        /// The user.
        user_id: Uuid,
        /// `YYYY-MM`.
        period: String,
        /// Tier in force.
        tier: Tier,
        /// Units used so far in the period.
        used: u64,
        /// Limit; `None` = unlimited.
        limit: Option<u64>,
    },
    /// `quota` read model: the period's quota was exceeded.
    QuotaExceeded {
        /// The user.
        user_id: Uuid,
        /// `YYYY-MM`.
        period: String,
    },
    /// `quota` read model: the user's current tier.
    Tier {
        /// The user.
        user_id: Uuid,
        /// Current tier.
        tier: Tier,
    },
}

/// ISO-8601 week board of an instant (UTC): `weekly:YYYY-Www`, e.g. `weekly:2024-W01`.
pub fn weekly_board(t: DateTime<Utc>) -> String {
    let w = t.iso_week();
    format!("weekly:{:04}-W{:02}", w.year(), w.week())
}

/// The changes projection `projection` makes for one event. Unknown projection names and
/// events a projection ignores give no changes.
pub fn project(projection: &str, envelope: &EventEnvelope, event: &Event) -> Vec<Change> {
    let _ = envelope;
    match projection {
        "xp" => xp(event),
        "leaderboard" => leaderboard(event),
        "quota" => quota(event),
        "content" => content(event),
        _ => vec![],
    }
}

fn xp_delta(user_id: Uuid) -> Change {
    Change::Xp {
        user_id,
        xp: 0,
        questions: 0,
        answers: 0,
        accepted_answers: 0,
    }
}

fn xp(event: &Event) -> Vec<Change> {
    let with = |user: Option<Uuid>, f: &dyn Fn(&mut Change)| -> Vec<Change> {
        user.map(|u| {
            let mut c = xp_delta(u);
            f(&mut c);
            vec![c]
        })
        .unwrap_or_default()
    };
    match event {
        Event::XpEarned(e) => with(Some(e.user_id), &|c| {
            if let Change::Xp { xp, .. } = c {
                *xp = e.amount
            }
        }),
        Event::QuestionPosted(e) => with(e.author_id, &|c| {
            if let Change::Xp { questions, .. } = c {
                *questions = 1
            }
        }),
        Event::AnswerSubmitted(e) => with(e.author_id, &|c| {
            if let Change::Xp { answers, .. } = c {
                *answers = 1
            }
        }),
        Event::AnswerAccepted(e) => with(e.answer_author_id, &|c| {
            if let Change::Xp {
                accepted_answers, ..
            } = c
            {
                *accepted_answers = 1
            }
        }),
        _ => vec![],
    }
}

fn leaderboard(event: &Event) -> Vec<Change> {
    let Event::XpEarned(e) = event else {
        return vec![];
    };
    let mut boards = vec!["all-time".to_string(), weekly_board(e.source_occurred_at)];
    boards.extend(e.tags.iter().map(|t| format!("tag:{t}")));
    boards
        .into_iter()
        .map(|board| Change::Leaderboard {
            board,
            user_id: e.user_id,
            xp: e.amount,
        })
        .collect()
}

fn quota(event: &Event) -> Vec<Change> {
    match event {
        Event::SubscriptionCreated(e) => vec![Change::Tier {
            user_id: e.user_id,
            tier: e.tier,
        }],
        Event::UsageRecorded(e) => vec![Change::Usage {
            user_id: e.user_id,
            period: e.period.clone(),
            tier: e.tier,
            used: e.used,
            limit: e.limit,
        }],
        Event::QuotaExceeded(e) => vec![Change::QuotaExceeded {
            user_id: e.user_id,
            period: e.period.clone(),
        }],
        _ => vec![],
    }
}

fn content(event: &Event) -> Vec<Change> {
    let d = |content_id| ContentDelta {
        content_id,
        ..Default::default()
    };
    match event {
        Event::QuestionPosted(e) => vec![Change::Content(ContentDelta {
            kind: Some("question"),
            author_id: e.author_id,
            ..d(e.question_id)
        })],
        Event::AnswerSubmitted(e) => vec![
            Change::Content(ContentDelta {
                kind: Some("answer"),
                question_id: Some(e.question_id),
                author_id: e.author_id,
                ..d(e.answer_id)
            }),
            Change::Content(ContentDelta {
                answers: 1,
                ..d(e.question_id)
            }),
        ],
        Event::CommentAdded(e) => vec![Change::Content(ContentDelta {
            comments: 1,
            ..d(e.content_id)
        })],
        Event::ContentUpvoted(e) | Event::ContentDownvoted(e) => {
            let up = matches!(event, Event::ContentUpvoted(_));
            let mut c = d(e.content_id);
            if up {
                c.upvotes += 1
            } else {
                c.downvotes += 1
            }
            match e.previous {
                Some(tektree_domain::VoteDirection::Up) => c.upvotes -= 1,
                Some(tektree_domain::VoteDirection::Down) => c.downvotes -= 1,
                None => {}
            }
            vec![Change::Content(c)]
        }
        Event::AnswerAccepted(e) => vec![Change::Content(ContentDelta {
            accepted_answer_id: Some(e.answer_id),
            ..d(e.question_id)
        })],
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_week_boards_use_the_iso_year() {
        // 2021-01-03 is a Sunday in ISO week 53 of 2020.
        assert_eq!(
            weekly_board("2021-01-03T23:00:00Z".parse().unwrap()),
            "weekly:2020-W53"
        );
        assert_eq!(
            weekly_board("2024-12-30T00:00:00Z".parse().unwrap()),
            "weekly:2025-W01"
        );
    }
}
