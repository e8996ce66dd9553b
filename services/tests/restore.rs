//! Issue #12 §2 and §4: backup and restore. A SQLite store backed up while its pipeline runs,
//! then restored to that older point while the bus (Redis, NATS) kept everything published
//! after it: the epoch is raised, the bus is emptied and refilled from the store, new events
//! take the freed positions, and every read model ends equal to a rebuild from the restored
//! store. An older copy and a copy put back by hand without `tektree restore` are refused; bad
//! input to backup and restore changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tektree_domain::Rules;
use tektree_event_store::sqlite_backup::BackupError;
use tektree_event_store::SqliteStore;
use tektree_outbox::binding::BindError;
use tektree_outbox::test_support::{NatsServer, RedisServer};
use tektree_projections::Projection;
use tektree_services::app::{App, AppError};
use tektree_services::replay::rebuild;
use tektree_services::restore::{backup, restore, RestoreError};
use tokio::sync::watch;
use tokio::task::JoinSet;

mod common;
use common::exports;
use common::history::{drive, register, user};
use tektree_event_store::EventLog;

const SETTLE: Duration = Duration::from_secs(120);

fn url(dir: &Path, name: &str) -> String {
    format!("sqlite://{}", dir.join(name).display())
}

/// Opens the app, runs its pipeline while `work` runs, settles, and stops it.
async fn with_pipeline(store: &str, bus: &str, work: impl AsyncFnOnce(&App)) -> App {
    let app = App::open(store, bus, Rules::default()).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    app.spawn_pipeline(stopped, &mut tasks);
    work(&app).await;
    if let Err(e) = app.settle(SETTLE).await {
        panic!("{bus}: {e}");
    }
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    app
}

async fn xp_users(app: &App) -> Vec<String> {
    let rows = exports(app.read_models.as_ref()).await.unwrap();
    rows["xp"]
        .iter()
        .map(|r| r["user_id"].as_str().unwrap().to_string())
        .collect()
}

