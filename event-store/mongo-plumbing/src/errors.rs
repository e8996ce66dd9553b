//! Classification of driver errors and the transaction retry policy, as plain functions.
//!
//! Shared by every MongoDB adapter of the workspace: the event store
//! (`tektree_event_store::mongo::MongoStore`) and the read-model store of `tektree-projections`
//! use these functions and the runner [`run_transaction`](crate::run_transaction) built on them.
//!
//! The decision is a pure function of what the server reported — the error **code**, the error
//! **labels** and, for duplicate keys, the **message** naming the index — so it is unit-tested
//! without a server ([`classify_parts`], [`should_retry`], [`backoff`]); [`classify`] only
//! extracts those parts from a [`mongodb::error::Error`].
//!
//! The policy is the one the driver documents for transactions (and implements in its
//! convenient `and_run` API): retry the **whole transaction** when an error carries the
//! `TransientTransactionError` label, retry **only the commit** when it carries
//! `UnknownTransactionCommitResult` (unless the code is `MaxTimeMSExpired`), give up after
//! [`MAX_RETRY_TIME`], and back off with jitter between whole-transaction attempts.

use std::time::Duration;

use mongodb::error::{
    Error, ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT,
};

/// The name of the one unique index whose duplicate key is an optimistic-concurrency conflict
/// ([`ErrorClass::Conflict`]): the event store's per-aggregate sequence index
/// (`tektree_event_store::mongo::SEQUENCE_INDEX` is this constant). No read-model collection
/// has an index of this name.
pub const CONFLICT_INDEX: &str = "aggregate_sequence";

/// Server error code of a duplicate key on a unique index.
pub const DUPLICATE_KEY: i32 = 11000;

/// Server error code `MaxTimeMSExpired`: a commit that timed out is not retried.
pub const MAX_TIME_MS_EXPIRED: i32 = 50;

/// How long a transaction (with all its retries) is retried before giving up; the driver's
/// convenient transaction API uses the same limit.
pub const MAX_RETRY_TIME: Duration = Duration::from_secs(120);

/// What a driver error means for a transaction.
///
/// [`ErrorClass::Conflict`] is specific to the event store's [`CONFLICT_INDEX`]; other
/// stores (the read models) have no index of that name, so for them a duplicate key is
/// [`ErrorClass::Backend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Duplicate key on the unique `(aggregate_type, aggregate_id, sequence)` index: another
    /// writer appended the same sequence first (optimistic concurrency conflict).
    Conflict,
    /// Labelled `TransientTransactionError`: the transaction was aborted (write conflict,
    /// failover, network error before commit); the whole transaction can be retried.
    TransientTransaction,
    /// Labelled `UnknownTransactionCommitResult`: the commit may or may not have been applied;
    /// the commit (only) can be retried.
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
    /// Run `commitTransaction` again (immediately).
    Commit,
    /// Give up and report the error.
    No,
}

/// Classifies an error from its server code, labels and message (the message is only used to
/// tell which unique index a duplicate key hit).
///
/// Order: `UnknownTransactionCommitResult` (except with code [`MAX_TIME_MS_EXPIRED`]) before
/// `TransientTransactionError` before a duplicate key on [`CONFLICT_INDEX`].
pub fn classify_parts(code: Option<i32>, labels: &[&str], message: &str) -> ErrorClass {
    if labels.contains(&UNKNOWN_TRANSACTION_COMMIT_RESULT) && code != Some(MAX_TIME_MS_EXPIRED) {
        return ErrorClass::UnknownCommitResult;
    }
    if labels.contains(&TRANSIENT_TRANSACTION_ERROR) {
        return ErrorClass::TransientTransaction;
    }
    if code == Some(DUPLICATE_KEY) && names_index(message, CONFLICT_INDEX) {
        return ErrorClass::Conflict;
    }
    ErrorClass::Backend
}

/// Whether a duplicate-key message (`E11000 duplicate key error collection: db.events index:
/// NAME dup key: …`) names index `index`.
fn names_index(message: &str, index: &str) -> bool {
    message
        .split("index: ")
        .skip(1)
        .any(|rest| rest.split_whitespace().next() == Some(index))
}

