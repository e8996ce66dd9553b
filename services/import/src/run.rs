//! Running the import: validate the whole dump, then send each phase's commands through the
//! command handler with bounded concurrency, phases in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tektree_commands::{CommandError, CommandMeta};
use tektree_domain::{Actor, Content, DomainError, NoServices, User};
use tektree_event_store::StoreError;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinSet;

use super::ids::SiteIds;
use super::plan::{Phase, Planned, PostIndex, Step, Target};
use super::reader::{Fingerprint, Row, RowReader};
use super::report::{CommandKind, ImportReport};
use super::ImportError;
use tektree_runtime::app::App;

/// How long [`run_import_cli`] waits for the in-process pipeline to catch up after the last
/// command. A bound against a stuck consumer, not an expectation: the pipeline normally settles
/// within moments of the import.
pub const CLI_SETTLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Number of per-aggregate lock stripes (commands on the same aggregate never run at once).
const LOCK_STRIPES: usize = 256;

/// Tuning of [`import_stackexchange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// Commands in flight within a phase. Default 8; at least 1.
    pub concurrency: usize,
    /// Attempts per command on retryable failures (expected-version conflicts with other
    /// writers, failed lookups, storage backend errors) before it is counted as rejected with
    /// that code. Default 5; at least 1.
    pub attempts: u32,
    /// Log progress every this many rows of a phase. Default 5,000.
    pub progress_every: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            concurrency: 8,
            attempts: 5,
            progress_every: 5_000,
        }
    }
}

/// Imports the Stack Exchange dump in `dir` (Users.xml, Posts.xml, Comments.xml, Votes.xml)
/// as site `site` through `app`'s command handler, exactly like API commands (never writing
/// events directly). See `docs/import.md`.
///
/// First every file is read once and checked (XML well-formed and complete, required
/// attributes present and well-typed) while building the post index (post id → type, parent);
/// nothing is sent if any file is malformed. Then the phases run in order — users, questions,
/// answers, comments, up/down votes, accepts — each with up to `opts.concurrency` commands in
/// flight (never two on the same aggregate at once). Every command is atomic and idempotent, so
/// running the import again changes nothing.
///
/// This only sends commands; the relay, policies and projections consume the events wherever
/// they run (see [`run_import_cli`] for the in-process case).
///
/// # Errors
/// [`ImportError::InvalidSite`] for an empty site or one containing `:` or whitespace;
/// [`ImportError::Io`] when a file cannot be read; [`ImportError::Malformed`] (file, line and
/// column) for a malformed or truncated file — all before any command is sent;
/// [`ImportError::Changed`] when a file changed after it was checked (see `docs/import.md`).
/// Rejected commands are not errors: they are counted in the report.
pub async fn import_stackexchange(
    app: &App,
    dir: &Path,
    site: &str,
    opts: ImportOptions,
) -> Result<ImportReport, ImportError> {
    if site.is_empty() || site.contains(':') || site.chars().any(char::is_whitespace) {
        return Err(ImportError::InvalidSite(site.into()));
    }
    let started = Instant::now();
    let ids = Arc::new(SiteIds::new(site));
    tracing::info!(dir = %dir.display(), site, "checking the dump");
    let scan = {
        let (dir, ids) = (dir.to_path_buf(), ids.clone());
        tokio::task::spawn_blocking(move || scan(&dir, &ids))
            .await
            .map_err(|e| ImportError::Internal(format!("dump check task: {e}")))??
    };
    tracing::info!(
        posts = scan.posts.len(),
        rows = ?Phase::ALL.iter().zip(scan.rows).map(|(p, n)| (p.name(), n)).collect::<Vec<_>>(),
        "dump checked"
    );
    let posts = Arc::new(scan.posts);
    let files = scan.files;
    let locks: Arc<Vec<Mutex<()>>> = Arc::new((0..LOCK_STRIPES).map(|_| Mutex::new(())).collect());
    let mut report = ImportReport::new(site);
    for (phase, total) in Phase::ALL.into_iter().zip(scan.rows) {
        let ctx = PhaseCtx {
            app,
            dir,
            ids: ids.clone(),
            posts: posts.clone(),
            locks: locks.clone(),
            opts: &opts,
        };
        let phase_started = Instant::now();
        tracing::info!(
            phase = phase.name(),
            file = phase.file(),
            rows = total,
            "phase started"
        );
        let checked = files.get(phase.file()).copied();
        run_phase(&ctx, phase, total, checked, &mut report).await?;
        tracing::info!(
            phase = phase.name(),
            rows = total,
            elapsed_ms = phase_started.elapsed().as_millis() as u64,
            "phase finished"
        );
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        site,
        accepted = report.accepted(),
        unchanged = report.unchanged(),
        rejected = report.rejected(),
        skipped = report.skipped(),
        events = report.events(),
        elapsed_ms = report.elapsed_ms,
        "import finished"
    );
    Ok(report)
}

