//! The projections: pure functions from an event to read-model changes.

use chrono::{DateTime, Datelike, Utc};
use tektree_domain::events::Event;
use tektree_domain::{EventEnvelope, Tier};
use uuid::Uuid;

/// The four projections. Each one's [`name`](Projection::name) is also its consumer group,
/// checkpoint and sequence-guard name. A new projection is a new variant here: the compiler
/// then lists every `match` that must handle it ([`project`] first).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    /// `xp`: a user's XP, level, questions, answers and accepted answers.
    Xp,
    /// `leaderboard`: XP per user on the all-time, weekly, tag and area boards.
    Leaderboard,
    /// `quota`: usage per user and month against the tier's limit, and the current tier.
    Quota,
    /// `content`: per question / answer votes, score, answers, comments, accepted answer.
    Content,
    /// `tags`: questions and answers per tag.
    Tags,
}

impl Projection {
    /// Every projection, in the order they are listed, run and reported.
    pub const ALL: [Projection; 5] = [
        Projection::Xp,
        Projection::Leaderboard,
        Projection::Quota,
        Projection::Content,
        Projection::Tags,
    ];

    /// The name: `xp`, `leaderboard`, `quota`, `content` or `tags`.
    pub const fn name(self) -> &'static str {
        match self {
            Projection::Xp => "xp",
            Projection::Leaderboard => "leaderboard",
            Projection::Quota => "quota",
            Projection::Content => "content",
            Projection::Tags => "tags",
        }
    }

    /// The projection named `name`, if there is one (exact, case-sensitive).
    pub fn from_name(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`Projection`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown projection {0:?}: expected xp, leaderboard, quota, content or tags")]
pub struct UnknownProjection(pub String);

impl std::str::FromStr for Projection {
    type Err = UnknownProjection;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Projection::from_name(s).ok_or_else(|| UnknownProjection(s.to_owned()))
    }
}

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
    /// `tags` read model: add to a tag's counts.
    Tag {
        /// The tag (as the content carries it: lower case).
        tag: String,
        /// Δ questions.
        questions: i64,
        /// Δ answers.
        answers: i64,
    },
    /// `quota` read model: the user's current tier.
    Tier {
        /// The user.
        user_id: Uuid,
        /// Current tier.
        tier: Tier,
    },
}

impl Change {
    /// The projection whose read model this change writes.
    pub fn projection(&self) -> Projection {
        match self {
            Change::Xp { .. } => Projection::Xp,
            Change::Leaderboard { .. } => Projection::Leaderboard,
            Change::Content(_) => Projection::Content,
            Change::Usage { .. } | Change::QuotaExceeded { .. } | Change::Tier { .. } => {
                Projection::Quota
            }
            Change::Tag { .. } => Projection::Tags,
        }
    }
}

/// ISO-8601 week board of an instant (UTC): `weekly:YYYY-Www`, e.g. `weekly:2024-W01`.
pub fn weekly_board(t: DateTime<Utc>) -> String {
    let w = t.iso_week();
    format!("weekly:{:04}-W{:02}", w.year(), w.week())
}

/// The changes `projection` makes for one event; none for events it ignores.
pub fn project(projection: Projection, envelope: &EventEnvelope, event: &Event) -> Vec<Change> {
    let _ = envelope;
    project_event(projection, event)
}

/// [`project`] of the event alone: no projection reads the envelope's metadata (time boards
/// come from the payload's timestamps), so a rebuild that reads [`tektree_domain::StoredEvent`]s
/// needs no envelope.
pub fn project_event(projection: Projection, event: &Event) -> Vec<Change> {
    match projection {
        Projection::Xp => xp(event),
        Projection::Leaderboard => leaderboard(event),
        Projection::Quota => quota(event),
        Projection::Content => content(event),
        Projection::Tags => tags(event),
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
    // An achievement's reward counts all-time only: which activity completes an achievement
    // (and so the week of the reward) depends on the order in which the profile sees a user's
    // activities, while a weekly board must not (a quest's reward is credited to the quest's
    // own week, which is fixed by its condition).
    let mut boards = vec!["all-time".to_string()];
    if e.source_event_type != "gamification.achievement.unlocked" {
        boards.push(weekly_board(e.source_occurred_at));
    }
    for tag in &e.tags {
        let board = format!("tag:{tag}");
        // A repeated tag must not credit its board twice.
        if !boards.contains(&board) {
            boards.push(board);
        }
    }
    if let Some(area) = e.area_id {
        boards.push(format!("area:{area}"));
    }
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
        Event::SubscriptionUpgraded(e) | Event::SubscriptionDowngraded(e) => vec![Change::Tier {
            user_id: e.user_id,
            tier: e.to,
        }],
        Event::SubscriptionCancelled(e) => vec![Change::Tier {
            user_id: e.user_id,
            tier: Tier::Free,
        }],
        _ => vec![],
    }
}

