//! Shared by the dump tests: an independent reading of the bundled Stack Exchange dump, the
//! values every read model must hold after importing it, and a snapshot of a finished run.
#![allow(dead_code)]

pub mod fake_polar;
pub mod history;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Utc};
use serde_json::Value;
use tektree_domain::{Event, GamificationRules};
use tektree_projections::{ContentRow, LeaderboardRow, ReadModel, ReadModelStore, XpRow};
use tektree_services::app::App;
use tektree_services::import::{CommandKind, ImportReport};
use uuid::Uuid;

/// Sends the test's `tracing` events (errors; `RUST_LOG` overrides) to the test's output, so
/// that an in-process relay or consumer that fails says why.
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_test_writer()
        .try_init();
}

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

/// A `CreationDate` (`2011-10-11T19:42:20.713`, no zone) read as UTC, as the importer does.
pub fn date(a: &Attrs) -> DateTime<Utc> {
    let s = &a["CreationDate"];
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .unwrap_or_else(|e| panic!("CreationDate {s:?}: {e}"))
        .and_utc()
}

/// ISO week `YYYY-Www` of an instant (UTC), computed here with chrono.
pub fn week(t: DateTime<Utc>) -> String {
    let w = t.iso_week();
    format!("{:04}-W{:02}", w.year(), w.week())
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
    /// Achievements, weekly quests and streak milestones reached (issue #6).
    pub goals: Goals,
    /// What the gamification policy records on a profile, one entry per imported row that
    /// records an activity: (row key, user, act, the row's `CreationDate`), phase by phase in
    /// file order. The row key identifies the row's event (see [`Run::positions`]).
    pub acts: Vec<(Uuid, Uuid, Act, DateTime<Utc>)>,
    /// XP per `weekly:YYYY-Www` board and user, without the rewards of goals.
    pub weekly_base: BTreeMap<(String, Uuid), i64>,
}

impl Expected {
    /// The goals reached and the `weekly:*` boards (XP per board and user) when the policy sees
    /// the acts in the order of `positions` (row key → store position of its event).
    ///
    /// The sets of goals do not depend on the order, but the act that reaches a goal does. Only
    /// quest rewards are credited to a week (the quest's own week, whichever of its acts
    /// completes it), so the boards do not depend on the order either; computing them in each
    /// run's store order (the importer runs up to 8 commands at once) proves it.
    pub fn in_order(
        &self,
        positions: &HashMap<Uuid, u64>,
    ) -> (Goals, BTreeMap<(String, Uuid), i64>) {
        let mut acts = self.acts.clone();
        acts.sort_by_key(|(key, ..)| {
            *positions
                .get(key)
                .unwrap_or_else(|| panic!("no stored event for row {key}"))
        });
        let acts: Vec<_> = acts.into_iter().map(|(_, u, a, t)| (u, a, t)).collect();
        let (goals, rewards) = reach_goals(&acts, &GamificationRules::default());
        let mut weekly = self.weekly_base.clone();
        for r in rewards.into_iter().filter(|r| r.weekly) {
            *weekly
                .entry((format!("weekly:{}", week(r.at)), r.user))
                .or_default() += r.xp;
        }
        (goals, weekly)
    }
}

/// Reached gamification goals (issue #6), as sets: (user, achievement id), (user, quest id,
/// period) and (user, milestone days).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Goals {
    pub achievements: BTreeSet<(Uuid, String)>,
    pub quests: BTreeSet<(Uuid, String, String)>,
    pub milestones: BTreeSet<(Uuid, u32)>,
}

impl Goals {
    /// One line: users per achievement, quest completions, users per streak milestone.
    pub fn summary(&self) -> String {
        let mut per: BTreeMap<&str, usize> = ACHIEVEMENTS.iter().map(|a| (*a, 0)).collect();
        for (_, a) in &self.achievements {
            *per.entry(a.as_str()).or_default() += 1;
        }
        let mut line: Vec<String> = per.iter().map(|(a, n)| format!("{a} {n}")).collect();
        let quest_users: BTreeSet<Uuid> = self.quests.iter().map(|q| q.0).collect();
        line.push(format!(
            "{QUEST} {} completions by {} users",
            self.quests.len(),
            quest_users.len()
        ));
        for m in MILESTONES {
            let n = self.milestones.iter().filter(|x| x.1 == m).count();
            line.push(format!("streak milestone {m} days {n}"));
        }
        line.join(", ")
    }
}

