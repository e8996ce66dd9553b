//! The transaction runner: the driver's documented retry loop, with the decisions taken by the
//! pure functions of [`super::errors`].

use std::time::Instant;

use futures::future::BoxFuture;
use mongodb::options::{Acknowledgment, ReadConcern, TransactionOptions, WriteConcern};
use mongodb::ClientSession;

use super::errors::{backoff, classify, jitter, should_retry, ErrorClass, Phase, Retry};
use crate::StoreError;

/// Why a transaction body stopped.
pub(crate) enum TxError {
    /// A driver error: classified, maybe retried.
    Driver(mongodb::error::Error),
    /// A decision of the body (for example a version conflict): abort and return it.
    Abort(StoreError),
}

impl From<mongodb::error::Error> for TxError {
    fn from(e: mongodb::error::Error) -> Self {
        TxError::Driver(e)
    }
}

/// Why [`run`] failed.
pub(crate) enum RunError {
    /// The body aborted with this error.
    Abort(StoreError),
    /// A driver error that is not (or no longer) retried, with its class.
    Failed(ErrorClass, mongodb::error::Error),
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

/// Runs `body` in a transaction on `session` and commits it, retrying as the driver documents:
/// the whole transaction on `TransientTransactionError` (after a jittered backoff), the commit
/// alone on `UnknownTransactionCommitResult`, for at most
/// [`MAX_RETRY_TIME`](super::errors::MAX_RETRY_TIME).
///
/// `ctx` is handed to every attempt (the driver's `and_run` pattern: borrowing captured values
/// through the context keeps the future's lifetime tied to the session's).
pub(crate) async fn run<C, T, F>(
    session: &mut ClientSession,
    mut ctx: C,
    mut body: F,
) -> Result<T, RunError>
where
    F: for<'s> FnMut(&'s mut ClientSession, &'s mut C) -> BoxFuture<'s, Result<T, TxError>>,
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
