//! Read-model transactions: the shared runner of `tektree_mongo`
//! ([`run_transaction`], the driver's documented retry loop) with its failures reported as
//! [`ReadModelError`]s that name the operation.

use futures::future::BoxFuture;
use mongodb::ClientSession;
use tektree_mongo::{run_transaction, ErrorClass, RunError};
use tracing::Instrument;

use crate::ReadModelError;

/// Why a read-model transaction body stopped.
pub(crate) type TxError = tektree_mongo::TxError<ReadModelError>;

/// The error for a driver error of class `class` that ended the transaction `what`.
fn failed(what: &str, class: ErrorClass, e: &mongodb::error::Error) -> ReadModelError {
    let note = if class == ErrorClass::UnknownCommitResult {
        " (commit result unknown)"
    } else {
        ""
    };
    ReadModelError::Backend(format!("{what}{note}: {e}"))
}

/// Runs `body` in a transaction and commits it, retrying as the driver documents (see
/// [`run_transaction`]). `what` names the operation in errors and in the retry log (a span).
pub(crate) async fn run<C, T, F>(
    session: &mut ClientSession,
    what: &str,
    ctx: C,
    body: F,
) -> Result<T, ReadModelError>
where
    F: for<'s> FnMut(&'s mut ClientSession, &'s mut C) -> BoxFuture<'s, Result<T, TxError>>,
{
    run_transaction(session, ctx, body)
        .instrument(tracing::debug_span!("read-model transaction", what))
        .await
        .map_err(|err| match err {
            RunError::Abort(e) => e,
            RunError::Failed(class, e) => failed(what, class, &e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::error::{Error, ErrorKind};

    #[test]
    fn failures_name_the_operation_and_an_unknown_commit_result() {
        let e = Error::from(ErrorKind::Shutdown);
        let msg = |class| match failed("apply read-model batch", class, &e) {
            ReadModelError::Backend(m) => m,
            other => panic!("{other:?}"),
        };
        assert!(
            msg(ErrorClass::UnknownCommitResult)
                .starts_with("apply read-model batch (commit result unknown): "),
            "{}",
            msg(ErrorClass::UnknownCommitResult)
        );
        assert!(
            msg(ErrorClass::Backend).starts_with("apply read-model batch: "),
            "{}",
            msg(ErrorClass::Backend)
        );
    }
}
