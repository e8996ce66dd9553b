//! Real servers for tests (this crate's and other crates').
//!
//! Tests run against a real `redis-server` / `nats-server` rather than a mock:
//! [`RedisServer::start`] and [`NatsServer::start`] start a throwaway one (or reuse the server
//! named by `TEKTREE_TEST_REDIS_URL` / `TEKTREE_TEST_NATS_URL`), and [`unique_stream_key`] /
//! [`unique_nats_names`] keep tests that share a server apart.
//!
//! Fault drills (the `tektree-faults` harness) need servers that keep their data across a
//! crash: [`RedisServer::start_persistent`] and [`NatsServer::start_persistent`] start one with
//! persistence on in a given directory, and [`RedisServer::stop`] / [`RedisServer::restart`]
//! (same on [`NatsServer`]) stop it (SIGKILL or SIGTERM, see [`Stop`]) and start it again on the
//! same port with the same data.
//!
//! The process plumbing (and the MongoDB server, [`MongoServer`]) is in the
//! `tektree-test-servers` crate; its public items are re-exported here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tektree_test_servers::process::{
    free_port, is_executable, kill, retry_launch, running, stop_owned, DataDir, PROBE_EVERY,
    RESTART_TIMEOUT, STARTUP_TIMEOUT, START_ATTEMPTS,
};
pub use tektree_test_servers::{
    mongo_uri_with_database, restartable_port, MongoServer, ServerError, Stop,
};

/// Environment variable naming an already running Redis (`redis://host:port`) to use instead
/// of starting one.
pub const REDIS_URL_ENV: &str = "TEKTREE_TEST_REDIS_URL";

/// Environment variable naming an already running NATS server with JetStream enabled
/// (`nats://host:port`) to use instead of starting one.
pub const NATS_URL_ENV: &str = "TEKTREE_TEST_NATS_URL";

/// A Redis server for one test: started on a free loopback port, without persistence, in a
/// temporary directory, and killed when dropped — or, when `TEKTREE_TEST_REDIS_URL` is set,
/// that server (left running). [`RedisServer::start_persistent`] starts one with an
/// append-only file in a given directory instead.
#[derive(Debug)]
pub struct RedisServer {
    /// URL to connect to, e.g. `redis://127.0.0.1:41234`.
    pub url: String,
    child: Option<Child>,
    /// Held so a temporary working directory lives as long as the server.
    dir: DataDir,
    /// The port, `None` for a server named by `TEKTREE_TEST_REDIS_URL` (not ours to stop).
    port: Option<u16>,
    persistent: bool,
}

