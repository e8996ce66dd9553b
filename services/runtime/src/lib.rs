//! # tektree-runtime
//!
//! The runtime of TekTree Core, without HTTP: [`app::App`] wires the ports (event store, read
//! models, bus, command handler) to the adapters named by URL; the relay
//! ([`tektree_outbox::relay`]) and the [`worker`] run side by side, the worker running every
//! [`consumer::Consumer`] (projections, policies, and any added with
//! [`app::App::with_consumer`]); [`replay`] rebuilds read models and reads history; [`export`]
//! writes read models; [`restore`] backs up and restores a SQLite store. The HTTP API, billing,
//! live updates and the importer (crate `tektree-services`) and the operators' CLI
//! (`tektree-replay`) build on it.

pub mod app;
pub mod config;
pub mod consumer;
pub mod export;
pub mod replay;
pub mod restore;
pub mod worker;
