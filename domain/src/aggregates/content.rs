//! The `content` aggregate: one question or one answer, with its comments and votes.
//!
//! Boundary choice (documented in `docs/architecture.md`): each question and each answer is its
//! own aggregate, so votes and comments on different posts never contend. Cross-post rules
//! (an answer needs an existing question; an accepted answer must belong to the question) are
//! checked through [`KnowledgeServices`]; they rely only on facts that never change once
//! committed (existence, parent question, author), so no cross-aggregate transaction is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::check_text;
use crate::actor::Actor;
use crate::error::DomainError;
use crate::events::{
    AnswerAccepted, AnswerSubmitted, CommentAdded, ContentLiked, ContentVoted, DiscussionStarted,
    Event, InsightShared, QuestionPosted, ResourceUploaded, VoteDirection,
};
use crate::services::KnowledgeServices;

/// Most tags a question may carry.
pub const MAX_TAGS: usize = 10;

/// What a content aggregate is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ContentKind {
    /// A question and its accepted answer, if any.
    Question {
        /// At most one (issue #2 §1).
        accepted_answer: Option<Uuid>,
    },
    /// An answer to `question_id`.
    Answer {
        /// The parent question.
        question_id: Uuid,
    },
    /// A discussion (issue #6).
    Discussion,
    /// An insight (issue #6).
    Insight,
    /// A resource: metadata of an uploaded file (issue #6).
    Resource,
}

/// State of one question or answer. Aggregate type `content`, id = post id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Content {
    /// `None` until posted.
    pub kind: Option<ContentKind>,
    /// Author, if known.
    pub author_id: Option<Uuid>,
    /// Own tags (question) or the question's tags (answer).
    pub tags: Vec<String>,
    /// Comment ids already added.
    pub comments: BTreeSet<Uuid>,
    /// Current vote of each voter.
    pub votes: BTreeMap<Uuid, VoteDirection>,
    /// The area, if any.
    pub area_id: Option<Uuid>,
    /// Users who liked it.
    pub likes: BTreeSet<Uuid>,
    /// Upvotes − downvotes of the current votes.
    pub score: i64,
}

/// Commands on [`Content`]. The `actor` is the principal issuing the command.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentCommand {
    /// Post a question. `author_id` must be a registered user; a user actor may only post as
    /// themselves. Title 1..=300 characters, at most 10 tags of 1..=35 characters.
    PostQuestion {
        /// New question id (= aggregate id).
        question_id: Uuid,
        /// Author, `None` only for system actors importing ownerless posts.
        author_id: Option<Uuid>,
        /// Title.
        title: String,
        /// Body.
        body: String,
        /// Tags.
        tags: Vec<String>,
        /// Area; must exist when given.
        area_id: Option<Uuid>,
        /// Issuer.
        actor: Actor,
    },
    /// Start a discussion (rules as for `PostQuestion`).
    StartDiscussion {
        /// New discussion id (= aggregate id).
        discussion_id: Uuid,
        /// Author.
        author_id: Option<Uuid>,
        /// Title, 1..=300 characters.
        title: String,
        /// Body.
        body: String,
        /// Tags.
        tags: Vec<String>,
        /// Area; must exist when given.
        area_id: Option<Uuid>,
        /// Issuer.
        actor: Actor,
    },
    /// Share an insight (rules as for `PostQuestion`; the body must not be empty).
    ShareInsight {
        /// New insight id (= aggregate id).
        insight_id: Uuid,
        /// Author.
        author_id: Option<Uuid>,
        /// Title, 1..=300 characters.
        title: String,
        /// Body, 1..=65,536 bytes.
        body: String,
        /// Tags.
        tags: Vec<String>,
        /// Area; must exist when given.
        area_id: Option<Uuid>,
        /// Issuer.
        actor: Actor,
    },
    /// Record an uploaded resource's metadata and hash (the bytes live outside the store).
    UploadResource {
        /// New resource id (= aggregate id).
        resource_id: Uuid,
        /// Uploader.
        author_id: Option<Uuid>,
        /// Title, 1..=300 characters.
        title: String,
        /// File name, 1..=255 characters without `/` or `\\`.
        file_name: String,
        /// `type/subtype`, at most 127 characters.
        media_type: String,
        /// Size in bytes, 1..=5 GiB.
        size_bytes: u64,
        /// SHA-256, 64 hex digits (normalised to lower case).
        sha256: String,
        /// Where the bytes are, an `https://` or `s3://` URL of at most 2,000 characters.
        storage_url: Option<String>,
        /// Tags.
        tags: Vec<String>,
        /// Area; must exist when given.
        area_id: Option<Uuid>,
        /// Issuer.
        actor: Actor,
    },
    /// Like existing content; once per user (a repeat is a no-op).
    Like {
        /// The liked content (= aggregate id).
        content_id: Uuid,
        /// Who likes it; a user actor may only like as themselves.
        user_id: Uuid,
        /// Issuer.
        actor: Actor,
    },
    /// Answer an existing question.
    SubmitAnswer {
        /// New answer id (= aggregate id).
        answer_id: Uuid,
        /// Must exist and be a question.
        question_id: Uuid,
        /// Author (see `PostQuestion`).
        author_id: Option<Uuid>,
        /// Body.
        body: String,
        /// Issuer.
        actor: Actor,
    },
    /// Comment on an existing question or answer. A repeated `comment_id` is a no-op.
    AddComment {
        /// The commented content (= aggregate id).
        content_id: Uuid,
        /// Comment id.
        comment_id: Uuid,
        /// Author (see `PostQuestion`).
        author_id: Option<Uuid>,
        /// Text, 1..=600 characters.
        text: String,
        /// Issuer.
        actor: Actor,
    },
    /// Vote on existing content. One vote per voter: the same vote again is a no-op, the other
    /// direction replaces the first.
    Vote {
        /// The voted content (= aggregate id).
        content_id: Uuid,
        /// The voter (a user id, or an anonymous source vote id for system actors).
        voter_id: Uuid,
        /// Up or down.
        direction: VoteDirection,
        /// Issuer.
        actor: Actor,
    },
    /// Accept `answer_id` on this question. Only the question's author (or a system actor) may
    /// accept; a question has at most one accepted answer; re-accepting the same is a no-op.
    AcceptAnswer {
        /// The question (= aggregate id).
        question_id: Uuid,
        /// Must be an answer to `question_id`.
        answer_id: Uuid,
        /// Issuer.
        actor: Actor,
    },
}

