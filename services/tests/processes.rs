//! Issue #2 §8: the relay and the workers run as separate `tektree` processes on a real Redis
//! server while the bundled dump is imported; they are SIGKILLed at random moments and
//! restarted. Afterwards every read model must match the dump exactly, and rebuilding every
//! projection from the store must give identical read models.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::*;
use tektree_domain::Rules;
use tektree_outbox::test_support::RedisServer;
use tektree_services::app::App;
use tektree_services::import::{import_stackexchange, ImportOptions};
use tektree_services::replay::rebuild;
use uuid::Uuid;

/// One `tektree` process, SIGKILLed on drop.
struct Proc {
    name: &'static str,
    args: Vec<String>,
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, args: Vec<String>, logdir: &std::path::Path) -> Proc {
        let log = logdir.join(format!("{name}.log"));
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tektree"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn tektree");
        Proc {
            name,
            args,
            child,
            log,
        }
    }

    /// SIGKILL and start again with the same arguments.
    fn kill_and_restart(&mut self, logdir: &std::path::Path) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
        *self = Proc::spawn(self.name, self.args.clone(), logdir);
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("{} exited early with {status}:\n{log}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn killed_relay_and_workers_restart_to_identical_read_models() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let expected = expected();
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite://{}", dir.path().join("tektree.db").display());
        let common = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = ["--store", &store, "--bus", &redis.url]
                .iter()
                .map(|s| s.to_string())
                .collect();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        // The API-side process is this test: it sends the import's commands. The relay and
        // three workers run separately; xp and the gamification policy have two workers each.
        let app = App::open(&store, &redis.url, Rules::default())
            .await
            .unwrap();
        let logs = dir.path();
        let mut procs = vec![
            Proc::spawn("relay", common(&["relay"]), logs),
            Proc::spawn("worker-all", common(&["worker"]), logs),
            Proc::spawn("worker-xp", common(&["worker", "--projection", "xp"]), logs),
            Proc::spawn(
                "worker-gamification",
                common(&["worker", "--projection", "policy.gamification"]),
                logs,
            ),
        ];

        // Kill points: store head positions, jittered by a random seed printed for replay.
        let seed = Uuid::new_v4();
        let jitter = |i: usize| u64::from(seed.as_bytes()[i]) * 20;
        let mut plan: Vec<(u64, usize)> = vec![
            (2_000 + jitter(0), 0),  // relay
            (6_000 + jitter(1), 1),  // worker-all
            (10_000 + jitter(2), 2), // worker-xp
            (14_000 + jitter(3), 3), // worker-gamification
            (18_000 + jitter(4), 0), // relay again
            (24_000 + jitter(5), 1), // worker-all again
        ];
        eprintln!("kill plan (seed {seed}): {plan:?}");

        let started = Instant::now();
        let dump = dump_dir();
        let import = import_stackexchange(&app, &dump, SITE, ImportOptions::default());
        tokio::pin!(import);
        let mut faults = 0;
        let report = loop {
            tokio::select! {
                r = &mut import => break r.expect("import"),
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                    let head = app.store.head().await.unwrap().position;
                    while let Some(&(at, which)) = plan.first() {
                        if head < at { break; }
                        plan.remove(0);
                        procs[which].kill_and_restart(logs);
                        faults += 1;
                    }
                    for p in procs.iter_mut() { p.assert_running(); }
                }
            }
        };
        // Kill points the import did not reach happen now, while the policies still work.
        for (_, which) in plan.drain(..) {
            procs[which].kill_and_restart(logs);
            faults += 1;
        }
        app.settle(SETTLE).await.expect("pipeline settles");
        for p in procs.iter_mut() {
            p.assert_running();
        }
        eprintln!(
            "{faults} SIGKILLs; settled after {:.1} s\n{report}",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(faults, 6);
        drop(procs);

        let live = collect(&app, report, &expected, started.elapsed())
            .await
            .unwrap();
        assert_matches_dump(&live, &expected);

        // Rebuilding every projection from the store gives identical read models.
        for name in tektree_projections::Projection::ALL {
            rebuild(app.store.as_ref(), app.read_models.as_ref(), name, |_| {})
                .await
                .unwrap();
        }
        let rebuilt = collect(&app, live.report.clone(), &expected, started.elapsed())
            .await
            .unwrap();
        for (name, rows) in &live.exports {
            assert_eq!(
                rows.len(),
                rebuilt.exports[name].len(),
                "{name}: row count after rebuild"
            );
            assert!(
                rows == &rebuilt.exports[name],
                "{name}: rebuilt read model differs"
            );
        }
    });
}
