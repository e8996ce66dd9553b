//! BSON mapping of event envelopes, as plain functions.
//!
//! One event is one document of the `events` collection:
//!
//! | field | BSON type | from |
//! |---|---|---|
//! | `_id` | binary subtype 4 (UUID) | `event_id` |
//! | `event_type` | string | |
//! | `event_version` | int64 | |
//! | `aggregate_type` | string | |
//! | `aggregate_id` | binary subtype 4 | |
//! | `sequence` | int64 | |
//! | `position` | int64, **absent until sequenced** | see the module docs of [`super`] |
//! | `pending` | int64, **present only until sequenced** | provisional sequencing key |
//! | `occurred_at`, `recorded_at` | string, RFC 3339 UTC with 9 fractional digits | |
//! | `correlation_id`, `causation_id` | binary subtype 4 | |
//! | `actor` | string `user:<uuid>` / `system:<name>` | |
//! | `payload` | document (any JSON value, mapped by [`json_to_bson`]) | |
//!
//! **Timestamps** are stored as fixed-width RFC 3339 strings with nanoseconds
//! (`2024-05-06T07:08:09.123456789Z`), not as BSON dates: a BSON date has millisecond
//! precision, and envelopes must round-trip exactly (the domain clock has nanoseconds). The
//! fixed width keeps string order equal to time order for years 0000–9999; other years are
//! rejected on write.
//!
//! **Payload numbers**: integers in `i64` range → int64; larger `u64` → decimal128 (exact);
//! other numbers → double. On read int32 and int64 become JSON integers, double a JSON float,
//! decimal128 must hold a non-negative integer ≤ `u64::MAX`. Every other BSON type in a
//! payload is reported as corrupt. Object keys keep their text (BSON forbids NUL in keys, which
//! is rejected on write).

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Decimal128, Document};
use serde_json::{Map, Number, Value};
use tektree_domain::{Actor, EventEnvelope};
use uuid::Uuid;

/// A value that cannot be mapped to or from BSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {reason}")]
pub struct MappingError {
    /// The (dotted) field.
    pub field: String,
    /// Why.
    pub reason: String,
}

impl MappingError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        MappingError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub use tektree_mongo::uuid_to_bson;

/// A UUID from BSON binary subtype 4 (or 3, the legacy subtype, with the same byte order).
///
/// # Errors
/// [`MappingError`] for any other value.
pub fn uuid_from_bson(field: &str, value: &Bson) -> Result<Uuid, MappingError> {
    match value {
        Bson::Binary(Binary {
            subtype: BinarySubtype::Uuid | BinarySubtype::UuidOld,
            bytes,
        }) => Uuid::from_slice(bytes).map_err(|e| MappingError::new(field, e.to_string())),
        other => Err(MappingError::new(
            field,
            format!(
                "expected a UUID (binary subtype 4), found {:?}",
                other.element_type()
            ),
        )),
    }
}

/// A timestamp as a fixed-width RFC 3339 string with nanoseconds.
///
/// # Errors
/// [`MappingError`] for years outside 0000–9999 (no fixed-width RFC 3339 form).
pub fn timestamp_to_bson(field: &str, t: &DateTime<Utc>) -> Result<Bson, MappingError> {
    if !(0..=9999).contains(&t.year()) {
        return Err(MappingError::new(
            field,
            format!("year {} is outside 0000-9999", t.year()),
        ));
    }
    Ok(Bson::String(t.to_rfc3339_opts(SecondsFormat::Nanos, true)))
}

/// A timestamp written by [`timestamp_to_bson`].
///
/// # Errors
/// [`MappingError`] when the value is not an RFC 3339 string.
pub fn timestamp_from_bson(field: &str, value: &Bson) -> Result<DateTime<Utc>, MappingError> {
    let s = match value {
        Bson::String(s) => s,
        other => {
            return Err(MappingError::new(
                field,
                format!(
                    "expected an RFC 3339 string, found {:?}",
                    other.element_type()
                ),
            ))
        }
    };
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| MappingError::new(field, format!("{s:?}: {e}")))
}