/// The achievements of issue #6, whose conditions [`Progress::holds`] states independently of
/// the domain's rule evaluation (only the XP rewards are read from the default rules).
pub const ACHIEVEMENTS: [&str; 7] = [
    "first-question",
    "first-answer",
    "first-accepted-answer",
    "ten-answers",
    "answer-score-10",
    "streak-7",
    "streak-30",
];
/// The weekly quest: at least 3 answers in one ISO week (of the answers' `CreationDate`).
pub const QUEST: &str = "weekly-contributor";
/// Streak milestones, in days.
pub const MILESTONES: [u32; 3] = [7, 30, 100];

/// What the gamification policy records on a profile for one imported row.
#[derive(Debug, Clone, Copy)]
pub enum Act {
    Question,
    Answer,
    Comment,
    /// An up (+1) or down (−1) vote on one of the user's answers.
    Vote(Uuid, i64),
    Accepted,
}

/// A user's progress, folded from their acts in the order the policy sees them.
#[derive(Default)]
struct Progress {
    questions: u64,
    answers: u64,
    accepted: u64,
    answers_per_week: BTreeMap<String, u64>,
    scores: HashMap<Uuid, i64>,
    best_score: i64,
    days: BTreeSet<NaiveDate>,
    longest: u32,
}

impl Progress {
    fn record(&mut self, act: Act, at: DateTime<Utc>) {
        match act {
            Act::Question => self.questions += 1,
            Act::Answer => {
                self.answers += 1;
                *self.answers_per_week.entry(week(at)).or_default() += 1;
            }
            Act::Comment => {}
            Act::Vote(answer, delta) => {
                let s = self.scores.entry(answer).or_default();
                *s += delta;
                self.best_score = self.best_score.max(*s);
            }
            Act::Accepted => self.accepted += 1,
        }
        // Only what the user wrote makes a day active; a new day may join two runs.
        if matches!(act, Act::Question | Act::Answer | Act::Comment)
            && self.days.insert(at.date_naive())
        {
            let (mut run, mut prev) = (0u32, None::<NaiveDate>);
            for d in &self.days {
                run = match prev {
                    Some(p) if p.succ_opt() == Some(*d) => run + 1,
                    _ => 1,
                };
                self.longest = self.longest.max(run);
                prev = Some(*d);
            }
        }
    }

    fn holds(&self, achievement: &str) -> bool {
        match achievement {
            "first-question" => self.questions >= 1,
            "first-answer" => self.answers >= 1,
            "first-accepted-answer" => self.accepted >= 1,
            "ten-answers" => self.answers >= 10,
            "answer-score-10" => self.best_score >= 10,
            "streak-7" => self.longest >= 7,
            "streak-30" => self.longest >= 30,
            other => panic!("no condition for achievement {other:?}"),
        }
    }
}

/// The XP reward of one reached goal.
pub struct Reward {
    /// The user.
    pub user: Uuid,
    /// XP.
    pub xp: i64,
    /// When the act that reached the goal happened.
    pub at: DateTime<Utc>,
    /// Whether it also counts on the weekly board of `at` (quests; achievements count all-time
    /// only).
    pub weekly: bool,
}

