//! The store of a run: a SQLite file in the run's directory, or a MongoDB database — on a
//! SecantusDB server the harness starts with persistence (and SIGKILLs and restarts as a fault,
//! `faults::FaultKind::StoreRestart`), or on a server named by a `mongodb://` URI (no server
//! faults then). What the checks read outside the ports lives here, per backend: the consumer
//! guards, and the copy of the store that the rebuild check rebuilds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use tektree_event_store::mongo::{EVENTS, POSITION_LOG};
use tektree_outbox::test_support::{mongo_uri_with_database as with_database, MongoServer};
use tektree_services::config::StoreUrl;
use uuid::Uuid;

/// Which store a run uses (`--store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `sqlite`: a SQLite file in the run's directory.
    Sqlite,
    /// `mongodb`: a SecantusDB server started by the harness on a free port, with its data in
    /// the run's directory (and server kills among the faults).
    MongoManaged,
    /// `mongodb://…`: a database on that server (one per run, left on the server).
    MongoAt(String),
}

impl StoreSpec {
    /// Its name in the summary.
    pub fn name(&self) -> &'static str {
        match self {
            StoreSpec::Sqlite => "sqlite",
            StoreSpec::MongoManaged | StoreSpec::MongoAt(_) => "mongodb",
        }
    }
}

/// Parses `--store`: `sqlite`, `mongodb` or a `mongodb://` / `mongodb+srv://` URI.
pub fn parse_store(s: &str) -> Result<StoreSpec, String> {
    match s.trim() {
        "sqlite" => Ok(StoreSpec::Sqlite),
        "mongodb" => Ok(StoreSpec::MongoManaged),
        uri if uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://") => {
            Ok(StoreSpec::MongoAt(uri.to_string()))
        }
        other => Err(format!(
            "invalid store {other:?}: expected sqlite, mongodb (a SecantusDB server started by the harness) or a mongodb:// URI"
        )),
    }
}

/// The store of one run.
#[derive(Debug, Clone)]
pub enum RunStore {
    /// The SQLite file.
    Sqlite(PathBuf),
    /// A MongoDB database: connection string (without a database) and database name.
    Mongo {
        /// Connection string of the server.
        uri: String,
        /// Database of this run.
        db: String,
    },
}

impl RunStore {
    /// The store of a run in `dir` (`tag` names the run: bus and seed). Starts the MongoDB
    /// server for [`StoreSpec::MongoManaged`] and returns it.
    pub fn prepare(
        spec: &StoreSpec,
        dir: &Path,
        tag: &str,
    ) -> Result<(RunStore, Option<MongoServer>)> {
        Ok(match spec {
            StoreSpec::Sqlite => (RunStore::Sqlite(dir.join("store.db")), None),
            StoreSpec::MongoManaged => {
                let server = MongoServer::start_persistent(dir.join("mongodb-data"))?;
                let store = RunStore::Mongo {
                    uri: server.url.clone(),
                    db: format!("faults_{tag}"),
                };
                (store, Some(server))
            }
            StoreSpec::MongoAt(uri) => match StoreUrl::parse(uri)? {
                StoreUrl::Mongo { uri, .. } => (
                    RunStore::Mongo {
                        uri,
                        db: format!("faults_{tag}_{}", std::process::id()),
                    },
                    None,
                ),
                StoreUrl::Sqlite(_) => bail!("{uri} is not a MongoDB URI"),
            },
        })
    }

    /// The `--store` URL of the `tektree` processes.
    pub fn url(&self) -> String {
        match self {
            RunStore::Sqlite(path) => format!("sqlite://{}", path.display()),
            RunStore::Mongo { uri, db } => with_database(uri, db),
        }
    }

    /// Every consumer guard: (consumer, aggregate type, aggregate id) → last applied sequence.
    pub async fn guards(&self) -> Result<HashMap<(String, String, Uuid), u64>> {
        match self {
            RunStore::Sqlite(path) => crate::check::guards(path),
            RunStore::Mongo { uri, db } => mongo_guards(uri, db).await,
        }
    }

