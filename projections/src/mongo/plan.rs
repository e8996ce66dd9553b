//! The pure parts of [`ReadModelStore::apply`](crate::ReadModelStore::apply): the sequence
//! guard decisions of a batch and the low-water checkpoint fold.

use std::collections::{BTreeSet, HashMap};

use uuid::Uuid;

use crate::{ApplyOutcome, EventKey};

/// Guard key: `(aggregate_type, aggregate_id)`.
pub type GuardKey = (String, Uuid);

/// Outcomes of a batch under the sequence guard, given the stored guards (`last` applied
/// sequence per aggregate; absent = 0). Items see the guard as advanced by the items before
/// them. Returns the outcomes and the guards that changed (their new `last`).
pub fn plan_guards(
    keys: &[EventKey],
    stored: &HashMap<GuardKey, u64>,
) -> (Vec<ApplyOutcome>, HashMap<GuardKey, u64>) {
    let mut changed: HashMap<GuardKey, u64> = HashMap::new();
    let outcomes = keys
        .iter()
        .map(|k| {
            let key = (k.aggregate_type.clone(), k.aggregate_id);
            let last = changed
                .get(&key)
                .or_else(|| stored.get(&key))
                .copied()
                .unwrap_or(0);
            if k.sequence <= last {
                ApplyOutcome::Duplicate
            } else if k.sequence > last + 1 {
                ApplyOutcome::Gap { expected: last + 1 }
            } else {
                changed.insert(key, k.sequence);
                ApplyOutcome::Applied
            }
        })
        .collect();
    (outcomes, changed)
}

/// A consumer's checkpoint while a batch is folded in.
///
/// The checkpoint is the highest `p` such that every position `≤ p` was applied (positions
/// are gap-free, see the crate docs). Positions applied above it are *parked* in
/// `consumer_applied` until the gap below them closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Low-water mark.
    pub checkpoint: u64,
    /// Events applied in total.
    pub applied: u64,
    /// Positions applied in this batch that are still above the checkpoint.
    pub parked_new: BTreeSet<u64>,
    /// Whether anything changed (the checkpoint document must be written).
    pub dirty: bool,
}

impl Progress {
    /// Progress as stored.
    pub fn new(checkpoint: u64, applied: u64) -> Self {
        Progress {
            checkpoint,
            applied,
            parked_new: BTreeSet::new(),
            dirty: false,
        }
    }

    /// Records that `position` was applied.
    pub fn record(&mut self, position: u64) {
        self.applied += 1;
        self.dirty = true;
        if position > self.checkpoint {
            self.parked_new.insert(position);
        }
        self.fold_new();
    }

    fn fold_new(&mut self) {
        while self.parked_new.remove(&(self.checkpoint + 1)) {
            self.checkpoint += 1;
        }
    }

    /// Folds one page of previously parked positions (ascending, all above the checkpoint the
    /// page was read at). Returns `true` when the next page may fold further (the whole page
    /// was contiguous with the checkpoint).
    pub fn fold_parked(&mut self, page: &[u64], page_size: usize) -> bool {
        self.fold_new();
        for &p in page {
            if p <= self.checkpoint {
                continue;
            }
            if p != self.checkpoint + 1 {
                return false;
            }
            self.checkpoint = p;
            self.dirty = true;
            self.fold_new();
        }
        page.len() == page_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: u128, sequence: u64) -> EventKey {
        EventKey {
            aggregate_type: "profile".into(),
            aggregate_id: Uuid::from_u128(a),
            sequence,
            position: sequence,
        }
    }

    #[test]
    fn guard_decisions_match_the_sqlite_adapter() {
        let mut stored = HashMap::new();
        let (out, changed) = plan_guards(&[key(1, 1)], &stored);
        assert_eq!(out, vec![ApplyOutcome::Applied]);
        stored.extend(changed);
        let (out, changed) = plan_guards(&[key(1, 1)], &stored);
        assert_eq!(out, vec![ApplyOutcome::Duplicate]);
        assert!(changed.is_empty());
        let (out, _) = plan_guards(&[key(1, 3)], &stored);
        assert_eq!(out, vec![ApplyOutcome::Gap { expected: 2 }]);
        let batch: Vec<EventKey> = [2, 2, 4, 3, 4, 1].iter().map(|&s| key(1, s)).collect();
        let (out, changed) = plan_guards(&batch, &stored);
        assert_eq!(
            out,
            vec![
                ApplyOutcome::Applied,
                ApplyOutcome::Duplicate,
                ApplyOutcome::Gap { expected: 3 },
                ApplyOutcome::Applied,
                ApplyOutcome::Applied,
                ApplyOutcome::Duplicate,
            ]
        );
        assert_eq!(changed[&("profile".to_string(), Uuid::from_u128(1))], 4);
        // Per aggregate type and id.
        let other = EventKey {
            aggregate_type: "user".into(),
            ..key(1, 1)
        };
        let (out, _) = plan_guards(&[other, key(2, 1)], &stored);
        assert_eq!(out, vec![ApplyOutcome::Applied; 2]);
    }

    /// Applies single positions in `order`, keeping parked positions in a stand-in for the
    /// `consumer_applied` collection, read in pages of 2.
    #[test]
    fn checkpoint_is_a_low_water_mark_under_out_of_order_application() {
        let order = [3u64, 1, 6, 2, 5, 4];
        let expected = [0u64, 1, 1, 3, 3, 6];
        let mut stored = (0u64, 0u64);
        let mut db: BTreeSet<u64> = BTreeSet::new();
        for (&p, &cp) in order.iter().zip(&expected) {
            let mut progress = Progress::new(stored.0, stored.1);
            progress.record(p);
            loop {
                let page: Vec<u64> = db
                    .range(progress.checkpoint + 1..)
                    .take(2)
                    .copied()
                    .collect();
                if !progress.fold_parked(&page, 2) {
                    break;
                }
            }
            db.retain(|&q| q > progress.checkpoint);
            db.extend(progress.parked_new.iter().copied());
            stored = (progress.checkpoint, progress.applied);
            assert_eq!(stored.0, cp, "after applying {p}");
        }
        assert!(db.is_empty());
        assert_eq!(stored, (6, 6));
        // A batch that closes its own gap out of order.
        let mut progress = Progress::new(6, 6);
        for p in [9, 7, 8] {
            progress.record(p);
        }
        assert_eq!((progress.checkpoint, progress.applied), (9, 9));
        assert!(progress.parked_new.is_empty());
    }

    #[test]
    fn folding_stops_at_a_gap_in_the_parked_positions() {
        let mut progress = Progress::new(3, 3);
        progress.record(4);
        assert!(progress.fold_parked(&[5, 6], 2), "whole page folded");
        assert!(!progress.fold_parked(&[8, 9], 2), "7 is missing");
        assert_eq!(progress.checkpoint, 6);
        assert!(!progress.fold_parked(&[7], 2), "short page: nothing more");
        assert_eq!(progress.checkpoint, 7);
        assert!(progress.dirty);
    }
}