/// Exponent bias of IEEE 754-2008 decimal128 (BID encoding).
const DECIMAL128_BIAS: u64 = 6176;

/// `n` as a decimal128 with exponent 0 (BID: the coefficient fits the low 64 bits).
fn u64_to_decimal128(n: u64) -> Decimal128 {
    let high = DECIMAL128_BIAS << 49;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    bytes[8..].copy_from_slice(&high.to_le_bytes());
    Decimal128::from_bytes(bytes)
}

/// The non-negative integer ≤ `u64::MAX` a decimal128 holds, if it is one written as
/// coefficient × 10^0 (what [`u64_to_decimal128`] writes).
fn decimal128_to_u64(d: &Decimal128) -> Option<u64> {
    let bytes = d.bytes();
    let low = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    let high = u64::from_le_bytes(bytes[8..].try_into().ok()?);
    let sign = high >> 63;
    let combination = (high >> 61) & 0b11;
    let exponent = (high >> 49) & 0x3fff;
    let coefficient_high = high & ((1 << 49) - 1);
    (sign == 0 && combination != 0b11 && exponent == DECIMAL128_BIAS && coefficient_high == 0)
        .then_some(low)
}

/// A JSON value as BSON (see the module docs for numbers).
///
/// # Errors
/// [`MappingError`] for an object key containing NUL (not representable in BSON).
pub fn json_to_bson(field: &str, value: &Value) -> Result<Bson, MappingError> {
    Ok(match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::String(s) => Bson::String(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Bson::Int64(i)
            } else if let Some(u) = n.as_u64() {
                Bson::Decimal128(u64_to_decimal128(u))
            } else {
                Bson::Double(n.as_f64().ok_or_else(|| {
                    MappingError::new(field, format!("number {n} is not representable"))
                })?)
            }
        }
        Value::Array(items) => Bson::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_to_bson(&format!("{field}.{i}"), v))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut doc = Document::new();
            for (k, v) in map {
                let path = format!("{field}.{k}");
                if k.contains('\0') {
                    return Err(MappingError::new(path, "object key contains NUL"));
                }
                doc.insert(k.clone(), json_to_bson(&path, v)?);
            }
            Bson::Document(doc)
        }
    })
}

/// A BSON value written by [`json_to_bson`] as JSON.
///
/// # Errors
/// [`MappingError`] for BSON types that [`json_to_bson`] never writes (or a non-finite double).
pub fn bson_to_json(field: &str, value: &Bson) -> Result<Value, MappingError> {
    Ok(match value {
        Bson::Null => Value::Null,
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Int32(i) => Value::Number((*i).into()),
        Bson::Int64(i) => Value::Number((*i).into()),
        Bson::Double(f) => Value::Number(
            Number::from_f64(*f)
                .ok_or_else(|| MappingError::new(field, format!("non-finite double {f}")))?,
        ),
        Bson::Decimal128(d) => Value::Number(
            decimal128_to_u64(d)
                .ok_or_else(|| MappingError::new(field, format!("decimal128 {d} is not a u64")))?
                .into(),
        ),
        Bson::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| bson_to_json(&format!("{field}.{i}"), v))
                .collect::<Result<_, _>>()?,
        ),
        Bson::Document(doc) => {
            let mut map = Map::new();
            for (k, v) in doc {
                map.insert(k.clone(), bson_to_json(&format!("{field}.{k}"), v)?);
            }
            Value::Object(map)
        }
        other => {
            return Err(MappingError::new(
                field,
                format!(
                    "unsupported BSON type {:?} in a payload",
                    other.element_type()
                ),
            ))
        }
    })
}

fn int64(field: &str, v: u64) -> Result<Bson, MappingError> {
    i64::try_from(v)
        .map(Bson::Int64)
        .map_err(|_| MappingError::new(field, format!("{v} exceeds i64::MAX")))
}