async fn restore_while_the_bus_kept_everything(bus: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = url(dir.path(), "t.db");
    let saved = dir.path().join("backup.db");

    // Backed up online, while the pipeline runs.
    let app = with_pipeline(&store, bus, async |app: &App| {
        drive(app).await;
        app.settle(SETTLE).await.unwrap();
        let report = backup(&store, &saved).await.unwrap();
        assert_eq!(report.identity.epoch, 1, "{bus}");
    })
    .await;
    let backed_up = SqliteStore::open(&saved)
        .unwrap()
        .last_position()
        .await
        .unwrap();
    let identity = app.store.identity().await.unwrap();
    drop(app);
    // Later history, published: it will be lost by the restore.
    let app = with_pipeline(&store, bus, async |app: &App| register(app, 100..105).await).await;
    let later = app.store.last_position().await.unwrap();
    assert!(later > backed_up, "{bus}");
    assert_eq!(app.bus.last_published().await.unwrap(), later, "{bus}");
    drop(app);

    // A copy of the backup put in place by hand (same epoch) is refused: the bus holds
    // positions it does not have.
    let by_hand = dir.path().join("by-hand.db");
    backup(&format!("sqlite://{}", saved.display()), &by_hand)
        .await
        .unwrap();
    let refused = App::open(&url(dir.path(), "by-hand.db"), bus, Rules::default())
        .await
        .err();
    assert!(
        matches!(
            refused,
            Some(AppError::Binding(BindError::Diverged { last_published, .. })) if last_published == later
        ),
        "{bus}: {refused:?}"
    );

    let done = restore(&store, bus, Some(&saved), Rules::default())
        .await
        .unwrap();
    assert_eq!(done.replaced, Some(identity), "{bus}");
    assert_eq!(done.restored.store_id, identity.store_id, "{bus}");
    assert_eq!(done.restored.epoch, 2, "{bus}");
    assert_eq!(done.head, backed_up, "{bus}");
    assert!(done.rebuilt.is_empty(), "{bus}: restored with the store");

    // The bus was emptied for the new epoch; the restored store refills it.
    let app = App::open(&store, bus, Rules::default()).await.unwrap();
    assert_eq!(app.bus.last_published().await.unwrap(), 0, "{bus}");
    assert_eq!(app.bus.bound_store().await.unwrap(), Some(done.restored));
    drop(app);
    let app = with_pipeline(&store, bus, async |app: &App| register(app, 200..203).await).await;
    let head = app.store.last_position().await.unwrap();
    let first_new = &app.store.read_all(backed_up, 1).await.unwrap()[0];
    assert_eq!(
        (first_new.position, first_new.aggregate_id),
        (backed_up + 1, user(200)),
        "{bus}: new events take the freed positions"
    );
    let last = app.bus.last_event().await.unwrap().unwrap();
    assert_eq!(
        app.store.read_all(head - 1, 1).await.unwrap()[0].event_id,
        last.event_id,
        "{bus}: the bus's last event is the restored store's"
    );
    let users = xp_users(&app).await;
    assert!(users.contains(&user(200).to_string()), "{bus}");
    assert!(
        !users.contains(&user(100).to_string()),
        "{bus}: lost by the restore"
    );
    let live = exports(app.read_models.as_ref()).await.unwrap();
    for p in Projection::ALL {
        rebuild(app.store.as_ref(), app.read_models.as_ref(), p, |_| {})
            .await
            .unwrap();
    }
    assert!(
        exports(app.read_models.as_ref()).await.unwrap() == live,
        "{bus}: live read models differ from a rebuild"
    );
    drop(app);

    // The backup itself is now an older copy: refused.
    let refused = App::open(&url(dir.path(), "by-hand.db"), bus, Rules::default())
        .await
        .err();
    assert!(
        matches!(
            refused,
            Some(AppError::Binding(BindError::RestoredStore { .. }))
        ),
        "{bus}: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_to_an_older_backup_on_redis_and_nats() {
    tektree_services::api::metrics::handle();
    let redis = RedisServer::start();
    restore_while_the_bus_kept_everything(&redis.url).await;
    let nats = NatsServer::start();
    restore_while_the_bus_kept_everything(&nats.url).await;
    let page = tektree_services::api::metrics::render();
    assert!(
        page.lines()
            .any(|l| l.starts_with("tektree_bus_emptied_for_restore_total 2")),
        "{page}"
    );
}

/// Read models kept from a later point than the restored events (a MongoDB dump restored
/// without its read-model collections, here: a SQLite store whose events are put back in place
/// by `restore` without `--from`) are rebuilt.
#[tokio::test]
async fn read_models_ahead_of_the_restored_store_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let store = url(dir.path(), "t.db");
    let app = with_pipeline(&store, "memory", async |app: &App| drive(app).await).await;
    let head = app.store.last_position().await.unwrap();
    // Pretend the read models saw more than the store holds.
    let path = dir.path().join("t.db");
    drop(app);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let changed = conn
        .execute(
            "UPDATE consumer_checkpoint SET checkpoint = checkpoint + 100 WHERE consumer = 'xp'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let done = restore(&store, "memory", None, Rules::default())
        .await
        .unwrap();
    assert_eq!(done.restored.epoch, 2);
    assert_eq!(done.head, head);
    assert_eq!(done.rebuilt, vec!["xp".to_string()]);
}

/// Policies that have applied more than the restored store holds cannot be rebuilt: the
/// restore names them.
#[tokio::test]
async fn policies_ahead_of_the_restored_store_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = url(dir.path(), "t.db");
    drop(
        with_pipeline(&store, "memory", async |app: &App| {
            register(app, 0..2).await
        })
        .await,
    );
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let changed = conn
        .execute(
            "UPDATE consumer_checkpoint SET applied = applied + 100 \
             WHERE consumer = 'policy.gamification'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let err = restore(&store, "memory", None, Rules::default())
        .await
        .unwrap_err();
    match &err {
        RestoreError::PoliciesAhead { policies, .. } => {
            assert_eq!(policies, &vec!["policy.gamification".to_string()])
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("tektree restore"), "{err}");
}

/// Bad input to backup and restore is refused with a clear error and changes nothing.
#[tokio::test]
async fn bad_backups_and_restores_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = url(dir.path(), "t.db");
    let other = url(dir.path(), "other.db");
    let app = with_pipeline(&store, "memory", async |app: &App| {
        register(app, 0..3).await
    })
    .await;
    let identity = app.store.identity().await.unwrap();
    let head = app.store.last_position().await.unwrap();
    drop(app);
    drop(
        with_pipeline(&other, "memory", async |app: &App| {
            register(app, 0..1).await
        })
        .await,
    );
    let saved = dir.path().join("b.db");
    backup(&store, &saved).await.unwrap();

    let err = backup(&store, &saved).await.unwrap_err();
    assert!(
        matches!(err, RestoreError::Backup(BackupError::Exists(_))),
        "{err}"
    );
    let err = backup(&url(dir.path(), "none.db"), &dir.path().join("x.db"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RestoreError::Backup(BackupError::Missing(_))),
        "{err}"
    );
    let missing = dir.path().join("missing.db");
    let err = restore(&store, "memory", Some(&missing), Rules::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RestoreError::Backup(BackupError::Missing(_))),
        "{err}"
    );
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"not a database at all, just text").unwrap();
    let err = restore(&store, "memory", Some(&junk), Rules::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RestoreError::Backup(BackupError::NotAStore { .. })),
        "{err}"
    );
    let err = restore(&other, "memory", Some(&saved), Rules::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RestoreError::Backup(BackupError::OtherStore { .. })),
        "{err}"
    );
    let err = backup("mongodb://127.0.0.1:1/db?replicaSet=secantus", &junk)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("mongodump"), "{err}");
    // Nothing changed.
    let s = SqliteStore::open(dir.path().join("t.db")).unwrap();
    assert_eq!(s.identity().await.unwrap(), identity);
    assert_eq!(s.last_position().await.unwrap(), head);
}

/// The binary's commands: `tektree backup PATH`, `tektree restore --from PATH`.
#[test]
fn the_binary_backs_up_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let store = url(dir.path(), "t.db");
    let saved = dir.path().join("saved.db");
    let tektree = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tektree"))
            .args(["--store", &store, "--bus", "memory"])
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    drop(SqliteStore::open(dir.path().join("t.db")).unwrap());
    let (ok, out, err) = tektree(&["backup", saved.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("epoch 1") && out.contains("saved.db"), "{out}");
    let (ok, _, err) = tektree(&["backup", saved.to_str().unwrap()]);
    assert!(!ok && err.contains("exists already"), "{err}");
    let (ok, out, err) = tektree(&["restore", "--from", saved.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("epoch 2"), "{out}");
}