impl RedisServer {
    /// Starts a server: `redis-server --port <free port> --bind 127.0.0.1 --save ""
    /// --appendonly no --dir <temp dir>`, returning once it answers `PING` (up to 10 s). When
    /// `TEKTREE_TEST_REDIS_URL` is set, returns that URL without starting anything.
    ///
    /// # Panics
    /// When `redis-server` is not on `PATH`, or the server does not come up: a test cannot
    /// proceed without it.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("creating a temporary directory for redis-server");
        if let Ok(url) = std::env::var(REDIS_URL_ENV) {
            if !url.is_empty() {
                return RedisServer {
                    url,
                    child: None,
                    dir: DataDir::Temp(dir),
                    port: None,
                    persistent: false,
                };
            }
        }
        let mut server = RedisServer {
            url: String::new(),
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

    /// Starts a server that keeps its data: `redis-server --port <port> --bind 127.0.0.1
    /// --save "" --appendonly yes --appendfsync always --dir <dir> --logfile <dir>/redis.log`,
    /// so that every write it acknowledged survives a SIGKILL, on a free port outside the
    /// ephemeral range ([`restartable_port`]). Returns once it answers `PING`.
    /// Ignores `TEKTREE_TEST_REDIS_URL`.
    ///
    /// # Errors
    /// [`ServerError`] when `dir` cannot be created, `redis-server` is not on `PATH`, or the
    /// server does not come up.
    pub fn start_persistent(dir: impl Into<PathBuf>) -> Result<RedisServer, ServerError> {
        let mut server = RedisServer::persistent(dir.into())?;
        server.launch_on_free_port()?;
        Ok(server)
    }

    /// Like [`RedisServer::start_persistent`], on `port`; the data already in `dir` (of an
    /// earlier server) is loaded.
    ///
    /// # Errors
    /// As [`RedisServer::start_persistent`], also when `port` is taken.
    pub fn start_persistent_on(
        port: u16,
        dir: impl Into<PathBuf>,
    ) -> Result<RedisServer, ServerError> {
        let mut server = RedisServer::persistent(dir.into())?;
        server.port = Some(port);
        server.restart()?;
        Ok(server)
    }

    /// A handle of a persistent server in `dir`, not started.
    fn persistent(dir: PathBuf) -> Result<RedisServer, ServerError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError(format!("creating {}: {e}", dir.display())))?;
        Ok(RedisServer {
            url: String::new(),
            child: None,
            dir: DataDir::Given(dir),
            port: None,
            persistent: true,
        })
    }

    /// The port it listens on (`None` for a server named by `TEKTREE_TEST_REDIS_URL`).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Its working directory (with the append-only file of a persistent server).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `true` while the server process runs.
    pub fn is_running(&mut self) -> bool {
        running(&mut self.child)
    }

    /// Stops the server (see [`Stop`]) and waits for the process to exit. Stopping a stopped
    /// server does nothing.
    ///
    /// # Errors
    /// [`ServerError`] for a server this handle did not start, or when signalling fails.
    pub fn stop(&mut self, how: Stop) -> Result<(), ServerError> {
        stop_owned(self.port, &self.url, &mut self.child, how)
    }

    /// Starts the server again on the same port with the same directory (stopping it first
    /// with SIGKILL if it runs), returning once it answers `PING` — for a persistent server,
    /// after it loaded its append-only file.
    ///
    /// # Errors
    /// [`ServerError`] for a server this handle did not start, or when it does not come up
    /// (e.g. another process took the port meanwhile).
    pub fn restart(&mut self) -> Result<(), ServerError> {
        let Some(port) = self.port else {
            return Err(ServerError(format!(
                "the server at {} was not started here",
                self.url
            )));
        };
        self.stop(Stop::Kill)?;
        retry_launch("redis-server", port, || self.launch(port, RESTART_TIMEOUT))
    }

    fn launch_on_free_port(&mut self) -> Result<(), ServerError> {
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = if self.persistent {
                restartable_port()
            } else {
                free_port()
            };
            match self.launch(port, STARTUP_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) => last_failure = e.to_string(),
            }
        }
        Err(ServerError(format!(
            "redis-server did not start after {START_ATTEMPTS} attempts: {last_failure}"
        )))
    }

    /// Starts `redis-server` on `port` and waits up to `timeout` until it answers.
    fn launch(&mut self, port: u16, timeout: Duration) -> Result<(), ServerError> {
        let dir = self.dir.path().to_path_buf();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""]);
        if self.persistent {
            cmd.args(["--appendonly", "yes"])
                .args(["--appendfsync", "always"])
                .arg("--logfile")
                .arg(dir.join("redis.log"));
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let mut child = match cmd
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ServerError(format!(
                    "redis-server is not on PATH: install redis-server \
                     (.ci/run does it with apt-get), or set {REDIS_URL_ENV} to a running server"
                )))
            }
            Err(e) => return Err(ServerError(format!("starting redis-server: {e}"))),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match wait_ready(&mut child, addr, timeout) {
            Ok(()) => {
                self.url = format!("redis://127.0.0.1:{port}");
                self.port = Some(port);
                self.child = Some(child);
                Ok(())
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(ServerError(why))
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A stream key no other call in any process returns, e.g. `tektree:test:4242:7:<uuid>`.
pub fn unique_stream_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "tektree:test:{}:{}:{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::new_v4().simple()
    )
}

/// Waits until the server at `addr` answers `PING`, or `child` exits, or `timeout`.
fn wait_ready(child: &mut Child, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "redis-server exited with {status} (port {})",
                addr.port()
            ));
        }
        if ping(addr) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("no PONG on {addr} within {timeout:?}"));
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// `true` when `addr` answers `PING` with `+PONG`.
fn ping(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf)?;
        Ok(&buf == b"+PONG\r\n")
    };
    probe().unwrap_or(false)
}