fn lookup<T>(r: Result<T, String>) -> Result<T, DomainError> {
    r.map_err(DomainError::Lookup)
}

impl Content {
    fn require_exists(&self, id: Uuid) -> Result<(), DomainError> {
        if self.kind.is_none() {
            return Err(DomainError::NotFound {
                what: "content",
                id,
            });
        }
        Ok(())
    }

    /// The checks every new post (question, discussion, insight, resource) passes after its
    /// own field checks: tags normalised, an identical repeat recognised (`None`: a no-op),
    /// otherwise the id must be new, the author registered (and the actor themselves), the
    /// area existing. Returns the normalised tags.
    #[allow(clippy::too_many_arguments)]
    async fn admit_post(
        &self,
        services: &dyn KnowledgeServices,
        kind: &ContentKind,
        id: Uuid,
        author_id: Option<Uuid>,
        tags: Vec<String>,
        area_id: Option<Uuid>,
        actor: &Actor,
    ) -> Result<Option<Vec<String>>, DomainError> {
        let tags = normalise_tags(tags)?;
        // Same kind (a question's accepted answer does not matter), author, tags and area.
        let same_kind = self
            .kind
            .as_ref()
            .is_some_and(|k| std::mem::discriminant(k) == std::mem::discriminant(kind));
        if same_kind && self.author_id == author_id && self.tags == tags && self.area_id == area_id
        {
            return Ok(None);
        }
        self.require_new(id)?;
        check_author(services, actor, author_id).await?;
        check_area(services, area_id).await?;
        Ok(Some(tags))
    }

    fn posted(
        &mut self,
        kind: ContentKind,
        author_id: Option<Uuid>,
        tags: Vec<String>,
        area_id: Option<Uuid>,
    ) {
        self.kind = Some(kind);
        self.author_id = author_id;
        self.tags = tags;
        self.area_id = area_id;
    }

    fn require_new(&self, id: Uuid) -> Result<(), DomainError> {
        if self.kind.is_some() {
            return Err(DomainError::Conflict(format!(
                "content {id} already exists"
            )));
        }
        Ok(())
    }

    /// `ContentCommand::Like`: one like per user; the user must exist.
    async fn like(
        &self,
        services: &dyn KnowledgeServices,
        content_id: Uuid,
        user_id: Uuid,
        actor: Actor,
    ) -> Result<Option<Event>, DomainError> {
        self.require_exists(content_id)?;
        if let Actor::User(u) = actor {
            if u != user_id {
                return Err(DomainError::Forbidden(format!(
                    "user {u} may not like as {user_id}"
                )));
            }
        }
        if self.likes.contains(&user_id) {
            return Ok(None);
        }
        if !lookup(services.user_exists(user_id).await)? {
            return Err(DomainError::NotFound {
                what: "user",
                id: user_id,
            });
        }
        let e = ContentLiked {
            content_id,
            user_id,
            content_author_id: self.author_id,
            tags: self.tags.clone(),
            area_id: self.area_id,
        };
        Ok(Some(Event::ContentLiked(e)))
    }

