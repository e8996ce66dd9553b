//! A circuit breaker with retries, exponential backoff with jitter, and a per-attempt time
//! limit, for calls to an upstream service (Polar). Time is tokio's ([`tokio::time::Instant`],
//! [`tokio::time::sleep`], [`tokio::time::timeout`]).
//!
//! # States (the classic pattern, as in Nygard's *Release It!* and resilience4j)
//!
//! ```text
//!            N consecutive failed attempts                 cool-down elapsed
//!   Closed ───────────────────────────────▶ Open ─────────────────────────────▶ HalfOpen
//!     ▲                                       ▲                                    │
//!     │            probe succeeded            │          probe failed              │
//!     └───────────────────────────────────────┼────────────────────────────────────┘
//!                                             └───────────────── (back to Open)
//! ```
//!
//! - **Closed**: attempts go through; each failed attempt (timeout, or an error whose
//!   [`Outcome::is_failure`] is true) increments a counter, any success resets it;
//!   [`BreakerConfig::failure_threshold`] consecutive failures open the breaker.
//! - **Open**: calls fail fast with [`CallError::Open`] **without running the operation**, until
//!   [`BreakerConfig::cool_down`] has passed since opening.
//! - **HalfOpen**: exactly one attempt (the probe) is let through; other calls fail fast. A
//!   successful probe closes the breaker, a failed one reopens it for another cool-down. A probe
//!   abandoned before it finished (its future dropped) lets the next call probe.
//!
//! Errors that are not the upstream's fault (a 4xx other than 429: our request was refused) are
//! neither retried nor counted as failures; they count as a sign of life (success) for the
//! breaker.
//!
//! # Retries
//!
//! One [`CircuitBreaker::call`] makes at most [`BreakerConfig::max_attempts`] attempts. Before
//! attempt `n + 1` it sleeps [`backoff`]`(n)`: `min(max_backoff, base_backoff · 2^(n−1))`, halved
//! and topped up with a random half ("equal jitter", AWS Architecture Blog, *Exponential
//! Backoff And Jitter*), so that clients do not retry in lockstep; at least the upstream's
//! `Retry-After` hint when it gave one, and no retry at all when that hint exceeds
//! `max_backoff`. Each attempt asks the breaker first: when the breaker opened meanwhile, the
//! call stops retrying and returns the last failure.
//!
//! # Metrics (`metrics` crate; label `breaker` = the breaker's name)
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `tektree_breaker_calls_total` | counter | `breaker`, `outcome` | calls by final outcome: `success`, `rejected` (non-retryable upstream refusal), `failure`, `timeout`, `short_circuited` (failed fast while open) |
//! | `tektree_breaker_retries_total` | counter | `breaker` | attempts after the first |
//! | `tektree_breaker_state` | gauge | `breaker` | 0 closed, 1 half-open, 2 open (set on transitions: an open breaker whose cool-down has passed shows 2 until the next call probes) |
//! | `tektree_breaker_transitions_total` | counter | `breaker`, `to` | state changes, by new state |

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Tuning of a [`CircuitBreaker`]. All durations are wall-clock (tokio) time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed attempts that open the breaker (at least 1). Default 5.
    pub failure_threshold: u32,
    /// How long the breaker stays open before letting one probe through. Default 30 s.
    pub cool_down: Duration,
    /// Attempts per call, the first included (at least 1). Default 3.
    pub max_attempts: u32,
    /// Backoff before the first retry (before jitter). Default 200 ms.
    pub base_backoff: Duration,
    /// Cap of the backoff, and the longest upstream `Retry-After` that is waited for. Default
    /// 2 s.
    pub max_backoff: Duration,
    /// Time limit of one attempt (request and response body). Default 10 s (Polar answers in
    /// well under a second; the limit bounds a hung connection).
    pub call_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
            max_attempts: 3,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// One probe may pass.
    HalfOpen,
    /// Calls fail fast.
    Open,
}

