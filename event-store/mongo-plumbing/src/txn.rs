//! The transaction runner: the driver's documented retry loop, with the decisions taken by the
//! pure functions of the errors module. Generic over the error a transaction body aborts with, so
//! the event store (`tektree_event_store::StoreError`) and the read-model store of
//! `tektree-projections` share it.

use std::time::Instant;

use futures::future::BoxFuture;
use mongodb::options::{ReadConcern, TransactionOptions};
use mongodb::ClientSession;

use crate::client::majority;
use crate::errors::{backoff, classify, jitter, should_retry, ErrorClass, Phase, Retry};

/// Why a transaction body stopped; `E` is the store's own error type.
///
/// `?` on a driver result inside a body converts the driver error into [`TxError::Driver`].
#[derive(Debug)]
pub enum TxError<E> {
    /// A driver error: classified, maybe retried.
    Driver(mongodb::error::Error),
    /// A decision of the body (for example a version conflict): abort and return it.
    Abort(E),
}

impl<E> From<mongodb::error::Error> for TxError<E> {
    fn from(e: mongodb::error::Error) -> Self {
        TxError::Driver(e)
    }
}

/// Why [`run_transaction`] failed; `E` is the error the body aborted with.
#[derive(Debug)]
pub enum RunError<E> {
    /// The body aborted with this error.
    Abort(E),
    /// A driver error that is not (or no longer) retried, with its class.
    Failed(ErrorClass, mongodb::error::Error),
}

/// How long the server may take to commit one transaction (`maxCommitTimeMS`); the majority
/// write concern has the same `wtimeout` (see `client::majority`). Without a majority the
/// commit then fails with a retryable "unknown commit result" instead of hanging, and the
/// runner gives up after [`MAX_RETRY_TIME`](crate::errors::MAX_RETRY_TIME).
pub const COMMIT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The options of every transaction: snapshot reads, majority-acknowledged journaled commits
/// within [`COMMIT_TIME_LIMIT`].
pub fn transaction_options() -> TransactionOptions {
    TransactionOptions::builder()
        .read_concern(ReadConcern::snapshot())
        .write_concern(majority())
        .max_commit_time(COMMIT_TIME_LIMIT)
        .build()
}

/// Runs `body` in a transaction on `session` and commits it, retrying as the driver documents:
/// the whole transaction on `TransientTransactionError` (after a jittered backoff), the commit
/// alone on `UnknownTransactionCommitResult`, for at most
/// [`MAX_RETRY_TIME`](crate::errors::MAX_RETRY_TIME).
///
/// `ctx` is handed to every attempt (the driver's `and_run` pattern: borrowing captured values
/// through the context keeps the future's lifetime tied to the session's).
///
/// The body returns [`TxError::Abort`] to stop without retrying; that error comes back as
/// [`RunError::Abort`]. A driver error that is not retried (or still fails after
/// [`MAX_RETRY_TIME`](crate::errors::MAX_RETRY_TIME)) comes back as [`RunError::Failed`] with
/// its class, so the caller can tell, for example, a conflict or an unknown commit result.
///
/// # Errors
/// [`RunError::Abort`] when the body aborts, [`RunError::Failed`] when starting the
/// transaction, the body or the commit fails with an error that is not (or no longer) retried.
pub async fn run_transaction<C, T, E, F>(
    session: &mut ClientSession,
    mut ctx: C,
    mut body: F,
) -> Result<T, RunError<E>>
where
    F: for<'s> FnMut(&'s mut ClientSession, &'s mut C) -> BoxFuture<'s, Result<T, TxError<E>>>,
{
    let started = Instant::now();
    let mut attempt: u32 = 0;
    'transaction: loop {
        attempt += 1;
        session
            .start_transaction()
            .with_options(transaction_options())
            .await
            .map_err(|e| RunError::Failed(classify(&e), e))?;
        let value = match body(session, &mut ctx).await {
            Ok(v) => v,
            Err(err) => {
                // Errors of abortTransaction are ignored (the server may have aborted already).
                let _ = session.abort_transaction().await;
                match err {
                    TxError::Abort(e) => return Err(RunError::Abort(e)),
                    TxError::Driver(e) => {
                        let class = classify(&e);
                        match should_retry(class, Phase::Body, started.elapsed()) {
                            Retry::Transaction => {
                                tracing::debug!(attempt, error = %e, "retrying transaction");
                                tokio::time::sleep(backoff(attempt, jitter())).await;
                                continue 'transaction;
                            }
                            Retry::Commit | Retry::No => return Err(RunError::Failed(class, e)),
                        }
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
                        Retry::Commit => {
                            tracing::debug!(error = %e, "retrying commit");
                        }
                        Retry::Transaction => {
                            tracing::debug!(attempt, error = %e, "retrying transaction");
                            tokio::time::sleep(backoff(attempt, jitter())).await;
                            continue 'transaction;
                        }
                        Retry::No => return Err(RunError::Failed(class, e)),
                    }
                }
            }
        }
    }
}
