//! # tektree-http
//!
//! The building blocks of TekTree's HTTP edge that the API's resources, billing and live
//! updates all stand on, with no routes of their own: errors as `application/problem+json`
//! ([`problem`]), bearer tokens and roles ([`auth`], [`identity`]), the command guard with body
//! limit and rate limits ([`security`], [`ratelimit`]), CORS ([`cors`]), correlation ids
//! ([`correlation`]), `Idempotency-Key` ([`idempotency`]), read-your-writes ([`fresh`]), extractors whose rejections are
//! problems ([`extract`]), leaderboard names ([`board`]) and the one way a request runs a
//! command ([`command`]). The router that assembles them is `tektree_services::api`.

#![deny(missing_docs)]

pub mod auth;
pub mod board;
pub mod command;
pub mod correlation;
pub mod cors;
pub mod extract;
pub mod fresh;
pub mod idempotency;
pub mod identity;
pub mod problem;
pub mod ratelimit;
pub mod security;

/// Largest accepted request body: 64 KiB. Larger bodies are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;
