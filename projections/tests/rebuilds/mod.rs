//! Rebuilds beside the live read model (blue/green), checked the same way on every adapter:
//! queries read the live version until the switch; the switch waits until the rebuild has
//! every position the live consumer applied (also one applied out of order); then queries
//! read the rebuilt version and the live consumer goes on from the rebuild's guard (what the
//! rebuild applied is a duplicate to it); a rebuild resumes from its checkpoint, can be
//! cancelled, and its consumer never shows among the checkpoints.
//!
//! The rebuild applies a **different** projection of the same events (10× the XP), as after a
//! change of projection code, so every answer tells which version it came from. The expected
//! values are sums computed here from the event list.

use std::collections::BTreeMap;

use tektree_projections::{
    ApplyOutcome, Change, EventKey, Projection, ReadModelError, ReadModelStore, RebuildPhase,
    RebuildSwitch,
};
use uuid::Uuid;

const USERS: u128 = 5;
const EVENTS: u64 = 40;
const BOARD: &str = "all-time";

/// Event `position` (1-based): user `position % USERS`, its `sequence`-th event, worth
/// `position` XP.
fn event(position: u64) -> (EventKey, Uuid, i64) {
    let u = u128::from(position) % USERS;
    let user_id = Uuid::from_u128(0xbee0 + u);
    let sequence = (position - 1) / USERS as u64 + 1;
    let key = EventKey {
        aggregate_type: "user".into(),
        aggregate_id: user_id,
        sequence,
        position,
    };
    (key, user_id, position as i64)
}

/// The changes of `projection` for events `positions`, XP scaled by `scale`.
fn items(
    projection: Projection,
    positions: impl IntoIterator<Item = u64>,
    scale: i64,
) -> Vec<(EventKey, Vec<Change>)> {
    positions
        .into_iter()
        .map(|p| {
            let (key, user_id, xp) = event(p);
            let change = match projection {
                Projection::Xp => Change::Xp {
                    user_id,
                    xp: xp * scale,
                    questions: 0,
                    answers: 0,
                    accepted_answers: 0,
                },
                _ => Change::Leaderboard {
                    board: BOARD.into(),
                    user_id,
                    xp: xp * scale,
                },
            };
            (key, vec![change])
        })
        .collect()
}

/// Per user: the XP of events `positions` scaled by `scale`.
fn expected(positions: impl IntoIterator<Item = u64>, scale: i64) -> BTreeMap<Uuid, i64> {
    let mut sums = BTreeMap::new();
    for p in positions {
        let (_, user_id, xp) = event(p);
        *sums.entry(user_id).or_default() += xp * scale;
    }
    sums
}

/// What the live queries of `projection` answer, per user.
async fn read(store: &dyn ReadModelStore, projection: Projection) -> BTreeMap<Uuid, i64> {
    let mut out = BTreeMap::new();
    for u in 0..USERS {
        let user_id = Uuid::from_u128(0xbee0 + u);
        let xp = match projection {
            Projection::Xp => store.user_xp(user_id).await.unwrap().map(|r| r.xp),
            _ => store.rank(BOARD, user_id).await.unwrap().map(|r| r.xp),
        };
        if let Some(xp) = xp {
            out.insert(user_id, xp);
        }
    }
    out
}

/// The leaderboard's first page equals `sums` sorted by XP descending, then user id.
async fn check_page(store: &dyn ReadModelStore, sums: &BTreeMap<Uuid, i64>) {
    let mut want: Vec<(Uuid, i64)> = sums.iter().map(|(u, x)| (*u, *x)).collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let page = store.leaderboard(BOARD, 50, 0).await.unwrap();
    let got: Vec<(Uuid, i64)> = page.iter().map(|r| (r.user_id, r.xp)).collect();
    assert_eq!(got, want);
    for (i, row) in page.iter().enumerate() {
        assert_eq!(row.rank, i as u64 + 1);
        let rank = store.rank(BOARD, row.user_id).await.unwrap().unwrap();
        assert_eq!(rank.rank, i as u64 + 1);
    }
}

fn all_applied(outcomes: &[ApplyOutcome]) -> bool {
    outcomes.iter().all(|o| *o == ApplyOutcome::Applied)
}

