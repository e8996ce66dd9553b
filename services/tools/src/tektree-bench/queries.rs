//! Scenario 5, **queries**: the read-model queries behind `GET /v1/leaderboards/…`,
//! `GET /v1/leaderboards/{board}/users/{id}[?around=K]` and `GET /v1/content/{id}` against a
//! SQLite read-model file holding `users` users on the `all-time` board (with their XP rows)
//! and `users / 2` content rows, filled through `ReadModelStore::apply` (the projections' write
//! path, count trie included) in transactions of 5,000 changes.
//!
//! The peer: the same board as a Redis sorted set (score = XP), `ZREVRANK` of a random user
//! and `ZREVRANGE` of 20 at a random offset and around a random user (its `ZREVRANK`, then
//! `ZREVRANGE rank−10 rank+10`, two round trips as a client would send them). Redis orders
//! equal scores by member bytes descending, the board by user id ascending: the work is the
//! same, the order of ties differs. Each Redis query is a loopback round trip; ours are calls
//! into the SQLite file in the same process.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use tektree_projections::{Change, ContentDelta, EventKey, ReadModelStore, SqliteReadModels};
use uuid::Uuid;

use crate::rng::Rng;
use crate::stats::Latencies;

/// The queries measured, by name.
pub const QUERIES: [&str; 6] = [
    "leaderboard_top_page",
    "leaderboard_deep_page",
    "rank_of_user",
    "around_me",
    "user_xp",
    "content_stats",
];

/// The peer's queries (Redis sorted set), by name: `(ours, peer)` pairs for the ratio lines.
pub const PEER_QUERIES: [(&str, &str); 3] = [
    ("leaderboard_deep_page", "redis_zrevrange_deep"),
    ("rank_of_user", "redis_zrevrank"),
    ("around_me", "redis_around"),
];

/// "Around me" width of the measured query: 10 above, 10 below.
const AROUND: u32 = 10;