    /// `ContentCommand::SubmitAnswer`: the question must exist; an identical repeat is a no-op.
    async fn submit_answer(
        &self,
        services: &dyn KnowledgeServices,
        answer_id: Uuid,
        question_id: Uuid,
        author_id: Option<Uuid>,
        body: String,
        actor: Actor,
    ) -> Result<Option<Event>, DomainError> {
        check_text("body", &body, 1, 65_536)?;
        if let Some(ContentKind::Answer { question_id: q }) = self.kind {
            if q == question_id && self.author_id == author_id {
                return Ok(None);
            }
        }
        self.require_new(answer_id)?;
        let question =
            lookup(services.question(question_id).await)?.ok_or(DomainError::NotFound {
                what: "question",
                id: question_id,
            })?;
        check_author(services, &actor, author_id).await?;
        let e = AnswerSubmitted {
            answer_id,
            question_id,
            author_id,
            body,
            tags: question.tags,
            area_id: question.area_id,
        };
        Ok(Some(Event::AnswerSubmitted(e)))
    }

    /// `ContentCommand::AddComment` on this question or answer.
    async fn add_comment(
        &self,
        services: &dyn KnowledgeServices,
        content_id: Uuid,
        comment_id: Uuid,
        author_id: Option<Uuid>,
        text: String,
        actor: Actor,
    ) -> Result<Option<Event>, DomainError> {
        check_text("text", &text, 1, 600)?;
        self.require_exists(content_id)?;
        if self.comments.contains(&comment_id) {
            return Ok(None);
        }
        check_author(services, &actor, author_id).await?;
        let e = CommentAdded {
            comment_id,
            content_id,
            author_id,
            text,
            tags: self.tags.clone(),
            area_id: self.area_id,
        };
        Ok(Some(Event::CommentAdded(e)))
    }

    /// `ContentCommand::Vote`: a vote replaces the voter's earlier one; the same vote again is a no-op.
    async fn vote(
        &self,
        services: &dyn KnowledgeServices,
        content_id: Uuid,
        voter_id: Uuid,
        direction: VoteDirection,
        actor: Actor,
    ) -> Result<Option<Event>, DomainError> {
        self.require_exists(content_id)?;
        if let Actor::User(u) = actor {
            if u != voter_id {
                return Err(DomainError::Forbidden(format!(
                    "user {u} may not vote as {voter_id}"
                )));
            }
            if !lookup(services.user_exists(u).await)? {
                return Err(DomainError::NotFound {
                    what: "user",
                    id: u,
                });
            }
        }
        let previous = self.votes.get(&voter_id).copied();
        if previous == Some(direction) {
            return Ok(None);
        }
        let e = ContentVoted {
            content_id,
            voter_id,
            previous,
            content_author_id: self.author_id,
            tags: self.tags.clone(),
            area_id: self.area_id,
            on_answer: matches!(self.kind, Some(ContentKind::Answer { .. })),
            score: Some(self.score + direction.score() - previous.map_or(0, VoteDirection::score)),
        };
        let e = match direction {
            VoteDirection::Up => Event::ContentUpvoted(e),
            VoteDirection::Down => Event::ContentDownvoted(e),
        };
        Ok(Some(e))
    }

    /// `ContentCommand::AcceptAnswer`: by the question's author, one answer of this question, once.
    async fn accept_answer(
        &self,
        services: &dyn KnowledgeServices,
        question_id: Uuid,
        answer_id: Uuid,
        actor: Actor,
    ) -> Result<Option<Event>, DomainError> {
        let accepted = match &self.kind {
            None => {
                return Err(DomainError::NotFound {
                    what: "question",
                    id: question_id,
                })
            }
            Some(ContentKind::Question { accepted_answer }) => *accepted_answer,
            Some(_) => {
                return Err(DomainError::NotFound {
                    what: "question",
                    id: question_id,
                })
            }
        };
        if let Actor::User(u) = actor {
            if self.author_id != Some(u) {
                return Err(DomainError::Forbidden(
                    "only the question's author may accept an answer".into(),
                ));
            }
        }
        match accepted {
            Some(a) if a == answer_id => return Ok(None),
            Some(a) => {
                return Err(DomainError::Conflict(format!(
                    "question {question_id} already has accepted answer {a}"
                )))
            }
            None => {}
        }
        let answer = lookup(services.answer(answer_id).await)?.ok_or(DomainError::NotFound {
            what: "answer",
            id: answer_id,
        })?;
        if answer.question_id != question_id {
            return Err(DomainError::Conflict(format!(
                "answer {answer_id} belongs to question {}, not {question_id}",
                answer.question_id
            )));
        }
        let e = AnswerAccepted {
            question_id,
            answer_id,
            question_author_id: self.author_id,
            answer_author_id: answer.author_id,
            tags: self.tags.clone(),
            area_id: self.area_id,
        };
        Ok(Some(Event::AnswerAccepted(e)))
    }
}

