//! Scenario **peers**: the append workload through cqrs-es with `sqlite-es` and `postgres-es`,
//! run by the separate crate `services/tools/bench-peers` (binary `tektree-bench-peers`).
//!
//! That crate is its own workspace with its own `Cargo.lock`: `sqlite-es` / `postgres-es` 0.5
//! pull sqlx 0.8, whose `libsqlite3-sys` cannot be linked beside rusqlite 0.37's (both declare
//! `links = "sqlite3"`), so it cannot be a dependency of this binary. [`run`] builds it with
//! `cargo build --release` into `<workspace>/target/peers` (or uses the binary named by
//! `TEKTREE_BENCH_PEERS_BIN`) and runs it as a child process with our seed and sizes: it
//! includes our `workload.rs`, so the command sequence is identical to the `append` scenario's.
//! See docs/performance.md, "Peers".

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// Environment variable naming a prebuilt `tektree-bench-peers` binary (no build then).
pub const BIN_ENV: &str = "TEKTREE_BENCH_PEERS_BIN";

/// The local PostgreSQL the postgres-es peer runs against (user `postgres`, no password).
pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The peers, as named in the `peer` field of their lines, with their `--backend` value.
const PEERS: [(&str, &str); 2] = [
    ("cqrs-es+sqlite-es", "sqlite"),
    ("cqrs-es+postgres-es", "postgres"),
];

/// `services/tools/bench-peers/Cargo.toml`.
fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-peers/Cargo.toml")
}

/// `<workspace>/target/peers` (or `$CARGO_TARGET_DIR/peers`).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t).join("peers"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/peers"),
    }
}

/// One `skipped` line per peer.
fn skipped_all(reason: &str) -> Vec<Value> {
    PEERS
        .iter()
        .map(|(peer, _)| json!({"scenario": "peers", "peer": peer, "skipped": reason}))
        .collect()
}

/// The peer binary: `TEKTREE_BENCH_PEERS_BIN`, or built now (release) into
/// `<workspace>/target/peers`. `Err` holds the reason for the `skipped` lines.
fn binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os(BIN_ENV).filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("{BIN_ENV}={} is not a file", bin.display()))
        };
    }
    let (manifest, target) = (manifest(), target_dir());
    eprintln!(
        "tektree-bench: peers: building {} into {} (release; the first build compiles sqlx, a few minutes)",
        manifest.display(),
        target.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("running cargo build for {}: {e}", manifest.display()))?;
    if !status.success() {
        return Err(format!(
            "cargo build --release --manifest-path {} failed ({status})",
            manifest.display()
        ));
    }
    let bin = target.join("release/tektree-bench-peers");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} missing after the build", bin.display()))
    }
}

/// Whether something accepts TCP connections at the host and port of `url`
/// (`postgres://user@host:port/db`).
fn reachable(url: &str) -> Result<(), String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split(['/', '?']).next().unwrap_or(rest);
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let addr = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("PostgreSQL at {addr}: {e}"))?;
    for a in addrs {
        if TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok() {
            return Ok(());
        }
    }
    Err(format!("PostgreSQL at {addr} is unreachable"))
}

/// Runs the peers and returns their JSON lines, one per (peer, client count):
/// `{"scenario":"peers","peer":"cqrs-es+sqlite-es"|"cqrs-es+postgres-es","clients":N,
/// "unit":"commands/s","median","min","max","runs","p50_us","p99_us","commands","errors",
/// "conflict_retries","events","events_per_s_median","pool_connections"}` — the same workload
/// (`seed`, `commands`) and client counts as the `append` scenario, `runs` fresh stores each;
/// SQLite files in `workdir`, PostgreSQL in a throwaway database per run on [`POSTGRES_URL`].
///
/// Instead, `{"scenario":"peers","peer":…,"skipped":reason}` when `quick` (no build: CI must not
/// compile sqlx), when PostgreSQL is unreachable (that peer only), or when the peer binary
/// cannot be built; `{"scenario":"peers","peer":…,"clients":N,"error":…}` when a run failed.
///
/// The ratio ours / peer is the `append` line's `median` (commands/s) at the same `clients`
/// over this line's `median`.
pub fn run(
    quick: bool,
    runs: usize,
    commands: u64,
    clients: &[usize],
    seed: u64,
    workdir: &Path,
) -> Vec<Value> {
    if quick {
        return skipped_all(
            "not run with --quick (it would compile sqlx in CI); the full run builds services/tools/bench-peers itself: cargo build --release -p tektree-services -p tektree-tools && target/release/tektree-bench --scenario peers",
        );
    }
    let bin = match binary() {
        Ok(b) => b,
        Err(reason) => return skipped_all(&reason),
    };
    let clients: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
    let mut lines = Vec::new();
    for (peer, backend) in PEERS {
        if backend == "postgres" {
            if let Err(reason) = reachable(POSTGRES_URL) {
                lines.push(json!({"scenario": "peers", "peer": peer, "skipped": reason}));
                continue;
            }
        }
        eprintln!("tektree-bench: peers: {peer}");
        let output = Command::new(&bin)
            .arg("--backend")
            .arg(backend)
            .arg("--commands")
            .arg(commands.to_string())
            .arg("--clients")
            .arg(clients.join(","))
            .arg("--runs")
            .arg(runs.max(1).to_string())
            .arg("--seed")
            .arg(seed.to_string())
            .arg("--workdir")
            .arg(workdir)
            .arg("--postgres-url")
            .arg(POSTGRES_URL)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                lines.push(json!({"scenario": "peers", "peer": peer,
                    "error": format!("running {}: {e}", bin.display())}));
                continue;
            }
        };
        let before = lines.len();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() => lines.push(v),
                _ => eprintln!("tektree-bench: peers: ignoring output line {line:?}"),
            }
        }
        if lines.len() == before {
            lines.push(json!({"scenario": "peers", "peer": peer,
                "error": format!("{} printed no result ({})", bin.display(), output.status)}));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_skips_without_building() {
        let lines = run(true, 1, 10, &[1], 1, Path::new("."));
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l["skipped"].is_string()));
        assert_eq!(lines[0]["peer"], "cqrs-es+sqlite-es");
    }

    #[test]
    fn manifest_is_the_peer_crate() {
        assert!(manifest().is_file(), "{}", manifest().display());
    }
}
