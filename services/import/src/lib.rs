//! Stack Exchange importer (issue #2 §7): `tektree import stackexchange DIR [--site NAME]`.
//!
//! Sends a Stack Exchange data dump (Users.xml, Posts.xml, Comments.xml, Votes.xml) through the
//! same command handling as the HTTP API — never writing events directly — so that the
//! policies and projections see an imported site exactly as if it had happened live.
//!
//! - [`reader`]: streams `<row>` elements of one file in constant memory (quick-xml), with
//!   file:line:column errors.
//! - [`ids`]: deterministic UUIDv5 ids, `stackexchange:{site}:{user|post|comment|vote}:{Id}`.
//! - [`plan`]: the phases (users → questions → answers → comments → up/down votes → accepts)
//!   and what each row becomes.
//! - [`run`]: [`import_stackexchange`] (commands only) and [`run_import_cli`] (with the
//!   in-process pipeline when the bus is in-process).
//! - [`report`]: [`ImportReport`], counts per command kind.
//!
//! See `docs/import.md` for the mapping, what is skipped or rejected and why, and idempotency.

#![deny(missing_docs)]

use std::path::PathBuf;

pub mod ids;
pub mod plan;
pub mod reader;
pub mod report;
pub mod run;

pub use report::{CommandKind, ImportReport, KindReport};
pub use run::{
    default_site, import_stackexchange, import_with_pipeline_running, run_import_cli, ImportOptions,
};

/// Why an import stopped. Rejected commands are not errors (they are counted in the
/// [`ImportReport`]); these are problems with the input or the machinery.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A dump file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A dump file is not well-formed XML, is truncated, or a row lacks a required attribute or
    /// has a malformed one. Displayed as `PATH:LINE:COLUMN: reason`.
    #[error("{}:{line}:{column}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending row or syntax error.
        line: u64,
        /// 1-based column (in characters) where the offending row or markup starts.
        column: u64,
        /// What is wrong.
        reason: String,
    },
    /// A dump file changed between the check pass and the phase that reads it again (it is
    /// being written or replaced); nothing of that phase was sent. Run the import again once
    /// the file is complete.
    #[error("{}: the file changed since it was checked; re-run the import", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The site name is empty or contains `:` or whitespace (it is part of every id).
    #[error("invalid site name {0:?}: must be non-empty, without ':' or whitespace")]
    InvalidSite(String),
    /// An internal task failed (panicked or was cancelled).
    #[error("import task failed: {0}")]
    Internal(String),
    /// Seeding the in-process bus, or waiting for the in-process pipeline to apply the
    /// imported events ([`App::settle`](tektree_runtime::app::App::settle)), failed.
    #[error("in-process pipeline: {0}")]
    Pipeline(#[from] tektree_runtime::app::AppError),
}
