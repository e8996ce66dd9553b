//! Aggregate snapshots in MongoDB: the `snapshots` collection, its unique key index, the BSON
//! mapping of [`StoredSnapshot`] and the filter of the no-backwards upsert, as plain functions.
//!
//! One document per aggregate: `{_id: ObjectId, aggregate_type, aggregate_id (UUID binary),
//! version (int64), snapshot_version (int64), state (string: compact JSON), taken_at (string,
//! RFC 3339 with nine fractional digits, as the events' timestamps)}`.
//!
//! `state` is stored as JSON **text**, not as a BSON document: the store never queries inside
//! it, and text keeps every state exact and storable whatever its keys (`$`-prefixed or dotted
//! keys are awkward in update operators, NUL is not representable) and numbers (no
//! int64/decimal128/double mapping). The SQLite adapter stores the same text.
//!
//! A save is one `updateOne` with `upsert: true` whose filter is the aggregate's key **and**
//! the rule of [`StoredSnapshot::replaces`] ([`snapshot_save_filter`]). When a stored document
//! does not satisfy the rule, the filter matches nothing, the upsert tries to insert a second
//! document for the aggregate and the unique index [`SNAPSHOT_KEY_INDEX`] refuses it
//! (duplicate key): the stored snapshot is kept. The same duplicate key is what a concurrent
//! first save of the aggregate sees; the adapter retries once, which then updates or keeps.

use mongodb::bson::{doc, Bson, Document};
use mongodb::IndexModel;

use super::mapping::{
    get_u64, timestamp_from_bson, timestamp_to_bson, uuid_from_bson, uuid_to_bson, MappingError,
};
use crate::StoredSnapshot;
use tektree_mongo::index_model;

/// The snapshots collection.
pub const SNAPSHOTS: &str = "snapshots";
/// Name of the unique `(aggregate_type, aggregate_id)` index of `snapshots`.
pub const SNAPSHOT_KEY_INDEX: &str = "aggregate_key";

/// The indexes of the `snapshots` collection: [`SNAPSHOT_KEY_INDEX`], unique
/// `{aggregate_type: 1, aggregate_id: 1}` — serves `load_snapshot` and the save's filter, and
/// makes a second document for one aggregate impossible (which is what keeps a save from moving
/// a snapshot backwards, see the module docs).
pub fn snapshot_indexes() -> Vec<IndexModel> {
    vec![index_model(
        doc! { "aggregate_type": 1, "aggregate_id": 1 },
        SNAPSHOT_KEY_INDEX,
        true,
        None,
    )]
}

/// The filter selecting the snapshot of `aggregate_type`/`aggregate_id`.
pub fn snapshot_key_filter(aggregate_type: &str, aggregate_id: uuid::Uuid) -> Document {
    doc! { "aggregate_type": aggregate_type, "aggregate_id": uuid_to_bson(aggregate_id) }
}

fn int64(field: &str, v: u64) -> Result<Bson, MappingError> {
    i64::try_from(v)
        .map(Bson::Int64)
        .map_err(|_| MappingError::new(field, format!("{v} exceeds i64::MAX")))
}

/// The document of `snapshot` (without `_id`, which the server assigns on insert).
///
/// # Errors
/// [`MappingError`] when `version` exceeds `i64::MAX` or `taken_at` is outside the years
/// 0000–9999.
pub fn snapshot_to_document(snapshot: &StoredSnapshot) -> Result<Document, MappingError> {
    Ok(doc! {
        "aggregate_type": &snapshot.aggregate_type,
        "aggregate_id": uuid_to_bson(snapshot.aggregate_id),
        "version": int64("version", snapshot.version)?,
        "snapshot_version": i64::from(snapshot.snapshot_version),
        "state": snapshot.state.to_string(),
        "taken_at": timestamp_to_bson("taken_at", &snapshot.taken_at)?,
    })
}

