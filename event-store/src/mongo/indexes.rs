//! Index specifications and the replica-set check, as plain functions.

use mongodb::bson::{doc, Document};
use mongodb::IndexModel;
use tektree_mongo::index_model;

/// Name of the unique `(aggregate_type, aggregate_id, sequence)` index of `events`. A duplicate
/// key on it is an optimistic-concurrency conflict.
/// (It is [`tektree_mongo::CONFLICT_INDEX`], the name the error classification looks for.)
pub const SEQUENCE_INDEX: &str = tektree_mongo::CONFLICT_INDEX;
/// Name of the unique, partial `position` index of `events` (sequenced events only).
pub const POSITION_INDEX: &str = "position";
/// Name of the partial `pending` index of `events` (unsequenced events only).
pub const PENDING_INDEX: &str = "pending";
/// Name of the `(published, position)` index of `outbox`.
pub const OUTBOX_INDEX: &str = "published_position";

/// The indexes of the `events` collection (besides `_id`, which is the `event_id` and hence
/// unique):
///
/// - [`SEQUENCE_INDEX`]: unique `{aggregate_type: 1, aggregate_id: 1, sequence: 1}` — serves
///   `load` and the version check, and makes a second writer of the same sequence fail;
/// - [`POSITION_INDEX`]: unique `{position: 1}`, partial on `position > 0` (only sequenced
///   events have a position) — serves `read_all`, `head` checks and the outbox join, and makes
///   a doubly assigned position impossible;
/// - [`PENDING_INDEX`]: `{pending: 1}`, partial on `pending` existing — the sequencer's queue
///   of committed but unsequenced events, kept tiny because sequencing removes `pending`.
pub fn event_indexes() -> Vec<IndexModel> {
    vec![
        index_model(
            doc! { "aggregate_type": 1, "aggregate_id": 1, "sequence": 1 },
            SEQUENCE_INDEX,
            true,
            None,
        ),
        index_model(
            doc! { "position": 1 },
            POSITION_INDEX,
            true,
            Some(doc! { "position": { "$gt": 0_i64 } }),
        ),
        index_model(
            doc! { "pending": 1 },
            PENDING_INDEX,
            false,
            Some(doc! { "pending": { "$exists": true } }),
        ),
    ]
}

/// The indexes of the `outbox` collection (`_id` is the `event_id`):
/// [`OUTBOX_INDEX`] `{published: 1, position: 1}` — `outbox_pending` reads unpublished records
/// in position order and `outbox_backlog` counts them from this index alone.
pub fn outbox_indexes() -> Vec<IndexModel> {
    vec![index_model(
        doc! { "published": 1, "position": 1 },
        OUTBOX_INDEX,
        false,
        None,
    )]
}

/// The event-store collections whose order guarantees need one shard: positions are assigned by
/// the position log's unique `_id` and read back by ranges of the `events` and `outbox`
/// position indexes; sharded, a unique index no longer spans the collection and a range read
/// merges shards, so `read_all` could see positions out of order.
pub const UNSHARDED: [&str; 3] = ["events", "outbox", "position_log"];

/// Checks, for a sharded cluster, that none of [`UNSHARDED`] in database `db` is sharded, from
/// the documents of `config.collections` (each `{_id: "<db>.<collection>", dropped?: bool}`).
///
/// # Errors
/// A message naming the sharded collections and the requirement.
pub fn check_unsharded(db: &str, config_collections: &[Document]) -> Result<(), String> {
    let sharded: Vec<&str> = UNSHARDED
        .iter()
        .copied()
        .filter(|c| {
            let ns = format!("{db}.{c}");
            config_collections.iter().any(|d| {
                d.get_str("_id").is_ok_and(|id| id == ns) && !d.get_bool("dropped").unwrap_or(false)
            })
        })
        .collect();
    if sharded.is_empty() {
        return Ok(());
    }
    Err(format!(
        "collections {sharded:?} of database {db} are sharded: the event store needs events, \
         outbox and position_log unsharded (on the primary shard), because positions must never \
         appear out of order in read_all; unshard them (or use another database) — read models \
         may be sharded (see docs/mongodb.md)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_event_collections_are_refused_by_name() {
        let d = |id: &str, dropped: bool| doc! { "_id": id, "dropped": dropped };
        assert!(check_unsharded("tt", &[]).is_ok());
        // Other databases, read models, and dropped entries do not count.
        let fine = [
            d("other.events", false),
            d("tt.rm_xp", false),
            d("tt.events", true),
        ];
        assert!(check_unsharded("tt", &fine).is_ok());
        let err = check_unsharded("tt", &[d("tt.position_log", false), d("tt.outbox", false)])
            .unwrap_err();
        assert!(err.contains(r#"["outbox", "position_log"]"#), "{err}");
        assert!(err.contains("database tt"), "{err}");
    }

    fn spec(models: &[IndexModel], name: &str) -> (Document, bool, Option<Document>) {
        let m = models
            .iter()
            .find(|m| m.options.as_ref().and_then(|o| o.name.as_deref()) == Some(name))
            .unwrap_or_else(|| panic!("no index {name}"));
        let o = m.options.clone().unwrap();
        (
            m.keys.clone(),
            o.unique == Some(true),
            o.partial_filter_expression,
        )
    }

    #[test]
    fn event_indexes_are_the_documented_ones() {
        let models = event_indexes();
        assert_eq!(models.len(), 3);
        let (keys, unique, partial) = spec(&models, SEQUENCE_INDEX);
        assert_eq!(
            keys,
            doc! { "aggregate_type": 1, "aggregate_id": 1, "sequence": 1 }
        );
        assert!(unique);
        assert_eq!(partial, None);
        // Key order matters for a compound index.
        let order: Vec<&String> = keys.keys().collect();
        assert_eq!(order, ["aggregate_type", "aggregate_id", "sequence"]);
        let (keys, unique, partial) = spec(&models, POSITION_INDEX);
        assert_eq!(keys, doc! { "position": 1 });
        assert!(unique);
        assert_eq!(partial, Some(doc! { "position": { "$gt": 0_i64 } }));
        let (keys, unique, partial) = spec(&models, PENDING_INDEX);
        assert_eq!(keys, doc! { "pending": 1 });
        assert!(!unique);
        assert_eq!(partial, Some(doc! { "pending": { "$exists": true } }));
    }

    #[test]
    fn outbox_index_serves_pending_in_position_order() {
        let models = outbox_indexes();
        assert_eq!(models.len(), 1);
        let (keys, unique, partial) = spec(&models, OUTBOX_INDEX);
        let order: Vec<&String> = keys.keys().collect();
        assert_eq!(order, ["published", "position"]);
        assert!(!unique);
        assert_eq!(partial, None);
    }
}
