//! What each dump row becomes: the import phases, in order, and the mapping of one row to one
//! command (or to a skip / a rejection decided without a command).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tektree_domain::{Actor, ContentCommand, UserCommand, VoteDirection};
use uuid::Uuid;

use super::ids::SiteIds;
use super::reader::Row;
use super::report::CommandKind;

/// `PostTypeId` of a question.
pub const POST_QUESTION: i64 = 1;
/// `PostTypeId` of an answer.
pub const POST_ANSWER: i64 = 2;
/// `VoteTypeId` of an accept.
pub const VOTE_ACCEPT: i64 = 1;
/// `VoteTypeId` of an upvote.
pub const VOTE_UP: i64 = 2;
/// `VoteTypeId` of a downvote.
pub const VOTE_DOWN: i64 = 3;

/// Reason of a skip: the row's post type is not a question or an answer (`post_type.N`).
pub fn skip_post_type(t: i64) -> String {
    format!("post_type.{t}")
}

/// Reason of a skip: the row's vote type is not accept/up/down (`vote_type.N`).
pub fn skip_vote_type(t: i64) -> String {
    format!("vote_type.{t}")
}

/// Reason of a skip: the comment or vote targets a post that is itself skipped (a tag wiki…).
pub const SKIP_TARGET_SKIPPED: &str = "target_skipped";

/// Reason of an accept that cannot name its question (the answer is not in Posts.xml, or the
/// accepted post is not an answer); no command is sent.
pub const REJECT_ANSWER_NOT_FOUND: &str = "not_found.answer";

/// The import phases, in the order they run; each completes before the next starts, so every
/// entity exists before a later phase references it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Users.xml → register every user.
    Users,
    /// Posts.xml, `PostTypeId` 1 → post questions (other non-answer types are skipped here).
    Questions,
    /// Posts.xml, `PostTypeId` 2 → submit answers.
    Answers,
    /// Comments.xml → add comments.
    Comments,
    /// Votes.xml, `VoteTypeId` 2 / 3 → vote (other non-accept types are skipped here).
    Votes,
    /// Votes.xml, `VoteTypeId` 1 → accept answers.
    Accepts,
}

impl Phase {
    /// Every phase in run order.
    pub const ALL: [Phase; 6] = [
        Phase::Users,
        Phase::Questions,
        Phase::Answers,
        Phase::Comments,
        Phase::Votes,
        Phase::Accepts,
    ];

    /// Lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Users => "users",
            Phase::Questions => "questions",
            Phase::Answers => "answers",
            Phase::Comments => "comments",
            Phase::Votes => "votes",
            Phase::Accepts => "accepts",
        }
    }

    /// The dump file the phase reads.
    pub fn file(self) -> &'static str {
        match self {
            Phase::Users => "Users.xml",
            Phase::Questions | Phase::Answers => "Posts.xml",
            Phase::Comments => "Comments.xml",
            Phase::Votes | Phase::Accepts => "Votes.xml",
        }
    }

    /// The attributes the phase reads (others are not even unescaped).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Phase::Users => &["Id", "CreationDate", "DisplayName"],
            Phase::Questions | Phase::Answers => &[
                "Id",
                "PostTypeId",
                "ParentId",
                "CreationDate",
                "OwnerUserId",
                "Title",
                "Body",
                "Tags",
            ],
            Phase::Comments => &["Id", "PostId", "UserId", "Text", "CreationDate"],
            Phase::Votes | Phase::Accepts => &["Id", "PostId", "VoteTypeId", "CreationDate"],
        }
    }

    /// Maps one row of [`Phase::file`] to what this phase does with it.
    ///
    /// # Errors
    /// A reason text when the row lacks a required attribute or has a malformed one.
    pub fn plan(self, row: &Row, ids: &SiteIds, posts: &PostIndex) -> Result<Step, String> {
        match self {
            Phase::Users => plan_user(row, ids),
            Phase::Questions | Phase::Answers => plan_post(self, row, ids),
            Phase::Comments => plan_comment(row, ids, posts),
            Phase::Votes | Phase::Accepts => plan_vote(self, row, ids, posts),
        }
    }
}

/// The command of one row, addressed to its aggregate.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A `user` aggregate command.
    User {
        /// Aggregate id.
        id: Uuid,
        /// The command.
        command: UserCommand,
    },
    /// A `content` aggregate command.
    Content {
        /// Aggregate id.
        id: Uuid,
        /// The command.
        command: ContentCommand,
    },
}