/// Folds `acts` (in the importer's order) per user: the goals reached, and for each the time
/// of the act that reached it, with its XP reward from `rules` and whether the reward counts on
/// the weekly board of that time (quests yes; achievements count all-time only, see the
/// `leaderboard` projection).
fn reach_goals(
    acts: &[(Uuid, Act, DateTime<Utc>)],
    rules: &GamificationRules,
) -> (Goals, Vec<Reward>) {
    let reward = |id: &str| {
        rules
            .achievements
            .iter()
            .chain(&rules.quests)
            .find(|g| g.id == id)
            .unwrap_or_else(|| panic!("{id} is not in the default rules"))
            .xp_reward
    };
    let mut ids: Vec<&str> = rules.achievements.iter().map(|g| g.id.as_str()).collect();
    ids.sort_unstable();
    let mut mine = ACHIEVEMENTS.to_vec();
    mine.sort_unstable();
    assert_eq!(
        ids, mine,
        "the default achievements changed: update the test"
    );
    let quests: Vec<&str> = rules.quests.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(
        quests,
        [QUEST],
        "the default quests changed: update the test"
    );
    assert_eq!(
        rules.streak_milestones, MILESTONES,
        "default streak milestones"
    );

    let mut progress: HashMap<Uuid, Progress> = HashMap::new();
    let mut goals = Goals::default();
    let mut rewards = Vec::new();
    for &(user, act, at) in acts {
        let p = progress.entry(user).or_default();
        p.record(act, at);
        for a in ACHIEVEMENTS {
            if p.holds(a) && goals.achievements.insert((user, a.to_string())) {
                rewards.push(Reward {
                    user,
                    xp: reward(a),
                    at,
                    weekly: false,
                });
            }
        }
        if matches!(act, Act::Answer)
            && p.answers_per_week[&week(at)] >= 3
            && goals.quests.insert((user, QUEST.to_string(), week(at)))
        {
            rewards.push(Reward {
                user,
                xp: reward(QUEST),
                at,
                weekly: true,
            });
        }
        for m in MILESTONES {
            if p.longest >= m {
                goals.milestones.insert((user, m));
            }
        }
    }
    (goals, rewards)
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
    let mut weekly: BTreeMap<(String, Uuid), i64> = BTreeMap::new();
    // Every award (even 0 XP: a self-accept) is an entry on the board of its week.
    let mut award = |u: Option<Uuid>, n: i64, at: DateTime<Utc>| {
        if let Some(u) = u {
            xp.entry(u).or_default().xp += n;
            *weekly
                .entry((format!("weekly:{}", week(at)), u))
                .or_default() += n;
        }
    };
    // What the policy records on each profile, per import phase, in file order.
    let (mut questions, mut answers, mut commented, mut voted, mut accepted) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut accepts_seen = BTreeSet::new();
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
        award(Some(v5("user", &u["Id"])), 1, date(u));
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
        award(owner(p), points, date(p));
        if let Some(u) = owner(p) {
            if kind == "question" {
                questions.push((id, u, Act::Question, date(p)));
            } else {
                answers.push((id, u, Act::Answer, date(p)));
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
        let author = c.get("UserId").map(|u| v5("user", u));
        award(author, 1, date(c));
        if let Some(u) = author {
            commented.push((v5("comment", &c["Id"]), u, Act::Comment, date(c)));
        }
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
                        award(owner(p), points, date(v));
                        // Each dump vote is its own voter: the score moves by exactly ±1.
                        if let (Some(u), "2") = (owner(p), p["PostTypeId"].as_str()) {
                            let delta = if t == "2" { 1 } else { -1 };
                            let act = Act::Vote(v5("post", &p["Id"]), delta);
                            voted.push((v5("vote", &v["Id"]), u, act, date(v)));
                        }
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
                    // One accept per question: a repeated or changed accept would be handled
                    // differently by the content aggregate (the bundled dump has none).
                    assert!(accepts_seen.insert(a["ParentId"].clone()), "second accept");
                    let q = by_id[a["ParentId"].as_str()];
                    let (asker, answerer) = (owner(q), owner(a));
                    if asker != answerer {
                        award(answerer, 15, date(v));
                        award(asker, 2, date(v));
                    } else {
                        // A self-accept earns 0 XP but still records the accepted answer.
                        award(answerer, 0, date(v));
                    }
                    if let Some(u) = answerer {
                        let key = accept_key(v5("post", &a["Id"]));
                        accepted.push((key, u, Act::Accepted, date(v)));
                    }
                    count(CommandKind::AcceptAnswer, None, false);
                }
            },
            _ => count(CommandKind::OtherVote, None, true),
        }
    }
    // Achievements, quests and milestones (issue #6), with the acts in the order the importer
    // sends the commands: phase by phase, each phase in file order. What is reached, and so
    // the XP totals, do not depend on that order (counts and runs of days only grow; the votes
    // on one answer, commands on one aggregate, are sent one at a time in Votes.xml order);
    // the week a reward is credited to does (see `Expected::in_order`).
    let acts: Vec<_> = [questions, answers, commented, voted, accepted].concat();
    let in_file_order: Vec<_> = acts.iter().map(|(_, u, a, t)| (*u, *a, *t)).collect();
    let (goals, rewards) = reach_goals(&in_file_order, &GamificationRules::default());
    for r in rewards {
        xp.entry(r.user).or_default().xp += r.xp;
    }
    // Counters of the xp read model (from the content events).
    for (_, u, act, _) in &acts {
        let e = xp.entry(*u).or_default();
        match act {
            Act::Question => e.questions += 1,
            Act::Answer => e.answers += 1,
            Act::Accepted => e.accepted_answers += 1,
            Act::Comment | Act::Vote(..) => {}
        }
    }
    Expected {
        users: users.iter().map(|u| v5("user", &u["Id"])).collect(),
        content,
        xp,
        report,
        goals,
        acts,
        weekly_base: weekly,
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
    /// The stored unlock events (issue #6).
    pub unlocks: Unlocks,
    /// Store position of the event of each imported row that records an activity, by row key:
    /// the question or answer (post), the comment, the vote (its voter), or [`accept_key`].
    pub positions: HashMap<Uuid, u64>,
}

/// The stored `gamification.achievement.unlocked`, `gamification.quest.completed` and
/// `gamification.streak.milestone` events of a run, in position order (duplicates kept).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Unlocks {
    pub achievements: Vec<(Uuid, String)>,
    pub quests: Vec<(Uuid, String, String)>,
    pub milestones: Vec<(Uuid, u32)>,
}