impl BreakerState {
    /// `closed`, `half_open`, `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// Value of the `tektree_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// How the breaker treats an operation's error.
pub trait Outcome {
    /// Whether another attempt may succeed (5xx, 429, connection errors). Default: yes.
    fn is_retryable(&self) -> bool {
        true
    }
    /// Whether the error counts against the upstream's health. Default: when retryable.
    fn is_failure(&self) -> bool {
        self.is_retryable()
    }
    /// The upstream's own hint of when to retry (`Retry-After`), if any.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// Why [`CircuitBreaker::call`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker is open (or half-open with its probe in flight): nothing was attempted.
    #[error("circuit open; retry in {retry_after:?}")]
    Open {
        /// Time until the breaker lets a probe through (zero while a probe is in flight).
        retry_after: Duration,
    },
    /// The last attempt exceeded the time limit.
    #[error("timed out after {limit:?} ({attempts} attempts)")]
    Timeout {
        /// Attempts made.
        attempts: u32,
        /// The per-attempt limit.
        limit: Duration,
    },
    /// The last attempt failed with `error`.
    #[error("upstream call failed after {attempts} attempts")]
    Failed {
        /// The last error.
        error: E,
        /// Attempts made.
        attempts: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Admission of one attempt: whether it is the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// This attempt is the half-open probe; its result decides the state.
    pub probe: bool,
}

/// A circuit breaker (see the module docs). Shared by reference (`Arc`) between callers.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// The backoff before retry number `retry` (1 = the first retry): `d = min(max, base ·
/// 2^(retry−1))`, then `d/2 + unit · d/2` with `unit ∈ [0, 1]` (equal jitter; see the module
/// docs).
pub fn backoff(retry: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = retry.saturating_sub(1).min(30);
    let d = base.saturating_mul(1u32 << exp).min(max);
    let half = d / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// A uniform number in `[0, 1)` from the OS random source (via a v4 UUID's random bits).
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

/// Releases an unfinished half-open probe when dropped (the caller's future was cancelled).
struct ProbeGuard<'a> {
    breaker: &'a CircuitBreaker,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = self.breaker.lock();
            if let Inner::HalfOpen { probing: true } = *inner {
                *inner = Inner::HalfOpen { probing: false };
            }
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker named `name` (the `breaker` metrics label). `failure_threshold` and
    /// `max_attempts` below 1 are raised to 1.
    pub fn new(name: impl Into<String>, mut config: BreakerConfig) -> Self {
        config.failure_threshold = config.failure_threshold.max(1);
        config.max_attempts = config.max_attempts.max(1);
        let b = CircuitBreaker {
            name: name.into(),
            config,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        };
        b.publish(BreakerState::Closed);
        b
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written (plain copies).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: BreakerState) {
        metrics::gauge!("tektree_breaker_state", "breaker" => self.name.clone()).set(state.gauge());
    }

    fn transition(&self, inner: &mut Inner, to: Inner) {
        let from = Self::state_of(*inner);
        *inner = to;
        let now = Self::state_of(to);
        if from != now {
            tracing::info!(breaker = %self.name, from = from.as_str(), to = now.as_str(), "circuit breaker state change");
            metrics::counter!("tektree_breaker_transitions_total", "breaker" => self.name.clone(), "to" => now.as_str()).increment(1);
            self.publish(now);
        }
    }

    fn state_of(inner: Inner) -> BreakerState {
        match inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// The state at `now`: an open breaker whose cool-down has passed reports `HalfOpen`.
    pub fn state_at(&self, now: Instant) -> BreakerState {
        match *self.lock() {
            Inner::Open { until } if now >= until => BreakerState::HalfOpen,
            other => Self::state_of(other),
        }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.state_at(Instant::now())
    }

    /// Time until an open breaker lets a probe through (`None` unless open at `now`).
    pub fn retry_after_at(&self, now: Instant) -> Option<Duration> {
        match *self.lock() {
            Inner::Open { until } if now < until => Some(until - now),
            _ => None,
        }
    }

    /// Asks to run one attempt at `now`.
    ///
    /// # Errors
    /// The time until a probe may run (zero while another probe is in flight) when the breaker
    /// refuses.
    pub fn admit_at(&self, now: Instant) -> Result<Admission, Duration> {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Ok(Admission { probe: false }),
            Inner::Open { until } if now < until => Err(until - now),
            Inner::Open { .. } | Inner::HalfOpen { probing: false } => {
                self.transition(&mut inner, Inner::HalfOpen { probing: true });
                Ok(Admission { probe: true })
            }
            Inner::HalfOpen { probing: true } => Err(Duration::ZERO),
        }
    }

    /// Records a successful attempt (or one refused for a reason that is not the upstream's
    /// health): closes a half-open breaker when it was the probe, resets the failure count when
    /// closed.
    pub fn record_success_at(&self, admission: Admission, _now: Instant) {
        let mut inner = self.lock();
        match *inner {
            Inner::HalfOpen { .. } if admission.probe => {
                self.transition(&mut inner, Inner::Closed { failures: 0 })
            }
            Inner::Closed { .. } => *inner = Inner::Closed { failures: 0 },
            // A late answer to an attempt admitted before the breaker opened: the probe decides.
            _ => {}
        }
    }

    /// Records a failed attempt at `now`: opens the breaker after the threshold (closed) or
    /// again (the half-open probe).
    pub fn record_failure_at(&self, admission: Admission, now: Instant) {
        let mut inner = self.lock();
        let open = Inner::Open {
            until: now + self.config.cool_down,
        };
        match *inner {
            Inner::HalfOpen { .. } if admission.probe => self.transition(&mut inner, open),
            Inner::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    tracing::warn!(breaker = %self.name, failures, cool_down = ?self.config.cool_down, "circuit breaker opens");
                    self.transition(&mut inner, open);
                } else {
                    *inner = Inner::Closed { failures };
                }
            }
            _ => {}
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("tektree_breaker_calls_total", "breaker" => self.name.clone(), "outcome" => outcome).increment(1);
    }

