//! The Stack Exchange importer end to end, on real temporary SQLite files, with the bundled
//! History Meta dump (samples/stackexchange/history.meta).
//!
//! The import is expensive (~23k commands, ~34k policy commands), so the dump tests share one
//! set of runs (computed once, on first use, in its own runtime):
//! 1. Redis bus (a real `redis-server`), pipeline in-process, `import_stackexchange` + settle;
//! 2. the same on NATS JetStream (a real `nats-server -js`);
//! 3. in-process bus through `run_import_cli` (which runs and settles the pipeline itself);
//! 4. a second `run_import_cli` over the store of run 3, reopened;
//!
//! then every projection is rebuilt from the store of runs 3–4 into fresh read models.
//!
//! Expected values are computed from the XML by a small line-based parser (tests/common, not
//! the importer's reader), the XP rules of issue #2 §4, and the achievements, weekly quest
//! and streak milestones of issue #6 (their conditions evaluated by the test itself; only
//! the XP rewards are read from the default rules, `config/gamification.toml`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use common::*;
use tektree_domain::Rules;
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_projections::SqliteReadModels;
use tektree_services::app::App;
use tektree_services::import::{import_stackexchange, run_import_cli, ImportError, ImportOptions};
use tektree_services::replay::rebuild;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The runs.

struct Runs {
    expected: Expected,
    redis: Result<Run, String>,
    nats: Result<Run, String>,
    memory: Result<Run, String>,
    second: Result<Run, String>,
    /// Every read model's export after rebuilding it from the store of runs 3–4.
    rebuilt: Result<Exports, String>,
}

type Exports = BTreeMap<&'static str, Vec<serde_json::Value>>;

/// Import with the pipeline in-process on a shared bus (`redis://` or `nats://`).
async fn bus_run(bus_url: &str, expected: &Expected) -> Result<Run, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = format!("sqlite://{}", dir.path().join("tektree.db").display());
    let app = App::open(&store, bus_url, Rules::default())
        .await
        .map_err(|e| e.to_string())?;
    assert!(!app.in_process_bus);
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    let started = Instant::now();
    let result = async {
        let report = import_stackexchange(&app, &dump_dir(), SITE, ImportOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        app.settle(SETTLE).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(report)
    }
    .await;
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    collect(&app, result?, expected, elapsed).await
}

async fn memory_runs(
    expected: &Expected,
) -> (
    Result<Run, String>,
    Result<Run, String>,
    Result<Exports, String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("tektree.db").display());
    let first = async {
        let app = App::open(&store, "memory", Rules::default())
            .await
            .map_err(|e| e.to_string())?;
        assert!(app.in_process_bus);
        let started = Instant::now();
        // No site: it defaults to the directory name, `history.meta`.
        let report = run_import_cli(&app, &dump_dir(), None)
            .await
            .map_err(|e| format!("{e:#}"))?;
        collect(&app, report, expected, started.elapsed()).await
    }
    .await;
    // A second process importing the same dump into the same store.
    let second = async {
        let app = App::open(&store, "memory", Rules::default())
            .await
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let report = run_import_cli(&app, &dump_dir(), Some(SITE))
            .await
            .map_err(|e| format!("{e:#}"))?;
        collect(&app, report, expected, started.elapsed()).await
    }
    .await;
    // Replay: every projection rebuilt from that store into fresh read models, as
    // `tektree-replay rebuild` does.
    let rebuilt = async {
        let app = App::open(&store, "memory", Rules::default())
            .await
            .map_err(|e| e.to_string())?;
        let fresh =
            SqliteReadModels::open(dir.path().join("rebuilt.db")).map_err(|e| e.to_string())?;
        let started = Instant::now();
        for (name, _) in MODELS {
            rebuild(app.store.as_ref(), &fresh, name.parse().unwrap(), |_| {})
                .await
                .map_err(|e| format!("rebuild {name}: {e}"))?;
        }
        eprintln!(
            "rebuild of every projection: {:.1} s",
            started.elapsed().as_secs_f64()
        );
        exports(&fresh).await
    }
    .await;
    (first, second, rebuilt)
}

fn runs() -> &'static Runs {
    static RUNS: OnceLock<Runs> = OnceLock::new();
    RUNS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let expected = expected();
            let redis_server = RedisServer::start();
            let redis = bus_run(&redis_server.url, &expected).await;
            let nats_server = NatsServer::start();
            let nats = bus_run(&nats_server.url, &expected).await;
            let (memory, second, rebuilt) = memory_runs(&expected).await;
            for (name, r) in [
                ("redis", &redis),
                ("nats", &nats),
                ("memory", &memory),
                ("second", &second),
            ] {
                if let Ok(r) = r {
                    eprintln!(
                        "{name} run: {:.1} s including settle, head {}\n{}",
                        r.elapsed.as_secs_f64(),
                        r.head,
                        r.report
                    );
                }
            }
            Runs {
                expected,
                redis,
                nats,
                memory,
                second,
                rebuilt,
            }
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Assertions.

