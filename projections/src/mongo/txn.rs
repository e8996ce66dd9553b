//! Error classification and the transaction runner (the driver's documented retry loop).
//!
//! The decisions are pure functions of the server's error labels and code
//! ([`classify_parts`], [`should_retry`], [`backoff`]), unit-tested without a server.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use mongodb::error::{
    Error, ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT,
};
use mongodb::options::{Acknowledgment, ReadConcern, TransactionOptions, WriteConcern};
use mongodb::ClientSession;

use crate::ReadModelError;

/// Server error code `MaxTimeMSExpired`: a commit that timed out is not retried.
pub const MAX_TIME_MS_EXPIRED: i32 = 50;

/// How long a transaction (with all its retries) is retried before giving up; the driver's
/// convenient transaction API uses the same limit.
pub const MAX_RETRY_TIME: Duration = Duration::from_secs(120);

/// What a driver error means for a read-model transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Labelled `TransientTransactionError` (write conflict with another worker of the same
    /// consumer, failover, network error before commit): retry the whole transaction.
    TransientTransaction,
    /// Labelled `UnknownTransactionCommitResult`: retry the commit.
    UnknownCommitResult,
    /// Anything else: not retried.
    Backend,
}

/// Where in a transaction an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// While running the transaction's reads and writes.
    Body,
    /// While committing.
    Commit,
}

/// What to do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Abort and run the whole transaction again (after [`backoff`]).
    Transaction,
    /// Run `commitTransaction` again.
    Commit,
    /// Give up.
    No,
}

/// Classifies an error from its server code and labels: `UnknownTransactionCommitResult`
/// (except with code [`MAX_TIME_MS_EXPIRED`]) before `TransientTransactionError`.
pub fn classify_parts(code: Option<i32>, labels: &[&str]) -> ErrorClass {
    if labels.contains(&UNKNOWN_TRANSACTION_COMMIT_RESULT) && code != Some(MAX_TIME_MS_EXPIRED) {
        ErrorClass::UnknownCommitResult
    } else if labels.contains(&TRANSIENT_TRANSACTION_ERROR) {
        ErrorClass::TransientTransaction
    } else {
        ErrorClass::Backend
    }
}

/// The server code of `e`, if it has one (looking through wrapped source errors).
pub fn code(e: &Error) -> Option<i32> {
    let own = match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .map(|w| w.code)
            .or_else(|| m.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    };
    own.or_else(|| {
        std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<Error>())
            .and_then(code)
    })
}

/// Classifies a driver error (see [`classify_parts`]).
pub fn classify(e: &Error) -> ErrorClass {
    let labels: Vec<&str> = [
        TRANSIENT_TRANSACTION_ERROR,
        UNKNOWN_TRANSACTION_COMMIT_RESULT,
    ]
    .into_iter()
    .filter(|l| e.contains_label(l))
    .collect();
    classify_parts(code(e), &labels)
}

/// The retry decision: transient → whole transaction; unknown commit result at commit →
/// commit; otherwise, or after [`MAX_RETRY_TIME`], no.
pub fn should_retry(class: ErrorClass, phase: Phase, elapsed: Duration) -> Retry {
    if elapsed >= MAX_RETRY_TIME {
        return Retry::No;
    }
    match (class, phase) {
        (ErrorClass::TransientTransaction, _) => Retry::Transaction,
        (ErrorClass::UnknownCommitResult, Phase::Commit) => Retry::Commit,
        _ => Retry::No,
    }
}

/// Pause before whole-transaction attempt `attempt + 1`, `jitter` in `[0, 1)`:
/// `jitter × min(5 ms × 1.5^attempt, 500 ms)` (the driver's formula).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let exp = 5.0 * 1.5f64.powi(attempt.min(64) as i32);
    Duration::from_secs_f64(jitter * exp.min(500.0) / 1000.0)
}

fn jitter() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64 >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// Why a transaction body stopped.
pub(crate) enum TxError {
    /// A driver error: classified, maybe retried.
    Driver(Error),
    /// A decision of the body: abort and return it.
    Abort(ReadModelError),
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Driver(e)
    }
}

/// Snapshot reads, majority-acknowledged journaled commits.
pub(crate) fn transaction_options() -> TransactionOptions {
    TransactionOptions::builder()
        .read_concern(ReadConcern::snapshot())
        .write_concern(
            WriteConcern::builder()
                .w(Acknowledgment::Majority)
                .journal(true)
                .build(),
        )
        .build()
}