/// The snapshot a [`snapshot_to_document`] document holds (exact round trip).
///
/// # Errors
/// [`MappingError`] naming the first missing or malformed field.
pub fn snapshot_from_document(doc: &Document) -> Result<StoredSnapshot, MappingError> {
    let field = |name: &str| {
        doc.get(name)
            .ok_or_else(|| MappingError::new(name, "missing"))
    };
    let snapshot_version = get_u64(doc, "snapshot_version")?;
    let state = doc
        .get_str("state")
        .map_err(|_| MappingError::new("state", "missing or not a string"))?;
    Ok(StoredSnapshot {
        aggregate_type: doc
            .get_str("aggregate_type")
            .map_err(|_| MappingError::new("aggregate_type", "missing or not a string"))?
            .to_string(),
        aggregate_id: uuid_from_bson("aggregate_id", field("aggregate_id")?)?,
        version: get_u64(doc, "version")?,
        snapshot_version: u32::try_from(snapshot_version).map_err(|_| {
            MappingError::new(
                "snapshot_version",
                format!("{snapshot_version} exceeds u32"),
            )
        })?,
        state: serde_json::from_str(state)
            .map_err(|e| MappingError::new("state", format!("not JSON: {e}")))?,
        taken_at: timestamp_from_bson("taken_at", field("taken_at")?)?,
    })
}

/// The filter of the save's upsert: the aggregate's key and the rule of
/// [`StoredSnapshot::replaces`] — a stored document matches when its `snapshot_version`
/// differs from `snapshot`'s or its `version` is not above `snapshot`'s.
///
/// # Errors
/// [`MappingError`] when `version` exceeds `i64::MAX`.
pub fn snapshot_save_filter(snapshot: &StoredSnapshot) -> Result<Document, MappingError> {
    let mut filter = snapshot_key_filter(&snapshot.aggregate_type, snapshot.aggregate_id);
    filter.insert(
        "$or",
        vec![
            doc! { "snapshot_version": { "$ne": i64::from(snapshot.snapshot_version) } },
            doc! { "version": { "$lte": int64("version", snapshot.version)? } },
        ],
    );
    Ok(filter)
}

