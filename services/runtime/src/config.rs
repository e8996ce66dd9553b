//! Store URLs, the rules file, and the defaults every process shares.

use std::path::{Path, PathBuf};

use tektree_domain::Rules;

/// Default store URL: the embedded SQLite file `tektree.db` in the working directory.
pub const DEFAULT_STORE: &str = "sqlite://tektree.db";
/// Default bus URL: the in-process bus.
pub const DEFAULT_BUS: &str = "memory";

/// A parsed `--store` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH` (or `sqlite:PATH`): events, outbox and read models in one SQLite file.
    Sqlite(PathBuf),
    /// `mongodb://…` or `mongodb+srv://…` (a replica set): events, outbox, checkpoints and read
    /// models in database `db` (the URI's path, default `tektree`).
    Mongo {
        /// The connection string as given.
        uri: String,
        /// Database name.
        db: String,
    },
}

/// Errors in the runtime's configuration: the store URL and the rules file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unsupported store URL.
    #[error("invalid store url {0:?}: expected sqlite://PATH or mongodb://HOST[:PORT]/[DB]?replicaSet=NAME")]
    StoreUrl(String),
    /// The rules file could not be read or parsed.
    #[error("rules file {path}: {reason}")]
    Rules {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl StoreUrl {
    /// Parses `sqlite://PATH`, `sqlite:PATH`, `mongodb://…` or `mongodb+srv://…`.
    ///
    /// # Errors
    /// [`ConfigError::StoreUrl`] for anything else.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        if let Some(rest) = url
            .strip_prefix("mongodb://")
            .or_else(|| url.strip_prefix("mongodb+srv://"))
        {
            let path = rest.split('?').next().unwrap_or("");
            let db = path.split_once('/').map(|(_, d)| d).unwrap_or("");
            if path
                .split_once('/')
                .map(|(h, _)| h)
                .unwrap_or(path)
                .is_empty()
            {
                return Err(ConfigError::StoreUrl(url.into()));
            }
            let db = if db.is_empty() { "tektree" } else { db };
            return Ok(StoreUrl::Mongo {
                uri: url.into(),
                db: db.into(),
            });
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ConfigError::StoreUrl(url.into()))?;
        Ok(StoreUrl::Sqlite(PathBuf::from(path)))
    }
}

/// Loads XP and quota rules from a TOML file with optional `[xp]` and `[quota]` tables (see
/// `docs/config.md`); missing keys keep the issue #2 defaults, unknown keys are errors.
///
/// # Errors
/// [`ConfigError::Rules`] when the file is unreadable or invalid.
pub fn load_rules(path: Option<&Path>) -> Result<Rules, ConfigError> {
    let Some(path) = path else {
        return Ok(Rules::default());
    };
    let err = |reason: String| ConfigError::Rules {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let rules: Rules = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    rules
        .gamification
        .validate()
        .map_err(|e| err(format!("[gamification]: {e}")))?;
    Ok(rules)
}

/// `url` with any user info (`user:password@`) replaced by `***@`, for logs and error
/// messages: `redis://:pw@host:6379/0` → `redis://***@host:6379/0`. Other text is returned
/// unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}{tail}", &authority[at + 1..]),
        None => url.to_string(),
    }
}
