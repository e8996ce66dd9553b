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

mod cache;
mod error;
mod handler;
pub mod policies;
mod services;

pub use error::CommandError;
pub use handler::{CommandHandler, CommandMeta, Outcome};
pub use services::StoreServices;
