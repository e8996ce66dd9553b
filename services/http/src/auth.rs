//! JWT bearer authentication (issue #4, "Security").
//!
//! Every command carries `Authorization: Bearer <JWT>`. The token is verified with exactly one
//! configured algorithm — HS256 (shared secret) or RS256 (PEM public key) — and its claims
//! must follow this contract (other services mint tokens against it; keep it stable):
//!
//! | claim | type | rule |
//! |---|---|---|
//! | `sub` | string | the user's UUID (hyphenated); the command runs as `Actor::User(sub)` |
//! | `roles` | array of strings, optional | among `user`, `moderator`, `admin`; missing or empty = `["user"]`; an unknown role refuses the token |
//! | `iss` | string | must equal the configured issuer (default [`DEFAULT_ISSUER`]) |
//! | `aud` | string or array | must contain the configured audience (default [`DEFAULT_AUDIENCE`]) |
//! | `exp` | number (s since the epoch) | required; refused when `exp < now − leeway` |
//! | `nbf` | number, optional | refused when `nbf > now + leeway` |
//! | `iat` | number | refused when `iat > now + leeway` (issued in the future) |
//!
//! The leeway (clock skew allowed between the issuer and this API) defaults to
//! [`DEFAULT_LEEWAY_SECS`] seconds. A token whose header names another algorithm than the
//! configured one (including `none`, and HS256 when RS256 is configured — the key-confusion
//! attack) is refused before its signature is looked at. Failures are **401** problems with a
//! `WWW-Authenticate: Bearer` challenge ([`AuthError`]); their `detail` names the failed check
//! but never echoes the token. Neither tokens nor keys are ever logged.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::Principal;
use crate::problem::Problem;

/// Default `iss` accepted and minted (issue #4 claims contract).
pub const DEFAULT_ISSUER: &str = "tektree";
/// Default `aud` required and minted (issue #4 claims contract).
pub const DEFAULT_AUDIENCE: &str = "tektree-api";
/// Default clock skew, in seconds, allowed on `exp`, `nbf` and `iat`: 30 s, enough for hosts
/// synchronised by NTP while keeping an expired token usable for at most half a minute.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// Smallest accepted HS256 secret, in bytes: 32 = the SHA-256 output size, the minimum
/// RFC 7518 §3.2 requires for HMAC keys.
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Default lifetime of tokens minted by `tektree token`, in seconds (1 hour).
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
/// `realm` of the `WWW-Authenticate` challenges.
pub const REALM: &str = "tektree";

/// A role carried in the `roles` claim. Roles are cumulative: `admin` may do everything a
/// `moderator` may, a `moderator` everything a `user` may (see [`Principal::has_role`]).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every authenticated caller (the default when `roles` is missing or empty): commands as
    /// themselves.
    User,
    /// May also list dead letters (`GET /v1/admin/dead-letters`).
    Moderator,
    /// May also re-drive dead letters and rebuild projections.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::User, Role::Moderator, Role::Admin];

    /// The claim value: `user`, `moderator` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Moderator => "moderator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    /// Parses `user`, `moderator` or `admin` (exactly, lower case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: expected user, moderator or admin"))
    }
}

/// The claims of a token minted by [`Authenticator::mint`] (the contract in the module docs;
/// tokens of other issuers may use an array `aud` and add `nbf` or further claims).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's UUID.
    pub sub: Uuid,
    /// Roles; omitted when empty (= `user`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch.
    pub iat: u64,
    /// The user's e-mail address (OpenID Connect standard claim), if the issuer asserts one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Whether the issuer verified `email` (OpenID Connect standard claim).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub email_verified: bool,
}

/// The claims this API reads after `jsonwebtoken` checked the signature, `exp`, `nbf`, `iss`
/// and `aud`.
#[derive(Deserialize)]
struct VerifiedClaims {
    sub: Uuid,
    #[serde(default)]
    roles: Vec<Role>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
}

/// The verification key: exactly one algorithm is accepted.
#[derive(Clone, PartialEq, Eq)]
pub enum JwtKey {
    /// HS256 with this shared secret (at least [`MIN_HS256_SECRET_BYTES`] bytes).
    Hs256(Vec<u8>),
    /// RS256 with this PEM public key (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`).
    Rs256 {
        /// The PEM text.
        public_pem: Vec<u8>,
    },
}