impl Unlocks {
    /// As sets; panics on the first goal stored twice for a user.
    pub fn goals(&self, what: &str) -> Goals {
        let mut g = Goals::default();
        for a in &self.achievements {
            assert!(
                g.achievements.insert(a.clone()),
                "{what}: {a:?} unlocked twice"
            );
        }
        for q in &self.quests {
            assert!(g.quests.insert(q.clone()), "{what}: {q:?} completed twice");
        }
        for m in &self.milestones {
            assert!(
                g.milestones.insert(*m),
                "{what}: milestone {m:?} reached twice"
            );
        }
        g
    }
}

/// The row key of the accept of `answer` (the answer's own id is the key of its submission).
pub fn accept_key(answer: Uuid) -> Uuid {
    Uuid::new_v5(&answer, b"accepted")
}

/// Reads the whole store of `app`: its unlock events, and the positions of the events that
/// record activities (see [`Run::positions`]).
pub async fn read_store(app: &App) -> Result<(Unlocks, HashMap<Uuid, u64>), String> {
    let mut u = Unlocks::default();
    let mut positions = HashMap::new();
    let mut after = 0;
    loop {
        let page = app
            .store
            .read_all(after, 1000)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for env in &page {
            let key = match env.decode().map_err(|e| e.to_string())? {
                Event::QuestionPosted(e) => e.question_id,
                Event::AnswerSubmitted(e) => e.answer_id,
                Event::CommentAdded(e) => e.comment_id,
                Event::ContentUpvoted(e) | Event::ContentDownvoted(e) => e.voter_id,
                Event::AnswerAccepted(e) => accept_key(e.answer_id),
                Event::AchievementUnlocked(a) => {
                    u.achievements.push((a.user_id, a.achievement_id));
                    continue;
                }
                Event::QuestCompleted(q) => {
                    u.quests.push((q.user_id, q.quest_id, q.period));
                    continue;
                }
                Event::StreakMilestone(m) => {
                    u.milestones.push((m.user_id, m.days));
                    continue;
                }
                _ => continue,
            };
            positions.insert(key, env.position);
        }
    }
    Ok((u, positions))
}

/// Every read model's export, all pages.
pub async fn exports(
    rm: &dyn ReadModelStore,
) -> Result<BTreeMap<&'static str, Vec<Value>>, String> {
    let mut exports = BTreeMap::new();
    for (name, model) in MODELS {
        let mut rows = vec![];
        let mut after = None;
        loop {
            let page = rm
                .export(model, after.as_ref(), 1000)
                .await
                .map_err(|e| e.to_string())?;
            rows.extend(page.rows);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        exports.insert(name, rows);
    }
    Ok(exports)
}

pub const MODELS: [(&str, ReadModel); 5] = [
    ("xp", ReadModel::Xp),
    ("leaderboard", ReadModel::Leaderboard),
    ("quota", ReadModel::Quota),
    ("content", ReadModel::Content),
    ("tags", ReadModel::Tags),
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
    let exports = exports(rm.as_ref()).await?;
    let head = app.store.head().await.map_err(|x| e(&x))?.position;
    let (unlocks, positions) = read_store(app).await?;
    Ok(Run {
        report,
        head,
        content,
        xp,
        top,
        exports,
        elapsed,
        unlocks,
        positions,
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

/// The run's unlock events are exactly the goals the dump reaches, each stored once.
pub fn assert_goals_match_dump(run: &Run, x: &Expected, what: &str) {
    fn same<T: Ord + std::fmt::Debug>(what: &str, want: &BTreeSet<T>, got: &BTreeSet<T>) {
        let missing: Vec<&T> = want.difference(got).collect();
        let extra: Vec<&T> = got.difference(want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{what}: missing {missing:?}; unexpected {extra:?}"
        );
    }
    let got = run.unlocks.goals(what);
    same(
        &format!("{what}: achievements"),
        &x.goals.achievements,
        &got.achievements,
    );
    same(&format!("{what}: quests"), &x.goals.quests, &got.quests);
    same(
        &format!("{what}: milestones"),
        &x.goals.milestones,
        &got.milestones,
    );
}

/// The `weekly:*` leaderboard entries of a run: XP per (board, user).
pub fn weekly_boards(run: &Run) -> BTreeMap<(String, Uuid), i64> {
    run.exports["leaderboard"]
        .iter()
        .filter(|r| {
            r["board"]
                .as_str()
                .is_some_and(|b| b.starts_with("weekly:"))
        })
        .map(|r| {
            let board = r["board"].as_str().unwrap().to_string();
            let user = r["user_id"].as_str().unwrap().parse().unwrap();
            ((board, user), r["xp"].as_i64().unwrap())
        })
        .collect()
}
