//! Webhook signature verification, as the [Standard Webhooks] specification (v1.0.0) defines it
//! and Polar sends it.
//!
//! A delivery carries three headers:
//!
//! | header | value |
//! |---|---|
//! | `webhook-id` | the message id; the same for every retry of one event (our dedupe key) |
//! | `webhook-timestamp` | the attempt's time, integer seconds since the Unix epoch |
//! | `webhook-signature` | space-separated `<version>,<base64 signature>` entries, e.g. `v1,K5oZ…=` |
//!
//! The signed content is the bytes `{webhook-id}.{webhook-timestamp}.{raw body}`; a `v1`
//! signature is the standard base64 of HMAC-SHA256 over it. A delivery is accepted when
//! - all three headers are present exactly once and well-formed;
//! - `|now − webhook-timestamp| ≤ tolerance` (default [`DEFAULT_TOLERANCE`], 5 minutes, the
//!   reference libraries' value), in **both** directions, so that neither an old capture nor a
//!   pre-dated forgery can be replayed later;
//! - some `v1` entry equals the HMAC under **some** configured secret. Several secrets may be
//!   configured at once for rotation (the specification's zero-downtime rotation: the sender
//!   signs with old and new keys during the switch, the receiver accepts either); entries of
//!   other versions (`v1a`, asymmetric) are ignored.
//!
//! The comparison is constant-time ([`hmac::Mac::verify_slice`]), as the specification requires
//! ("Failing to do so can expose consumers to timing-attacks").
//!
//! # Secrets: `whsec_…` and Polar's raw secrets
//!
//! The specification serialises secrets as `whsec_` + base64 of the key bytes. Polar's dashboard
//! shows a secret that is **not** in that form (e.g. `polar_whs_…`), and Polar's SDKs
//! (`validate_event` / `validateEvent`) base64-encode that string before handing it to a
//! Standard Webhooks library, which decodes it again: the HMAC key is the secret's own UTF-8
//! bytes. [`WebhookSecret::parse`] therefore reads
//! - `whsec_<base64>` → the decoded bytes (the specification's form), and
//! - anything else → the string's UTF-8 bytes (Polar's form, matching its SDKs).
//!
//! [Standard Webhooks]: https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md

use std::fmt;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Name of the message-id header.
pub const ID_HEADER: &str = "webhook-id";
/// Name of the timestamp header (integer seconds since the epoch).
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Name of the signature header (space-separated `v1,<base64>` entries).
pub const SIGNATURE_HEADER: &str = "webhook-signature";
/// Default tolerance between `webhook-timestamp` and our clock, in either direction: 5 minutes,
/// the value of the Standard Webhooks reference libraries.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// Longest accepted `webhook-id`, in bytes. Polar's ids are short (`msg_…`); the bound keeps the
/// dedupe key within the store's idempotency key limit
/// ([`tektree_event_store::MAX_KEY_BYTES`]).
pub const MAX_ID_LEN: usize = 255;
/// Prefix of secrets in the Standard Webhooks serialisation.
pub const WHSEC_PREFIX: &str = "whsec_";

/// Why a delivery was refused. Every variant means "change nothing"; the HTTP layer maps them
/// to 4xx problems (`docs/billing.md`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// A required header is absent (an unsigned delivery).
    #[error("missing `{0}` header")]
    MissingHeader(&'static str),
    /// A header is repeated, not visible ASCII, or not of its format.
    #[error("malformed `{header}` header: {reason}")]
    MalformedHeader {
        /// The header.
        header: &'static str,
        /// What is wrong (never contains a secret).
        reason: String,
    },
    /// `webhook-timestamp` is more than the tolerance in the past.
    #[error("webhook timestamp is {age_secs} s old; at most {tolerance_secs} s is accepted")]
    Stale {
        /// `now − timestamp`, seconds.
        age_secs: i64,
        /// The tolerance, seconds.
        tolerance_secs: u64,
    },
    /// `webhook-timestamp` is more than the tolerance in the future.
    #[error(
        "webhook timestamp is {ahead_secs} s in the future; at most {tolerance_secs} s is accepted"
    )]
    Future {
        /// `timestamp − now`, seconds.
        ahead_secs: i64,
        /// The tolerance, seconds.
        tolerance_secs: u64,
    },
    /// The signature header has no `v1` entry.
    #[error("no `v1` signature in `webhook-signature`")]
    NoSupportedSignature,
    /// No `v1` entry matches the content under any configured secret (wrong secret, tampered
    /// id, timestamp or body).
    #[error("no signature matches")]
    SignatureMismatch,
}

