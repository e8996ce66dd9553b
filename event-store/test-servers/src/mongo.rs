//! A MongoDB-compatible server for tests: SecantusDB (`secantusd-py`, a MongoDB wire-protocol
//! server on WiredTiger that advertises the one-node replica set `secantus`, with transactions,
//! change streams and, with `--enable-test-commands`, mongod's `configureFailPoint`).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::process::{find_program, ServerError};
use crate::server::{poll_ready, Launch, ServerKind, TestServer};

/// Environment variable naming a running replica set to use instead of starting a server, e.g.
/// `mongodb://localhost:27017/?replicaSet=rs0&directConnection=true` (a real `mongod`, see
/// `docs/mongodb.md`).
pub const MONGODB_URI_ENV: &str = "MONGODB_URI";

/// Environment variable naming the `secantusd-py` executable (else `PATH`, else the project's
/// virtual environment `.venv/bin`, where `scripts/test` installs it).
pub const SECANTUSD_ENV: &str = "TEKTREE_TEST_SECANTUSD";

/// The replica-set name SecantusDB advertises.
pub const SECANTUS_REPLICA_SET: &str = "secantus";

/// A MongoDB server for one test: `secantusd-py --host 127.0.0.1 --port <free port>
/// --storage-path <dir>/data --enable-test-commands` (log in `<dir>/secantusd.log`), killed when
/// dropped — or, when `MONGODB_URI` is set, that deployment (left running; tests keep apart by
/// database name). [`TestServer::start_persistent`] adds `--sync-on-commit`, for fault drills
/// that SIGKILL it. The URL has the form `mongodb://127.0.0.1:41234/?replicaSet=secantus`.
pub type MongoServer = TestServer<Secantus>;

/// The SecantusDB [`ServerKind`] of [`MongoServer`].
#[derive(Debug, Default)]
pub struct Secantus;

impl ServerKind for Secantus {
    const NAME: &'static str = "secantusd-py";
    const REUSE_ENV: &'static str = MONGODB_URI_ENV;
    /// It is a Python program: about 1.5 s here, far more on a loaded machine.
    const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

    fn command(&mut self, at: &Launch<'_>) -> Result<Command, ServerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(at.dir.join("secantusd.log"))
            .map_err(|e| ServerError(format!("opening the secantusd log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ServerError(format!("opening the secantusd log: {e}")))?;
        let mut cmd = Command::new(secantusd_binary()?);
        cmd.args(["--host", "127.0.0.1", "--port", &at.port.to_string()])
            .arg("--storage-path")
            .arg(at.dir.join("data"))
            .args(["--enable-test-commands", "--log-level", "WARNING"]);
        if at.persistent {
            cmd.arg("--sync-on-commit");
        }
        cmd.stdout(log).stderr(log2);
        Ok(cmd)
    }

    fn url(port: u16) -> String {
        format!("mongodb://127.0.0.1:{port}/?replicaSet={SECANTUS_REPLICA_SET}")
    }

    /// Ready once the port accepts a TCP connection.
    fn wait_ready(
        child: &mut Child,
        port: u16,
        _url: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        poll_ready(child, Self::NAME, port, timeout, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// The last five lines of `secantusd.log`.
    fn failure_detail(dir: &Path) -> String {
        let log = std::fs::read_to_string(dir.join("secantusd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        format!("; log: {}", tail.join(" | "))
    }
}

impl TestServer<Secantus> {
    /// The connection string with `database` as its path, e.g.
    /// `mongodb://127.0.0.1:41234/tektree_1?replicaSet=secantus` (the form `--store` takes).
    pub fn uri_with_database(&self, database: &str) -> String {
        with_database(&self.url, database)
    }
}

/// `uri` with `database` as its path (replacing any path it has).
///
/// ```
/// # use tektree_test_servers::mongo_uri_with_database as with;
/// assert_eq!(with("mongodb://h:1/?replicaSet=s", "d"), "mongodb://h:1/d?replicaSet=s");
/// assert_eq!(with("mongodb://h:1/old?w=1", "d"), "mongodb://h:1/d?w=1");
/// assert_eq!(with("mongodb://h:1", "d"), "mongodb://h:1/d");
/// ```
pub fn with_database(uri: &str, database: &str) -> String {
    let (base, query) = match uri.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (uri, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let hosts_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..hosts_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The `secantusd-py` executable: `TEKTREE_TEST_SECANTUSD`, else `PATH`, else the workspace's
/// `.venv/bin`.
fn secantusd_binary() -> Result<PathBuf, ServerError> {
    if let Some(p) = std::env::var_os(SECANTUSD_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin");
    find_program("secantusd-py", [venv]).ok_or_else(|| {
        ServerError(format!(
            "secantusd-py is neither on PATH nor in the project's .venv: run scripts/test \
             (it installs SecantusDB==0.7.0b3 into .venv with pip), or pip install \
             SecantusDB==0.7.0b3, or set {SECANTUSD_ENV} to the executable or \
             {MONGODB_URI_ENV} to a running replica set"
        ))
    })
}
