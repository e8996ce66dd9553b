//! The process plumbing every test server shares: starting on a free loopback port, stopping
//! with SIGKILL or SIGTERM, restarting on the same port, and where the data lives.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Why a server could not be started, stopped or restarted (the `start` of ordinary tests
/// panics instead). The message names the server, the step and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServerError(pub String);

/// How a test server's `stop` stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL: a crash; the server gets no chance to flush anything.
    Kill,
    /// SIGTERM: a clean shutdown (SIGKILL after 10 s if it has not exited by then).
    Term,
}

/// How long a SIGTERMed server gets to exit before it is SIGKILLed.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// Where a server keeps its data.
#[derive(Debug)]
pub enum DataDir {
    /// A temporary directory, removed with the server.
    Temp(TempDir),
    /// A directory the caller owns, kept.
    Given(PathBuf),
}

impl DataDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Given(p) => p,
        }
    }
}

/// Sends `how` to `child` and waits for it to exit.
pub fn stop_child(child: &mut Child, how: Stop) -> Result<(), ServerError> {
    if child
        .try_wait()
        .map_err(|e| ServerError(format!("checking the server process: {e}")))?
        .is_some()
    {
        return Ok(());
    }
    if how == Stop::Term {
        let sent = Command::new("kill")
            .args(["-s", "TERM", &child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| ServerError(format!("running kill -s TERM: {e}")))?;
        if sent.success() {
            let deadline = Instant::now() + TERM_GRACE;
            while Instant::now() < deadline {
                if child
                    .try_wait()
                    .map_err(|e| ServerError(format!("waiting for the server: {e}")))?
                    .is_some()
                {
                    return Ok(());
                }
                std::thread::sleep(PROBE_EVERY);
            }
        }
    }
    let _ = child.kill();
    child
        .wait()
        .map_err(|e| ServerError(format!("waiting for the server: {e}")))?;
    Ok(())
}

/// `true` while `child` runs.
pub fn running(child: &mut Option<Child>) -> bool {
    child
        .as_mut()
        .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
}

/// The `stop` of every server: refuses a server this handle did not start (`port` is `None`),
/// else stops `child` with `how` if it runs.
pub fn stop_owned(
    port: Option<u16>,
    url: &str,
    child: &mut Option<Child>,
    how: Stop,
) -> Result<(), ServerError> {
    if port.is_none() {
        return Err(ServerError(format!(
            "the server at {url} was not started here"
        )));
    }
    if let Some(mut c) = child.take() {
        stop_child(&mut c, how)?;
    }
    Ok(())
}

/// The `Drop` of every server: SIGKILL and reap.
pub fn kill(child: &mut Option<Child>) {
    if let Some(c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// How long a started server gets to answer `PING`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a restarted server gets: it may first have to load its data.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between readiness probes.
pub const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Attempts to start a server (another process may take the free port first).
pub const START_ATTEMPTS: usize = 5;

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a loopback port")
        .port()
}

/// A free loopback port for a server that will be restarted on it: outside the kernel's
/// ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 by default), so that no
/// outgoing connection — such as a client reconnecting while the server is down — can take
/// it meanwhile. Falls back to `free_port` (any free port) after 200 random tries.
pub fn restartable_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    for _ in 0..200 {
        let r = uuid::Uuid::new_v4().as_u128();
        let port = low + (r % u128::from(high - low)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// `true` for a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` in the first directory of `PATH`, then of `extra`, that holds it as an executable.
pub fn find_program(name: &str, extra: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}