impl WebhookError {
    /// Stable reason code (the problem `type` suffix): `webhook.missing_header`,
    /// `webhook.malformed_header`, `webhook.stale`, `webhook.future`,
    /// `webhook.signature_mismatch` (also for [`WebhookError::NoSupportedSignature`]).
    pub fn code(&self) -> &'static str {
        match self {
            WebhookError::MissingHeader(_) => "webhook.missing_header",
            WebhookError::MalformedHeader { .. } => "webhook.malformed_header",
            WebhookError::Stale { .. } => "webhook.stale",
            WebhookError::Future { .. } => "webhook.future",
            WebhookError::NoSupportedSignature | WebhookError::SignatureMismatch => {
                "webhook.signature_mismatch"
            }
        }
    }
}

/// A configuration error of a webhook secret (the message never contains the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Empty, or `whsec_` with nothing after it.
    #[error("the webhook secret is empty")]
    Empty,
    /// `whsec_` followed by something that is not standard base64.
    #[error("the webhook secret starts with `whsec_` but the rest is not base64")]
    NotBase64,
}

/// One HMAC key for webhook signatures. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret({} bytes)", self.key.len())
    }
}

impl WebhookSecret {
    /// Reads a configured secret (surrounding whitespace ignored): `whsec_<base64>` is the
    /// Standard Webhooks serialisation (key = decoded bytes); anything else is a raw secret as
    /// Polar shows it (key = its UTF-8 bytes, what Polar's SDKs do). See the module docs.
    ///
    /// # Errors
    /// [`SecretError`] for an empty secret or a `whsec_` secret that is not base64.
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let s = secret.trim();
        let key = match s.strip_prefix(WHSEC_PREFIX) {
            Some(b64) => B64.decode(b64).map_err(|_| SecretError::NotBase64)?,
            None => s.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(WebhookSecret { key })
    }

    /// A secret of these key bytes.
    pub fn from_key(key: impl Into<Vec<u8>>) -> Self {
        WebhookSecret { key: key.into() }
    }

    /// Key length in bytes (the specification asks for 24..=64 from senders).
    pub fn len(&self) -> usize {
        self.key.len()
    }

    /// Whether the key is empty (never true for a parsed secret).
    pub fn is_empty(&self) -> bool {
        self.key.is_empty()
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length.
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `v1,<base64>` signature entry of `id`, `timestamp` and `body` under this secret
    /// (what a sender puts in `webhook-signature`).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("v1,{}", B64.encode(tag))
    }
}

/// A delivery that passed [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedWebhook {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`, seconds since the epoch.
    pub timestamp: i64,
}

/// The one value of header `name`, as visible ASCII.
fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, WebhookError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().ok_or(WebhookError::MissingHeader(name))?;
    let malformed = |reason: &str| WebhookError::MalformedHeader {
        header: name,
        reason: reason.into(),
    };
    if values.next().is_some() {
        return Err(malformed("sent more than once"));
    }
    let s = first
        .to_str()
        .map_err(|_| malformed("not visible ASCII"))?
        .trim();
    if s.is_empty() {
        return Err(malformed("empty"));
    }
    Ok(s)
}

