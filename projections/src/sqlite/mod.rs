//! [`SqliteReadModels`]: the embedded SQLite adapter of [`ReadModelStore`].
//!
//! The design is documented on the type.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use tektree_domain::{level_for_xp, Tier};
use uuid::Uuid;

mod guards;
mod ranks;
mod rebuild;

use guards::{advance_guards, apply_all, apply_exact, GuardMemo, GuardSource};
use rebuild::Side;

use crate::rank_tree::UpperCounts;
use crate::{
    check_consumer, check_export, check_key, check_rebuild_items, export_page, int, ApplyOutcome,
    Change, Checkpoint, ContentDelta, ContentRow, EventKey, ExportCursor, ExportKey, ExportPage,
    LeaderboardRow, Projection, QuotaRow, ReadModel, ReadModelError, ReadModelStore, RebuildStatus,
    RebuildSwitch, TagRow, XpRow,
};

/// How long a statement waits for another connection's lock before failing with
/// [`ReadModelError::Backend`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The read-model tables and their DDL (idempotent), also used for a rebuild's tables (with
/// the names rewritten, see `rebuild`). The ranking index of `rm_leaderboard` is created by
/// [`rebuild::ensure_rank_index`].
pub(super) const SCHEMA_TABLES: &[(&str, &str)] = &[
    (
        "rm_xp",
        "CREATE TABLE IF NOT EXISTS rm_xp (
    user_id          TEXT    NOT NULL PRIMARY KEY,
    xp               INTEGER NOT NULL DEFAULT 0,
    questions        INTEGER NOT NULL DEFAULT 0,
    answers          INTEGER NOT NULL DEFAULT 0,
    accepted_answers INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;",
    ),
    (
        "rm_leaderboard",
        "CREATE TABLE IF NOT EXISTS rm_leaderboard (
    board   TEXT    NOT NULL,
    user_id TEXT    NOT NULL,
    xp      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (board, user_id)
) WITHOUT ROWID;",
    ),
    ("rm_leaderboard_tree", ranks::SCHEMA),
    (
        "rm_content",
        "CREATE TABLE IF NOT EXISTS rm_content (
    content_id         TEXT    NOT NULL PRIMARY KEY,
    kind               TEXT,
    question_id        TEXT,
    author_id          TEXT,
    upvotes            INTEGER NOT NULL DEFAULT 0,
    downvotes          INTEGER NOT NULL DEFAULT 0,
    answer_count       INTEGER NOT NULL DEFAULT 0,
    comment_count      INTEGER NOT NULL DEFAULT 0,
    accepted_answer_id TEXT
) WITHOUT ROWID;",
    ),
    (
        "rm_quota",
        "CREATE TABLE IF NOT EXISTS rm_quota (
    user_id     TEXT    NOT NULL,
    period      TEXT    NOT NULL,
    tier        TEXT    NOT NULL,
    used        INTEGER NOT NULL DEFAULT 0,
    limit_units INTEGER NULL,
    exceeded    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period)
) WITHOUT ROWID;",
    ),
    (
        "rm_tags",
        "CREATE TABLE IF NOT EXISTS rm_tags (
    tag       TEXT    NOT NULL PRIMARY KEY,
    questions INTEGER NOT NULL DEFAULT 0,
    answers   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;",
    ),
    (
        "rm_tier",
        "CREATE TABLE IF NOT EXISTS rm_tier (
    user_id TEXT NOT NULL PRIMARY KEY,
    tier    TEXT NOT NULL
) WITHOUT ROWID;",
    ),
];