/// A NATS server with JetStream for one test: `nats-server` started on a free loopback port
/// with its JetStream store in a temporary directory, and killed when dropped — or, when
/// `TEKTREE_TEST_NATS_URL` is set, that server (left running). [`NatsServer::start_persistent`]
/// keeps the JetStream store in a given directory instead.
#[derive(Debug)]
pub struct NatsServer {
    /// URL to connect to, e.g. `nats://127.0.0.1:41234`.
    pub url: String,
    child: Option<Child>,
    /// Held so a temporary JetStream store lives as long as the server.
    dir: DataDir,
    /// The JetStream store directory (`-sd`) of the running or last started server.
    store: PathBuf,
    /// The port, `None` for a server named by `TEKTREE_TEST_NATS_URL` (not ours to stop).
    port: Option<u16>,
    /// Log file (`-l`), for a persistent server.
    log: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server: `nats-server -js -a 127.0.0.1 -p <free port> -sd <temp dir>` (the
    /// binary is looked up on `PATH`, then in `/usr/sbin`), returning once it accepts a TCP
    /// connection announcing JetStream and an `async_nats` client can connect and query its
    /// JetStream account (up to 10 s). When `TEKTREE_TEST_NATS_URL` is set, returns that URL
    /// without starting anything.
    ///
    /// # Panics
    /// When `nats-server` is not found, or the server does not come up: a test cannot
    /// proceed without it.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("creating a temporary directory for nats-server");
        let store = dir.path().to_path_buf();
        let mut server = NatsServer {
            url: String::new(),
            child: None,
            dir: DataDir::Temp(dir),
            store,
            port: None,
            log: None,
        };
        if let Ok(url) = std::env::var(NATS_URL_ENV) {
            if !url.is_empty() {
                server.url = url;
                return server;
            }
        }
        if let Err(e) = server.launch_on_free_port(true) {
            panic!("{e}");
        }
        server
    }

    /// Starts a server that keeps its JetStream store in `dir`: `nats-server -js -a 127.0.0.1
    /// -p <port> -sd <dir>/jetstream -l <dir>/nats.log` on a free port outside the ephemeral
    /// range ([`restartable_port`]), returning once it is ready (as
    /// [`NatsServer::start`]). Streams created by the bus are file-backed. Ignores
    /// `TEKTREE_TEST_NATS_URL`.
    ///
    /// # Errors
    /// [`ServerError`] when `dir` cannot be created, `nats-server` is not found, or the server
    /// does not come up.
    pub fn start_persistent(dir: impl Into<PathBuf>) -> Result<NatsServer, ServerError> {
        let mut server = NatsServer::persistent(dir.into())?;
        server.launch_on_free_port(false)?;
        Ok(server)
    }

    /// Like [`NatsServer::start_persistent`], on `port`; the streams already in `dir` (of an
    /// earlier server) are recovered.
    ///
    /// # Errors
    /// As [`NatsServer::start_persistent`], also when `port` is taken.
    pub fn start_persistent_on(
        port: u16,
        dir: impl Into<PathBuf>,
    ) -> Result<NatsServer, ServerError> {
        let mut server = NatsServer::persistent(dir.into())?;
        server.port = Some(port);
        server.restart()?;
        Ok(server)
    }

