//! The importer on truncated and malformed dump files: a clear error naming file, line and
//! column, and nothing imported (the import checks every file before it sends its first
//! command; see docs/import.md). Each case imports a small dump directory, with one file
//! corrupted, into a fresh SQLite store and inspects the store afterwards.
//!
//! Also property tests, at a small size: the dump reader on arbitrary bytes and on random
//! mutations of a valid file never panics and either reads the file or names a line inside it;
//! a whole import of a mutated dump either succeeds or fails having written nothing.

use std::path::Path;

use proptest::prelude::*;
use tektree_domain::Rules;
use tektree_services::app::App;
use tektree_services::import::plan::{Phase, PostIndex};
use tektree_services::import::reader::RowReader;
use tektree_services::import::{
    import_stackexchange, CommandKind, ImportError, ImportOptions, ImportReport,
};

const SITE: &str = "tiny";

const USERS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<users>
  <row Id="-1" Reputation="1" CreationDate="2011-10-11T19:00:00.000" DisplayName="Community" />
  <row Id="1" Reputation="101" CreationDate="2011-10-11T19:10:00.000" DisplayName="Ada" />
  <row Id="2" Reputation="11" CreationDate="2011-10-11T19:20:00.000" DisplayName="Bob &amp; Co" />
</users>
"#;

const POSTS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" CreationDate="2011-10-12T10:00:00.000" OwnerUserId="1" Title="Why Rome?" Body="&lt;p&gt;Tell me.&lt;/p&gt;" Tags="&lt;rome&gt;&lt;history&gt;" />
  <row Id="2" PostTypeId="2" ParentId="1" CreationDate="2011-10-12T11:00:00.000" OwnerUserId="2" Body="&lt;p&gt;Because.&lt;/p&gt;" />
  <row Id="3" PostTypeId="1" CreationDate="2011-10-13T10:00:00.000" OwnerUserId="2" Title="Why Greece?" Body="b" Tags="|greece|" />
  <row Id="4" PostTypeId="2" ParentId="3" CreationDate="2011-10-13T11:00:00.000" Body="anonymous" />
  <row Id="5" PostTypeId="4" CreationDate="2011-10-13T12:00:00.000" Body="tag wiki" />
</posts>
"#;

const COMMENTS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<comments>
  <row Id="1" PostId="1" UserId="2" Text="Good one" CreationDate="2011-10-12T10:30:00.000" />
  <row Id="2" PostId="2" Text="anonymous comment" CreationDate="2011-10-12T11:30:00.000" />
</comments>
"#;

const VOTES: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<votes>
  <row Id="1" PostId="1" VoteTypeId="2" CreationDate="2011-10-12T00:00:00.000" />
  <row Id="2" PostId="2" VoteTypeId="2" CreationDate="2011-10-12T00:00:00.000" />
  <row Id="3" PostId="3" VoteTypeId="3" CreationDate="2011-10-13T00:00:00.000" />
  <row Id="4" PostId="2" VoteTypeId="1" CreationDate="2011-10-13T00:00:00.000" />
  <row Id="5" PostId="1" VoteTypeId="10" CreationDate="2011-10-14T00:00:00.000" />
</votes>
"#;

/// The four files of the small dump, by name.
const FILES: [(&str, &str); 4] = [
    ("Users.xml", USERS),
    ("Posts.xml", POSTS),
    ("Comments.xml", COMMENTS),
    ("Votes.xml", VOTES),
];

/// Events the valid dump writes (without the policies): 3 users, 2 questions, 2 answers,
/// 2 comments, 2 upvotes, 1 downvote, 1 accept.
const VALID_EVENTS: u64 = 13;

/// The valid dump in a new directory, with `file` replaced by `bytes` (or removed for `None`).
fn dump_with(file: &str, bytes: Option<&[u8]>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in FILES {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    match bytes {
        Some(b) => std::fs::write(dir.path().join(file), b).unwrap(),
        None => std::fs::remove_file(dir.path().join(file)).unwrap(),
    }
    dir
}

fn valid_dump() -> tempfile::TempDir {
    dump_with("Users.xml", Some(USERS.as_bytes()))
}

/// A fresh store (in-process bus, no pipeline: only the import writes).
async fn fresh_app() -> (tempfile::TempDir, App) {
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("tektree.db").display());
    let app = App::open(&url, "memory", Rules::default()).await.unwrap();
    (db, app)
}

