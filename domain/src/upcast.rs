//! Upcasters: turn a stored payload of an older `event_version` into the current shape
//! (issue #6, "Event evolution").
//!
//! Events are immutable, so a schema change never rewrites the store. Instead each change that
//! is not backward compatible bumps the type's version in [`crate::events::CATALOG`] and adds
//! one step here from the old version to the next. [`upcast`] chains the steps; it runs on every
//! read path: [`crate::Event::decode`] (aggregate loads, policies, projections, replay) and
//! [`crate::EventEnvelope::upcast`] (the relay before publishing, `tektree-replay events`).
//!
//! Adding an *optional* field (with `#[serde(default)]`) is backward compatible and needs no
//! new version; `area_id` on the knowledge events is such a field.
//!
//! | type | from | to | step |
//! |---|---|---|---|
//! | `user.registered` | 1 | 2 | adds `preferences` = [`crate::events::Preferences::default`] |

use serde_json::Value;

use crate::events::{catalog_entry, DecodeError, Preferences};

/// One step: the payload of version `from` → the payload of version `from + 1`.
type Step = fn(Value) -> Value;

/// The step from `version` of `event_type`, if one exists.
fn step(event_type: &str, version: u32) -> Option<Step> {
    match (event_type, version) {
        ("user.registered", 1) => Some(user_registered_v1_to_v2),
        _ => None,
    }
}

/// `user.registered` v1 (`{user_id, display_name}`) → v2 (adds `preferences`, the defaults).
fn user_registered_v1_to_v2(mut payload: Value) -> Value {
    if let Value::Object(m) = &mut payload {
        m.entry("preferences")
            .or_insert_with(|| serde_json::to_value(Preferences::default()).unwrap_or(Value::Null));
    }
    payload
}

/// Upcasts `payload` of `event_type` from `version` to the type's current version; returns the
/// current version and the upcast payload. A payload already at the current version is returned
/// unchanged.
///
/// # Errors
/// [`DecodeError::UnknownType`] for a type outside the catalog;
/// [`DecodeError::UnsupportedVersion`] for a version newer than this build knows (written by a
/// newer build: upgrade this one) or an older version without a step.
pub fn upcast(event_type: &str, version: u32, payload: Value) -> Result<(u32, Value), DecodeError> {
    let entry =
        catalog_entry(event_type).ok_or_else(|| DecodeError::UnknownType(event_type.into()))?;
    let unsupported = || DecodeError::UnsupportedVersion {
        event_type: event_type.into(),
        version,
    };
    if version == 0 || version > entry.version {
        return Err(unsupported());
    }
    let (mut v, mut payload) = (version, payload);
    while v < entry.version {
        payload = step(event_type, v).ok_or_else(unsupported)?(payload);
        v += 1;
    }
    Ok((v, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::CATALOG;

    #[test]
    fn every_older_version_in_the_catalog_has_a_step() {
        for e in CATALOG {
            for v in 1..e.version {
                assert!(step(e.event_type, v).is_some(), "{} v{v}", e.event_type);
            }
        }
    }

    #[test]
    fn user_registered_v1_gains_default_preferences_and_keeps_its_fields() {
        let v1 = serde_json::json!({"user_id": uuid::Uuid::nil(), "display_name": "Ada"});
        let (v, p) = upcast("user.registered", 1, v1).unwrap();
        assert_eq!(v, 2);
        assert_eq!(p["display_name"], "Ada");
        assert_eq!(p["preferences"]["language"], "en");
        assert_eq!(p["preferences"]["email_notifications"], true);
        // A current payload passes unchanged.
        let v2 = p.clone();
        assert_eq!(upcast("user.registered", 2, v2).unwrap(), (2, p));
        assert!(matches!(
            upcast("user.registered", 3, Value::Null),
            Err(DecodeError::UnsupportedVersion { version: 3, .. })
        ));
        assert!(matches!(
            upcast("knowledge.question.posted", 0, Value::Null),
            Err(DecodeError::UnsupportedVersion { version: 0, .. })
        ));
    }
}
