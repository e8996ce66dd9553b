//! # tektree-commands
//!
//! Command handling for every aggregate ([`CommandHandler`]) and the policies (process managers)
//! that turn events into further commands ([`policies`]).
//!
//! A command runs as: load the aggregate's events → fold them (`Aggregate::apply`) → decide
//! (`Aggregate::handle`) → append the new events and their outbox records in one transaction with
//! `expected_version` = the loaded version. When another writer appended first the store reports
//! a conflict and the whole cycle is retried, at most [`CommandHandler::max_attempts`] times
//! (default 5, issue #2 §1), then [`CommandError::Conflict`] is returned (HTTP 409).
//!
//! Loads start from the in-memory state cache or, on a miss, from the aggregate's stored
//! snapshot when it has the aggregate's current `SNAPSHOT_VERSION` (issue #6); a command whose
//! new version crosses a multiple of [`CommandHandler::with_snapshot_interval`] (default
//! [`DEFAULT_SNAPSHOT_INTERVAL`]) saves a new snapshot after its commit, best effort. See
//! [`LoadSource`] and the `Snapshots` section of `docs/architecture.md`.

#![deny(missing_docs)]

mod cache;
mod error;
mod handler;
pub mod policies;
mod services;
pub mod submit;

pub use error::CommandError;
pub use handler::{
    CommandHandler, CommandMeta, LoadSource, Outcome, SnapshotCounts, DEFAULT_SNAPSHOT_INTERVAL,
};
pub use services::StoreServices;
pub use submit::{Metered, Metering, QuotaExceeded};
