//! # tektree-services
//!
//! The `tektree` binary (src/main.rs, a thin CLI) and what assembles it: the HTTP API's
//! resources, state and router ([`api`]) and the configuration ([`config`]). The parts live in
//! crates of their own, re-exported here under their module names: the runtime
//! (`tektree-runtime`: [`app`], [`consumer`], [`worker`], [`replay`], [`restore`], [`export`]),
//! the HTTP building blocks (`tektree-http`, under [`api`]), Polar billing (`tektree-billing`,
//! [`billing`]), live updates (`tektree-live`, [`live`]) and the Stack Exchange importer
//! (`tektree-import`, [`import`]).

#![deny(missing_docs)]

pub mod api;
pub mod config;

pub use tektree_billing as billing;
pub use tektree_import as import;
pub use tektree_live as live;
pub use tektree_runtime::{app, consumer, export, replay, restore, worker};
