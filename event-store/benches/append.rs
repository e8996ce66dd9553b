//! Micro-benchmark of durable appends to the SQLite event store.
//!
//! For each client count in `TEKTREE_BENCH_CLIENTS` (default `1,16,64`) it opens a fresh store
//! in a temporary directory and lets that many concurrent tasks (on a multi-thread Tokio runtime
//! with the default worker count) append one `user.registered` event at a time, each task to its
//! own aggregate, until `TEKTREE_BENCH_APPENDS` appends (default 4,000 per client count) have
//! committed. Every append waits for its durable commit (`synchronous=FULL`).
//!
//! Prints one JSON line per client count:
//! `{"bench":"sqlite_append","clients":N,"appends":A,"batches":B,"seconds":S,
//! "appends_per_s":R,"p50_us":P50,"p99_us":P99}` — seconds of wall time for all appends,
//! per-append latency percentiles in microseconds (nearest rank), and `batches` the number of
//! write transactions the store committed for them (from `SqliteStore::write_batches`).
//!
//! Run: `cargo bench -p tektree-event-store --bench append` (release profile).

use std::time::{Duration, Instant};

use tektree_event_store::conformance::{sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::{EventLog, SqliteStore};
use uuid::Uuid;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile_us(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_micros()
}

async fn run(clients: usize, appends: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("bench.db")).expect("open store");
    let per_client = appends.div_ceil(clients);
    let before = store.write_batches();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = Uuid::new_v4();
            let mut latencies = Vec::with_capacity(per_client);
            for k in 0..per_client as u64 {
                let events = sample_events(id, k + 1, 1);
                let t = Instant::now();
                store
                    .append(SAMPLE_AGGREGATE_TYPE, id, k, events)
                    .await
                    .expect("append");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(per_client * clients);
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = store.write_batches();
    latencies.sort_unstable();
    let n = latencies.len();
    println!(
        "{{\"bench\":\"sqlite_append\",\"clients\":{clients},\"appends\":{n},\"batches\":{},\
         \"seconds\":{seconds:.3},\"appends_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{}}}",
        after - before,
        n as f64 / seconds,
        percentile_us(&latencies, 0.50),
        percentile_us(&latencies, 0.99),
    );
}

fn main() {
    let clients: Vec<usize> = std::env::var("TEKTREE_BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,16,64".to_string())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .collect();
    let appends: usize = env_or("TEKTREE_BENCH_APPENDS", 4_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for c in clients {
        runtime.block_on(run(c, appends));
    }
}
