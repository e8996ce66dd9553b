//! Real servers for tests, started by the tests themselves on free loopback ports.
//!
//! - [`MongoServer`]: SecantusDB (`secantusd-py`), or the deployment named by `MONGODB_URI`.
//! - [`TestServer`] ([`server`]): one server process of any [`ServerKind`], started on a free
//!   port, stopped with SIGKILL or SIGTERM, restarted on the same port and data;
//!   `tektree_outbox::test_support` adds the Redis and NATS kinds. [`process`]: the plumbing
//!   below it (ports, signals, data directories, finding a program).
//!
//! A suite that finds no server fails with a message saying how to install one; it never
//! passes by skipping.

#![deny(missing_docs)]

mod mongo;
pub mod process;
pub mod server;

pub use mongo::{
    with_database as mongo_uri_with_database, MongoServer, Secantus, MONGODB_URI_ENV,
    SECANTUSD_ENV, SECANTUS_REPLICA_SET,
};
pub use process::{restartable_port, ServerError, Stop};
pub use server::{Launch, ServerKind, TestServer};