/// `tektree import stackexchange DIR [--site NAME]`: imports `dir` as `site` (default: the
/// directory's name, e.g. `history.meta`).
///
/// With the in-process bus (`app.in_process_bus`) nothing else would consume the events, so
/// this re-seeds the bus, runs the relay, projections and policies in this process during the
/// import, waits until they have caught up ([`App::settle`], at most [`CLI_SETTLE_TIMEOUT`]) and
/// stops them. Otherwise it only sends the commands; separate relay and worker processes
/// consume them.
///
/// # Errors
/// Import errors ([`ImportError`]); [`ImportError::Pipeline`] for bus/store errors while
/// seeding or the pipeline not settling.
pub async fn run_import_cli(
    app: &App,
    dir: &Path,
    site: Option<&str>,
) -> Result<ImportReport, ImportError> {
    let site = match site {
        Some(s) => s.to_string(),
        None => default_site(dir)?,
    };
    let opts = ImportOptions::default();
    if !app.in_process_bus {
        return import_stackexchange(app, dir, &site, opts).await;
    }
    app.seed_in_process_bus().await?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    let result: Result<ImportReport, ImportError> = async {
        let report = import_stackexchange(app, dir, &site, opts).await?;
        tracing::info!("waiting for the in-process pipeline to apply the imported events");
        let waited = Instant::now();
        app.settle(CLI_SETTLE_TIMEOUT).await?;
        tracing::info!(
            elapsed_ms = waited.elapsed().as_millis() as u64,
            "pipeline settled"
        );
        Ok(report)
    }
    .await;
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    result
}

/// `tektree serve --import DIR [--site NAME]`: imports `dir` as `site` (default: the
/// directory's name) while the caller already runs the pipeline; only sends the commands (the
/// caller waits for [`App::settle`] if it wants up-to-date read models).
///
/// # Errors
/// As [`import_stackexchange`].
pub async fn import_with_pipeline_running(
    app: &App,
    dir: &Path,
    site: Option<&str>,
) -> Result<ImportReport, ImportError> {
    let site = match site {
        Some(s) => s.to_string(),
        None => default_site(dir)?,
    };
    import_stackexchange(app, dir, &site, ImportOptions::default()).await
}

/// The default site name of a dump directory: its last path component.
///
/// # Errors
/// When `dir` has no name (e.g. `/`).
pub fn default_site(dir: &Path) -> Result<String, ImportError> {
    let named = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(String::from);
    named(dir)
        .or_else(|| dir.canonicalize().ok().as_deref().and_then(named))
        .ok_or_else(|| ImportError::InvalidSite(format!("(no name in {})", dir.display())))
}

/// What the check pass found: the post index, the rows each phase handles and the fingerprint
/// of each file as it was checked.
struct Scan {
    posts: PostIndex,
    rows: [u64; 6],
    files: HashMap<&'static str, Fingerprint>,
}

/// Reads every row of `path` (attributes `fields`), calling `f` on each; an `Err(reason)` from
/// `f` becomes [`ImportError::Malformed`] at the row's line. Returns the file's fingerprint,
/// taken when it was opened and checked again at the end (a file that changed while it was
/// read is [`ImportError::Changed`]).
fn for_each_row(
    path: &Path,
    fields: &'static [&'static str],
    mut f: impl FnMut(&Row) -> Result<(), String>,
) -> Result<Fingerprint, ImportError> {
    let mut reader = RowReader::open(path, fields)?;
    let fingerprint = reader.fingerprint()?;
    while let Some(row) = reader.next_row()? {
        f(&row).map_err(|reason| reader.error_at(row.offset, reason))?;
    }
    if reader.fingerprint()? != fingerprint {
        return Err(ImportError::Changed {
            path: path.to_path_buf(),
        });
    }
    Ok(fingerprint)
}