/// Consumer bookkeeping: sequence guards, checkpoints, positions applied above a checkpoint,
/// rebuilds; idempotent. A checkpoint row's `state` names the guard key of its guard and
/// applied rows (`NULL`: the consumer's own name; after a rebuild's switch, the rebuild's).
const SCHEMA_CONSUMERS: &str = "
CREATE TABLE IF NOT EXISTS consumer_guard (
    consumer       TEXT    NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    last_sequence  INTEGER NOT NULL,
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS consumer_checkpoint (
    consumer   TEXT    NOT NULL PRIMARY KEY,
    checkpoint INTEGER NOT NULL DEFAULT 0,
    applied    INTEGER NOT NULL DEFAULT 0,
    state      TEXT
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS consumer_applied (
    consumer TEXT    NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (consumer, position)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS consumer_rebuild (
    projection  TEXT    NOT NULL PRIMARY KEY,
    generation  INTEGER NOT NULL,
    phase       TEXT    NOT NULL,
    started_ms  INTEGER NOT NULL,
    finished_ms INTEGER,
    checkpoint  INTEGER NOT NULL DEFAULT 0,
    applied     INTEGER NOT NULL DEFAULT 0,
    sealed      INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
";

/// Export of the leaderboard from its first entry: boards in name order, each in rank order,
/// from the ranking index.
const SQL_EXPORT_BOARDS: &str = "SELECT board, user_id, xp
    FROM rm_leaderboard
    ORDER BY board, xp DESC, user_id ASC LIMIT ?1";

/// Export after the entry `(board ?1, xp ?2, user_id ?3)`, first part: the board's entries
/// with the same XP and a greater user id (one range of the ranking index).
const SQL_EXPORT_TIES_AFTER: &str = "SELECT board, user_id, xp
    FROM rm_leaderboard
    WHERE board = ?1 AND xp = ?2 AND user_id > ?3
    ORDER BY board, xp DESC, user_id ASC LIMIT ?4";

/// Export after the entry `(board ?1, xp ?2, …)`, second part: the board's entries with less
/// XP (one range of the ranking index).
const SQL_EXPORT_BELOW: &str = "SELECT board, user_id, xp
    FROM rm_leaderboard
    WHERE board = ?1 AND xp < ?2
    ORDER BY board, xp DESC, user_id ASC LIMIT ?3";

/// Export after the entry `(board ?1, …)`, third part: the boards after it, from their first
/// entries (one range of the ranking index).
const SQL_EXPORT_BOARDS_AFTER: &str = "SELECT board, user_id, xp
    FROM rm_leaderboard
    WHERE board > ?1
    ORDER BY board, xp DESC, user_id ASC LIMIT ?2";

/// Export of `rm_xp` after user `?1` (`''` from the start: ids are 36-character UUID text),
/// a range of the primary key.
const SQL_EXPORT_XP: &str = "SELECT user_id, xp, questions, answers, accepted_answers
    FROM rm_xp WHERE user_id > ?1 ORDER BY user_id LIMIT ?2";

/// Export of `rm_quota` after `(user ?1, period ?2)` (`('', '')` from the start), a row-value
/// range of the primary key.
const SQL_EXPORT_QUOTA: &str = "SELECT user_id, period, tier, used, limit_units, exceeded
    FROM rm_quota WHERE (user_id, period) > (?1, ?2) ORDER BY user_id, period LIMIT ?3";

/// Tag counts: additive.
const SQL_TAG: &str = "INSERT INTO rm_tags (tag, questions, answers) VALUES (?1, ?2, ?3)
    ON CONFLICT (tag) DO UPDATE SET
        questions = questions + excluded.questions,
        answers = answers + excluded.answers";

/// Export of `rm_tags` after tag `?1` (`''` from the start), a range of the primary key.
const SQL_EXPORT_TAGS: &str = "SELECT tag, questions, answers
    FROM rm_tags WHERE tag > ?1 ORDER BY tag LIMIT ?2";

/// Usage record upsert: `used` is a maximum; tier and limit come from the record that is
/// greatest in `(used, tier, limit)` order (NULL limit lowest), which makes the upsert
/// commutative and idempotent.
const SQL_USAGE: &str = "INSERT INTO rm_quota (user_id, period, tier, used, limit_units, exceeded)
    VALUES (?1, ?2, ?3, ?4, ?5, 0)
    ON CONFLICT (user_id, period) DO UPDATE SET
        tier = CASE
            WHEN (excluded.used, excluded.tier, COALESCE(excluded.limit_units, -1))
               > (used, tier, COALESCE(limit_units, -1))
            THEN excluded.tier ELSE tier END,
        limit_units = CASE
            WHEN (excluded.used, excluded.tier, COALESCE(excluded.limit_units, -1))
               > (used, tier, COALESCE(limit_units, -1))
            THEN excluded.limit_units ELSE limit_units END,
        used = MAX(used, excluded.used)";

/// Quota exceeded: sets the flag, creating a placeholder row (used 0, current tier, unknown
/// limit) when no usage of the period arrived yet.
const SQL_EXCEEDED: &str =
    "INSERT INTO rm_quota (user_id, period, tier, used, limit_units, exceeded)
    VALUES (?1, ?2, COALESCE((SELECT tier FROM rm_tier WHERE user_id = ?1), 'free'), 0, NULL, 1)
    ON CONFLICT (user_id, period) DO UPDATE SET exceeded = 1";

const SQL_CONTENT: &str = "INSERT INTO rm_content (content_id, kind, question_id, author_id,
        upvotes, downvotes, answer_count, comment_count, accepted_answer_id)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
    ON CONFLICT (content_id) DO UPDATE SET
        kind = COALESCE(kind, excluded.kind),
        question_id = COALESCE(question_id, excluded.question_id),
        author_id = COALESCE(author_id, excluded.author_id),
        upvotes = upvotes + excluded.upvotes,
        downvotes = downvotes + excluded.downvotes,
        answer_count = answer_count + excluded.answer_count,
        comment_count = comment_count + excluded.comment_count,
        accepted_answer_id = COALESCE(accepted_answer_id, excluded.accepted_answer_id)";

const SQL_XP: &str = "INSERT INTO rm_xp (user_id, xp, questions, answers, accepted_answers)
    VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT (user_id) DO UPDATE SET
        xp = xp + excluded.xp,
        questions = questions + excluded.questions,
        answers = answers + excluded.answers,
        accepted_answers = accepted_answers + excluded.accepted_answers";

const SQL_TIER: &str = "INSERT INTO rm_tier (user_id, tier) VALUES (?1, ?2)
    ON CONFLICT (user_id) DO UPDATE SET tier = excluded.tier";

const SQL_CONTENT_COLUMNS: &str = "content_id, kind, question_id, author_id, upvotes, downvotes,
    answer_count, comment_count, accepted_answer_id";

/// Read models and consumer checkpoints in a SQLite file.
///
/// Cheap to clone: clones share the two connections.
///
/// ## File and tables
/// The read models live in the **same SQLite file** as the event store's `events` and `outbox`
/// tables (owned by `tektree-event-store`). This adapter only creates and touches tables
/// prefixed `rm_` (read models) and `consumer_` (sequence guards and checkpoints):
///
/// | table | key | content |
/// |---|---|---|
/// | `rm_xp` | `user_id` | `xp`, `questions`, `answers`, `accepted_answers` |
/// | `rm_leaderboard` | `(board, user_id)` | `xp`; index `(board, xp DESC, user_id ASC)` |
/// | `rm_leaderboard_tree` | `(board, depth, prefix)` | the boards' count trie: `n` entries under the rank-key prefix, `split` |
/// | `rm_content` | `content_id` | `kind`, `question_id`, `author_id`, vote/answer/comment counters, `accepted_answer_id` |
/// | `rm_quota` | `(user_id, period)` | `tier`, `used`, `limit_units` (`NULL` = unlimited or not known yet), `exceeded` |
/// | `rm_tier` | `user_id` | current `tier` |
/// | `rm_tags` | `tag` | `questions`, `answers` |
/// | `consumer_guard` | `(consumer, aggregate_type, aggregate_id)` | `last_sequence` |
/// | `consumer_checkpoint` | `consumer` | `checkpoint` (low-water mark), `applied` (count), `state` (guard key, below) |
/// | `consumer_applied` | `(consumer, position)` | positions applied above the checkpoint |
/// | `consumer_rebuild` | `projection` | the latest rebuild: `generation`, `phase`, `started_ms`, `finished_ms`, `checkpoint`, `applied` |
///
/// A consumer's guard and applied-position rows are keyed by its checkpoint row's `state`,
/// or by its name when that is `NULL`.
///
/// ## Rebuilds beside the live read model
/// [`ReadModelStore::rebuild_begin`] creates the projection's tables again with the suffix
/// `__rebuild` (`rm_xp__rebuild`, …; the ranking index `rm_leaderboard_rank_gN`), and
/// [`ReadModelStore::rebuild_apply`] writes them with the live statements (table names
/// rewritten) under consumer `P#gN` (`N` = generation), which
/// [`ReadModelStore::checkpoints`] does not list. The switch is one write transaction: check
/// the rebuild's checkpoint against the highest position the live consumer applied, rename
/// the live tables to `…__retired` and the rebuild's to the live names (schema edits, O(1)),
/// and set the live checkpoint row to the rebuild's checkpoint with `state = 'P#gN'`. Readers
/// see either version whole; writers queue on the write lock. The retired tables are dropped,
/// and the old guard rows deleted 10,000 per transaction, after it.
///
/// A leaderboard rebuild writes its entries only (one upsert per entry and page, no count
/// trie) until its first switch attempt, which first **seals** it: builds its trie from the
/// entries, 500 `(board, xp)` groups per transaction (`consumer_rebuild.sealed`); later pages
/// move entries in the trie as the live projection does.
///
/// Ids are stored as lowercase hyphenated UUID text, which sorts like the UUID bytes (and
/// like [`Uuid`]'s `Ord`).
///
/// ## Concurrency
/// Every connection runs in WAL mode with `synchronous = FULL` and a 10 s busy timeout. Every
/// write is one `BEGIN IMMEDIATE` transaction, so several OS processes (server, replay CLI,
/// workers) may share the file: writers queue on SQLite's write lock, readers never block.
/// One handle holds a writer and a reader connection (each behind a mutex); all SQLite work
/// runs on [`tokio::task::spawn_blocking`].
///
/// ## Checkpoint
/// After applying position `p` the adapter records `p` in `consumer_applied`, then, while
/// `checkpoint + 1` is recorded there, deletes it and advances the checkpoint. This relies on
/// **global positions being gap-free**, which holds for the SQLite event store: positions are
/// assigned inside the appending transaction, so a rolled-back append releases its positions
/// and every committed position `1..=head` exists. With a single worker applying in position
/// order `consumer_applied` stays empty (the new position is `checkpoint + 1` and is folded in
/// directly); with several workers it holds only the positions applied ahead of a slower one.
///
/// ## Commutativity
/// Every change is an upsert that commutes with changes from other aggregates: counters add
/// deltas; content facts (`kind`, `question_id`, `author_id`, `accepted_answer_id`) are set with
/// `COALESCE` (each is written by a single aggregate's events only); quota rows keep the
/// maximum `used` and take `tier`/`limit` from the usage record with the highest `used` (ties
/// broken by tier name, then limit, so that the result is a maximum over a total order), and
/// `exceeded` is an `OR`. A `payment.quota.exceeded` for a period without a row yet creates it
/// with `used = 0`, the user's tier from `rm_tier` (or `free`) and an unknown (`NULL`) limit;
/// any later usage record of the period replaces those, so the final row does not depend on
/// whether the usage or the exceeded event came first.
///
/// ## Queries
/// - A user's rank, a leaderboard page at any offset and "around me" descend the board's
///   **count trie** (`rm_leaderboard_tree`, written in the same transaction as the entries;
///   see `rank_tree` in this crate's source): per level one primary-key range of at most 255
///   sibling counts, then one range of at most 65 entries of the ranking index; a page then
///   reads the ranking index from the entry found. O(log n) in the board's size: nothing is
///   counted or skipped entry by entry. A file written before the trie existed gets its trie
///   built when it is opened.
/// - [`ReadModelStore::quota`] returns `None` when the user has no row for the period, even if
///   `rm_tier` knows their tier (the caller can derive an empty period from its rules).
/// - [`ReadModelStore::export`] pages by key (keyset), never by offset: a page is
///   `WHERE key > cursor ORDER BY key LIMIT n` on the primary key for `user_id` (xp),
///   `(user_id, period)` (a row-value comparison; quota) and `content_id` (content); a
///   leaderboard page reads up to three ranges of the ranking index (the cursor's board with
///   equal XP and a greater user id, then with less XP, then the following boards) and takes
///   ranks from the cursor, so every page costs its own rows only.
/// - Reads that take several statements (rank, an export page) run in one read transaction,
///   so they see one snapshot.
///
/// A consumer's checkpoint only advances over positions it applied, so every consumer must
/// apply every event (with no changes for the ones it ignores), as [`ReadModelStore::apply`]
/// prescribes.
#[derive(Clone)]
pub struct SqliteReadModels {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// The guards of the unsealed rebuilds this process applies pages of
    /// ([`guards::GuardMemo`]); locked after `writer`.
    memos: Mutex<HashMap<Projection, GuardMemo>>,
}

impl std::fmt::Debug for SqliteReadModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReadModels")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> ReadModelError {
    ReadModelError::Backend(e.to_string())
}

fn tier_from_str(s: &str) -> Option<Tier> {
    [Tier::Free, Tier::Pro, Tier::Team, Tier::Enterprise]
        .into_iter()
        .find(|t| t.as_str() == s)
}

fn conversion(
    idx: usize,
    ty: Type,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, ty, Box::new(e))
}

/// A UUID stored as text.
fn uuid_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Uuid> {
    let s: String = row.get(idx)?;
    Uuid::parse_str(&s).map_err(|e| conversion(idx, Type::Text, e))
}

/// An optional UUID stored as text.
fn opt_uuid_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Uuid>> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|e| conversion(idx, Type::Text, e)))
        .transpose()
}

