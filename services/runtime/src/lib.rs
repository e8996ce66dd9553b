//! # tektree-runtime
//!
//! The runtime of TekTree Core, without HTTP: [`app::App`] wires the ports (event store, read
//! models, bus, command handler) to the adapters named by URL; the [`relay`]
//! (from `tektree-outbox`) and the [`worker`] run side by side, the worker running every
//! [`consumer::Consumer`] (projections, policies, and any added with
//! [`app::App::with_consumer`]); [`replay`] rebuilds read models and reads history; [`export`]
//! writes read models; [`restore`] backs up and restores a SQLite store. The HTTP API, billing,
//! live updates and the importer (crates `tektree-http`, `tektree-billing`, `tektree-live`,
//! `tektree-import`, assembled by `tektree-services`) and the operators' CLI (`tektree-replay`)
//! build on it.

#![deny(missing_docs)]

pub mod app;
pub mod config;
pub mod consumer;
pub mod export;
pub mod progress;
pub mod replay;
pub mod restore;
pub mod worker;

/// The outbox relay, beside the [`worker`] (it lives with the bus adapters it publishes to).
pub use tektree_outbox::relay;
