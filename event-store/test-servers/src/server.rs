//! One test server process of any kind: started on a free loopback port (or named by the
//! environment and left alone), stopped with SIGKILL or SIGTERM, restarted on the same port
//! with the same data, and killed when dropped. What differs between Redis, NATS and MongoDB
//! (the command line, the readiness probe, the URL) is a [`ServerKind`].

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{
    free_port, kill, restartable_port, running, stop_owned, DataDir, ServerError, Stop,
    PROBE_EVERY, RESTART_TIMEOUT, START_ATTEMPTS,
};

/// Where and how one start of a server happens, as given to [`ServerKind::command`].
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The loopback port to listen on.
    pub port: u16,
    /// The server's directory (temporary, or the one given to `start_persistent`).
    pub dir: &'a Path,
    /// `true` for a server whose acknowledged writes must survive a SIGKILL.
    pub persistent: bool,
    /// `Some(n)` for the `n`th attempt on a fresh free port, `None` for a restart on the
    /// server's own port with its existing data.
    pub attempt: Option<usize>,
}

/// What one kind of server (Redis, NATS, MongoDB) adds to [`TestServer`].
pub trait ServerKind: Debug + Default {
    /// The program, in messages: `redis-server`.
    const NAME: &'static str;
    /// Environment variable naming a running server to use instead of starting one.
    const REUSE_ENV: &'static str;
    /// How long a freshly started server gets to become ready.
    const STARTUP_TIMEOUT: Duration;

    /// The command that starts the server as `at` says (stdin is set to null by the caller;
    /// stdout and stderr are the kind's to direct).
    ///
    /// # Errors
    /// [`ServerError`] when the program is not installed (the message says how to install it).
    fn command(&mut self, at: &Launch<'_>) -> Result<Command, ServerError>;

    /// The URL clients connect to on `port`, e.g. `redis://127.0.0.1:41234`.
    fn url(port: u16) -> String;

    /// Waits up to `timeout` until the server on `port` is ready; an error once `child` exits
    /// or the time is up.
    ///
    /// # Errors
    /// Why it is not ready, in words.
    fn wait_ready(child: &mut Child, port: u16, url: &str, timeout: Duration)
        -> Result<(), String>;

    /// Called after a successful start; the kind records what it needs to restart.
    fn started(&mut self, _at: &Launch<'_>) {}

    /// More words for a failed start, such as the tail of the server's log in `dir`.
    fn failure_detail(_dir: &Path) -> String {
        String::new()
    }
}

/// A server for one test: started on a free loopback port with its data in a temporary
/// directory and killed when dropped — or, when the kind's environment variable
/// ([`ServerKind::REUSE_ENV`]) is set, that server, left running and not ours to stop.
/// [`TestServer::start_persistent`] keeps the data in a given directory across SIGKILLs.
#[derive(Debug)]
pub struct TestServer<K: ServerKind> {
    /// The URL to connect to (the kind's form, e.g. `redis://127.0.0.1:41234`).
    pub url: String,
    kind: K,
    child: Option<Child>,
    /// Held so a temporary directory lives as long as the server.
    dir: DataDir,
    /// `None` for a server named by the environment (not ours to stop).
    port: Option<u16>,
    persistent: bool,
}

impl<K: ServerKind> TestServer<K> {
    /// Starts a server on a free port, returning once it is ready; when
    /// [`ServerKind::REUSE_ENV`] is set (not blank), returns a handle on that server instead.
    ///
    /// # Panics
    /// When the program is not installed (the message says how to install it) or the server
    /// does not come up: a suite never passes by skipping.
    pub fn start() -> Self {
        if let Ok(url) = std::env::var(K::REUSE_ENV) {
            if !url.trim().is_empty() {
                return Self::named(url);
            }
        }
        let dir = tempfile::tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory for {}: {e}", K::NAME));
        let mut server = Self::unstarted(DataDir::Temp(dir), false);
        if let Err(e) = server.launch_on_free_port() {
            panic!("{e}");
        }
        server
    }

    /// A handle on a server running at `url` that this process did not start: usable, never
    /// stopped or restarted ([`TestServer::stop`] refuses).
    pub fn named(url: impl Into<String>) -> Self {
        let dir = tempfile::tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary directory for {}: {e}", K::NAME));
        let mut server = Self::unstarted(DataDir::Temp(dir), false);
        server.url = url.into();
        server
    }

    /// Starts a server that keeps its data in `dir` and syncs every acknowledged write, so
    /// that it survives a SIGKILL, on a free port outside the ephemeral range
    /// ([`restartable_port`]). Ignores [`ServerKind::REUSE_ENV`].
    ///
    /// # Errors
    /// [`ServerError`] when `dir` cannot be created, the program is missing, or the server does
    /// not come up.
    pub fn start_persistent(dir: impl Into<PathBuf>) -> Result<Self, ServerError> {
        let mut server = Self::persistent(dir.into())?;
        server.launch_on_free_port()?;
        Ok(server)
    }

    /// Like [`TestServer::start_persistent`], on `port`, opening the data already in `dir`
    /// (of an earlier server).
    ///
    /// # Errors
    /// As [`TestServer::start_persistent`], also when `port` is taken.
    pub fn start_persistent_on(port: u16, dir: impl Into<PathBuf>) -> Result<Self, ServerError> {
        let mut server = Self::persistent(dir.into())?;
        server.port = Some(port);
        server.restart()?;
        Ok(server)
    }

    fn persistent(dir: PathBuf) -> Result<Self, ServerError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError(format!("creating {}: {e}", dir.display())))?;
        Ok(Self::unstarted(DataDir::Given(dir), true))
    }

