//! The Stack Exchange importer end to end, on real temporary SQLite files, with the bundled
//! History Meta dump (samples/stackexchange/history.meta).
//!
//! The import is expensive (~35k commands, ~50k policy commands), so the three dump tests share
//! one set of runs (computed once, on first use, in its own runtime):
//! 1. Redis bus (a real `redis-server`), pipeline in-process, `import_stackexchange` + settle;
//! 2. in-process bus through `run_import_cli` (which runs and settles the pipeline itself);
//! 3. a second `run_import_cli` over the store of run 2, reopened.
//!
//! Expected values are computed from the XML by a small line-based parser in this file (not the
//! importer's reader) and the XP rules of issue #2 §4.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tektree_domain::Rules;
use tektree_outbox::test_support::RedisServer;
use tektree_projections::{ContentRow, LeaderboardRow, ReadModel, XpRow};
use tektree_services::app::App;
use tektree_services::import::{
    import_stackexchange, run_import_cli, CommandKind, ImportError, ImportOptions, ImportReport,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

const SITE: &str = "history.meta";
/// A bound against a stuck pipeline, not a speed assertion.
const SETTLE: Duration = Duration::from_secs(600);
/// Entries of the all-time leaderboard compared with the expected ranking.
const TOP: u32 = 50;

fn dump_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/stackexchange/history.meta")
}

fn v5(kind: &str, id: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("stackexchange:{SITE}:{kind}:{id}").as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// Independent reading of the dump: every row is one line `<row A="v" … />`; only numeric
// attributes are needed, so values are taken raw (no unescaping).

type Attrs = HashMap<String, String>;

fn dump_rows(file: &str) -> Vec<Attrs> {
    let text = std::fs::read_to_string(dump_dir().join(file)).unwrap();
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("<row "))
        .map(|mut rest| {
            let mut attrs = Attrs::new();
            loop {
                rest = rest.trim_start();
                let Some(eq) = rest.find("=\"") else { break };
                let name = rest[..eq].to_string();
                let after = &rest[eq + 2..];
                let end = after.find('"').expect("closing quote");
                attrs.insert(name, after[..end].to_string());
                rest = &after[end + 1..];
            }
            attrs
        })
        .collect()
}

fn num(a: &Attrs, k: &str) -> i64 {
    a.get(k).map(|v| v.parse().unwrap()).unwrap_or(0)
}

#[derive(Debug, Default, Clone, PartialEq)]
struct ExpectedXp {
    xp: i64,
    questions: u64,
    answers: u64,
    accepted_answers: u64,
}

/// What the read models and the report must say, derived from the XML alone.
#[derive(Debug)]
struct Expected {
    users: Vec<Uuid>,
    content: BTreeMap<Uuid, ContentRow>,
    xp: BTreeMap<Uuid, ExpectedXp>,
    /// (accepted, rejected by reason, skipped) per kind.
    report: BTreeMap<CommandKind, (u64, BTreeMap<String, u64>, u64)>,
}

