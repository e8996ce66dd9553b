//! Read-model query endpoints: XP, leaderboards, ranks, quota, content, tags.
//!
//! Queries read the projections' read models, which trail the event store by each
//! projection's lag (`GET /v1/projections`). They need no identity. Each takes [`Fresh`]:
//! with `?min_position=N` or `X-Min-Position: N` it answers once the projection it reads has
//! applied position N (read-your-writes, [`tektree_http::fresh`]).

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Json;
use axum::Router;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tektree_domain::{normalise_tag, period_of};
use tektree_http::fresh::{Fresh, ReadWait};
use tektree_projections::{ContentRow, LeaderboardRow, Projection, QuotaRow, TagRow, XpRow};
use uuid::Uuid;

use super::board::parse_board;
use super::extract::{ApiPath, ApiQuery};
use super::problem::Problem;
use crate::app::App;

/// The read-model queries (the table in `docs/api.md`, "Queries"), merged into the API's
/// router: open to anyone, read-only, each from the app's read-model store. A new query is a
/// handler and a line here.
pub fn routes<S>() -> Router<S>
where
    Arc<App>: FromRef<S>,
    ReadWait: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/v1/users/{id}/xp", get(user_xp))
        .route("/v1/users/{id}/quota", get(user_quota))
        .route("/v1/leaderboards/{board}", get(leaderboard))
        .route("/v1/leaderboards/{board}/users/{id}", get(rank))
        .route("/v1/content/{id}", get(content))
        .route("/v1/tags/{tag}", get(tag))
}

/// Default leaderboard page size.
pub const DEFAULT_LIMIT: u32 = 20;
/// Largest leaderboard page size.
pub const MAX_LIMIT: u32 = 100;
/// Largest leaderboard offset (the read-model stores count rows in signed 64-bit integers).
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// `?limit=&offset=` of a leaderboard page.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PageQuery {
    /// 1..=100, default 20.
    pub limit: Option<u32>,
    /// 0..=[`MAX_OFFSET`], default 0.
    pub offset: Option<u64>,
}

/// Largest `around` of a rank query (entries above and below the user).
pub const MAX_AROUND: u32 = 50;

/// `?around=K` of a rank query.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AroundQuery {
    /// 0..=[`MAX_AROUND`]: also return the K entries above and below the user.
    pub around: Option<u32>,
}

/// `GET /v1/leaderboards/{board}/users/{id}` response: the user's entry and, with
/// `?around=K`, the entries around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankResponse {
    /// The user's entry (`board`, `rank`, `user_id`, `xp` at the top level).
    #[serde(flatten)]
    pub entry: LeaderboardRow,
    /// With `?around=K`: the K entries ranked just above the user, the user's own and the K
    /// just below, in rank order (fewer at the ends of the board), from the same snapshot as
    /// `entry`. Absent without `around`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub around: Option<Vec<LeaderboardRow>>,
}

/// `?period=YYYY-MM` of a quota query.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeriodQuery {
    /// UTC month; default the current one.
    pub period: Option<String>,
}

/// `GET /v1/leaderboards/{board}` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderboardPage {
    /// The board (canonical name).
    pub board: String,
    /// Page size used.
    pub limit: u32,
    /// Offset used.
    pub offset: u64,
    /// Up to `limit` entries, XP descending then user id ascending.
    pub entries: Vec<LeaderboardRow>,
}

/// `GET /v1/users/{id}/xp`.
///
/// # Errors
/// 400 for a bad id, 404 when the user has no XP row yet.
pub async fn user_xp(
    State(app): State<Arc<App>>,
    ApiPath(user_id): ApiPath<Uuid>,
    fresh: Fresh,
) -> Result<Json<XpRow>, Problem> {
    fresh.wait(&[Projection::Xp]).await?;
    app.read_models
        .user_xp(user_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no XP recorded for user {user_id}")))
}

/// `GET /v1/leaderboards/{board}?limit=&offset=`.
///
/// # Errors
/// 400 for an invalid board, limit (not 1..=[`MAX_LIMIT`]) or offset (not 0..=[`MAX_OFFSET`]).
pub async fn leaderboard(
    State(app): State<Arc<App>>,
    ApiPath(board): ApiPath<String>,
    ApiQuery(page): ApiQuery<PageQuery>,
    fresh: Fresh,
) -> Result<Json<LeaderboardPage>, Problem> {
    let board = parse_board(&board).map_err(Problem::invalid_path)?;
    let limit = page.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Problem::invalid_query(format!(
            "limit must be 1..={MAX_LIMIT}, got {limit}"
        )));
    }
    let offset = page.offset.unwrap_or(0);
    if offset > MAX_OFFSET {
        return Err(Problem::invalid_query(format!(
            "offset must be 0..={MAX_OFFSET}, got {offset}"
        )));
    }
    fresh.wait(&[Projection::Leaderboard]).await?;
    let entries = app.read_models.leaderboard(&board, limit, offset).await?;
    Ok(Json(LeaderboardPage {
        board,
        limit,
        offset,
        entries,
    }))
}