/// A populated read-model file.
pub struct Populated {
    /// The read models.
    pub rm: SqliteReadModels,
    /// The users on the board.
    pub users: Vec<Uuid>,
    /// Their XP, in the order of `users`.
    pub xp: Vec<i64>,
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

/// Above this many users [`populate`] fills the file directly ([`populate_bulk`]): through
/// `apply` a 10M board took over an hour here.
pub const BULK_ABOVE: u64 = 1_000_000;

/// Fills a fresh read-model file at `path` with `users` users: through `apply` (the
/// projections' write path) up to [`BULK_ABOVE`] users, else [`populate_bulk`].
///
/// # Errors
/// Read-model failures.
pub async fn populate(path: &Path, users: u64, seed: u64) -> Result<Populated> {
    if users > BULK_ABOVE {
        return populate_bulk(path, users, seed).await;
    }
    crate::corpus::remove_db(path);
    let rm = SqliteReadModels::open(path)?;
    let mut rng = Rng::new(seed);
    let ids: Vec<Uuid> = (0..users).map(|_| rng.uuid()).collect();
    let mut all_xp = Vec::with_capacity(ids.len());
    let content: Vec<Uuid> = (0..users.div_ceil(2)).map(|_| rng.uuid()).collect();
    for (c, chunk) in ids.chunks(5000).enumerate() {
        let base = (c * 5000) as u64;
        let mut board = Vec::with_capacity(chunk.len());
        let mut xp = Vec::with_capacity(chunk.len());
        for (i, &user_id) in chunk.iter().enumerate() {
            // Skewed like a real board: most users have little XP, a few very much.
            let r = rng.below(10_000) as i64;
            let points = r * r / 1000;
            all_xp.push(points);
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
        xp: all_xp,
        content,
    })
}

/// The users (ids and XP, skewed as in [`populate`]) and content ids of [`populate_bulk`].
fn draws(users: u64, seed: u64) -> (Vec<Uuid>, Vec<i64>, Vec<Uuid>) {
    let mut rng = Rng::new(seed);
    let ids: Vec<Uuid> = (0..users).map(|_| rng.uuid()).collect();
    let content: Vec<Uuid> = (0..users.div_ceil(2)).map(|_| rng.uuid()).collect();
    let xp = (0..users)
        .map(|_| {
            let r = rng.below(10_000) as i64;
            r * r / 1000
        })
        .collect();
    (ids, xp, content)
}

/// Fills the file by inserting the rows of `rm_leaderboard`, `rm_xp` and `rm_content`
/// directly (transactions of 100,000 rows, `synchronous = OFF`, a 1 GiB page cache while
/// filling; so it depends on the adapter's schema, like `growth` on the store's), then opens
/// it with `SqliteReadModels::open`, which builds the boards' count trie from the entries (as
/// for a file written before the trie existed): the structure the queries descend is the
/// adapter's own.
///
/// # Errors
/// SQLite or read-model failures.
pub async fn populate_bulk(path: &Path, users: u64, seed: u64) -> Result<Populated> {
    crate::corpus::remove_db(path);
    drop(SqliteReadModels::open(path)?);
    let (ids, xp, content) = draws(users, seed);
    let fill_path = path.to_path_buf();
    let (ids, xp, content) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut conn = rusqlite::Connection::open(&fill_path)?;
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -1048576;")?;
        for (c, (chunk, points)) in ids.chunks(100_000).zip(xp.chunks(100_000)).enumerate() {
            let tx = conn.transaction()?;
            {
                let mut board = tx.prepare(
                    "INSERT INTO rm_leaderboard (board, user_id, xp) VALUES ('all-time', ?1, ?2)",
                )?;
                let mut row = tx.prepare(
                    "INSERT INTO rm_xp (user_id, xp, questions, answers, accepted_answers)
                     VALUES (?1, ?2, 1, 2, 0)",
                )?;
                for (id, points) in chunk.iter().zip(points) {
                    board.execute(rusqlite::params![id.to_string(), points])?;
                    row.execute(rusqlite::params![id.to_string(), points])?;
                }
            }
            tx.commit()?;
            if c % 10 == 9 {
                eprintln!("tektree-bench: queries: {} users filled", (c + 1) * 100_000);
            }
        }
        for chunk in content.chunks(100_000) {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare(
                    "INSERT INTO rm_content (content_id, kind, author_id, upvotes, downvotes,
                         answer_count, comment_count)
                     VALUES (?1, 'question', ?2, ?3, ?4, ?5, ?6)",
                )?;
                for (i, id) in chunk.iter().enumerate() {
                    let author = ids[(i * 7919) % ids.len()];
                    stmt.execute(rusqlite::params![
                        id.to_string(),
                        author.to_string(),
                        (i % 50) as i64,
                        (i % 5) as i64,
                        (i % 4) as i64,
                        (i % 6) as i64
                    ])?;
                }
            }
            tx.commit()?;
        }
        Ok((ids, xp, content))
    })
    .await??;
    eprintln!("tektree-bench: queries: building the count trie");
    let open_path = path.to_path_buf();
    let rm = tokio::task::spawn_blocking(move || SqliteReadModels::open(open_path)).await??;
    Ok(Populated {
        rm,
        users: ids,
        xp,
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
            "around_me" => {
                let u = p.users[rng.index(p.users.len())];
                p.rm.around("all-time", u, AROUND).await?;
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

/// The board of a [`Populated`] file as a Redis sorted set.
pub struct RedisBoard {
    conn: redis::aio::MultiplexedConnection,
    key: String,
    users: Vec<Uuid>,
}

/// Loads `p`'s board into a fresh sorted set at `url` (pipelines of 5,000 `ZADD`s).
///
/// # Errors
/// Redis errors.
pub async fn redis_board(url: &str, p: &Populated) -> Result<RedisBoard> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let key = format!(
        "tektree-bench:board:{}",
        tektree_outbox::test_support::unique_stream_key()
    );
    for (ids, xp) in p.users.chunks(5000).zip(p.xp.chunks(5000)) {
        let mut pipe = redis::pipe();
        for (id, xp) in ids.iter().zip(xp) {
            pipe.zadd(&key, id.to_string(), *xp).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(RedisBoard {
        conn,
        key,
        users: p.users.clone(),
    })
}

impl RedisBoard {
    /// Runs `iterations` of peer query `name` as [`run_once`] does; `(seconds, latencies)`.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn run_once(
        &mut self,
        name: &str,
        iterations: usize,
        rng: &mut Rng,
    ) -> Result<(f64, Latencies)> {
        let mut lat = Latencies::default();
        let started = Instant::now();
        let n = self.users.len();
        for i in 0..iterations {
            if i >= MIN_ITERATIONS && started.elapsed() >= TIME_CAP {
                break;
            }
            let user = self.users[rng.index(n)].to_string();
            let offset = rng.below(n as u64) as isize;
            let t = Instant::now();
            match name {
                "redis_zrevrank" => {
                    let _: Option<i64> = redis::cmd("ZREVRANK")
                        .arg(&self.key)
                        .arg(&user)
                        .query_async(&mut self.conn)
                        .await?;
                }
                "redis_zrevrange_deep" => {
                    let _: Vec<(String, i64)> = redis::cmd("ZREVRANGE")
                        .arg(&self.key)
                        .arg(offset)
                        .arg(offset + 19)
                        .arg("WITHSCORES")
                        .query_async(&mut self.conn)
                        .await?;
                }
                _ => {
                    let rank: Option<isize> = redis::cmd("ZREVRANK")
                        .arg(&self.key)
                        .arg(&user)
                        .query_async(&mut self.conn)
                        .await?;
                    let r = rank.unwrap_or_default();
                    let k = AROUND as isize;
                    let _: Vec<(String, i64)> = redis::cmd("ZREVRANGE")
                        .arg(&self.key)
                        .arg((r - k).max(0))
                        .arg(r + k)
                        .arg("WITHSCORES")
                        .query_async(&mut self.conn)
                        .await?;
                }
            }
            lat.push(t.elapsed());
        }
        Ok((started.elapsed().as_secs_f64(), lat))
    }

    /// Deletes the sorted set (`UNLINK`: a `DEL` of 10M members blocks Redis for seconds and
    /// timed the client out).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn remove(mut self) -> Result<()> {
        let _: i64 = redis::cmd("UNLINK")
            .arg(&self.key)
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }
}
