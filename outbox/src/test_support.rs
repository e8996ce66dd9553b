//! Real servers for tests (this crate's and other crates').
//!
//! Tests run against a real `redis-server` / `nats-server` rather than a mock:
//! [`RedisServer::start`] and [`NatsServer::start`] start a throwaway one (or reuse the server
//! named by `TEKTREE_TEST_REDIS_URL` / `TEKTREE_TEST_NATS_URL`), and [`unique_stream_key`] /
//! [`unique_nats_names`] keep tests that share a server apart.
//!
//! Fault drills (the `tektree-faults` harness) need servers that keep their data across a
//! crash: [`TestServer::start_persistent`] starts one with persistence on in a given directory,
//! and [`TestServer::stop`] / [`TestServer::restart`] stop it (SIGKILL or SIGTERM, see [`Stop`])
//! and start it again on the same port with the same data.
//!
//! The server handle ([`TestServer`]) and the MongoDB server ([`MongoServer`]) are in the
//! `tektree-test-servers` crate; this module adds the Redis and NATS [`ServerKind`]s.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tektree_test_servers::process::{find_program, STARTUP_TIMEOUT};
use tektree_test_servers::server::{poll_ready, Launch};
pub use tektree_test_servers::{
    mongo_uri_with_database, restartable_port, MongoServer, ServerError, ServerKind, Stop,
    TestServer,
};

/// Environment variable naming an already running Redis (`redis://host:port`) to use instead
/// of starting one.
pub const REDIS_URL_ENV: &str = "TEKTREE_TEST_REDIS_URL";

/// Environment variable naming an already running NATS server with JetStream enabled
/// (`nats://host:port`) to use instead of starting one.
pub const NATS_URL_ENV: &str = "TEKTREE_TEST_NATS_URL";

/// A Redis server for one test: `redis-server --port <free port> --bind 127.0.0.1 --save ""
/// --appendonly no --dir <temp dir>`, ready once it answers `PING` (up to 10 s), killed when
/// dropped — or, when `TEKTREE_TEST_REDIS_URL` is set, that server (left running).
/// [`TestServer::start_persistent`] runs it with `--appendonly yes --appendfsync always
/// --logfile <dir>/redis.log` instead, so that every write it acknowledged survives a SIGKILL.
pub type RedisServer = TestServer<Redis>;

/// The [`ServerKind`] of [`RedisServer`].
#[derive(Debug, Default)]
pub struct Redis;

impl ServerKind for Redis {
    const NAME: &'static str = "redis-server";
    const REUSE_ENV: &'static str = REDIS_URL_ENV;
    const STARTUP_TIMEOUT: Duration = STARTUP_TIMEOUT;

    fn command(&mut self, at: &Launch<'_>) -> Result<Command, ServerError> {
        let binary = find_program("redis-server", []).ok_or_else(|| {
            ServerError(format!(
                "redis-server is not on PATH: install redis-server (scripts/test does it with \
                 apt-get), or set {REDIS_URL_ENV} to a running server"
            ))
        })?;
        let mut cmd = Command::new(binary);
        cmd.args(["--port", &at.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""]);
        if at.persistent {
            cmd.args(["--appendonly", "yes"])
                .args(["--appendfsync", "always"])
                .arg("--logfile")
                .arg(at.dir.join("redis.log"));
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.arg("--dir")
            .arg(at.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(cmd)
    }

    fn url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}")
    }

