//! Settling the pipeline and checking the invariants after a run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tektree_projections::{Projection, ReadModel};
use tektree_services::app::App;
use tektree_services::worker::{self, RedriveError};
use uuid::Uuid;

use crate::store::RunStore;
use crate::workload::Record;

/// Mismatch lines printed per category (all are counted).
const PRINT_PER_CATEGORY: usize = 10;

/// The mismatches found, by category.
#[derive(Debug, Default)]
pub struct Mismatches {
    by_category: BTreeMap<&'static str, u64>,
    printed: HashMap<&'static str, usize>,
    /// Every printed line (also written to stderr).
    pub lines: Vec<String>,
}

impl Mismatches {
    /// Records one mismatch.
    pub fn add(&mut self, category: &'static str, detail: impl Into<String>) {
        *self.by_category.entry(category).or_default() += 1;
        let printed = self.printed.entry(category).or_default();
        if *printed < PRINT_PER_CATEGORY {
            *printed += 1;
            let line = format!("MISMATCH [{category}] {}", detail.into());
            eprintln!("{line}");
            self.lines.push(line);
        }
    }

    /// How many, by category.
    pub fn by_category(&self) -> &BTreeMap<&'static str, u64> {
        &self.by_category
    }
}

/// A poison event: `group` fails on it until it is re-driven.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Poison {
    /// The projection (consumer group).
    pub group: String,
    /// The event.
    pub event_id: Uuid,
    /// Its aggregate.
    pub aggregate_type: String,
    /// Its aggregate id.
    pub aggregate_id: Uuid,
    /// Its sequence.
    pub sequence: u64,
}

/// What one look at the pipeline found.
#[derive(Debug)]
struct Status {
    head: u64,
    backlog: u64,
    behind: Vec<String>,
}

async fn status(app: &App, skip: &HashSet<String>) -> Result<Status> {
    let head = app.store.head().await?.position;
    let backlog = app.store.outbox_backlog().await?;
    let cps = app.read_models.checkpoints().await?;
    let behind = app
        .consumers()
        .iter()
        .map(|c| c.name().to_string())
        .filter(|n| !skip.contains(n))
        .filter_map(|n| {
            let cp = cps.iter().find(|c| c.name == n).map_or(0, |c| c.checkpoint);
            (cp < head).then(|| format!("{n}@{cp}"))
        })
        .collect();
    Ok(Status {
        head,
        backlog,
        behind,
    })
}

/// The largest lag behind the store's head of the consumers not in `skip` (for pacing the
/// workload).
pub async fn max_lag(app: &App, skip: &HashSet<String>) -> Result<u64> {
    let head = app.store.head().await?.position;
    let cps = app.read_models.checkpoints().await?;
    Ok(app
        .consumers()
        .iter()
        .filter(|c| !skip.contains(c.name()))
        .map(|c| {
            let cp = cps
                .iter()
                .find(|k| k.name == c.name())
                .map_or(0, |k| k.checkpoint);
            head.saturating_sub(cp)
        })
        .max()
        .unwrap_or(0))
}