fn expected() -> Expected {
    let users = dump_rows("Users.xml");
    let posts = dump_rows("Posts.xml");
    let comments = dump_rows("Comments.xml");
    let votes = dump_rows("Votes.xml");
    let by_id: HashMap<&str, &Attrs> = posts.iter().map(|p| (p["Id"].as_str(), p)).collect();
    let owner = |p: &Attrs| p.get("OwnerUserId").map(|u| v5("user", u));
    let is_content = |p: &Attrs| matches!(p["PostTypeId"].as_str(), "1" | "2");

    let mut xp: BTreeMap<Uuid, ExpectedXp> = BTreeMap::new();
    fn award(xp: &mut BTreeMap<Uuid, ExpectedXp>, u: Option<Uuid>, n: i64) {
        if let Some(u) = u {
            xp.entry(u).or_default().xp += n;
        }
    }
    let mut report: BTreeMap<CommandKind, (u64, BTreeMap<String, u64>, u64)> = CommandKind::ALL
        .iter()
        .map(|k| (*k, Default::default()))
        .collect();
    let mut count = |k: CommandKind, rejected: Option<&str>, skipped: bool| {
        let e = report.get_mut(&k).unwrap();
        match (rejected, skipped) {
            (Some(r), _) => *e.1.entry(r.to_string()).or_default() += 1,
            (None, true) => e.2 += 1,
            (None, false) => e.0 += 1,
        }
    };

    for u in &users {
        award(&mut xp, Some(v5("user", &u["Id"])), 1);
        count(CommandKind::RegisterUser, None, false);
    }
    let mut content = BTreeMap::new();
    for p in &posts {
        let id = v5("post", &p["Id"]);
        let (kind, question_id, points) = match p["PostTypeId"].as_str() {
            "1" => ("question", None, 2),
            "2" => ("answer", Some(v5("post", &p["ParentId"])), 5),
            _ => {
                count(CommandKind::OtherPost, None, true);
                continue;
            }
        };
        award(&mut xp, owner(p), points);
        if let Some(u) = owner(p) {
            let e = xp.get_mut(&u).unwrap();
            if kind == "question" {
                e.questions += 1
            } else {
                e.answers += 1
            }
        }
        count(
            if kind == "question" {
                CommandKind::PostQuestion
            } else {
                CommandKind::SubmitAnswer
            },
            None,
            false,
        );
        content.insert(
            id,
            ContentRow {
                content_id: id,
                kind: Some(kind.into()),
                question_id,
                author_id: owner(p),
                score: num(p, "Score"),
                upvotes: 0,
                downvotes: 0,
                answer_count: num(p, "AnswerCount"),
                comment_count: num(p, "CommentCount"),
                accepted_answer_id: p.get("AcceptedAnswerId").map(|a| v5("post", a)),
            },
        );
    }
    for c in &comments {
        let target = by_id.get(c["PostId"].as_str());
        assert!(
            target.is_some_and(|p| is_content(p)),
            "comment on a missing post"
        );
        award(&mut xp, c.get("UserId").map(|u| v5("user", u)), 1);
        count(CommandKind::AddComment, None, false);
    }
    for v in &votes {
        let post = by_id.get(v["PostId"].as_str()).copied();
        match v["VoteTypeId"].as_str() {
            t @ ("2" | "3") => {
                let (k, points, field) = if t == "2" {
                    (CommandKind::Upvote, 10, 0)
                } else {
                    (CommandKind::Downvote, -2, 1)
                };
                match post {
                    None => count(k, Some("not_found.content"), false),
                    Some(p) => {
                        assert!(is_content(p));
                        award(&mut xp, owner(p), points);
                        let row = content.get_mut(&v5("post", &p["Id"])).unwrap();
                        if field == 0 {
                            row.upvotes += 1
                        } else {
                            row.downvotes += 1
                        }
                        count(k, None, false);
                    }
                }
            }
            "1" => match post {
                None => count(CommandKind::AcceptAnswer, Some("not_found.answer"), false),
                Some(a) => {
                    assert_eq!(a["PostTypeId"], "2");
                    let q = by_id[a["ParentId"].as_str()];
                    let (asker, answerer) = (owner(q), owner(a));
                    if asker != answerer {
                        award(&mut xp, answerer, 15);
                        award(&mut xp, asker, 2);
                    }
                    if let Some(u) = answerer {
                        xp.get_mut(&u).unwrap().accepted_answers += 1;
                    }
                    count(CommandKind::AcceptAnswer, None, false);
                }
            },
            _ => count(CommandKind::OtherVote, None, true),
        }
    }
    Expected {
        users: users.iter().map(|u| v5("user", &u["Id"])).collect(),
        content,
        xp,
        report,
    }
}

fn level(xp: i64) -> u32 {
    let q = xp.max(0) / 100;
    let mut l = 0i64;
    while (l + 1) * (l + 1) <= q {
        l += 1;
    }
    l as u32 + 1
}

// ---------------------------------------------------------------------------------------------
// The runs.

/// What one import left behind, as plain data.
struct Run {
    report: ImportReport,
    head: u64,
    content: BTreeMap<Uuid, Option<ContentRow>>,
    xp: BTreeMap<Uuid, Option<XpRow>>,
    top: Vec<LeaderboardRow>,
    exports: BTreeMap<&'static str, Vec<Value>>,
    elapsed: Duration,
}

struct Runs {
    expected: Expected,
    redis: Result<Run, String>,
    memory: Result<Run, String>,
    second: Result<Run, String>,
}

const MODELS: [(&str, ReadModel); 4] = [
    ("xp", ReadModel::Xp),
    ("leaderboard", ReadModel::Leaderboard),
    ("quota", ReadModel::Quota),
    ("content", ReadModel::Content),
];

