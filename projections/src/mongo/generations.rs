//! Generations of a projection's collections: which collections one operation reads or
//! writes, and the consumer checkpoint document that says which generation is live (see the
//! [module docs](super) for the design).

use std::borrow::Cow;

use mongodb::bson::{doc, Bson, Document};
use mongodb::ClientSession;

use super::mapping::{CHECKPOINT, CONTENT, LEADERBOARD, QUOTA, TAGS, TIER, XP};
use super::ranks::TREE;
use super::{corrupt, Inner, TxError};
use crate::Projection;

/// The read-model collections of `projection` (their generation-0 names).
pub fn projection_collections(projection: Projection) -> &'static [&'static str] {
    match projection {
        Projection::Xp => &[XP],
        Projection::Leaderboard => &[LEADERBOARD, TREE],
        Projection::Quota => &[QUOTA, TIER],
        Projection::Content => &[CONTENT],
        Projection::Tags => &[TAGS],
    }
}

/// The projection whose rows collection `collection` (a generation-0 name) holds; `None` for
/// the consumer bookkeeping collections.
pub fn owner(collection: &str) -> Option<Projection> {
    Projection::ALL
        .into_iter()
        .find(|p| projection_collections(*p).contains(&collection))
}

/// The name of read-model collection `base` (a generation-0 name such as `rm_xp`) in
/// generation `generation`: `base` itself for generation 0 (the collections a database
/// starts with), `{base}_g{generation}` (`rm_xp_g2`, `rm_leaderboard_tree_g2`) after.
pub fn collection_name(base: &str, generation: u64) -> Cow<'_, str> {
    if generation == 0 {
        Cow::Borrowed(base)
    } else {
        Cow::Owned(format!("{base}_g{generation}"))
    }
}

/// The generation of `name` if it is a name of read-model collection `base` (see
/// [`collection_name`]).
pub(super) fn generation_of(base: &str, name: &str) -> Option<u64> {
    let rest = name.strip_prefix(base)?;
    if rest.is_empty() {
        return Some(0);
    }
    let digits = rest.strip_prefix("_g")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|g| *g > 0)
}

/// The consumer (checkpoint document `_id`, guard and applied-position key) of the rebuild
/// of `projection` of generation `generation`: `xp#g1`, `leaderboard#g2`, …
pub(super) fn rebuild_consumer(projection: Projection, generation: u64) -> String {
    format!("{projection}#g{generation}")
}

/// The generation of each projection's collections that one operation reads or writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Generations([u64; Projection::ALL.len()]);

fn slot(projection: Projection) -> usize {
    Projection::ALL
        .iter()
        .position(|p| *p == projection)
        .unwrap_or_default()
}

impl Generations {
    /// The generation of `projection`.
    pub(super) fn get(&self, projection: Projection) -> u64 {
        self.0[slot(projection)]
    }

    /// Uses generation `generation` of `projection`.
    pub(super) fn set(&mut self, projection: Projection, generation: u64) {
        self.0[slot(projection)] = generation;
    }

    /// The name of read-model collection `base` in the generation of its projection (other
    /// collections keep their names).
    pub(super) fn name(&self, base: &'static str) -> Cow<'static, str> {
        match owner(base) {
            Some(p) => collection_name(base, self.get(p)),
            None => Cow::Borrowed(base),
        }
    }
}

/// A consumer's checkpoint document, as the write path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// Low-water mark (0 when the document or the field is missing, e.g. after a reset).
    pub(super) checkpoint: u64,
    /// Events applied.
    pub(super) applied: u64,
    /// The live generation of the projection of this name (field `generation`; 0 when
    /// missing).
    pub(super) generation: u64,
    /// The key of the consumer's guard and applied-position documents (field `state`; the
    /// consumer's own name when missing).
    pub(super) key: String,
}

fn count(d: &Document, field: &str) -> Result<u64, TxError> {
    match d.get(field) {
        None | Some(Bson::Null) => Ok(0),
        Some(Bson::Int64(v)) => u64::try_from(*v).map_err(|e| corrupt("checkpoint", e)),
        Some(Bson::Int32(v)) => u64::try_from(*v).map_err(|e| corrupt("checkpoint", e)),
        Some(other) => Err(corrupt(
            "checkpoint",
            format!("{field} is a {:?}", other.element_type()),
        )),
    }
}