fn ok<'a>(r: &'a Result<Run, String>, name: &str) -> &'a Run {
    r.as_ref()
        .unwrap_or_else(|e| panic!("{name} run failed: {e}"))
}

#[test]
fn import_with_redis_bus_matches_the_dump() {
    let runs = runs();
    assert_matches_dump(ok(&runs.redis, "redis"), &runs.expected);
}

/// Field-by-field equality of every read model's export and of the report.
fn assert_same_read_models(a: &Run, b: &Run, what: &str) {
    for (name, _) in MODELS {
        let (ra, rb) = (&a.exports[name], &b.exports[name]);
        assert!(!ra.is_empty(), "{name} export is empty");
        assert_eq!(ra.len(), rb.len(), "{name}: row counts differ ({what})");
        for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
            assert_eq!(x, y, "{name} row {i}: {what}");
        }
    }
    assert_eq!(a.report.kinds, b.report.kinds, "reports differ ({what})");
    // The store heads may differ: how often `gamification.level.up` fires depends on the order
    // in which the policy applies a user's awards (a downvote can drop a total below a level
    // boundary that a later upvote crosses again), and that order varies from run to run (the
    // importer sends 8 commands at once). The other read models, sums of awards that do not
    // depend on the order, do not.
}

#[test]
fn import_with_in_process_bus_gives_identical_read_models() {
    let runs = runs();
    let (redis, memory) = (ok(&runs.redis, "redis"), ok(&runs.memory, "memory"));
    assert_matches_dump(memory, &runs.expected);
    assert_same_read_models(redis, memory, "redis run vs in-process run");
}

#[test]
fn import_with_nats_bus_gives_identical_read_models() {
    let runs = runs();
    let (redis, nats) = (ok(&runs.redis, "redis"), ok(&runs.nats, "nats"));
    assert_matches_dump(nats, &runs.expected);
    assert_same_read_models(redis, nats, "redis run vs nats run");
}

// ---------------------------------------------------------------------------------------------
// Achievements, quests and streak milestones (issue #6).

#[test]
fn import_unlocks_exactly_the_goals_computed_from_the_dump() {
    let runs = runs();
    let x = &runs.expected;
    eprintln!("goals reached on the dump: {}", x.goals.summary());
    for (name, r) in [
        ("redis", &runs.redis),
        ("nats", &runs.nats),
        ("memory", &runs.memory),
    ] {
        let run = ok(r, name);
        // Each stored once (`goals` panics on a duplicate) and exactly the expected sets.
        assert_goals_match_dump(run, x, name);
        eprintln!("{name} run unlocked: {}", run.unlocks.goals(name).summary());
    }
}

#[test]
fn unlocks_are_identical_on_every_bus_and_a_second_import_adds_none() {
    let runs = runs();
    let memory = ok(&runs.memory, "memory").unlocks.goals("memory");
    for (name, r) in [("redis", &runs.redis), ("nats", &runs.nats)] {
        assert_eq!(ok(r, name).unlocks.goals(name), memory, "{name} vs memory");
    }
    // Same store: the second import stored no unlock event at all.
    let (first, second) = (ok(&runs.memory, "memory"), ok(&runs.second, "second"));
    assert_eq!(second.unlocks, first.unlocks);
}

/// The `weekly:*` boards hold the XP of each week's activity plus the rewards of the quests
/// completed in that week. Which activity reaches a goal depends on the order in which the
/// policy sees a user's activities — the store order, which the importer's concurrency (8
/// commands in flight) varies from run to run. Achievement rewards therefore count all-time
/// only, and a quest's reward lands in the quest's own week: the expected boards, computed from
/// the dump with the acts in each run's store order, must not depend on that order.
#[test]
fn weekly_boards_match_the_dump_in_each_runs_order() {
    let runs = runs();
    let x = &runs.expected;
    let file_order: HashMap<Uuid, u64> = (x.acts.iter().enumerate())
        .map(|(i, (key, ..))| (*key, i as u64))
        .collect();
    let (goals, in_file_order) = x.in_order(&file_order);
    assert_eq!(goals, x.goals);
    for (name, r) in [
        ("redis", &runs.redis),
        ("nats", &runs.nats),
        ("memory", &runs.memory),
    ] {
        let run = ok(r, name);
        let (goals, want) = x.in_order(&run.positions);
        assert_eq!(
            goals, x.goals,
            "{name}: the goals reached depend on the order"
        );
        let got = weekly_boards(run);
        let diff: Vec<_> = (want.keys().chain(got.keys()))
            .filter(|k| want.get(*k) != got.get(*k))
            .map(|k| (k, want.get(k), got.get(k)))
            .collect();
        assert!(
            diff.is_empty(),
            "{name}: ((board, user), want, got): {diff:?}"
        );
        let moved = (want.iter())
            .filter(|(k, v)| in_file_order.get(*k) != Some(*v))
            .count();
        assert_eq!(
            moved, 0,
            "{name}: weekly boards depend on the order of the run"
        );
    }
}

