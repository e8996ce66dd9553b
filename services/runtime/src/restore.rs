//! `tektree backup PATH` and `tektree restore [--from PATH]` (issue #12 §2;
//! docs/operations.md "Backup and restore").
//!
//! A restore sets the store back to an older point. Afterwards the bus, the relay and every
//! consumer checkpoint must agree again without an operator editing anything:
//! 1. the store's epoch is raised above its own, the backup's and the bus's
//!    ([`EventLog::raise_epoch`]);
//! 2. the store and the bus are opened ([`App::open`]): the bus, bound to an earlier epoch, is
//!    emptied and bound to the new one (`tektree_outbox::binding`), so no position is ever on
//!    the bus for two different events; the relay of the next process finds the bus behind the
//!    store and republishes what the consumers have not applied (`tektree_outbox::recovery`);
//! 3. read models that have seen more events than the restored store holds (their checkpoint
//!    or their count of applied events above its head: they were not restored with it) are
//!    rebuilt from the store when they are projections, and refused with the way out when they
//!    are policies (whose state cannot be rebuilt without running their commands again).
//!
//! SQLite: the backup is one file, copied with SQLite's online backup API
//! ([`tektree_event_store::sqlite_backup`]), read models included. MongoDB: backups are taken
//! with `mongodump` or a storage snapshot and put back with `mongorestore` (docs/operations.md);
//! `tektree restore` without `--from` then does steps 1–3 on the restored database.

use std::path::{Path, PathBuf};

use tektree_domain::Rules;
use tektree_event_store::mongo::MongoStore;
use tektree_event_store::sqlite_backup::{self, BackupError, BackupReport};
use tektree_event_store::{EventLog, SqliteStore, StoreError, StoreIdentity};
use tektree_outbox::{open_bus, BusError};
use tektree_projections::Projection;

use crate::app::{App, AppError};
use crate::config::{ConfigError, StoreUrl};
use crate::replay::{rebuild, ReplayError};

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Bad store URL.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SQLite backup or restore failed; nothing was changed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed (a restore reads its binding to choose the new epoch).
    #[error("reading the bus's store binding (the new epoch must be above it): {0}")]
    Bus(#[from] BusError),
    /// Opening the restored store with its bus failed.
    #[error(transparent)]
    App(#[from] AppError),
    /// Rebuilding a read model failed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// MongoDB stores are backed up and put back with MongoDB's tools.
    #[error(
        "a MongoDB store is {0} with MongoDB's tools (mongodump / mongorestore, or a storage \
         snapshot), not by tektree; after putting a dump back, run `tektree --store <uri> \
         restore` without --from. See docs/operations.md#backup-and-restore"
    )]
    MongoTools(&'static str),
    /// No store at the path to raise the epoch of.
    #[error("{0}: no such store")]
    NoStore(PathBuf),
    /// Policies have seen events the restored store does not hold.
    #[error(
        "the store was restored (now {restored}, head {head}), but the policies {policies:?} \
         have applied more than it holds: their state was not restored with it. Put back the \
         read-model collections/tables from the same backup as the events (docs/operations.md) \
         and run `tektree restore` again"
    )]
    PoliciesAhead {
        /// The restored identity.
        restored: StoreIdentity,
        /// The restored head.
        head: u64,
        /// The policies ahead.
        policies: Vec<String>,
    },
}

/// `tektree backup PATH`: copies the SQLite store named by `store_url` to the new file `dest`.
///
/// # Errors
/// [`RestoreError::MongoTools`] for a MongoDB store; [`RestoreError::Backup`].
pub async fn backup(store_url: &str, dest: &Path) -> Result<BackupReport, RestoreError> {
    match StoreUrl::parse(store_url)? {
        StoreUrl::Sqlite(path) => {
            let dest = dest.to_path_buf();
            Ok(
                tokio::task::spawn_blocking(move || sqlite_backup::backup(&path, &dest))
                    .await
                    .map_err(|e| StoreError::Backend(format!("backup task: {e}")))??,
            )
        }
        StoreUrl::Mongo { .. } => Err(RestoreError::MongoTools("backed up")),
    }
}

/// What `tektree restore` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The identity of the store before (`None` when the store file did not exist).
    pub replaced: Option<StoreIdentity>,
    /// The store's identity now (epoch raised).
    pub restored: StoreIdentity,
    /// The restored store's highest position.
    pub head: u64,
    /// The projections rebuilt because they had seen more than the restored store holds.
    pub rebuilt: Vec<String>,
}

/// `tektree restore [--from PATH]` (see the [module docs](self)): puts the SQLite backup
/// `from` in place of the store (or, without `from`, marks a store put back by other means as
/// restored), raises its epoch above the bus's, empties the bus and rebuilds read models that
/// are ahead of the store. Stop every process using the store first.
///
/// # Errors
/// [`RestoreError`]; a failure before the copy changes nothing.
pub async fn restore(
    store_url: &str,
    bus_url: &str,
    from: Option<&Path>,
    rules: Rules,
) -> Result<Restored, RestoreError> {
    let above = if bus_url == "memory" {
        0
    } else {
        open_bus(bus_url)
            .await?
            .bound_store()
            .await?
            .map_or(0, |b| b.epoch)
    };
    let (replaced, restored) = match (StoreUrl::parse(store_url)?, from) {
        (StoreUrl::Sqlite(path), Some(from)) => {
            let from = from.to_path_buf();
            let report =
                tokio::task::spawn_blocking(move || sqlite_backup::restore(&from, &path, above))
                    .await
                    .map_err(|e| StoreError::Backend(format!("restore task: {e}")))??;
            (report.replaced, report.restored)
        }
        (StoreUrl::Sqlite(path), None) => {
            if !path.exists() {
                return Err(RestoreError::NoStore(path));
            }
            let store = SqliteStore::open(&path)?;
            let before = store.identity().await?;
            (Some(before), store.raise_epoch(above).await?)
        }
        (StoreUrl::Mongo { .. }, Some(_)) => return Err(RestoreError::MongoTools("restored")),
        (StoreUrl::Mongo { uri, db }, None) => {
            let store = MongoStore::connect(&uri, &db).await?;
            let before = store.identity().await?;
            (Some(before), store.raise_epoch(above).await?)
        }
    };
    tracing::warn!(?replaced, %restored, "store restored; its epoch is raised");
    // Binding empties a bus bound to an earlier epoch.
    let app = App::open(store_url, bus_url, rules).await?;
    let head = app.store.last_position().await?;
    let mut rebuilt = Vec::new();
    let mut policies = Vec::new();
    for c in app
        .read_models
        .checkpoints()
        .await
        .map_err(AppError::from)?
    {
        if c.checkpoint <= head && c.applied <= head {
            continue;
        }
        if let Some(projection) = Projection::from_name(&c.name) {
            tracing::warn!(projection = %c.name, checkpoint = c.checkpoint, applied = c.applied, head,
                "read model ahead of the restored store; rebuilding it");
            rebuild(
                app.store.as_ref(),
                app.read_models.as_ref(),
                projection,
                |_| {},
            )
            .await?;
            rebuilt.push(c.name);
        } else {
            policies.push(c.name);
        }
    }
    if !policies.is_empty() {
        return Err(RestoreError::PoliciesAhead {
            restored,
            head,
            policies,
        });
    }
    Ok(Restored {
        replaced,
        restored,
        head,
        rebuilt,
    })
}