/// Every event in the store, as `(event_type, aggregate_id)`.
async fn stored(app: &App) -> Vec<(String, uuid::Uuid)> {
    app.store
        .read_all(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_type, e.aggregate_id))
        .collect()
}

async fn import(app: &App, dir: &Path) -> Result<ImportReport, ImportError> {
    import_stackexchange(app, dir, SITE, ImportOptions::default()).await
}

/// Imports `dir` into a fresh store, expects a failure and checks that nothing was written.
async fn import_fails_writing_nothing(dir: &Path) -> ImportError {
    let (_db, app) = fresh_app().await;
    let err = import(&app, dir).await.expect_err("the import must fail");
    assert_eq!(
        stored(&app).await,
        vec![],
        "no event may be written from a malformed dump ({err})"
    );
    assert_eq!(app.store.head().await.unwrap().position, 0, "{err}");
    err
}

/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> u64 {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"));
    text[..at].matches('\n').count() as u64 + 1
}

/// Replaces the first occurrence of `from` in `text`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in the text");
    text.replacen(from, to, 1)
}

/// `text` cut right after the first occurrence of `after`.
fn cut_after(text: &str, after: &str) -> String {
    let at = text.find(after).expect("cut point") + after.len();
    text[..at].to_string()
}

#[tokio::test]
async fn the_valid_dump_imports_and_a_second_run_changes_nothing() {
    // The control for every corruption below: the small dump as written is importable.
    let dir = valid_dump();
    let (_db, app) = fresh_app().await;
    let report = import(&app, dir.path()).await.unwrap();
    assert_eq!(report.events(), VALID_EVENTS, "{report}");
    assert_eq!(report.rejected(), 0, "{report}");
    assert_eq!(report.kind(CommandKind::OtherPost).skipped_total(), 1);
    assert_eq!(report.kind(CommandKind::OtherVote).skipped_total(), 1);
    assert_eq!(report.kind(CommandKind::AcceptAnswer).accepted, 1);
    let head = app.store.head().await.unwrap();
    assert_eq!(head.events, VALID_EVENTS);
    let again = import(&app, dir.path()).await.unwrap();
    assert_eq!(again.events(), 0, "{again}");
    assert_eq!(app.store.head().await.unwrap(), head);
}

/// One corruption: the file, its new content, the line and column the error must name and a
/// part of the reason.
struct Case {
    what: &'static str,
    file: &'static str,
    bytes: Vec<u8>,
    line: u64,
    column: u64,
    reason: &'static str,
}

fn case(
    what: &'static str,
    file: &'static str,
    text: String,
    line: u64,
    column: u64,
    reason: &'static str,
) -> Case {
    Case {
        what,
        file,
        bytes: text.into_bytes(),
        line,
        column,
        reason,
    }
}

