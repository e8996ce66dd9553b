//! Backup and restore of a SQLite store (issue #12 §2), with SQLite's online backup API.
//!
//! A backup is a copy of the whole database file — events, outbox, identity, idempotency
//! records, snapshots, and the read models and consumer checkpoints that live in the same file
//! (`tektree-projections`' SQLite adapter) — taken in one step under one read transaction, so it
//! is one point in time, while other processes go on writing (WAL mode).
//!
//! A restore puts a backup in place of the store and **raises the epoch** above the store's,
//! the backup's and any epoch the caller names (the bus's), so that a bus that carried the
//! store's later history knows its events are not this store's any more (see
//! `tektree_outbox::binding`). The copy is prepared beside the store (epoch raised there) and
//! then written into the store in one step, so a crash leaves either the old store or the
//! restored one. Every process using the store must be stopped first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::StoreIdentity;

/// Why a backup or a restore did not happen. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// There is no file to copy.
    #[error("{0}: no such file")]
    Missing(PathBuf),
    /// The target exists already; backups are never overwritten.
    #[error("{0} exists already; a backup is never overwritten (choose a new path)")]
    Exists(PathBuf),
    /// The file is not a TekTree store (no store identity).
    #[error("{path} is not a TekTree store: {reason}")]
    NotAStore {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        reason: String,
    },
    /// `PRAGMA quick_check` found damage in the backup.
    #[error("{path} is damaged (SQLite quick_check: {report}); nothing was restored")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The check's first lines.
        report: String,
    },
    /// The backup belongs to another store than the one at the target path.
    #[error(
        "{backup_path} is a backup of {backup}, but the store at {store_path} is {store}: a \
         restore never replaces one store by another (delete that store first if that is what \
         you want)"
    )]
    OtherStore {
        /// The backup file.
        backup_path: PathBuf,
        /// Its identity.
        backup: StoreIdentity,
        /// The store file.
        store_path: PathBuf,
        /// Its identity.
        store: StoreIdentity,
    },
    /// SQLite failed.
    #[error("{what}: {source}")]
    Sqlite {
        /// What was being done.
        what: String,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

/// What a backup wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupReport {
    /// The store's identity (kept by the copy).
    pub identity: StoreIdentity,
    /// The highest position in the copy (0 when empty).
    pub head: u64,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    /// The identity of the store that was replaced (`None` when there was none).
    pub replaced: Option<StoreIdentity>,
    /// The identity recorded in the backup.
    pub backup: StoreIdentity,
    /// The store's identity now: the backup's `store_id` with the raised epoch.
    pub restored: StoreIdentity,
    /// The highest position of the restored store.
    pub head: u64,
}

fn sqlite(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Sqlite { what, source }
}

/// Copies the store at `store` to the new file `dest` in one step (consistent while other
/// processes write); `dest` must not exist.
///
/// # Errors
/// [`BackupError::Missing`], [`BackupError::Exists`], [`BackupError::NotAStore`],
/// [`BackupError::Sqlite`] (a partly written `dest` is removed).
pub fn backup(store: &Path, dest: &Path) -> Result<BackupReport, BackupError> {
    if !store.exists() {
        return Err(BackupError::Missing(store.to_path_buf()));
    }
    if dest.exists() {
        return Err(BackupError::Exists(dest.to_path_buf()));
    }
    let src = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite(format!("open {}", store.display())))?;
    src.busy_timeout(Duration::from_secs(10))
        .map_err(sqlite("busy timeout"))?;
    identity_and_head(&src, store)?;
    let written = Connection::open(dest)
        .map_err(sqlite(format!("create {}", dest.display())))
        .and_then(|mut dst| {
            copy(&src, &mut dst)?;
            identity_and_head(&dst, dest)
        });
    match written {
        Ok((identity, head)) => Ok(BackupReport { identity, head }),
        Err(e) => {
            let _ = std::fs::remove_file(dest);
            Err(e)
        }
    }
}

/// Replaces the store at `store` (created if missing) by the backup at `from`, with its epoch
/// raised to one more than the greatest of the store's, the backup's and `above`.
///
/// # Errors
/// [`BackupError`]; the store is unchanged unless the final one-step copy succeeded.
pub fn restore(from: &Path, store: &Path, above: u64) -> Result<RestoreReport, BackupError> {
    if !from.exists() {
        return Err(BackupError::Missing(from.to_path_buf()));
    }
    let src = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite(format!("open {}", from.display())))?;
    let report: String = src
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| BackupError::NotAStore {
            path: from.to_path_buf(),
            reason: e.to_string(),
        })?;
    if report != "ok" {
        return Err(BackupError::Damaged {
            path: from.to_path_buf(),
            report,
        });
    }
    let (backup, _) = identity_and_head(&src, from)?;
    let replaced = if store.exists() {
        let conn = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(sqlite(format!("open {}", store.display())))?;
        Some(identity_and_head(&conn, store)?.0)
    } else {
        None
    };
    if let Some(current) = replaced.filter(|c| c.store_id != backup.store_id) {
        return Err(BackupError::OtherStore {
            backup_path: from.to_path_buf(),
            backup,
            store_path: store.to_path_buf(),
            store: current,
        });
    }
    let epoch = backup.epoch.max(replaced.map_or(0, |c| c.epoch)).max(above) + 1;
    // Prepared beside the store, epoch raised there, then copied in one step.
    let staging = staging_path(store);
    let _ = std::fs::remove_file(&staging);
    let result = (|| {
        let mut prepared =
            Connection::open(&staging).map_err(sqlite(format!("create {}", staging.display())))?;
        copy(&src, &mut prepared)?;
        prepared
            .execute(
                "UPDATE store_identity SET epoch = ?1 WHERE id = 1",
                [i64::try_from(epoch).unwrap_or(i64::MAX)],
            )
            .map_err(sqlite("raise the epoch"))?;
        let mut dst =
            Connection::open(store).map_err(sqlite(format!("open {}", store.display())))?;
        dst.busy_timeout(Duration::from_secs(10))
            .map_err(sqlite("busy timeout"))?;
        copy(&prepared, &mut dst)?;
        identity_and_head(&dst, store)
    })();
    let _ = std::fs::remove_file(&staging);
    let (restored, head) = result?;
    Ok(RestoreReport {
        replaced,
        backup,
        restored,
        head,
    })
}

/// `<store>.restoring`, beside the store.
fn staging_path(store: &Path) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(".restoring");
    store.with_file_name(name)
}

/// Copies every page of `src` into `dst` in one backup step (one read transaction on `src`,
/// one write transaction on `dst`), retrying while either is locked.
fn copy(src: &Connection, dst: &mut Connection) -> Result<(), BackupError> {
    let backup = Backup::new(src, dst).map_err(sqlite("start the backup"))?;
    let mut pause = Duration::from_millis(5);
    for _ in 0..200 {
        match backup.step(-1).map_err(sqlite("copy the pages"))? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            _ => std::thread::sleep(pause),
        }
    }
    Err(BackupError::Sqlite {
        what: "copy the pages".into(),
        source: rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("the database stayed locked for about 20 s".into()),
        ),
    })
}

/// The store identity and highest position of the database on `conn`.
fn identity_and_head(conn: &Connection, path: &Path) -> Result<(StoreIdentity, u64), BackupError> {
    let not_a_store = |e: rusqlite::Error| BackupError::NotAStore {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let identity = super::read_identity(conn).map_err(|e| BackupError::NotAStore {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let head: i64 = conn
        .query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
            r.get(0)
        })
        .map_err(not_a_store)?;
    Ok((identity, u64::try_from(head).unwrap_or(0)))
}
