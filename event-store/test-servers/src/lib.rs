//! Real servers for tests, started by the tests themselves on free loopback ports.
//!
//! - [`MongoServer`]: SecantusDB (`secantusd-py`), or the deployment named by `MONGODB_URI`.
//! - [`process`]: the plumbing every test server shares (start on a free port, stop with
//!   SIGKILL or SIGTERM, restart on the same port and data); `tektree_outbox::test_support`
//!   builds its Redis and NATS servers on it.
//!
//! A suite that finds no server fails with a message saying how to install one; it never
//! passes by skipping.

mod mongo;
pub mod process;

pub use mongo::{
    with_database as mongo_uri_with_database, MongoServer, MONGODB_URI_ENV, SECANTUSD_ENV,
    SECANTUS_REPLICA_SET,
};
pub use process::{restartable_port, ServerError, Stop};
