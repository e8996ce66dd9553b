//! What a MongoDB deployment must be for TekTree: a replica set (or sharded cluster) of
//! MongoDB 5.0 or later, read off its `hello` reply.

use mongodb::bson::{Bson, Document};

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

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

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
