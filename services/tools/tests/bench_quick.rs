//! `tektree-bench --quick` (issue #5) runs in CI so that it never rots: it must exit 0 and
//! print only JSON lines of the documented shape, covering every scenario. No timing is
//! asserted. Its `http` scenario runs the `tektree` binary beside its own in the target
//! directory (crate `tektree-services`; `cargo test --workspace` builds both).

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

#[test]
fn quick_run_prints_one_json_line_per_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tektree-bench"))
        .arg("--quick")
        .arg("--workdir")
        .arg(dir.path())
        // The MongoDB rows run on a SecantusDB server the bench starts itself (scripts/test
        // installs it), whatever the environment names.
        .env_remove("MONGODB_URI")
        .output()
        .expect("running tektree-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tektree-bench --quick failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    let first = lines.first().expect("no output");
    assert!(first["machine"].is_string(), "first line: {first}");
    for key in ["cores", "mem_total_mib", "fsyncs_per_s", "fsync_4k_p99_us"] {
        assert!(first[key].is_number(), "machine line lacks {key}: {first}");
    }

    let mut scenarios = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for l in &lines[1..] {
        let s = l["scenario"]
            .as_str()
            .unwrap_or_else(|| panic!("a line without a scenario: {l}"));
        scenarios.insert(s.to_string());
        assert!(l.get("error").is_none(), "a scenario failed: {l}");
        if l.get("skipped").is_some() {
            assert!(l["skipped"].is_string(), "{l}");
            continue;
        }
        if s == "ratio" {
            assert!(l["ours"].is_string() && l["limit"].is_string(), "{l}");
            assert!(l["ratio"].as_f64().is_some_and(|r| r >= 0.0), "{l}");
            continue;
        }
        for key in ["median", "min", "max"] {
            assert!(l[key].as_f64().is_some(), "{key} missing: {l}");
        }
        assert!(l["min"].as_f64() <= l["median"].as_f64(), "{l}");
        assert!(l["median"].as_f64() <= l["max"].as_f64(), "{l}");
        assert_eq!(l["runs"], 1, "--quick runs each scenario once: {l}");
        assert!(l["unit"].is_string(), "{l}");
        if s == "append" || s == "append_paced" || s == "queries" || s == "http" || s == "lag" {
            assert!(
                l["p50_us"].as_f64().is_some() && l["p99_us"].as_f64().is_some(),
                "{l}"
            );
        }
        if s == "http" {
            // Every command of the workload must be accepted over HTTP (2xx).
            assert_eq!(l["errors"], 0, "{l}");
            assert!(l["n"].as_u64().is_some_and(|n| n > 0), "{l}");
            for key in ["serve_peak_rss_mib", "serve_rss_mib_end"] {
                assert!(l[key].as_f64().is_some_and(|m| m > 0.0), "{key}: {l}");
            }
            for key in ["target", "target_p99_us", "target_serve_rss_mb"] {
                assert!(l[key].is_number(), "{key}: {l}");
            }
        }
        if s == "lag" {
            for key in ["offered_rate", "achieved_rate", "target_p99_us"] {
                assert!(l[key].as_f64().is_some_and(|r| r > 0.0), "{key}: {l}");
            }
            // Every committed command became visible in the read model, none was refused.
            assert_eq!(l["not_visible"], 0, "{l}");
            assert_eq!(l["refused"], 0, "{l}");
        }
        if s == "replay" {
            assert!(
                l["peak_rss_mib_max"].as_f64().is_some_and(|m| m > 0.0),
                "{l}"
            );
        }
        let what = ["clients", "bus", "projection", "query", "limit", "consumer"]
            .iter()
            .find_map(|k| {
                l.get(*k)
                    .map(|v| format!("{k}={}", v.to_string().trim_matches('"')))
            })
            .unwrap_or_default();
        seen.insert(format!("{s}:{what}"));
    }
    // Around-me and the Redis sorted-set peer of the rank queries are measured.
    for q in [
        "around_me",
        "redis_zrevrank",
        "redis_zrevrange_deep",
        "redis_around",
    ] {
        assert!(
            seen.contains(&format!("queries:query={q}")),
            "no {q} line in:\n{stdout}"
        );
    }
    // The MongoDB rows are measured, never skipped, and name their server.
    for s in ["append_mongodb", "relay_mongodb", "projection_mongodb"] {
        let measured: Vec<&Value> = lines
            .iter()
            .filter(|l| l["scenario"] == s && l.get("skipped").is_none())
            .collect();
        assert!(!measured.is_empty(), "no measured {s} line in:\n{stdout}");
        for l in measured {
            assert!(
                l["server"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("SecantusDB")),
                "{l}"
            );
        }
    }
    for s in [
        "append",
        "append_paced",
        "append_mongodb",
        "relay_mongodb",
        "projection_mongodb",
        "policy",
        "relay",
        "projection",
        "replay",
        "queries",
        "limit",
        "ratio",
        "peers",
        "growth",
        "http",
        "lag",
        "lag_max_rate",
    ] {
        assert!(scenarios.contains(s), "no {s} line in:\n{stdout}");
    }
    // Both peers have a line (skipped with --quick: CI does not build sqlx).
    for peer in ["cqrs-es+sqlite-es", "cqrs-es+postgres-es"] {
        assert!(
            lines
                .iter()
                .any(|l| l["scenario"] == "peers" && l["peer"] == peer),
            "no peers line for {peer}:\n{stdout}"
        );
    }
    for p in ["xp", "leaderboard", "quota", "content", "tags"] {
        assert!(
            seen.contains(&format!("projection:projection={p}")),
            "{seen:?}"
        );
        assert!(seen.contains(&format!("replay:projection={p}")), "{seen:?}");
        assert!(seen.contains(&format!("lag:projection={p}")), "{seen:?}");
    }
    for c in ["1", "16"] {
        assert!(seen.contains(&format!("append:clients={c}")), "{seen:?}");
        assert!(seen.contains(&format!("http:clients={c}")), "{seen:?}");
    }
    for l in [
        "sqlite_insert_batched",
        "sqlite_insert_txn_per_row",
        "fsync",
    ] {
        assert!(seen.contains(&format!("limit:limit={l}")), "{seen:?}");
    }
}