impl Head {
    /// The head of `consumer` from its checkpoint document (`None`: never applied).
    pub(super) fn of(consumer: &str, d: Option<&Document>) -> Result<Self, TxError> {
        let Some(d) = d else {
            return Ok(Head {
                checkpoint: 0,
                applied: 0,
                generation: 0,
                key: consumer.to_string(),
            });
        };
        let key = match d.get("state") {
            None | Some(Bson::Null) => consumer.to_string(),
            Some(Bson::String(s)) => s.clone(),
            Some(_) => return Err(corrupt("checkpoint", "state is not a string")),
        };
        Ok(Head {
            checkpoint: count(d, "checkpoint")?,
            applied: count(d, "applied")?,
            generation: count(d, "generation")?,
            key,
        })
    }

    /// Reads the head of `consumer` in session `s` (inside its transaction, if any).
    pub(super) async fn read(
        inner: &Inner,
        s: &mut ClientSession,
        consumer: &str,
    ) -> Result<Self, TxError> {
        let d = inner
            .coll(CHECKPOINT)
            .find_one(doc! { "_id": consumer })
            .session(&mut *s)
            .await?;
        Head::of(consumer, d.as_ref())
    }
}

/// The live generation of `projection`, read in session `s` (inside its transaction, if
/// any): field `generation` of its checkpoint document.
pub(super) async fn live_generation(
    inner: &Inner,
    s: &mut ClientSession,
    projection: Projection,
) -> Result<u64, TxError> {
    let d = inner
        .coll(CHECKPOINT)
        .find_one(doc! { "_id": projection.name() })
        .projection(doc! { "generation": 1 })
        .session(&mut *s)
        .await?;
    match d {
        None => Ok(0),
        Some(d) => count(&d, "generation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_round_trip() {
        assert_eq!(collection_name(XP, 0), "rm_xp");
        assert_eq!(collection_name(TREE, 12), "rm_leaderboard_tree_g12");
        for base in Projection::ALL
            .iter()
            .flat_map(|p| projection_collections(*p))
        {
            for g in [0, 1, 7, 123] {
                assert_eq!(generation_of(base, &collection_name(base, g)), Some(g));
            }
        }
        assert_eq!(generation_of(LEADERBOARD, "rm_leaderboard_tree"), None);
        assert_eq!(generation_of(LEADERBOARD, "rm_leaderboard_tree_g2"), None);
        assert_eq!(generation_of(XP, "rm_xp_g"), None);
        assert_eq!(generation_of(XP, "rm_xp_g0"), None);
        assert_eq!(generation_of(XP, "rm_xp_g1x"), None);
        assert_eq!(owner(TIER), Some(Projection::Quota));
        assert_eq!(owner(CHECKPOINT), None);
    }

    #[test]
    fn generations_rename_only_their_projections_collections() {
        let mut g = Generations::default();
        g.set(Projection::Leaderboard, 3);
        assert_eq!(g.name(LEADERBOARD), "rm_leaderboard_g3");
        assert_eq!(g.name(TREE), "rm_leaderboard_tree_g3");
        assert_eq!(g.name(XP), "rm_xp");
        assert_eq!(g.name(CHECKPOINT), CHECKPOINT);
        assert_eq!(g.get(Projection::Leaderboard), 3);
    }

    #[test]
    fn heads_default_missing_fields() {
        let h = Head::of("xp", None).unwrap();
        assert_eq!((h.checkpoint, h.applied, h.generation), (0, 0, 0));
        assert_eq!(h.key, "xp");
        let d = doc! { "_id": "xp", "generation": 2_i64, "state": "xp#g2" };
        let h = Head::of("xp", Some(&d)).unwrap();
        assert_eq!(
            (h.checkpoint, h.generation, h.key.as_str()),
            (0, 2, "xp#g2")
        );
        let bad = doc! { "_id": "xp", "checkpoint": -1_i64 };
        assert!(Head::of("xp", Some(&bad)).is_err());
    }
}