fn get<'a>(doc: &'a Document, field: &str) -> Result<&'a Bson, MappingError> {
    doc.get(field)
        .ok_or_else(|| MappingError::new(field, "missing"))
}

fn get_str<'a>(doc: &'a Document, field: &str) -> Result<&'a str, MappingError> {
    match get(doc, field)? {
        Bson::String(s) => Ok(s),
        other => Err(MappingError::new(
            field,
            format!("expected a string, found {:?}", other.element_type()),
        )),
    }
}

/// A non-negative integer stored as int64 (or int32).
pub(crate) fn get_u64(doc: &Document, field: &str) -> Result<u64, MappingError> {
    let v = match get(doc, field)? {
        Bson::Int64(i) => *i,
        Bson::Int32(i) => i64::from(*i),
        other => {
            return Err(MappingError::new(
                field,
                format!("expected an integer, found {:?}", other.element_type()),
            ))
        }
    };
    u64::try_from(v).map_err(|_| MappingError::new(field, format!("negative value {v}")))
}

/// The `events` document of a committed envelope. `position` is written only when it is not
/// 0 (0 = not sequenced yet); the store adds the provisional `pending` key itself.
///
/// # Errors
/// [`MappingError`] for numbers beyond `i64::MAX`, years outside 0000–9999 or NUL in payload
/// keys.
pub fn envelope_to_document(e: &EventEnvelope) -> Result<Document, MappingError> {
    let mut doc = Document::new();
    doc.insert("_id", uuid_to_bson(e.event_id));
    doc.insert("event_type", e.event_type.clone());
    doc.insert("event_version", Bson::Int64(i64::from(e.event_version)));
    doc.insert("aggregate_type", e.aggregate_type.clone());
    doc.insert("aggregate_id", uuid_to_bson(e.aggregate_id));
    doc.insert("sequence", int64("sequence", e.sequence)?);
    if e.position != 0 {
        doc.insert("position", int64("position", e.position)?);
    }
    doc.insert(
        "occurred_at",
        timestamp_to_bson("occurred_at", &e.occurred_at)?,
    );
    doc.insert(
        "recorded_at",
        timestamp_to_bson("recorded_at", &e.recorded_at)?,
    );
    doc.insert("correlation_id", uuid_to_bson(e.correlation_id));
    doc.insert("causation_id", uuid_to_bson(e.causation_id));
    doc.insert("actor", e.actor.to_string());
    doc.insert("payload", json_to_bson("payload", &e.payload)?);
    Ok(doc)
}

