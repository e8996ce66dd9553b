//! # tektree-services
//!
//! The edges of TekTree Core over the runtime (crate `tektree-runtime`, re-exported here as
//! [`app`], [`consumer`], [`worker`], [`replay`], [`restore`] and [`export`]): the HTTP API
//! ([`api`]) with its security, billing ([`billing`]) and live updates ([`live`]), the Stack
//! Exchange importer ([`import`]), and the API's configuration ([`config`]). The `tektree`
//! binary (src/main.rs) is a thin CLI over these.

pub mod api;
pub mod billing;
pub mod config;
pub mod import;
pub mod live;

pub use tektree_runtime::{app, consumer, export, replay, restore, worker};