/// The check pass: reads each file once, planning every row for every phase (discarding the
/// plans) and building the post index.
fn scan(dir: &Path, ids: &SiteIds) -> Result<Scan, ImportError> {
    let mut posts = PostIndex::default();
    let mut rows = [0u64; 6];
    let idx = |p: Phase| Phase::ALL.iter().position(|q| *q == p).unwrap_or(0);
    let count = |rows: &mut [u64; 6], p: Phase, step: Step| {
        if step != Step::Pass {
            rows[idx(p)] += 1;
        }
    };
    let empty = PostIndex::default();
    let mut files = HashMap::new();
    let users = for_each_row(
        &dir.join(Phase::Users.file()),
        Phase::Users.fields(),
        |row| {
            count(
                &mut rows,
                Phase::Users,
                Phase::Users.plan(row, ids, &empty)?,
            );
            Ok(())
        },
    )?;
    files.insert(Phase::Users.file(), users);
    let posts_file = for_each_row(
        &dir.join(Phase::Questions.file()),
        Phase::Questions.fields(),
        |row| {
            posts.add_row(row)?;
            for p in [Phase::Questions, Phase::Answers] {
                count(&mut rows, p, p.plan(row, ids, &empty)?);
            }
            Ok(())
        },
    )?;
    files.insert(Phase::Questions.file(), posts_file);
    let comments = for_each_row(
        &dir.join(Phase::Comments.file()),
        Phase::Comments.fields(),
        |row| {
            count(
                &mut rows,
                Phase::Comments,
                Phase::Comments.plan(row, ids, &posts)?,
            );
            Ok(())
        },
    )?;
    files.insert(Phase::Comments.file(), comments);
    let votes = for_each_row(
        &dir.join(Phase::Votes.file()),
        Phase::Votes.fields(),
        |row| {
            for p in [Phase::Votes, Phase::Accepts] {
                count(&mut rows, p, p.plan(row, ids, &posts)?);
            }
            Ok(())
        },
    )?;
    files.insert(Phase::Votes.file(), votes);
    Ok(Scan { posts, rows, files })
}

/// Everything a phase needs.
struct PhaseCtx<'a> {
    app: &'a App,
    dir: &'a Path,
    ids: Arc<SiteIds>,
    posts: Arc<PostIndex>,
    locks: Arc<Vec<Mutex<()>>>,
    opts: &'a ImportOptions,
}

/// What became of one row.
enum Done {
    Sent(CommandKind, Result<u64, CommandError>),
    Skipped(CommandKind, String),
    Rejected(CommandKind, String),
}

