//! Billing configuration ([`BillingConfig`]) and its command-line / environment options
//! ([`BillingArgs`], for `#[command(flatten)]` into `tektree serve` and `tektree api`).
//!
//! Billing is **off** unless `--polar-access-token` (`TEKTREE_POLAR_ACCESS_TOKEN`) is set; its
//! endpoints then answer 503 `billing_unconfigured`. With a token, at least one webhook secret
//! and at least one tier product are required (a half-configured billing is a start-up error,
//! not a silent hole). See `docs/billing.md`.

use std::fmt;
use std::time::Duration;

use tektree_domain::Tier;

use super::breaker::BreakerConfig;
use super::client::PRODUCTION_API;
use super::webhook::{SecretError, WebhookSecret, DEFAULT_TOLERANCE};

/// Errors in the billing options (messages never contain the token or a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingConfigError {
    /// A required option is missing while billing is enabled.
    #[error("billing is enabled (--polar-access-token) but {0} is missing")]
    Missing(&'static str),
    /// A webhook secret is unusable.
    #[error("webhook secret #{index}: {source}")]
    Secret {
        /// 1-based position in the list.
        index: usize,
        /// Why.
        source: SecretError,
    },
    /// An option has an unusable value.
    #[error("invalid {option}: {reason}")]
    Invalid {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("Polar HTTP client: {0}")]
    Client(String),
}

/// The Polar product sold for each paid tier. A tier without a product cannot be bought
/// (checkout answers 422 `billing.tier_not_for_sale`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierProducts {
    /// Product id of `pro`.
    pub pro: Option<String>,
    /// Product id of `team`.
    pub team: Option<String>,
    /// Product id of `enterprise`.
    pub enterprise: Option<String>,
}

impl TierProducts {
    fn all(&self) -> [(Tier, Option<&str>); 3] {
        [
            (Tier::Pro, self.pro.as_deref()),
            (Tier::Team, self.team.as_deref()),
            (Tier::Enterprise, self.enterprise.as_deref()),
        ]
    }

    /// The product of `tier` (`None` for `free` and unconfigured tiers).
    pub fn product_for(&self, tier: Tier) -> Option<&str> {
        self.all()
            .into_iter()
            .find(|(t, _)| *t == tier)
            .and_then(|(_, p)| p)
    }

    /// The tier sold as `product_id`, if any.
    pub fn tier_for(&self, product_id: &str) -> Option<Tier> {
        self.all()
            .into_iter()
            .find(|(_, p)| *p == Some(product_id))
            .map(|(t, _)| t)
    }

    /// Whether no tier has a product.
    pub fn is_empty(&self) -> bool {
        self.all().iter().all(|(_, p)| p.is_none())
    }
}

/// Everything billing needs. `Debug` never shows the token or the secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct BillingConfig {
    /// Polar API base URL: [`PRODUCTION_API`] or [`SANDBOX_API`](super::client::SANDBOX_API)
    /// (tests: a local fake).
    pub api_base: String,
    /// Organization access token (scope `checkouts:write`), sent as a bearer token.
    pub access_token: String,
    /// Webhook secrets; any of them verifies a delivery (rotation: list the new one, keep the
    /// old one until Polar no longer signs with it).
    pub webhook_secrets: Vec<WebhookSecret>,
    /// Allowed distance between `webhook-timestamp` and our clock, either way. Default 5 min.
    pub webhook_tolerance: Duration,
    /// Product per paid tier.
    pub products: TierProducts,
    /// Where Polar sends a customer after payment (`{CHECKOUT_ID}` is replaced by Polar);
    /// `None`: Polar's default page.
    pub success_url: Option<String>,
    /// Breaker, retries and time limits of calls to Polar.
    pub breaker: BreakerConfig,
}

impl fmt::Debug for BillingConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BillingConfig")
            .field("api_base", &self.api_base)
            .field("access_token", &"***")
            .field("webhook_secrets", &self.webhook_secrets.len())
            .field("webhook_tolerance", &self.webhook_tolerance)
            .field("products", &self.products)
            .field("success_url", &self.success_url)
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl BillingConfig {
    /// A configuration with the defaults ([`PRODUCTION_API`], 5 min tolerance, default
    /// breaker) for `access_token`, `webhook_secrets` and `products`.
    pub fn new(
        access_token: impl Into<String>,
        webhook_secrets: Vec<WebhookSecret>,
        products: TierProducts,
    ) -> Self {
        BillingConfig {
            api_base: PRODUCTION_API.into(),
            access_token: access_token.into(),
            webhook_secrets,
            webhook_tolerance: DEFAULT_TOLERANCE,
            products,
            success_url: None,
            breaker: BreakerConfig::default(),
        }
    }

    /// Checks the rules of the module docs.
    ///
    /// # Errors
    /// [`BillingConfigError`] naming the first problem.
    pub fn validate(&self) -> Result<(), BillingConfigError> {
        if self.access_token.trim().is_empty() {
            return Err(BillingConfigError::Missing("--polar-access-token"));
        }
        if self.webhook_secrets.is_empty() {
            return Err(BillingConfigError::Missing("--polar-webhook-secret"));
        }
        if self.products.is_empty() {
            return Err(BillingConfigError::Missing(
                "a tier product (--polar-product-pro, --polar-product-team or --polar-product-enterprise)",
            ));
        }
        let ids: Vec<&str> = self.products.all().iter().filter_map(|(_, p)| *p).collect();
        for (i, id) in ids.iter().enumerate() {
            if id.trim().is_empty() || ids[..i].contains(id) {
                return Err(BillingConfigError::Invalid {
                    option: "--polar-product-*",
                    reason: "product ids must be non-empty and differ between tiers".into(),
                });
            }
        }
        let base = &self.api_base;
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(BillingConfigError::Invalid {
                option: "--polar-api-url",
                reason: format!("{base:?} is not an http(s) URL"),
            });
        }
        if self.breaker.call_timeout.is_zero() {
            return Err(BillingConfigError::Invalid {
                option: "--polar-timeout-ms",
                reason: "must be positive".into(),
            });
        }
        Ok(())
    }
}