impl Target {
    /// The addressed aggregate's id.
    pub fn aggregate_id(&self) -> Uuid {
        match self {
            Target::User { id, .. } | Target::Content { id, .. } => *id,
        }
    }
}

/// A command to send for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// For the report.
    pub kind: CommandKind,
    /// Aggregate and command.
    pub target: Target,
    /// The row's `CreationDate` (UTC): the events' `occurred_at`.
    pub occurred_at: DateTime<Utc>,
}

/// What a phase does with one row.
// `Send` is larger since issue #6 grew `ContentCommand` (resources); a step lives for one row
// and is consumed at once, so boxing would only add an allocation per row.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send a command.
    Send(Planned),
    /// Do nothing; counted as skipped with `reason`.
    Skip {
        /// Counted under this kind.
        kind: CommandKind,
        /// `post_type.N`, `vote_type.N` or `target_skipped`.
        reason: String,
    },
    /// Counted as rejected with `reason` without sending a command (it could not be built).
    Reject {
        /// Counted under this kind.
        kind: CommandKind,
        /// A reason code like the aggregates' (`not_found.answer`).
        reason: String,
    },
    /// The row belongs to another phase reading the same file; not counted here.
    Pass,
}

/// What the import remembers of every post in Posts.xml: its type and parent question. The only
/// per-row state kept across phases (a few bytes per post).
#[derive(Debug, Clone, Default)]
pub struct PostIndex {
    posts: HashMap<i64, PostEntry>,
}

/// One post's entry in the [`PostIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostEntry {
    /// `PostTypeId`.
    pub post_type: i64,
    /// `ParentId` (answers).
    pub parent: Option<i64>,
}

impl PostIndex {
    /// Records a Posts.xml row.
    ///
    /// # Errors
    /// A reason text when `Id`, `PostTypeId` or `ParentId` is malformed, or when the `Id` was
    /// already recorded (a dump numbers each post once; a duplicate would make the type and
    /// parent of the post ambiguous).
    pub fn add_row(&mut self, row: &Row) -> Result<(), String> {
        let id = row.int("Id")?;
        let entry = PostEntry {
            post_type: row.int("PostTypeId")?,
            parent: row.opt_int("ParentId")?,
        };
        match self.posts.entry(id) {
            Entry::Occupied(_) => Err(format!("duplicate post Id={id}")),
            Entry::Vacant(v) => {
                v.insert(entry);
                Ok(())
            }
        }
    }

    /// The entry of post `id`, or `None` when Posts.xml has no such post.
    pub fn get(&self, id: i64) -> Option<PostEntry> {
        self.posts.get(&id).copied()
    }

    /// Number of posts.
    pub fn len(&self) -> usize {
        self.posts.len()
    }

    /// `true` when there are no posts.
    pub fn is_empty(&self) -> bool {
        self.posts.is_empty()
    }
}

/// Tag names of a `Tags` attribute in either dump form, `<a><b>` or `|a|b|`.
pub fn parse_tags(tags: &str) -> Vec<String> {
    let tags = tags.trim();
    if tags.starts_with('<') {
        tags.split(['<', '>'])
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect()
    } else {
        tags.split('|')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect()
    }
}

fn is_content(post_type: i64) -> bool {
    post_type == POST_QUESTION || post_type == POST_ANSWER
}

fn plan_user(row: &Row, ids: &SiteIds) -> Result<Step, String> {
    let id = row.int("Id")?;
    let occurred_at = row.date("CreationDate")?;
    // Stack Exchange shows `user<Id>` for accounts without a name; do the same.
    let display_name = match row.get("DisplayName").map(str::trim) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => format!("user{id}"),
    };
    let user_id = ids.user(id);
    Ok(Step::Send(Planned {
        kind: CommandKind::RegisterUser,
        target: Target::User {
            id: user_id,
            command: UserCommand::Register {
                user_id,
                display_name,
                preferences: Default::default(),
            },
        },
        occurred_at,
    }))
}

