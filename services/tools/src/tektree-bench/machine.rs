//! The machine line: cores, memory, load and the fsync latency of the work directory's disk.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::stats::{percentile, round1};

/// fsync latency of one disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fsync {
    /// Median latency of a 4 KiB write + `fdatasync`, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Write + `fdatasync` pairs per second, back to back.
    pub per_s: f64,
}

/// Writes 4 KiB and calls `fdatasync` `n` times on a temporary file in `dir`. With
/// `in_place`, the file is first written in full and synced, and the measured writes
/// overwrite it (as a SQLite WAL in steady state does); otherwise each write extends the file,
/// so each `fdatasync` also commits the new file size.
///
/// # Errors
/// When the file cannot be created or written.
pub fn measure_fsync(dir: &Path, n: usize, in_place: bool) -> io::Result<Fsync> {
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    if in_place {
        for i in 0..n {
            file.write_all_at(&block, (i as u64) * 4096)?;
        }
        file.sync_all()?;
    }
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        file.write_all_at(&block, (i as u64) * 4096)?;
        file.sync_data()?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    samples.sort_by(f64::total_cmp);
    Ok(Fsync {
        p50_us: round1(percentile(&samples, 50.0)),
        p99_us: round1(percentile(&samples, 99.0)),
        per_s: round1(n as f64 / total.max(1e-9)),
    })
}

/// A `/proc/meminfo` field in MiB (`None` when absent).
fn meminfo_mib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The machine line (`{"machine": …}`) with the fsync measurements (overwriting in place,
/// and extending the file), or the error of the probe.
pub fn machine_line(fsync: Result<(Fsync, Fsync), String>) -> Value {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut v = json!({
        "machine": host,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu_model(),
        "mem_total_mib": meminfo_mib("MemTotal"),
        "mem_available_mib": meminfo_mib("MemAvailable"),
        "load_average": load_average(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    match fsync {
        Ok((f, appending)) => {
            v["fsync_4k_p50_us"] = json!(f.p50_us);
            v["fsync_4k_p99_us"] = json!(f.p99_us);
            v["fsyncs_per_s"] = json!(f.per_s);
            v["fsync_appending_4k_p50_us"] = json!(appending.p50_us);
            v["fsync_appending_4k_p99_us"] = json!(appending.p99_us);
            v["fsyncs_appending_per_s"] = json!(appending.per_s);
        }
        Err(e) => v["fsync_error"] = json!(e),
    }
    v
}

/// Peak resident set size of this process (`VmHWM` of `/proc/self/status`) in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("self", "VmHWM")
}

/// The KiB value of `field` (`VmHWM`, `VmRSS`, …) in `/proc/<pid>/status` (`pid` may be
/// `self`).
pub fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.split(':').next() == Some(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc() {
        assert!(meminfo_mib("MemTotal").is_some_and(|m| m > 0));
        assert!(peak_rss_kib().is_some_and(|k| k > 0));
        assert!(proc_status_kib("self", "VmRSS").is_some_and(|k| k > 0));
        let dir = tempfile::tempdir().unwrap();
        for in_place in [true, false] {
            let f = measure_fsync(dir.path(), 5, in_place).unwrap();
            assert!(f.p99_us >= f.p50_us && f.per_s > 0.0);
        }
    }
}