/// A tier stored as its lower-case name.
fn tier_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Tier> {
    let s: String = row.get(idx)?;
    tier_from_str(&s).ok_or_else(|| {
        conversion(
            idx,
            Type::Text,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown tier {s:?}"),
            ),
        )
    })
}

fn xp_row(row: &Row<'_>) -> rusqlite::Result<XpRow> {
    let xp: i64 = row.get(1)?;
    Ok(XpRow {
        user_id: uuid_at(row, 0)?,
        xp,
        level: level_for_xp(xp),
        questions: row.get(2)?,
        answers: row.get(3)?,
        accepted_answers: row.get(4)?,
    })
}

fn tag_row(row: &Row<'_>) -> rusqlite::Result<TagRow> {
    Ok(TagRow {
        tag: row.get(0)?,
        questions: row.get(1)?,
        answers: row.get(2)?,
    })
}

fn quota_row(row: &Row<'_>) -> rusqlite::Result<QuotaRow> {
    Ok(QuotaRow {
        user_id: uuid_at(row, 0)?,
        period: row.get(1)?,
        tier: tier_at(row, 2)?,
        used: row.get(3)?,
        limit: row.get(4)?,
        exceeded: row.get(5)?,
    })
}

fn content_row(row: &Row<'_>) -> rusqlite::Result<ContentRow> {
    let upvotes: i64 = row.get(4)?;
    let downvotes: i64 = row.get(5)?;
    Ok(ContentRow {
        content_id: uuid_at(row, 0)?,
        kind: row.get(1)?,
        question_id: opt_uuid_at(row, 2)?,
        author_id: opt_uuid_at(row, 3)?,
        score: upvotes - downvotes,
        upvotes,
        downvotes,
        answer_count: row.get(6)?,
        comment_count: row.get(7)?,
        accepted_answer_id: opt_uuid_at(row, 8)?,
    })
}

/// Opens one connection with the adapter's pragmas.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_handler(Some(wait_for_lock))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("cannot switch to WAL journal mode (got {mode:?})")),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// SQLite's busy handler: called with the number of earlier calls for the same lock, returns
/// whether to try again. Sleeps 50 µs, 100 µs, … up to 1 ms, then 1 ms per call, for about
/// [`BUSY_TIMEOUT`] in all. SQLite's own (`busy_timeout`) sleeps 1, 2, 5, 10, … up to 100 ms
/// between tries, which put whole sleeps of tens of milliseconds into read-model latency
/// whenever the workers, the relay and the appends met on the write lock.
fn wait_for_lock(calls: i32) -> bool {
    let step = Duration::from_micros(50 * (calls.clamp(0, 19) as u64 + 1));
    std::thread::sleep(step);
    // 20 short sleeps take 10.5 ms; then 1 ms each.
    calls < 20 + (BUSY_TIMEOUT.as_millis() as i32)
}