fn plan_post(phase: Phase, row: &Row, ids: &SiteIds) -> Result<Step, String> {
    let id = row.int("Id")?;
    let post_type = row.int("PostTypeId")?;
    let parent = row.opt_int("ParentId")?;
    let owner = row.opt_int("OwnerUserId")?.map(|u| ids.user(u));
    let occurred_at = row.date("CreationDate")?;
    let body = row.get("Body").unwrap_or_default().to_string();
    match (phase, post_type) {
        (Phase::Questions, POST_QUESTION) => {
            let question_id = ids.post(id);
            Ok(Step::Send(Planned {
                kind: CommandKind::PostQuestion,
                target: Target::Content {
                    id: question_id,
                    command: ContentCommand::PostQuestion {
                        question_id,
                        author_id: owner,
                        title: row.get("Title").unwrap_or_default().to_string(),
                        body,
                        tags: parse_tags(row.get("Tags").unwrap_or_default()),
                        actor: Actor::importer(),
                        area_id: None,
                    },
                },
                occurred_at,
            }))
        }
        (Phase::Answers, POST_ANSWER) => {
            let parent = parent.ok_or("an answer (PostTypeId 2) has no ParentId")?;
            let answer_id = ids.post(id);
            Ok(Step::Send(Planned {
                kind: CommandKind::SubmitAnswer,
                target: Target::Content {
                    id: answer_id,
                    command: ContentCommand::SubmitAnswer {
                        answer_id,
                        question_id: ids.post(parent),
                        author_id: owner,
                        body,
                        actor: Actor::importer(),
                    },
                },
                occurred_at,
            }))
        }
        (Phase::Questions, t) if !is_content(t) => Ok(Step::Skip {
            kind: CommandKind::OtherPost,
            reason: skip_post_type(t),
        }),
        _ => Ok(Step::Pass),
    }
}

fn plan_comment(row: &Row, ids: &SiteIds, posts: &PostIndex) -> Result<Step, String> {
    let id = row.int("Id")?;
    let post = row.int("PostId")?;
    let author = row.opt_int("UserId")?.map(|u| ids.user(u));
    let occurred_at = row.date("CreationDate")?;
    if let Some(p) = posts.get(post) {
        if !is_content(p.post_type) {
            return Ok(Step::Skip {
                kind: CommandKind::AddComment,
                reason: SKIP_TARGET_SKIPPED.into(),
            });
        }
    }
    let content_id = ids.post(post);
    Ok(Step::Send(Planned {
        kind: CommandKind::AddComment,
        target: Target::Content {
            id: content_id,
            command: ContentCommand::AddComment {
                content_id,
                comment_id: ids.comment(id),
                author_id: author,
                text: row.get("Text").unwrap_or_default().to_string(),
                actor: Actor::importer(),
            },
        },
        occurred_at,
    }))
}

