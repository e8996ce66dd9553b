//! The five aggregates. Each is a cqrs-es [`cqrs_es::Aggregate`] over the shared [`crate::Event`]
//! enum; `apply` ignores variants that belong to other aggregate types.
//!
//! A command that would change nothing (a repeated registration, comment, vote or award with the
//! same data) succeeds with no events: that is what makes the importer and every policy
//! idempotent.

pub mod area;
pub mod content;
pub mod profile;
pub mod snapshot;
pub mod subscription;
pub mod user;

use crate::error::DomainError;

/// Validates a text field's length in characters (`min..=max`) and size in bytes (≤ 65,536).
pub(crate) fn check_text(
    field: &str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<(), DomainError> {
    let chars = value.chars().count();
    if chars < min || chars > max || value.len() > 65_536 {
        return Err(DomainError::Invalid(format!(
            "{field} must be {min}..={max} characters (at most 65,536 bytes), got {chars}"
        )));
    }
    Ok(())
}
