//! Extractors whose rejections are [`Problem`]s instead of axum's plain-text bodies.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;

use super::problem::Problem;

/// A JSON request body. Rejections: wrong or missing `Content-Type` → 415
/// `unsupported_media_type`; body over the limit → 413 `payload_too_large`; malformed JSON →
/// 400 `malformed_json`; wrong types, missing or unknown fields → 422 `invalid_body`.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_problem(rejection)),
        }
    }
}

/// The problem for a [`JsonRejection`].
pub fn json_problem(rejection: JsonRejection) -> Problem {
    match rejection {
        JsonRejection::JsonDataError(e) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "Invalid request body",
            e.body_text(),
        ),
        JsonRejection::JsonSyntaxError(e) => Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "Malformed JSON",
            e.body_text(),
        ),
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Unsupported media type",
            "expected `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
                format!(
                    "the request body exceeds the limit of {} bytes",
                    super::BODY_LIMIT
                ),
            )
        }
        other => Problem::new(
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            "Unreadable request body",
            other.body_text(),
        ),
    }
}

/// Path parameters. Any rejection (e.g. an id that is not a UUID) → 400 `invalid_path`.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(path_problem(e)),
        }
    }
}

fn path_problem(e: PathRejection) -> Problem {
    match e {
        PathRejection::FailedToDeserializePathParams(e) => Problem::invalid_path(e.body_text()),
        other => Problem::internal("path", &other.body_text()),
    }
}

/// Query parameters. Any rejection → 400 `invalid_query`. Unknown parameters are ignored.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(query_problem(e)),
        }
    }
}

fn query_problem(e: QueryRejection) -> Problem {
    Problem::invalid_query(e.body_text())
}
