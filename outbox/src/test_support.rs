//! Real servers for tests (this crate's and other crates').
//!
//! Tests run against a real `redis-server` rather than a mock: [`RedisServer::start`] starts a
//! throwaway one (or reuses the server named by `TEKTREE_TEST_REDIS_URL`), and
//! [`unique_stream_key`] keeps tests that share a server apart.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable naming an already running Redis (`redis://host:port`) to use instead
/// of starting one.
pub const REDIS_URL_ENV: &str = "TEKTREE_TEST_REDIS_URL";

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
