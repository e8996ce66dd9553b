//! A test double of a [`Bus`]: a real bus with one behaviour changed ([`FaultyBus`]), so that
//! a test names only what it breaks and every other call reaches the real bus.

use std::sync::Arc;

use async_trait::async_trait;
use tektree_domain::EventEnvelope;
use tektree_event_store::StoreIdentity;

use crate::bus::{Bus, BusError, DeadLetter, Delivery, Subscription, SubscriptionOptions};

/// The calls a [`FaultyBus`] lets a test change; each defaults to the inner bus's.
#[async_trait]
pub trait BusFault: Send + Sync + 'static {
    /// [`Bus::publish_after`] on `inner`.
    ///
    /// # Errors
    /// The inner bus's, or the fault's.
    async fn publish_after(
        &self,
        inner: &dyn Bus,
        floor: u64,
        events: &[EventEnvelope],
    ) -> Result<(), BusError> {
        inner.publish_after(floor, events).await
    }

    /// [`Bus::subscribe`] on `inner`.
    ///
    /// # Errors
    /// The inner bus's, or the fault's.
    async fn subscribe(
        &self,
        inner: &dyn Bus,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        inner.subscribe(options).await
    }

    /// [`Bus::last_published`] on `inner`.
    ///
    /// # Errors
    /// The inner bus's, or the fault's.
    async fn last_published(&self, inner: &dyn Bus) -> Result<u64, BusError> {
        inner.last_published().await
    }
}

/// `inner` with `fault` applied to the calls [`BusFault`] covers; every other call is the
/// inner bus's own.
pub struct FaultyBus<F> {
    /// The real bus.
    pub inner: Arc<dyn Bus>,
    /// What is changed.
    pub fault: F,
}

impl<F: BusFault> FaultyBus<F> {
    /// `inner` with `fault`.
    pub fn new(inner: Arc<dyn Bus>, fault: F) -> Self {
        FaultyBus { inner, fault }
    }
}

#[async_trait]
impl<F: BusFault> Bus for FaultyBus<F> {
    async fn publish_after(&self, floor: u64, events: &[EventEnvelope]) -> Result<(), BusError> {
        self.fault
            .publish_after(self.inner.as_ref(), floor, events)
            .await
    }

    async fn subscribe(
        &self,
        options: SubscriptionOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.fault.subscribe(self.inner.as_ref(), options).await
    }

    async fn last_published(&self) -> Result<u64, BusError> {
        self.fault.last_published(self.inner.as_ref()).await
    }

    async fn bound_store(&self) -> Result<Option<StoreIdentity>, BusError> {
        self.inner.bound_store().await
    }

    async fn bind_store(&self, identity: &StoreIdentity) -> Result<StoreIdentity, BusError> {
        self.inner.bind_store(identity).await
    }

    async fn empty_and_rebind(
        &self,
        from: &StoreIdentity,
        to: &StoreIdentity,
    ) -> Result<bool, BusError> {
        self.inner.empty_and_rebind(from, to).await
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