/// Opens the writer and reader connections and creates the missing tables.
fn open_connections(path: &Path) -> rusqlite::Result<(Connection, Connection)> {
    let mut writer = connect(path)?;
    let tx = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (_, ddl) in SCHEMA_TABLES {
        tx.execute_batch(ddl)?;
    }
    rebuild::ensure_rank_index(&tx, "rm_leaderboard", "rm_leaderboard_rank")?;
    tx.execute_batch(SCHEMA_CONSUMERS)?;
    // Files written before rebuilds beside the live read model: add the guard-key column.
    let has_state: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('consumer_checkpoint') WHERE name = 'state')",
        [],
        |r| r.get(0),
    )?;
    if !has_state {
        tx.execute_batch("ALTER TABLE consumer_checkpoint ADD COLUMN state TEXT")?;
    }
    ranks::build_if_missing(&tx).map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(e.to_string()),
        )
    })?;
    tx.commit()?;
    let reader = connect(path)?;
    Ok((writer, reader))
}

/// `SQLITE_BUSY` / `SQLITE_LOCKED`.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl SqliteReadModels {
    /// Opens (creating if needed) the SQLite file at `path` and creates the `rm_*` and
    /// `consumer_*` tables that are missing. Other tables in the file are left alone.
    ///
    /// Blocks on file I/O (and on another process's write lock, up to the busy timeout); call
    /// it at start-up or inside [`tokio::task::spawn_blocking`].
    ///
    /// # Errors
    /// [`ReadModelError::Invalid`] for an in-memory path (`:memory:`: the handle's two
    /// connections must see the same database); [`ReadModelError::Backend`] when the file
    /// cannot be opened, switched to WAL or migrated.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadModelError> {
        let path = path.as_ref().to_path_buf();
        if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" {
            return Err(ReadModelError::Invalid(
                "the read-model store needs a file path, not an in-memory database".into(),
            ));
        }
        // While another process creates the file or switches it to WAL, SQLite can report
        // SQLITE_BUSY without waiting on the busy handler; retry for up to the busy timeout.
        let started = std::time::Instant::now();
        let (writer, reader) = loop {
            match open_connections(&path) {
                Ok(c) => break c,
                Err(e) if is_busy(&e) && started.elapsed() < BUSY_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(ReadModelError::Backend(format!("{}: {e}", path.display()))),
            }
        };
        Ok(SqliteReadModels {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                memos: Mutex::default(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the writer (`write`) or reader connection on the blocking pool.
    async fn run<T, F>(&self, write: bool, f: F) -> Result<T, ReadModelError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, ReadModelError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mutex = if write { &inner.writer } else { &inner.reader };
            let mut conn = mutex.lock().unwrap_or_else(PoisonError::into_inner);
            if !conn.is_autocommit() {
                // A panic unwound through an open transaction; drop its work.
                conn.execute_batch("ROLLBACK").map_err(backend)?;
            }
            f(&mut conn)
        })
        .await
        .map_err(|e| ReadModelError::Backend(format!("read-model task failed: {e}")))?
    }
}

impl SqliteReadModels {
    /// Applies checked `keys` with the changes of `items` for `target`.
    async fn apply_to(
        &self,
        target: Target,
        keys: Vec<Key>,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        let changes: Vec<Vec<Change>> = items.iter().map(|(_, c)| c.clone()).collect();
        let inner = Arc::clone(&self.inner);
        self.run(true, move |conn| {
            apply_batch(conn, &inner.memos, &target, &keys, &changes)
        })
        .await
    }
}

/// The consumer's checkpoint row, kept in memory during one batch.
struct Progress {
    checkpoint: i64,
    applied: i64,
    dirty: bool,
    /// Whether `consumer_applied` may hold rows of this consumer (positions applied above
    /// the checkpoint). When it holds none, the in-order case needs no statement at all.
    above: bool,
    /// The key of the consumer's guard and applied-position rows: its own name, or after a
    /// rebuild's switch the rebuild's (the row's `state`).
    key: String,
}

impl Progress {
    fn load(tx: &Transaction<'_>, consumer: &str) -> rusqlite::Result<Self> {
        let row: Option<(i64, i64, Option<String>)> = tx
            .prepare_cached(
                "SELECT checkpoint, applied, state FROM consumer_checkpoint WHERE consumer = ?1",
            )?
            .query_row([consumer], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let (checkpoint, applied, state) = row.unwrap_or((0, 0, None));
        let key = state.unwrap_or_else(|| consumer.to_owned());
        let above = tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM consumer_applied WHERE consumer = ?1)")?
            .query_row([&key], |r| r.get(0))?;
        Ok(Progress {
            checkpoint,
            applied,
            dirty: false,
            above,
            key,
        })
    }

    /// Records that `position` was applied and advances the low-water mark.
    fn record(&mut self, tx: &Transaction<'_>, position: i64) -> rusqlite::Result<()> {
        self.applied += 1;
        self.dirty = true;
        if position <= self.checkpoint {
            // Only possible if positions were reused; nothing to track.
            return Ok(());
        }
        if position == self.checkpoint + 1 {
            // The common in-order case: fold in directly instead of insert + delete.
            self.checkpoint = position;
        } else {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO consumer_applied (consumer, position) VALUES (?1, ?2)",
            )?
            .execute(params![self.key, position])?;
            self.above = true;
        }
        if !self.above {
            return Ok(());
        }
        let mut next = tx
            .prepare_cached("DELETE FROM consumer_applied WHERE consumer = ?1 AND position = ?2")?;
        while next.execute(params![self.key, self.checkpoint + 1])? == 1 {
            self.checkpoint += 1;
        }
        Ok(())
    }

    /// `(checkpoint, applied)`: changes with every batch that applies something.
    fn version(&self) -> (i64, i64) {
        (self.checkpoint, self.applied)
    }

    fn save(&self, tx: &Transaction<'_>, consumer: &str) -> rusqlite::Result<()> {
        if self.dirty {
            tx.prepare_cached(
                "INSERT INTO consumer_checkpoint (consumer, checkpoint, applied) VALUES (?1, ?2, ?3)
                 ON CONFLICT (consumer) DO UPDATE SET
                     checkpoint = excluded.checkpoint, applied = excluded.applied",
            )?
            .execute(params![consumer, self.checkpoint, self.applied])?;
        }
        Ok(())
    }
}

