//! The in-process bus of the embedded single-process mode.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tektree_domain::EventEnvelope;
use tektree_event_store::StoreIdentity;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::bus::{Bus, BusError, Delivery, Subscription, SubscriptionOptions};

/// An in-memory [`Bus`] with Redis Streams consumer-group semantics, for the embedded
/// single-process mode and for tests.
///
/// - The log is append-only and lives as long as the bus (every clone shares it); nothing is
///   persisted, so a restarted process starts with an empty bus and its relay republishes the
///   outbox records that were not yet marked published.
/// - Message ids ([`Delivery::id`]) are the event's position in decimal, e.g. `"42"`.
/// - Each consumer group has a cursor (the next log entry it has not handed out) and a pending
///   entries list (message id → consumer, last delivery instant, delivery count), like a Redis
///   Streams group: [`Subscription::next_batch`] first reclaims pending entries idle for at
///   least `min_idle` (from any consumer of the group, `XAUTOCLAIM`), then hands out new
///   entries (`XREADGROUP … >`); [`Subscription::ack`] removes entries from the pending list
///   (`XACK`, regardless of which consumer holds them).
/// - A consumer blocked in `next_batch` wakes on publish, and also when one of its group's
///   pending entries becomes reclaimable.
/// - The store binding ([`Bus::bind_store`]) lives with the bus, like the log.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Woken (all waiters) on every publish that appended something.
    published: Notify,
}

#[derive(Default)]
struct State {
    /// Published envelopes, strictly ascending by position.
    log: Vec<EventEnvelope>,
    /// Consumer groups by name.
    groups: HashMap<String, Group>,
    /// Dead letters, oldest first, and the next dead-letter id.
    dead: Vec<crate::DeadLetter>,
    next_dead: u64,
    /// The store this bus is bound to.
    store: Option<StoreIdentity>,
}

#[derive(Default)]
struct Group {
    /// Index into `State::log` of the next entry never handed out to this group.
    next_index: usize,
    /// Handed out but not acknowledged, by position.
    pending: BTreeMap<u64, Pending>,
}

struct Pending {
    consumer: String,
    delivered_at: Instant,
    count: u64,
}

