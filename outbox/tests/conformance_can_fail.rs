//! The bus conformance checks fail for the reason in their names: each runs here against an
//! in-process bus broken in exactly that way and must panic with its own message (issue #13 §5).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tektree_outbox::faulty::{BusFault, FaultyBus};
use tektree_outbox::{
    conformance, Bus, BusError, Delivery, MemoryBus, Subscription, SubscriptionOptions,
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

/// Subscriptions with `fault`; everything else is the real in-process bus.
struct Broken {
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
impl BusFault for Broken {
    async fn subscribe(
        &self,
        inner: &dyn Bus,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(BrokenSubscription {
            inner: inner.subscribe(options).await?,
            fault: self.fault,
            acked: self.acked.clone(),
            handed_out: HashMap::new(),
        }))
    }
}

fn broken(fault: Fault) -> Arc<dyn Bus> {
    Arc::new(FaultyBus::new(
        Arc::new(MemoryBus::new()),
        Broken {
            fault,
            acked: Arc::default(),
        },
    ))
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