/// Applies one read-model change inside the batch transaction.
fn apply_change(tx: &Transaction<'_>, side: Side, change: &Change) -> Result<(), ReadModelError> {
    let n = match change {
        Change::Xp {
            user_id,
            xp,
            questions,
            answers,
            accepted_answers,
        } => tx.prepare_cached(&side.sql(SQL_XP)).and_then(|mut s| {
            s.execute(params![
                user_id.to_string(),
                xp,
                questions,
                answers,
                accepted_answers
            ])
        }),
        Change::Leaderboard { board, user_id, xp } => {
            // Summed by `Sums` in a batch; alone, it still moves the entry in the count trie.
            let mut upper = UpperCounts::default();
            ranks::add_xp(tx, side, &mut upper, board, *user_id, *xp)?;
            return ranks::flush(tx, side, upper);
        }
        Change::Content(ContentDelta {
            content_id,
            kind,
            question_id,
            author_id,
            upvotes,
            downvotes,
            answers,
            comments,
            accepted_answer_id,
        }) => tx.prepare_cached(&side.sql(SQL_CONTENT)).and_then(|mut s| {
            s.execute(params![
                content_id.to_string(),
                kind,
                question_id.map(|u| u.to_string()),
                author_id.map(|u| u.to_string()),
                upvotes,
                downvotes,
                answers,
                comments,
                accepted_answer_id.map(|u| u.to_string()),
            ])
        }),
        Change::Usage {
            user_id,
            period,
            tier,
            used,
            limit,
        } => {
            let used = int(*used, "used")?;
            let limit = limit.map(|l| int(l, "limit")).transpose()?;
            tx.prepare_cached(&side.sql(SQL_USAGE)).and_then(|mut s| {
                s.execute(params![
                    user_id.to_string(),
                    period,
                    tier.as_str(),
                    used,
                    limit
                ])
            })
        }
        Change::QuotaExceeded { user_id, period } => tx
            .prepare_cached(&side.sql(SQL_EXCEEDED))
            .and_then(|mut s| s.execute(params![user_id.to_string(), period])),
        Change::Tag {
            tag,
            questions,
            answers,
        } => tx
            .prepare_cached(&side.sql(SQL_TAG))
            .and_then(|mut s| s.execute(params![tag, questions, answers])),
        Change::Tier { user_id, tier } => tx
            .prepare_cached(&side.sql(SQL_TIER))
            .and_then(|mut s| s.execute(params![user_id.to_string(), tier.as_str()])),
    };
    n.map(drop).map_err(backend)
}

/// One key converted for SQLite.
struct Key {
    aggregate_type: String,
    /// The aggregate id as stored (text).
    aggregate_id: String,
    /// The same id.
    id: Uuid,
    sequence: i64,
    position: i64,
}

fn check_items(
    consumer: &str,
    items: &[(EventKey, Vec<Change>)],
) -> Result<Vec<Key>, ReadModelError> {
    check_consumer(consumer)?;
    items
        .iter()
        .map(|(k, _)| {
            let (sequence, position) = check_key(k)?;
            Ok(Key {
                aggregate_type: k.aggregate_type.clone(),
                aggregate_id: k.aggregate_id.to_string(),
                id: k.aggregate_id,
                sequence,
                position,
            })
        })
        .collect()
}

/// Whose batch [`apply_batch`] applies.
enum Target {
    /// A live consumer (projection or policy), on the live tables.
    Live(String),
    /// The rebuild of a projection in progress, on its tables.
    Rebuild(Projection),
}

/// The whole batch in one `BEGIN IMMEDIATE` transaction.
fn apply_batch(
    conn: &mut Connection,
    memos: &Mutex<HashMap<Projection, GuardMemo>>,
    target: &Target,
    keys: &[Key],
    changes: &[Vec<Change>],
) -> Result<Vec<ApplyOutcome>, ReadModelError> {
    if let Target::Rebuild(projection) = target {
        // A memo filled by the last page is flushed before this one, so that an error of the
        // flush is an error of a batch that applied nothing.
        let mut memos = memos.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(memo) = memos.get_mut(projection).filter(|m| m.full()) {
            memo.flush(conn, &rebuild::guard_log(*projection))?;
        }
    }
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)?;
    let (consumer, side) = match target {
        Target::Live(consumer) => (consumer.clone(), Side::Live),
        Target::Rebuild(projection) => rebuild::building(&tx, *projection)?,
    };
    let consumer = consumer.as_str();
    let mut progress = Progress::load(&tx, consumer).map_err(backend)?;
    if let (Target::Rebuild(projection), Side::RebuildBulk) = (target, side) {
        // An unsealed rebuild: guards in memory, appended to its log.
        let mut memos = memos.lock().unwrap_or_else(PoisonError::into_inner);
        let memo = memos.entry(*projection).or_default();
        let log = rebuild::guard_log(*projection);
        memo.sync(&tx, consumer, &log, progress.version())?;
        let mut source = memo.source(&log);
        let outcomes = apply_exact(&tx, side, &mut progress, keys, changes, &mut source)?;
        progress.save(&tx, consumer).map_err(backend)?;
        tx.commit().map_err(backend)?;
        if let GuardSource::Memo(batch) = source {
            batch.commit(progress.version());
        }
        return Ok(outcomes);
    }
    let outcomes = if advance_guards(&mut tx, &progress.key, keys)? {
        apply_all(&tx, side, &mut progress, keys, changes)?
    } else {
        let key = progress.key.clone();
        let mut source = GuardSource::Table(&key);
        apply_exact(&tx, side, &mut progress, keys, changes, &mut source)?
    };
    progress.save(&tx, consumer).map_err(backend)?;
    tx.commit().map_err(backend)?;
    Ok(outcomes)
}

/// The purely additive changes of a batch (`xp`, `leaderboard`), summed per row and written
/// with one upsert per row at the end of the batch. Addition commutes, so the rows end as
/// with one upsert per change; a row whose deltas sum to zero is still created, as it was.
#[derive(Default)]
struct Sums {
    /// Per user: Δ xp, questions, answers, accepted answers.
    xp: HashMap<Uuid, [i64; 4]>,
    /// Per (board, user): Δ xp.
    leaderboard: HashMap<(String, Uuid), i64>,
}

impl Sums {
    /// Adds `change` when it is additive; `false` for any other change (apply it directly).
    fn add(&mut self, change: &Change) -> bool {
        match change {
            Change::Xp {
                user_id,
                xp,
                questions,
                answers,
                accepted_answers,
            } => {
                let row = self.xp.entry(*user_id).or_default();
                for (sum, delta) in row
                    .iter_mut()
                    .zip([xp, questions, answers, accepted_answers])
                {
                    *sum += delta;
                }
                true
            }
            Change::Leaderboard { board, user_id, xp } => {
                *self
                    .leaderboard
                    .entry((board.clone(), *user_id))
                    .or_default() += xp;
                true
            }
            _ => false,
        }
    }

    /// Applies one item's `changes`: the additive ones into the sums, the others at once.
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        side: Side,
        changes: &[Change],
    ) -> Result<(), ReadModelError> {
        for change in changes {
            if !self.add(change) {
                apply_change(tx, side, change)?;
            }
        }
        Ok(())
    }

    /// Writes the sums, one upsert per row, through [`apply_change`].
    /// Writes the sums in key order (a UUID sorts as its text), so that a batch walks each
    /// table's B-tree from left to right instead of jumping between its pages.
    fn flush(self, tx: &Transaction<'_>, side: Side) -> Result<(), ReadModelError> {
        let mut xp_rows: Vec<_> = self.xp.into_iter().collect();
        xp_rows.sort_unstable_by_key(|(user_id, _)| *user_id);
        for (user_id, [xp, questions, answers, accepted_answers]) in xp_rows {
            let change = Change::Xp {
                user_id,
                xp,
                questions,
                answers,
                accepted_answers,
            };
            apply_change(tx, side, &change)?;
        }
        let mut upper = UpperCounts::default();
        let mut entries: Vec<_> = self.leaderboard.into_iter().collect();
        entries.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        for ((board, user_id), xp) in entries {
            ranks::add_xp(tx, side, &mut upper, &board, user_id, xp)?;
        }
        ranks::flush(tx, side, upper)
    }
}