impl State {
    fn last_position(&self) -> u64 {
        self.log.last().map_or(0, |e| e.position)
    }
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        MemoryBus::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // breaks the invariants more than the panic itself, so poisoning is ignored.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryBus")
            .field("events", &state.log.len())
            .field("last_position", &state.last_position())
            .field("groups", &state.groups.len())
            .finish()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish_after(&self, floor: u64, events: &[EventEnvelope]) -> Result<(), BusError> {
        let appended = {
            let mut state = self.lock();
            let mut last = state.last_position();
            if last < floor {
                return Err(BusError::Behind { last, floor });
            }
            let before = state.log.len();
            for event in events {
                if event.position > last {
                    last = event.position;
                    state.log.push(event.clone());
                }
            }
            state.log.len() > before
        };
        if appended {
            self.inner.published.notify_waiters();
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.lock().groups.entry(options.group.clone()).or_default();
        Ok(Box::new(MemorySubscription {
            bus: self.clone(),
            options,
        }))
    }

    async fn last_published(&self) -> Result<u64, BusError> {
        Ok(self.lock().last_position())
    }

    async fn bound_store(&self) -> Result<Option<StoreIdentity>, BusError> {
        Ok(self.lock().store)
    }

    async fn bind_store(&self, identity: &StoreIdentity) -> Result<StoreIdentity, BusError> {
        Ok(*self.lock().store.get_or_insert(*identity))
    }

    async fn last_event(&self) -> Result<Option<EventEnvelope>, BusError> {
        Ok(self.lock().log.last().cloned())
    }

    async fn empty_and_rebind(
        &self,
        from: &StoreIdentity,
        to: &StoreIdentity,
    ) -> Result<bool, BusError> {
        let mut state = self.lock();
        if state.store != Some(*from) {
            return Ok(false);
        }
        state.log.clear();
        state.dead.clear();
        for group in state.groups.values_mut() {
            *group = Group::default();
        }
        state.store = Some(*to);
        Ok(true)
    }

    async fn dead_letter(
        &self,
        group: &str,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError> {
        let mut state = self.lock();
        state.next_dead += 1;
        let id = state.next_dead.to_string();
        state.dead.push(crate::DeadLetter {
            id,
            group: group.into(),
            reason: reason.into(),
            delivery_count: delivery.delivery_count,
            envelope: delivery.envelope.clone(),
        });
        Ok(())
    }

    async fn dead_letters(
        &self,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::DeadLetter>, BusError> {
        Ok(self
            .lock()
            .dead
            .iter()
            .filter(|d| group.is_none_or(|g| d.group == g))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError> {
        let mut state = self.lock();
        let before = state.dead.len();
        state.dead.retain(|d| d.id != id);
        Ok(state.dead.len() < before)
    }
}

/// One consumer of a [`MemoryBus`] group.
struct MemorySubscription {
    bus: MemoryBus,
    options: SubscriptionOptions,
}

/// What one look at the group found.
enum Take {
    Some(Vec<Delivery>),
    /// Nothing now; the earliest instant a pending entry becomes reclaimable, if any.
    Nothing(Option<Instant>),
}

impl MemorySubscription {
    fn take(&self, max: usize) -> Take {
        let now = Instant::now();
        let min_idle = self.options.min_idle;
        let mut guard = self.bus.lock();
        let state = &mut *guard;
        let group = state.groups.entry(self.options.group.clone()).or_default();
        let mut out = Vec::new();
        let mut next_reclaim: Option<Instant> = None;

        // 1. Reclaim pending entries idle for at least `min_idle`, in id order (XAUTOCLAIM).
        for (&position, pending) in group.pending.iter_mut() {
            if out.len() >= max {
                break;
            }
            let due = pending.delivered_at + min_idle;
            if due > now {
                next_reclaim = Some(next_reclaim.map_or(due, |t| t.min(due)));
                continue;
            }
            let Ok(index) = state.log.binary_search_by_key(&position, |e| e.position) else {
                continue;
            };
            pending.consumer.clone_from(&self.options.consumer);
            pending.delivered_at = now;
            pending.count += 1;
            out.push(Delivery {
                id: position.to_string(),
                envelope: state.log[index].clone(),
                delivery_count: pending.count,
            });
        }

        // 2. New entries in position order (XREADGROUP >).
        while out.len() < max && group.next_index < state.log.len() {
            let envelope = &state.log[group.next_index];
            group.next_index += 1;
            group.pending.insert(
                envelope.position,
                Pending {
                    consumer: self.options.consumer.clone(),
                    delivered_at: now,
                    count: 1,
                },
            );
            out.push(Delivery {
                id: envelope.position.to_string(),
                envelope: envelope.clone(),
                delivery_count: 1,
            });
        }

        if out.is_empty() {
            Take::Nothing(next_reclaim)
        } else {
            Take::Some(out)
        }
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next_batch(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + block;
        loop {
            // Register for the wake-up before looking, so a publish between the look and the
            // wait is not missed.
            let notified = self.bus.inner.published.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = match self.take(max) {
                Take::Some(deliveries) => return Ok(deliveries),
                Take::Nothing(next_reclaim) => next_reclaim.map_or(deadline, |t| t.min(deadline)),
            };
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn ack(&mut self, ids: &[String]) -> Result<(), BusError> {
        let mut state = self.bus.lock();
        let Some(group) = state.groups.get_mut(&self.options.group) else {
            return Ok(());
        };
        for id in ids {
            // Like XACK, unknown or malformed ids are ignored.
            if let Ok(position) = id.parse::<u64>() {
                group.pending.remove(&position);
            }
        }
        Ok(())
    }
}
