//! Shared by the dump tests: an independent reading of the bundled Stack Exchange dump, the
//! values every read model must hold after importing it, and a snapshot of a finished run.
#![allow(dead_code)]

pub mod fake_polar;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tektree_projections::{ContentRow, LeaderboardRow, ReadModel, XpRow};
use tektree_services::app::App;
use tektree_services::import::{CommandKind, ImportReport};
use uuid::Uuid;

/// Site name of the bundled dump (its directory name).
pub const SITE: &str = "history.meta";
/// A bound against a stuck pipeline, not a speed assertion.
pub const SETTLE: Duration = Duration::from_secs(600);
/// Entries of the all-time leaderboard compared with the expected ranking.
pub const TOP: u32 = 50;

pub fn dump_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/stackexchange/history.meta")
}

pub fn v5(kind: &str, id: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("stackexchange:{SITE}:{kind}:{id}").as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// Independent reading of the dump: every row is one line `<row A="v" … />`; only numeric
// attributes are needed, so values are taken raw (no unescaping).

pub type Attrs = HashMap<String, String>;

pub fn dump_rows(file: &str) -> Vec<Attrs> {
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

pub fn num(a: &Attrs, k: &str) -> i64 {
    a.get(k).map(|v| v.parse().unwrap()).unwrap_or(0)
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ExpectedXp {
    pub xp: i64,
    pub questions: u64,
    pub answers: u64,
    pub accepted_answers: u64,
}

/// What the read models and the report must say, derived from the XML alone.
#[derive(Debug)]
pub struct Expected {
    pub users: Vec<Uuid>,
    pub content: BTreeMap<Uuid, ContentRow>,
    pub xp: BTreeMap<Uuid, ExpectedXp>,
    /// (accepted, rejected by reason, skipped) per kind.
    pub report: BTreeMap<CommandKind, (u64, BTreeMap<String, u64>, u64)>,
}

pub fn expected() -> Expected {
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

pub fn level(xp: i64) -> u32 {
    let q = xp.max(0) / 100;
    let mut l = 0i64;
    while (l + 1) * (l + 1) <= q {
        l += 1;
    }
    l as u32 + 1
}

/// What one import left behind, as plain data.
pub struct Run {
    pub report: ImportReport,
    pub head: u64,
    pub content: BTreeMap<Uuid, Option<ContentRow>>,
    pub xp: BTreeMap<Uuid, Option<XpRow>>,
    pub top: Vec<LeaderboardRow>,
    pub exports: BTreeMap<&'static str, Vec<Value>>,
    pub elapsed: Duration,
}

pub const MODELS: [(&str, ReadModel); 4] = [
    ("xp", ReadModel::Xp),
    ("leaderboard", ReadModel::Leaderboard),
    ("quota", ReadModel::Quota),
    ("content", ReadModel::Content),
];

pub async fn collect(
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

/// Every read-model value and report count the dump determines.
pub fn assert_matches_dump(run: &Run, x: &Expected) {
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
