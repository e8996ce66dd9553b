//! Knowledge endpoints of issue #6: areas, discussions, insights, resources and likes.
//!
//! | Method | Path | Event | Who |
//! |---|---|---|---|
//! | POST | `/v1/areas` | `knowledge.area.created` | moderator, admin |
//! | POST | `/v1/discussions` | `knowledge.discussion.started` | any user |
//! | POST | `/v1/insights` | `knowledge.insight.shared` | any user |
//! | POST | `/v1/resources` | `knowledge.resource.uploaded` | any user |
//! | POST | `/v1/content/{id}/likes` | `knowledge.content.liked` | any user |
//!
//! Discussions, insights and resources are metered like questions (429 over quota). A resource
//! is its metadata and SHA-256 only: the client uploads the bytes to object storage itself and
//! names them by `storage_url` (the event store never holds file bytes).

use std::sync::Arc;

use axum::extract::State;
use serde::{Deserialize, Serialize};
use tektree_domain::{Area, AreaCommand, Content, ContentCommand, NoServices};
use uuid::Uuid;

use super::commands::{CommandRequest, CommandResponse};
use super::extract::{ApiJson, ApiPath};
use super::identity::Moderator;
use super::problem::Problem;
use crate::app::App;

/// `POST /v1/areas` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AreaBody {
    /// Area id; default a new v4.
    #[serde(default)]
    pub area_id: Option<Uuid>,
    /// Name, 1..=100 characters.
    pub name: String,
    /// Slug, 1..=60 characters of `a-z`, `0-9`, `-`.
    pub slug: String,
    /// Description, 0..=2,000 characters; default empty.
    #[serde(default)]
    pub description: String,
}

/// `POST /v1/discussions` and `POST /v1/insights` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostBody {
    /// Id of the new content; default a new v4.
    #[serde(default)]
    pub id: Option<Uuid>,
    /// Title, 1..=300 characters.
    pub title: String,
    /// Body text (an insight's is not empty).
    pub body: String,
    /// At most 10 tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The area; it must exist.
    #[serde(default)]
    pub area_id: Option<Uuid>,
}

/// `POST /v1/resources` body: the metadata of a file already uploaded to object storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceBody {
    /// Resource id; default a new v4.
    #[serde(default)]
    pub resource_id: Option<Uuid>,
    /// Title, 1..=300 characters.
    pub title: String,
    /// File name, 1..=255 characters without `/` or `\`.
    pub file_name: String,
    /// Media type, `type/subtype`.
    pub media_type: String,
    /// Size in bytes, 1..=5 GiB.
    pub size_bytes: u64,
    /// SHA-256 of the bytes, 64 hex digits.
    pub sha256: String,
    /// `https://` or `s3://` location of the bytes.
    #[serde(default)]
    pub storage_url: Option<String>,
    /// At most 10 tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The area; it must exist.
    #[serde(default)]
    pub area_id: Option<Uuid>,
}

/// `POST /v1/content/{id}/likes` takes an empty JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikeBody {}

/// `POST /v1/areas`: a moderator or admin creates a knowledge area.
///
/// # Errors
/// 401, 403 without the moderator role, 409 for an existing id with other data, 422.
pub async fn create_area(
    State(app): State<Arc<App>>,
    _moderator: Moderator,
    req: CommandRequest,
    ApiJson(body): ApiJson<AreaBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("create_area", &[], &body);
    let area_id = body.area_id.unwrap_or_else(Uuid::new_v4);
    let cmd = AreaCommand::Create {
        area_id,
        name: body.name,
        slug: body.slug,
        description: body.description,
        actor: req.actor(),
    };
    req.run::<Area>(&app, area_id, cmd, &NoServices, key).await
}

/// Which of the two text posts a [`PostBody`] makes.
#[derive(Clone, Copy)]
enum TextPost {
    Discussion,
    Insight,
}

async fn post_text(
    app: Arc<App>,
    req: CommandRequest,
    body: PostBody,
    what: TextPost,
) -> Result<CommandResponse, Problem> {
    let route = match what {
        TextPost::Discussion => "start_discussion",
        TextPost::Insight => "share_insight",
    };
    let key = req.key(route, &[], &body);
    let id = body.id.unwrap_or_else(Uuid::new_v4);
    let cmd = match what {
        TextPost::Discussion => ContentCommand::StartDiscussion {
            discussion_id: id,
            author_id: Some(req.user()),
            title: body.title,
            body: body.body,
            tags: body.tags,
            area_id: body.area_id,
            actor: req.actor(),
        },
        TextPost::Insight => ContentCommand::ShareInsight {
            insight_id: id,
            author_id: Some(req.user()),
            title: body.title,
            body: body.body,
            tags: body.tags,
            area_id: body.area_id,
            actor: req.actor(),
        },
    };
    req.run::<Content>(&app, id, cmd, &app.knowledge, key).await
}

/// `POST /v1/discussions`: the caller starts a discussion.
///
/// # Errors
/// 401, 404 (`not_found.user`, `not_found.area`), 409, 422, 429.
pub async fn start_discussion(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiJson(body): ApiJson<PostBody>,
) -> Result<CommandResponse, Problem> {
    post_text(app, req, body, TextPost::Discussion).await
}

/// `POST /v1/insights`: the caller shares an insight.
///
/// # Errors
/// 401, 404 (`not_found.user`, `not_found.area`), 409, 422, 429.
pub async fn share_insight(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiJson(body): ApiJson<PostBody>,
) -> Result<CommandResponse, Problem> {
    post_text(app, req, body, TextPost::Insight).await
}

/// `POST /v1/resources`: the caller records an uploaded file's metadata and hash.
///
/// # Errors
/// 401, 404 (`not_found.user`, `not_found.area`), 409, 422 (bad hash, media type, size, URL),
/// 429.
pub async fn upload_resource(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiJson(body): ApiJson<ResourceBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("upload_resource", &[], &body);
    let id = body.resource_id.unwrap_or_else(Uuid::new_v4);
    let cmd = ContentCommand::UploadResource {
        resource_id: id,
        author_id: Some(req.user()),
        title: body.title,
        file_name: body.file_name,
        media_type: body.media_type,
        size_bytes: body.size_bytes,
        sha256: body.sha256,
        storage_url: body.storage_url,
        tags: body.tags,
        area_id: body.area_id,
        actor: req.actor(),
    };
    req.run::<Content>(&app, id, cmd, &app.knowledge, key).await
}

/// `POST /v1/content/{id}/likes`: the caller likes content `id` (once; a repeat answers 200).
///
/// # Errors
/// 401, 404 (`not_found.content`, `not_found.user`).
pub async fn like(
    State(app): State<Arc<App>>,
    req: CommandRequest,
    ApiPath(content_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<LikeBody>,
) -> Result<CommandResponse, Problem> {
    let key = req.key("like", &[content_id], &body);
    let cmd = ContentCommand::Like {
        content_id,
        user_id: req.user(),
        actor: req.actor(),
    };
    req.run::<Content>(&app, content_id, cmd, &app.knowledge, key)
        .await
}