/// Runs `body` in a transaction and commits it, retrying as the driver documents (see
/// [`should_retry`]). `what` names the operation in errors.
pub(crate) async fn run<C, T, F>(
    session: &mut ClientSession,
    what: &str,
    mut ctx: C,
    mut body: F,
) -> Result<T, ReadModelError>
where
    F: for<'s> FnMut(&'s mut ClientSession, &'s mut C) -> BoxFuture<'s, Result<T, TxError>>,
{
    let failed = |class: ErrorClass, e: Error| {
        let note = if class == ErrorClass::UnknownCommitResult {
            " (commit result unknown)"
        } else {
            ""
        };
        ReadModelError::Backend(format!("{what}{note}: {e}"))
    };
    let started = Instant::now();
    let mut attempt: u32 = 0;
    'transaction: loop {
        attempt += 1;
        session
            .start_transaction()
            .with_options(transaction_options())
            .await
            .map_err(|e| failed(classify(&e), e))?;
        let value = match body(session, &mut ctx).await {
            Ok(v) => v,
            Err(err) => {
                let _ = session.abort_transaction().await;
                match err {
                    TxError::Abort(e) => return Err(e),
                    TxError::Driver(e) => {
                        let class = classify(&e);
                        if should_retry(class, Phase::Body, started.elapsed()) == Retry::Transaction
                        {
                            tracing::debug!(attempt, error = %e, "{what}: retrying transaction");
                            tokio::time::sleep(backoff(attempt, jitter())).await;
                            continue 'transaction;
                        }
                        return Err(failed(class, e));
                    }
                }
            }
        };
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(value),
                Err(e) => {
                    let class = classify(&e);
                    match should_retry(class, Phase::Commit, started.elapsed()) {
                        Retry::Commit => tracing::debug!(error = %e, "{what}: retrying commit"),
                        Retry::Transaction => {
                            tokio::time::sleep(backoff(attempt, jitter())).await;
                            continue 'transaction;
                        }
                        Retry::No => return Err(failed(class, e)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;
    use mongodb::error::CommandError;

    const T: &str = TRANSIENT_TRANSACTION_ERROR;
    const U: &str = UNKNOWN_TRANSACTION_COMMIT_RESULT;

    #[test]
    fn classification_and_retry_follow_the_driver_rules() {
        assert_eq!(
            classify_parts(Some(112), &[T]),
            ErrorClass::TransientTransaction
        );
        assert_eq!(classify_parts(None, &[T]), ErrorClass::TransientTransaction);
        assert_eq!(
            classify_parts(Some(91), &[U]),
            ErrorClass::UnknownCommitResult
        );
        assert_eq!(
            classify_parts(Some(64), &[T, U]),
            ErrorClass::UnknownCommitResult
        );
        assert_eq!(
            classify_parts(Some(MAX_TIME_MS_EXPIRED), &[U]),
            ErrorClass::Backend
        );
        assert_eq!(classify_parts(Some(11000), &[]), ErrorClass::Backend);
        let s = Duration::from_secs(1);
        use ErrorClass::*;
        assert_eq!(
            should_retry(TransientTransaction, Phase::Body, s),
            Retry::Transaction
        );
        assert_eq!(
            should_retry(TransientTransaction, Phase::Commit, s),
            Retry::Transaction
        );
        assert_eq!(
            should_retry(UnknownCommitResult, Phase::Commit, s),
            Retry::Commit
        );
        assert_eq!(should_retry(UnknownCommitResult, Phase::Body, s), Retry::No);
        assert_eq!(should_retry(Backend, Phase::Body, s), Retry::No);
        assert_eq!(
            should_retry(TransientTransaction, Phase::Body, MAX_RETRY_TIME),
            Retry::No
        );
        assert_eq!(backoff(1, 1.0), Duration::from_secs_f64(0.0075));
        assert_eq!(backoff(30, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(5, 0.0), Duration::ZERO);
    }

    #[test]
    fn codes_are_read_from_constructed_driver_errors() {
        let cmd: CommandError =
            mongodb::bson::from_document(doc! { "code": 112, "errmsg": "write conflict" }).unwrap();
        let e = Error::from(ErrorKind::Command(cmd));
        assert_eq!(code(&e), Some(112));
        // Without the label (outside a transaction) it is not retried.
        assert_eq!(classify(&e), ErrorClass::Backend);
        assert_eq!(code(&Error::from(ErrorKind::Shutdown)), None);
    }
}