/// Runs one phase: a blocking reader task streams the phase's steps through a bounded channel
/// (constant memory); up to `concurrency` commands run at once.
///
/// The file must still have the fingerprint `checked` it had in the check pass: otherwise the
/// phase sends nothing and fails with [`ImportError::Changed`]. A change noticed only at the end
/// of the file (it was modified while this phase read it) fails the phase the same way after
/// its commands were sent, before the next phase starts.
async fn run_phase(
    ctx: &PhaseCtx<'_>,
    phase: Phase,
    total: u64,
    checked: Option<Fingerprint>,
    report: &mut ImportReport,
) -> Result<(), ImportError> {
    let concurrency = ctx.opts.concurrency.max(1);
    let (tx, rx) = mpsc::channel::<Result<Step, ImportError>>(concurrency * 64);
    let path: PathBuf = ctx.dir.join(phase.file());
    let (ids, posts) = (ctx.ids.clone(), ctx.posts.clone());
    let producer = tokio::task::spawn_blocking(move || {
        let unchanged = |reader: &RowReader| match reader.fingerprint() {
            Ok(f) if Some(f) == checked => Ok(()),
            Ok(_) => Err(ImportError::Changed { path: path.clone() }),
            Err(e) => Err(e),
        };
        let opened = RowReader::open(&path, phase.fields()).and_then(|r| unchanged(&r).map(|()| r));
        let mut reader = match opened {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let step = match reader.next_row() {
                Ok(Some(row)) => phase
                    .plan(&row, &ids, &posts)
                    .map_err(|reason| reader.error_at(row.offset, reason)),
                Ok(None) => {
                    if let Err(e) = unchanged(&reader) {
                        let _ = tx.blocking_send(Err(e));
                    }
                    return;
                }
                Err(e) => Err(e),
            };
            if matches!(step, Ok(Step::Pass)) {
                continue;
            }
            let failed = step.is_err();
            if tx.blocking_send(step).is_err() || failed {
                return;
            }
        }
    });

    let steps = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let done = steps
        .map(|item| async move {
            match item? {
                Step::Send(p) => Ok::<_, ImportError>(Done::Sent(p.kind, send(ctx, &p).await)),
                Step::Skip { kind, reason } => Ok(Done::Skipped(kind, reason)),
                Step::Reject { kind, reason } => Ok(Done::Rejected(kind, reason)),
                Step::Pass => unreachable!("the reader task drops passed rows"),
            }
        })
        .buffer_unordered(concurrency);
    let mut done = std::pin::pin!(done);

    let mut processed = 0u64;
    let every = ctx.opts.progress_every.max(1);
    let mut next_progress = every;
    while let Some(d) = done.next().await {
        match d? {
            Done::Sent(kind, Ok(events)) => report.record_ok(kind, events),
            Done::Sent(kind, Err(e)) => report.record_rejected(kind, &e.code()),
            Done::Skipped(kind, reason) => report.record_skipped(kind, &reason),
            Done::Rejected(kind, reason) => {
                tracing::debug!(kind = %kind, reason, "row rejected without a command");
                report.record_rejected(kind, &reason)
            }
        }
        processed += 1;
        if processed == next_progress {
            next_progress += every;
            tracing::info!(phase = phase.name(), processed, total, "import progress");
        }
    }
    producer
        .await
        .map_err(|e| ImportError::Internal(format!("{} reader task: {e}", phase.name())))?;
    Ok(())
}

/// Whether a failure may pass on a second attempt.
fn retryable(e: &CommandError) -> bool {
    matches!(
        e,
        CommandError::Conflict { .. }
            | CommandError::Store(StoreError::Backend(_))
            | CommandError::Rejected(DomainError::Lookup(_))
    )
}

/// Sends one planned command (holding its aggregate's lock stripe); the number of events it
/// wrote, or why it was refused after the allowed attempts.
async fn send(ctx: &PhaseCtx<'_>, p: &Planned) -> Result<u64, CommandError> {
    let id = p.target.aggregate_id();
    let _guard = ctx.locks[(id.as_u128() % LOCK_STRIPES as u128) as usize]
        .lock()
        .await;
    let meta = CommandMeta::new(Actor::importer(), p.occurred_at);
    let attempts = ctx.opts.attempts.max(1);
    let knowledge = &ctx.app.knowledge;
    let mut attempt = 1;
    loop {
        let result = match &p.target {
            Target::User { id, command } => ctx
                .app
                .handler
                .submit::<User>(*id, command.clone(), &NoServices, &meta, None)
                .await
                .map(|(o, _)| o),
            Target::Content { id, command } => ctx
                .app
                .handler
                .submit::<Content>(*id, command.clone(), knowledge, &meta, None)
                .await
                .map(|(o, _)| o),
        };
        match result {
            Ok(outcome) => return Ok(outcome.events.len() as u64),
            Err(e) if attempt < attempts && retryable(&e) => {
                tracing::debug!(kind = %p.kind, aggregate_id = %id, attempt, error = %e,
                    "retrying import command");
                tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => {
                if let CommandError::Rejected(d) = &e {
                    if !matches!(d, DomainError::Lookup(_)) {
                        tracing::debug!(kind = %p.kind, aggregate_id = %id, error = %e,
                            "import command rejected");
                        return Err(e);
                    }
                }
                tracing::warn!(kind = %p.kind, aggregate_id = %id, error = %e,
                    "import command failed; counted as rejected (re-run the import to retry)");
                return Err(e);
            }
        }
    }
}