    /// Ready once it answers `PING` with `+PONG`.
    fn wait_ready(
        child: &mut Child,
        port: u16,
        _url: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        poll_ready(child, Self::NAME, port, timeout, || ping(addr))
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

/// A NATS server with JetStream for one test: `nats-server -js -a 127.0.0.1 -p <free port> -sd
/// <temp dir>/js-<attempt>` (the binary from `PATH`, then `/usr/sbin`), ready once it greets a
/// TCP connection announcing JetStream and an `async_nats` client gets its JetStream account
/// (up to 10 s), killed when dropped — or, when `TEKTREE_TEST_NATS_URL` is set, that server
/// (left running). [`TestServer::start_persistent`] keeps the store in `<dir>/jetstream` and
/// logs to `<dir>/nats.log`; the streams the bus creates are file-backed.
pub type NatsServer = TestServer<Nats>;

/// The [`ServerKind`] of [`NatsServer`]: remembers the JetStream store (`-sd`) of the last
/// start, which a restart reopens.
#[derive(Debug, Default)]
pub struct Nats {
    store: Option<PathBuf>,
}

impl Nats {
    /// The store a start uses: a persistent server's `jetstream`, a restart's last one, or a
    /// fresh `js-<attempt>` per attempt (a failed attempt may leave a half-initialised one).
    fn store_for(&self, at: &Launch<'_>) -> PathBuf {
        match (at.persistent, at.attempt, &self.store) {
            (true, _, _) => at.dir.join("jetstream"),
            (false, None, Some(last)) => last.clone(),
            (false, attempt, _) => at.dir.join(format!("js-{}", attempt.unwrap_or(0))),
        }
    }
}

impl ServerKind for Nats {
    const NAME: &'static str = "nats-server";
    const REUSE_ENV: &'static str = NATS_URL_ENV;
    const STARTUP_TIMEOUT: Duration = STARTUP_TIMEOUT;

    fn command(&mut self, at: &Launch<'_>) -> Result<Command, ServerError> {
        // Debian installs it in /usr/sbin, outside a normal user's PATH.
        let binary =
            find_program("nats-server", [PathBuf::from("/usr/sbin")]).ok_or_else(|| {
                ServerError(format!(
                    "nats-server is neither on PATH nor in /usr/sbin: install nats-server \
                 (scripts/test does it with apt-get), or set {NATS_URL_ENV} to a running \
                 server with JetStream enabled"
                ))
            })?;
        let mut cmd = Command::new(binary);
        cmd.arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &at.port.to_string()])
            .arg("-sd")
            .arg(self.store_for(at));
        if at.persistent {
            cmd.arg("-l").arg(at.dir.join("nats.log"));
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        Ok(cmd)
    }

    fn url(port: u16) -> String {
        format!("nats://127.0.0.1:{port}")
    }

    /// Ready once a TCP connection is greeted with an `INFO` announcing JetStream and an
    /// `async_nats` client gets its JetStream account info.
    fn wait_ready(
        child: &mut Child,
        port: u16,
        url: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        poll_ready(child, Self::NAME, port, timeout, || {
            nats_info_has_jetstream(addr) && nats_client_ready(url)
        })
    }

    fn started(&mut self, at: &Launch<'_>) {
        self.store = Some(self.store_for(at));
    }
}

/// Stops `server` (SIGKILL), deletes its JetStream store and starts it again on the same
/// port, empty: a server that lost every stream and key-value bucket with its disk (the
/// fault harness's bus wipe). Deleting the streams through the API instead races, on
/// nats-server 2.9.10, with a client recreating a stream of the same name: the new stream's
/// files were removed under it (`error opening msg block file`), seen once in a fault run.
///
/// # Errors
/// [`ServerError`] for a server this handle did not start, when the store cannot be removed,
/// or when the server does not come back.
pub fn restart_nats_empty(server: &mut NatsServer) -> Result<(), ServerError> {
    server.stop(Stop::Kill)?;
    if let Some(store) = server.kind().store.clone() {
        match std::fs::remove_dir_all(&store) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ServerError(format!(
                    "removing the JetStream store {}: {e}",
                    store.display()
                )))
            }
        }
    }
    server.restart()
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

    /// An emptied NATS server comes back on its port without any stream.
    #[tokio::test]
    async fn an_emptied_nats_comes_back_on_its_port_without_streams() {
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
        restart_nats_empty(&mut server).unwrap();
        assert!(server.is_running());
        assert_eq!(server.port(), port);
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        assert!(
            js.get_stream(&names.stream).await.is_err(),
            "the stream survived"
        );
        assert_eq!(connect().await.unwrap().last_published().await.unwrap(), 0);
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
        let mut server = RedisServer::named("redis://127.0.0.1:1");
        assert!(server.stop(Stop::Kill).is_err());
        assert!(server.restart().is_err());
    }
}
