//! A MongoDB-compatible server for tests: SecantusDB (`secantusd-py`, a MongoDB wire-protocol
//! server on WiredTiger that advertises the one-node replica set `secantus`, with transactions,
//! change streams and, with `--enable-test-commands`, mongod's `configureFailPoint`).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{
    free_port, is_executable, kill, restartable_port, retry_launch, running, stop_owned, DataDir,
    ServerError, Stop, PROBE_EVERY, RESTART_TIMEOUT, START_ATTEMPTS,
};

/// Environment variable naming a running replica set to use instead of starting a server, e.g.
/// `mongodb://localhost:27017/?replicaSet=rs0&directConnection=true` (a real `mongod`, see
/// `docs/mongodb.md`).
pub const MONGODB_URI_ENV: &str = "MONGODB_URI";

/// Environment variable naming the `secantusd-py` executable (else `PATH`, else the project's
/// virtual environment `.venv/bin`, where `scripts/test` installs it).
pub const SECANTUSD_ENV: &str = "TEKTREE_TEST_SECANTUSD";

/// The replica-set name SecantusDB advertises.
pub const SECANTUS_REPLICA_SET: &str = "secantus";

/// How long a fresh SecantusDB gets to listen (it is a Python program: about 1.5 s here).
const MONGO_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A MongoDB server for one test: `secantusd-py` on a free loopback port with its data in a
/// temporary directory, killed when dropped — or, when `MONGODB_URI` is set, that deployment
/// (left running; tests keep apart by database name). [`MongoServer::start_persistent`] keeps
/// the data in a given directory and syncs every commit, for fault drills that SIGKILL it.
#[derive(Debug)]
pub struct MongoServer {
    /// The connection string, e.g. `mongodb://127.0.0.1:41234/?replicaSet=secantus`.
    pub uri: String,
    child: Option<Child>,
    dir: DataDir,
    /// The port, `None` for a deployment named by `MONGODB_URI` (not ours to stop).
    port: Option<u16>,
    persistent: bool,
}

impl MongoServer {
    /// Starts a server (`secantusd-py --host 127.0.0.1 --port <free port> --storage-path
    /// <temp dir> --enable-test-commands`), returning once it accepts connections. When
    /// `MONGODB_URI` is set, returns that URI without starting anything.
    ///
    /// # Panics
    /// When `secantusd-py` cannot be found (the message says how to install it) or the server
    /// does not come up: a MongoDB suite never passes by skipping.
    pub fn start() -> MongoServer {
        let dir = tempfile::tempdir().expect("creating a temporary directory for secantusd-py");
        if let Ok(uri) = std::env::var(MONGODB_URI_ENV) {
            if !uri.trim().is_empty() {
                return MongoServer {
                    uri,
                    child: None,
                    dir: DataDir::Temp(dir),
                    port: None,
                    persistent: false,
                };
            }
        }
        let mut server = MongoServer {
            uri: String::new(),
            child: None,
            dir: DataDir::Temp(dir),
            port: None,
            persistent: false,
        };
        if let Err(e) = server.launch_on_free_port() {
            panic!("{e}");
        }
        server
    }

    /// Starts a server whose data lives in `dir` and survives a SIGKILL (`--sync-on-commit`),
    /// on a free port outside the ephemeral range ([`restartable_port`]). Ignores
    /// `MONGODB_URI`.
    ///
    /// # Errors
    /// [`ServerError`] when `dir` cannot be created, `secantusd-py` is missing, or the server
    /// does not come up.
    pub fn start_persistent(dir: impl Into<PathBuf>) -> Result<MongoServer, ServerError> {
        let mut server = MongoServer::persistent(dir.into())?;
        server.launch_on_free_port()?;
        Ok(server)
    }

    /// Like [`MongoServer::start_persistent`], on `port`, opening the data already in `dir`.
    ///
    /// # Errors
    /// As [`MongoServer::start_persistent`], also when `port` is taken.
    pub fn start_persistent_on(
        port: u16,
        dir: impl Into<PathBuf>,
    ) -> Result<MongoServer, ServerError> {
        let mut server = MongoServer::persistent(dir.into())?;
        server.port = Some(port);
        server.restart()?;
        Ok(server)
    }

