//! What the policies (process managers) decide, as plain functions of one event (issue #2 §4).
//! The runners that turn these decisions into commands live in `tektree-commands`.

use uuid::Uuid;

use crate::events::{Activity, Event, VoteDirection};
use crate::rules::XpRules;

/// One XP award decided for one source event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Award {
    /// Recipient.
    pub user_id: Uuid,
    /// XP delta (0 only when `activity` is set: the activity still counts towards
    /// achievements, streaks and quests).
    pub amount: i64,
    /// Tags of the content involved.
    pub tags: Vec<String>,
    /// Area of the content involved.
    pub area_id: Option<Uuid>,
    /// What the recipient did (or had done to their answer), for achievements.
    pub activity: Option<Activity>,
}

fn vote_value(rules: &XpRules, d: VoteDirection) -> i64 {
    match d {
        VoteDirection::Up => rules.upvoted,
        VoteDirection::Down => rules.downvoted,
    }
}

/// The XP awards `event` earns under `rules`. Content with no known author awards nobody. A vote
/// that replaces the voter's earlier vote awards the difference (a downvote replacing an upvote
/// awards −2 − 10 = −12 by default), so the author's XP always reflects current votes. An
/// accept awards the answer's author and the question's author, both 0 XP when they are the
/// same user (the answer's author still records the accepted answer). Unlocked achievements
/// and completed quests award their `xp_reward` to their user (issue #6).
pub fn xp_awards(rules: &XpRules, event: &Event) -> Vec<Award> {
    let one = |user: Option<Uuid>,
               amount: i64,
               tags: &[String],
               area_id: Option<Uuid>,
               activity: Option<Activity>|
     -> Vec<Award> {
        match user {
            Some(user_id) if amount != 0 || activity.is_some() => vec![Award {
                user_id,
                amount,
                tags: tags.to_vec(),
                area_id,
                activity,
            }],
            _ => vec![],
        }
    };
    match event {
        Event::UserRegistered(e) => one(Some(e.user_id), rules.registration, &[], None, None),
        Event::QuestionPosted(e) => one(
            e.author_id,
            rules.question_posted,
            &e.tags,
            e.area_id,
            Some(Activity::Question),
        ),
        Event::AnswerSubmitted(e) => one(
            e.author_id,
            rules.answer_submitted,
            &e.tags,
            e.area_id,
            Some(Activity::Answer {
                answer_id: e.answer_id,
            }),
        ),
        Event::DiscussionStarted(e) => one(
            e.author_id,
            rules.discussion_started,
            &e.tags,
            e.area_id,
            Some(Activity::Discussion),
        ),
        Event::InsightShared(e) => one(
            e.author_id,
            rules.insight_shared,
            &e.tags,
            e.area_id,
            Some(Activity::Insight),
        ),
        Event::ResourceUploaded(e) => one(
            e.author_id,
            rules.resource_uploaded,
            &e.tags,
            e.area_id,
            Some(Activity::Resource),
        ),
        Event::CommentAdded(e) => one(
            e.author_id,
            rules.comment_added,
            &e.tags,
            e.area_id,
            Some(Activity::Comment),
        ),
        Event::ContentUpvoted(e) | Event::ContentDownvoted(e) => {
            let now = if matches!(event, Event::ContentUpvoted(_)) {
                VoteDirection::Up
            } else {
                VoteDirection::Down
            };
            let before = e.previous.map(|d| vote_value(rules, d)).unwrap_or(0);
            let activity = e.on_answer.then(|| Activity::AnswerVote {
                answer_id: e.content_id,
                score_delta: now.score() - e.previous.map(VoteDirection::score).unwrap_or(0),
                score: e.score,
            });
            one(
                e.content_author_id,
                vote_value(rules, now) - before,
                &e.tags,
                e.area_id,
                activity,
            )
        }
        Event::ContentLiked(e) if e.content_author_id != Some(e.user_id) => {
            one(e.content_author_id, rules.liked, &e.tags, e.area_id, None)
        }
        Event::AnswerAccepted(e) => {
            let accepted = Some(Activity::AnswerAccepted {
                answer_id: e.answer_id,
            });
            if e.question_author_id == e.answer_author_id {
                return one(e.answer_author_id, 0, &e.tags, e.area_id, accepted);
            }
            let mut v = one(
                e.answer_author_id,
                rules.accepted_answer,
                &e.tags,
                e.area_id,
                accepted,
            );
            v.extend(one(
                e.question_author_id,
                rules.accepted_question,
                &e.tags,
                e.area_id,
                None,
            ));
            v
        }
        Event::AchievementUnlocked(e) => one(Some(e.user_id), e.xp_reward, &[], None, None),
        Event::QuestCompleted(e) => one(Some(e.user_id), e.xp_reward, &[], None, None),
        _ => vec![],
    }
}

/// The user whose usage `event` meters, if any: authors of questions, answers, comments,
/// discussions, insights and resources.
pub fn metered_user(event: &Event) -> Option<Uuid> {
    match event {
        Event::QuestionPosted(e) => e.author_id,
        Event::AnswerSubmitted(e) => e.author_id,
        Event::CommentAdded(e) => e.author_id,
        Event::DiscussionStarted(e) => e.author_id,
        Event::InsightShared(e) => e.author_id,
        Event::ResourceUploaded(e) => e.author_id,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AnswerAccepted, ContentVoted};

    #[test]
    fn vote_replacement_awards_the_difference() {
        let author = Uuid::new_v4();
        let v = |previous| ContentVoted {
            content_id: Uuid::nil(),
            voter_id: Uuid::nil(),
            previous,
            content_author_id: Some(author),
            tags: vec![],
            area_id: None,
            on_answer: true,
            score: None,
        };
        let r = XpRules::default();
        assert_eq!(xp_awards(&r, &Event::ContentUpvoted(v(None)))[0].amount, 10);
        assert_eq!(
            xp_awards(&r, &Event::ContentDownvoted(v(Some(VoteDirection::Up))))[0].amount,
            -12
        );
        // On an answer the vote also records the score change (−1 − 1 = −2 here).
        assert_eq!(
            xp_awards(&r, &Event::ContentDownvoted(v(Some(VoteDirection::Up))))[0].activity,
            Some(Activity::AnswerVote {
                answer_id: Uuid::nil(),
                score_delta: -2,
                score: None,
            })
        );
        assert_eq!(
            xp_awards(&r, &Event::ContentUpvoted(v(Some(VoteDirection::Down))))[0].amount,
            12
        );
    }

    #[test]
    fn self_accept_awards_no_xp_and_unknown_author_awards_nobody() {
        let u = Uuid::new_v4();
        let acc = |q, a| {
            Event::AnswerAccepted(AnswerAccepted {
                question_id: Uuid::nil(),
                answer_id: Uuid::nil(),
                question_author_id: q,
                answer_author_id: a,
                tags: vec![],
                area_id: None,
            })
        };
        let r = XpRules::default();
        // A self-accept earns no XP but still records the accepted answer.
        let own = xp_awards(&r, &acc(Some(u), Some(u)));
        assert_eq!(own.len(), 1);
        assert_eq!((own[0].user_id, own[0].amount), (u, 0));
        assert!(matches!(
            own[0].activity,
            Some(Activity::AnswerAccepted { .. })
        ));
        let other = Uuid::new_v4();
        let v = xp_awards(&r, &acc(Some(u), Some(other)));
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].user_id, v[0].amount), (other, 15));
        assert_eq!((v[1].user_id, v[1].amount), (u, 2));
        let v = xp_awards(&r, &acc(None, Some(other)));
        assert_eq!(v.len(), 1);
    }
}