    /// A handle of a persistent server in `dir`, not started.
    fn persistent(dir: PathBuf) -> Result<NatsServer, ServerError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError(format!("creating {}: {e}", dir.display())))?;
        Ok(NatsServer {
            url: String::new(),
            child: None,
            store: dir.join("jetstream"),
            log: Some(dir.join("nats.log")),
            dir: DataDir::Given(dir),
            port: None,
        })
    }

    /// The port it listens on (`None` for a server named by `TEKTREE_TEST_NATS_URL`).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The directory it was given (a temporary one for [`NatsServer::start`]).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `true` while the server process runs.
    pub fn is_running(&mut self) -> bool {
        running(&mut self.child)
    }

    /// Stops the server (see [`Stop`]) and waits for the process to exit. Stopping a stopped
    /// server does nothing.
    ///
    /// # Errors
    /// [`ServerError`] for a server this handle did not start, or when signalling fails.
    pub fn stop(&mut self, how: Stop) -> Result<(), ServerError> {
        stop_owned(self.port, &self.url, &mut self.child, how)
    }

    /// Starts the server again on the same port with the same JetStream store (stopping it
    /// first with SIGKILL if it runs), returning once it is ready — after it recovered its
    /// streams.
    ///
    /// # Errors
    /// [`ServerError`] for a server this handle did not start, or when it does not come up.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        let Some(port) = self.port else {
            return Err(ServerError(format!(
                "the server at {} was not started here",
                self.url
            )));
        };
        self.stop(Stop::Kill)?;
        let binary = nats_binary()?;
        let store = self.store.clone();
        retry_launch("nats-server", port, || {
            self.launch(&binary, port, store.clone(), RESTART_TIMEOUT)
        })
    }

    /// Starts on a free port; `fresh_store_per_attempt`: a new store directory per attempt
    /// (a failed attempt may leave a half-initialised one), as [`NatsServer::start`] always did.
    fn launch_on_free_port(&mut self, fresh_store_per_attempt: bool) -> Result<(), ServerError> {
        let binary = nats_binary()?;
        let mut last_failure = String::new();
        for attempt in 0..START_ATTEMPTS {
            let store = if fresh_store_per_attempt {
                self.dir.path().join(format!("js-{attempt}"))
            } else {
                self.store.clone()
            };
            let port = if fresh_store_per_attempt {
                free_port()
            } else {
                restartable_port()
            };
            match self.launch(&binary, port, store, STARTUP_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) => last_failure = e.to_string(),
            }
        }
        Err(ServerError(format!(
            "nats-server did not start after {START_ATTEMPTS} attempts: {last_failure}"
        )))
    }

    /// Starts `nats-server` on `port` with the JetStream store `store` and waits up to
    /// `timeout` until it is ready.
    fn launch(
        &mut self,
        binary: &Path,
        port: u16,
        store: PathBuf,
        timeout: Duration,
    ) -> Result<(), ServerError> {
        let mut cmd = Command::new(binary);
        cmd.arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &port.to_string()])
            .arg("-sd")
            .arg(&store);
        if let Some(log) = &self.log {
            cmd.arg("-l").arg(log);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ServerError(format!("starting {}: {e}", binary.display())))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let url = format!("nats://127.0.0.1:{port}");
        match wait_ready_nats(&mut child, addr, &url, timeout) {
            Ok(()) => {
                self.url = url;
                self.port = Some(port);
                self.store = store;
                self.child = Some(child);
                Ok(())
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(ServerError(why))
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The `nats-server` binary, or why there is none.
fn nats_binary() -> Result<PathBuf, ServerError> {
    find_nats_server().ok_or_else(|| {
        ServerError(format!(
            "nats-server is neither on PATH nor in /usr/sbin: install nats-server \
             (scripts/test does it with apt-get), or set {NATS_URL_ENV} to a running \
             server with JetStream enabled"
        ))
    })
}

/// Names that keep one test's [`crate::NatsBus`] apart from every other's on a shared server
/// (pass them to [`crate::NatsBus::with_prefix`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsNames {
    /// Events stream name, e.g. `TEKTREE_TEST_4242_7_<uuid>_EVENTS` (its dead-letter stream
    /// is then `…_DEADLETTER`).
    pub stream: String,
    /// Subject prefix, e.g. `tektree.test.4242.7.<uuid>.events` (dead letters then go to
    /// `tektree.test.4242.7.<uuid>.deadletter.<group>`).
    pub subject_prefix: String,
}

/// A stream name and subject prefix no other call in any process returns.
pub fn unique_nats_names() -> NatsNames {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let uuid = uuid::Uuid::new_v4().simple();
    NatsNames {
        stream: format!("TEKTREE_TEST_{pid}_{n}_{uuid}_EVENTS"),
        subject_prefix: format!("tektree.test.{pid}.{n}.{uuid}.events"),
    }
}

/// `nats-server` on `PATH`, else `/usr/sbin/nats-server` (Debian installs it there, outside a
/// normal user's `PATH`).
fn find_nats_server() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
}

/// Waits until the NATS server at `addr` greets a TCP connection with an `INFO` announcing
/// JetStream and an `async_nats` client gets its JetStream account info, or `child` exits, or
/// `timeout`.
fn wait_ready_nats(
    child: &mut Child,
    addr: SocketAddr,
    url: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "nats-server exited with {status} (port {})",
                addr.port()
            ));
        }
        if nats_info_has_jetstream(addr) && nats_client_ready(url) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no JetStream-enabled NATS on {addr} within {timeout:?}"
            ));
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// `true` when `addr` greets a TCP connection with `INFO {…"jetstream":true…}`.
fn nats_info_has_jetstream(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.starts_with("INFO ") && line.contains("\"jetstream\":true"))
    };
    probe().unwrap_or(false)
}