/// `GET /v1/leaderboards/{board}/users/{id}?around=K`: the user's rank, and with `around`
/// the K entries above and below (O(log n) in the board's size, see
/// [`ReadModelStore::around`](tektree_projections::ReadModelStore::around)).
///
/// # Errors
/// 400 for an invalid board or id, or `around` not 0..=[`MAX_AROUND`]; 404 when the user is
/// not on the board.
pub async fn rank(
    State(app): State<Arc<App>>,
    ApiPath((board, user_id)): ApiPath<(String, Uuid)>,
    ApiQuery(q): ApiQuery<AroundQuery>,
    fresh: Fresh,
) -> Result<Json<RankResponse>, Problem> {
    let board = parse_board(&board).map_err(Problem::invalid_path)?;
    if q.around.is_some_and(|k| k > MAX_AROUND) {
        return Err(Problem::invalid_query(format!(
            "around must be 0..={MAX_AROUND}, got {}",
            q.around.unwrap_or_default()
        )));
    }
    fresh.wait(&[Projection::Leaderboard]).await?;
    let missing = || Problem::not_found(format!("user {user_id} is not on board {board}"));
    let Some(k) = q.around else {
        let entry = app.read_models.rank(&board, user_id).await?;
        let entry = entry.ok_or_else(missing)?;
        return Ok(Json(RankResponse {
            entry,
            around: None,
        }));
    };
    let rows = app.read_models.around(&board, user_id, k).await?;
    let rows = rows.ok_or_else(missing)?;
    let entry = rows
        .iter()
        .find(|r| r.user_id == user_id)
        .cloned()
        .ok_or_else(missing)?;
    Ok(Json(RankResponse {
        entry,
        around: Some(rows),
    }))
}

/// Validates `YYYY-MM` (month 01..=12).
pub fn parse_period(p: &str) -> Result<(), String> {
    let b = p.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let ok = b.len() == 7
        && b[4] == b'-'
        && digits(0..4)
        && digits(5..7)
        && (1..=12).contains(&p[5..7].parse::<u32>().unwrap_or(0));
    if ok {
        Ok(())
    } else {
        Err(format!("period must be YYYY-MM, got {p:?}"))
    }
}

/// `GET /v1/users/{id}/quota?period=YYYY-MM` (default: the current UTC month).
///
/// # Errors
/// 400 for a bad id or period, 404 when there is no row for the period.
pub async fn user_quota(
    State(app): State<Arc<App>>,
    ApiPath(user_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<PeriodQuery>,
    fresh: Fresh,
) -> Result<Json<QuotaRow>, Problem> {
    let period = match q.period {
        Some(p) => {
            parse_period(&p).map_err(Problem::invalid_query)?;
            p
        }
        None => period_of(Utc::now()),
    };
    fresh.wait(&[Projection::Quota]).await?;
    app.read_models
        .quota(user_id, &period)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no quota row for user {user_id} in {period}")))
}

/// `GET /v1/content/{id}`.
///
/// # Errors
/// 400 for a bad id, 404 when the content is unknown to the read model.
pub async fn content(
    State(app): State<Arc<App>>,
    ApiPath(content_id): ApiPath<Uuid>,
    fresh: Fresh,
) -> Result<Json<ContentRow>, Problem> {
    fresh.wait(&[Projection::Content]).await?;
    app.read_models
        .content(content_id)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("content {content_id} not found")))
}

/// `GET /v1/tags/{tag}`: questions and answers with the tag. The tag is compared as content
/// stores it (trimmed, lower case), so `Rust` finds `rust`.
///
/// # Errors
/// 400 `invalid_tag` for a tag content could not carry, 404 when no question or answer
/// carried it.
pub async fn tag(
    State(app): State<Arc<App>>,
    ApiPath(tag): ApiPath<String>,
    fresh: Fresh,
) -> Result<Json<TagRow>, Problem> {
    let tag = normalise_tag(&tag).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_tag",
            "Invalid tag",
            e.to_string(),
        )
    })?;
    fresh.wait(&[Projection::Tags]).await?;
    app.read_models
        .tag(&tag)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no question or answer has the tag {tag:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_year_dash_month() {
        assert!(parse_period("2024-01").is_ok());
        assert!(parse_period("2024-12").is_ok());
        for bad in [
            "2024-13",
            "2024-00",
            "2024-1",
            "24-01",
            "2024/01",
            "2024-01-01",
            "abcd-ef",
        ] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
    }
}
