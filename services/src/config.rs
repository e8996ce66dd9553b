//! Store URLs and the rules file.

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

/// Errors in configuration.
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
    toml::from_str(&text).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