    /// Runs `op` under the breaker with retries, backoff and the per-attempt time limit (module
    /// docs). `op` is called once per attempt.
    ///
    /// # Errors
    /// [`CallError::Open`] when the breaker refused the first attempt (the operation did not
    /// run); otherwise the last attempt's [`CallError::Timeout`] or [`CallError::Failed`].
    pub async fn call<T, E, F, Fut>(&self, mut op: F) -> Result<T, CallError<E>>
    where
        E: Outcome,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let cfg = &self.config;
        let mut last: Option<CallError<E>> = None;
        for attempt in 1..=cfg.max_attempts {
            let admission = match self.admit_at(Instant::now()) {
                Ok(a) => a,
                Err(retry_after) => {
                    return Err(match last {
                        // The breaker opened during our retries: report what failed.
                        Some(e) => {
                            self.count(Self::outcome_of(&e));
                            e
                        }
                        None => {
                            self.count("short_circuited");
                            CallError::Open { retry_after }
                        }
                    });
                }
            };
            let mut guard = ProbeGuard {
                breaker: self,
                armed: admission.probe,
            };
            let result = tokio::time::timeout(cfg.call_timeout, op()).await;
            guard.armed = false;
            drop(guard);
            let now = Instant::now();
            let hint = match result {
                Ok(Ok(value)) => {
                    self.record_success_at(admission, now);
                    self.count("success");
                    return Ok(value);
                }
                Ok(Err(error)) => {
                    if error.is_failure() {
                        self.record_failure_at(admission, now);
                    } else {
                        self.record_success_at(admission, now);
                    }
                    if !error.is_retryable() {
                        self.count("rejected");
                        return Err(CallError::Failed {
                            error,
                            attempts: attempt,
                        });
                    }
                    let hint = error.retry_after();
                    last = Some(CallError::Failed {
                        error,
                        attempts: attempt,
                    });
                    hint
                }
                Err(_elapsed) => {
                    self.record_failure_at(admission, now);
                    last = Some(CallError::Timeout {
                        attempts: attempt,
                        limit: cfg.call_timeout,
                    });
                    None
                }
            };
            if attempt == cfg.max_attempts || hint.is_some_and(|h| h > cfg.max_backoff) {
                break;
            }
            let wait = backoff(attempt, cfg.base_backoff, cfg.max_backoff, random_unit())
                .max(hint.unwrap_or_default());
            metrics::counter!("tektree_breaker_retries_total", "breaker" => self.name.clone())
                .increment(1);
            tracing::debug!(breaker = %self.name, attempt, wait = ?wait, "retrying upstream call");
            tokio::time::sleep(wait).await;
        }
        let e = last.expect("at least one attempt ran");
        self.count(Self::outcome_of(&e));
        Err(e)
    }

