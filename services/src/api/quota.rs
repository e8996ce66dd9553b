//! The quota guard: questions, answers, comments, discussions, insights and resources over the
//! caller's monthly quota are refused with 429 before the command runs.
//!
//! The guard reads the caller's `subscription` aggregate (through the command handler's cache):
//! its current tier — so an upgrade or a cancellation through Polar applies at once (issue #6) —
//! and the units metered in the current UTC month. Metering is done by the
//! `policy.subscription` policy for each committed post, so the count trails the store by that
//! one consumer's lag (`GET /v1/projections`): posts committed within that lag are not yet
//! counted, and a caller can exceed the limit by at most the number of their posts still in
//! flight. The metering itself (and `payment.quota.exceeded`) stays exact. (Until issue #6 the
//! guard read the `quota` read model, which also trailed the `quota` projection and, worse, kept
//! a month's tier until the next usage: a cancelled Team user kept the Team limit.)

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use tektree_domain::{period_of, Content, Subscription};
use uuid::Uuid;

use super::problem::Problem;
use crate::app::App;

/// What a metered command would create; used to let exact repeats of already committed posts
/// through (they create nothing and answer 200).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metered {
    /// A question or answer with this id.
    Post(Uuid),
    /// A comment `comment_id` on content `content_id`.
    Comment {
        /// The commented content.
        content_id: Uuid,
        /// The comment.
        comment_id: Uuid,
    },
}

/// Seconds from `now` until the start of the next UTC calendar month (at least 1).
pub fn seconds_until_next_month(now: DateTime<Utc>) -> u64 {
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let next = NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(now);
    let ms = (next - now).num_milliseconds().max(0) as u64;
    ms.div_ceil(1000).max(1)
}

/// Refuses with 429 `quota_exceeded` (with `Retry-After`) when the caller's subscription has a
/// limit and the month of `now` has `used >= limit` metered units, unless `what` already exists
/// (a repeat).
///
/// # Errors
/// The 429 problem, or 503 when the store fails.
pub async fn check(
    app: &App,
    user: Uuid,
    now: DateTime<Utc>,
    what: Metered,
) -> Result<(), Problem> {
    let period = period_of(now);
    let (sub, _) = app.handler.load::<Subscription>(user).await?;
    let tier = sub.tier.unwrap_or_default();
    let Some(limit) = app.rules.quota.limit(tier) else {
        return Ok(());
    };
    let used = sub.used_in(&period);
    if used < limit || already_committed(app, what).await? {
        return Ok(());
    }
    metrics::counter!("tektree_quota_refusals_total").increment(1);
    Err(Problem::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
        "Quota exceeded",
        format!(
            "user {user} used {used} of {limit} units in {period} ({} tier); the quota resets at the start of the next UTC month",
            tier.as_str()
        ),
    )
    .with_retry_after(seconds_until_next_month(now)))
}

async fn already_committed(app: &App, what: Metered) -> Result<bool, Problem> {
    Ok(match what {
        Metered::Post(id) => {
            let (c, _) = app.handler.load::<Content>(id).await?;
            c.kind.is_some()
        }
        Metered::Comment {
            content_id,
            comment_id,
        } => {
            let (c, _) = app.handler.load::<Content>(content_id).await?;
            c.comments.contains(&comment_id)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_counts_to_the_next_utc_month() {
        let t: DateTime<Utc> = "2024-12-31T23:59:30Z".parse().unwrap();
        assert_eq!(seconds_until_next_month(t), 30);
        let t: DateTime<Utc> = "2024-02-29T00:00:00Z".parse().unwrap();
        assert_eq!(seconds_until_next_month(t), 86_400);
        let t: DateTime<Utc> = "2024-03-31T23:59:59.500Z".parse().unwrap();
        assert_eq!(seconds_until_next_month(t), 1);
    }
}