fn cases() -> Vec<Case> {
    let users_row = "<row Id=\"1\" Reputation";
    let ada = line_of(USERS, users_row);
    let greece = line_of(POSTS, "Why Greece?");
    let vote3 = line_of(VOTES, "<row Id=\"3\"");
    let comment2 = line_of(COMMENTS, "<row Id=\"2\"");
    let mut invalid_utf8 = USERS.as_bytes().to_vec();
    let at = USERS.find("Bob").unwrap();
    invalid_utf8[at + 1] = 0xFF;
    vec![
        // Truncated files.
        case(
            "truncated inside a row's tag",
            "Users.xml",
            cut_after(USERS, "<row Id=\"1\" Repu"),
            ada,
            3,
            "XML syntax error",
        ),
        case(
            "truncated inside an attribute value",
            "Posts.xml",
            cut_after(POSTS, "Title=\"Why Gre"),
            greece,
            3,
            "XML syntax error",
        ),
        case(
            "truncated after a complete row",
            "Comments.xml",
            cut_after(COMMENTS, "11:30:00.000\" />\n"),
            comment2 + 1,
            1,
            "not closed",
        ),
        case(
            "truncated inside the closing tag",
            "Votes.xml",
            cut_after(VOTES, "</vot"),
            line_of(VOTES, "</votes>"),
            1,
            "XML syntax error",
        ),
        case(
            "empty file",
            "Votes.xml",
            String::new(),
            1,
            1,
            "no root element",
        ),
        case(
            "only the XML declaration",
            "Comments.xml",
            cut_after(COMMENTS, "?>\n"),
            2,
            1,
            "no root element",
        ),
        // Invalid XML.
        case(
            "mismatched end tag",
            "Votes.xml",
            edit(VOTES, "</votes>", "</vote>"),
            line_of(VOTES, "</votes>"),
            1,
            "XML syntax error",
        ),
        case(
            "unquoted attribute value",
            "Comments.xml",
            edit(COMMENTS, "<row Id=\"2\"", "<row Id=2"),
            comment2,
            3,
            "bad attribute",
        ),
        case(
            "duplicated attribute",
            "Votes.xml",
            edit(VOTES, "<row Id=\"3\"", "<row Id=\"3\" Id=\"4\""),
            vote3,
            3,
            "bad attribute",
        ),
        case(
            "undefined entity in a value",
            "Comments.xml",
            edit(COMMENTS, "Good one", "Good&nbsp;one"),
            line_of(COMMENTS, "Good one"),
            3,
            "Text",
        ),
        case(
            "text between rows",
            "Posts.xml",
            edit(POSTS, "  <row Id=\"3\"", "  oops <row Id=\"3\""),
            greece,
            3,
            "unexpected text between rows",
        ),
        case(
            "an element other than <row>",
            "Users.xml",
            edit(USERS, "<row Id=\"1\"", "<user Id=\"1\""),
            ada,
            3,
            "expected <row>",
        ),
        case(
            "a second root element",
            "Votes.xml",
            format!("{VOTES}<votes/>\n"),
            line_of(VOTES, "</votes>") + 1,
            1,
            "second root",
        ),
        // Well-formed rows with malformed or missing values.
        case(
            "non-numeric Id",
            "Users.xml",
            edit(USERS, "<row Id=\"1\"", "<row Id=\"one\""),
            ada,
            3,
            "Id=\"one\" is not an integer",
        ),
        case(
            "Id out of range",
            "Comments.xml",
            edit(
                COMMENTS,
                "<row Id=\"2\"",
                "<row Id=\"99999999999999999999\"",
            ),
            comment2,
            3,
            "is not an integer",
        ),
        case(
            "non-numeric PostId",
            "Votes.xml",
            edit(
                VOTES,
                "<row Id=\"3\" PostId=\"3\"",
                "<row Id=\"3\" PostId=\"x3\"",
            ),
            vote3,
            3,
            "PostId=\"x3\" is not an integer",
        ),
        case(
            "bad date",
            "Posts.xml",
            edit(POSTS, "2011-10-13T10:00:00.000", "2011-13-45T10:00:00.000"),
            greece,
            3,
            "CreationDate=\"2011-13-45T10:00:00.000\" is not a timestamp",
        ),
        case(
            "missing CreationDate",
            "Users.xml",
            edit(USERS, "CreationDate=\"2011-10-11T19:10:00.000\" ", ""),
            ada,
            3,
            "no CreationDate attribute",
        ),
        case(
            "missing PostTypeId",
            "Posts.xml",
            edit(POSTS, "<row Id=\"3\" PostTypeId=\"1\"", "<row Id=\"3\""),
            greece,
            3,
            "no PostTypeId attribute",
        ),
        case(
            "missing PostId",
            "Comments.xml",
            edit(COMMENTS, "<row Id=\"2\" PostId=\"2\"", "<row Id=\"2\""),
            comment2,
            3,
            "no PostId attribute",
        ),
        case(
            "missing VoteTypeId",
            "Votes.xml",
            edit(
                VOTES,
                "<row Id=\"3\" PostId=\"3\" VoteTypeId=\"3\"",
                "<row Id=\"3\" PostId=\"3\"",
            ),
            vote3,
            3,
            "no VoteTypeId attribute",
        ),
        case(
            "an answer without ParentId",
            "Posts.xml",
            edit(POSTS, "PostTypeId=\"2\" ParentId=\"3\"", "PostTypeId=\"2\""),
            line_of(POSTS, "ParentId=\"3\""),
            3,
            "has no ParentId",
        ),
        case(
            "a post Id used twice",
            "Posts.xml",
            edit(POSTS, "<row Id=\"3\"", "<row Id=\"1\""),
            greece,
            3,
            "duplicate post Id=1",
        ),
        Case {
            what: "a value that is not UTF-8",
            file: "Users.xml",
            bytes: invalid_utf8,
            line: line_of(USERS, "Bob"),
            column: 3,
            reason: "DisplayName",
        },
    ]
}

