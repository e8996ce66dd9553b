//! `Idempotency-Key` on command endpoints (issue #4; header as in the IETF draft
//! *The Idempotency-Key HTTP Header Field*, draft-ietf-httpapi-idempotency-key-header).
//!
//! A client that may retry a command sends `Idempotency-Key: <key>` (1 to 255 visible ASCII
//! characters, optionally as a quoted string). The first request with the key runs the command
//! and stores a record of what it committed **in the same transaction as its events**; a retry
//! with the same key and the same request (same route, path and JSON body) within
//! [`KEY_TTL`] gets the first response again — status, body, and the header
//! `Idempotent-Replayed: true` — and appends nothing, even when the retries race each other.
//! The same key with a different request answers 422 `idempotency_key_reused`. Keys are scoped
//! per caller: two users may use the same key. Refused commands (4xx) store no record, so their
//! retry runs again. Expired records are deleted every [`PURGE_INTERVAL`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tektree_event_store::{EventStore, IdempotencyKey};
use uuid::Uuid;

use crate::problem::Problem;

/// Name of the request header.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Name of the response header set on a replayed response (value `true`).
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest accepted key, in characters (bytes: the key is ASCII).
pub const MAX_KEY_LEN: usize = 255;
/// How long a key is remembered: 24 hours from its first request (issue #4 asks for a
/// documented expiry; 24 hours is the common choice of payment APIs such as Stripe's).
pub const KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How often `tektree serve` / `tektree api` delete expired records.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// The request's `Idempotency-Key`, if it sent one. An invalid header answers 400
/// `invalid_idempotency_key`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdempotencyHeader(pub Option<String>);

/// 400 `invalid_idempotency_key`.
fn invalid(detail: String) -> Problem {
    Problem::new(
        axum::http::StatusCode::BAD_REQUEST,
        "invalid_idempotency_key",
        "Invalid Idempotency-Key header",
        detail,
    )
}

/// Parses a header value: 1..=[`MAX_KEY_LEN`] characters in `!`..=`~`, or the same inside
/// double quotes (an RFC 8941 string without escapes).
///
/// # Errors
/// A 400 problem naming the rule.
pub fn parse_key(raw: &[u8]) -> Result<String, Problem> {
    let inner = match raw {
        [b'"', rest @ .., b'"'] => rest,
        other => other,
    };
    let ok = !inner.is_empty()
        && inner.len() <= MAX_KEY_LEN
        && inner
            .iter()
            .all(|b| (b'!'..=b'~').contains(b) && *b != b'"');
    if !ok {
        return Err(invalid(format!(
            "the Idempotency-Key header must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        )));
    }
    Ok(String::from_utf8_lossy(inner).into_owned())
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
        let Some(first) = values.next() else {
            return Ok(IdempotencyHeader(None));
        };
        if values.next().is_some() {
            return Err(invalid(
                "send the Idempotency-Key header at most once".into(),
            ));
        }
        parse_key(first.as_bytes()).map(|k| IdempotencyHeader(Some(k)))
    }
}

impl IdempotencyHeader {
    /// The store key of this request: scoped to `caller` (or `anonymous`), fingerprinted by
    /// [`fingerprint`] of `route`, `path` and `body`, valid for [`KEY_TTL`] from `now`.
    /// `None` when the request has no key.
    pub fn key<B: Serialize>(
        &self,
        caller: Option<Uuid>,
        route: &str,
        path: &[Uuid],
        body: &B,
        now: DateTime<Utc>,
    ) -> Option<IdempotencyKey> {
        let k = self.0.as_ref()?;
        let scope = caller.map_or_else(|| "anonymous".to_string(), |c| c.to_string());
        let ttl = chrono::Duration::from_std(KEY_TTL).unwrap_or(chrono::Duration::days(1));
        Some(IdempotencyKey {
            key: format!("{scope}:{k}"),
            fingerprint: fingerprint(route, path, body),
            created_at: now,
            expires_at: now + ttl,
        })
    }
}

/// Lowercase hex SHA-256 of `route`, the `path` ids and the JSON of the decoded `body` (field
/// order is the struct's, so formatting and key order of the client's JSON do not matter).
pub fn fingerprint<B: Serialize>(route: &str, path: &[Uuid], body: &B) -> String {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    for id in path {
        h.update([0]);
        h.update(id.as_bytes());
    }
    h.update([0]);
    h.update(serde_json::to_vec(body).unwrap_or_default());
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// Deletes expired idempotency records every [`PURGE_INTERVAL`] until the task is dropped.
pub async fn purge_forever(store: Arc<dyn EventStore>) {
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tick.tick().await;
        match store.purge_idempotency_records(Utc::now()).await {
            Ok(n) if n > 0 => tracing::debug!(records = n, "purged expired idempotency records"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging idempotency records failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length_optionally_quoted() {
        assert_eq!(parse_key(b"abc-123").unwrap(), "abc-123");
        assert_eq!(parse_key(b"\"abc\"").unwrap(), "abc");
        assert_eq!(parse_key(&[b'k'; 255]).unwrap().len(), 255);
        for bad in [
            &b""[..],
            b"\"\"",
            b"a b",
            b"caf\xc3\xa9",
            b"a\"b",
            &[b'k'; 256],
        ] {
            let p = parse_key(bad).unwrap_err();
            assert_eq!(p.status.as_u16(), 400, "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_differ_by_route_path_and_body_and_keys_by_caller() {
        let body = serde_json::json!({"text": "hi"});
        let a = Uuid::new_v4();
        let base = fingerprint("comment", &[a], &body);
        assert_eq!(base.len(), 64);
        assert_eq!(base, fingerprint("comment", &[a], &body));
        assert_ne!(base, fingerprint("answer", &[a], &body));
        assert_ne!(base, fingerprint("comment", &[Uuid::new_v4()], &body));
        assert_ne!(
            base,
            fingerprint("comment", &[a], &serde_json::json!({"text": "ho"}))
        );
        let h = IdempotencyHeader(Some("k1".into()));
        let now = Utc::now();
        let u = Uuid::new_v4();
        let k = h.key(Some(u), "comment", &[a], &body, now).unwrap();
        assert_eq!(k.key, format!("{u}:k1"));
        assert_eq!(k.expires_at - k.created_at, chrono::Duration::hours(24));
        assert_ne!(
            h.key(Some(Uuid::new_v4()), "comment", &[a], &body, now)
                .unwrap()
                .key,
            k.key
        );
        assert!(IdempotencyHeader(None)
            .key(Some(u), "comment", &[a], &body, now)
            .is_none());
    }
}
