//! Per-user rate limits by tier (issue #4, "Security").
//!
//! Issue #4 sets Free 100/min, Pro 1,000/min, Team 5,000/min, Enterprise unlimited, "burst 2×
//! for 10 s". Each limited user has a token bucket, kept as a GCRA (generic cell rate
//! algorithm) state of one number, the *theoretical arrival time* `tat`:
//!
//! - refill rate `r = limit / 60` requests per second, i.e. one request every
//!   `T = 60 s / limit` ([`Rule::interval_us`]; 600 ms for Free, 60 ms for Pro, 12 ms for Team);
//! - capacity `b = 10 s × r` requests ([`Rule::window_us`] = 10 s of refill; 16.7 for Free),
//!   so that a client sending at `2r` from a full bucket drains it at the net rate `2r − r = r`
//!   and is refused after `b / r` = exactly 10 s — the issue's "burst 2× for 10 s";
//! - a request at `now` is allowed iff `max(tat, now) − now + T ≤ 10 s` (the bucket holds at
//!   least one token); it then sets `tat = max(tat, now) + T`;
//! - a refused request changes nothing and must wait `max(tat, now) − now + T − 10 s`; the 429
//!   answer's `Retry-After` is that in whole seconds, rounded up.
//!
//! In steady state exactly `limit` requests per minute pass; from a full bucket, at most
//! `⌊b⌋` at once (16 for Free). When `T > 10 s` (limits under 6/min) the window is `T`, so the
//! capacity is one request.
//!
//! The rules ([`decide`]) are a pure function of the state and a clock reading; the backends
//! keep the state per user: [`MemoryBackend`] (one process) or [`RedisBackend`] (shared by
//! every API instance; one atomic Lua script per request, keys with a TTL). Time comes from a
//! [`Clock`] so that tests move it by hand.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::http::StatusCode;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use tektree_commands::CommandHandler;
use tektree_domain::Tier;
use uuid::Uuid;

use crate::problem::Problem;

/// Microseconds per minute.
const MINUTE_US: u64 = 60_000_000;
/// The burst window of issue #4: 10 s, in microseconds.
pub const BURST_WINDOW_US: u64 = 10_000_000;
/// Key prefix of the Redis buckets: `tektree:ratelimit:<user uuid>`.
pub const REDIS_KEY_PREFIX: &str = "tektree:ratelimit:";
/// Time allowed to connect to Redis and for one script call.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// The in-memory backend drops buckets that are full again once it holds this many users.
pub const MEMORY_PRUNE_AT: usize = 100_000;

/// Requests per minute per tier; `None` = unlimited. [`Default`] is issue #4's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Free tier (default 100/min).
    pub free: Option<u32>,
    /// Pro tier (default 1,000/min).
    pub pro: Option<u32>,
    /// Team tier (default 5,000/min).
    pub team: Option<u32>,
    /// Enterprise tier (default unlimited).
    pub enterprise: Option<u32>,
}

impl Default for RateLimits {
    /// Issue #4: Free 100/min, Pro 1,000/min, Team 5,000/min, Enterprise unlimited.
    fn default() -> Self {
        RateLimits {
            free: Some(100),
            pro: Some(1000),
            team: Some(5000),
            enterprise: None,
        }
    }
}

impl RateLimits {
    /// No limit for any tier.
    pub fn unlimited() -> Self {
        RateLimits {
            free: None,
            pro: None,
            team: None,
            enterprise: None,
        }
    }

    /// The limit of `tier`, requests per minute.
    pub fn per_minute(&self, tier: Tier) -> Option<u32> {
        match tier {
            Tier::Free => self.free,
            Tier::Pro => self.pro,
            Tier::Team => self.team,
            Tier::Enterprise => self.enterprise,
        }
    }

    /// The bucket rule of `tier`; `None` when unlimited (or a limit of 0, read as unlimited).
    pub fn rule(&self, tier: Tier) -> Option<Rule> {
        self.per_minute(tier).and_then(Rule::per_minute)
    }
}

/// One tier's bucket, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// `T = 60 s / limit`, rounded up: the refill time of one request.
    pub interval_us: u64,
    /// The capacity as time: `max(10 s, T)`.
    pub window_us: u64,
}

