//! The stored history the relay, projection, replay and limit scenarios read: the append
//! workload executed through the command handler, then both policies run over it as their
//! workers do (`worker::process`), so the store holds what a live import leaves behind —
//! knowledge events plus the gamification and subscription events the policies add.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tektree_domain::{EventEnvelope, Rules};
use tektree_outbox::Delivery;
use tektree_services::app::App;
use tektree_services::consumer::{self, Consumer};
use tektree_services::worker::{self, Processed};

use crate::append;
use crate::workload;

/// Events handed to a policy per `worker::process` call (the workers' default batch).
const POLICY_BATCH: usize = 256;

/// A built store.
pub struct Corpus {
    /// The SQLite file.
    pub path: PathBuf,
    /// The application over it (in-process bus, unused).
    pub app: App,
    /// Stored events.
    pub events: u64,
    /// Workload commands sent.
    pub commands: u64,
    /// Per policy: (name, events consumed, seconds), both policies running at once.
    pub policies: Vec<(String, u64, f64)>,
}

/// Every stored event, in position order.
pub async fn all_events(app: &App) -> Result<Vec<EventEnvelope>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = app.store.read_all(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        out.extend(page);
    }
    Ok(out)
}

/// Runs `consumer` over the store until it has processed every stored event and the head no
/// longer moves; `(events processed, seconds)`.
async fn run_policy(app: &App, consumer: &dyn Consumer) -> Result<(u64, f64)> {
    let started = Instant::now();
    let mut after = 0u64;
    let mut count = 0u64;
    let mut idle_rounds = 0;
    loop {
        let page = app.store.read_all(after, POLICY_BATCH).await?;
        if page.is_empty() {
            // The other policy may still append events this one reacts to.
            idle_rounds += 1;
            if idle_rounds > 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        idle_rounds = 0;
        let deliveries: Vec<Delivery> = page
            .into_iter()
            .map(|envelope| Delivery {
                id: envelope.position.to_string(),
                envelope,
                delivery_count: 1,
            })
            .collect();
        let mut attempts = 0;
        loop {
            let results = worker::process(app, consumer, &deliveries, &[]).await?;
            if let Some(Processed::Poison(reason)) =
                results.iter().find(|r| matches!(r, Processed::Poison(_)))
            {
                bail!(
                    "{}: poison event while building the corpus: {reason}",
                    consumer.name()
                );
            }
            if results
                .iter()
                .all(|r| matches!(r, Processed::Applied | Processed::Duplicate))
            {
                break;
            }
            attempts += 1;
            if attempts > 50 {
                bail!(
                    "{}: events kept failing transiently: {results:?}",
                    consumer.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        count += deliveries.len() as u64;
        after = deliveries.last().map_or(after, |d| d.envelope.position);
    }
    Ok((count, started.elapsed().as_secs_f64()))
}

/// Builds the corpus in `dir`: about `events` stored events (the workload sized so that it and
/// the policies' events add up to it: the import's ratio is 2.4 events per workload command).
///
/// # Errors
/// Store or policy failures.
pub async fn build(dir: &Path, seed: u64, events: u64, clients: usize) -> Result<Corpus> {
    let path = dir.join("corpus.db");
    remove_db(&path);
    let url = format!("sqlite://{}", path.display());
    let app = App::open(&url, "memory", Rules::default())
        .await
        .with_context(|| format!("opening {url}"))?;
    let commands = (events as f64 / 2.4).ceil().max(10.0) as u64;
    let work = workload::generate(seed ^ 0x00C0_FFEE, commands);
    let t = Instant::now();
    let done = append::execute(&app, &work, clients).await?;
    eprintln!(
        "tektree-bench: corpus: {} commands, {} events in {:.1}s; running the policies",
        done.commands,
        done.events,
        t.elapsed().as_secs_f64()
    );
    let mut tasks = tokio::task::JoinSet::new();
    for policy in app.policies() {
        let (app, consumer) = (app.clone(), consumer::policy(policy));
        tasks.spawn(async move {
            let r = run_policy(&app, consumer.as_ref()).await;
            (consumer.name().to_string(), r)
        });
    }
    let mut policies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (name, r) = done.context("a policy task failed")?;
        let (n, secs) = r?;
        policies.push((name, n, secs));
    }
    // A last pass each, now that both have stopped appending.
    for policy in app.policies() {
        run_policy(&app, consumer::policy(policy).as_ref()).await?;
    }
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    let head = app.store.head().await?;
    Ok(Corpus {
        path,
        app,
        events: head.events,
        commands: done.commands,
        policies,
    })
}

/// Removes a SQLite database and its WAL and shared-memory files (ignoring absent ones).
pub fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// A consistent copy of the SQLite database at `from` (`VACUUM INTO`), at `to`.
///
/// # Errors
/// SQLite errors.
pub fn copy_db(from: &Path, to: &Path) -> Result<()> {
    remove_db(to);
    let conn = rusqlite::Connection::open(from)?;
    conn.execute("VACUUM INTO ?1", [to.to_string_lossy().as_ref()])?;
    Ok(())
}
