//! An in-memory cache of folded aggregate states (a snapshot kept in process memory).
//!
//! Events are immutable and sequences contiguous, so a state folded up to version `v` stays a
//! correct prefix forever: a cached entry is never invalid, only possibly behind. A load takes the
//! cached state and folds just the events after `v` ([`tektree_event_store::EventLog::load_after`]).
//! Without it, each command on an aggregate with `n` events decodes all `n`; the hottest
//! gamification profile of the bundled dump has 2,262 events, i.e. ~2.5 M decodes over its life.
//! On a miss (first load in this process, eviction, capacity 0) the handler starts from the
//! aggregate's persisted snapshot instead, when it has a usable one (see `handler`).

use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

struct Entry {
    state: Box<dyn Any + Send + Sync>,
    version: u64,
    touched: u64,
}

/// The map and a logical clock for recency.
type Entries = (HashMap<(&'static str, Uuid), Entry>, u64);

/// Bounded map `(aggregate type, id) → (state, version)`; evicts the least recently used quarter
/// when full.
pub(crate) struct StateCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

impl StateCache {
    pub(crate) fn new(capacity: usize) -> Self {
        StateCache {
            entries: Mutex::new((HashMap::new(), 0)),
            capacity,
        }
    }

    /// A clone of the cached state of `kind`/`id` and its version.
    pub(crate) fn get<A: Clone + 'static>(&self, kind: &'static str, id: Uuid) -> Option<(A, u64)> {
        if self.capacity == 0 {
            return None;
        }
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (map, clock) = &mut *guard;
        *clock += 1;
        let e = map.get_mut(&(kind, id))?;
        e.touched = *clock;
        let state = e.state.downcast_ref::<A>()?.clone();
        Some((state, e.version))
    }

    /// Stores `state` at `version` unless a newer version is cached.
    pub(crate) fn put<A: Clone + Send + Sync + 'static>(
        &self,
        kind: &'static str,
        id: Uuid,
        state: A,
        version: u64,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (map, clock) = &mut *guard;
        *clock += 1;
        if map.get(&(kind, id)).is_some_and(|e| e.version >= version) {
            return;
        }
        if map.len() >= self.capacity {
            let mut ages: Vec<u64> = map.values().map(|e| e.touched).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 4];
            map.retain(|_, e| e.touched > cutoff);
        }
        map.insert(
            (kind, id),
            Entry {
                state: Box::new(state),
                version,
                touched: *clock,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_version_and_evicts_when_full() {
        let c = StateCache::new(4);
        let a = Uuid::new_v4();
        c.put("t", a, 2u32, 2);
        c.put("t", a, 1u32, 1); // older: ignored
        assert_eq!(c.get::<u32>("t", a), Some((2, 2)));
        assert_eq!(c.get::<u64>("t", a), None, "wrong type is a miss");
        for _ in 0..10 {
            c.put("t", Uuid::new_v4(), 0u32, 1);
        }
        assert!(c.entries.lock().unwrap().0.len() <= 4);
        let off = StateCache::new(0);
        off.put("t", a, 1u32, 1);
        assert_eq!(off.get::<u32>("t", a), None);
    }
}
