//! The API's security options (JWT keys, rate-limit backend,
//! CORS; issue #4).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tektree_http::auth::{
    generate_secret, AuthConfig, Authenticator, JwtKey, DEFAULT_AUDIENCE, DEFAULT_ISSUER,
    DEFAULT_LEEWAY_SECS,
};
use tektree_http::cors::{CorsError, CorsOrigins};
use tektree_http::ratelimit::{RateLimitError, RateLimiter, RateLimits, RedisBackend, SystemClock};
use tektree_http::security::Security;

pub use tektree_runtime::config::{load_rules, redact_url, StoreUrl, DEFAULT_BUS, DEFAULT_STORE};

/// Errors in the API's configuration (and the runtime's, wrapped).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The store URL or the rules file ([`tektree_runtime::config`]).
    #[error(transparent)]
    Runtime(#[from] tektree_runtime::config::ConfigError),
    /// Contradictory or unusable JWT options (the message never contains key material).
    #[error("JWT configuration: {0}")]
    Jwt(String),
    /// A secret or key file could not be read, created or used.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The rate-limit backend could not be set up.
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
    /// An invalid CORS origin.
    #[error(transparent)]
    Cors(#[from] CorsError),
}

/// Extension of the HS256 secret file kept next to a SQLite store when no key is configured.
pub const SECRET_FILE_EXTENSION: &str = "jwt-secret";

/// Default `--rate-limit`: buckets in the API process's memory.
pub const DEFAULT_RATE_LIMIT: &str = "memory";

/// The HS256 secret file used when no key is configured: next to the SQLite store, with the
/// extension [`SECRET_FILE_EXTENSION`] (`sqlite://tektree.db` → `tektree.jwt-secret`,
/// `sqlite://data/x.db` → `data/x.jwt-secret`).
///
/// # Errors
/// [`ConfigError::Jwt`] for a MongoDB store (configure a key explicitly), or
/// [`ConfigError::Runtime`] for an invalid store URL.
pub fn default_secret_file(store_url: &str) -> Result<PathBuf, ConfigError> {
    match StoreUrl::parse(store_url)? {
        StoreUrl::Sqlite(path) => Ok(path.with_extension(SECRET_FILE_EXTENSION)),
        StoreUrl::Mongo { .. } => Err(ConfigError::Jwt(
            "with a MongoDB store there is no local secret file: set --jwt-hs256-secret, \
             --jwt-hs256-secret-file or --jwt-rs256-public-key"
                .into(),
        )),
    }
}

/// Reads an HS256 secret file: its bytes without trailing whitespace (so that
/// `echo "$SECRET" > file` works). On Unix, warns (without the secret) when the file is
/// readable by group or others.
///
/// # Errors
/// [`ConfigError::KeyFile`] when it cannot be read.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let err = |reason: String| ConfigError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the JWT secret file is readable by group or others; chmod 600 it");
            }
        }
    }
    Ok(bytes)
}

