//! # tektree-domain
//!
//! The TekTree domain model: aggregates (on [`cqrs_es::Aggregate`]), their commands, the domain
//! events they emit, the stored [`EventEnvelope`], and the configurable XP / quota rules.
//!
//! This crate knows nothing about storage or transport. Cross-aggregate facts that a command
//! needs (does this question exist? who wrote this answer?) reach an aggregate through the
//! [`KnowledgeServices`] trait, which an adapter implements (see `tektree-commands`).
//!
//! Aggregate boundaries (see `docs/architecture.md`):
//! - [`User`]: one per user id; registration, profile, sessions, e-mail verification.
//! - [`Area`]: one per knowledge area; groups content.
//! - [`Content`]: one per question, answer, discussion, insight or resource id; posting,
//!   comments, votes, likes, accepting.
//! - [`Profile`]: one per user id; the gamification profile (XP, level, achievements).
//! - [`Subscription`]: one per user id; tier, billing and usage metering.

#![deny(missing_docs)]

pub mod actor;
pub mod aggregates;
pub mod envelope;
pub mod error;
pub mod events;
pub mod gamification;
pub mod policy_rules;
pub mod rules;
pub mod services;
pub mod upcast;

pub use actor::Actor;
pub use aggregates::snapshot::SnapshotVersion;
pub use aggregates::subscription::period_of;
pub use aggregates::{
    area::{Area, AreaCommand},
    content::{normalise_tag, Content, ContentCommand},
    profile::{Profile, ProfileCommand},
    subscription::{Subscription, SubscriptionCommand},
    user::{User, UserCommand},
};
pub use envelope::{EventEnvelope, EventMetadata, NewEvent, StoredEvent};
pub use error::DomainError;
pub use events::{Event, VoteDirection};
pub use gamification::GamificationRules;
pub use rules::{level_for_xp, QuotaRules, Rules, Tier, XpRules};
pub use services::{AnswerFacts, KnowledgeServices, NoServices, QuestionFacts};
