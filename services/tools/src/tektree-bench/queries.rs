//! Scenario 5, **queries**: the read-model queries behind `GET /v1/leaderboards/…`,
//! `GET /v1/users/{id}/rank` and `GET /v1/content/{id}` against a SQLite read-model file
//! holding `users` users on the `all-time` board (with their XP rows) and `users / 2` content
//! rows, filled through `ReadModelStore::apply` (the projections' write path) in transactions
//! of 5,000 changes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use tektree_projections::{Change, ContentDelta, EventKey, ReadModelStore, SqliteReadModels};
use uuid::Uuid;

use crate::rng::Rng;
use crate::stats::Latencies;

/// The queries measured, by name.
pub const QUERIES: [&str; 5] = [
    "leaderboard_top_page",
    "leaderboard_deep_page",
    "rank_of_user",
    "user_xp",
    "content_stats",
];

/// A populated read-model file.
pub struct Populated {
    /// The read models.
    pub rm: SqliteReadModels,
    /// The users on the board.
    pub users: Vec<Uuid>,
    /// The content rows.
    pub content: Vec<Uuid>,
}

fn key(aggregate_type: &str, id: Uuid, position: u64) -> EventKey {
    EventKey {
        aggregate_type: aggregate_type.into(),
        aggregate_id: id,
        sequence: 1,
        position,
    }
}

/// Fills a fresh read-model file at `path` with `users` users.
///
/// # Errors
/// Read-model failures.
pub async fn populate(path: &Path, users: u64, seed: u64) -> Result<Populated> {
    crate::corpus::remove_db(path);
    let rm = SqliteReadModels::open(path)?;
    let mut rng = Rng::new(seed);
    let ids: Vec<Uuid> = (0..users).map(|_| rng.uuid()).collect();
    let content: Vec<Uuid> = (0..users.div_ceil(2)).map(|_| rng.uuid()).collect();
    for (c, chunk) in ids.chunks(5000).enumerate() {
        let base = (c * 5000) as u64;
        let mut board = Vec::with_capacity(chunk.len());
        let mut xp = Vec::with_capacity(chunk.len());
        for (i, &user_id) in chunk.iter().enumerate() {
            // Skewed like a real board: most users have little XP, a few very much.
            let r = rng.below(10_000) as i64;
            let points = r * r / 1000;
            let k = key("profile", user_id, base + i as u64 + 1);
            board.push((
                k.clone(),
                vec![Change::Leaderboard {
                    board: "all-time".into(),
                    user_id,
                    xp: points,
                }],
            ));
            xp.push((
                k,
                vec![Change::Xp {
                    user_id,
                    xp: points,
                    questions: 1,
                    answers: 2,
                    accepted_answers: 0,
                }],
            ));
        }
        rm.apply("leaderboard", &board).await?;
        rm.apply("xp", &xp).await?;
    }
    for (c, chunk) in content.chunks(5000).enumerate() {
        let base = (c * 5000) as u64;
        let items: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, &content_id)| {
                let author = ids[rng.index(ids.len())];
                (
                    key("content", content_id, base + i as u64 + 1),
                    vec![Change::Content(ContentDelta {
                        content_id,
                        kind: Some("question"),
                        author_id: Some(author),
                        upvotes: rng.below(50) as i64,
                        downvotes: rng.below(5) as i64,
                        answers: rng.below(4) as i64,
                        comments: rng.below(6) as i64,
                        ..ContentDelta::default()
                    })],
                )
            })
            .collect();
        rm.apply("content", &items).await?;
    }
    Ok(Populated {
        rm,
        users: ids,
        content,
    })
}

/// Iterations always run, even past [`TIME_CAP`].
const MIN_ITERATIONS: usize = 50;
/// A query's run stops after this long (slow queries at large sizes would take minutes).
const TIME_CAP: Duration = Duration::from_secs(5);

/// Runs `iterations` of query `name` (fewer when they take longer than [`TIME_CAP`], but at
/// least [`MIN_ITERATIONS`]); `(seconds, latencies)`.
///
/// # Errors
/// Read-model failures.
pub async fn run_once(
    p: &Populated,
    name: &str,
    iterations: usize,
    rng: &mut Rng,
) -> Result<(f64, Latencies)> {
    let mut lat = Latencies::default();
    let started = Instant::now();
    for i in 0..iterations {
        if i >= MIN_ITERATIONS && started.elapsed() >= TIME_CAP {
            break;
        }
        let t = Instant::now();
        match name {
            "leaderboard_top_page" => {
                p.rm.leaderboard("all-time", 20, 0).await?;
            }
            "leaderboard_deep_page" => {
                let offset = rng.below(p.users.len() as u64);
                p.rm.leaderboard("all-time", 20, offset).await?;
            }
            "rank_of_user" => {
                let u = p.users[rng.index(p.users.len())];
                p.rm.rank("all-time", u).await?;
            }
            "user_xp" => {
                let u = p.users[rng.index(p.users.len())];
                p.rm.user_xp(u).await?;
            }
            _ => {
                let c = p.content[rng.index(p.content.len())];
                p.rm.content(c).await?;
            }
        }
        lat.push(t.elapsed());
    }
    Ok((started.elapsed().as_secs_f64(), lat))
}
