//! A rebuild refuses a stored history that breaks the event store's guarantees instead of
//! dropping events silently: a hole in the global positions, or an aggregate whose events are
//! out of sequence order in position order. The histories are written by the real SQLite
//! store and then damaged with plain SQL, as a broken restore or a buggy adapter would.

use std::path::Path;

use tektree_event_store::conformance::{sample_events, SAMPLE_AGGREGATE_TYPE};
use tektree_event_store::{EventLog, SqliteStore};
use tektree_projections::{Projection, SqliteReadModels};
use tektree_projections::{ReadModelStore, RebuildPhase};
use tektree_services::replay::{rebuild, rebuild_beside, rebuild_beside_paged, ReplayError};
use uuid::Uuid;

/// Two aggregates, three events each, interleaved: positions 1..=6. Returns the ids.
async fn history(path: &Path) -> (Uuid, Uuid) {
    let store = SqliteStore::open(path).unwrap();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for seq in 1..=3u64 {
        for id in [a, b] {
            store
                .append(
                    SAMPLE_AGGREGATE_TYPE,
                    id,
                    seq - 1,
                    sample_events(id, seq, 1),
                )
                .await
                .unwrap();
        }
    }
    (a, b)
}

fn sql(path: &Path, statements: &str) {
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch(statements)
        .unwrap();
}

/// Rebuilds `xp` in place and beside the live version, each into a read-model file of its
/// own; both must give the same answer. A rebuild beside that fails must stay unswitched (in
/// progress, queries on the live version).
async fn rebuild_xp(path: &Path, dir: &Path) -> Result<u64, ReplayError> {
    let store = SqliteStore::open(path).unwrap();
    let in_place = SqliteReadModels::open(dir.join("in-place.db")).unwrap();
    let first = rebuild(&store, &in_place, Projection::Xp, |_| {}).await;
    let beside = SqliteReadModels::open(dir.join("beside.db")).unwrap();
    let second = rebuild_beside(&store, &beside, Projection::Xp, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .await;
    match (&first, &second) {
        (Ok(n), Ok(r)) => assert_eq!((*n, r.switched), (r.events, true)),
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string());
            let status = beside.rebuilds().await.unwrap();
            assert_eq!(status[0].phase, RebuildPhase::Building);
        }
        other => panic!("in place and beside differ: {other:?}"),
    }
    first
}

#[tokio::test]
async fn an_intact_history_rebuilds_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("es.db");
    history(&path).await;
    assert_eq!(rebuild_xp(&path, dir.path()).await.unwrap(), 6);
}

#[tokio::test]
async fn a_hole_in_the_positions_stops_the_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("es.db");
    history(&path).await;
    sql(
        &path,
        "DELETE FROM outbox WHERE position = 4; DELETE FROM events WHERE position = 4;",
    );
    match rebuild_xp(&path, dir.path()).await {
        Err(ReplayError::History { position, reason }) => {
            assert_eq!(position, 5);
            assert!(reason.contains("position 4 is missing"), "{reason}");
        }
        other => panic!("expected a broken-history error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_aggregate_out_of_order_stops_the_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("es.db");
    let (a, _) = history(&path).await;
    // Swap the positions of a's sequences 1 (position 1) and 2 (position 3).
    sql(
        &path,
        "PRAGMA foreign_keys = OFF;
         UPDATE events SET position = 100 WHERE position = 1;
         UPDATE events SET position = 1 WHERE position = 3;
         UPDATE events SET position = 3 WHERE position = 100;",
    );
    match rebuild_xp(&path, dir.path()).await {
        Err(ReplayError::History { position, reason }) => {
            assert_eq!(position, 1, "{reason}");
            assert!(reason.contains(&a.to_string()), "{reason}");
            assert!(reason.contains("sequence 2"), "{reason}");
            assert!(reason.contains("Gap"), "{reason}");
        }
        other => panic!("expected a broken-history error, got {other:?}"),
    }
}

/// A rebuild beside the live version stopped by its progress callback stays in progress,
/// unswitched, and the next call resumes it from its checkpoint (Ctrl-C in `tektree-replay`).
#[tokio::test]
async fn a_stopped_rebuild_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("es.db");
    history(&path).await;
    let store = SqliteStore::open(&path).unwrap();
    let read_models = SqliteReadModels::open(dir.path().join("rm.db")).unwrap();
    let stopped = rebuild_beside_paged(&store, &read_models, Projection::Xp, 2, |_| {
        std::ops::ControlFlow::Break(())
    })
    .await
    .unwrap();
    assert_eq!(
        (stopped.events, stopped.resumed_from, stopped.switched),
        (2, 0, false)
    );
    let status = read_models.rebuilds().await.unwrap();
    assert_eq!(
        (status[0].phase, status[0].checkpoint),
        (RebuildPhase::Building, 2)
    );
    let resumed = rebuild_beside_paged(&store, &read_models, Projection::Xp, 2, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(
        (
            resumed.generation,
            resumed.resumed_from,
            resumed.events,
            resumed.switched
        ),
        (stopped.generation, 2, 4, true)
    );
    assert_eq!(read_models.checkpoints().await.unwrap()[0].checkpoint, 6);
}