/// Reads the secret file at `path`, or creates it with a [new random
/// secret](generate_secret) (mode 0600 on Unix) when it does not exist. Creation is atomic:
/// the secret is written to a temporary file that is then hard-linked into place, so a
/// concurrent reader never sees a partial file, and of two concurrent creators the second
/// reads the first one's secret. Returns the secret and whether it was created.
///
/// # Errors
/// [`ConfigError::KeyFile`].
pub fn load_or_create_secret_file(path: &Path) -> Result<(Vec<u8>, bool), ConfigError> {
    let err = |reason: String| ConfigError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    if path.exists() {
        return Ok((read_secret_file(path)?, false));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating its directory: {e}")))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| SECRET_FILE_EXTENSION.into());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4()));
    let secret = generate_secret();
    let written = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((secret.into_bytes(), true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((read_secret_file(path)?, false))
        }
        Err(e) => Err(err(format!("creating it: {e}"))),
    }
}

/// The API's security options, as given on the command line or in the environment
/// (docs/config.md, "Security"). [`Debug`] never shows the secret.
#[derive(Clone)]
pub struct SecurityOptions {
    /// HS256 shared secret (`--jwt-hs256-secret`), at least 32 bytes.
    pub jwt_hs256_secret: Option<String>,
    /// File holding the HS256 secret (`--jwt-hs256-secret-file`).
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// PEM file of the RS256 public key (`--jwt-rs256-public-key`).
    pub jwt_rs256_public_key: Option<PathBuf>,
    /// Required `iss` (`--jwt-issuer`).
    pub jwt_issuer: String,
    /// Required `aud` (`--jwt-audience`).
    pub jwt_audience: String,
    /// Allowed clock skew in seconds (`--jwt-leeway-secs`).
    pub jwt_leeway_secs: u64,
    /// `memory`, `off` or `redis://…` (`--rate-limit`).
    pub rate_limit: String,
    /// Allowed CORS origins (`--cors-origin`).
    pub cors_origins: Vec<String>,
}

impl Default for SecurityOptions {
    /// No key (→ the secret file next to the store), issuer `tektree`, audience
    /// `tektree-api`, leeway 30 s, in-memory rate limits, no CORS.
    fn default() -> Self {
        SecurityOptions {
            jwt_hs256_secret: None,
            jwt_hs256_secret_file: None,
            jwt_rs256_public_key: None,
            jwt_issuer: DEFAULT_ISSUER.into(),
            jwt_audience: DEFAULT_AUDIENCE.into(),
            jwt_leeway_secs: DEFAULT_LEEWAY_SECS,
            rate_limit: DEFAULT_RATE_LIMIT.into(),
            cors_origins: vec![],
        }
    }
}

impl fmt::Debug for SecurityOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityOptions")
            .field(
                "jwt_hs256_secret",
                &self.jwt_hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_hs256_secret_file", &self.jwt_hs256_secret_file)
            .field("jwt_rs256_public_key", &self.jwt_rs256_public_key)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_leeway_secs", &self.jwt_leeway_secs)
            .field("rate_limit", &redact_url(&self.rate_limit))
            .field("cors_origins", &self.cors_origins)
            .finish()
    }
}