impl Rule {
    /// The rule for `limit` requests per minute; `None` for 0.
    pub fn per_minute(limit: u32) -> Option<Rule> {
        if limit == 0 {
            return None;
        }
        let interval_us = MINUTE_US.div_ceil(u64::from(limit));
        Some(Rule {
            interval_us,
            window_us: BURST_WINDOW_US.max(interval_us),
        })
    }

    /// The capacity `b` in whole requests (`⌊window / T⌋`).
    pub fn burst(&self) -> u64 {
        self.window_us / self.interval_us
    }
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `remaining` more requests would be allowed at the same instant.
    Allowed {
        /// Whole requests left in the bucket.
        remaining: u64,
    },
    /// Refused; allowed again after `retry_after_us` microseconds.
    Limited {
        /// Wait in microseconds (> 0).
        retry_after_us: u64,
    },
}

impl Decision {
    /// `Retry-After` for a refusal: the wait in whole seconds, rounded up (≥ 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Decision::Allowed { .. } => None,
            Decision::Limited { retry_after_us } => Some(retry_after_us.div_ceil(1_000_000).max(1)),
        }
    }
}

/// The GCRA rule (see the module docs): for a bucket whose theoretical arrival time is `tat`
/// (0 = never used) and a request at `now` (µs), the decision and, when allowed, the new
/// `tat`. Pure: the backends store `tat`.
pub fn decide(rule: Rule, tat: u64, now: u64) -> (Decision, Option<u64>) {
    let base = tat.max(now);
    let debt = base - now + rule.interval_us;
    if debt > rule.window_us {
        return (
            Decision::Limited {
                retry_after_us: debt - rule.window_us,
            },
            None,
        );
    }
    (
        Decision::Allowed {
            remaining: (rule.window_us - debt) / rule.interval_us,
        },
        Some(base + rule.interval_us),
    )
}