fn plan_vote(phase: Phase, row: &Row, ids: &SiteIds, posts: &PostIndex) -> Result<Step, String> {
    let id = row.int("Id")?;
    let vote_type = row.int("VoteTypeId")?;
    let occurred_at = row.date("CreationDate")?;
    let post = match vote_type {
        VOTE_ACCEPT | VOTE_UP | VOTE_DOWN => row.int("PostId")?,
        _ => 0,
    };
    let target = posts.get(post);
    match (phase, vote_type) {
        (Phase::Votes, VOTE_UP | VOTE_DOWN) => {
            let (kind, direction) = if vote_type == VOTE_UP {
                (CommandKind::Upvote, VoteDirection::Up)
            } else {
                (CommandKind::Downvote, VoteDirection::Down)
            };
            if target.is_some_and(|p| !is_content(p.post_type)) {
                return Ok(Step::Skip {
                    kind,
                    reason: SKIP_TARGET_SKIPPED.into(),
                });
            }
            // A post missing from Posts.xml is still sent: the aggregate rejects it
            // (`not_found.content`), exactly as the API would.
            let content_id = ids.post(post);
            Ok(Step::Send(Planned {
                kind,
                target: Target::Content {
                    id: content_id,
                    command: ContentCommand::Vote {
                        content_id,
                        voter_id: ids.vote(id),
                        direction,
                        actor: Actor::importer(),
                    },
                },
                occurred_at,
            }))
        }
        (Phase::Accepts, VOTE_ACCEPT) => {
            let kind = CommandKind::AcceptAnswer;
            match target {
                Some(p) if p.post_type == POST_ANSWER => {
                    let parent = p.parent.ok_or("the accepted answer has no ParentId")?;
                    let question_id = ids.post(parent);
                    Ok(Step::Send(Planned {
                        kind,
                        target: Target::Content {
                            id: question_id,
                            command: ContentCommand::AcceptAnswer {
                                question_id,
                                answer_id: ids.post(post),
                                actor: Actor::importer(),
                            },
                        },
                        occurred_at,
                    }))
                }
                Some(p) if !is_content(p.post_type) => Ok(Step::Skip {
                    kind,
                    reason: SKIP_TARGET_SKIPPED.into(),
                }),
                // Not in Posts.xml (deleted), or a question: no question to name.
                _ => Ok(Step::Reject {
                    kind,
                    reason: REJECT_ANSWER_NOT_FOUND.into(),
                }),
            }
        }
        (Phase::Votes, t) if t != VOTE_ACCEPT => Ok(Step::Skip {
            kind: CommandKind::OtherVote,
            reason: skip_vote_type(t),
        }),
        _ => Ok(Step::Pass),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(attrs: &[(&'static str, &str)]) -> Row {
        Row::from_attrs(0, attrs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    #[test]
    fn tags_in_both_forms() {
        assert_eq!(
            parse_tags("<discussion><answers>"),
            ["discussion", "answers"]
        );
        assert_eq!(
            parse_tags("|discussion|answers|"),
            ["discussion", "answers"]
        );
        assert!(parse_tags("").is_empty());
    }

    #[test]
    fn maps_posts_votes_and_accepts() {
        let ids = SiteIds::new("s");
        let mut posts = PostIndex::default();
        let q = row(&[
            ("Id", "1"),
            ("PostTypeId", "1"),
            ("CreationDate", "2011-10-11T19:42:20.713"),
            ("Title", "T"),
            ("Tags", "<a><b>"),
        ]);
        let a = row(&[
            ("Id", "2"),
            ("PostTypeId", "2"),
            ("ParentId", "1"),
            ("CreationDate", "2011-10-11T19:44:27.657"),
            ("OwnerUserId", "7"),
            ("Body", "b"),
        ]);
        let wiki = row(&[
            ("Id", "3"),
            ("PostTypeId", "4"),
            ("CreationDate", "2011-10-11T19:44:27"),
        ]);
        for r in [&q, &a, &wiki] {
            posts.add_row(r).unwrap();
        }
        assert_eq!(posts.add_row(&a).unwrap_err(), "duplicate post Id=2");
        assert_eq!(posts.get(2).map(|p| p.parent), Some(Some(1)));
        let Step::Send(Planned {
            target:
                Target::Content {
                    command:
                        ContentCommand::PostQuestion {
                            author_id, tags, ..
                        },
                    ..
                },
            ..
        }) = Phase::Questions.plan(&q, &ids, &posts).unwrap()
        else {
            panic!("not a question")
        };
        assert_eq!((author_id, tags), (None, vec!["a".into(), "b".into()]));
        assert_eq!(Phase::Questions.plan(&a, &ids, &posts).unwrap(), Step::Pass);
        assert_eq!(
            Phase::Questions.plan(&wiki, &ids, &posts).unwrap(),
            Step::Skip {
                kind: CommandKind::OtherPost,
                reason: "post_type.4".into()
            }
        );
        let vote = |id: &str, post: &str, t: &str| {
            row(&[
                ("Id", id),
                ("PostId", post),
                ("VoteTypeId", t),
                ("CreationDate", "2011-10-11T00:00:00.000"),
            ])
        };
        let Step::Send(p) = Phase::Accepts
            .plan(&vote("9", "2", "1"), &ids, &posts)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(p.target.aggregate_id(), ids.post(1));
        assert_eq!(
            Phase::Accepts
                .plan(&vote("9", "99", "1"), &ids, &posts)
                .unwrap(),
            Step::Reject {
                kind: CommandKind::AcceptAnswer,
                reason: "not_found.answer".into()
            }
        );
        assert_eq!(
            Phase::Votes
                .plan(&vote("9", "2", "1"), &ids, &posts)
                .unwrap(),
            Step::Pass
        );
        assert_eq!(
            Phase::Votes
                .plan(&vote("9", "2", "10"), &ids, &posts)
                .unwrap(),
            Step::Skip {
                kind: CommandKind::OtherVote,
                reason: "vote_type.10".into()
            }
        );
        let Step::Send(p) = Phase::Votes
            .plan(&vote("9", "99", "3"), &ids, &posts)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            p.target,
            Target::Content {
                id: ids.post(99),
                command: ContentCommand::Vote {
                    content_id: ids.post(99),
                    voter_id: ids.vote(9),
                    direction: VoteDirection::Down,
                    actor: Actor::importer(),
                }
            }
        );
        assert!(Phase::Votes
            .plan(&vote("x", "2", "2"), &ids, &posts)
            .unwrap_err()
            .contains("Id=\"x\""));
    }
}