/// The whole blue/green check for `projection` (`Xp` or `Leaderboard`) on `store`.
pub async fn blue_green(store: &dyn ReadModelStore, projection: Projection) {
    let name = projection.name();
    // Live: events 1..=20, then 24 out of order (its user's previous event is 19: the guard
    // accepts it and the checkpoint stays at 20 with 24 parked above it).
    let live = store
        .apply(name, &items(projection, 1..=20, 1))
        .await
        .unwrap();
    assert!(all_applied(&live));
    let (k24, _, _) = event(24);
    assert_eq!(k24.sequence, event(19).0.sequence + 1);
    let out = store
        .apply(name, &items(projection, [24], 1))
        .await
        .unwrap();
    assert_eq!(out, vec![ApplyOutcome::Applied]);
    let old = expected((1..=20).chain([24]), 1);
    assert_eq!(read(store, projection).await, old);

    // A rebuild begins, empty, beside the live version.
    let begun = store.rebuild_begin(projection).await.unwrap();
    assert_eq!(
        (
            begun.projection,
            begun.phase,
            begun.checkpoint,
            begun.applied
        ),
        (projection, RebuildPhase::Building, 0, 0)
    );
    let generation = begun.generation;
    let out = store
        .rebuild_apply(projection, &items(projection, 1..=10, 10))
        .await
        .unwrap();
    assert!(all_applied(&out));
    // Queries still read the live version; the rebuild's consumer is not a checkpoint.
    assert_eq!(read(store, projection).await, old);
    let names: Vec<String> = store
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec![name.to_string()]);
    // A live consumer name cannot reach the rebuild's rows.
    let rebuild_consumer = format!("{name}#g{generation}");
    assert!(matches!(
        store
            .apply(&rebuild_consumer, &items(projection, [11], 1))
            .await,
        Err(ReadModelError::Invalid(_))
    ));

    // Behind the live consumer's checkpoint: no switch.
    assert_eq!(
        store.rebuild_switch(projection).await.unwrap(),
        RebuildSwitch::Behind {
            live: 24,
            rebuild: 10
        }
    );
    // Resumed (as after a stopped process): the same rebuild, from its checkpoint.
    let resumed = store.rebuild_begin(projection).await.unwrap();
    assert_eq!(
        (
            resumed.generation,
            resumed.phase,
            resumed.checkpoint,
            resumed.applied
        ),
        (generation, RebuildPhase::Building, 10, 10)
    );
    let out = store
        .rebuild_apply(projection, &items(projection, 11..=22, 10))
        .await
        .unwrap();
    assert!(all_applied(&out));
    // Past the live checkpoint (20) but not past the parked 24: still no switch.
    assert_eq!(
        store.rebuild_switch(projection).await.unwrap(),
        RebuildSwitch::Behind {
            live: 24,
            rebuild: 22
        }
    );
    assert_eq!(read(store, projection).await, old);
    let out = store
        .rebuild_apply(projection, &items(projection, 23..=30, 10))
        .await
        .unwrap();
    assert!(all_applied(&out));
    let listed = store.rebuilds().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].phase, listed[0].checkpoint, listed[0].applied),
        (RebuildPhase::Building, 30, 30)
    );

    // The switch: queries read the rebuilt version at once.
    assert_eq!(
        store.rebuild_switch(projection).await.unwrap(),
        RebuildSwitch::Switched
    );
    assert_eq!(read(store, projection).await, expected(1..=30, 10));
    if projection == Projection::Leaderboard {
        check_page(store, &expected(1..=30, 10)).await;
    }
    let cp = store.checkpoints().await.unwrap();
    assert_eq!(
        (cp[0].name.as_str(), cp[0].checkpoint, cp[0].applied),
        (name, 30, 30)
    );
    let listed = store.rebuilds().await.unwrap();
    assert_eq!(
        (listed[0].phase, listed[0].generation, listed[0].checkpoint),
        (RebuildPhase::Switched, generation, 30)
    );
    assert!(listed[0].finished_at_ms.is_some());
    assert!(matches!(
        store
            .rebuild_apply(projection, &items(projection, [31], 10))
            .await,
        Err(ReadModelError::Invalid(_))
    ));

    // The live consumer goes on from the rebuild's guard: what it had not reached is a
    // duplicate (applied once, by the rebuild); then the rest applies.
    let out = store
        .apply(name, &items(projection, (21..=23).chain(25..=30), 10))
        .await
        .unwrap();
    assert!(out.iter().all(|o| *o == ApplyOutcome::Duplicate), "{out:?}");
    let out = store
        .apply(name, &items(projection, 31..=EVENTS, 10))
        .await
        .unwrap();
    assert!(all_applied(&out), "{out:?}");
    let all = expected(1..=EVENTS, 10);
    assert_eq!(read(store, projection).await, all);
    if projection == Projection::Leaderboard {
        check_page(store, &all).await;
    }

    // A second rebuild, cancelled: the live version is untouched; a new one starts empty.
    let second = store.rebuild_begin(projection).await.unwrap();
    assert_eq!(
        (second.generation, second.phase, second.checkpoint),
        (generation + 1, RebuildPhase::Building, 0)
    );
    store
        .rebuild_apply(projection, &items(projection, 1..=5, 100))
        .await
        .unwrap();
    assert!(store.rebuild_cancel(projection).await.unwrap());
    assert!(!store.rebuild_cancel(projection).await.unwrap());
    assert_eq!(read(store, projection).await, all);
    assert_eq!(
        store.rebuilds().await.unwrap()[0].phase,
        RebuildPhase::Cancelled
    );
    assert!(matches!(
        store.rebuild_switch(projection).await,
        Err(ReadModelError::Invalid(_))
    ));
    let third = store.rebuild_begin(projection).await.unwrap();
    assert_eq!(
        (third.generation, third.checkpoint, third.applied),
        (generation + 2, 0, 0)
    );
    // It switches once it has everything; the answers are the same sums again.
    let out = store
        .rebuild_apply(projection, &items(projection, 1..=EVENTS, 10))
        .await
        .unwrap();
    assert!(all_applied(&out));
    assert_eq!(
        store.rebuild_switch(projection).await.unwrap(),
        RebuildSwitch::Switched
    );
    assert_eq!(read(store, projection).await, all);
    // The in-place reset still clears the (now rebuilt) live version and its guard.
    store.reset(projection).await.unwrap();
    assert_eq!(read(store, projection).await, BTreeMap::new());
    let out = store
        .apply(name, &items(projection, 1..=3, 1))
        .await
        .unwrap();
    assert!(all_applied(&out));
    assert_eq!(read(store, projection).await, expected(1..=3, 1));
}