#[tokio::test]
async fn each_corruption_names_file_line_and_column_and_imports_nothing() {
    let cases = cases();
    assert!(cases.len() >= 20);
    for c in cases {
        let dir = dump_with(c.file, Some(&c.bytes));
        let err = import_fails_writing_nothing(dir.path()).await;
        let text = err.to_string();
        match &err {
            ImportError::Malformed {
                path,
                line,
                column,
                reason,
            } => {
                assert_eq!(path, &dir.path().join(c.file), "{}: {text}", c.what);
                assert_eq!((*line, *column), (c.line, c.column), "{}: {text}", c.what);
                assert!(reason.contains(c.reason), "{}: {text}", c.what);
            }
            other => panic!("{}: expected Malformed, got {other:?}", c.what),
        }
        let location = format!("{}:{}:{}: ", c.file, c.line, c.column);
        assert!(text.contains(&location), "{}: {text}", c.what);
    }
}

#[tokio::test]
async fn a_missing_file_is_named_and_nothing_is_imported() {
    for file in ["Users.xml", "Votes.xml"] {
        let dir = dump_with(file, None);
        let err = import_fails_writing_nothing(dir.path()).await;
        match &err {
            ImportError::Io { path, source } => {
                assert_eq!(path, &dir.path().join(file), "{err}");
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{err}");
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(err.to_string().contains(file), "{err}");
    }
}

#[tokio::test]
async fn a_broken_last_file_stops_even_the_first_phase_and_a_fixed_dump_then_imports() {
    // Votes.xml is read by the last phases; its bad row must stop the import before the users
    // of the (valid) Users.xml are registered.
    let bad = edit(VOTES, "VoteTypeId=\"10\"", "VoteTypeId=\"ten\"");
    let dir = dump_with("Votes.xml", Some(bad.as_bytes()));
    let (_db, app) = fresh_app().await;
    let err = import(&app, dir.path()).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "Votes.xml:{}:3: VoteTypeId=\"ten\"",
            line_of(VOTES, "VoteTypeId=\"10\"")
        )),
        "{err}"
    );
    assert_eq!(stored(&app).await, vec![]);

    // Repaired, the same store takes the whole dump.
    std::fs::write(dir.path().join("Votes.xml"), VOTES).unwrap();
    let report = import(&app, dir.path()).await.unwrap();
    assert_eq!(report.events(), VALID_EVENTS, "{report}");
    assert_eq!(stored(&app).await.len() as u64, VALID_EVENTS);
}

// ---------------------------------------------------------------------------------------------
// Property tests.

/// A change to a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep the first `at` (modulo length + 1) bytes.
    Truncate { at: usize },
    /// XOR the byte at `at` (modulo length) with `mask` (never 0).
    Flip { at: usize, mask: u8 },
    /// Insert `bytes` before position `at` (modulo length + 1).
    Insert { at: usize, bytes: Vec<u8> },
    /// Remove up to `len` bytes from `at` (modulo length).
    Delete { at: usize, len: usize },
}

