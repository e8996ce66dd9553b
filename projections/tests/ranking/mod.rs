//! Shared by the read-model suites: leaderboard histories built to exercise the count trie
//! (many equal XP values, user ids that share long prefixes, entries that move up and down),
//! and every ranking answer checked against a plain sort of the summed XP.

use std::collections::BTreeMap;

use tektree_projections::{Change, EventKey, LeaderboardRow, ReadModelStore};
use uuid::Uuid;

/// The boards a history writes.
pub const BOARDS: [&str; 2] = ["all-time", "tag:rust"];

/// One leaderboard history: batches of `(event key, changes)` for the `leaderboard` consumer.
pub struct History {
    /// The batches, in delivery order (each aggregate's sequences ascending).
    pub batches: Vec<Vec<(EventKey, Vec<Change>)>>,
    /// Every (board, user) written, with the summed XP: the oracle's input.
    pub sums: BTreeMap<(String, Uuid), i64>,
}

/// A user id whose first four bytes come from `{0, 1}` each (so 16 prefix groups: long shared
/// prefixes, deep splits) followed by `tail`.
fn user(bits: u8, tail: u128) -> Uuid {
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().take(4).enumerate() {
        *byte = (bits >> i) & 1;
    }
    b[4..].copy_from_slice(&tail.to_be_bytes()[4..]);
    Uuid::from_bytes(b)
}

/// A history of `users` users, each with 1 to 4 XP events, drawn from `seed`; most XP deltas
/// are small so that large groups share one XP value.
pub fn history(users: usize, seed: u64) -> History {
    history_with(users, seed, &[1, 1, 1, 1, 2, -1, 0, 255, 1 << 20], 4)
}

/// A history where every user earns 1 XP once: one tie of `users` entries per board (split
/// when above 64).
pub fn ties(users: usize, seed: u64) -> History {
    history_with(users, seed, &[1], 1)
}

/// A history of `users` users with 1 to `max_events` events each, of XP deltas drawn from
/// `deltas`.
fn history_with(users: usize, seed: u64, deltas: &[i64], max_events: u64) -> History {
    // splitmix64: a number below `n`.
    let mut state = seed;
    let mut draw = move |n: u64| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    };
    let mut events = vec![];
    let mut sums = BTreeMap::new();
    for u in 0..users {
        let id = user(draw(16) as u8, draw(u64::MAX) as u128);
        let n = 1 + draw(max_events);
        for _ in 0..n {
            let xp = deltas[draw(deltas.len() as u64) as usize];
            let mut changes = vec![];
            for board in BOARDS {
                // The second board holds about half the users.
                if board == BOARDS[0] || u % 2 == 0 {
                    *sums.entry((board.to_string(), id)).or_insert(0) += xp;
                    changes.push(Change::Leaderboard {
                        board: board.to_string(),
                        user_id: id,
                        xp,
                    });
                }
            }
            events.push((id, changes));
        }
    }
    // Interleave users in a random order; sequences are assigned in delivery order below.
    let mut order: Vec<(u64, usize)> = events
        .iter()
        .enumerate()
        .map(|(i, _)| (draw(1 << 40), i))
        .collect();
    order.sort();
    let mut next_seq: BTreeMap<Uuid, u64> = BTreeMap::new();
    let mut items = vec![];
    for (_, i) in order {
        let (id, changes) = &events[i];
        let seq = next_seq.entry(*id).or_insert(0);
        *seq += 1;
        items.push((*id, *seq, changes.clone()));
    }
    let mut batches = vec![];
    let mut batch = vec![];
    for (position, (id, seq, changes)) in items.into_iter().enumerate() {
        // Each user's k-th delivered event carries its k-th sequence (the deltas are summed,
        // so which delta goes with which sequence does not matter).
        batch.push((
            EventKey {
                aggregate_type: "profile".into(),
                aggregate_id: id,
                sequence: seq,
                position: position as u64 + 1,
            },
            changes,
        ));
        if draw(50) == 0 {
            batches.push(std::mem::take(&mut batch));
        }
    }
    batches.push(batch);
    History { batches, sums }
}

/// The board's entries in rank order (XP descending, then user id ascending), by a plain sort.
fn sorted(sums: &BTreeMap<(String, Uuid), i64>, board: &str) -> Vec<(Uuid, i64)> {
    let mut rows: Vec<(Uuid, i64)> = sums
        .iter()
        .filter(|((b, _), _)| b == board)
        .map(|((_, id), xp)| (*id, *xp))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    rows
}

fn expect(board: &str, rows: &[(Uuid, i64)], from: usize) -> Vec<LeaderboardRow> {
    rows.iter()
        .enumerate()
        .map(|(i, (user_id, xp))| LeaderboardRow {
            board: board.to_string(),
            rank: (from + i + 1) as u64,
            user_id: *user_id,
            xp: *xp,
        })
        .collect()
}

/// Applies `h` to `store` and checks, on every board, every user's rank, pages of several
/// sizes at every offset up to one past the end, and "around me" for every `stride`-th user
/// with a few `k`, against the oracle; users and boards without entries answer `None` / empty.
pub async fn apply_and_check(store: &dyn ReadModelStore, h: &History, stride: usize) {
    for batch in &h.batches {
        store.apply("leaderboard", batch).await.unwrap();
    }
    check(store, h, stride).await;
}

/// The checks of [`apply_and_check`] on a store that already holds `h`.
pub async fn check(store: &dyn ReadModelStore, h: &History, stride: usize) {
    for board in BOARDS {
        let rows = sorted(&h.sums, board);
        for (i, (user_id, _)) in rows.iter().enumerate() {
            let got = store.rank(board, *user_id).await.unwrap();
            assert_eq!(got, expect(board, &rows[i..=i], i).pop(), "rank on {board}");
        }
        for (limit, step) in [(1usize, 1usize), (7, 5), (50, 23)] {
            for offset in (0..=rows.len() + 1).step_by(step) {
                let page = store
                    .leaderboard(board, limit as u32, offset as u64)
                    .await
                    .unwrap();
                let end = (offset + limit).min(rows.len());
                let want = if offset < rows.len() {
                    expect(board, &rows[offset..end], offset)
                } else {
                    vec![]
                };
                assert_eq!(page, want, "{board} limit {limit} offset {offset}");
            }
        }
        for (i, (user_id, _)) in rows.iter().enumerate().step_by(stride.max(1)) {
            for k in [0usize, 1, 3, 40] {
                let got = store.around(board, *user_id, k as u32).await.unwrap();
                let from = i.saturating_sub(k);
                let to = (i + k + 1).min(rows.len());
                assert_eq!(
                    got,
                    Some(expect(board, &rows[from..to], from)),
                    "around #{} k {k} on {board}",
                    i + 1
                );
            }
        }
    }
    let stranger = Uuid::from_u128(u128::MAX);
    assert_eq!(store.rank(BOARDS[0], stranger).await.unwrap(), None);
    assert_eq!(store.around(BOARDS[0], stranger, 3).await.unwrap(), None);
    assert!(store
        .leaderboard("no-such-board", 10, 0)
        .await
        .unwrap()
        .is_empty());
}