/// Export of `rm_content` after content `?1` (`''` from the start), a range of the primary
/// key.
fn sql_export_content() -> String {
    format!(
        "SELECT {SQL_CONTENT_COLUMNS} FROM rm_content WHERE content_id > ?1
         ORDER BY content_id LIMIT ?2"
    )
}

/// One export page of `model` after `after` (a cursor of `model`), in one read transaction.
fn export_page_of(
    conn: &mut Connection,
    model: ReadModel,
    after: Option<ExportKey>,
    limit: u32,
) -> Result<ExportPage, ReadModelError> {
    let tx = conn.transaction().map_err(backend)?;
    let n = i64::from(limit);
    let page = match (model, after) {
        (ReadModel::Xp, after) => {
            let user = match after {
                Some(ExportKey::Xp { user_id }) => user_id.to_string(),
                _ => String::new(),
            };
            let rows = tx
                .prepare_cached(SQL_EXPORT_XP)
                .and_then(|mut s| s.query_map(params![user, n], xp_row)?.collect())
                .map_err(backend)?;
            export_page(rows, limit, ExportKey::xp)?
        }
        (ReadModel::Quota, after) => {
            let (user, period) = match after {
                Some(ExportKey::Quota { user_id, period }) => (user_id.to_string(), period),
                _ => (String::new(), String::new()),
            };
            let rows = tx
                .prepare_cached(SQL_EXPORT_QUOTA)
                .and_then(|mut s| s.query_map(params![user, period, n], quota_row)?.collect())
                .map_err(backend)?;
            export_page(rows, limit, ExportKey::quota)?
        }
        (ReadModel::Content, after) => {
            let content = match after {
                Some(ExportKey::Content { content_id }) => content_id.to_string(),
                _ => String::new(),
            };
            let rows = tx
                .prepare_cached(&sql_export_content())
                .and_then(|mut s| s.query_map(params![content, n], content_row)?.collect())
                .map_err(backend)?;
            export_page(rows, limit, ExportKey::content)?
        }
        (ReadModel::Tags, after) => {
            let tag = match after {
                Some(ExportKey::Tags { tag }) => tag,
                _ => String::new(),
            };
            let rows = tx
                .prepare_cached(SQL_EXPORT_TAGS)
                .and_then(|mut s| s.query_map(params![tag, n], tag_row)?.collect())
                .map_err(backend)?;
            export_page(rows, limit, ExportKey::tags)?
        }
        (ReadModel::Leaderboard, after) => {
            let rows = export_leaderboard(&tx, after, n).map_err(backend)?;
            export_page(rows, limit, ExportKey::leaderboard)?
        }
    };
    tx.finish().map_err(backend)?;
    Ok(page)
}

/// Up to `limit` leaderboard entries after `after` (a leaderboard key, or `None` from the
/// start) in export order, each a range of the ranking index: the cursor's board with equal XP
/// and a greater user id, then with less XP, then the following boards. Ranks continue from
/// the cursor's and restart at 1 on each new board; nothing is counted.
fn export_leaderboard(
    tx: &Transaction<'_>,
    after: Option<ExportKey>,
    limit: i64,
) -> rusqlite::Result<Vec<LeaderboardRow>> {
    type Entry = (String, Uuid, i64);
    let read = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<Vec<Entry>> {
        tx.prepare_cached(sql)?
            .query_map(p, |r| Ok((r.get(0)?, uuid_at(r, 1)?, r.get(2)?)))?
            .collect()
    };
    let mut entries: Vec<Entry>;
    let mut prev: Option<(String, u64)> = None;
    match after {
        Some(ExportKey::Leaderboard {
            board,
            xp,
            user_id,
            rank,
        }) => {
            let user = user_id.to_string();
            entries = read(SQL_EXPORT_TIES_AFTER, &[&board, &xp, &user, &limit])?;
            let left = |e: &Vec<Entry>| limit - e.len() as i64;
            if left(&entries) > 0 {
                let more = read(SQL_EXPORT_BELOW, &[&board, &xp, &left(&entries)])?;
                entries.extend(more);
            }
            if left(&entries) > 0 {
                let more = read(SQL_EXPORT_BOARDS_AFTER, &[&board, &left(&entries)])?;
                entries.extend(more);
            }
            prev = Some((board, rank));
        }
        _ => entries = read(SQL_EXPORT_BOARDS, &[&limit])?,
    }
    let mut rows = Vec::with_capacity(entries.len());
    for (board, user_id, xp) in entries {
        let rank = match &prev {
            Some((b, r)) if *b == board => r + 1,
            _ => 1,
        };
        prev = Some((board.clone(), rank));
        rows.push(LeaderboardRow {
            board,
            rank,
            user_id,
            xp,
        });
    }
    Ok(rows)
}

#[async_trait]
impl ReadModelStore for SqliteReadModels {
    async fn apply(
        &self,
        consumer: &str,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        let keys = check_items(consumer, items)?;
        self.apply_to(Target::Live(consumer.to_string()), keys, items)
            .await
    }

    /// 10,000: measured by `tektree-bench --scenario replay` at 1M events against 1,000,
    /// 1.5× (`xp`) to 2.2× (`leaderboard`) the events/s at 55–65 MiB peak RSS
    /// (docs/performance.md, issue #14).
    fn rebuild_page(&self) -> usize {
        10_000
    }