/// Waits until the outbox is empty, every consumer not in `skip` is at the store's head, the
/// head stayed the same over three looks a second apart, and `dead_letters_ok` holds for the
/// bus's dead letters. `poll` runs on every look (it restarts processes that exited).
pub async fn settle(
    app: &App,
    skip: &HashSet<String>,
    timeout: Duration,
    mut dead_letters_ok: impl FnMut(&[tektree_outbox::DeadLetter]) -> bool,
    mut poll: impl FnMut(),
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut stable = (0u64, 0u32);
    let mut last = String::new();
    loop {
        poll();
        let s = status(app, skip).await;
        let ok = match &s {
            Ok(s) if s.backlog == 0 && s.behind.is_empty() => {
                match app.bus.dead_letters(None, usize::MAX).await {
                    Ok(dls) if dead_letters_ok(&dls) => true,
                    Ok(dls) => {
                        last = format!("head {}; dead letters: {}", s.head, dls.len());
                        false
                    }
                    Err(e) => {
                        last = format!("listing dead letters: {e}");
                        false
                    }
                }
            }
            Ok(s) => {
                last = format!(
                    "head {}, outbox backlog {}, behind: {}",
                    s.head,
                    s.backlog,
                    s.behind.join(", ")
                );
                false
            }
            Err(e) => {
                last = format!("status: {e}");
                false
            }
        };
        if ok {
            let head = s.as_ref().map(|s| s.head).unwrap_or(0);
            stable = if stable.0 == head {
                (head, stable.1 + 1)
            } else {
                (head, 1)
            };
            if stable.1 >= 3 {
                return Ok(());
            }
        } else {
            stable = (0, 0);
        }
        if Instant::now() >= deadline {
            bail!("not settled within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every dead letter on the bus. Retried for up to 30 s: the harness's own connection to the
/// bus may be a stale one from before a bus restart (its first request then fails and the next
/// one reconnects).
pub async fn dead_letters(app: &App) -> Result<Vec<tektree_outbox::DeadLetter>> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match app.bus.dead_letters(None, usize::MAX).await {
            Ok(d) => return Ok(d),
            Err(e) if attempts < 30 => {
                eprintln!("listing dead letters: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context("listing dead letters"),
        }
    }
}

/// Re-drives every dead letter (oldest first), retrying each while an earlier event of its
/// aggregate is missing or the bus fails. Returns how many were re-driven.
pub async fn redrive_all(app: &App, mismatches: &mut Mismatches) -> Result<u64> {
    let mut n = 0;
    for dl in dead_letters(app).await? {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match worker::redrive(app, &dl.id).await {
                Ok(_) => {
                    n += 1;
                    break;
                }
                Err(e @ (RedriveError::Gap(_) | RedriveError::Backend(_))) if attempts < 60 => {
                    eprintln!("redrive {} ({}): {e}; retrying", dl.id, dl.group);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    mismatches.add(
                        "redrive",
                        format!(
                            "dead letter {} of {} (event {}): {e}",
                            dl.id, dl.group, dl.envelope.event_id
                        ),
                    );
                    break;
                }
            }
        }
    }
    Ok(n)
}

/// Compares the dead letters with the poison events: exactly one dead letter per poison event,
/// in its group, and nothing else.
pub fn check_dead_letters(
    dls: &[tektree_outbox::DeadLetter],
    poison: &[Poison],
    mismatches: &mut Mismatches,
) {
    let expected: BTreeSet<(String, Uuid)> = poison
        .iter()
        .map(|p| (p.group.clone(), p.event_id))
        .collect();
    let mut seen: BTreeMap<(String, Uuid), u64> = BTreeMap::new();
    for dl in dls {
        *seen
            .entry((dl.group.clone(), dl.envelope.event_id))
            .or_default() += 1;
    }
    for (key, n) in &seen {
        if !expected.contains(key) {
            mismatches.add(
                "dead_letters",
                format!(
                    "unexpected dead letter of {} for event {} ({n}×)",
                    key.0, key.1
                ),
            );
        } else if *n > 1 {
            mismatches.add(
                "dead_letters",
                format!("event {} dead-lettered {n} times by {}", key.1, key.0),
            );
        }
    }
    for key in &expected {
        if !seen.contains_key(key) {
            mismatches.add(
                "dead_letters",
                format!("poison event {} is not a dead letter of {}", key.1, key.0),
            );
        }
    }
}

/// `consumer_guard` rows of the SQLite store at `path`: (consumer, type, id) → last sequence.
pub fn guards(path: &Path) -> Result<HashMap<(String, String, Uuid), u64>> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let mut stmt = conn.prepare(
        "SELECT consumer, aggregate_type, aggregate_id, last_sequence FROM consumer_guard",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = HashMap::new();
    for row in rows {
        let (consumer, ty, id, seq) = row?;
        let id = Uuid::parse_str(&id).with_context(|| format!("guard id {id:?}"))?;
        out.insert((consumer, ty, id), u64::try_from(seq).unwrap_or(0));
    }
    Ok(out)
}

/// Before the re-drive: each poison event is not applied by its group, and neither is any later
/// event of its aggregate (the group's guard of the aggregate is exactly one below it).
pub async fn check_held_back(
    store: &RunStore,
    poison: &[Poison],
    mismatches: &mut Mismatches,
) -> Result<()> {
    let g = store.guards().await?;
    for p in poison {
        let got = g
            .get(&(p.group.clone(), p.aggregate_type.clone(), p.aggregate_id))
            .copied()
            .unwrap_or(0);
        if got != p.sequence - 1 {
            mismatches.add(
                "held_back",
                format!(
                    "{}: guard of {}/{} is {got} before the re-drive; expected {} (poison event {} at sequence {})",
                    p.group, p.aggregate_type, p.aggregate_id, p.sequence - 1, p.event_id, p.sequence
                ),
            );
        }
    }
    Ok(())
}

/// One stored event, as much as the checks need.
#[derive(Debug, Clone)]
struct Stored {
    position: u64,
    sequence: u64,
    aggregate_type: String,
    aggregate_id: Uuid,
    event_type: String,
}

/// The store-side checks, on the live store after everything stopped:
/// - event ids are unique, positions strictly increase;
/// - every aggregate's sequences are 1..n, contiguous, in increasing position;
/// - every event a 2xx command returned is stored once, with that id, position, sequence,
///   type and aggregate;
/// - every consumer's checkpoint is the head, its `applied` count equals the number of events
///   (nothing applied twice or skipped), and its guard of every aggregate is n;
/// - the bus holds everything up to the head.
pub async fn check_store(
    app: &App,
    store: &RunStore,
    records: &[Record],
    mismatches: &mut Mismatches,
) -> Result<u64> {
    let head = app.store.head().await?;
    let mut by_id: HashMap<Uuid, Stored> = HashMap::new();
    let mut aggregates: HashMap<(String, Uuid), (u64, u64)> = HashMap::new();
    let mut policies = PolicyEffects::default();
    let mut after = 0u64;
    let mut count = 0u64;
    loop {
        let page = app.store.read_all(after, 5000).await?;
        let Some(last) = page.last() else { break };
        let next_after = last.position;
        for e in page {
            count += 1;
            policies.observe(&e, mismatches);
            if e.position <= after {
                mismatches.add(
                    "store_order",
                    format!("position {} after {after}", e.position),
                );
            }
            after = e.position;
            let key = (e.aggregate_type.clone(), e.aggregate_id);
            let (n, last_pos) = aggregates.entry(key).or_insert((0, 0));
            if e.sequence != *n + 1 || e.position <= *last_pos {
                mismatches.add(
                    "aggregate_order",
                    format!(
                        "{}/{}: sequence {} at position {} follows sequence {} at position {}",
                        e.aggregate_type, e.aggregate_id, e.sequence, e.position, n, last_pos
                    ),
                );
            }
            *n = (*n).max(e.sequence);
            *last_pos = e.position;
            let stored = Stored {
                position: e.position,
                sequence: e.sequence,
                aggregate_type: e.aggregate_type,
                aggregate_id: e.aggregate_id,
                event_type: e.event_type,
            };
            if by_id.insert(e.event_id, stored).is_some() {
                mismatches.add(
                    "duplicate_event",
                    format!("event id {} stored twice", e.event_id),
                );
            }
        }
        after = next_after;
    }
    policies.compare(mismatches);
    if count != head.events {
        mismatches.add(
            "store_count",
            format!("read {count} events, the head says {}", head.events),
        );
    }
    // Every 2xx command's events, exactly once, where the response said.
    for r in records {
        for e in &r.events {
            match by_id.get(&e.event_id) {
                None => mismatches.add(
                    "acknowledged_lost",
                    format!(
                        "{:?} on {}/{}: event {} ({}, position {}) answered 2xx is not in the store",
                        r.kind, r.aggregate_type, r.aggregate_id, e.event_id, e.event_type, e.position
                    ),
                ),
                Some(s) => {
                    if s.position != e.position
                        || s.sequence != e.sequence
                        || s.event_type != e.event_type
                        || s.aggregate_type != r.aggregate_type
                        || s.aggregate_id != r.aggregate_id
                    {
                        mismatches.add(
                            "acknowledged_differs",
                            format!(
                                "event {}: answered {} {}/{} seq {} pos {}, stored {} {}/{} seq {} pos {}",
                                e.event_id, e.event_type, r.aggregate_type, r.aggregate_id,
                                e.sequence, e.position, s.event_type, s.aggregate_type,
                                s.aggregate_id, s.sequence, s.position
                            ),
                        );
                    }
                }
            }
        }
    }
    // Consumers: checkpoint at the head, every event applied exactly once, guards at n.
    let cps = app.read_models.checkpoints().await?;
    let names: Vec<String> = app.consumers().iter().map(|c| c.name().into()).collect();
    for n in &names {
        match cps.iter().find(|c| &c.name == n) {
            None => mismatches.add("checkpoint", format!("{n}: no checkpoint")),
            Some(c) => {
                if c.checkpoint != head.position {
                    mismatches.add(
                        "checkpoint",
                        format!("{n}: checkpoint {} ≠ head {}", c.checkpoint, head.position),
                    );
                }
                if c.applied != count {
                    mismatches.add(
                        "applied_count",
                        format!(
                            "{n}: applied {} events, the store holds {count} (each must be applied exactly once)",
                            c.applied
                        ),
                    );
                }
            }
        }
    }
    let guards = store.guards().await?;
    for n in &names {
        for ((ty, id), (seq, _)) in &aggregates {
            let got = guards.get(&(n.clone(), ty.clone(), *id)).copied();
            if got != Some(*seq) {
                mismatches.add(
                    "guard",
                    format!("{n}: guard of {ty}/{id} is {got:?}, the aggregate has {seq} events"),
                );
            }
        }
    }
    for (consumer, ty, id) in guards.keys() {
        if !aggregates.contains_key(&(ty.clone(), *id)) {
            mismatches.add(
                "guard",
                format!("{consumer}: guard of {ty}/{id}, an aggregate with no event"),
            );
        }
    }
    let mut attempts = 0;
    let published = loop {
        attempts += 1;
        match app.bus.last_published().await {
            Ok(p) => break p,
            Err(e) if attempts < 30 => {
                eprintln!("reading the bus's last position: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context("reading the bus's last published position"),
        }
    };
    if published != head.position {
        mismatches.add(
            "bus",
            format!(
                "the bus's last published position is {published}, the head {}",
                head.position
            ),
        );
    }
    Ok(count)
}

/// The policies' effects, expected (a reference fold of the default rules over the stored
/// source events, with the same pure rule functions the policies use) and found in the store:
/// one `gamification.xp.earned` per (user, source event) with the rule's amount, one
/// `payment.usage.recorded` per metered post, one `payment.subscription.created` per
/// registration — so a source event redelivered to a policy (after a kill, a reclaim, a bus
/// restart) never counts twice and none is forgotten.
#[derive(Debug, Default)]
struct PolicyEffects {
    /// The rules the `tektree` processes run with (their defaults: no `--rules`).
    rules: tektree_domain::Rules,
    xp_expected: HashMap<(Uuid, Uuid), i64>,
    xp_found: HashMap<(Uuid, Uuid), i64>,
    usage_expected: HashSet<(Uuid, Uuid)>,
    usage_found: HashSet<(Uuid, Uuid)>,
    subscriptions_expected: HashSet<Uuid>,
    subscriptions_found: HashSet<Uuid>,
}

fn payload_uuid(e: &tektree_domain::EventEnvelope, field: &str) -> Option<Uuid> {
    e.payload
        .get(field)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
}

impl PolicyEffects {
    fn observe(&mut self, e: &tektree_domain::EventEnvelope, mismatches: &mut Mismatches) {
        let rules = &self.rules;
        let event = match e.decode() {
            Ok(ev) => ev,
            Err(err) => {
                mismatches.add(
                    "decode",
                    format!("event {} at {}: {err}", e.event_id, e.position),
                );
                return;
            }
        };
        for award in tektree_domain::policy_rules::xp_awards(&rules.xp, &event) {
            self.xp_expected
                .insert((award.user_id, e.event_id), award.amount);
        }
        if let Some(user) = tektree_domain::policy_rules::metered_user(&event) {
            self.usage_expected.insert((user, e.event_id));
        }
        match e.event_type.as_str() {
            "user.registered" => {
                if let Some(u) = payload_uuid(e, "user_id") {
                    self.subscriptions_expected.insert(u);
                }
            }
            "gamification.xp.earned" => {
                let key = (
                    payload_uuid(e, "user_id").unwrap_or_default(),
                    payload_uuid(e, "source_event_id").unwrap_or_default(),
                );
                let amount = e.payload.get("amount").and_then(Value::as_i64).unwrap_or(0);
                if self.xp_found.insert(key, amount).is_some() {
                    mismatches.add(
                        "policy_duplicate",
                        format!("user {} awarded XP twice for source event {}", key.0, key.1),
                    );
                }
            }
            "payment.usage.recorded" => {
                let key = (
                    payload_uuid(e, "user_id").unwrap_or_default(),
                    payload_uuid(e, "source_event_id").unwrap_or_default(),
                );
                if !self.usage_found.insert(key) {
                    mismatches.add(
                        "policy_duplicate",
                        format!(
                            "usage of user {} metered twice for source event {}",
                            key.0, key.1
                        ),
                    );
                }
            }
            "payment.subscription.created" => {
                let u = payload_uuid(e, "user_id").unwrap_or_default();
                if !self.subscriptions_found.insert(u) {
                    mismatches.add(
                        "policy_duplicate",
                        format!("subscription of user {u} opened twice"),
                    );
                }
            }
            _ => {}
        }
    }

    fn compare(&self, mismatches: &mut Mismatches) {
        for (key, amount) in &self.xp_expected {
            match self.xp_found.get(key) {
                None => mismatches.add(
                    "policy_effect",
                    format!("no XP award for user {} from source event {}", key.0, key.1),
                ),
                Some(found) if found != amount => mismatches.add(
                    "policy_effect",
                    format!(
                        "user {} awarded {found} XP for source event {}, the rules say {amount}",
                        key.0, key.1
                    ),
                ),
                Some(_) => {}
            }
        }
        for key in self.xp_found.keys() {
            if !self.xp_expected.contains_key(key) {
                mismatches.add(
                    "policy_effect",
                    format!(
                        "XP award for user {} from source event {} no rule calls for",
                        key.0, key.1
                    ),
                );
            }
        }
        for key in self.usage_expected.symmetric_difference(&self.usage_found) {
            let what = if self.usage_found.contains(key) {
                "unexpected"
            } else {
                "missing"
            };
            mismatches.add(
                "policy_effect",
                format!(
                    "{what} usage record of user {} for source event {}",
                    key.0, key.1
                ),
            );
        }
        for u in self
            .subscriptions_expected
            .symmetric_difference(&self.subscriptions_found)
        {
            let what = if self.subscriptions_found.contains(u) {
                format!("subscription of user {u} opened without a registration")
            } else {
                format!("user {u} registered, but no subscription was opened")
            };
            mismatches.add("policy_effect", what);
        }
    }
}

/// Copies the SQLite database `from` to `to` as one consistent snapshot (`VACUUM INTO`).
///
/// Copying the files (database, `-wal`, `-shm`) raced with a connection of this process that
/// was still closing: the last close checkpoints the WAL into the database and deletes it, and
/// a copy taken in between held half-checkpointed pages and no WAL ("database disk image is
/// malformed" when the rebuild on the copy reached them; seen once in CI).
pub fn copy_sqlite(from: &Path, to: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", to.display()));
    }
    let conn =
        rusqlite::Connection::open(from).with_context(|| format!("opening {}", from.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let target = to.to_str().context("a non-UTF-8 copy path")?;
    conn.execute("VACUUM INTO ?1", [target])
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// `tektree --store <store> export <model> --format jsonl`, parsed.
pub fn export(tektree: &Path, store: &str, model: &str) -> Result<Vec<Value>> {
    let out = Command::new(tektree)
        .args(["--store", store, "--bus", "memory", "export", model])
        .args(["--format", "jsonl"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} export {model}", tektree.display()))?;
    if !out.status.success() {
        bail!("tektree export {model} failed with {}", out.status);
    }
    String::from_utf8(out.stdout)
        .context("export output is not UTF-8")?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("export line {l:?}")))
        .collect()
}

/// The live read models, exported: model name (`xp`, `leaderboard`, `quota`, `content`) → rows.
pub type Exports = BTreeMap<&'static str, Vec<Value>>;

/// Rebuilds every projection of the copy at `copy_url` from its events and compares each read
/// model with the live one (exported from `live_url`), row by row. Returns the live exports
/// (for the oracle, `oracle.rs`).
pub async fn check_read_models(
    tektree: &Path,
    live_url: &str,
    copy_url: &str,
    mismatches: &mut Mismatches,
) -> Result<Exports> {
    let copy = App::open(copy_url, "memory", tektree_domain::Rules::default())
        .await
        .context("opening the copy of the store")?;
    for name in Projection::ALL {
        tektree_services::replay::rebuild(
            copy.store.as_ref(),
            copy.read_models.as_ref(),
            name,
            |_| {},
        )
        .await
        .with_context(|| format!("rebuilding {name} on the copy"))?;
    }
    drop(copy);
    let mut exports = Exports::new();
    for model in ReadModel::ALL {
        let live = export(tektree, live_url, model.name())?;
        let rebuilt = export(tektree, copy_url, model.name())?;
        compare_rows(model, &live, &rebuilt, mismatches);
        exports.insert(model.name(), live);
    }
    Ok(exports)
}

/// The identity of a row: every field that is a key of the model.
fn row_key(model: ReadModel, row: &Value) -> String {
    let fields: &[&str] = match model {
        ReadModel::Xp => &["user_id"],
        ReadModel::Leaderboard => &["board", "user_id"],
        ReadModel::Quota => &["user_id", "period"],
        ReadModel::Content => &["content_id"],
        ReadModel::Tags => &["tag"],
    };
    fields
        .iter()
        .map(|f| row.get(*f).map(Value::to_string).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("/")
}

fn compare_rows(model: ReadModel, live: &[Value], rebuilt: &[Value], mismatches: &mut Mismatches) {
    let name = model.name();
    let live_by: BTreeMap<String, &Value> = live.iter().map(|r| (row_key(model, r), r)).collect();
    let rebuilt_by: BTreeMap<String, &Value> =
        rebuilt.iter().map(|r| (row_key(model, r), r)).collect();
    for (k, l) in &live_by {
        match rebuilt_by.get(k) {
            None => mismatches.add(
                "read_model",
                format!("{name} {k}: live row {l} is not in the rebuild"),
            ),
            Some(r) if r != l => {
                mismatches.add("read_model", format!("{name} {k}: live {l} ≠ rebuilt {r}"))
            }
            Some(_) => {}
        }
    }
    for (k, r) in &rebuilt_by {
        if !live_by.contains_key(k) {
            mismatches.add(
                "read_model",
                format!("{name} {k}: rebuilt row {r} is missing from the live read model"),
            );
        }
    }
    if live.len() != live_by.len() || rebuilt.len() != rebuilt_by.len() {
        mismatches.add(
            "read_model",
            format!(
                "{name}: duplicate keys (live {} rows / {} keys, rebuilt {} / {})",
                live.len(),
                live_by.len(),
                rebuilt.len(),
                rebuilt_by.len()
            ),
        );
    }
}
