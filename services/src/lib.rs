//! # tektree-services
//!
//! Wiring of the ports to their adapters ([`app::App`]), the consumer runtime for projections
//! and policies ([`worker`]), the HTTP API ([`api`]), the Stack Exchange importer ([`import`])
//! and read-model export ([`export`]). The `tektree` binary (src/main.rs) is a thin CLI over
//! these.

pub mod api;
pub mod app;
pub mod billing;
pub mod config;
pub mod consumer;
pub mod export;
pub mod import;
pub mod live;
pub mod replay;
pub mod restore;
pub mod worker;