async fn collect(
    app: &App,
    report: ImportReport,
    expected: &Expected,
    elapsed: Duration,
) -> Result<Run, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let rm = &app.read_models;
    let mut content = BTreeMap::new();
    for id in expected.content.keys() {
        content.insert(*id, rm.content(*id).await.map_err(|x| e(&x))?);
    }
    let mut xp = BTreeMap::new();
    for id in &expected.users {
        xp.insert(*id, rm.user_xp(*id).await.map_err(|x| e(&x))?);
    }
    let top = rm
        .leaderboard("all-time", TOP, 0)
        .await
        .map_err(|x| e(&x))?;
    let mut exports = BTreeMap::new();
    for (name, model) in MODELS {
        let mut rows = vec![];
        loop {
            let page = rm
                .export(model, rows.len() as u64, 1000)
                .await
                .map_err(|x| e(&x))?;
            if page.is_empty() {
                break;
            }
            rows.extend(page);
        }
        exports.insert(name, rows);
    }
    let head = app.store.head().await.map_err(|x| e(&x))?.position;
    Ok(Run {
        report,
        head,
        content,
        xp,
        top,
        exports,
        elapsed,
    })
}

async fn redis_run(expected: &Expected) -> Result<Run, String> {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = format!("sqlite://{}", dir.path().join("tektree.db").display());
    let app = App::open(&store, &redis.url, Rules::default())
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

async fn memory_runs(expected: &Expected) -> (Result<Run, String>, Result<Run, String>) {
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
    (first, second)
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
            let redis = redis_run(&expected).await;
            let (memory, second) = memory_runs(&expected).await;
            for (name, r) in [("redis", &redis), ("memory", &memory), ("second", &second)] {
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
                memory,
                second,
            }
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Assertions.

/// Every read-model value and report count the dump determines.
fn assert_matches_dump(run: &Run, x: &Expected) {
    // Report: accepted per kind, rejected only for dangling references, skipped other types.
    for (kind, (accepted, rejected, skipped)) in &x.report {
        let k = run.report.kind(*kind);
        assert_eq!(k.accepted, *accepted, "{kind} accepted\n{}", run.report);
        assert_eq!(k.unchanged, 0, "{kind} unchanged\n{}", run.report);
        assert_eq!(&k.rejected, rejected, "{kind} rejected\n{}", run.report);
        assert_eq!(
            k.skipped_total(),
            *skipped,
            "{kind} skipped\n{}",
            run.report
        );
    }
    // Content rows.
    assert_eq!(run.exports["content"].len(), x.content.len());
    for (id, want) in &x.content {
        let got = run.content[id]
            .as_ref()
            .unwrap_or_else(|| panic!("no row for {id}"));
        assert_eq!(got, want, "content {id}");
    }
    // XP per user.
    assert_eq!(run.exports["xp"].len(), x.users.len());
    for id in &x.users {
        let want = x.xp.get(id).cloned().unwrap_or_default();
        let got = run.xp[id]
            .as_ref()
            .unwrap_or_else(|| panic!("no xp row for {id}"));
        assert_eq!(
            (
                got.xp,
                got.level,
                got.questions,
                got.answers,
                got.accepted_answers
            ),
            (
                want.xp,
                level(want.xp),
                want.questions,
                want.answers,
                want.accepted_answers
            ),
            "xp of user {id}"
        );
    }
    // All-time leaderboard, first page: XP descending, then user id ascending.
    let mut ranking: Vec<(i64, Uuid)> = x.xp.iter().map(|(u, e)| (e.xp, *u)).collect();
    ranking.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let want: Vec<LeaderboardRow> = ranking
        .iter()
        .take(TOP as usize)
        .enumerate()
        .map(|(i, (xp, u))| LeaderboardRow {
            board: "all-time".into(),
            rank: i as u64 + 1,
            user_id: *u,
            xp: *xp,
        })
        .collect();
    assert_eq!(run.top, want);
}

fn ok<'a>(r: &'a Result<Run, String>, name: &str) -> &'a Run {
    r.as_ref()
        .unwrap_or_else(|e| panic!("{name} run failed: {e}"))
}

#[test]
fn import_with_redis_bus_matches_the_dump() {
    let runs = runs();
    assert_matches_dump(ok(&runs.redis, "redis"), &runs.expected);
}

#[test]
fn import_with_in_process_bus_gives_identical_read_models() {
    let runs = runs();
    let (redis, memory) = (ok(&runs.redis, "redis"), ok(&runs.memory, "memory"));
    assert_matches_dump(memory, &runs.expected);
    for (name, _) in MODELS {
        let (a, b) = (&redis.exports[name], &memory.exports[name]);
        assert!(!a.is_empty(), "{name} export is empty");
        assert_eq!(a.len(), b.len(), "{name}: row counts differ");
        for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
            assert_eq!(ra, rb, "{name} row {i}: redis run vs in-process run");
        }
    }
    assert_eq!(redis.report.kinds, memory.report.kinds);
    // The store heads may differ: how often `gamification.level.up` fires depends on the order
    // in which the policy applies a user's awards (a downvote can drop a total below a level
    // boundary that a later upvote crosses again), and that order depends on the bus. The read
    // models, which are sums, do not.
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