/// `true` when an `async_nats` client connects to `url` and gets its JetStream account info
/// (run on a helper thread with its own runtime, so this works from inside a test's runtime).
fn nats_client_ready(url: &str) -> bool {
    let url = url.to_string();
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return false;
        };
        runtime.block_on(async move {
            let check = async {
                let client = async_nats::connect(url.as_str()).await.ok()?;
                // The raw account info request: older servers' replies lack fields the
                // client's typed `query_account` insists on.
                let reply = client.request("$JS.API.INFO", "".into()).await.ok()?;
                let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
                info.get("error").is_none().then_some(())
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(2), check).await,
                Ok(Some(_))
            )
        })
    })
    .join()
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::envelopes;
    use crate::{Bus, NatsBus, RedisBus};

    #[tokio::test]
    async fn a_persistent_redis_keeps_acknowledged_writes_across_a_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer::start_persistent(dir.path().join("redis")).unwrap();
        let (port, url) = (server.port(), server.url.clone());
        let key = unique_stream_key();
        let bus = RedisBus::with_stream(&url, &key).await.unwrap();
        bus.publish(&envelopes(1..=3)).await.unwrap();
        server.stop(Stop::Kill).unwrap();
        assert!(!server.is_running());
        assert!(RedisBus::with_stream(&url, &key).await.is_err());
        server.restart().unwrap();
        assert!(server.is_running());
        assert_eq!((server.port(), server.url.clone()), (port, url.clone()));
        assert!(server.data_dir().join("redis.log").is_file());
        let bus = RedisBus::with_stream(&url, &key).await.unwrap();
        assert_eq!(bus.last_published().await.unwrap(), 3);
        server.stop(Stop::Term).unwrap();
        server.restart().unwrap();
        let bus = RedisBus::with_stream(&url, &key).await.unwrap();
        assert_eq!(bus.last_published().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_persistent_nats_keeps_its_streams_across_a_sigkill_and_a_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = NatsServer::start_persistent(dir.path().join("nats")).unwrap();
        let (port, url) = (server.port(), server.url.clone());
        let names = unique_nats_names();
        let connect = || NatsBus::with_prefix(&url, &names.stream, &names.subject_prefix);
        connect()
            .await
            .unwrap()
            .publish(&envelopes(1..=3))
            .await
            .unwrap();
        for how in [Stop::Kill, Stop::Term] {
            server.stop(how).unwrap();
            assert!(!server.is_running());
            server.restart().unwrap();
            assert_eq!(server.port(), port);
            assert_eq!(connect().await.unwrap().last_published().await.unwrap(), 3);
        }
    }

    /// A new server on a given port and an earlier server's directory has its data.
    #[tokio::test]
    async fn persistent_servers_start_on_a_given_port_with_existing_data() {
        let dir = tempfile::tempdir().unwrap();
        let key = unique_stream_key();
        let names = unique_nats_names();
        let (redis_port, nats_port) = {
            let redis = RedisServer::start_persistent(dir.path().join("redis")).unwrap();
            let nats = NatsServer::start_persistent(dir.path().join("nats")).unwrap();
            let bus = RedisBus::with_stream(&redis.url, &key).await.unwrap();
            bus.publish(&envelopes(1..=2)).await.unwrap();
            let bus = NatsBus::with_prefix(&nats.url, &names.stream, &names.subject_prefix)
                .await
                .unwrap();
            bus.publish(&envelopes(1..=4)).await.unwrap();
            (redis.port().unwrap(), nats.port().unwrap())
            // Dropped: both killed; their directories stay.
        };
        let redis = RedisServer::start_persistent_on(redis_port, dir.path().join("redis")).unwrap();
        assert_eq!(redis.url, format!("redis://127.0.0.1:{redis_port}"));
        let bus = RedisBus::with_stream(&redis.url, &key).await.unwrap();
        assert_eq!(bus.last_published().await.unwrap(), 2);
        let nats = NatsServer::start_persistent_on(nats_port, dir.path().join("nats")).unwrap();
        assert_eq!(nats.url, format!("nats://127.0.0.1:{nats_port}"));
        let bus = NatsBus::with_prefix(&nats.url, &names.stream, &names.subject_prefix)
            .await
            .unwrap();
        assert_eq!(bus.last_published().await.unwrap(), 4);
    }

    #[test]
    fn a_server_named_by_the_environment_is_not_ours_to_stop() {
        let mut server = RedisServer {
            url: "redis://127.0.0.1:1".into(),
            child: None,
            dir: DataDir::Temp(tempfile::tempdir().unwrap()),
            port: None,
            persistent: false,
        };
        assert!(server.stop(Stop::Kill).is_err());
        assert!(server.restart().is_err());
    }
}
