//! The client and session setup every MongoDB adapter of the workspace shares: connecting to a
//! replica set ([`connect_client`]) and reading a handle's own writes ([`CausalClock`]).

use std::sync::Mutex;

use mongodb::bson::{doc, Timestamp};
use mongodb::options::{Acknowledgment, ClientOptions, ReadConcern, WriteConcern};
use mongodb::{Client, ClientSession, ClusterTime};

use crate::deployment::{check_deployment, Deployment};
use crate::errors::code;

/// Server error code `CommandNotFound` (a server before 4.4.2 answering `hello`).
const COMMAND_NOT_FOUND: i32 = 59;

/// Majority-acknowledged, journaled writes, waiting at most
/// [`COMMIT_TIME_LIMIT`](crate::txn::COMMIT_TIME_LIMIT) for the majority (`wtimeout`).
pub fn majority() -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .w_timeout(crate::txn::COMMIT_TIME_LIMIT)
        .build()
}

/// Connects to the deployment at `uri` and checks that it supports transactions.
///
/// The client reads with read concern `majority`, writes with write concern
/// (`w: majority, j: true`) and names itself `tektree` unless the URI sets `appName`. The
/// deployment is asked with `hello` (`isMaster` on servers before 4.4.2) and checked with
/// [`check_deployment`].
///
/// # Errors
/// A message naming the failed step (`parse MongoDB URI: …`, `MongoDB client: …`,
/// `MongoDB hello: …`, `MongoDB isMaster: …`) when the URI is invalid or no server is reachable
/// within the server-selection timeout, or [`check_deployment`]'s message for a standalone
/// server.
pub async fn connect_client(uri: &str) -> Result<(Client, Deployment), String> {
    let mut options = ClientOptions::parse(uri)
        .await
        .map_err(|e| format!("parse MongoDB URI: {e}"))?;
    options
        .app_name
        .get_or_insert_with(|| "tektree".to_string());
    options.read_concern = Some(ReadConcern::majority());
    options.write_concern = Some(majority());
    let client = Client::with_options(options).map_err(|e| format!("MongoDB client: {e}"))?;
    let admin = client.database("admin");
    let hello = match admin.run_command(doc! { "hello": 1 }).await {
        Ok(reply) => reply,
        // Servers before 4.4.2 only know the legacy name.
        Err(e) if code(&e) == Some(COMMAND_NOT_FOUND) => admin
            .run_command(doc! { "isMaster": 1 })
            .await
            .map_err(|e| format!("MongoDB isMaster: {e}"))?,
        Err(e) if matches!(*e.kind, mongodb::error::ErrorKind::ServerSelection { .. }) => {
            return Err(format!(
                "MongoDB hello: {e} (no server answered as a usable member of the deployment \
                 in the URI: check the address, and that the replica set is initiated \
                 (rs.initiate()) under the name given in replicaSet=; for a one-node set \
                 started with --replSet, directConnection=true reaches it even before that)"
            ))
        }
        Err(e) => return Err(format!("MongoDB hello: {e}")),
    };
    let deployment = check_deployment(&hello)?;
    Ok((client, deployment))
}

/// The highest cluster and operation time a store handle has seen from its own writes.
///
/// Sessions started with [`CausalClock::session`] are causally consistent and begin at that
/// time, so a handle reads its own writes (also across the driver's pooled sessions); call
/// [`CausalClock::observe`] with every session that wrote.
#[derive(Debug, Default)]
pub struct CausalClock {
    times: Mutex<Times>,
}

#[derive(Debug, Default)]
struct Times {
    cluster: Option<ClusterTime>,
    operation: Option<Timestamp>,
}

impl CausalClock {
    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A causally consistent session on `client` that starts at the latest time observed.
    ///
    /// # Errors
    /// The driver's error when no session can be started.
    pub async fn session(&self, client: &Client) -> mongodb::error::Result<ClientSession> {
        let mut s = client.start_session().causal_consistency(true).await?;
        let times = self.times();
        if let Some(ct) = &times.cluster {
            s.advance_cluster_time(ct);
        }
        if let Some(op) = times.operation {
            s.advance_operation_time(op);
        }
        Ok(s)
    }

    /// Advances the clock to what `s` has seen (it never moves back).
    pub fn observe(&self, s: &ClientSession) {
        let mut times = self.times();
        if let Some(ct) = s.cluster_time() {
            if times.cluster.as_ref().is_none_or(|c| c < ct) {
                times.cluster = Some(ct.clone());
            }
        }
        if let Some(op) = s.operation_time() {
            if times.operation.is_none_or(|c| c < op) {
                times.operation = Some(op);
            }
        }
    }
}

/// What the server says it is (`buildInfo`): the MongoDB version it implements and, for
/// SecantusDB, its own version. Checks that depend on mongod's query planner (for example "no
/// in-memory `SORT` stage") are asserted only where [`ServerBuild::is_mongod`] holds; what
/// every server must do (use the expected index) is asserted everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerBuild {
    /// `buildInfo.version`, e.g. `7.0.14` (SecantusDB reports the MongoDB version it speaks).
    pub version: String,
    /// `buildInfo.secantusVersion`, e.g. `0.7.0b3`, when the server is SecantusDB.
    pub secantus: Option<String>,
}

impl ServerBuild {
    /// Reads `buildInfo` from `client`.
    ///
    /// # Errors
    /// The driver's error when the command fails.
    pub async fn of(client: &Client) -> mongodb::error::Result<ServerBuild> {
        let info = client
            .database("admin")
            .run_command(doc! { "buildInfo": 1 })
            .await?;
        Ok(ServerBuild::from_build_info(&info))
    }

    /// Reads a `buildInfo` reply.
    pub fn from_build_info(info: &mongodb::bson::Document) -> ServerBuild {
        ServerBuild {
            version: info.get_str("version").unwrap_or("unknown").to_string(),
            secantus: info.get_str("secantusVersion").ok().map(str::to_string),
        }
    }

    /// `true` for a real `mongod` (anything that is not SecantusDB).
    pub fn is_mongod(&self) -> bool {
        self.secantus.is_none()
    }
}

impl std::fmt::Display for ServerBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.secantus {
            Some(s) => write!(f, "SecantusDB {s} (MongoDB {} wire)", self.version),
            None => write!(f, "MongoDB {}", self.version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_tells_secantus_from_mongod() {
        let s = ServerBuild::from_build_info(
            &doc! { "version": "8.2.11", "secantusVersion": "0.7.0b3" },
        );
        assert!(!s.is_mongod());
        assert_eq!(s.to_string(), "SecantusDB 0.7.0b3 (MongoDB 8.2.11 wire)");
        let m = ServerBuild::from_build_info(&doc! { "version": "7.0.14" });
        assert!(m.is_mongod());
        assert_eq!(m.to_string(), "MongoDB 7.0.14");
    }
}