/// Verifies a delivery: headers, then the timestamp window around `now_unix` (seconds since the
/// epoch), then the signatures against every secret (see the module docs for the rules and
/// their sources). `body` must be the raw request body, exactly as received.
///
/// # Errors
/// [`WebhookError`]: missing or malformed headers, a timestamp outside `tolerance` either way,
/// no `v1` entry, or no entry matching any secret. With no secrets nothing can match:
/// [`WebhookError::SignatureMismatch`].
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[WebhookSecret],
    tolerance: Duration,
    now_unix: i64,
) -> Result<VerifiedWebhook, WebhookError> {
    let id = header(headers, ID_HEADER)?;
    if id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(WebhookError::MalformedHeader {
            header: ID_HEADER,
            reason: format!("must be 1 to {MAX_ID_LEN} visible ASCII characters"),
        });
    }
    let ts_text = header(headers, TIMESTAMP_HEADER)?;
    let timestamp: i64 = ts_text
        .parse()
        .ok()
        .filter(|_| ts_text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| WebhookError::MalformedHeader {
            header: TIMESTAMP_HEADER,
            reason: "must be integer seconds since the Unix epoch".into(),
        })?;
    let signatures = header(headers, SIGNATURE_HEADER)?;

    let tolerance_secs = tolerance.as_secs();
    let tol = i64::try_from(tolerance_secs).unwrap_or(i64::MAX);
    let age = now_unix.saturating_sub(timestamp);
    if age > tol {
        return Err(WebhookError::Stale {
            age_secs: age,
            tolerance_secs,
        });
    }
    if age < -tol {
        return Err(WebhookError::Future {
            ahead_secs: -age,
            tolerance_secs,
        });
    }

    let mut v1 = Vec::new();
    for entry in signatures.split(' ').filter(|e| !e.is_empty()) {
        let (version, value) =
            entry
                .split_once(',')
                .ok_or_else(|| WebhookError::MalformedHeader {
                    header: SIGNATURE_HEADER,
                    reason: "entries must be `<version>,<base64>`".into(),
                })?;
        if version == "v1" {
            // An entry that is not base64 can match nothing; it does not hide the others.
            if let Ok(sig) = B64.decode(value) {
                v1.push(sig);
            }
        }
    }
    if v1.is_empty() && !signatures.split(' ').any(|e| e.starts_with("v1,")) {
        return Err(WebhookError::NoSupportedSignature);
    }
    // Every secret against every entry, each comparison constant-time.
    let mut matched = false;
    for secret in secrets {
        let mac = secret.mac(id, ts_text, body);
        for sig in &v1 {
            matched |= mac.clone().verify_slice(sig).is_ok();
        }
    }
    if !matched {
        return Err(WebhookError::SignatureMismatch);
    }
    Ok(VerifiedWebhook {
        id: id.to_string(),
        timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    // The Standard Webhooks reference test vector (used by the specification's libraries); the
    // signature was re-computed independently with
    //   printf '%s' 'msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}' |
    //     openssl dgst -sha256 -mac HMAC \
    //       -macopt hexkey:$(printf '%s' MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw | base64 -d | xxd -p -c 256) \
    //       -binary | base64
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    // A raw Polar-style secret (key = its UTF-8 bytes), computed independently with
    //   printf '%s' 'msg_2KWPBgLlAfxdpx2AI54pPJ85f4W.1674087231.{"type":"subscription.created"}' |
    //     openssl dgst -sha256 -hmac 'polar_whs_testsecret_0123456789abcdef' -binary | base64
    const RAW_SECRET: &str = "polar_whs_testsecret_0123456789abcdef";
    const RAW_ID: &str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W";
    const RAW_TS: i64 = 1_674_087_231;
    const RAW_BODY: &[u8] = br#"{"type":"subscription.created"}"#;
    const RAW_SIG: &str = "v1,29pxyuK5QGfG1zsrZdIkO2U5bb63ClXsAIiPR+jSL9k=";

    const TOL: Duration = DEFAULT_TOLERANCE;

    fn headers(id: &str, ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ID_HEADER, HeaderValue::from_str(id).unwrap());
        h.insert(TIMESTAMP_HEADER, HeaderValue::from_str(ts).unwrap());
        h.insert(SIGNATURE_HEADER, HeaderValue::from_str(sig).unwrap());
        h
    }

    fn spec() -> (HeaderMap, Vec<WebhookSecret>) {
        (
            headers(SPEC_ID, &SPEC_TS.to_string(), SPEC_SIG),
            vec![WebhookSecret::parse(SPEC_SECRET).unwrap()],
        )
    }

    #[test]
    fn accepts_the_standard_webhooks_test_vector() {
        let (h, secrets) = spec();
        let ok = verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS).unwrap();
        assert_eq!(ok.id, SPEC_ID);
        assert_eq!(ok.timestamp, SPEC_TS);
        // And the signer reproduces it.
        assert_eq!(secrets[0].sign(SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
    }

    #[test]
    fn raw_polar_secrets_are_their_utf8_bytes() {
        let secret = WebhookSecret::parse(RAW_SECRET).unwrap();
        assert_eq!(secret.len(), RAW_SECRET.len());
        let h = headers(RAW_ID, &RAW_TS.to_string(), RAW_SIG);
        verify(
            &h,
            RAW_BODY,
            std::slice::from_ref(&secret),
            TOL,
            RAW_TS + 10,
        )
        .unwrap();
        assert_eq!(secret.sign(RAW_ID, RAW_TS, RAW_BODY), RAW_SIG);
        // The same string read as `whsec_` base64 would be another key.
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{}", B64.encode(RAW_SECRET))).unwrap(),
            secret
        );
    }

    #[test]
    fn secrets_parse_or_fail_without_echoing() {
        assert_eq!(WebhookSecret::parse(""), Err(SecretError::Empty));
        assert_eq!(WebhookSecret::parse("   "), Err(SecretError::Empty));
        assert_eq!(WebhookSecret::parse("whsec_"), Err(SecretError::Empty));
        assert_eq!(
            WebhookSecret::parse("whsec_not base64!"),
            Err(SecretError::NotBase64)
        );
        let s = WebhookSecret::parse(SPEC_SECRET).unwrap();
        assert_eq!(s.len(), 24);
        assert!(!format!("{s:?}").contains("MfKQ"));
    }

    #[test]
    fn any_listed_secret_accepts_during_rotation() {
        let (h, mut secrets) = spec();
        let other = WebhookSecret::parse("whsec_c2VjcmV0LW9mLWEtbmV3LWVuZHBvaW50").unwrap();
        // Old secret still listed after the new one: accepted.
        secrets.insert(0, other.clone());
        verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS).unwrap();
        // Old secret removed: refused.
        assert_eq!(
            verify(&h, SPEC_BODY, std::slice::from_ref(&other), TOL, SPEC_TS),
            Err(WebhookError::SignatureMismatch)
        );
        // A sender signing with both keys (space-separated): either secret alone accepts.
        let both = format!("{} {}", other.sign(SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
        let h2 = headers(SPEC_ID, &SPEC_TS.to_string(), &both);
        verify(&h2, SPEC_BODY, &[other], TOL, SPEC_TS).unwrap();
        verify(
            &h2,
            SPEC_BODY,
            &[WebhookSecret::parse(SPEC_SECRET).unwrap()],
            TOL,
            SPEC_TS,
        )
        .unwrap();
    }

    #[test]
    fn missing_headers_are_refused() {
        let (full, secrets) = spec();
        for name in [ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER] {
            let mut h = full.clone();
            h.remove(name);
            assert_eq!(
                verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS),
                Err(WebhookError::MissingHeader(name)),
                "{name}"
            );
        }
        assert_eq!(
            verify(&HeaderMap::new(), SPEC_BODY, &secrets, TOL, SPEC_TS)
                .unwrap_err()
                .code(),
            "webhook.missing_header"
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let (_, secrets) = spec();
        let ts = SPEC_TS.to_string();
        let long_id = "m".repeat(MAX_ID_LEN + 1);
        let cases: Vec<(HeaderMap, &str)> = vec![
            (headers(SPEC_ID, "16142653.30", SPEC_SIG), TIMESTAMP_HEADER),
            (headers(SPEC_ID, "-1614265330", SPEC_SIG), TIMESTAMP_HEADER),
            (headers(SPEC_ID, "+1614265330", SPEC_SIG), TIMESTAMP_HEADER),
            (headers(SPEC_ID, "1e9", SPEC_SIG), TIMESTAMP_HEADER),
            (
                headers(SPEC_ID, "99999999999999999999999", SPEC_SIG),
                TIMESTAMP_HEADER,
            ),
            (headers(SPEC_ID, &ts, "v1"), SIGNATURE_HEADER),
            (headers(SPEC_ID, &ts, "g0hM9SsE+OTPJTGt"), SIGNATURE_HEADER),
            (headers(&long_id, &ts, SPEC_SIG), ID_HEADER),
            (headers("msg id", &ts, SPEC_SIG), ID_HEADER),
            (headers(SPEC_ID, " ", SPEC_SIG), TIMESTAMP_HEADER),
        ];
        for (h, name) in cases {
            match verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS) {
                Err(WebhookError::MalformedHeader { header, .. }) => assert_eq!(header, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        // A header sent twice.
        let (mut h, _) = spec();
        h.append(SIGNATURE_HEADER, HeaderValue::from_static(SPEC_SIG));
        assert!(matches!(
            verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS),
            Err(WebhookError::MalformedHeader {
                header: SIGNATURE_HEADER,
                ..
            })
        ));
        // Not visible ASCII.
        let (mut h, _) = spec();
        h.insert(ID_HEADER, HeaderValue::from_bytes(b"msg_\xff").unwrap());
        assert!(matches!(
            verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS),
            Err(WebhookError::MalformedHeader {
                header: ID_HEADER,
                ..
            })
        ));
    }

    #[test]
    fn timestamps_outside_the_tolerance_are_refused_both_ways() {
        let (h, secrets) = spec();
        let tol = TOL.as_secs() as i64;
        // Edges are inside.
        verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS + tol).unwrap();
        verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS - tol).unwrap();
        assert_eq!(
            verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS + tol + 1),
            Err(WebhookError::Stale {
                age_secs: tol + 1,
                tolerance_secs: 300
            })
        );
        assert_eq!(
            verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS - tol - 1),
            Err(WebhookError::Future {
                ahead_secs: tol + 1,
                tolerance_secs: 300
            })
        );
        // A correctly signed but old timestamp stays stale: the check is not after the MAC.
        assert_eq!(
            verify(&h, SPEC_BODY, &secrets, TOL, SPEC_TS + 86_400)
                .unwrap_err()
                .code(),
            "webhook.stale"
        );
        // A custom tolerance.
        assert!(verify(
            &h,
            SPEC_BODY,
            &secrets,
            Duration::from_secs(10),
            SPEC_TS + 11
        )
        .is_err());
    }

    #[test]
    fn wrong_or_tampered_signatures_are_refused() {
        let (h, secrets) = spec();
        let ts = SPEC_TS.to_string();
        let mismatch = Err(WebhookError::SignatureMismatch);
        // Tampered body, id or timestamp.
        assert_eq!(
            verify(&h, br#"{"test": 2432232315}"#, &secrets, TOL, SPEC_TS),
            mismatch
        );
        assert_eq!(
            verify(
                &headers("msg_other", &ts, SPEC_SIG),
                SPEC_BODY,
                &secrets,
                TOL,
                SPEC_TS
            ),
            mismatch
        );
        assert_eq!(
            verify(
                &headers(SPEC_ID, &(SPEC_TS + 1).to_string(), SPEC_SIG),
                SPEC_BODY,
                &secrets,
                TOL,
                SPEC_TS
            ),
            mismatch
        );
        // Wrong secret; no secret at all.
        let wrong = WebhookSecret::parse("whsec_d3Jvbmctc2VjcmV0LWtleS0xMjM0NTY=").unwrap();
        assert_eq!(verify(&h, SPEC_BODY, &[wrong], TOL, SPEC_TS), mismatch);
        assert_eq!(verify(&h, SPEC_BODY, &[], TOL, SPEC_TS), mismatch);
        // A truncated signature, a non-base64 one, one with another version label.
        for sig in [
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1O==",
            "v1,not-base64!",
            "v1,",
        ] {
            assert_eq!(
                verify(
                    &headers(SPEC_ID, &ts, sig),
                    SPEC_BODY,
                    &secrets,
                    TOL,
                    SPEC_TS
                ),
                mismatch,
                "{sig}"
            );
        }
        assert_eq!(
            verify(
                &headers(
                    SPEC_ID,
                    &ts,
                    "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                ),
                SPEC_BODY,
                &secrets,
                TOL,
                SPEC_TS
            ),
            Err(WebhookError::NoSupportedSignature)
        );
        // Asymmetric entries are ignored, the v1 entry beside them counts.
        let mixed = format!("v1a,aGVsbG8= {SPEC_SIG}");
        verify(
            &headers(SPEC_ID, &ts, &mixed),
            SPEC_BODY,
            &secrets,
            TOL,
            SPEC_TS,
        )
        .unwrap();
        // A bad entry does not hide a good one.
        let with_junk = format!("v1,AAAA {SPEC_SIG}");
        verify(
            &headers(SPEC_ID, &ts, &with_junk),
            SPEC_BODY,
            &secrets,
            TOL,
            SPEC_TS,
        )
        .unwrap();
    }
}