#[test]
fn rebuild_from_the_store_gives_the_live_read_models() {
    let runs = runs();
    let live = &ok(&runs.second, "second").exports;
    let rebuilt = runs
        .rebuilt
        .as_ref()
        .unwrap_or_else(|e| panic!("rebuild failed: {e}"));
    for (name, _) in MODELS {
        assert_eq!(live[name].len(), rebuilt[name].len(), "{name}: row count");
        assert!(
            live[name] == rebuilt[name],
            "{name}: rebuilt read model differs"
        );
    }
}

#[test]
fn second_import_changes_nothing() {
    let runs = runs();
    let (first, second) = (ok(&runs.memory, "memory"), ok(&runs.second, "second"));
    assert_eq!(second.head, first.head, "the second import wrote events");
    for k in &second.report.kinds {
        let f = first.report.kind(k.kind);
        assert_eq!(k.accepted, 0, "{}\n{}", k.kind, second.report);
        assert_eq!(k.events, 0, "{}", k.kind);
        assert_eq!(k.unchanged, f.accepted + f.unchanged, "{}", k.kind);
        assert_eq!(k.rejected, f.rejected, "{}", k.kind);
        assert_eq!(k.skipped, f.skipped, "{}", k.kind);
    }
    assert_eq!(second.exports, first.exports);
}

// ---------------------------------------------------------------------------------------------
// Malformed input.

/// A dump directory with the real files, where `file` is replaced by `text`.
fn dump_with(file: &str, text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["Users.xml", "Posts.xml", "Comments.xml", "Votes.xml"] {
        std::fs::copy(dump_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join(file), text).unwrap();
    dir
}

async fn import_err(dir: &Path) -> (ImportError, u64) {
    let db = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", db.path().join("tektree.db").display());
    let app = App::open(&store, "memory", Rules::default()).await.unwrap();
    let err = import_stackexchange(&app, dir, SITE, ImportOptions::default())
        .await
        .expect_err("the import must fail");
    let head = app.store.head().await.unwrap().position;
    (err, head)
}

#[tokio::test]
async fn malformed_or_truncated_file_names_file_and_line() {
    // Truncated in the middle of line 101 (row 99).
    let comments = std::fs::read_to_string(dump_dir().join("Comments.xml")).unwrap();
    let lines: Vec<&str> = comments.lines().collect();
    let truncated = format!("{}\n{}", lines[..100].join("\n"), &lines[100][..40]);
    let dir = dump_with("Comments.xml", &truncated);
    let (err, head) = import_err(dir.path()).await;
    match &err {
        ImportError::Malformed { path, line, .. } => {
            assert!(path.ends_with("Comments.xml"), "{err}");
            assert_eq!(*line, 101, "{err}");
        }
        other => panic!("expected Malformed, got {other}"),
    }
    assert!(err.to_string().contains("Comments.xml:101:"), "{err}");
    assert_eq!(head, 0, "nothing is imported from a malformed dump");

    // Cut after a complete row: the root element is not closed.
    let cut = lines[..50].join("\n") + "\n";
    let dir = dump_with("Comments.xml", &cut);
    let (err, head) = import_err(dir.path()).await;
    assert!(err.to_string().contains("Comments.xml:51:"), "{err}");
    assert!(err.to_string().contains("not closed"), "{err}");
    assert_eq!(head, 0);

    // A well-formed row with a malformed value.
    let votes = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<votes>\n  \
                 <row Id=\"1\" PostId=\"2\" VoteTypeId=\"2\" CreationDate=\"2011-10-11T00:00:00.000\" />\n  \
                 <row Id=\"2\" PostId=\"2\" VoteTypeId=\"2\" CreationDate=\"yesterday\" />\n</votes>\n";
    let dir = dump_with("Votes.xml", votes);
    let (err, head) = import_err(dir.path()).await;
    assert!(err.to_string().contains("Votes.xml:4:"), "{err}");
    assert!(err.to_string().contains("CreationDate"), "{err}");
    assert_eq!(head, 0);

    // Mismatched end tag.
    let users = "<users>\n<row Id=\"1\" DisplayName=\"a\" CreationDate=\"2011-10-11T00:00:00\" />\n</posts>\n";
    let dir = dump_with("Users.xml", users);
    let (err, _) = import_err(dir.path()).await;
    assert!(err.to_string().contains("Users.xml:3:"), "{err}");
}
