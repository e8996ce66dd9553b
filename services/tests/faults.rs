//! Issue #4, fault suite at CI size: runs the `tektree-faults` harness (docs/reliability.md) on
//! both buses — real `redis-server` and `nats-server -js` with persistence, `tektree` api, relay
//! and workers as separate processes, 300 commands per bus under 8 injected faults plus 1–2
//! poison events — and requires a clean summary: exit status 0 and `"mismatches": 0`.
//!
//! The seed is random per run (printed by the harness); set `TEKTREE_FAULTS_SEED` to repeat a
//! run. On failure the harness keeps its directory (stores, bus data, every process's log) and
//! prints where.

use std::process::Command;

use serde_json::Value;

#[test]
fn small_fault_run_on_both_buses_has_no_mismatches() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tektree-faults"));
    cmd.args(["--commands", "300", "--faults", "8", "--bus", "both"])
        .args(["--settle-timeout", "5m", "--keep"])
        .args(["--tektree", env!("CARGO_BIN_EXE_tektree")]);
    if let Ok(seed) = std::env::var("TEKTREE_FAULTS_SEED") {
        cmd.args(["--seed", seed.trim()]);
    }
    let out = cmd.output().expect("running tektree-faults");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary line on stdout: {stdout:?}"));
    eprintln!("summary: {summary}");
    assert!(
        out.status.success(),
        "tektree-faults failed with {}: {summary}",
        out.status
    );
    assert_eq!(summary["mismatches"], 0, "{summary}");
    let runs = summary["runs"].as_array().expect("one run per bus");
    assert_eq!(runs.len(), 2, "{summary}");
    for run in runs {
        assert_eq!(run["mismatches"], 0, "{run}");
        assert!(run["ok"].as_u64().unwrap_or(0) > 0, "{run}");
        // Every fault kind was injected (8 faults cycle through the five kinds); aborts armed
        // between a read-model commit and its acknowledgement fire when the worker commits.
        let faults = &run["faults"];
        for kind in [
            "api_kill",
            "relay_kill",
            "worker_kill",
            "bus_restart",
            "poison",
        ] {
            assert!(faults[kind].as_u64().unwrap_or(0) >= 1, "{kind}: {run}");
        }
    }
}