    async fn reset(&self, projection: Projection) -> Result<(), ReadModelError> {
        let consumer = projection.to_string();
        self.run(true, move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            for table in rebuild::tables(projection) {
                tx.execute(&format!("DELETE FROM {table}"), [])
                    .map_err(backend)?;
            }
            let key = Progress::load(&tx, &consumer).map_err(backend)?.key;
            for (table, name) in [
                ("consumer_guard", &key),
                ("consumer_applied", &key),
                ("consumer_checkpoint", &consumer),
            ] {
                tx.execute(&format!("DELETE FROM {table} WHERE consumer = ?1"), [name])
                    .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn rebuild_begin(&self, projection: Projection) -> Result<RebuildStatus, ReadModelError> {
        self.run(true, move |conn| rebuild::begin(conn, projection))
            .await
    }

    async fn rebuild_apply(
        &self,
        projection: Projection,
        items: &[(EventKey, Vec<Change>)],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        check_rebuild_items(projection, items)?;
        let keys = check_items(projection.name(), items)?;
        if keys.is_empty() {
            // Nothing to write, but the same answer as a batch: is a rebuild in progress?
            return self
                .run(false, move |conn| {
                    let tx = conn.transaction().map_err(backend)?;
                    rebuild::building(&tx, projection).map(|_| vec![])
                })
                .await;
        }
        self.apply_to(Target::Rebuild(projection), keys, items)
            .await
    }

    async fn rebuild_switch(
        &self,
        projection: Projection,
    ) -> Result<RebuildSwitch, ReadModelError> {
        let inner = Arc::clone(&self.inner);
        self.run(true, move |conn| {
            rebuild::switch(conn, &inner.memos, projection)
        })
        .await
    }

    async fn rebuild_cancel(&self, projection: Projection) -> Result<bool, ReadModelError> {
        let inner = Arc::clone(&self.inner);
        self.run(true, move |conn| {
            rebuild::cancel(conn, &inner.memos, projection)
        })
        .await
    }

    async fn rebuilds(&self) -> Result<Vec<RebuildStatus>, ReadModelError> {
        self.run(false, rebuild::statuses).await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ReadModelError> {
        self.run(false, |conn| {
            conn.prepare_cached(
                "SELECT consumer, checkpoint, applied FROM consumer_checkpoint
                 WHERE instr(consumer, '#') = 0 ORDER BY consumer",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(Checkpoint {
                        name: r.get(0)?,
                        checkpoint: r.get(1)?,
                        applied: r.get(2)?,
                    })
                })?
                .collect()
            })
            .map_err(backend)
        })
        .await
    }

    async fn user_xp(&self, user_id: Uuid) -> Result<Option<XpRow>, ReadModelError> {
        self.run(false, move |conn| {
            conn.prepare_cached(
                "SELECT user_id, xp, questions, answers, accepted_answers FROM rm_xp
                 WHERE user_id = ?1",
            )
            .and_then(|mut s| s.query_row([user_id.to_string()], xp_row).optional())
            .map_err(backend)
        })
        .await
    }

    async fn leaderboard(
        &self,
        board: &str,
        limit: u32,
        offset: u64,
    ) -> Result<Vec<LeaderboardRow>, ReadModelError> {
        int(offset, "offset")?;
        let board = board.to_string();
        self.run(false, move |conn| ranks::page(conn, &board, limit, offset))
            .await
    }

    async fn rank(
        &self,
        board: &str,
        user_id: Uuid,
    ) -> Result<Option<LeaderboardRow>, ReadModelError> {
        let board = board.to_string();
        self.run(false, move |conn| ranks::rank(conn, &board, user_id))
            .await
    }

    async fn around(
        &self,
        board: &str,
        user_id: Uuid,
        k: u32,
    ) -> Result<Option<Vec<LeaderboardRow>>, ReadModelError> {
        let board = board.to_string();
        self.run(false, move |conn| ranks::around(conn, &board, user_id, k))
            .await
    }

    async fn quota(&self, user_id: Uuid, period: &str) -> Result<Option<QuotaRow>, ReadModelError> {
        // A user with a tier but no usage in `period` has no row: `None` (the caller knows the
        // tier's limit from its rules if it needs to show an empty period).
        let period = period.to_string();
        self.run(false, move |conn| {
            conn.prepare_cached(
                "SELECT user_id, period, tier, used, limit_units, exceeded FROM rm_quota
                 WHERE user_id = ?1 AND period = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![user_id.to_string(), period], quota_row)
                    .optional()
            })
            .map_err(backend)
        })
        .await
    }

    async fn tier(&self, user_id: Uuid) -> Result<Option<Tier>, ReadModelError> {
        self.run(false, move |conn| {
            conn.prepare_cached("SELECT tier FROM rm_tier WHERE user_id = ?1")
                .and_then(|mut s| {
                    s.query_row(params![user_id.to_string()], |row| tier_at(row, 0))
                        .optional()
                })
                .map_err(backend)
        })
        .await
    }

    async fn content(&self, content_id: Uuid) -> Result<Option<ContentRow>, ReadModelError> {
        self.run(false, move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SQL_CONTENT_COLUMNS} FROM rm_content WHERE content_id = ?1"
            ))
            .and_then(|mut s| {
                s.query_row([content_id.to_string()], content_row)
                    .optional()
            })
            .map_err(backend)
        })
        .await
    }

    async fn tag(&self, tag: &str) -> Result<Option<TagRow>, ReadModelError> {
        let tag = tag.to_string();
        self.run(false, move |conn| {
            conn.prepare_cached("SELECT tag, questions, answers FROM rm_tags WHERE tag = ?1")
                .and_then(|mut s| s.query_row([tag], tag_row).optional())
                .map_err(backend)
        })
        .await
    }

    async fn export(
        &self,
        model: ReadModel,
        after: Option<&ExportCursor>,
        limit: u32,
    ) -> Result<ExportPage, ReadModelError> {
        let after = check_export(model, after, limit)?;
        self.run(false, move |conn| export_page_of(conn, model, after, limit))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteReadModels) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteReadModels::open(dir.path().join("tektree.db")).unwrap();
        (dir, store)
    }

    fn key(aggregate_id: Uuid, sequence: u64, position: u64) -> EventKey {
        EventKey {
            aggregate_type: "subscription".into(),
            aggregate_id,
            sequence,
            position,
        }
    }

    fn plan(conn: &Connection, sql: &str, n: usize) -> String {
        let mut s = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let params: Vec<i64> = vec![0; n];
        let rows: Vec<String> = s
            .query_map(rusqlite::params_from_iter(params), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.join("\n")
    }

    #[test]
    fn pages_and_ranks_are_answered_from_the_ranking_index() {
        let (_dir, store) = store();
        let conn = store.inner.reader.lock().unwrap();
        for (sql, n, range) in ranks::PLANNED {
            let p = plan(&conn, sql, *n);
            assert!(!p.contains("TEMP B-TREE"), "{p}");
            assert!(!p.contains("SCAN"), "{p}");
            assert!(p.contains(range), "{p}");
        }
        for (sql, n, range) in [
            (
                SQL_EXPORT_BOARDS,
                1,
                "SCAN rm_leaderboard USING COVERING INDEX",
            ),
            (SQL_EXPORT_TIES_AFTER, 4, "(board=? AND xp=? AND user_id>?)"),
            (SQL_EXPORT_BELOW, 3, "(board=? AND xp<?)"),
            (SQL_EXPORT_BOARDS_AFTER, 2, "(board>?)"),
        ] {
            let p = plan(&conn, sql, n);
            assert!(!p.contains("TEMP B-TREE"), "{p}");
            assert!(p.contains("COVERING INDEX rm_leaderboard_rank"), "{p}");
            assert!(p.contains(range), "{p}");
        }
    }

    #[tokio::test]
    async fn a_missing_count_trie_is_built_when_the_file_is_opened() {
        let (dir, store) = store();
        let users: Vec<Uuid> = (1..=200u128).map(|i| Uuid::from_u128(i << 100)).collect();
        let items: Vec<(EventKey, Vec<Change>)> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let mut k = key(*u, 1, i as u64 + 1);
                k.aggregate_type = "profile".into();
                let xp = (i % 3) as i64; // three ties of about 67 entries: splits
                (
                    k,
                    vec![Change::Leaderboard {
                        board: "all-time".into(),
                        user_id: *u,
                        xp,
                    }],
                )
            })
            .collect();
        store.apply("leaderboard", &items).await.unwrap();
        let before: Vec<LeaderboardRow> = store.leaderboard("all-time", 300, 0).await.unwrap();
        assert_eq!(before.len(), 200);
        store
            .inner
            .writer
            .lock()
            .unwrap()
            .execute("DELETE FROM rm_leaderboard_tree", [])
            .unwrap();
        drop(store);
        let reopened = SqliteReadModels::open(dir.path().join("tektree.db")).unwrap();
        assert_eq!(
            reopened.leaderboard("all-time", 300, 0).await.unwrap(),
            before
        );
        for row in &before {
            assert_eq!(
                reopened
                    .rank("all-time", row.user_id)
                    .await
                    .unwrap()
                    .as_ref(),
                Some(row)
            );
        }
        // Ranks by the oracle: XP 2 first, then 1, then 0; ids ascending within.
        let mut want: Vec<(i64, Uuid)> = users
            .iter()
            .enumerate()
            .map(|(i, u)| ((i % 3) as i64, *u))
            .collect();
        want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let got: Vec<(i64, Uuid)> = before.iter().map(|r| (r.xp, r.user_id)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn exports_read_a_primary_key_range_in_key_order() {
        let (_dir, store) = store();
        let conn = store.inner.reader.lock().unwrap();
        for (sql, n, search) in [
            (
                SQL_EXPORT_XP.to_string(),
                2,
                "SEARCH rm_xp USING PRIMARY KEY (user_id>?)",
            ),
            (
                SQL_EXPORT_QUOTA.to_string(),
                3,
                "SEARCH rm_quota USING PRIMARY KEY ((user_id,period)>(?,?))",
            ),
            (
                sql_export_content(),
                2,
                "SEARCH rm_content USING PRIMARY KEY (content_id>?)",
            ),
        ] {
            let p = plan(&conn, &sql, n);
            assert!(!p.contains("TEMP B-TREE"), "{p}");
            assert_eq!(p, search);
        }
    }

    #[test]
    fn open_creates_only_prefixed_tables_next_to_foreign_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE events (position INTEGER PRIMARY KEY, x TEXT);")
                .unwrap();
        }
        let a = SqliteReadModels::open(&path).unwrap();
        let b = SqliteReadModels::open(&path).unwrap();
        assert_eq!(a.path(), b.path());
        let conn = a.inner.reader.lock().unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous = FULL");
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(tables.contains(&"events".to_string()));
        for t in &tables {
            assert!(
                t == "events" || t.starts_with("rm_") || t.starts_with("consumer_"),
                "{t}"
            );
        }
        // events, rm_xp, rm_leaderboard, rm_leaderboard_tree, rm_content, rm_quota, rm_tags,
        // rm_tier and the four consumer_ tables.
        assert_eq!(tables.len(), 12, "{tables:?}");
    }

    #[test]
    fn concurrent_opens_of_a_new_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.db");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || SqliteReadModels::open(path).map(drop))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }

    #[test]
    fn in_memory_paths_are_rejected() {
        assert!(matches!(
            SqliteReadModels::open(":memory:"),
            Err(ReadModelError::Invalid(_))
        ));
    }

    fn quota_row_after(changes: &[Change]) -> QuotaRow {
        let (_dir, store) = store();
        let mut conn = store.inner.writer.lock().unwrap();
        let tx = conn.transaction().unwrap();
        for c in changes {
            apply_change(&tx, Side::Live, c).unwrap();
        }
        tx.commit().unwrap();
        conn.query_row(
            "SELECT user_id, period, tier, used, limit_units, exceeded FROM rm_quota",
            [],
            quota_row,
        )
        .unwrap()
    }

    #[test]
    fn quota_rows_do_not_depend_on_the_order_of_usage_and_exceeded() {
        let user_id = Uuid::new_v4();
        let period = "2024-05".to_string();
        let tier = Change::Tier {
            user_id,
            tier: Tier::Pro,
        };
        let usage = |used, tier, limit| Change::Usage {
            user_id,
            period: period.clone(),
            tier,
            used,
            limit,
        };
        let exceeded = Change::QuotaExceeded {
            user_id,
            period: period.clone(),
        };
        let changes = [
            tier.clone(),
            usage(2, Tier::Free, Some(1)),
            usage(3, Tier::Pro, Some(1000)),
            usage(1, Tier::Free, Some(1)),
            exceeded.clone(),
        ];
        let expected = QuotaRow {
            user_id,
            period: period.clone(),
            tier: Tier::Pro,
            used: 3,
            limit: Some(1000),
            exceeded: true,
        };
        // Every rotation and the reverse of the list.
        for r in 0..changes.len() {
            let mut c = changes.to_vec();
            c.rotate_left(r);
            assert_eq!(quota_row_after(&c), expected, "rotation {r}");
            c.reverse();
            assert_eq!(quota_row_after(&c), expected, "reversed rotation {r}");
        }
        // Exceeded alone: a placeholder with the current tier, unknown limit.
        assert_eq!(
            quota_row_after(&[tier.clone(), exceeded.clone()]),
            QuotaRow {
                tier: Tier::Pro,
                used: 0,
                limit: None,
                ..expected.clone()
            }
        );
        assert_eq!(
            quota_row_after(std::slice::from_ref(&exceeded)).tier,
            Tier::Free,
            "no tier known yet"
        );
        // Applying the same records twice changes nothing (max and or are idempotent).
        let twice: Vec<Change> = changes.iter().chain(changes.iter()).cloned().collect();
        assert_eq!(quota_row_after(&twice), expected);
    }

    fn pending(store: &SqliteReadModels, consumer: &str) -> Vec<i64> {
        let conn = store.inner.reader.lock().unwrap();
        let positions = conn
            .prepare("SELECT position FROM consumer_applied WHERE consumer = ?1 ORDER BY position")
            .unwrap()
            .query_map([consumer], |r| r.get(0))
            .unwrap()
            .collect::<Result<Vec<i64>, _>>()
            .unwrap();
        positions
    }

    #[tokio::test]
    async fn applied_positions_above_the_checkpoint_are_kept_until_the_gap_closes() {
        let (_dir, store) = store();
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        // In order: nothing is parked.
        let items: Vec<(EventKey, Vec<Change>)> = (0..3)
            .map(|i| (key(ids[i], 1, i as u64 + 1), vec![]))
            .collect();
        store.apply("c", &items).await.unwrap();
        assert!(pending(&store, "c").is_empty());
        // Positions 5 then 6 ahead of 4.
        store
            .apply("c", &[(key(ids[4], 1, 5), vec![])])
            .await
            .unwrap();
        store
            .apply("c", &[(key(ids[4], 2, 6), vec![])])
            .await
            .unwrap();
        assert_eq!(pending(&store, "c"), vec![5, 6]);
        assert_eq!(store.checkpoints().await.unwrap()[0].checkpoint, 3);
        store
            .apply("c", &[(key(ids[3], 1, 4), vec![])])
            .await
            .unwrap();
        assert!(pending(&store, "c").is_empty());
        let cp = &store.checkpoints().await.unwrap()[0];
        assert_eq!((cp.checkpoint, cp.applied), (6, 6));
    }
}