impl SecurityOptions {
    /// The JWT key and a description of where it came from (for logs; never the key):
    /// `--jwt-hs256-secret`, `--jwt-hs256-secret-file`, `--jwt-rs256-public-key`, or else the
    /// [default secret file](default_secret_file) of `store_url`, created on first use.
    ///
    /// # Errors
    /// [`ConfigError::Jwt`] when more than one key is given; [`ConfigError::KeyFile`].
    pub fn jwt_key(&self, store_url: &str) -> Result<(JwtKey, String), ConfigError> {
        let given = [
            self.jwt_hs256_secret.is_some(),
            self.jwt_hs256_secret_file.is_some(),
            self.jwt_rs256_public_key.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(ConfigError::Jwt(
                "give at most one of --jwt-hs256-secret, --jwt-hs256-secret-file and --jwt-rs256-public-key".into(),
            ));
        }
        if let Some(s) = &self.jwt_hs256_secret {
            return Ok((
                JwtKey::Hs256(s.as_bytes().to_vec()),
                "HS256, secret from --jwt-hs256-secret / TEKTREE_JWT_HS256_SECRET".into(),
            ));
        }
        if let Some(p) = &self.jwt_hs256_secret_file {
            return Ok((
                JwtKey::Hs256(read_secret_file(p)?),
                format!("HS256, secret file {}", p.display()),
            ));
        }
        if let Some(p) = &self.jwt_rs256_public_key {
            let pem = std::fs::read(p).map_err(|e| ConfigError::KeyFile {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            return Ok((
                JwtKey::Rs256 { public_pem: pem },
                format!("RS256, public key {}", p.display()),
            ));
        }
        let path = default_secret_file(store_url)?;
        let (secret, created) = load_or_create_secret_file(&path)?;
        let how = if created { "created" } else { "existing" };
        Ok((
            JwtKey::Hs256(secret),
            format!("HS256, secret file {} ({how})", path.display()),
        ))
    }

    /// The authenticator for these options and a description of its key (see
    /// [`jwt_key`](Self::jwt_key)).
    ///
    /// # Errors
    /// As [`jwt_key`](Self::jwt_key); [`ConfigError::Jwt`] for a short secret or a bad PEM.
    pub fn authenticator(&self, store_url: &str) -> Result<(Authenticator, String), ConfigError> {
        let (key, source) = self.jwt_key(store_url)?;
        let auth = Authenticator::new(AuthConfig {
            key,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway_secs: self.jwt_leeway_secs,
        })
        .map_err(|e| ConfigError::Jwt(format!("{e} ({source})")))?;
        Ok((auth, source))
    }

    /// The rate limiter: issue #4's limits in memory (`memory`), shared through Redis
    /// (`redis://…`, connected and pinged now), or none (`off`).
    ///
    /// # Errors
    /// [`ConfigError::RateLimit`].
    pub async fn rate_limiter(&self) -> Result<RateLimiter, ConfigError> {
        match self.rate_limit.as_str() {
            "memory" => Ok(RateLimiter::in_memory(RateLimits::default())),
            "off" => Ok(RateLimiter::disabled()),
            url => Ok(RateLimiter::new(
                RateLimits::default(),
                Arc::new(RedisBackend::connect(url).await?),
                Arc::new(SystemClock),
            )),
        }
    }

    /// Everything: authenticator, rate limiter and CORS allow-list, plus the key's description.
    ///
    /// # Errors
    /// As [`authenticator`](Self::authenticator) and [`rate_limiter`](Self::rate_limiter);
    /// [`ConfigError::Cors`].
    pub async fn security(&self, store_url: &str) -> Result<(Security, String), ConfigError> {
        let cors = CorsOrigins::parse(&self.cors_origins)?;
        let (auth, source) = self.authenticator(store_url)?;
        let rate_limiter = self.rate_limiter().await?;
        Ok((
            Security {
                auth,
                rate_limiter,
                cors,
            },
            source,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(
            redact_url("mongodb://u:p@a:1,b:2/db?replicaSet=rs0"),
            "mongodb://***@a:1,b:2/db?replicaSet=rs0"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("memory"), "memory");
    }

    #[test]
    fn the_default_secret_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite://{}", dir.path().join("sub/t.db").display());
        let path = default_secret_file(&store).unwrap();
        assert_eq!(path, dir.path().join("sub/t.jwt-secret"));
        let (a, created) = load_or_create_secret_file(&path).unwrap();
        assert!(created);
        assert!(a.len() >= 32);
        let (b, created) = load_or_create_secret_file(&path).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
        assert!(default_secret_file("mongodb://h/?replicaSet=rs0").is_err());
    }

    #[test]
    fn security_options_refuse_two_keys_and_short_secrets_and_hide_the_secret() {
        let secret = "0123456789abcdef0123456789abcdef-extra";
        let o = SecurityOptions {
            jwt_hs256_secret: Some(secret.into()),
            jwt_rs256_public_key: Some("k.pem".into()),
            ..SecurityOptions::default()
        };
        assert!(matches!(
            o.jwt_key("sqlite://x.db"),
            Err(ConfigError::Jwt(_))
        ));
        assert!(!format!("{o:?}").contains(secret));
        let o = SecurityOptions {
            jwt_hs256_secret: Some("short".into()),
            ..SecurityOptions::default()
        };
        let e = o.authenticator("sqlite://x.db").unwrap_err();
        assert!(matches!(e, ConfigError::Jwt(_)), "{e}");
        assert!(!e.to_string().contains("short"), "{e}");
    }

    #[test]
    fn parses_store_urls() {
        assert_eq!(
            StoreUrl::parse("sqlite://a/b.db").unwrap(),
            StoreUrl::Sqlite("a/b.db".into())
        );
        assert_eq!(
            StoreUrl::parse("sqlite:x.db").unwrap(),
            StoreUrl::Sqlite("x.db".into())
        );
        assert!(StoreUrl::parse("postgres://x").is_err());
        assert_eq!(
            StoreUrl::parse("mongodb://h:27017/prod?replicaSet=rs0").unwrap(),
            StoreUrl::Mongo {
                uri: "mongodb://h:27017/prod?replicaSet=rs0".into(),
                db: "prod".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("mongodb://h/?replicaSet=rs0").unwrap(),
            StoreUrl::Mongo {
                uri: "mongodb://h/?replicaSet=rs0".into(),
                db: "tektree".into()
            }
        );
        assert!(StoreUrl::parse("mongodb:///db").is_err());
        assert!(StoreUrl::parse("sqlite://").is_err());
    }

    #[test]
    fn rules_file_overrides_some_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rules.toml");
        std::fs::write(&p, "[xp]\nupvoted = 7\n[quota]\nfree = 3\n").unwrap();
        let r = load_rules(Some(&p)).unwrap();
        assert_eq!(
            (r.xp.upvoted, r.xp.downvoted, r.quota.free),
            (7, -2, Some(3))
        );
        std::fs::write(&p, "[xp]\nupvote = 7\n").unwrap();
        assert!(load_rules(Some(&p)).is_err());
    }
}