    fn outcome_of<E>(e: &CallError<E>) -> &'static str {
        match e {
            CallError::Open { .. } => "short_circuited",
            CallError::Timeout { .. } => "timeout",
            CallError::Failed { .. } => "failure",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum TestError {
        Down,
        BadRequest,
        Throttled(Duration),
    }

    impl Outcome for TestError {
        fn is_retryable(&self) -> bool {
            !matches!(self, TestError::BadRequest)
        }
        fn retry_after(&self) -> Option<Duration> {
            match self {
                TestError::Throttled(d) => Some(*d),
                _ => None,
            }
        }
    }

    fn cfg(threshold: u32, attempts: u32) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: threshold,
            cool_down: Duration::from_secs(3600),
            max_attempts: attempts,
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            call_timeout: Duration::from_secs(30),
        }
    }

    const CLOSED: Admission = Admission { probe: false };

    #[test]
    fn opens_after_n_consecutive_failures_and_a_success_resets_the_count() {
        let b = CircuitBreaker::new("t1", cfg(3, 1));
        let t0 = Instant::now();
        b.record_failure_at(CLOSED, t0);
        b.record_failure_at(CLOSED, t0);
        b.record_success_at(CLOSED, t0);
        b.record_failure_at(CLOSED, t0);
        b.record_failure_at(CLOSED, t0);
        assert_eq!(b.state_at(t0), BreakerState::Closed);
        b.record_failure_at(CLOSED, t0);
        assert_eq!(b.state_at(t0), BreakerState::Open);
        assert_eq!(b.retry_after_at(t0), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn open_refuses_until_the_cool_down_then_admits_exactly_one_probe() {
        let b = CircuitBreaker::new("t2", cfg(1, 1));
        let t0 = Instant::now();
        b.record_failure_at(CLOSED, t0);
        let cool = b.config().cool_down;
        assert_eq!(
            b.admit_at(t0 + Duration::from_secs(1)),
            Err(cool - Duration::from_secs(1))
        );
        assert_eq!(b.state_at(t0 + cool), BreakerState::HalfOpen);
        let probe = b.admit_at(t0 + cool).unwrap();
        assert!(probe.probe);
        // A second caller while the probe runs fails fast.
        assert_eq!(b.admit_at(t0 + cool), Err(Duration::ZERO));
        // The probe succeeds: closed.
        b.record_success_at(probe, t0 + cool);
        assert_eq!(b.state_at(t0 + cool), BreakerState::Closed);
        assert_eq!(b.admit_at(t0 + cool), Ok(CLOSED));
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cool_down() {
        let b = CircuitBreaker::new("t3", cfg(1, 1));
        let t0 = Instant::now();
        let cool = b.config().cool_down;
        b.record_failure_at(CLOSED, t0);
        let t1 = t0 + cool;
        let probe = b.admit_at(t1).unwrap();
        b.record_failure_at(probe, t1);
        assert_eq!(b.state_at(t1), BreakerState::Open);
        assert_eq!(b.retry_after_at(t1), Some(cool));
        assert!(b.admit_at(t1 + cool - Duration::from_millis(1)).is_err());
        assert!(b.admit_at(t1 + cool).unwrap().probe);
    }

    #[test]
    fn late_results_of_non_probe_attempts_do_not_decide_the_half_open_state() {
        let b = CircuitBreaker::new("t4", cfg(1, 1));
        let t0 = Instant::now();
        b.record_failure_at(CLOSED, t0);
        let t1 = t0 + b.config().cool_down;
        let probe = b.admit_at(t1).unwrap();
        b.record_success_at(CLOSED, t1);
        b.record_failure_at(CLOSED, t1);
        assert_eq!(b.state_at(t1), BreakerState::HalfOpen);
        b.record_success_at(probe, t1);
        assert_eq!(b.state_at(t1), BreakerState::Closed);
    }

    #[test]
    fn backoff_doubles_is_capped_and_jitters_within_the_upper_half() {
        let (base, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        assert_eq!(backoff(1, base, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(2, base, max, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(3, base, max, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(4, base, max, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(5, base, max, 1.0), max);
        assert_eq!(backoff(60, base, max, 0.0), max / 2);
        for _ in 0..100 {
            let d = backoff(2, base, max, random_unit());
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }

    #[tokio::test]
    async fn retries_retryable_errors_then_succeeds() {
        let b = CircuitBreaker::new("t5", cfg(10, 3));
        let calls = AtomicU32::new(0);
        let r: Result<u32, CallError<TestError>> = b
            .call(|| async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(TestError::Down),
                    1 => Err(TestError::Throttled(Duration::from_millis(1))),
                    n => Ok(n),
                }
            })
            .await;
        assert_eq!(r, Ok(2));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_with_the_last_error() {
        let b = CircuitBreaker::new("t6", cfg(10, 3));
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = b
            .call(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(TestError::Down)
            })
            .await;
        assert_eq!(
            r,
            Err(CallError::Failed {
                error: TestError::Down,
                attempts: 3
            })
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn non_retryable_errors_are_neither_retried_nor_failures() {
        let b = CircuitBreaker::new("t7", cfg(1, 3));
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = b
            .call(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(TestError::BadRequest)
            })
            .await;
        assert_eq!(
            r,
            Err(CallError::Failed {
                error: TestError::BadRequest,
                attempts: 1
            })
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_backoff_cap_is_not_waited_for() {
        let b = CircuitBreaker::new("t8", cfg(10, 3));
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = b
            .call(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(TestError::Throttled(Duration::from_secs(60)))
            })
            .await;
        assert!(matches!(r, Err(CallError::Failed { attempts: 1, .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn slow_attempts_time_out_and_count_as_failures() {
        let mut c = cfg(2, 2);
        c.call_timeout = Duration::from_millis(20);
        let b = CircuitBreaker::new("t9", c);
        let calls = AtomicU32::new(0);
        let r: Result<(), CallError<TestError>> = b
            .call(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })
            .await;
        assert_eq!(
            r,
            Err(CallError::Timeout {
                attempts: 2,
                limit: Duration::from_millis(20)
            })
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test]
    async fn an_open_breaker_fails_fast_without_calling() {
        let b = CircuitBreaker::new("t10", cfg(2, 5));
        let calls = AtomicU32::new(0);
        // Opens during the retries of the first call: it stops at the threshold.
        let r: Result<(), _> = b
            .call(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(TestError::Down)
            })
            .await;
        assert!(matches!(r, Err(CallError::Failed { attempts: 2, .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(b.state(), BreakerState::Open);
        for _ in 0..3 {
            let r: Result<(), CallError<TestError>> = b
                .call(|| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .await;
            assert!(
                matches!(r, Err(CallError::Open { retry_after }) if retry_after > Duration::ZERO)
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the operation never ran");
    }

    #[tokio::test]
    async fn half_open_probe_success_closes_and_failure_reopens() {
        let mut c = cfg(1, 1);
        c.cool_down = Duration::from_millis(30);
        let b = CircuitBreaker::new("t11", c);
        let r: Result<(), _> = b.call(|| async { Err(TestError::Down) }).await;
        assert!(r.is_err());
        // Open (or already half-open on a slow machine): not closed.
        assert_ne!(b.state(), BreakerState::Closed);
        // Wait until the cool-down has passed (no duration is asserted).
        while b.state() == BreakerState::Open {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r: Result<(), _> = b.call(|| async { Err(TestError::Down) }).await;
        assert!(matches!(r, Err(CallError::Failed { attempts: 1, .. })));
        assert_ne!(b.state(), BreakerState::Closed);
        while b.state() == BreakerState::Open {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r: Result<u8, CallError<TestError>> = b.call(|| async { Ok(7) }).await;
        assert_eq!(r, Ok(7));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn an_abandoned_probe_lets_the_next_call_probe() {
        let mut c = cfg(1, 1);
        c.cool_down = Duration::ZERO;
        let b = CircuitBreaker::new("t12", c);
        b.record_failure_at(CLOSED, Instant::now());
        {
            let fut = b.call(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<(), TestError>(())
            });
            // Poll once so the probe is admitted, then drop it.
            let _ = tokio::time::timeout(Duration::from_millis(10), fut).await;
        }
        let r: Result<u8, CallError<TestError>> = b.call(|| async { Ok(1) }).await;
        assert_eq!(r, Ok(1));
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