/// The server code and message of `e` (the first write error of an `insert_many`), looking
/// through wrapped source errors.
pub fn code_and_message(e: &Error) -> (Option<i32>, String) {
    let own = match e.kind.as_ref() {
        ErrorKind::Command(c) => Some((c.code, c.message.clone())),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some((w.code, w.message.clone())),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some((w.code, w.message.clone())),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .map(|w| (w.code, w.message.clone()))
            .or_else(|| {
                m.write_concern_error
                    .as_ref()
                    .map(|w| (w.code, w.message.clone()))
            }),
        _ => None,
    };
    if let Some((code, message)) = own {
        return (Some(code), message);
    }
    match std::error::Error::source(e).and_then(|s| s.downcast_ref::<Error>()) {
        Some(inner) => code_and_message(inner),
        None => (None, e.to_string()),
    }
}

/// The server code of `e`, if it has one (looking through wrapped source errors): the code part
/// of [`code_and_message`].
pub fn code(e: &Error) -> Option<i32> {
    code_and_message(e).0
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
    let (code, message) = code_and_message(e);
    classify_parts(code, &labels, &message)
}

/// The retry decision for an error of class `class` in `phase`, `elapsed` after the first
/// attempt started.
///
/// - `TransientTransactionError` → [`Retry::Transaction`] (in the body and at commit);
/// - `UnknownTransactionCommitResult` at commit → [`Retry::Commit`] (in the body the label
///   cannot occur; it is treated as not retryable);
/// - everything else, or after [`MAX_RETRY_TIME`] → [`Retry::No`].
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

/// Pause before whole-transaction attempt `attempt + 1` (`attempt` ≥ 1 attempts failed), with
/// `jitter` in `[0, 1)`: `jitter × min(5 ms × 1.5^attempt, 500 ms)`, the driver's formula.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let exp = 5.0 * 1.5f64.powi(attempt.min(64) as i32);
    Duration::from_secs_f64(jitter * exp.min(500.0) / 1000.0)
}