    fn persistent(dir: PathBuf) -> Result<MongoServer, ServerError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError(format!("creating {}: {e}", dir.display())))?;
        Ok(MongoServer {
            uri: String::new(),
            child: None,
            dir: DataDir::Given(dir),
            port: None,
            persistent: true,
        })
    }

    /// The connection string with `database` as its path, e.g.
    /// `mongodb://127.0.0.1:41234/tektree_1?replicaSet=secantus` (the form `--store` takes).
    pub fn uri_with_database(&self, database: &str) -> String {
        with_database(&self.uri, database)
    }

    /// The port (`None` for a deployment named by `MONGODB_URI`).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The data directory (`--storage-path` is `data` below it) and the server's log file.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `true` while the server process runs.
    pub fn is_running(&mut self) -> bool {
        running(&mut self.child)
    }

    /// The process id of the running server (to pause it with SIGSTOP, for example).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (see [`Stop`]) and waits for it to exit; stopping a stopped server does
    /// nothing.
    ///
    /// # Errors
    /// [`ServerError`] for a deployment this handle did not start, or when signalling fails.
    pub fn stop(&mut self, how: Stop) -> Result<(), ServerError> {
        stop_owned(self.port, &self.uri, &mut self.child, how)
    }

    /// Starts the server again on the same port with the same data directory (SIGKILLing it
    /// first if it runs), returning once it accepts connections (after WiredTiger's recovery).
    ///
    /// # Errors
    /// [`ServerError`] for a deployment this handle did not start, or when it does not come up.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        let Some(port) = self.port else {
            return Err(ServerError(format!(
                "the server at {} was not started here",
                self.uri
            )));
        };
        self.stop(Stop::Kill)?;
        let binary = secantusd_binary()?;
        retry_launch("secantusd-py", port, || {
            self.launch(&binary, port, RESTART_TIMEOUT)
        })
    }

    fn launch_on_free_port(&mut self) -> Result<(), ServerError> {
        let binary = secantusd_binary()?;
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = if self.persistent {
                restartable_port()
            } else {
                free_port()
            };
            match self.launch(&binary, port, MONGO_STARTUP_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) => last_failure = e.to_string(),
            }
        }
        Err(ServerError(format!(
            "secantusd-py did not start after {START_ATTEMPTS} attempts: {last_failure}"
        )))
    }

    fn launch(&mut self, binary: &Path, port: u16, timeout: Duration) -> Result<(), ServerError> {
        let dir = self.dir.path().to_path_buf();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("secantusd.log"))
            .map_err(|e| ServerError(format!("opening the secantusd log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ServerError(format!("opening the secantusd log: {e}")))?;
        let mut cmd = Command::new(binary);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(dir.join("data"))
            .args(["--enable-test-commands", "--log-level", "WARNING"]);
        if self.persistent {
            cmd.arg("--sync-on-commit");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| ServerError(format!("starting {}: {e}", binary.display())))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match wait_listening(&mut child, addr, timeout) {
            Ok(()) => {
                self.uri = format!("mongodb://127.0.0.1:{port}/?replicaSet={SECANTUS_REPLICA_SET}");
                self.port = Some(port);
                self.child = Some(child);
                Ok(())
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = std::fs::read_to_string(dir.join("secantusd.log")).unwrap_or_default();
                let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                Err(ServerError(format!("{why}; log: {tail}")))
            }
        }
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        kill(&mut self.child);
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

/// Waits until `addr` accepts a TCP connection, or `child` exits, or `timeout`.
fn wait_listening(child: &mut Child, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "secantusd-py exited with {status} (port {})",
                addr.port()
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "secantusd-py not listening on {addr} within {timeout:?}"
            ));
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// The `secantusd-py` executable: `TEKTREE_TEST_SECANTUSD`, else `PATH`, else the workspace's
/// `.venv/bin`.
fn secantusd_binary() -> Result<PathBuf, ServerError> {
    if let Some(p) = std::env::var_os(SECANTUSD_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin");
    on_path
        .into_iter()
        .chain([venv])
        .map(|dir| dir.join("secantusd-py"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            ServerError(format!(
                "secantusd-py is neither on PATH nor in the project's .venv: run scripts/test \
                 (it installs SecantusDB==0.7.0b3 into .venv with pip), or pip install \
                 SecantusDB==0.7.0b3, or set {SECANTUSD_ENV} to the executable or \
                 {MONGODB_URI_ENV} to a running replica set"
            ))
        })
}