    /// Copies what a rebuild reads (events and positions) to a new store in `dir` (SQLite) or
    /// a new database (MongoDB) and returns the copy's URL. Call it after every process
    /// stopped.
    pub async fn copy_for_rebuild(&self, dir: &Path) -> Result<String> {
        match self {
            RunStore::Sqlite(path) => {
                let copy = dir.join("rebuild.db");
                crate::check::copy_sqlite(path, &copy)?;
                Ok(format!("sqlite://{}", copy.display()))
            }
            RunStore::Mongo { uri, db } => {
                let copy = format!("{db}_rebuild");
                copy_mongo(uri, db, &copy).await?;
                Ok(with_database(uri, &copy))
            }
        }
    }
}

async fn client(uri: &str) -> Result<mongodb::Client> {
    let mut options = mongodb::options::ClientOptions::parse(uri)
        .await
        .with_context(|| format!("parsing {uri}"))?;
    options.server_selection_timeout = Some(Duration::from_secs(60));
    mongodb::Client::with_options(options).context("MongoDB client")
}

/// The `consumer_guard` documents of database `db` (layout: `tektree_projections::mongo`).
async fn mongo_guards(uri: &str, db: &str) -> Result<HashMap<(String, String, Uuid), u64>> {
    let client = client(uri).await?;
    let docs: Vec<Document> = client
        .database(db)
        .collection::<Document>("consumer_guard")
        .find(doc! {})
        .await
        .context("reading consumer_guard")?
        .try_collect()
        .await
        .context("reading consumer_guard")?;
    let mut out = HashMap::new();
    for d in docs {
        let id = match d.get("aggregate_id") {
            Some(Bson::Binary(b)) => Uuid::from_slice(&b.bytes).context("guard aggregate_id")?,
            other => bail!("guard aggregate_id is not a UUID: {other:?}"),
        };
        let last = d.get_i64("last_sequence").context("guard last_sequence")?;
        out.insert(
            (
                d.get_str("consumer").context("guard consumer")?.to_string(),
                d.get_str("aggregate_type")
                    .context("guard aggregate_type")?
                    .to_string(),
                id,
            ),
            u64::try_from(last).unwrap_or(0),
        );
    }
    Ok(out)
}

/// Copies the events and the position log of database `from` to a new database `to` (dropped
/// first), 1,000 documents per insert.
async fn copy_mongo(uri: &str, from: &str, to: &str) -> Result<()> {
    let client = client(uri).await?;
    let target = client.database(to);
    target
        .drop()
        .await
        .with_context(|| format!("dropping {to}"))?;
    for name in [EVENTS, POSITION_LOG] {
        let mut cursor = client
            .database(from)
            .collection::<Document>(name)
            .find(doc! {})
            .await
            .with_context(|| format!("reading {from}.{name}"))?;
        let dst = target.collection::<Document>(name);
        let mut chunk = Vec::with_capacity(1000);
        while let Some(d) = cursor.try_next().await.context("reading")? {
            chunk.push(d);
            if chunk.len() == 1000 {
                dst.insert_many(std::mem::take(&mut chunk))
                    .await
                    .with_context(|| format!("writing {to}.{name}"))?;
            }
        }
        if !chunk.is_empty() {
            dst.insert_many(chunk)
                .await
                .with_context(|| format!("writing {to}.{name}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_choices_parse() {
        assert_eq!(parse_store("sqlite"), Ok(StoreSpec::Sqlite));
        assert_eq!(parse_store("mongodb"), Ok(StoreSpec::MongoManaged));
        assert_eq!(
            parse_store("mongodb://127.0.0.1:27017/?replicaSet=rs0"),
            Ok(StoreSpec::MongoAt(
                "mongodb://127.0.0.1:27017/?replicaSet=rs0".into()
            ))
        );
        assert!(parse_store("postgres://x").is_err());
        assert!(parse_store("").is_err());
    }
}
