//! The bus conformance checks fail for the reason in their names: each runs here against an
//! in-process bus broken in exactly that way and must panic with its own message (issue #13 §5).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tektree_domain::EventEnvelope;
use tektree_event_store::StoreIdentity;
use tektree_outbox::{
    conformance, Bus, BusError, DeadLetter, Delivery, MemoryBus, Subscription, SubscriptionOptions,
};

/// How a [`Broken`] bus misbehaves.
#[derive(Clone, Copy)]
enum Fault {
    /// `next_batch` sleeps its whole `block`, then looks without waiting: it never wakes on a
    /// publish.
    Sleeps,
    /// Acknowledged deliveries come back once, [`RETURN_AFTER`] after their acknowledgement.
    ForgetsAcks,
}

/// Longer than the 800 ms the acknowledged-deliveries check used to watch.
const RETURN_AFTER: Duration = Duration::from_millis(1500);

/// Acknowledged deliveries shared by every subscription of one [`Broken`] bus: (when, what,
/// handed out again).
type Acked = Arc<Mutex<Vec<(Instant, Delivery, bool)>>>;

/// An in-process bus whose subscriptions have `fault`; everything else is the real bus.
struct Broken {
    inner: MemoryBus,
    fault: Fault,
    acked: Acked,
}

struct BrokenSubscription {
    inner: Box<dyn Subscription>,
    fault: Fault,
    acked: Acked,
    handed_out: HashMap<String, Delivery>,
}

#[async_trait]
impl Subscription for BrokenSubscription {
    async fn next_batch(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>, BusError> {
        let got = match self.fault {
            Fault::Sleeps => {
                tokio::time::sleep(block).await;
                self.inner.next_batch(max, Duration::ZERO).await?
            }
            Fault::ForgetsAcks => {
                let back: Vec<Delivery> = self
                    .acked
                    .lock()
                    .unwrap()
                    .iter_mut()
                    .filter(|(at, _, again)| !*again && at.elapsed() >= RETURN_AFTER)
                    .map(|(_, d, again)| {
                        *again = true;
                        d.clone()
                    })
                    .collect();
                if !back.is_empty() {
                    return Ok(back);
                }
                self.inner.next_batch(max, block).await?
            }
        };
        for d in &got {
            self.handed_out.insert(d.id.clone(), d.clone());
        }
        Ok(got)
    }

    async fn ack(&mut self, ids: &[String]) -> Result<(), BusError> {
        {
            let now = Instant::now();
            let mut acked = self.acked.lock().unwrap();
            for id in ids {
                if let Some(d) = self.handed_out.get(id) {
                    if !acked.iter().any(|(_, a, _)| a.id == *id) {
                        acked.push((now, d.clone(), false));
                    }
                }
            }
        }
        self.inner.ack(ids).await
    }
}

#[async_trait]
impl Bus for Broken {
    async fn publish_after(&self, floor: u64, events: &[EventEnvelope]) -> Result<(), BusError> {
        self.inner.publish_after(floor, events).await
    }

    async fn subscribe(
        &self,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(BrokenSubscription {
            inner: self.inner.subscribe(options).await?,
            fault: self.fault,
            acked: self.acked.clone(),
            handed_out: HashMap::new(),
        }))
    }

    async fn last_published(&self) -> Result<u64, BusError> {
        self.inner.last_published().await
    }

    async fn bound_store(&self) -> Result<Option<StoreIdentity>, BusError> {
        self.inner.bound_store().await
    }

    async fn bind_store(&self, identity: &StoreIdentity) -> Result<StoreIdentity, BusError> {
        self.inner.bind_store(identity).await
    }

    async fn last_event(&self) -> Result<Option<EventEnvelope>, BusError> {
        self.inner.last_event().await
    }

    async fn dead_letter(
        &self,
        group: &str,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError> {
        self.inner.dead_letter(group, delivery, reason).await
    }

    async fn dead_letters(
        &self,
        group: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        self.inner.dead_letters(group, limit).await
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BusError> {
        self.inner.remove_dead_letter(id).await
    }
}

fn broken(fault: Fault) -> Arc<dyn Bus> {
    Arc::new(Broken {
        inner: MemoryBus::new(),
        fault,
        acked: Arc::default(),
    })
}

#[tokio::test]
#[should_panic(expected = "a blocked consumer must wake within")]
async fn a_bus_that_never_wakes_a_blocked_consumer_fails() {
    conformance::publish_wakes_a_blocked_consumer(broken(Fault::Sleeps)).await;
}

#[tokio::test]
#[should_panic(expected = "only the unacknowledged event may return")]
async fn a_bus_that_hands_acknowledged_deliveries_back_later_fails() {
    conformance::acked_deliveries_never_return(broken(Fault::ForgetsAcks)).await;
}

/// The doubles above change nothing else: the same checks pass on the bus they wrap when it
/// is not broken in their way.
#[tokio::test]
async fn the_checks_pass_on_the_unbroken_bus() {
    conformance::publish_wakes_a_blocked_consumer(Arc::new(MemoryBus::new())).await;
    conformance::acked_deliveries_never_return(Arc::new(MemoryBus::new())).await;
}
