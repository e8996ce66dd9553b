//! Scenario 1, **append**: the workload executed in-process through `CommandHandler` by N
//! concurrent clients, each command durable (its SQLite transaction committed with
//! `synchronous=FULL`) before the client sends its next one.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use tektree_commands::{CommandError, CommandMeta, Outcome};
use tektree_domain::{Actor, Content, DomainError, NoServices, User};
use tektree_event_store::StoreError;
use tektree_services::app::App;

use crate::clients::{self, Sent};
use crate::stats::Latencies;
use crate::workload::{Cmd, Workload};

/// Attempts per command when it keeps conflicting with concurrent writers of its aggregate
/// (each attempt is itself the handler's up to 5 load → decide → append rounds).
const CLIENT_ATTEMPTS: u32 = 20;

/// What one execution of a workload did.
#[derive(Debug, Default)]
pub struct Executed {
    /// Commands sent.
    pub commands: u64,
    /// Events committed.
    pub events: u64,
    /// Client-side retries after `CommandError::Conflict` (the handler gave up after its 5
    /// attempts), a storage error or a failed lookup.
    pub conflict_retries: u64,
    /// Commands refused for good (none expected), with the first reasons.
    pub refused: u64,
    /// The first few refusal reasons.
    pub refusals: Vec<String>,
    /// Wall time of all phases.
    pub elapsed: Duration,
    /// Per-command latency, retries included.
    pub latencies: Latencies,
    /// Commands/s of each phase, in order.
    pub phases: Vec<(&'static str, f64)>,
}

/// Runs one command with client-side retries; `(outcome, retries)`.
pub async fn send(app: &App, cmd: &Cmd, at: DateTime<Utc>) -> (Result<Outcome, CommandError>, u64) {
    let meta = CommandMeta::new(Actor::importer(), at);
    let mut retries = 0;
    loop {
        let r = match cmd {
            Cmd::User(id, c) => {
                app.handler
                    .execute::<User>(*id, c.clone(), &NoServices, &meta)
                    .await
            }
            Cmd::Content(id, c) => {
                app.handler
                    .execute::<Content>(*id, c.clone(), &app.knowledge, &meta)
                    .await
            }
        };
        match r {
            Ok(outcome) => return (Ok(outcome), retries),
            Err(
                CommandError::Conflict { .. }
                | CommandError::Store(StoreError::Backend(_))
                | CommandError::Rejected(DomainError::Lookup(_)),
            ) if retries + 1 < u64::from(CLIENT_ATTEMPTS) => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(1 + retries)).await;
            }
            Err(e) => return (Err(e), retries),
        }
    }
}

/// Executes `workload` against `app` with `clients` concurrent clients, phase after phase
/// (each phase's commands are shared by the clients; a client sends its next command once the
/// previous one is committed; see [`crate::clients::run`]).
///
/// # Errors
/// When a client task fails (panics).
pub async fn execute(app: &App, workload: &Workload, clients: usize) -> Result<Executed> {
    let phases = workload.named_phases();
    let app = app.clone();
    let tally = clients::run(&phases, clients, move |(cmd, at)| {
        let app = app.clone();
        async move {
            let (result, retries) = send(&app, &cmd, at).await;
            Sent {
                result: result
                    .map(|o| o.events.len() as u64)
                    .map_err(|e| e.to_string()),
                retries,
            }
        }
    })
    .await?;
    Ok(Executed {
        commands: tally.sent,
        events: tally.events,
        conflict_retries: tally.retries,
        refused: tally.failed,
        refusals: tally.failures,
        elapsed: tally.elapsed,
        latencies: tally.latencies,
        phases: tally.phases,
    })
}

/// Offers `workload` open-loop at `per_s` commands per second: each command is started by
/// `run` at its due time (up to `max_in_flight` at once, the rest wait for a slot), whatever
/// the previous ones are doing. Phases still run one after the other (the next starts once the
/// previous one's commands are all answered). Returns, in completion order, each command's
/// time from its due time to the end of `run`, with `run`'s output.
///
/// # Errors
/// When a command task fails (panics).
pub async fn pace<T, F, Fut>(
    workload: &Workload,
    per_s: f64,
    max_in_flight: usize,
    run: F,
) -> Result<Vec<(Duration, T)>>
where
    F: Fn(Cmd, DateTime<Utc>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / per_s.max(1.0));
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let mut done = Vec::with_capacity(workload.len());
    for phase in &workload.phases {
        let phase_started = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (cmd, at)) in phase.commands.iter().enumerate() {
            let due = phase_started + interval * i as u32;
            tokio::time::sleep_until(due).await;
            let permit = permits.clone().acquire_owned().await?;
            let command = run(cmd.clone(), *at);
            tasks.spawn(async move {
                let out = command.await;
                drop(permit);
                (due.elapsed(), out)
            });
        }
        while let Some(finished) = tasks.join_next().await {
            let Ok(one) = finished else {
                bail!("a paced command task failed");
            };
            done.push(one);
        }
    }
    Ok(done)
}

/// Executes `workload` open-loop at `per_s` commands per second ([`pace`]); each command's
/// latency counts from its due time, so a slow store shows as latency instead of a lower
/// offered rate.
///
/// # Errors
/// When a command task fails (panics).
pub async fn execute_paced(
    app: &App,
    workload: &Workload,
    per_s: f64,
    max_in_flight: usize,
) -> Result<Executed> {
    let started = Instant::now();
    let results = pace(workload, per_s, max_in_flight, |cmd, at| {
        let app = app.clone();
        async move {
            let (result, retries) = send(&app, &cmd, at).await;
            (
                result
                    .map(|o| o.events.len() as u64)
                    .map_err(|e| e.to_string()),
                retries,
            )
        }
    })
    .await?;
    let mut total = Executed::default();
    for (latency, (result, retries)) in results {
        total.latencies.push(latency);
        total.commands += 1;
        total.conflict_retries += retries;
        match result {
            Ok(events) => total.events += events,
            Err(e) => {
                total.refused += 1;
                if total.refusals.len() < 5 {
                    total.refusals.push(e);
                }
            }
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}