impl fmt::Debug for JwtKey {
    /// Never shows the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtKey::Hs256(s) => write!(f, "Hs256(<redacted, {} bytes>)", s.len()),
            JwtKey::Rs256 { .. } => f.write_str("Rs256(<public key>)"),
        }
    }
}

/// Everything [`Authenticator::new`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Algorithm and key.
    pub key: JwtKey,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` member.
    pub audience: String,
    /// Allowed clock skew in seconds on `exp`, `nbf` and `iat`.
    pub leeway_secs: u64,
}

impl AuthConfig {
    /// `key` with the default issuer, audience and leeway.
    pub fn new(key: JwtKey) -> Self {
        AuthConfig {
            key,
            issuer: DEFAULT_ISSUER.into(),
            audience: DEFAULT_AUDIENCE.into(),
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }
}

/// A key that cannot be used. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthSetupError {
    /// The HS256 secret is shorter than [`MIN_HS256_SECRET_BYTES`].
    #[error("the HS256 secret has {len} bytes; at least {MIN_HS256_SECRET_BYTES} are required (RFC 7518 §3.2)")]
    SecretTooShort {
        /// Its length in bytes.
        len: usize,
    },
    /// The RS256 public key is not a PEM RSA public key.
    #[error("invalid RS256 public key: {0}")]
    InvalidPublicKey(String),
    /// The RS256 private key (for minting) is not a PEM RSA private key.
    #[error("invalid RS256 private key: {0}")]
    InvalidPrivateKey(String),
    /// Minting needs a signing key: the HS256 secret or an RS256 private key.
    #[error("no signing key: an RS256 verifier holds only the public key; tokens come from the identity provider")]
    NoSigningKey,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Why a request is not authenticated (401) or not authorised (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header: 401 `unauthenticated`.
    #[error("a bearer token is required: send `Authorization: Bearer <JWT>`")]
    Missing,
    /// The header or the token is invalid: 401 `unauthenticated` (the reason names the failed
    /// check, never the token).
    #[error("invalid bearer token: {0}")]
    Invalid(String),
    /// Authenticated, but the role is insufficient: 403 `forbidden`.
    #[error("{0}")]
    Forbidden(String),
}

impl AuthError {
    /// The problem: 401 `unauthenticated` or 403 `forbidden`.
    pub fn problem(&self) -> Problem {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => {
                Problem::unauthenticated(self.to_string())
            }
            AuthError::Forbidden(m) => Problem::forbidden(m.clone()),
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3): `Bearer realm="tektree"` when the token
    /// is missing, with `error="invalid_token"` when it is invalid and
    /// `error="insufficient_scope"` when the role is insufficient.
    pub fn challenge(&self) -> &'static str {
        match self {
            AuthError::Missing => "Bearer realm=\"tektree\"",
            AuthError::Invalid(_) => "Bearer realm=\"tektree\", error=\"invalid_token\"",
            AuthError::Forbidden(_) => "Bearer realm=\"tektree\", error=\"insufficient_scope\"",
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let mut resp = self.problem().into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(self.challenge()),
        );
        debug_assert!(matches!(
            resp.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ));
        resp
    }
}

impl From<AuthError> for Problem {
    /// The same 401/403 problem, without the `WWW-Authenticate` header (prefer returning the
    /// [`AuthError`] itself, whose response carries it).
    fn from(e: AuthError) -> Self {
        e.problem()
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new random HS256 secret: 96 lower-case hex characters from three v4 UUIDs (366 random
/// bits from the operating system's CSPRNG via `getrandom`).
pub fn generate_secret() -> String {
    (0..3)
        .flat_map(|_| *Uuid::new_v4().as_bytes())
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Verifies bearer tokens (and mints them when it holds a signing key).
#[derive(Clone)]
pub struct Authenticator {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    issuer: String,
    audience: String,
    leeway_secs: u64,
}

impl fmt::Debug for Authenticator {
    /// Shows the algorithm and the claim rules, never the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("can_mint", &self.encoding.is_some())
            .finish()
    }
}

impl Authenticator {
    /// An authenticator for `config`. An HS256 authenticator can also [mint](Self::mint).
    ///
    /// # Errors
    /// [`AuthSetupError::SecretTooShort`] or [`AuthSetupError::InvalidPublicKey`].
    pub fn new(config: AuthConfig) -> Result<Self, AuthSetupError> {
        let (algorithm, decoding, encoding) = match &config.key {
            JwtKey::Hs256(secret) => {
                if secret.len() < MIN_HS256_SECRET_BYTES {
                    return Err(AuthSetupError::SecretTooShort { len: secret.len() });
                }
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret),
                    Some(EncodingKey::from_secret(secret)),
                )
            }
            JwtKey::Rs256 { public_pem } => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(public_pem)
                    .map_err(|e| AuthSetupError::InvalidPublicKey(e.to_string()))?,
                None,
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Ok(Authenticator {
            algorithm,
            decoding,
            encoding,
            validation,
            issuer: config.issuer,
            audience: config.audience,
            leeway_secs: config.leeway_secs,
        })
    }

    /// HS256 with a fresh [random secret](generate_secret) known only to this process (the
    /// library default of [`App`](tektree_runtime::app::App)): tokens can be minted only through this
    /// value, so nobody outside the process can authenticate.
    pub fn ephemeral() -> Self {
        Authenticator::new(AuthConfig::new(JwtKey::Hs256(
            generate_secret().into_bytes(),
        )))
        .expect("a generated secret is long enough")
    }

    /// Adds an RS256 private key so that [`mint`](Self::mint) works on an RS256 authenticator
    /// (tests and tools that hold the issuer's key; the API itself never needs it).
    ///
    /// # Errors
    /// [`AuthSetupError::InvalidPrivateKey`]; [`AuthSetupError::NoSigningKey`] when this
    /// authenticator is not RS256.
    pub fn with_rs256_signing_key(mut self, private_pem: &[u8]) -> Result<Self, AuthSetupError> {
        if self.algorithm != Algorithm::RS256 {
            return Err(AuthSetupError::NoSigningKey);
        }
        self.encoding = Some(
            EncodingKey::from_rsa_pem(private_pem)
                .map_err(|e| AuthSetupError::InvalidPrivateKey(e.to_string()))?,
        );
        Ok(self)
    }

    /// The one accepted algorithm (`HS256` or `RS256`).
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The required issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The required audience.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The allowed clock skew in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// The claims of a token for `user` with `roles`, issued at `iat` (seconds since the epoch)
    /// and valid for `ttl_secs` seconds, with this authenticator's issuer and audience.
    pub fn claims(&self, user: Uuid, roles: &[Role], iat: u64, ttl_secs: u64) -> Claims {
        Claims {
            sub: user,
            roles: roles.to_vec(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            exp: iat.saturating_add(ttl_secs),
            iat,
            email: None,
            email_verified: false,
        }
    }

    /// Signs `claims` with this authenticator's algorithm.
    ///
    /// # Errors
    /// [`AuthSetupError::NoSigningKey`] without a signing key; [`AuthSetupError::Sign`].
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthSetupError> {
        let key = self.encoding.as_ref().ok_or(AuthSetupError::NoSigningKey)?;
        jsonwebtoken::encode(&Header::new(self.algorithm), claims, key)
            .map_err(|e| AuthSetupError::Sign(e.to_string()))
    }

    /// A token for `user` with `roles`, issued now and valid for `ttl_secs` seconds (what
    /// `tektree token` prints).
    ///
    /// # Errors
    /// As [`sign`](Self::sign).
    pub fn mint(
        &self,
        user: Uuid,
        roles: &[Role],
        ttl_secs: u64,
    ) -> Result<String, AuthSetupError> {
        self.sign(&self.claims(user, roles, unix_now(), ttl_secs))
    }

    /// Verifies `token` (signature, algorithm, `exp`, `nbf`, `iat`, `iss`, `aud`, claim types).
    ///
    /// # Errors
    /// [`AuthError::Invalid`] naming the failed check.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let invalid = |m: &str| AuthError::Invalid(m.to_string());
        // The header first, so that an unknown algorithm (such as `none`) gets its own message.
        jsonwebtoken::decode_header(token).map_err(|_| {
            invalid(
                "malformed token header, or an algorithm this API does not accept (such as `none`)",
            )
        })?;
        let data = jsonwebtoken::decode::<VerifiedClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                AuthError::Invalid(match e.kind() {
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::MissingAlgorithm
                    | ErrorKind::InvalidAlgorithmName => format!(
                        "algorithm not accepted: this API accepts only {:?}",
                        self.algorithm
                    ),
                    ErrorKind::InvalidSignature
                    | ErrorKind::Crypto(_)
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidKeyFormat => "signature does not verify".into(),
                    ErrorKind::ExpiredSignature => "token expired (`exp`)".into(),
                    ErrorKind::ImmatureSignature => "token not valid yet (`nbf`)".into(),
                    ErrorKind::InvalidIssuer => {
                        format!("wrong issuer: `iss` must be {:?}", self.issuer)
                    }
                    ErrorKind::InvalidAudience => {
                        format!("wrong audience: `aud` must contain {:?}", self.audience)
                    }
                    ErrorKind::MissingRequiredClaim(c) => format!("required claim `{c}` is missing"),
                    ErrorKind::Json(_) => "claims do not follow the contract: `sub` must be a UUID and `roles` an array of user, moderator, admin".into(),
                    _ => "malformed token".into(),
                })
            })?;
        let claims = data.claims;
        if claims
            .iat
            .is_some_and(|iat| iat > unix_now().saturating_add(self.leeway_secs))
        {
            return Err(invalid("token issued in the future (`iat`)"));
        }
        if claims.sub.is_nil() {
            return Err(invalid("`sub` must not be the nil UUID"));
        }
        let mut roles = claims.roles;
        roles.sort();
        roles.dedup();
        if roles.is_empty() {
            roles.push(Role::User);
        }
        Ok(Principal {
            user: claims.sub,
            roles,
            verified_email: claims.email.filter(|_| claims.email_verified == Some(true)),
        })
    }

    /// Reads `Authorization: Bearer <token>` from `headers` and [verifies](Self::verify) it.
    ///
    /// # Errors
    /// [`AuthError::Missing`] without the header; [`AuthError::Invalid`] for several
    /// `Authorization` headers, another scheme, an empty or invalid token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(AuthError::Missing);
        };
        if values.next().is_some() {
            return Err(AuthError::Invalid(
                "several Authorization headers".to_string(),
            ));
        }
        let value = value
            .to_str()
            .map_err(|_| AuthError::Invalid("the Authorization header is not ASCII".into()))?;
        let (scheme, token) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid(
                "expected the Bearer scheme: `Authorization: Bearer <JWT>`".into(),
            ));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Invalid("the bearer token is empty".into()));
        }
        self.verify(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs() -> Authenticator {
        Authenticator::new(AuthConfig::new(JwtKey::Hs256(vec![7u8; 32]))).unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_default_to_the_user_role() {
        let a = hs();
        let user = Uuid::new_v4();
        let p = a.verify(&a.mint(user, &[], 60).unwrap()).unwrap();
        assert_eq!(
            p,
            Principal {
                user,
                roles: vec![Role::User],
                verified_email: None,
            }
        );
        let p = a
            .verify(&a.mint(user, &[Role::Admin, Role::Admin], 60).unwrap())
            .unwrap();
        assert_eq!(p.roles, vec![Role::Admin]);
    }

    #[test]
    fn short_secrets_are_refused_and_debug_hides_keys() {
        assert_eq!(
            Authenticator::new(AuthConfig::new(JwtKey::Hs256(vec![1u8; 31]))).unwrap_err(),
            AuthSetupError::SecretTooShort { len: 31 }
        );
        let secret = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t";
        let key = JwtKey::Hs256(secret.as_bytes().to_vec());
        assert!(!format!("{key:?}").contains(secret));
        let a = Authenticator::new(AuthConfig::new(key)).unwrap();
        assert!(!format!("{a:?}").contains(secret));
    }

    #[test]
    fn generated_secrets_are_long_and_distinct() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_eq!(a.len(), 96);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn authorization_header_forms() {
        let a = hs();
        let user = Uuid::new_v4();
        let token = a.mint(user, &[], 60).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(a.authenticate(&h), Err(AuthError::Missing));
        h.insert(
            header::AUTHORIZATION,
            format!("bearer  {token}").parse().unwrap(),
        );
        assert_eq!(a.authenticate(&h).unwrap().user, user);
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {token}").parse().unwrap(),
        );
        assert!(matches!(a.authenticate(&h), Err(AuthError::Invalid(_))));
        h.insert(header::AUTHORIZATION, "Bearer".parse().unwrap());
        assert!(matches!(a.authenticate(&h), Err(AuthError::Invalid(_))));
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h.append(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        assert!(matches!(a.authenticate(&h), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn roles_parse_exactly() {
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("Admin".parse::<Role>().is_err());
        assert!(Role::User < Role::Moderator && Role::Moderator < Role::Admin);
    }
}