/// A source of time in microseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Now, µs since the epoch.
    fn now_micros(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told (tests: rate-limit boundaries without sleeping).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `start_us`.
    pub fn new(start_us: u64) -> Self {
        ManualClock(AtomicU64::new(start_us))
    }

    /// Sets the reading.
    pub fn set(&self, us: u64) {
        self.0.store(us, Ordering::SeqCst);
    }

    /// Moves the reading forward by `us`.
    pub fn advance(&self, us: u64) {
        self.0.fetch_add(us, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A backend failure (Redis unreachable, unexpected reply). The request is then answered 503
/// `rate_limit`: the limiter fails closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    /// The URL is not `redis://…` / `rediss://…`.
    #[error("invalid rate-limit url {0:?}: expected memory, off or redis://HOST:PORT[/DB]")]
    InvalidUrl(String),
    /// Redis failed or timed out.
    #[error("rate-limit backend: {0}")]
    Backend(String),
}

/// Where the buckets live.
#[async_trait]
pub trait RateLimitBackend: Send + Sync + 'static {
    /// Applies [`decide`] to `user`'s bucket at `now_us` atomically and stores the new state.
    ///
    /// # Errors
    /// [`RateLimitError::Backend`].
    async fn acquire(
        &self,
        user: Uuid,
        rule: Rule,
        now_us: u64,
    ) -> Result<Decision, RateLimitError>;

    /// A short name for logs (`memory`, `redis`).
    fn name(&self) -> &'static str;
}

/// Buckets in this process's memory (the default; one API instance).
#[derive(Debug, Default)]
pub struct MemoryBackend {
    tats: Mutex<HashMap<Uuid, u64>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl RateLimitBackend for MemoryBackend {
    async fn acquire(
        &self,
        user: Uuid,
        rule: Rule,
        now_us: u64,
    ) -> Result<Decision, RateLimitError> {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        if tats.len() >= MEMORY_PRUNE_AT {
            // A bucket whose tat has passed is full: the same as no entry.
            tats.retain(|_, tat| *tat > now_us);
        }
        let tat = tats.get(&user).copied().unwrap_or(0);
        let (decision, new_tat) = decide(rule, tat, now_us);
        if let Some(t) = new_tat {
            tats.insert(user, t);
        }
        Ok(decision)
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

/// The Lua form of [`decide`], run atomically by Redis. `KEYS[1]` = the user's bucket;
/// `ARGV` = now, T, window (µs). Returns `{1, remaining}` or `{0, retry_after_us}`. The new
/// `tat` is written as an integer string (`%d`; Lua numbers are doubles, exact below 2^53 µs,
/// i.e. until the year 2255) with a TTL of the time until the bucket is full again plus 1 s,
/// after which a missing key means the same as a full bucket.
pub const REDIS_SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local base = tat
if base < now then base = now end
local debt = base - now + interval
if debt > window then
  return {0, debt - window}
end
local new_tat = base + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, math.floor((window - debt) / interval)}
"#;

/// Buckets in Redis, shared by every API instance configured with the same server
/// (`--rate-limit redis://…`). Each request runs [`REDIS_SCRIPT`] (EVALSHA, loaded on first
/// use) on key `tektree:ratelimit:<user>`. The time is the calling instance's clock, so
/// instances need synchronised clocks (NTP); a skew of `d` shifts a user's bucket by `d`.
pub struct RedisBackend {
    client: Client,
    prefix: String,
    script: Script,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl fmt::Debug for RedisBackend {
    /// Shows the key prefix, not the URL (it may hold a password).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`) and checks it answers
    /// `PING`.
    ///
    /// # Errors
    /// [`RateLimitError::InvalidUrl`] or [`RateLimitError::Backend`].
    pub async fn connect(url: &str) -> Result<RedisBackend, RateLimitError> {
        Self::with_prefix(url, REDIS_KEY_PREFIX).await
    }

    /// Like [`connect`](Self::connect) with another key prefix.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn with_prefix(url: &str, prefix: &str) -> Result<RedisBackend, RateLimitError> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(RateLimitError::InvalidUrl(
                tektree_runtime::config::redact_url(url),
            ));
        }
        let client = Client::open(url)
            .map_err(|_| RateLimitError::InvalidUrl(tektree_runtime::config::redact_url(url)))?;
        let backend = RedisBackend {
            client,
            prefix: prefix.to_string(),
            script: Script::new(REDIS_SCRIPT),
            conn: tokio::sync::Mutex::new(None),
        };
        let mut conn = backend.connection().await?;
        let _: String =
            tokio::time::timeout(REDIS_TIMEOUT, redis::cmd("PING").query_async(&mut conn))
                .await
                .map_err(|_| RateLimitError::Backend("PING timed out".into()))?
                .map_err(|e| RateLimitError::Backend(e.to_string()))?;
        Ok(backend)
    }

    /// The key of `user`'s bucket.
    pub fn key(&self, user: Uuid) -> String {
        format!("{}{user}", self.prefix)
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RateLimitError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| RateLimitError::Backend(format!("connecting: {e}")))?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

#[async_trait]
impl RateLimitBackend for RedisBackend {
    async fn acquire(
        &self,
        user: Uuid,
        rule: Rule,
        now_us: u64,
    ) -> Result<Decision, RateLimitError> {
        let mut conn = self.connection().await?;
        let mut call = self.script.key(self.key(user));
        call.arg(now_us).arg(rule.interval_us).arg(rule.window_us);
        let reply: Result<(i64, i64), String> =
            match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut conn)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("script timed out".into()),
            };
        let (allowed, n) = match reply {
            Ok(r) => r,
            Err(e) => {
                // Reconnect on the next request.
                *self.conn.lock().await = None;
                return Err(RateLimitError::Backend(e));
            }
        };
        let n = u64::try_from(n)
            .map_err(|_| RateLimitError::Backend(format!("unexpected script reply {n}")))?;
        Ok(match allowed {
            1 => Decision::Allowed { remaining: n },
            0 if n > 0 => Decision::Limited { retry_after_us: n },
            other => {
                return Err(RateLimitError::Backend(format!(
                    "unexpected script reply ({other}, {n})"
                )))
            }
        })
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// The limiter of the command endpoints: the tier from the subscription, the rule from
/// [`RateLimits`], the bucket from the backend, the time from the clock.
#[derive(Clone)]
pub struct RateLimiter {
    limits: RateLimits,
    backend: Option<Arc<dyn RateLimitBackend>>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limits", &self.limits)
            .field("backend", &self.backend.as_ref().map(|b| b.name()))
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// `limits` enforced with `backend` and `clock`.
    pub fn new(
        limits: RateLimits,
        backend: Arc<dyn RateLimitBackend>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        RateLimiter {
            limits,
            backend: Some(backend),
            clock,
        }
    }

    /// `limits` in this process's memory, with the system clock.
    pub fn in_memory(limits: RateLimits) -> Self {
        Self::new(
            limits,
            Arc::new(MemoryBackend::new()),
            Arc::new(SystemClock),
        )
    }

    /// No rate limiting at all (`--rate-limit off`; tests and trusted load generators).
    pub fn disabled() -> Self {
        RateLimiter {
            limits: RateLimits::unlimited(),
            backend: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// The limits.
    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// The backend's name (`memory`, `redis`), `off` when disabled.
    pub fn backend_name(&self) -> &'static str {
        self.backend.as_ref().map(|b| b.name()).unwrap_or("off")
    }

    /// Counts one command request of `user` and refuses it when over the limit of the user's
    /// tier. The tier is the one the quota uses ([`CommandHandler::tier_of`]: the user's
    /// `subscription` aggregate, Free when there is none), read only when limits are on;
    /// nothing the client sends is consulted. (Until issue #13 it came from the `quota` read
    /// model, a second source trailing the projection.)
    ///
    /// # Errors
    /// 429 `rate_limited` with `Retry-After`; 503 `store` or `rate_limit` when the subscription
    /// cannot be loaded or the backend fails.
    ///
    /// [`CommandHandler::tier_of`]: tektree_commands::CommandHandler::tier_of
    pub async fn check(&self, handler: &CommandHandler, user: Uuid) -> Result<Decision, Problem> {
        let Some(backend) = &self.backend else {
            return Ok(Decision::Allowed {
                remaining: u64::MAX,
            });
        };
        let now_us = self.clock.now_micros();
        let tier = handler.tier_of(user).await?;
        let (Some(rule), Some(limit)) = (self.limits.rule(tier), self.limits.per_minute(tier))
        else {
            return Ok(Decision::Allowed {
                remaining: u64::MAX,
            });
        };
        let decision = backend
            .acquire(user, rule, now_us)
            .await
            .map_err(|e| Problem::unavailable("rate_limit", &e))?;
        if let Some(secs) = decision.retry_after_secs() {
            metrics::counter!("tektree_rate_limited_total", "tier" => tier.as_str()).increment(1);
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests",
                format!(
                    "user {user} exceeded the {} tier's rate limit of {limit} commands per minute (bursts up to {} at once); retry after {secs} s",
                    tier.as_str(),
                    rule.burst()
                ),
            )
            .with_retry_after(secs));
        }
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const T0: u64 = 1_700_000_000 * S;

    fn run(rule: Rule, tat: &mut u64, now: u64) -> Decision {
        let (d, new) = decide(rule, *tat, now);
        if let Some(t) = new {
            *tat = t;
        }
        d
    }

    #[test]
    fn issue_4_rules() {
        let r = RateLimits::default();
        assert_eq!(
            r.rule(Tier::Free),
            Some(Rule {
                interval_us: 600_000,
                window_us: 10 * S
            })
        );
        assert_eq!(
            r.rule(Tier::Pro),
            Some(Rule {
                interval_us: 60_000,
                window_us: 10 * S
            })
        );
        assert_eq!(
            r.rule(Tier::Team),
            Some(Rule {
                interval_us: 12_000,
                window_us: 10 * S
            })
        );
        assert_eq!(r.rule(Tier::Enterprise), None);
        // b = 10 s × r: 16.7, 166.7, 833.3 requests.
        assert_eq!(r.rule(Tier::Free).unwrap().burst(), 16);
        assert_eq!(r.rule(Tier::Pro).unwrap().burst(), 166);
        assert_eq!(r.rule(Tier::Team).unwrap().burst(), 833);
        // Below 6/min the capacity is one request.
        assert_eq!(Rule::per_minute(3).unwrap().burst(), 1);
        assert_eq!(Rule::per_minute(0), None);
    }

    #[test]
    fn a_full_bucket_allows_exactly_its_burst_at_once() {
        for tier in [Tier::Free, Tier::Pro, Tier::Team] {
            let rule = RateLimits::default().rule(tier).unwrap();
            let mut tat = 0;
            for i in 0..rule.burst() {
                assert_eq!(
                    run(rule, &mut tat, T0),
                    Decision::Allowed {
                        remaining: rule.burst() - 1 - i
                    },
                    "{tier:?} request {i}"
                );
            }
            let d = run(rule, &mut tat, T0);
            let Decision::Limited { retry_after_us } = d else {
                panic!("{tier:?}: {d:?}")
            };
            // One more token is due after T − (10 s − burst × T).
            assert_eq!(
                retry_after_us,
                (rule.burst() + 1) * rule.interval_us - rule.window_us
            );
            assert_eq!(d.retry_after_secs(), Some(1));
            // A refusal changes nothing: just before the wait it is still refused, at it allowed.
            assert!(matches!(
                run(rule, &mut tat, T0 + retry_after_us - 1),
                Decision::Limited { .. }
            ));
            assert!(matches!(
                run(rule, &mut tat, T0 + retry_after_us),
                Decision::Allowed { .. }
            ));
        }
    }

    #[test]
    fn after_a_burst_exactly_the_limit_passes_per_minute() {
        for (tier, limit) in [(Tier::Free, 100), (Tier::Pro, 1000), (Tier::Team, 5000)] {
            let rule = RateLimits::default().rule(tier).unwrap();
            let mut tat = 0;
            // Drain the burst at T0 ...
            while let Decision::Allowed { .. } = run(rule, &mut tat, T0) {}
            // ... then a greedy client, trying every millisecond as often as it is allowed,
            // gets exactly `limit` requests through in the following minute.
            let mut passed = 0;
            for ms in 1..=60_000 {
                while let Decision::Allowed { .. } = run(rule, &mut tat, T0 + ms * 1000) {
                    passed += 1;
                }
            }
            assert_eq!(passed, limit, "{tier:?}");
            // A client at exactly the rate is never refused.
            let mut tat = 0;
            for i in 0..(3 * limit) {
                let d = run(rule, &mut tat, T0 + i * rule.interval_us);
                assert_eq!(
                    d,
                    Decision::Allowed {
                        remaining: rule.burst() - 1
                    },
                    "{tier:?} {i}"
                );
            }
        }
    }

    #[test]
    fn twice_the_rate_is_served_for_ten_seconds() {
        for tier in [Tier::Free, Tier::Pro, Tier::Team] {
            let rule = RateLimits::default().rule(tier).unwrap();
            let mut tat = 0;
            let step = rule.interval_us / 2;
            let mut now = T0;
            let first_refusal = loop {
                if let Decision::Limited { .. } = run(rule, &mut tat, now) {
                    break now - T0;
                }
                now += step;
            };
            // Refused only once the 10 s burst is spent: within one interval before 10 s.
            assert!(first_refusal <= 10 * S, "{tier:?}: {first_refusal}");
            assert!(
                first_refusal > 10 * S - rule.interval_us,
                "{tier:?}: {first_refusal}"
            );
        }
    }

    #[test]
    fn an_idle_bucket_refills_to_capacity_only() {
        let rule = RateLimits::default().rule(Tier::Free).unwrap();
        let mut tat = 0;
        while let Decision::Allowed { .. } = run(rule, &mut tat, T0) {}
        // An hour later the bucket is full: again exactly the burst.
        let later = T0 + 3600 * S;
        let mut n = 0;
        while let Decision::Allowed { .. } = run(rule, &mut tat, later) {
            n += 1;
        }
        assert_eq!(n, rule.burst());
    }

    #[tokio::test]
    async fn memory_backend_follows_the_rules() {
        let rule = Rule::per_minute(60).unwrap();
        let b = MemoryBackend::new();
        let (u, v) = (Uuid::new_v4(), Uuid::new_v4());
        for _ in 0..10 {
            assert!(matches!(
                b.acquire(u, rule, T0).await.unwrap(),
                Decision::Allowed { .. }
            ));
        }
        assert_eq!(
            b.acquire(u, rule, T0).await.unwrap(),
            Decision::Limited { retry_after_us: S }
        );
        // Buckets are per user.
        assert!(matches!(
            b.acquire(v, rule, T0).await.unwrap(),
            Decision::Allowed { remaining: 9 }
        ));
    }
}
