//! Polar billing (issue #6): paid tiers bought through Polar checkouts, and Polar's webhooks
//! turned into commands on the `subscription` aggregate.
//!
//! | concept | module |
//! |---|---|
//! | configuration, `tektree serve` options | [`config`] ([`BillingConfig`], [`BillingArgs`]) |
//! | webhook signatures (Standard Webhooks) | [`webhook`] |
//! | webhook payloads → subscription actions | [`events`] |
//! | circuit breaker, retries, backoff, time limits, metrics | [`breaker`] |
//! | Polar API client (create checkout) | [`client`] |
//! | HTTP handlers | [`routes`]: `POST /v1/subscriptions/{user}/checkout`, `POST /v1/webhooks/polar` |
//!
//! The application holds a [`Billing`] (`App::billing`): disabled by default, when its handlers
//! answer 503 `billing_unconfigured`. Operator documentation: `docs/billing.md`.

#![deny(missing_docs)]

pub mod breaker;
pub mod client;
pub mod config;
pub mod events;
pub mod routes;
pub mod webhook;

use std::fmt;
use std::sync::Arc;

pub use config::{BillingArgs, BillingConfig, BillingConfigError, TierProducts};

use client::PolarClient;

/// An enabled billing: its configuration and the Polar client (with its breaker).
#[derive(Debug)]
pub struct BillingService {
    /// The configuration.
    pub config: BillingConfig,
    /// The Polar client; its breaker is shared by every request of the process.
    pub client: PolarClient,
}

/// Billing of one application: disabled, or a shared [`BillingService`]. Cheap to clone.
#[derive(Clone, Default)]
pub struct Billing {
    inner: Option<Arc<BillingService>>,
}

impl fmt::Debug for Billing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Billing(disabled)"),
            Some(s) => f.debug_tuple("Billing").field(&s.config).finish(),
        }
    }
}

impl Billing {
    /// Billing off: the endpoints answer 503 `billing_unconfigured`.
    pub fn disabled() -> Self {
        Billing { inner: None }
    }

    /// Billing with `config` (validated; the Polar client and its breaker are created here).
    ///
    /// # Errors
    /// [`BillingConfigError`] for an invalid configuration or when the HTTP client cannot be
    /// built.
    pub fn new(config: BillingConfig) -> Result<Self, BillingConfigError> {
        config.validate()?;
        if let Some(short) = config.webhook_secrets.iter().find(|s| s.len() < 24) {
            tracing::warn!(
                bytes = short.len(),
                "a Polar webhook secret is shorter than the 24 bytes the Standard Webhooks specification asks for"
            );
        }
        let client = PolarClient::new(
            &config.api_base,
            &config.access_token,
            config.breaker.clone(),
        )
        .map_err(BillingConfigError::Client)?;
        Ok(Billing {
            inner: Some(Arc::new(BillingService { config, client })),
        })
    }

    /// Billing from command-line options: disabled without an access token.
    ///
    /// # Errors
    /// As [`BillingArgs::config`] and [`Billing::new`].
    pub fn from_args(args: &BillingArgs) -> Result<Self, BillingConfigError> {
        match args.config()? {
            None => Ok(Billing::disabled()),
            Some(c) => Billing::new(c),
        }
    }

    /// The service, when enabled.
    pub fn service(&self) -> Option<&BillingService> {
        self.inner.as_deref()
    }

    /// Whether billing is configured.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }
}