async fn check_author(
    services: &dyn KnowledgeServices,
    actor: &Actor,
    author_id: Option<Uuid>,
) -> Result<(), DomainError> {
    match (actor, author_id) {
        (Actor::User(u), Some(a)) if *u != a => {
            return Err(DomainError::Forbidden(format!(
                "user {u} may not act as user {a}"
            )))
        }
        (Actor::User(_), None) => return Err(DomainError::Invalid("author_id is required".into())),
        _ => {}
    }
    if let Some(a) = author_id {
        if !lookup(services.user_exists(a).await)? {
            return Err(DomainError::NotFound {
                what: "user",
                id: a,
            });
        }
    }
    Ok(())
}

async fn check_area(
    services: &dyn KnowledgeServices,
    area_id: Option<Uuid>,
) -> Result<(), DomainError> {
    if let Some(id) = area_id {
        if !lookup(services.area_exists(id).await)? {
            return Err(DomainError::NotFound { what: "area", id });
        }
    }
    Ok(())
}

/// Largest resource accepted: 5 GiB (the metadata only; the bytes live outside the store).
pub const MAX_RESOURCE_BYTES: u64 = 5 * 1024 * 1024 * 1024;

fn check_resource(
    file_name: &str,
    media_type: &str,
    size_bytes: u64,
    sha256: &str,
    storage_url: Option<&str>,
) -> Result<(), DomainError> {
    check_text("file_name", file_name, 1, 255)?;
    if file_name.contains(['/', '\\']) {
        return Err(DomainError::Invalid(
            "file_name must not contain / or \\".into(),
        ));
    }
    let mt_ok = media_type.len() <= 127
        && media_type.split('/').count() == 2
        && media_type.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$&-^_.+".contains(c))
        });
    if !mt_ok {
        return Err(DomainError::Invalid(format!(
            "media_type {media_type:?} must be type/subtype (RFC 6838)"
        )));
    }
    if size_bytes == 0 || size_bytes > MAX_RESOURCE_BYTES {
        return Err(DomainError::Invalid(format!(
            "size_bytes must be 1..={MAX_RESOURCE_BYTES}"
        )));
    }
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(DomainError::Invalid(
            "sha256 must be 64 hexadecimal digits".into(),
        ));
    }
    if let Some(u) = storage_url {
        let ok = (u.starts_with("https://") || u.starts_with("s3://"))
            && u.len() <= 2000
            && !u.chars().any(char::is_whitespace);
        if !ok {
            return Err(DomainError::Invalid(
                "storage_url must be an https:// or s3:// URL of at most 2,000 characters".into(),
            ));
        }
    }
    Ok(())
}

/// A tag as content stores it: trimmed, lower case, 1..=35 characters of letters, digits and
/// `- + # .` (issue #2's tag rule).
///
/// # Errors
/// [`DomainError::Invalid`] naming the rule.
pub fn normalise_tag(tag: &str) -> Result<String, DomainError> {
    let t = tag.trim().to_lowercase();
    let ok = (1..=35).contains(&t.chars().count())
        && t.chars().all(|c| c.is_alphanumeric() || "-+#.".contains(c));
    if !ok {
        return Err(DomainError::Invalid(format!(
            "tag {t:?} must be 1..=35 characters of letters, digits, - + # ."
        )));
    }
    Ok(t)
}