    fn unstarted(dir: DataDir, persistent: bool) -> Self {
        TestServer {
            url: String::new(),
            kind: K::default(),
            child: None,
            dir,
            port: None,
            persistent,
        }
    }

    /// The kind's own state (for a kind's methods on its servers).
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// The port it listens on (`None` for a server named by the environment).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Its directory: the temporary one, or the one given to `start_persistent`.
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

    /// Stops the server (see [`Stop`]) and waits for the process to exit; stopping a stopped
    /// server does nothing.
    ///
    /// # Errors
    /// [`ServerError`] for a server this handle did not start, or when signalling fails.
    pub fn stop(&mut self, how: Stop) -> Result<(), ServerError> {
        stop_owned(self.port, &self.url, &mut self.child, how)
    }

    /// Starts the server again on the same port with the same data (SIGKILLing it first if it
    /// runs), returning once it is ready, after it recovered its data: up to
    /// [`START_ATTEMPTS`] attempts 200 ms apart, each waiting up to [`RESTART_TIMEOUT`].
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
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            match self.launch(port, None, RESTART_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) => last_failure = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(ServerError(format!(
            "{} did not restart on port {port} after {START_ATTEMPTS} attempts: {last_failure}",
            K::NAME
        )))
    }

    fn launch_on_free_port(&mut self) -> Result<(), ServerError> {
        let mut last_failure = String::new();
        for attempt in 0..START_ATTEMPTS {
            let port = if self.persistent {
                restartable_port()
            } else {
                free_port()
            };
            match self.launch(port, Some(attempt), K::STARTUP_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(e) => last_failure = e.to_string(),
            }
        }
        Err(ServerError(format!(
            "{} did not start after {START_ATTEMPTS} attempts: {last_failure}",
            K::NAME
        )))
    }

    /// One start on `port`, waiting up to `timeout` until the server is ready.
    fn launch(
        &mut self,
        port: u16,
        attempt: Option<usize>,
        timeout: Duration,
    ) -> Result<(), ServerError> {
        let dir = self.dir.path().to_path_buf();
        let at = Launch {
            port,
            dir: &dir,
            persistent: self.persistent,
            attempt,
        };
        let mut child = self
            .kind
            .command(&at)?
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| ServerError(format!("starting {}: {e}", K::NAME)))?;
        let url = K::url(port);
        match K::wait_ready(&mut child, port, &url, timeout) {
            Ok(()) => {
                self.kind.started(&at);
                self.url = url;
                self.port = Some(port);
                self.child = Some(child);
                Ok(())
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(ServerError(format!("{why}{}", K::failure_detail(&dir))))
            }
        }
    }
}

impl<K: ServerKind> Drop for TestServer<K> {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The readiness loop of every kind: `probe` every [`PROBE_EVERY`] until it says yes, or
/// `child` exits, or `timeout` passes.
///
/// # Errors
/// `"<name> exited with <status> (port <port>)"`, or `"<name> not ready on port <port> within
/// <timeout>"`.
pub fn poll_ready(
    child: &mut Child,
    name: &str,
    port: u16,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("{name} exited with {status} (port {port})"));
        }
        if probe() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{name} not ready on port {port} within {timeout:?}"
            ));
        }
        std::thread::sleep(PROBE_EVERY);
    }
}
