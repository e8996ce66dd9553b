//! Deterministic ids of imported entities: UUIDv5 in the URL namespace of
//! `stackexchange:{site}:{kind}:{Id}`, so that importing the same dump again addresses the same
//! aggregates (and changes nothing).

use uuid::Uuid;

/// What a dump `Id` numbers; each kind has its own id space in the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntityKind {
    /// Users.xml `Id` (also `OwnerUserId`, `UserId`).
    User,
    /// Posts.xml `Id` (also `ParentId`, `PostId`, `AcceptedAnswerId`).
    Post,
    /// Comments.xml `Id`.
    Comment,
    /// Votes.xml `Id`.
    Vote,
}

impl EntityKind {
    /// The kind's name in the id string: `user`, `post`, `comment` or `vote`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::User => "user",
            EntityKind::Post => "post",
            EntityKind::Comment => "comment",
            EntityKind::Vote => "vote",
        }
    }
}

/// The UUIDv5 (URL namespace) of `stackexchange:{site}:{kind}:{id}`.
///
/// ```
/// use tektree_import::ids::{entity_id, EntityKind};
/// let id = entity_id("history.meta", EntityKind::User, 12);
/// assert_eq!(
///     id,
///     uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"stackexchange:history.meta:user:12")
/// );
/// ```
pub fn entity_id(site: &str, kind: EntityKind, id: i64) -> Uuid {
    let name = format!("stackexchange:{site}:{}:{id}", kind.as_str());
    Uuid::new_v5(&Uuid::NAMESPACE_URL, name.as_bytes())
}

/// The id scheme of one site: shorthand for [`entity_id`] with a fixed `site`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteIds {
    site: String,
}

impl SiteIds {
    /// Ids for `site` (for example `history.meta`).
    pub fn new(site: impl Into<String>) -> Self {
        SiteIds { site: site.into() }
    }

    /// The site name.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// A user's id.
    pub fn user(&self, id: i64) -> Uuid {
        entity_id(&self.site, EntityKind::User, id)
    }

    /// A question's or answer's id.
    pub fn post(&self, id: i64) -> Uuid {
        entity_id(&self.site, EntityKind::Post, id)
    }

    /// A comment's id.
    pub fn comment(&self, id: i64) -> Uuid {
        entity_id(&self.site, EntityKind::Comment, id)
    }

    /// A vote's id; also the anonymous voter of an up- or downvote.
    pub fn vote(&self, id: i64) -> Uuid {
        entity_id(&self.site, EntityKind::Vote, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v5_and_distinct_per_kind_and_site() {
        let ids = SiteIds::new("history.meta");
        let u = ids.user(-1);
        assert_eq!(u.get_version_num(), 5);
        assert_eq!(
            u,
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"stackexchange:history.meta:user:-1")
        );
        assert_ne!(ids.user(1), ids.post(1));
        assert_ne!(ids.comment(1), ids.vote(1));
        assert_ne!(ids.post(1), SiteIds::new("history").post(1));
    }
}
