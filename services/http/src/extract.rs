//! Extractors whose rejections are [`Problem`]s instead of axum's plain-text bodies.

use std::fmt;
use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::problem::Problem;

/// A JSON request body: one JSON object. Rejections: wrong or missing `Content-Type` → 415
/// `unsupported_media_type`; body over the limit → 413 `payload_too_large`; bytes that are not
/// JSON (including trailing data after the object) → 400 `malformed_json`; well-formed JSON
/// that is not an object, or has wrong types or values, missing, duplicated or unknown fields
/// → 422 `invalid_body` (see [`decode_json`]).
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(json_problem(JsonRejection::MissingJsonContentType(
                Default::default(),
            )));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| json_problem(e.into()))?;
        decode_json(&bytes).map(ApiJson)
    }
}

/// Whether `Content-Type` is JSON: `application/json` or `application/*+json`, any parameters
/// (the same test as axum's `Json`).
pub fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
}

/// Decodes a JSON body: exactly one JSON object into `T`.
///
/// Only an object is accepted: serde's derived `Deserialize` of a struct would also take a
/// JSON array of the field values in declaration order (`[null, "Ada"]` for a
/// `RegisterBody`), which is not part of the API.
///
/// serde_json reports a value of the wrong JSON type for an enum (`{"direction": 7}`) as a
/// syntax error; such bodies are well-formed JSON and are classified as 422 like every other
/// wrong type: the body is 400 `malformed_json` only when it is not JSON at all (checked, on
/// this error path only, by parsing it as a `serde_json::Value`, which also validates the
/// UTF-8 of every string).
///
/// # Errors
/// 400 `malformed_json` or 422 `invalid_body`.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    // Syntax first: a body cut short is 400 `malformed_json` even when the part before the cut
    // already names an unknown field (which the typed decode would report first as 422).
    if let Err(rejection) = Json::<serde::de::IgnoredAny>::from_bytes(bytes) {
        return Err(json_problem(rejection));
    }
    match Json::<JsonObject<T>>::from_bytes(bytes) {
        Ok(Json(JsonObject(v))) => Ok(v),
        Err(JsonRejection::JsonSyntaxError(e))
            if serde_json::from_slice::<serde_json::Value>(bytes).is_ok() =>
        {
            let detail = e.body_text().replacen(
                "Failed to parse the request body as JSON",
                "Failed to deserialize the JSON body into the target type",
                1,
            );
            Err(invalid_body(detail))
        }
        Err(rejection) => Err(json_problem(rejection)),
    }
}

/// 422 `invalid_body`.
fn invalid_body(detail: String) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
        "Invalid request body",
        detail,
    )
}

/// `T` read from a JSON object only (anything else: "invalid type: …, expected a JSON object").
struct JsonObject<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for JsonObject<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(ObjectVisitor(PhantomData))
            .map(JsonObject)
    }
}

/// The problem for a [`JsonRejection`].
pub fn json_problem(rejection: JsonRejection) -> Problem {
    match rejection {
        JsonRejection::JsonDataError(e) => invalid_body(e.body_text()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_content_types() {
        let ct = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            json_content_type(&h)
        };
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
        ] {
            assert!(ct(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/jsonx",
            "json",
            "application/",
            "text/json",
        ] {
            assert!(!ct(bad), "{bad}");
        }
        assert!(!json_content_type(&HeaderMap::new()));
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        name: String,
        #[serde(default)]
        n: Option<u32>,
    }

    #[test]
    fn only_objects_decode_and_wrong_json_types_are_422() {
        assert_eq!(
            decode_json::<Body>(br#"{"name": "a"}"#).unwrap(),
            Body {
                name: "a".into(),
                n: None
            }
        );
        let code = |b: &[u8]| decode_json::<Body>(b).unwrap_err().code;
        assert_eq!(code(br#"["a", 1]"#), "invalid_body");
        assert_eq!(code(br#""a""#), "invalid_body");
        assert_eq!(code(br#"{"name": "a", "x": 1}"#), "invalid_body");
        assert_eq!(code(br#"{"name": "a"} x"#), "malformed_json");
        assert_eq!(code(b"{\"name\": \"\xff\"}"), "malformed_json");
        assert_eq!(code(b""), "malformed_json");
    }
}
