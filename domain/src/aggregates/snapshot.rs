//! Snapshot versions of the aggregates (issue #6, "Event evolution").
//!
//! A snapshot is an aggregate's folded state (its serde JSON form) at some version, stored so
//! that a load folds only the events after it. A snapshot is only valid for the state *shape*
//! it was taken with: whoever changes an aggregate's fields or its `apply` must bump that
//! aggregate's [`SnapshotVersion::SNAPSHOT_VERSION`]; stored snapshots with another version are
//! ignored (the aggregate is folded from its events) and replaced by the next one taken.

/// The state shape version of an aggregate's snapshots.
pub trait SnapshotVersion {
    /// Starts at 1; bump on every change of the state's fields or of `apply`.
    const SNAPSHOT_VERSION: u32;
}

impl SnapshotVersion for super::user::User {
    // 2: profile fields, e-mail and preferences (issue #6).
    const SNAPSHOT_VERSION: u32 = 2;
}

impl SnapshotVersion for super::content::Content {
    // 2: discussions, insights, resources, likes and areas (issue #6).
    const SNAPSHOT_VERSION: u32 = 2;
}

impl SnapshotVersion for super::profile::Profile {
    // 2: `progress` (issue #6 achievements).
    const SNAPSHOT_VERSION: u32 = 2;
}

impl SnapshotVersion for super::subscription::Subscription {
    // 2: paid invoices and billing ids (issue #6).
    const SNAPSHOT_VERSION: u32 = 2;
}

impl SnapshotVersion for super::area::Area {
    const SNAPSHOT_VERSION: u32 = 1;
}
