//! CORS allow-list (issue #4, "Security").
//!
//! With no origin configured (the default) the API sends no CORS headers at all, so browsers
//! refuse cross-origin calls. With `--cors-origin https://app.example` (repeatable, or
//! `TEKTREE_CORS_ORIGINS` comma-separated) exactly those origins may call it: preflights
//! (`OPTIONS` with `Access-Control-Request-Method`) are answered by the CORS layer before
//! routing and authentication, and every response to an allowed origin carries
//! `Access-Control-Allow-Origin: <origin>`; other origins get no `Access-Control-Allow-*`
//! headers. Methods `GET` and `POST`; request headers `Authorization`, `Content-Type`,
//! `X-Correlation-Id`, `Idempotency-Key`; exposed response headers `X-Correlation-Id`,
//! `Retry-After`, `WWW-Authenticate`; preflights cached for [`MAX_AGE`]. No credentials
//! (cookies) are allowed: tokens travel in the `Authorization` header.

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long browsers may cache a preflight answer (`Access-Control-Max-Age`): 10 minutes.
pub const MAX_AGE: Duration = Duration::from_secs(600);

/// An origin that cannot be allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CORS origin {origin:?}: {reason} (expected scheme://host[:port], e.g. https://app.example.com)")]
pub struct CorsError {
    /// The origin as given.
    pub origin: String,
    /// Why.
    pub reason: &'static str,
}

/// The allowed origins (`scheme://host[:port]`, lower case, no path); empty = CORS off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsOrigins(Vec<HeaderValue>);

impl CorsOrigins {
    /// No origin: no CORS headers.
    pub fn none() -> Self {
        CorsOrigins(vec![])
    }

    /// Validates and lower-cases `origins`; blank entries are skipped (so that an empty
    /// `TEKTREE_CORS_ORIGINS` means none).
    ///
    /// # Errors
    /// [`CorsError`] for `*`, a missing `http://`/`https://` scheme, a path, query, fragment,
    /// user info, or characters not allowed in a header.
    pub fn parse<I, S>(origins: I) -> Result<Self, CorsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out: Vec<HeaderValue> = vec![];
        for raw in origins {
            let raw = raw.as_ref().trim();
            if raw.is_empty() {
                continue;
            }
            let err = |reason| CorsError {
                origin: raw.to_string(),
                reason,
            };
            if raw == "*" {
                return Err(err("`*` is not an allow-list; name each origin"));
            }
            let lower = raw.to_ascii_lowercase();
            let host = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"))
                .ok_or_else(|| err("the scheme must be http or https"))?;
            if host.is_empty() {
                return Err(err("no host"));
            }
            if host.contains(['/', '?', '#', '@', ' ']) {
                return Err(err("an origin has no path, query, fragment or user info"));
            }
            let v = HeaderValue::from_str(&lower).map_err(|_| err("not a valid header value"))?;
            if !out.contains(&v) {
                out.push(v);
            }
        }
        Ok(CorsOrigins(out))
    }

    /// Whether no origin is allowed (CORS off).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The origins, as given (lower case).
    pub fn origins(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }

    /// The CORS layer for these origins; `None` when there are none.
    pub fn layer(&self) -> Option<CorsLayer> {
        if self.is_empty() {
            return None;
        }
        Some(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(self.0.clone()))
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static(crate::correlation::CORRELATION_HEADER),
                    HeaderName::from_static("idempotency-key"),
                ])
                .expose_headers([
                    HeaderName::from_static(crate::correlation::CORRELATION_HEADER),
                    header::RETRY_AFTER,
                    header::WWW_AUTHENTICATE,
                ])
                .max_age(MAX_AGE),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_validated_and_normalised() {
        let o = CorsOrigins::parse([
            "https://App.Example.com",
            "http://localhost:3000",
            " ",
            "https://app.example.com",
        ])
        .unwrap();
        assert_eq!(
            o.origins(),
            ["https://app.example.com", "http://localhost:3000"]
        );
        assert!(CorsOrigins::parse([""]).unwrap().is_empty());
        for bad in [
            "*",
            "app.example.com",
            "https://",
            "https://a.example/",
            "https://a.example/x",
            "ftp://a.example",
            "https://u@a.example",
        ] {
            assert!(CorsOrigins::parse([bad]).is_err(), "{bad}");
        }
        assert!(CorsOrigins::none().layer().is_none());
    }
}