/// The envelope of an `events` document; `position` is 0 when the event is not sequenced yet
/// (no `position` field).
///
/// # Errors
/// [`MappingError`] naming the first missing or malformed field.
pub fn envelope_from_document(doc: &Document) -> Result<EventEnvelope, MappingError> {
    let position = match doc.get("position") {
        None | Some(Bson::Null) => 0,
        Some(_) => get_u64(doc, "position")?,
    };
    let event_version = get_u64(doc, "event_version")?;
    let actor = get_str(doc, "actor")?;
    Ok(EventEnvelope {
        event_id: uuid_from_bson("_id", get(doc, "_id")?)?,
        event_type: get_str(doc, "event_type")?.to_string(),
        event_version: u32::try_from(event_version).map_err(|_| {
            MappingError::new("event_version", format!("{event_version} exceeds u32::MAX"))
        })?,
        aggregate_type: get_str(doc, "aggregate_type")?.to_string(),
        aggregate_id: uuid_from_bson("aggregate_id", get(doc, "aggregate_id")?)?,
        sequence: get_u64(doc, "sequence")?,
        position,
        occurred_at: timestamp_from_bson("occurred_at", get(doc, "occurred_at")?)?,
        recorded_at: timestamp_from_bson("recorded_at", get(doc, "recorded_at")?)?,
        correlation_id: uuid_from_bson("correlation_id", get(doc, "correlation_id")?)?,
        causation_id: uuid_from_bson("causation_id", get(doc, "causation_id")?)?,
        actor: actor
            .parse::<Actor>()
            .map_err(|e| MappingError::new("actor", e.to_string()))?,
        payload: bson_to_json("payload", get(doc, "payload")?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn envelope() -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::new_v4(),
            event_type: "knowledge.question.posted".into(),
            event_version: 1,
            aggregate_type: "content".into(),
            aggregate_id: Uuid::new_v4(),
            sequence: 7,
            position: 42,
            occurred_at: "2024-05-06T07:08:09.123456789Z".parse().unwrap(),
            recorded_at: "2024-05-06T07:08:10.000000001Z".parse().unwrap(),
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            actor: Actor::User(Uuid::new_v4()),
            payload: json!({
                "title": "Zoë \"#1\" \\ 🌳", "tags": ["a", "b"], "n": -3, "f": 1.5,
                "big": u64::MAX, "zero_f": 0.0, "nested": {"x": null, "y": true, "$odd.key": 1}
            }),
        }
    }

    /// Encodes to BSON bytes and back, as the wire does.
    fn through_bytes(doc: &Document) -> Document {
        let mut bytes = Vec::new();
        doc.to_writer(&mut bytes).unwrap();
        Document::from_reader(bytes.as_slice()).unwrap()
    }

    #[test]
    fn envelopes_round_trip_exactly_with_nanosecond_timestamps() {
        let e = envelope();
        let doc = envelope_to_document(&e).unwrap();
        assert!(
            matches!(doc.get("_id"), Some(Bson::Binary(b)) if b.subtype == BinarySubtype::Uuid)
        );
        assert_eq!(
            doc.get_str("occurred_at").unwrap(),
            "2024-05-06T07:08:09.123456789Z"
        );
        assert_eq!(doc.get_i64("position").unwrap(), 42);
        assert!(matches!(
            doc.get_document("payload").unwrap().get("big"),
            Some(Bson::Decimal128(_))
        ));
        assert_eq!(envelope_from_document(&through_bytes(&doc)).unwrap(), e);
    }

    #[test]
    fn unsequenced_documents_have_no_position_and_decode_to_zero() {
        let e = EventEnvelope {
            position: 0,
            ..envelope()
        };
        let doc = envelope_to_document(&e).unwrap();
        assert!(doc.get("position").is_none());
        assert_eq!(envelope_from_document(&doc).unwrap().position, 0);
    }

    #[test]
    fn malformed_documents_name_the_field() {
        let good = envelope_to_document(&envelope()).unwrap();
        let mut d = good.clone();
        d.remove("actor");
        assert_eq!(envelope_from_document(&d).unwrap_err().field, "actor");
        let mut d = good.clone();
        d.insert("sequence", -1i64);
        assert_eq!(envelope_from_document(&d).unwrap_err().field, "sequence");
        let mut d = good.clone();
        d.insert("aggregate_id", "not a uuid");
        assert_eq!(
            envelope_from_document(&d).unwrap_err().field,
            "aggregate_id"
        );
        let mut d = good.clone();
        d.insert(
            "recorded_at",
            Bson::DateTime(mongodb::bson::DateTime::now()),
        );
        assert_eq!(envelope_from_document(&d).unwrap_err().field, "recorded_at");
        let mut d = good;
        d.insert("payload", doc_with_oid());
        assert_eq!(envelope_from_document(&d).unwrap_err().field, "payload.o");
    }

    fn doc_with_oid() -> Document {
        let mut d = Document::new();
        d.insert("o", mongodb::bson::oid::ObjectId::new());
        d
    }

    #[test]
    fn unrepresentable_values_are_rejected_on_write() {
        let mut e = envelope();
        e.sequence = u64::MAX;
        assert_eq!(envelope_to_document(&e).unwrap_err().field, "sequence");
        let mut e = envelope();
        e.occurred_at = "+10000-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(envelope_to_document(&e).unwrap_err().field, "occurred_at");
        let mut e = envelope();
        e.payload = json!({"a": {"b\u{0}": 1}});
        assert_eq!(
            envelope_to_document(&e).unwrap_err().field,
            "payload.a.b\u{0}"
        );
    }

    #[test]
    fn decimal128_holds_u64_exactly_and_rejects_other_decimals() {
        for n in [0, 1, i64::MAX as u64 + 1, u64::MAX] {
            assert_eq!(decimal128_to_u64(&u64_to_decimal128(n)), Some(n));
        }
        // 1E+1 (exponent 1) and a negative value are not what the mapping writes.
        let mut bytes = u64_to_decimal128(1).bytes();
        bytes[14] = ((DECIMAL128_BIAS + 1) << 1) as u8;
        bytes[15] = (((DECIMAL128_BIAS + 1) << 1) >> 8) as u8;
        assert_eq!(decimal128_to_u64(&Decimal128::from_bytes(bytes)), None);
        let mut bytes = u64_to_decimal128(1).bytes();
        bytes[15] |= 0x80;
        assert_eq!(decimal128_to_u64(&Decimal128::from_bytes(bytes)), None);
    }

    /// Prints (does not assert) the cost of mapping + BSON-encoding one typical envelope, the
    /// client-side CPU an append pays per event. Run with
    /// `cargo test --release -p tektree-event-store bson_encode_cost -- --nocapture`.
    #[test]
    fn bson_encode_cost_is_printed() {
        let e = envelope();
        let n = 20_000;
        let started = std::time::Instant::now();
        let mut bytes = 0usize;
        for _ in 0..n {
            let doc = envelope_to_document(&e).unwrap();
            let mut buf = Vec::with_capacity(512);
            doc.to_writer(&mut buf).unwrap();
            bytes += buf.len();
        }
        let encode = started.elapsed();
        let doc = envelope_to_document(&e).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..n {
            envelope_from_document(&doc).unwrap();
        }
        let decode = started.elapsed();
        println!(
            "bson mapping: encode {:.2} µs/event, decode {:.2} µs/event, {} bytes/event",
            encode.as_secs_f64() * 1e6 / n as f64,
            decode.as_secs_f64() * 1e6 / n as f64,
            bytes / n
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            (-1e300f64..1e300).prop_map(|f| json!(f)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[^\u{0}]{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
        // 0000-01-01 .. 9999-12-31, any nanosecond.
        (-62_167_219_200i64..253_402_300_799, 0u32..1_000_000_000)
            .prop_map(|(s, ns)| DateTime::from_timestamp(s, ns).unwrap())
    }

    fn uuid() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    proptest! {
        #[test]
        fn any_envelope_round_trips_through_bson_bytes(
            ids in (uuid(), uuid(), uuid(), uuid()),
            user in proptest::option::of(uuid()),
            system in "[a-z.]{1,12}",
            event_type in ".{0,20}",
            aggregate_type in ".{0,10}",
            event_version in any::<u32>(),
            sequence in 1..=i64::MAX as u64,
            position in 0..=i64::MAX as u64,
            times in (timestamp(), timestamp()),
            payload in json_value(),
        ) {
            let e = EventEnvelope {
                event_id: ids.0,
                event_type,
                event_version,
                aggregate_type,
                aggregate_id: ids.1,
                sequence,
                position,
                occurred_at: times.0,
                recorded_at: times.1,
                correlation_id: ids.2,
                causation_id: ids.3,
                actor: user.map_or(Actor::System(system), Actor::User),
                payload,
            };
            let doc = envelope_to_document(&e).unwrap();
            prop_assert_eq!(envelope_from_document(&through_bytes(&doc)).unwrap(), e);
        }
    }
}