fn normalise_tags(tags: Vec<String>) -> Result<Vec<String>, DomainError> {
    if tags.len() > MAX_TAGS {
        return Err(DomainError::Invalid(format!("at most {MAX_TAGS} tags")));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        let t = normalise_tag(&t)?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

impl Aggregate for Content {
    const TYPE: &'static str = "content";
    type Command = ContentCommand;
    type Event = Event;
    type Error = DomainError;
    type Services = Arc<dyn KnowledgeServices>;

    async fn handle(
        &mut self,
        command: ContentCommand,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), DomainError> {
        let services = services.as_ref();
        let decided = match command {
            ContentCommand::PostQuestion {
                question_id,
                author_id,
                title,
                body,
                tags,
                area_id,
                actor,
            } => {
                check_text("title", &title, 1, 300)?;
                check_text("body", &body, 0, 65_536)?;
                let kind = ContentKind::Question {
                    accepted_answer: None,
                };
                let admitted = self
                    .admit_post(
                        services,
                        &kind,
                        question_id,
                        author_id,
                        tags,
                        area_id,
                        &actor,
                    )
                    .await?;
                let Some(tags) = admitted else {
                    return Ok(()); // identical repeat
                };
                let e = QuestionPosted {
                    question_id,
                    author_id,
                    title,
                    body,
                    tags,
                    area_id,
                };
                Some(Event::QuestionPosted(e))
            }
            ContentCommand::StartDiscussion {
                discussion_id,
                author_id,
                title,
                body,
                tags,
                area_id,
                actor,
            } => {
                check_text("title", &title, 1, 300)?;
                check_text("body", &body, 0, 65_536)?;
                let kind = ContentKind::Discussion;
                let admitted = self
                    .admit_post(
                        services,
                        &kind,
                        discussion_id,
                        author_id,
                        tags,
                        area_id,
                        &actor,
                    )
                    .await?;
                let Some(tags) = admitted else {
                    return Ok(());
                };
                let e = DiscussionStarted {
                    discussion_id,
                    author_id,
                    title,
                    body,
                    tags,
                    area_id,
                };
                Some(Event::DiscussionStarted(e))
            }
            ContentCommand::ShareInsight {
                insight_id,
                author_id,
                title,
                body,
                tags,
                area_id,
                actor,
            } => {
                check_text("title", &title, 1, 300)?;
                check_text("body", &body, 1, 65_536)?;
                let kind = ContentKind::Insight;
                let admitted = self
                    .admit_post(
                        services, &kind, insight_id, author_id, tags, area_id, &actor,
                    )
                    .await?;
                let Some(tags) = admitted else {
                    return Ok(());
                };
                let e = InsightShared {
                    insight_id,
                    author_id,
                    title,
                    body,
                    tags,
                    area_id,
                };
                Some(Event::InsightShared(e))
            }
            ContentCommand::UploadResource {
                resource_id,
                author_id,
                title,
                file_name,
                media_type,
                size_bytes,
                sha256,
                storage_url,
                tags,
                area_id,
                actor,
            } => {
                check_text("title", &title, 1, 300)?;
                check_resource(
                    &file_name,
                    &media_type,
                    size_bytes,
                    &sha256,
                    storage_url.as_deref(),
                )?;
                let kind = ContentKind::Resource;
                let admitted = self
                    .admit_post(
                        services,
                        &kind,
                        resource_id,
                        author_id,
                        tags,
                        area_id,
                        &actor,
                    )
                    .await?;
                let Some(tags) = admitted else {
                    return Ok(());
                };
                let e = ResourceUploaded {
                    resource_id,
                    author_id,
                    title,
                    file_name,
                    media_type,
                    size_bytes,
                    sha256: sha256.to_ascii_lowercase(),
                    storage_url,
                    tags,
                    area_id,
                };
                Some(Event::ResourceUploaded(e))
            }
            ContentCommand::Like {
                content_id,
                user_id,
                actor,
            } => self.like(services, content_id, user_id, actor).await?,
            ContentCommand::SubmitAnswer {
                answer_id,
                question_id,
                author_id,
                body,
                actor,
            } => {
                self.submit_answer(services, answer_id, question_id, author_id, body, actor)
                    .await?
            }
            ContentCommand::AddComment {
                content_id,
                comment_id,
                author_id,
                text,
                actor,
            } => {
                self.add_comment(services, content_id, comment_id, author_id, text, actor)
                    .await?
            }
            ContentCommand::Vote {
                content_id,
                voter_id,
                direction,
                actor,
            } => {
                self.vote(services, content_id, voter_id, direction, actor)
                    .await?
            }
            ContentCommand::AcceptAnswer {
                question_id,
                answer_id,
                actor,
            } => {
                self.accept_answer(services, question_id, answer_id, actor)
                    .await?
            }
        };
        if let Some(event) = decided {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::QuestionPosted(e) => {
                self.kind = Some(ContentKind::Question {
                    accepted_answer: None,
                });
                self.author_id = e.author_id;
                self.tags = e.tags;
                self.area_id = e.area_id;
            }
            Event::AnswerSubmitted(e) => {
                self.kind = Some(ContentKind::Answer {
                    question_id: e.question_id,
                });
                self.author_id = e.author_id;
                self.tags = e.tags;
                self.area_id = e.area_id;
            }
            Event::DiscussionStarted(e) => {
                self.posted(ContentKind::Discussion, e.author_id, e.tags, e.area_id)
            }
            Event::InsightShared(e) => {
                self.posted(ContentKind::Insight, e.author_id, e.tags, e.area_id)
            }
            Event::ResourceUploaded(e) => {
                self.posted(ContentKind::Resource, e.author_id, e.tags, e.area_id)
            }
            Event::ContentLiked(e) => {
                self.likes.insert(e.user_id);
            }
            Event::CommentAdded(e) => {
                self.comments.insert(e.comment_id);
            }
            Event::ContentUpvoted(e) => {
                let before = self.votes.insert(e.voter_id, VoteDirection::Up);
                self.score += 1 - before.map_or(0, VoteDirection::score);
            }
            Event::ContentDownvoted(e) => {
                let before = self.votes.insert(e.voter_id, VoteDirection::Down);
                self.score += -1 - before.map_or(0, VoteDirection::score);
            }
            Event::AnswerAccepted(e) => {
                self.kind = Some(ContentKind::Question {
                    accepted_answer: Some(e.answer_id),
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{AnswerFacts, QuestionFacts};
    use async_trait::async_trait;
    use cqrs_es::test::TestFramework;
    use std::collections::HashMap;

    /// In-memory lookup table for aggregate unit tests (the real one reads the event store).
    #[derive(Default)]
    struct Facts {
        users: Vec<Uuid>,
        questions: HashMap<Uuid, QuestionFacts>,
        answers: HashMap<Uuid, AnswerFacts>,
        areas: Vec<Uuid>,
    }

    #[async_trait]
    impl KnowledgeServices for Facts {
        async fn question(&self, id: Uuid) -> Result<Option<QuestionFacts>, String> {
            Ok(self.questions.get(&id).cloned())
        }
        async fn answer(&self, id: Uuid) -> Result<Option<AnswerFacts>, String> {
            Ok(self.answers.get(&id).cloned())
        }
        async fn user_exists(&self, id: Uuid) -> Result<bool, String> {
            Ok(self.users.contains(&id))
        }
        async fn area_exists(&self, id: Uuid) -> Result<bool, String> {
            Ok(self.areas.contains(&id))
        }
    }

    struct World {
        asker: Uuid,
        answerer: Uuid,
        q: Uuid,
        a: Uuid,
    }

    fn world() -> (World, Arc<dyn KnowledgeServices>) {
        let w = World {
            asker: Uuid::new_v4(),
            answerer: Uuid::new_v4(),
            q: Uuid::new_v4(),
            a: Uuid::new_v4(),
        };
        let mut f = Facts {
            users: vec![w.asker, w.answerer],
            ..Default::default()
        };
        f.questions.insert(
            w.q,
            QuestionFacts {
                author_id: Some(w.asker),
                tags: vec!["rome".into()],
                area_id: None,
            },
        );
        f.answers.insert(
            w.a,
            AnswerFacts {
                question_id: w.q,
                author_id: Some(w.answerer),
            },
        );
        (w, Arc::new(f))
    }

    fn posted(w: &World) -> Event {
        Event::QuestionPosted(QuestionPosted {
            question_id: w.q,
            author_id: Some(w.asker),
            title: "Why?".into(),
            body: String::new(),
            tags: vec!["rome".into()],
            area_id: None,
        })
    }

    #[test]
    fn posting_normalises_tags_and_checks_author() {
        let (w, s) = world();
        TestFramework::<Content>::with(s.clone())
            .given_no_previous_events()
            .when(ContentCommand::PostQuestion {
                question_id: w.q,
                author_id: Some(w.asker),
                title: "Why?".into(),
                body: String::new(),
                tags: vec![" Rome ".into(), "rome".into()],
                actor: Actor::User(w.asker),
                area_id: None,
            })
            .then_expect_events(vec![posted(&w)]);
        let err = TestFramework::<Content>::with(s.clone())
            .given_no_previous_events()
            .when(ContentCommand::PostQuestion {
                question_id: w.q,
                author_id: Some(w.asker),
                title: "Why?".into(),
                body: String::new(),
                tags: vec![],
                actor: Actor::User(w.answerer),
                area_id: None,
            })
            .inspect_result()
            .unwrap_err();
        assert_eq!(err.code(), "forbidden");
        let stranger = Uuid::new_v4();
        let err = TestFramework::<Content>::with(s)
            .given_no_previous_events()
            .when(ContentCommand::PostQuestion {
                question_id: w.q,
                author_id: Some(stranger),
                title: "Why?".into(),
                body: String::new(),
                tags: vec![],
                actor: Actor::importer(),
                area_id: None,
            })
            .inspect_result()
            .unwrap_err();
        assert_eq!(
            err,
            DomainError::NotFound {
                what: "user",
                id: stranger
            }
        );
    }

    #[test]
    fn answer_needs_existing_question_and_takes_its_tags() {
        let (w, s) = world();
        let missing = Uuid::new_v4();
        let err = TestFramework::<Content>::with(s.clone())
            .given_no_previous_events()
            .when(ContentCommand::SubmitAnswer {
                answer_id: w.a,
                question_id: missing,
                author_id: Some(w.answerer),
                body: "b".into(),
                actor: Actor::importer(),
            })
            .inspect_result()
            .unwrap_err();
        assert_eq!(err.code(), "not_found.question");
        TestFramework::<Content>::with(s)
            .given_no_previous_events()
            .when(ContentCommand::SubmitAnswer {
                answer_id: w.a,
                question_id: w.q,
                author_id: Some(w.answerer),
                body: "b".into(),
                actor: Actor::importer(),
            })
            .then_expect_events(vec![Event::AnswerSubmitted(AnswerSubmitted {
                answer_id: w.a,
                question_id: w.q,
                author_id: Some(w.answerer),
                body: "b".into(),
                tags: vec!["rome".into()],
                area_id: None,
            })]);
    }

    #[test]
    fn votes_on_missing_content_are_rejected() {
        let (w, s) = world();
        let err = TestFramework::<Content>::with(s)
            .given_no_previous_events()
            .when(ContentCommand::Vote {
                content_id: w.q,
                voter_id: Uuid::new_v4(),
                direction: VoteDirection::Up,
                actor: Actor::importer(),
            })
            .inspect_result()
            .unwrap_err();
        assert_eq!(err.code(), "not_found.content");
    }

    #[test]
    fn second_vote_replaces_first_and_same_vote_is_a_no_op() {
        let (w, s) = world();
        let up = Event::ContentUpvoted(ContentVoted {
            content_id: w.q,
            voter_id: w.answerer,
            previous: None,
            content_author_id: Some(w.asker),
            tags: vec!["rome".into()],
            area_id: None,
            on_answer: false,
            score: Some(1),
        });
        let vote = |d| ContentCommand::Vote {
            content_id: w.q,
            voter_id: w.answerer,
            direction: d,
            actor: Actor::User(w.answerer),
        };
        TestFramework::<Content>::with(s.clone())
            .given(vec![posted(&w), up.clone()])
            .when(vote(VoteDirection::Up))
            .then_expect_events(vec![]);
        TestFramework::<Content>::with(s)
            .given(vec![posted(&w), up])
            .when(vote(VoteDirection::Down))
            .then_expect_events(vec![Event::ContentDownvoted(ContentVoted {
                content_id: w.q,
                voter_id: w.answerer,
                previous: Some(VoteDirection::Up),
                content_author_id: Some(w.asker),
                tags: vec!["rome".into()],
                area_id: None,
                on_answer: false,
                score: Some(-1), // the up vote replaced: 1 − 1 − 1
            })]);
    }

    #[test]
    fn only_the_author_accepts_and_only_once() {
        let (w, s) = world();
        let accept = |actor| ContentCommand::AcceptAnswer {
            question_id: w.q,
            answer_id: w.a,
            actor,
        };
        let accepted = Event::AnswerAccepted(AnswerAccepted {
            question_id: w.q,
            answer_id: w.a,
            question_author_id: Some(w.asker),
            answer_author_id: Some(w.answerer),
            tags: vec!["rome".into()],
            area_id: None,
        });
        let err = TestFramework::<Content>::with(s.clone())
            .given(vec![posted(&w)])
            .when(accept(Actor::User(w.answerer)))
            .inspect_result()
            .unwrap_err();
        assert_eq!(err.code(), "forbidden");
        TestFramework::<Content>::with(s.clone())
            .given(vec![posted(&w)])
            .when(accept(Actor::User(w.asker)))
            .then_expect_events(vec![accepted.clone()]);
        TestFramework::<Content>::with(s.clone())
            .given(vec![posted(&w), accepted.clone()])
            .when(accept(Actor::User(w.asker)))
            .then_expect_events(vec![]);
        let err = TestFramework::<Content>::with(s)
            .given(vec![posted(&w), accepted])
            .when(ContentCommand::AcceptAnswer {
                question_id: w.q,
                answer_id: Uuid::new_v4(),
                actor: Actor::User(w.asker),
            })
            .inspect_result()
            .unwrap_err();
        assert_eq!(err.code(), "conflict");
    }

    #[test]
    fn accepting_an_answer_of_another_question_conflicts() {
        let (w, s) = world();
        let other_q = Uuid::new_v4();
        let err = TestFramework::<Content>::with(s)
            .given(vec![Event::QuestionPosted(QuestionPosted {
                question_id: other_q,
                author_id: Some(w.asker),
                title: "t".into(),
                body: String::new(),
                tags: vec![],
                area_id: None,
            })])
            .when(ContentCommand::AcceptAnswer {
                question_id: other_q,
                answer_id: w.a,
                actor: Actor::User(w.asker),
            })
            .inspect_result()
            .unwrap_err();
        assert_eq!(err.code(), "conflict");
    }

    fn upload(w: &World, id: Uuid, sha256: &str, area_id: Option<Uuid>) -> ContentCommand {
        ContentCommand::UploadResource {
            resource_id: id,
            author_id: Some(w.asker),
            title: "Slides".into(),
            file_name: "slides.pdf".into(),
            media_type: "application/pdf".into(),
            size_bytes: 1234,
            sha256: sha256.into(),
            storage_url: Some("s3://bucket/slides.pdf".into()),
            tags: vec!["Talks".into()],
            area_id,
            actor: Actor::User(w.asker),
        }
    }

    #[test]
    fn a_resource_records_metadata_and_hash_and_needs_an_existing_area() {
        let (w, f) = world();
        let id = Uuid::new_v4();
        let hash = "AB".repeat(32);
        TestFramework::<Content>::with(f.clone())
            .given_no_previous_events()
            .when(upload(&w, id, &hash, None))
            .then_expect_events(vec![Event::ResourceUploaded(ResourceUploaded {
                resource_id: id,
                author_id: Some(w.asker),
                title: "Slides".into(),
                file_name: "slides.pdf".into(),
                media_type: "application/pdf".into(),
                size_bytes: 1234,
                sha256: "ab".repeat(32),
                storage_url: Some("s3://bucket/slides.pdf".into()),
                tags: vec!["talks".into()],
                area_id: None,
            })]);
        let r = TestFramework::<Content>::with(f.clone())
            .given_no_previous_events()
            .when(upload(&w, id, "xyz", None))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "invalid");
        let missing = Uuid::new_v4();
        let r = TestFramework::<Content>::with(f)
            .given_no_previous_events()
            .when(upload(&w, id, &hash, Some(missing)))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "not_found.area");
    }

    #[test]
    fn content_in_an_area_passes_the_area_on_and_a_like_counts_once() {
        let (w, _) = world();
        let area = Uuid::new_v4();
        let f: Arc<dyn KnowledgeServices> = Arc::new(Facts {
            users: vec![w.asker, w.answerer],
            areas: vec![area],
            ..Default::default()
        });
        let started = Event::DiscussionStarted(DiscussionStarted {
            discussion_id: w.q,
            author_id: Some(w.asker),
            title: "Tabs or spaces?".into(),
            body: String::new(),
            tags: vec![],
            area_id: Some(area),
        });
        TestFramework::<Content>::with(f.clone())
            .given_no_previous_events()
            .when(ContentCommand::StartDiscussion {
                discussion_id: w.q,
                author_id: Some(w.asker),
                title: "Tabs or spaces?".into(),
                body: String::new(),
                tags: vec![],
                area_id: Some(area),
                actor: Actor::User(w.asker),
            })
            .then_expect_events(vec![started.clone()]);
        let like = || ContentCommand::Like {
            content_id: w.q,
            user_id: w.answerer,
            actor: Actor::User(w.answerer),
        };
        let liked = Event::ContentLiked(ContentLiked {
            content_id: w.q,
            user_id: w.answerer,
            content_author_id: Some(w.asker),
            tags: vec![],
            area_id: Some(area),
        });
        TestFramework::<Content>::with(f.clone())
            .given(vec![started.clone()])
            .when(like())
            .then_expect_events(vec![liked.clone()]);
        TestFramework::<Content>::with(f.clone())
            .given(vec![started.clone(), liked])
            .when(like())
            .then_expect_events(vec![]);
        // Liking for someone else is forbidden; accepting on a discussion finds no question.
        let r = TestFramework::<Content>::with(f.clone())
            .given(vec![started.clone()])
            .when(ContentCommand::Like {
                content_id: w.q,
                user_id: w.asker,
                actor: Actor::User(w.answerer),
            })
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "forbidden");
        let r = TestFramework::<Content>::with(f)
            .given(vec![started])
            .when(ContentCommand::AcceptAnswer {
                question_id: w.q,
                answer_id: w.a,
                actor: Actor::User(w.asker),
            })
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "not_found.question");
    }

    #[test]
    fn an_insight_needs_a_body_and_an_identical_repeat_is_a_no_op() {
        let (w, f) = world();
        let share = |body: &str| ContentCommand::ShareInsight {
            insight_id: w.q,
            author_id: Some(w.asker),
            title: "Cite sources".into(),
            body: body.into(),
            tags: vec!["Sources".into()],
            area_id: None,
            actor: Actor::User(w.asker),
        };
        let shared = Event::InsightShared(InsightShared {
            insight_id: w.q,
            author_id: Some(w.asker),
            title: "Cite sources".into(),
            body: "Livy over Wikipedia.".into(),
            tags: vec!["sources".into()],
            area_id: None,
        });
        TestFramework::<Content>::with(f.clone())
            .given_no_previous_events()
            .when(share("Livy over Wikipedia."))
            .then_expect_events(vec![shared.clone()]);
        TestFramework::<Content>::with(f.clone())
            .given(vec![shared])
            .when(share("Livy over Wikipedia."))
            .then_expect_events(vec![]);
        let r = TestFramework::<Content>::with(f)
            .given_no_previous_events()
            .when(share(""))
            .inspect_result();
        assert_eq!(r.unwrap_err().code(), "invalid");
    }
}