/// One [`Change::Tag`] per distinct tag of a posted question (`questions` +1) or a submitted
/// answer (`answers` +1; an answer carries its question's tags).
fn tags(event: &Event) -> Vec<Change> {
    let (tags, questions, answers) = match event {
        Event::QuestionPosted(e) => (&e.tags, 1, 0),
        Event::AnswerSubmitted(e) => (&e.tags, 0, 1),
        _ => return vec![],
    };
    let distinct: std::collections::BTreeSet<&String> = tags.iter().collect();
    distinct
        .into_iter()
        .map(|tag| Change::Tag {
            tag: tag.clone(),
            questions,
            answers,
        })
        .collect()
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
        Event::DiscussionStarted(e) => vec![Change::Content(ContentDelta {
            kind: Some("discussion"),
            author_id: e.author_id,
            ..d(e.discussion_id)
        })],
        Event::InsightShared(e) => vec![Change::Content(ContentDelta {
            kind: Some("insight"),
            author_id: e.author_id,
            ..d(e.insight_id)
        })],
        Event::ResourceUploaded(e) => vec![Change::Content(ContentDelta {
            kind: Some("resource"),
            author_id: e.author_id,
            ..d(e.resource_id)
        })],
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
    use tektree_domain::events::{
        AnswerAccepted, AnswerSubmitted, ContentVoted, LevelUp, QuestionPosted, QuotaExceeded,
        SubscriptionCreated, UsageRecorded, XpEarned,
    };
    use tektree_domain::{Actor, EventMetadata, NewEvent, VoteDirection};

    fn envelope(event: &Event, aggregate_id: Uuid) -> EventEnvelope {
        NewEvent {
            event_id: Uuid::new_v4(),
            aggregate_type: event.aggregate_type().into(),
            aggregate_id,
            sequence: 1,
            event: event.clone(),
            metadata: EventMetadata {
                occurred_at: "2024-05-01T12:00:00Z".parse().unwrap(),
                correlation_id: Uuid::new_v4(),
                causation_id: Uuid::new_v4(),
                actor: Actor::System("test".into()),
            },
        }
        .into_envelope(1, "2024-05-01T12:00:01Z".parse().unwrap())
    }

    fn all(event: &Event, aggregate_id: Uuid) -> Vec<(&'static str, Vec<Change>)> {
        let env = envelope(event, aggregate_id);
        Projection::ALL
            .into_iter()
            .map(|p| (p.name(), project(p, &env, event)))
            .filter(|(_, c)| !c.is_empty())
            .collect()
    }

    fn vote(up: bool, previous: Option<VoteDirection>, content_id: Uuid) -> Event {
        let v = ContentVoted {
            content_id,
            voter_id: Uuid::new_v4(),
            previous,
            content_author_id: Some(Uuid::new_v4()),
            tags: vec!["rust".into()],
            area_id: None,
            on_answer: false,
            score: None,
        };
        if up {
            Event::ContentUpvoted(v)
        } else {
            Event::ContentDownvoted(v)
        }
    }

    fn votes(c: &[(&str, Vec<Change>)]) -> (i64, i64) {
        match c {
            [("content", changes)] => match changes.as_slice() {
                [Change::Content(d)] => (d.upvotes, d.downvotes),
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn votes_only_touch_content_and_replacement_moves_the_vote() {
        let id = Uuid::new_v4();
        assert_eq!(votes(&all(&vote(true, None, id), id)), (1, 0));
        assert_eq!(votes(&all(&vote(false, None, id), id)), (0, 1));
        assert_eq!(
            votes(&all(&vote(true, Some(VoteDirection::Down), id), id)),
            (1, -1)
        );
        assert_eq!(
            votes(&all(&vote(false, Some(VoteDirection::Up), id), id)),
            (-1, 1)
        );
        assert_eq!(
            votes(&all(&vote(true, Some(VoteDirection::Up), id), id)),
            (0, 0)
        );
    }

    #[test]
    fn answers_increment_their_question_and_the_author() {
        let (q, a, author) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let e = Event::AnswerSubmitted(AnswerSubmitted {
            answer_id: a,
            question_id: q,
            author_id: Some(author),
            body: "b".into(),
            tags: vec!["rust".into()],
            area_id: None,
        });
        let env = envelope(&e, a);
        assert_eq!(
            project(Projection::Content, &env, &e),
            vec![
                Change::Content(ContentDelta {
                    content_id: a,
                    kind: Some("answer"),
                    question_id: Some(q),
                    author_id: Some(author),
                    ..Default::default()
                }),
                Change::Content(ContentDelta {
                    content_id: q,
                    answers: 1,
                    ..Default::default()
                }),
            ]
        );
        assert_eq!(
            project(Projection::Xp, &env, &e),
            vec![Change::Xp {
                user_id: author,
                xp: 0,
                questions: 0,
                answers: 1,
                accepted_answers: 0
            }]
        );
        assert!(project(Projection::Leaderboard, &env, &e).is_empty());
        assert!(project(Projection::Quota, &env, &e).is_empty());
    }

    #[test]
    fn tags_count_questions_and_answers_once_per_distinct_tag() {
        let (q, a) = (Uuid::new_v4(), Uuid::new_v4());
        let posted = Event::QuestionPosted(QuestionPosted {
            question_id: q,
            author_id: None,
            title: "t".into(),
            body: String::new(),
            // Imported or upcast events may repeat a tag: it counts once.
            tags: vec!["rust".into(), "sqlite".into(), "rust".into()],
            area_id: None,
        });
        let answered = Event::AnswerSubmitted(AnswerSubmitted {
            answer_id: a,
            question_id: q,
            author_id: None,
            body: "b".into(),
            tags: vec!["rust".into()],
            area_id: None,
        });
        let tag = |t: &str, questions, answers| Change::Tag {
            tag: t.into(),
            questions,
            answers,
        };
        assert_eq!(
            project(Projection::Tags, &envelope(&posted, q), &posted),
            vec![tag("rust", 1, 0), tag("sqlite", 1, 0)]
        );
        assert_eq!(
            project(Projection::Tags, &envelope(&answered, a), &answered),
            vec![tag("rust", 0, 1)]
        );
        // Votes, comments and likes do not change a tag's counts.
        assert!(project(
            Projection::Tags,
            &envelope(&posted, q),
            &vote(true, None, q)
        )
        .is_empty());
    }

    #[test]
    fn authorless_content_gives_no_xp_row() {
        let q = Uuid::new_v4();
        let e = Event::QuestionPosted(QuestionPosted {
            question_id: q,
            author_id: None,
            title: "t".into(),
            body: String::new(),
            tags: vec![],
            area_id: None,
        });
        let changes = all(&e, q);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, "content");
    }

    #[test]
    fn accept_sets_the_question_and_credits_the_answer_author() {
        let (q, a, qa, aa) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let e = Event::AnswerAccepted(AnswerAccepted {
            question_id: q,
            answer_id: a,
            question_author_id: Some(qa),
            answer_author_id: Some(aa),
            tags: vec![],
            area_id: None,
        });
        assert_eq!(
            all(&e, q),
            vec![
                (
                    "xp",
                    vec![Change::Xp {
                        user_id: aa,
                        xp: 0,
                        questions: 0,
                        answers: 0,
                        accepted_answers: 1
                    }]
                ),
                (
                    "content",
                    vec![Change::Content(ContentDelta {
                        content_id: q,
                        accepted_answer_id: Some(a),
                        ..Default::default()
                    })]
                ),
            ]
        );
    }

    #[test]
    fn xp_earned_credits_all_time_weekly_and_each_distinct_tag_board() {
        let user = Uuid::new_v4();
        let e = Event::XpEarned(XpEarned {
            user_id: user,
            amount: -2,
            source_event_id: Uuid::new_v4(),
            source_event_type: "knowledge.content.downvoted".into(),
            source_occurred_at: "2024-01-01T00:00:00Z".parse().unwrap(),
            tags: vec!["rust".into(), "sql".into(), "rust".into()],
            total_xp: 8,
            activity: None,
            area_id: None,
        });
        let env = envelope(&e, user);
        let boards: Vec<(String, i64)> = project(Projection::Leaderboard, &env, &e)
            .into_iter()
            .map(|c| match c {
                Change::Leaderboard { board, user_id, xp } => {
                    assert_eq!(user_id, user);
                    (board, xp)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            boards,
            vec![
                ("all-time".to_string(), -2),
                ("weekly:2024-W01".to_string(), -2),
                ("tag:rust".to_string(), -2),
                ("tag:sql".to_string(), -2),
            ]
        );
        assert_eq!(
            project(Projection::Xp, &env, &e),
            vec![Change::Xp {
                user_id: user,
                xp: -2,
                questions: 0,
                answers: 0,
                accepted_answers: 0
            }]
        );
        assert!(project(Projection::Content, &env, &e).is_empty());
    }

    fn boards_of(e: &Event, user: Uuid) -> Vec<String> {
        project(Projection::Leaderboard, &envelope(e, user), e)
            .into_iter()
            .map(|c| match c {
                Change::Leaderboard { board, .. } => board,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn area_boards_join_and_achievement_rewards_count_all_time_only() {
        let (user, area) = (Uuid::new_v4(), Uuid::new_v4());
        let earned = |source: &str, area_id| {
            Event::XpEarned(XpEarned {
                user_id: user,
                amount: 5,
                source_event_id: Uuid::new_v4(),
                source_event_type: source.into(),
                source_occurred_at: "2024-01-01T00:00:00Z".parse().unwrap(),
                tags: vec![],
                total_xp: 5,
                activity: None,
                area_id,
            })
        };
        assert_eq!(
            boards_of(&earned("knowledge.question.posted", Some(area)), user),
            vec![
                "all-time".to_string(),
                "weekly:2024-W01".to_string(),
                format!("area:{area}"),
            ]
        );
        assert_eq!(
            boards_of(&earned("gamification.achievement.unlocked", None), user),
            vec!["all-time".to_string()]
        );
        assert_eq!(
            boards_of(&earned("gamification.quest.completed", None), user),
            vec!["all-time".to_string(), "weekly:2024-W01".to_string()]
        );
    }

    #[test]
    fn subscription_events_feed_only_the_quota_model() {
        let user = Uuid::new_v4();
        let created = Event::SubscriptionCreated(SubscriptionCreated {
            user_id: user,
            tier: Tier::Pro,
        });
        let usage = Event::UsageRecorded(UsageRecorded {
            user_id: user,
            period: "2024-05".into(),
            source_event_id: Uuid::new_v4(),
            source_event_type: "knowledge.question.posted".into(),
            tier: Tier::Pro,
            used: 3,
            limit: Some(1000),
        });
        let exceeded = Event::QuotaExceeded(QuotaExceeded {
            user_id: user,
            period: "2024-05".into(),
            tier: Tier::Pro,
            used: 1001,
            limit: 1000,
        });
        assert_eq!(
            all(&created, user),
            vec![(
                "quota",
                vec![Change::Tier {
                    user_id: user,
                    tier: Tier::Pro
                }]
            )]
        );
        assert_eq!(
            all(&usage, user),
            vec![(
                "quota",
                vec![Change::Usage {
                    user_id: user,
                    period: "2024-05".into(),
                    tier: Tier::Pro,
                    used: 3,
                    limit: Some(1000)
                }]
            )]
        );
        assert_eq!(
            all(&exceeded, user),
            vec![(
                "quota",
                vec![Change::QuotaExceeded {
                    user_id: user,
                    period: "2024-05".into()
                }]
            )]
        );
    }

    #[test]
    fn ignored_events_and_unknown_projections_give_nothing() {
        let user = Uuid::new_v4();
        let e = Event::LevelUp(LevelUp {
            user_id: user,
            from_level: 1,
            to_level: 2,
            total_xp: 100,
        });
        assert!(all(&e, user).is_empty());
        let q = Event::QuestionPosted(QuestionPosted {
            question_id: user,
            author_id: Some(user),
            title: "t".into(),
            body: String::new(),
            tags: vec![],
            area_id: None,
        });
        assert_eq!(
            all(&q, user)
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            ["xp", "content"]
        );
    }

    #[test]
    fn projections_are_named_and_parsed_by_their_checkpoint_names() {
        let names: Vec<&str> = Projection::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["xp", "leaderboard", "quota", "content", "tags"]);
        assert_eq!("tags".parse::<Projection>(), Ok(Projection::Tags));
        assert_eq!("quota".parse::<Projection>(), Ok(Projection::Quota));
        assert_eq!(Projection::Leaderboard.to_string(), "leaderboard");
        for bad in ["policy.gamification", "XP", "", "content "] {
            assert_eq!(
                bad.parse::<Projection>(),
                Err(UnknownProjection(bad.into())),
                "{bad:?}"
            );
        }
    }

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
