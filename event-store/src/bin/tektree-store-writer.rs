//! `tektree-store-writer`: a load-generating appender process for the MongoDB store, used by
//! the multi-process tests (`event-store/tests/mongo_processes.rs`) to prove that positions stay
//! live while other writer processes are SIGKILLed or SIGSTOPped mid-pass.
//!
//! Configured by environment variables (no argument parser for a test tool):
//!
//! | variable | meaning |
//! |---|---|
//! | `TEKTREE_WRITER_URI` | MongoDB connection string (required); `appName` names the process |
//! | `TEKTREE_WRITER_DB` | database (required) |
//! | `TEKTREE_WRITER_TASKS` | concurrent writer tasks (default 3) |
//! | `TEKTREE_WRITER_APPENDS` | appends per task (default 20) |
//! | `TEKTREE_WRITER_SHARED` | a UUID: task 0 appends to this one aggregate (shared by every process), retrying on conflicts; the other tasks append to aggregates of their own |
//!
//! Prints one line per acknowledged append, then `done`:
//! `ok <aggregate_id> <first_sequence> <first_position> <events> <latency_ms> <event_ids,…>`.
//! Exits 1 on any error other than a version conflict.

use std::io::Write;
use std::time::Instant;

use tektree_event_store::conformance::{sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::mongo::MongoStore;
use tektree_event_store::{EventLog, StoreError};
use uuid::Uuid;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number(name: &str, default: usize) -> usize {
    var(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One acknowledged append as a line.
fn line(id: Uuid, envs: &[tektree_domain::EventEnvelope], started: Instant) -> String {
    let ids: Vec<String> = envs.iter().map(|e| e.event_id.to_string()).collect();
    format!(
        "ok {id} {} {} {} {} {}",
        envs[0].sequence,
        envs[0].position,
        envs.len(),
        started.elapsed().as_millis(),
        ids.join(",")
    )
}

async fn task(
    store: MongoStore,
    shared: Option<Uuid>,
    appends: usize,
    k: usize,
) -> Result<(), StoreError> {
    let mut own = Uuid::new_v4();
    let mut version = 0u64;
    for i in 0..appends {
        let started = Instant::now();
        let envs = match shared {
            Some(id) => loop {
                let v = store
                    .load(SAMPLE_AGGREGATE_TYPE, id)
                    .await?
                    .last()
                    .map_or(0, |e| e.sequence);
                match store
                    .append(SAMPLE_AGGREGATE_TYPE, id, v, sample_events(id, v + 1, 1))
                    .await
                {
                    Ok(envs) => break envs,
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e),
                }
            },
            None => {
                if i % 4 == 0 {
                    own = Uuid::new_v4();
                    version = 0;
                }
                let n = (i + k) as u64 % 3 + 1;
                let envs = store
                    .append(
                        SAMPLE_AGGREGATE_TYPE,
                        own,
                        version,
                        sample_events(own, version + 1, n),
                    )
                    .await?;
                version += n;
                envs
            }
        };
        let id = envs[0].aggregate_id;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", line(id, &envs, started));
        let _ = out.flush();
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let (Some(uri), Some(db)) = (var("TEKTREE_WRITER_URI"), var("TEKTREE_WRITER_DB")) else {
        eprintln!("set TEKTREE_WRITER_URI and TEKTREE_WRITER_DB");
        return std::process::ExitCode::from(2);
    };
    let tasks = number("TEKTREE_WRITER_TASKS", 3);
    let appends = number("TEKTREE_WRITER_APPENDS", 20);
    let shared = var("TEKTREE_WRITER_SHARED").and_then(|s| Uuid::parse_str(&s).ok());
    let store = match MongoStore::connect(&uri, &db).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let handles: Vec<_> = (0..tasks)
        .map(|k| {
            let shared = if k == 0 { shared } else { None };
            tokio::spawn(task(store.clone(), shared, appends, k))
        })
        .collect();
    let mut failed = false;
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("append failed: {e}");
                failed = true;
            }
            Err(e) => {
                eprintln!("task failed: {e}");
                failed = true;
            }
        }
    }
    println!("done");
    if failed {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
