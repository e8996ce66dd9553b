//! Idempotency records in MongoDB: the `idempotency` collection, its TTL index and the BSON
//! mapping of [`IdempotencyRecord`].
//!
//! One document per key: `{_id: key, fingerprint, aggregate_type, aggregate_id (UUID binary),
//! first_sequence, event_count, version (int64), created_at, expires_at (BSON dates, ms)}`.
//! The TTL index on `expires_at` (`expireAfterSeconds: 0`) lets the server delete expired
//! records (its TTL monitor runs about once a minute, so readers also filter on `expires_at`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, DateTime as BsonDateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::IndexModel;

use super::mapping::{get_u64, uuid_from_bson, uuid_to_bson, MappingError};
use crate::{IdempotencyKey, IdempotencyRecord};

/// The idempotency collection.
pub const IDEMPOTENCY: &str = "idempotency";
/// Name of the TTL index on `expires_at`.
pub const IDEMPOTENCY_TTL_INDEX: &str = "expires_at_ttl";

/// The indexes of the `idempotency` collection (`_id` is the key, hence unique):
/// [`IDEMPOTENCY_TTL_INDEX`] `{expires_at: 1}` with `expireAfterSeconds: 0`.
pub fn idempotency_indexes() -> Vec<IndexModel> {
    vec![IndexModel::builder()
        .keys(doc! { "expires_at": 1 })
        .options(
            IndexOptions::builder()
                .name(IDEMPOTENCY_TTL_INDEX.to_string())
                .expire_after(Duration::ZERO)
                .build(),
        )
        .build()]
}

/// `t` as a BSON date (millisecond precision; finer digits are dropped).
pub fn bson_date(t: DateTime<Utc>) -> Bson {
    Bson::DateTime(BsonDateTime::from_millis(t.timestamp_millis()))
}

fn date_field(doc: &Document, field: &str) -> Result<DateTime<Utc>, MappingError> {
    match doc.get(field) {
        Some(Bson::DateTime(d)) => DateTime::<Utc>::from_timestamp_millis(d.timestamp_millis())
            .ok_or_else(|| MappingError::new(field, "date out of range")),
        Some(other) => Err(MappingError::new(
            field,
            format!("expected a date, found {:?}", other.element_type()),
        )),
        None => Err(MappingError::new(field, "missing")),
    }
}

fn str_field(doc: &Document, field: &str) -> Result<String, MappingError> {
    doc.get_str(field)
        .map(str::to_string)
        .map_err(|_| MappingError::new(field, "missing or not a string"))
}

fn int64(field: &str, v: u64) -> Result<Bson, MappingError> {
    i64::try_from(v)
        .map(Bson::Int64)
        .map_err(|_| MappingError::new(field, format!("{v} exceeds i64::MAX")))
}

/// The document of `record`.
///
/// # Errors
/// [`MappingError`] when a counter exceeds `i64::MAX`.
pub fn record_to_document(record: &IdempotencyRecord) -> Result<Document, MappingError> {
    let k = &record.key;
    Ok(doc! {
        "_id": &k.key,
        "fingerprint": &k.fingerprint,
        "aggregate_type": &record.aggregate_type,
        "aggregate_id": uuid_to_bson(record.aggregate_id),
        "first_sequence": int64("first_sequence", record.first_sequence)?,
        "event_count": int64("event_count", record.event_count)?,
        "version": int64("version", record.version)?,
        "created_at": bson_date(k.created_at),
        "expires_at": bson_date(k.expires_at),
    })
}

/// The record a [`record_to_document`] document holds (timestamps at millisecond precision).
///
/// # Errors
/// [`MappingError`] naming the first missing or malformed field.
pub fn record_from_document(doc: &Document) -> Result<IdempotencyRecord, MappingError> {
    Ok(IdempotencyRecord {
        key: IdempotencyKey {
            key: str_field(doc, "_id")?,
            fingerprint: str_field(doc, "fingerprint")?,
            created_at: date_field(doc, "created_at")?,
            expires_at: date_field(doc, "expires_at")?,
        },
        aggregate_type: str_field(doc, "aggregate_type")?,
        aggregate_id: uuid_from_bson(
            "aggregate_id",
            doc.get("aggregate_id")
                .ok_or_else(|| MappingError::new("aggregate_id", "missing"))?,
        )?,
        first_sequence: get_u64(doc, "first_sequence")?,
        event_count: get_u64(doc, "event_count")?,
        version: get_u64(doc, "version")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use uuid::Uuid;

    fn record() -> IdempotencyRecord {
        let created = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
        IdempotencyRecord::for_append(
            IdempotencyKey {
                key: format!("{}:retry-1", Uuid::new_v4()),
                fingerprint: "ab".repeat(32),
                created_at: created,
                expires_at: created + chrono::Duration::hours(24),
            },
            "content",
            Uuid::new_v4(),
            7,
            2,
        )
    }

    #[test]
    fn records_round_trip_through_bson_bytes() {
        let r = record();
        let doc = record_to_document(&r).unwrap();
        let bytes = mongodb::bson::to_vec(&doc).unwrap();
        let back: Document = mongodb::bson::from_slice(&bytes).unwrap();
        assert_eq!(record_from_document(&back).unwrap(), r);
        assert_eq!(r.first_sequence, 8);
        assert_eq!(r.version, 9);
        assert!(matches!(back.get("expires_at"), Some(Bson::DateTime(_))));
    }

    #[test]
    fn malformed_records_name_the_field() {
        let mut doc = record_to_document(&record()).unwrap();
        doc.insert("expires_at", "tomorrow");
        let err = record_from_document(&doc).unwrap_err();
        assert!(err.to_string().contains("expires_at"), "{err}");
        doc.remove("fingerprint");
        let err = record_from_document(&doc).unwrap_err();
        assert!(err.to_string().contains("fingerprint"), "{err}");
    }

    #[test]
    fn the_ttl_index_expires_at_the_stored_instant() {
        let models = idempotency_indexes();
        assert_eq!(models.len(), 1);
        let m = &models[0];
        assert_eq!(m.keys, doc! { "expires_at": 1 });
        let o = m.options.as_ref().unwrap();
        assert_eq!(o.name.as_deref(), Some(IDEMPOTENCY_TTL_INDEX));
        assert_eq!(o.expire_after, Some(Duration::ZERO));
    }
}