/// The update of the save's upsert: `$set` of every field of [`snapshot_to_document`].
///
/// # Errors
/// As [`snapshot_to_document`].
pub fn snapshot_update(snapshot: &StoredSnapshot) -> Result<Document, MappingError> {
    Ok(doc! { "$set": snapshot_to_document(snapshot)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use serde_json::json;
    use uuid::Uuid;

    fn snapshot(version: u64, snapshot_version: u32) -> StoredSnapshot {
        StoredSnapshot {
            aggregate_type: "profile".into(),
            aggregate_id: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
            version,
            snapshot_version,
            state: json!({
                "xp": 75,
                "awarded": ["b9a7c1de-0000-4000-8000-000000000001"],
                "$odd.key": "Zoë \"🌳\"",
                "big": u64::MAX,
                "nested": { "a": [1, 2.5, null, true] },
            }),
            taken_at: DateTime::parse_from_rfc3339("2024-05-06T07:08:09.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn snapshots_round_trip_exactly_through_bson_bytes() {
        let s = snapshot(20, 3);
        let doc = snapshot_to_document(&s).unwrap();
        assert!(!doc.contains_key("_id"));
        assert!(matches!(doc.get("state"), Some(Bson::String(_))));
        assert!(matches!(doc.get("version"), Some(Bson::Int64(20))));
        let bytes = mongodb::bson::to_vec(&doc).unwrap();
        let back: Document = mongodb::bson::from_slice(&bytes).unwrap();
        assert_eq!(snapshot_from_document(&back).unwrap(), s);
    }

    #[test]
    fn unrepresentable_and_malformed_snapshots_name_the_field() {
        let err = snapshot_to_document(&snapshot(u64::MAX, 1)).unwrap_err();
        assert_eq!(err.field, "version");
        assert_eq!(
            snapshot_save_filter(&snapshot(u64::MAX, 1))
                .unwrap_err()
                .field,
            "version"
        );
        let mut doc = snapshot_to_document(&snapshot(5, 1)).unwrap();
        doc.insert("state", "{not json");
        assert_eq!(snapshot_from_document(&doc).unwrap_err().field, "state");
        doc.insert("snapshot_version", i64::from(u32::MAX) + 1);
        assert_eq!(
            snapshot_from_document(&doc).unwrap_err().field,
            "snapshot_version"
        );
        doc.remove("taken_at");
        doc.insert("snapshot_version", 1_i64);
        doc.insert("state", "{}");
        assert_eq!(snapshot_from_document(&doc).unwrap_err().field, "taken_at");
    }

    #[test]
    fn the_key_index_is_unique_on_type_then_id() {
        let models = snapshot_indexes();
        assert_eq!(models.len(), 1);
        let m = &models[0];
        let order: Vec<&String> = m.keys.keys().collect();
        assert_eq!(order, ["aggregate_type", "aggregate_id"]);
        let o = m.options.as_ref().unwrap();
        assert_eq!(o.name.as_deref(), Some(SNAPSHOT_KEY_INDEX));
        assert_eq!(o.unique, Some(true));
        assert_eq!(o.partial_filter_expression, None);
        // The key filter is an equality on exactly the index's fields, in its order.
        let key = snapshot_key_filter("profile", Uuid::nil());
        let fields: Vec<&String> = key.keys().collect();
        assert_eq!(fields, order);
    }

    /// Evaluates the operators [`snapshot_save_filter`] uses (equality, `$or`, `$ne`, `$lte`
    /// on int64) the way the server does, on one stored document.
    fn matches(filter: &Document, stored: &Document) -> bool {
        filter.iter().all(|(k, cond)| match (k.as_str(), cond) {
            ("$or", Bson::Array(alternatives)) => alternatives
                .iter()
                .any(|a| matches(a.as_document().expect("$or of documents"), stored)),
            (field, Bson::Document(ops)) if ops.keys().all(|o| o.starts_with('$')) => {
                let have = stored.get(field);
                ops.iter().all(|(op, want)| match op.as_str() {
                    "$ne" => have != Some(want),
                    "$lte" => match (have, want) {
                        (Some(Bson::Int64(h)), Bson::Int64(w)) => h <= w,
                        _ => false,
                    },
                    other => panic!("operator {other} not modelled"),
                })
            }
            (field, want) => stored.get(field) == Some(want),
        })
    }

    #[test]
    fn the_save_filter_matches_exactly_the_snapshots_a_save_replaces() {
        for stored_sv in 1..=3 {
            for stored_v in [1, 10, 20, 30] {
                let stored = snapshot(stored_v, stored_sv);
                let stored_doc = snapshot_to_document(&stored).unwrap();
                for new_sv in 1..=3 {
                    for new_v in [1, 10, 20, 30] {
                        let new = snapshot(new_v, new_sv);
                        let filter = snapshot_save_filter(&new).unwrap();
                        assert_eq!(
                            matches(&filter, &stored_doc),
                            new.replaces(&stored),
                            "stored (v{stored_v}, sv{stored_sv}), saved (v{new_v}, sv{new_sv})"
                        );
                    }
                }
            }
        }
        // Never another aggregate's document.
        let mut other = snapshot_to_document(&snapshot(1, 1)).unwrap();
        other.insert("aggregate_id", uuid_to_bson(Uuid::new_v4()));
        assert!(!matches(
            &snapshot_save_filter(&snapshot(30, 1)).unwrap(),
            &other
        ));
        other = snapshot_to_document(&snapshot(1, 1)).unwrap();
        other.insert("aggregate_type", "content");
        assert!(!matches(
            &snapshot_save_filter(&snapshot(30, 1)).unwrap(),
            &other
        ));
    }

    #[test]
    fn the_update_sets_every_field_and_no_id() {
        let s = snapshot(7, 2);
        let update = snapshot_update(&s).unwrap();
        assert_eq!(update.keys().collect::<Vec<_>>(), ["$set"]);
        let set = update.get_document("$set").unwrap();
        assert_eq!(set, &snapshot_to_document(&s).unwrap());
        assert!(!set.contains_key("_id"));
    }
}