/// Billing options of `tektree serve` / `tektree api` (issue #6). Flatten with
/// `#[command(flatten)] billing: BillingArgs` and call [`BillingArgs::config`].
#[derive(clap::Args, Clone)]
pub struct BillingArgs {
    /// Polar API base URL (`https://api.polar.sh`; sandbox `https://sandbox-api.polar.sh`).
    #[arg(long = "polar-api-url", env = "TEKTREE_POLAR_API_URL", default_value = PRODUCTION_API)]
    pub polar_api_url: String,
    /// Polar organization access token (scope `checkouts:write`). Enables billing; without it
    /// the billing endpoints answer 503 `billing_unconfigured`.
    #[arg(
        long = "polar-access-token",
        env = "TEKTREE_POLAR_ACCESS_TOKEN",
        hide_env_values = true
    )]
    pub polar_access_token: Option<String>,
    /// Webhook secret: Polar's raw secret, or `whsec_<base64>`. Repeat (or comma-separate in
    /// the environment) to accept several during a rotation.
    #[arg(
        long = "polar-webhook-secret",
        env = "TEKTREE_POLAR_WEBHOOK_SECRETS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub polar_webhook_secrets: Vec<String>,
    /// Allowed clock distance of `webhook-timestamp`, either way, in seconds.
    #[arg(long = "polar-webhook-tolerance-secs", env = "TEKTREE_POLAR_WEBHOOK_TOLERANCE_SECS",
          default_value_t = DEFAULT_TOLERANCE.as_secs())]
    pub polar_webhook_tolerance_secs: u64,
    /// Polar product id of the `pro` tier.
    #[arg(long = "polar-product-pro", env = "TEKTREE_POLAR_PRODUCT_PRO")]
    pub polar_product_pro: Option<String>,
    /// Polar product id of the `team` tier.
    #[arg(long = "polar-product-team", env = "TEKTREE_POLAR_PRODUCT_TEAM")]
    pub polar_product_team: Option<String>,
    /// Polar product id of the `enterprise` tier.
    #[arg(
        long = "polar-product-enterprise",
        env = "TEKTREE_POLAR_PRODUCT_ENTERPRISE"
    )]
    pub polar_product_enterprise: Option<String>,
    /// URL Polar sends the customer to after payment (may contain `{CHECKOUT_ID}`).
    #[arg(long = "polar-success-url", env = "TEKTREE_POLAR_SUCCESS_URL")]
    pub polar_success_url: Option<String>,
    /// Time limit of one call to Polar, in milliseconds.
    #[arg(
        long = "polar-timeout-ms",
        env = "TEKTREE_POLAR_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub polar_timeout_ms: u64,
    /// Attempts per call to Polar, the first included.
    #[arg(long = "polar-max-attempts", env = "TEKTREE_POLAR_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub polar_max_attempts: u32,
    /// Backoff before the first retry, in milliseconds (doubles per retry, jittered).
    #[arg(
        long = "polar-backoff-ms",
        env = "TEKTREE_POLAR_BACKOFF_MS",
        default_value_t = 200
    )]
    pub polar_backoff_ms: u64,
    /// Cap of the retry backoff, in milliseconds.
    #[arg(
        long = "polar-backoff-max-ms",
        env = "TEKTREE_POLAR_BACKOFF_MAX_MS",
        default_value_t = 2_000
    )]
    pub polar_backoff_max_ms: u64,
    /// Consecutive failed calls to Polar that open the circuit breaker.
    #[arg(long = "polar-breaker-failures", env = "TEKTREE_POLAR_BREAKER_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub polar_breaker_failures: u32,
    /// Seconds the open breaker waits before letting one probe call through.
    #[arg(
        long = "polar-breaker-cooldown-secs",
        env = "TEKTREE_POLAR_BREAKER_COOLDOWN_SECS",
        default_value_t = 30
    )]
    pub polar_breaker_cooldown_secs: u64,
}

