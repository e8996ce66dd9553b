//! # tektree-mongo
//!
//! The MongoDB plumbing that the event store (`tektree_event_store::mongo`) and the read models
//! (`tektree_projections::mongo`) share, and nothing of either: connecting to a deployment and
//! checking it ([`connect_client`], [`check_deployment`]), classifying the driver's errors and
//! when to retry them ([`classify`], [`should_retry`]), running a multi-document transaction
//! with those retries ([`run_transaction`]), causal consistency across sessions
//! ([`CausalClock`]), and the value builders both write ([`index_model`], [`uuid_to_bson`]).
//! Knows neither events nor read models.

#![deny(missing_docs)]

mod client;
mod deployment;
mod errors;
mod txn;
mod values;

pub use client::{connect_client, majority, CausalClock, ServerBuild};
pub use deployment::{check_deployment, Deployment, MIN_WIRE_VERSION};
pub use errors::{
    backoff, classify, classify_parts, code, code_and_message, jitter, should_retry, ErrorClass,
    Phase, Retry, CONFLICT_INDEX, DUPLICATE_KEY, MAX_RETRY_TIME, MAX_TIME_MS_EXPIRED,
};
pub use txn::{run_transaction, transaction_options, RunError, TxError, COMMIT_TIME_LIMIT};
pub use values::{index_model, uuid_to_bson};