/// Bytes likely to matter to an XML reader, and any byte.
fn xml_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => prop::sample::select(b"<>/=\"'&;! \n?-[]x1Id".to_vec()),
        1 => any::<u8>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        3 => (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => (any::<usize>(), prop::collection::vec(xml_byte(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<usize>(), 1..16usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Truncate { at } => bytes.truncate(at % (bytes.len() + 1)),
            Mutation::Flip { at, mask } if !bytes.is_empty() => {
                let i = at % bytes.len();
                bytes[i] ^= mask;
            }
            Mutation::Flip { .. } => {}
            Mutation::Insert { at, bytes: b } => {
                let i = at % (bytes.len() + 1);
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::Delete { at, len } if !bytes.is_empty() => {
                let i = at % bytes.len();
                let end = (i + len).min(bytes.len());
                bytes.drain(i..end);
            }
            Mutation::Delete { .. } => {}
        }
    }
    bytes
}

/// The phase whose fields are read from `file` (the check pass reads the same ones).
fn phase_of(file: &str) -> Phase {
    match file {
        "Users.xml" => Phase::Users,
        "Posts.xml" => Phase::Questions,
        "Comments.xml" => Phase::Comments,
        _ => Phase::Votes,
    }
}

/// What reading a file gave: the rows read, and whether it ended with an error.
struct Read {
    rows: usize,
    failed: bool,
}

/// Reads every row of `bytes` as dump file `name` and plans each for every phase: never
/// panics; an error is Malformed, names this file and a line and column inside it.
fn read_all_rows(name: &str, bytes: &[u8]) -> Result<Read, TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let ids = tektree_services::import::ids::SiteIds::new(SITE);
    let posts = PostIndex::default();
    let phase = phase_of(name);
    let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let mut reader = RowReader::open(&path, phase.fields()).unwrap();
    let mut rows = 0;
    loop {
        match reader.next_row() {
            Ok(Some(row)) => {
                rows += 1;
                for p in Phase::ALL {
                    if p.file() == name {
                        // Any outcome is fine; it must not panic.
                        let _ = p.plan(&row, &ids, &posts);
                    }
                }
            }
            Ok(None) => {
                return Ok(Read {
                    rows,
                    failed: false,
                })
            }
            Err(ImportError::Malformed {
                path: p,
                line,
                column,
                reason,
            }) => {
                prop_assert_eq!(&p, &path);
                prop_assert!(
                    (1..=lines).contains(&line),
                    "line {} outside 1..={}: {}",
                    line,
                    lines,
                    reason
                );
                prop_assert!(column >= 1, "column {}: {}", column, reason);
                prop_assert!(!reason.is_empty());
                let shown = ImportError::Malformed {
                    path: p,
                    line,
                    column,
                    reason,
                }
                .to_string();
                let location = format!("{name}:{line}:{column}: ");
                prop_assert!(shown.contains(&location), "{}", shown);
                return Ok(Read { rows, failed: true });
            }
            Err(other) => {
                return Err(TestCaseError::fail(format!("not Malformed: {other:?}")));
            }
        }
    }
}

fn file_index() -> impl Strategy<Value = usize> {
    0..FILES.len()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn reader_never_panics_on_arbitrary_bytes(
        f in file_index(),
        bytes in prop::collection::vec(xml_byte(), 0..400),
    ) {
        read_all_rows(FILES[f].0, &bytes)?;
    }

    #[test]
    fn reader_never_panics_on_mutated_dump_files(
        f in file_index(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let (name, text) = FILES[f];
        let bytes = mutate(text.as_bytes().to_vec(), &mutations);
        read_all_rows(name, &bytes)?;
    }

    #[test]
    fn every_truncation_of_a_dump_file_is_read_or_named(
        f in file_index(),
        at in any::<prop::sample::Index>(),
    ) {
        let (name, text) = FILES[f];
        let at = at.index(text.len() + 1);
        let read = read_all_rows(name, &text.as_bytes()[..at])?;
        // Only a cut in the trailing newline leaves a complete file; any other cut is an error.
        let complete = text[at..].trim().is_empty();
        prop_assert_eq!(read.failed, !complete, "cut at byte {}", at);
        if complete {
            prop_assert_eq!(read.rows, text.matches("<row ").count());
        }
    }
}

proptest! {
    // Each case opens a SQLite store and may import the whole small dump: keep it small.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn an_import_of_a_mutated_dump_succeeds_or_writes_nothing(
        f in file_index(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let (name, text) = FILES[f];
        let bytes = mutate(text.as_bytes().to_vec(), &mutations);
        let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64 + 1;
        let dir = dump_with(name, Some(&bytes));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (result, events) = runtime.block_on(async {
            let (_db, app) = fresh_app().await;
            let result = import(&app, dir.path()).await;
            (result, stored(&app).await)
        });
        match result {
            Ok(report) => prop_assert_eq!(report.events(), events.len() as u64),
            Err(ImportError::Malformed { path, line, .. }) => {
                prop_assert_eq!(path, dir.path().join(name));
                prop_assert!((1..=lines).contains(&line));
                prop_assert_eq!(events, vec![]);
            }
            Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }
}