impl fmt::Debug for BillingArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BillingArgs")
            .field("polar_api_url", &self.polar_api_url)
            .field(
                "polar_access_token",
                &self.polar_access_token.as_ref().map(|_| "***"),
            )
            .field("polar_webhook_secrets", &self.polar_webhook_secrets.len())
            .field("polar_product_pro", &self.polar_product_pro)
            .field("polar_product_team", &self.polar_product_team)
            .field("polar_product_enterprise", &self.polar_product_enterprise)
            .finish_non_exhaustive()
    }
}

impl BillingArgs {
    /// The configuration, or `None` when billing is off (no access token).
    ///
    /// # Errors
    /// [`BillingConfigError`] for a half or invalid configuration.
    pub fn config(&self) -> Result<Option<BillingConfig>, BillingConfigError> {
        let Some(token) = self
            .polar_access_token
            .as_deref()
            .filter(|t| !t.trim().is_empty())
        else {
            return Ok(None);
        };
        let secrets = self
            .polar_webhook_secrets
            .iter()
            .filter(|s| !s.trim().is_empty())
            .enumerate()
            .map(|(i, s)| {
                WebhookSecret::parse(s).map_err(|source| BillingConfigError::Secret {
                    index: i + 1,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let some = |s: &Option<String>| s.clone().filter(|v| !v.trim().is_empty());
        let config = BillingConfig {
            api_base: self.polar_api_url.clone(),
            access_token: token.trim().to_string(),
            webhook_secrets: secrets,
            webhook_tolerance: Duration::from_secs(self.polar_webhook_tolerance_secs),
            products: TierProducts {
                pro: some(&self.polar_product_pro),
                team: some(&self.polar_product_team),
                enterprise: some(&self.polar_product_enterprise),
            },
            success_url: some(&self.polar_success_url),
            breaker: BreakerConfig {
                failure_threshold: self.polar_breaker_failures,
                cool_down: Duration::from_secs(self.polar_breaker_cooldown_secs),
                max_attempts: self.polar_max_attempts,
                base_backoff: Duration::from_millis(self.polar_backoff_ms),
                max_backoff: Duration::from_millis(self.polar_backoff_max_ms),
                call_timeout: Duration::from_millis(self.polar_timeout_ms),
            },
        };
        config.validate()?;
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        billing: BillingArgs,
    }

    fn parse(args: &[&str]) -> Result<Option<BillingConfig>, BillingConfigError> {
        let mut v = vec!["tektree"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().billing.config()
    }

    #[test]
    fn billing_is_off_without_a_token() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["--polar-webhook-secret", "x"]), Ok(None));
    }

    #[test]
    fn a_full_configuration_parses_with_defaults() {
        let c = parse(&[
            "--polar-access-token",
            "polar_oat_x",
            "--polar-webhook-secret",
            "polar_whs_new",
            "--polar-webhook-secret",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "--polar-product-pro",
            "prod_pro",
            "--polar-product-team",
            "prod_team",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.api_base, PRODUCTION_API);
        assert_eq!(c.webhook_secrets.len(), 2);
        assert_eq!(c.webhook_tolerance, Duration::from_secs(300));
        assert_eq!(c.products.product_for(Tier::Pro), Some("prod_pro"));
        assert_eq!(c.products.product_for(Tier::Enterprise), None);
        assert_eq!(c.products.product_for(Tier::Free), None);
        assert_eq!(c.products.tier_for("prod_team"), Some(Tier::Team));
        assert_eq!(c.products.tier_for("prod_other"), None);
        assert_eq!(c.breaker, BreakerConfig::default());
        let shown = format!("{c:?}");
        assert!(!shown.contains("polar_oat_x") && !shown.contains("polar_whs_new"));
    }

    #[test]
    fn half_configurations_are_errors() {
        assert_eq!(
            parse(&["--polar-access-token", "t", "--polar-product-pro", "p"]),
            Err(BillingConfigError::Missing("--polar-webhook-secret"))
        );
        assert!(matches!(
            parse(&["--polar-access-token", "t", "--polar-webhook-secret", "s"]),
            Err(BillingConfigError::Missing(_))
        ));
        assert!(matches!(
            parse(&[
                "--polar-access-token",
                "t",
                "--polar-webhook-secret",
                "whsec_!!",
                "--polar-product-pro",
                "p"
            ]),
            Err(BillingConfigError::Secret { index: 1, .. })
        ));
        assert!(matches!(
            parse(&[
                "--polar-access-token",
                "t",
                "--polar-webhook-secret",
                "s",
                "--polar-product-pro",
                "p",
                "--polar-product-team",
                "p"
            ]),
            Err(BillingConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse(&[
                "--polar-access-token",
                "t",
                "--polar-webhook-secret",
                "s",
                "--polar-product-pro",
                "p",
                "--polar-api-url",
                "api.polar.sh"
            ]),
            Err(BillingConfigError::Invalid { .. })
        ));
    }
}