/// A jitter value in `[0, 1)` (from a random UUID's bits; no extra dependency).
pub fn jitter() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64 >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;
    use mongodb::error::{CommandError, WriteError};

    const T: &str = TRANSIENT_TRANSACTION_ERROR;
    const U: &str = UNKNOWN_TRANSACTION_COMMIT_RESULT;

    fn dup(index: &str) -> String {
        format!(
            "E11000 duplicate key error collection: tektree.events index: {index} dup key: \
             {{ aggregate_type: \"user\", aggregate_id: UUID(\"…\"), sequence: 3 }}"
        )
    }

    #[test]
    fn labels_and_codes_classify_in_the_documented_order() {
        let cases: &[(Option<i32>, &[&str], String, ErrorClass)] = &[
            (
                Some(112),
                &[T],
                "WriteConflict".into(),
                ErrorClass::TransientTransaction,
            ),
            (
                Some(251),
                &[T],
                "NoSuchTransaction".into(),
                ErrorClass::TransientTransaction,
            ),
            (
                None,
                &[T],
                "connection reset".into(),
                ErrorClass::TransientTransaction,
            ),
            (
                Some(91),
                &[U],
                "shutting down".into(),
                ErrorClass::UnknownCommitResult,
            ),
            (
                Some(64),
                &[U, T],
                "wc timeout".into(),
                ErrorClass::UnknownCommitResult,
            ),
            (
                Some(64),
                &[T, U],
                "wc timeout".into(),
                ErrorClass::UnknownCommitResult,
            ),
            // MaxTimeMSExpired with the unknown-commit label is not retried (driver rule).
            (
                Some(MAX_TIME_MS_EXPIRED),
                &[U],
                "timeout".into(),
                ErrorClass::Backend,
            ),
            (
                Some(DUPLICATE_KEY),
                &[],
                dup("aggregate_sequence"),
                ErrorClass::Conflict,
            ),
            (Some(DUPLICATE_KEY), &[], dup("_id_"), ErrorClass::Backend),
            // Without a message naming the sequence index (as in the read-model store, whose
            // collections have no such index) a duplicate key is not a conflict.
            (Some(DUPLICATE_KEY), &[], String::new(), ErrorClass::Backend),
            (
                Some(DUPLICATE_KEY),
                &[],
                "E11000 duplicate key error collection: tektree.rm_quota index: user_period \
                 dup key: { user_id: UUID(\"…\"), period: \"2024-05\" }"
                    .into(),
                ErrorClass::Backend,
            ),
            (
                Some(DUPLICATE_KEY),
                &[],
                dup("aggregate_sequence_old"),
                ErrorClass::Backend,
            ),
            (
                Some(DUPLICATE_KEY),
                &[T],
                dup("aggregate_sequence"),
                ErrorClass::TransientTransaction,
            ),
            (Some(2), &[], "BadValue".into(), ErrorClass::Backend),
            (
                None,
                &[],
                "server selection timeout".into(),
                ErrorClass::Backend,
            ),
        ];
        for (code, labels, message, want) in cases {
            assert_eq!(
                classify_parts(*code, labels, message),
                *want,
                "{code:?} {labels:?} {message}"
            );
        }
    }

    #[test]
    fn retry_decisions_follow_the_driver_transaction_rules() {
        use ErrorClass::*;
        let t = Duration::from_secs(1);
        assert_eq!(
            should_retry(TransientTransaction, Phase::Body, t),
            Retry::Transaction
        );
        assert_eq!(
            should_retry(TransientTransaction, Phase::Commit, t),
            Retry::Transaction
        );
        assert_eq!(
            should_retry(UnknownCommitResult, Phase::Commit, t),
            Retry::Commit
        );
        assert_eq!(should_retry(UnknownCommitResult, Phase::Body, t), Retry::No);
        assert_eq!(should_retry(Conflict, Phase::Body, t), Retry::No);
        assert_eq!(should_retry(Backend, Phase::Commit, t), Retry::No);
        assert_eq!(should_retry(Backend, Phase::Body, t), Retry::No);
        let late = MAX_RETRY_TIME;
        assert_eq!(
            should_retry(TransientTransaction, Phase::Body, late),
            Retry::No
        );
        assert_eq!(
            should_retry(UnknownCommitResult, Phase::Commit, late),
            Retry::No
        );
    }

    #[test]
    fn backoff_grows_and_is_capped_and_jittered() {
        assert_eq!(backoff(1, 0.0), Duration::ZERO);
        assert_eq!(backoff(1, 1.0), Duration::from_secs_f64(0.0075));
        assert!(backoff(2, 1.0) > backoff(1, 1.0));
        assert_eq!(backoff(30, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(40, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(5, 0.0), Duration::ZERO);
        assert_eq!(backoff(u32::MAX, 0.5), Duration::from_millis(250));
        assert_eq!(backoff(3, f64::NAN), Duration::ZERO);
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn constructed_driver_errors_are_classified_by_code_and_index() {
        // The driver's error structs are non-exhaustive but deserializable: build them the way
        // the driver does, from the server's reply documents.
        let write: WriteError = mongodb::bson::from_document(doc! {
            "code": DUPLICATE_KEY, "errmsg": dup("aggregate_sequence"),
        })
        .unwrap();
        let e = Error::from(ErrorKind::Write(WriteFailure::WriteError(write)));
        assert_eq!(classify(&e), ErrorClass::Conflict);
        assert_eq!(code_and_message(&e).0, Some(DUPLICATE_KEY));

        let write: WriteError = mongodb::bson::from_document(doc! {
            "code": DUPLICATE_KEY, "errmsg": dup("_id_"),
        })
        .unwrap();
        let e = Error::from(ErrorKind::Write(WriteFailure::WriteError(write)));
        assert_eq!(classify(&e), ErrorClass::Backend);

        let many: mongodb::error::InsertManyError = mongodb::bson::from_document(doc! {
            "writeErrors": [{ "index": 1, "code": DUPLICATE_KEY, "errmsg": dup("aggregate_sequence") }],
        })
        .unwrap();
        let e = Error::from(ErrorKind::InsertMany(many));
        assert_eq!(classify(&e), ErrorClass::Conflict);

        // A command error without labels (as outside a transaction) is not retried here.
        let cmd: CommandError = mongodb::bson::from_document(doc! {
            "code": 112, "codeName": "WriteConflict", "errmsg": "write conflict",
        })
        .unwrap();
        let e = Error::from(ErrorKind::Command(cmd));
        assert_eq!(
            code_and_message(&e),
            (Some(112), "write conflict".to_string())
        );
        assert_eq!(code(&e), Some(112));
        assert_eq!(classify(&e), ErrorClass::Backend);
        // The same without `codeName` (as the read-model store's test built it).
        let cmd: CommandError =
            mongodb::bson::from_document(doc! { "code": 112, "errmsg": "write conflict" }).unwrap();
        let e = Error::from(ErrorKind::Command(cmd));
        assert_eq!(code(&e), Some(112));
        assert_eq!(classify(&e), ErrorClass::Backend);

        let e = Error::from(ErrorKind::Shutdown);
        assert_eq!(code_and_message(&e).0, None);
        assert_eq!(code(&e), None);
        assert_eq!(classify(&e), ErrorClass::Backend);
    }
}
