//! Real servers for tests (this crate's and other crates').
//!
//! Tests run against a real `redis-server` / `nats-server` rather than a mock:
//! [`RedisServer::start`] and [`NatsServer::start`] start a throwaway one (or reuse the server
//! named by `TEKTREE_TEST_REDIS_URL` / `TEKTREE_TEST_NATS_URL`), and [`unique_stream_key`] /
//! [`unique_nats_names`] keep tests that share a server apart.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable naming an already running Redis (`redis://host:port`) to use instead
/// of starting one.
pub const REDIS_URL_ENV: &str = "TEKTREE_TEST_REDIS_URL";

/// Environment variable naming an already running NATS server with JetStream enabled
/// (`nats://host:port`) to use instead of starting one.
pub const NATS_URL_ENV: &str = "TEKTREE_TEST_NATS_URL";

/// How long a started server gets to answer `PING`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness probes.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Attempts to start a server (another process may take the free port first).
const START_ATTEMPTS: usize = 5;

/// A Redis server for one test: started on a free loopback port, without persistence, in a
/// temporary directory, and killed when dropped — or, when `TEKTREE_TEST_REDIS_URL` is set,
/// that server (left running).
#[derive(Debug)]
pub struct RedisServer {
    /// URL to connect to, e.g. `redis://127.0.0.1:41234`.
    pub url: String,
    child: Option<Child>,
    #[allow(dead_code)] // held so the working directory lives as long as the server
    dir: TempDir,
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
                    dir,
                };
            }
        }
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut child = match Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-server is not on PATH: install redis-server \
                     (.ci/run does it with apt-get), or set {REDIS_URL_ENV} to a running server"
                ),
                Err(e) => panic!("starting redis-server: {e}"),
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_ready(&mut child, addr) {
                Ok(()) => {
                    return RedisServer {
                        url: format!("redis://127.0.0.1:{port}"),
                        child: Some(child),
                        dir,
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_failure = why;
                }
            }
        }
        panic!("redis-server did not start after {START_ATTEMPTS} attempts: {last_failure}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
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

/// A loopback port that was free a moment ago (bound to port 0, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a loopback port")
        .port()
}

/// Waits until the server at `addr` answers `PING`, or `child` exits, or the startup timeout.
fn wait_ready(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
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
            return Err(format!("no PONG on {addr} within {STARTUP_TIMEOUT:?}"));
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
/// `TEKTREE_TEST_NATS_URL` is set, that server (left running).
#[derive(Debug)]
pub struct NatsServer {
    /// URL to connect to, e.g. `nats://127.0.0.1:41234`.
    pub url: String,
    child: Option<Child>,
    #[allow(dead_code)] // held so the JetStream store lives as long as the server
    dir: TempDir,
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
        if let Ok(url) = std::env::var(NATS_URL_ENV) {
            if !url.is_empty() {
                return NatsServer {
                    url,
                    child: None,
                    dir,
                };
            }
        }
        let binary = find_nats_server().unwrap_or_else(|| {
            panic!(
                "nats-server is neither on PATH nor in /usr/sbin: install nats-server \
                 (scripts/test does it with apt-get), or set {NATS_URL_ENV} to a running \
                 server with JetStream enabled"
            )
        });
        let mut last_failure = String::new();
        for attempt in 0..START_ATTEMPTS {
            let port = free_port();
            let store = dir.path().join(format!("js-{attempt}"));
            let mut child = match Command::new(&binary)
                .arg("-js")
                .args(["-a", "127.0.0.1"])
                .args(["-p", &port.to_string()])
                .arg("-sd")
                .arg(&store)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => child,
                Err(e) => panic!("starting {}: {e}", binary.display()),
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let url = format!("nats://127.0.0.1:{port}");
            match wait_ready_nats(&mut child, addr, &url) {
                Ok(()) => {
                    return NatsServer {
                        url,
                        child: Some(child),
                        dir,
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_failure = why;
                }
            }
        }
        panic!("nats-server did not start after {START_ATTEMPTS} attempts: {last_failure}");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Waits until the NATS server at `addr` greets a TCP connection with an `INFO` announcing
/// JetStream and an `async_nats` client gets its JetStream account info, or `child` exits, or
/// the startup timeout.
fn wait_ready_nats(child: &mut Child, addr: SocketAddr, url: &str) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
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
                "no JetStream-enabled NATS on {addr} within {STARTUP_TIMEOUT:?}"
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
