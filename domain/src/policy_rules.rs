//! What the policies (process managers) decide, as plain functions of one event (issue #2 §4).
//! The runners that turn these decisions into commands live in `tektree-commands`.

use uuid::Uuid;

use crate::events::{Event, VoteDirection};
use crate::rules::XpRules;

/// One XP award decided for one source event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Award {
    /// Recipient.
    pub user_id: Uuid,
    /// XP delta (never 0: zero awards are dropped).
    pub amount: i64,
    /// Tags of the content involved.
    pub tags: Vec<String>,
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
/// accept awards the answer's author and the question's author, both 0 when they are the same
/// user.
pub fn xp_awards(rules: &XpRules, event: &Event) -> Vec<Award> {
    let one = |user: Option<Uuid>, amount: i64, tags: &Vec<String>| -> Vec<Award> {
        match user {
            Some(user_id) if amount != 0 => vec![Award {
                user_id,
                amount,
                tags: tags.clone(),
            }],
            _ => vec![],
        }
    };
    match event {
        Event::UserRegistered(e) => one(Some(e.user_id), rules.registration, &vec![]),
        Event::QuestionPosted(e) => one(e.author_id, rules.question_posted, &e.tags),
        Event::AnswerSubmitted(e) => one(e.author_id, rules.answer_submitted, &e.tags),
        Event::CommentAdded(e) => one(e.author_id, rules.comment_added, &e.tags),
        Event::ContentUpvoted(e) | Event::ContentDownvoted(e) => {
            let now = if matches!(event, Event::ContentUpvoted(_)) {
                VoteDirection::Up
            } else {
                VoteDirection::Down
            };
            let before = e.previous.map(|d| vote_value(rules, d)).unwrap_or(0);
            one(
                e.content_author_id,
                vote_value(rules, now) - before,
                &e.tags,
            )
        }
        Event::AnswerAccepted(e) => {
            if e.question_author_id == e.answer_author_id {
                return vec![];
            }
            let mut v = one(e.answer_author_id, rules.accepted_answer, &e.tags);
            v.extend(one(e.question_author_id, rules.accepted_question, &e.tags));
            v
        }
        _ => vec![],
    }
}

/// The user whose usage `event` meters, if any: authors of questions, answers and comments.
pub fn metered_user(event: &Event) -> Option<Uuid> {
    match event {
        Event::QuestionPosted(e) => e.author_id,
        Event::AnswerSubmitted(e) => e.author_id,
        Event::CommentAdded(e) => e.author_id,
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
        };
        let r = XpRules::default();
        assert_eq!(xp_awards(&r, &Event::ContentUpvoted(v(None)))[0].amount, 10);
        assert_eq!(
            xp_awards(&r, &Event::ContentDownvoted(v(Some(VoteDirection::Up))))[0].amount,
            -12
        );
        assert_eq!(
            xp_awards(&r, &Event::ContentUpvoted(v(Some(VoteDirection::Down))))[0].amount,
            12
        );
    }

    #[test]
    fn self_accept_awards_nothing_and_unknown_author_awards_nobody() {
        let u = Uuid::new_v4();
        let acc = |q, a| {
            Event::AnswerAccepted(AnswerAccepted {
                question_id: Uuid::nil(),
                answer_id: Uuid::nil(),
                question_author_id: q,
                answer_author_id: a,
                tags: vec![],
            })
        };
        let r = XpRules::default();
        assert!(xp_awards(&r, &acc(Some(u), Some(u))).is_empty());
        let other = Uuid::new_v4();
        let v = xp_awards(&r, &acc(Some(u), Some(other)));
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].user_id, v[0].amount), (other, 15));
        assert_eq!((v[1].user_id, v[1].amount), (u, 2));
        let v = xp_awards(&r, &acc(None, Some(other)));
        assert_eq!(v.len(), 1);
    }
}
