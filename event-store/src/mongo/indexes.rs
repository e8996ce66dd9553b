//! Index specifications and the replica-set check, as plain functions.

use mongodb::bson::{doc, Bson, Document};
use mongodb::options::IndexOptions;
use mongodb::IndexModel;

/// Name of the unique `(aggregate_type, aggregate_id, sequence)` index of `events`. A duplicate
/// key on it is an optimistic-concurrency conflict.
pub const SEQUENCE_INDEX: &str = "aggregate_sequence";
/// Name of the unique, partial `position` index of `events` (sequenced events only).
pub const POSITION_INDEX: &str = "position";
/// Name of the partial `pending` index of `events` (unsequenced events only).
pub const PENDING_INDEX: &str = "pending";
/// Name of the `(published, position)` index of `outbox`.
pub const OUTBOX_INDEX: &str = "published_position";

/// An index on `keys` named `name`, unique if `unique`, partial on `partial` if given (the
/// builder every adapter of the workspace uses for its index specifications).
pub fn index_model(
    keys: Document,
    name: &str,
    unique: bool,
    partial: Option<Document>,
) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            IndexOptions::builder()
                .name(name.to_string())
                .unique(unique.then_some(true))
                .partial_filter_expression(partial)
                .build(),
        )
        .build()
}

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

/// The deployment kind a `hello` reply describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deployment {
    /// A replica-set member (`setName` present).
    ReplicaSet {
        /// The replica set's name.
        name: String,
    },
    /// A `mongos` router of a sharded cluster (`msg: "isdbgrid"`).
    Sharded,
}

/// The lowest wire version accepted: 13, MongoDB 5.0, the first to store field names that start
/// with `$` or contain `.` (event payloads and read-model JSON may hold such keys; 4.4 and older
/// refuse them on insert). Source: MongoDB 5.0 release notes, "Field names with periods and
/// dollar signs"; wire versions per the driver specifications' `hello` command table.
pub const MIN_WIRE_VERSION: i32 = 13;

/// Checks a `hello` (or legacy `isMaster`) reply: transactions need a replica set (or a sharded
/// cluster), and payload keys need MongoDB 5.0 or later ([`MIN_WIRE_VERSION`], checked when the
/// reply carries `maxWireVersion`).
///
/// # Errors
/// A message naming what to do:
/// - a replica-set member whose set is not initiated yet (`isreplicaset: true`, no `setName`:
///   mongod started with `--replSet` before `rs.initiate()`);
/// - a standalone server (neither `setName` nor `msg: "isdbgrid"`);
/// - a server older than MongoDB 5.0.
pub fn check_deployment(hello: &Document) -> Result<Deployment, String> {
    let wire = match hello.get("maxWireVersion") {
        Some(Bson::Int32(v)) => Some(i64::from(*v)),
        Some(Bson::Int64(v)) => Some(*v),
        _ => None,
    };
    if let Some(w) = wire.filter(|w| *w < i64::from(MIN_WIRE_VERSION)) {
        return Err(format!(
            "the MongoDB server speaks wire version {w}; TekTree needs MongoDB 5.0 or later \
             (wire version {MIN_WIRE_VERSION}), because event payloads may hold field names that \
             start with `$` or contain `.`, which older servers refuse"
        ));
    }
    if let Some(Bson::String(name)) = hello.get("setName") {
        return Ok(Deployment::ReplicaSet { name: name.clone() });
    }
    if matches!(hello.get("msg"), Some(Bson::String(m)) if m == "isdbgrid") {
        return Ok(Deployment::Sharded);
    }
    if hello.get_bool("isreplicaset").unwrap_or(false) {
        return Err(
            "the MongoDB server was started as a replica-set member but its replica set is not \
             initiated (its hello reply says isreplicaset without a setName): run \
             rs.initiate() once in mongosh (see docs/mongodb.md), then start TekTree again"
                .to_string(),
        );
    }
    Err(
        "the MongoDB server is a standalone server (its hello reply has no setName): \
         TekTree needs a replica set, because appends and read-model updates are multi-document \
         transactions. Start mongod with --replSet rs0 and run rs.initiate() once (a one-node \
         replica set is enough; see docs/mongodb.md)"
            .to_string(),
    )
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

    #[test]
    fn standalone_servers_are_refused_with_the_replica_set_requirement() {
        assert_eq!(
            check_deployment(&doc! { "isWritablePrimary": true, "setName": "rs0" }),
            Ok(Deployment::ReplicaSet { name: "rs0".into() })
        );
        assert_eq!(
            check_deployment(&doc! { "ismaster": true, "msg": "isdbgrid" }),
            Ok(Deployment::Sharded)
        );
        let err = check_deployment(&doc! { "isWritablePrimary": true, "maxWireVersion": 21 })
            .unwrap_err();
        assert!(err.contains("standalone"), "{err}");
        assert!(err.contains("replica set"), "{err}");
        assert!(err.contains("--replSet"), "{err}");
        // The minimal replies (as the read-model store's checks used).
        assert!(check_deployment(&doc! { "setName": "rs0" }).is_ok());
        assert!(check_deployment(&doc! { "msg": "isdbgrid" }).is_ok());
        let err = check_deployment(&doc! { "isWritablePrimary": true }).unwrap_err();
        assert!(
            err.contains("standalone") && err.contains("replica set"),
            "{err}"
        );
    }

    #[test]
    fn an_uninitiated_replica_set_and_old_servers_are_named() {
        // mongod 7 started with --replSet before rs.initiate() (its hello reply's shape).
        let err = check_deployment(&doc! {
            "isWritablePrimary": false, "secondary": false, "isreplicaset": true,
            "info": "Does not have a valid replica set config", "maxWireVersion": 21,
        })
        .unwrap_err();
        assert!(
            err.contains("not initiated") && err.contains("rs.initiate()"),
            "{err}"
        );
        // MongoDB 4.4 (wire version 9) is refused for `$`/dotted field names; 5.0 (13) passes.
        let err = check_deployment(&doc! { "setName": "rs0", "maxWireVersion": 9 }).unwrap_err();
        assert!(
            err.contains("wire version 9") && err.contains("5.0"),
            "{err}"
        );
        assert!(check_deployment(&doc! { "setName": "rs0", "maxWireVersion": 13 }).is_ok());
        assert!(check_deployment(&doc! { "setName": "rs0", "maxWireVersion": 25_i64 }).is_ok());
    }
}
