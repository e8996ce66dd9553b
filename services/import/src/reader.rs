//! Streaming reader of one Stack Exchange dump file: `<root><row A="…" …/>…</root>`, one row
//! at a time, in constant memory (one row's attributes plus quick-xml's read buffer).
//!
//! Errors name the file, the 1-based line and the 1-based column (in characters) where the
//! offending row or markup starts. quick-xml reports byte offsets; line and column are computed
//! from the offset only when an error is reported (by reading the file up to it once), so the
//! happy path pays nothing for them.
//!
//! Anything that is not `<row …/>` or `<row …></row>` inside the one root element is an error:
//! other elements, non-whitespace text or entity references between rows, CDATA, a second root,
//! a missing or unclosed root (a truncated file), XML syntax errors, malformed attributes
//! (unquoted, duplicated, without a value) and values that do not unescape to UTF-8 text.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chrono::{DateTime, NaiveDateTime, Utc};
use quick_xml::encoding::Decoder;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::ImportError;

/// One `<row>` of a dump file: the wanted attributes, unescaped, and where the row starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Byte offset of the row's `<` in the file.
    pub offset: u64,
    attrs: Vec<(&'static str, String)>,
}

impl Row {
    /// A row from attribute pairs (for unit tests of row mapping).
    pub fn from_attrs(offset: u64, attrs: Vec<(&'static str, String)>) -> Row {
        Row { offset, attrs }
    }

    /// The value of attribute `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The required attribute `name`.
    ///
    /// # Errors
    /// A reason text when it is absent.
    pub fn require(&self, name: &str) -> Result<&str, String> {
        self.get(name)
            .ok_or_else(|| format!("row has no {name} attribute"))
    }

    /// The required integer attribute `name`.
    ///
    /// # Errors
    /// A reason text when it is absent or not an integer.
    pub fn int(&self, name: &str) -> Result<i64, String> {
        parse_int(name, self.require(name)?)
    }

    /// The optional integer attribute `name` (`None` when absent).
    ///
    /// # Errors
    /// A reason text when it is present but not an integer.
    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, String> {
        self.get(name).map(|v| parse_int(name, v)).transpose()
    }

    /// The required timestamp attribute `name` (see [`parse_dump_date`]).
    ///
    /// # Errors
    /// A reason text when it is absent or not a timestamp.
    pub fn date(&self, name: &str) -> Result<DateTime<Utc>, String> {
        let v = self.require(name)?;
        parse_dump_date(v)
            .ok_or_else(|| format!("{name}={v:?} is not a timestamp like 2011-10-11T19:42:20.713"))
    }
}

fn parse_int(name: &str, v: &str) -> Result<i64, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{name}={v:?} is not an integer"))
}

/// Parses a dump timestamp. The dump writes `2011-10-11T19:42:20.713` without a zone; it is UTC.
/// RFC 3339 with an explicit offset is accepted too and converted to UTC.
pub fn parse_dump_date(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|n| n.and_utc())
        .ok()
        .or_else(|| {
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|d| d.with_timezone(&Utc))
        })
}

/// Size and modification time of an open file: the import checks each file in a first pass and
/// reads it again per phase, and refuses to go on when the file changed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
}

impl Fingerprint {
    /// The fingerprint of the open `file`.
    ///
    /// # Errors
    /// When its metadata cannot be read.
    pub fn of(file: &File) -> std::io::Result<Fingerprint> {
        let m = file.metadata()?;
        Ok(Fingerprint {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// Iterates the rows of one dump file.
pub struct RowReader {
    path: PathBuf,
    file: File,
    reader: Reader<BufReader<File>>,
    buf: Vec<u8>,
    /// Bytes before quick-xml's offset 0 (a skipped byte order mark).
    base: u64,
    fields: &'static [&'static str],
    /// Element depth: 0 outside the root, 1 inside it, 2 inside a `<row>…</row>`.
    depth: usize,
    root: Option<String>,
    finished: bool,
}

impl RowReader {
    /// Opens `path`, keeping only the attributes named in `fields` of each row.
    ///
    /// # Errors
    /// [`ImportError::Io`] when the file cannot be opened.
    pub fn open(path: &Path, fields: &'static [&'static str]) -> Result<RowReader, ImportError> {
        let io = |source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let handle = file.try_clone().map_err(io)?;
        let mut input = BufReader::with_capacity(64 * 1024, file);
        // Skip a UTF-8 byte order mark here: quick-xml would skip it without counting it in
        // its offsets, and the offsets must be file offsets for line numbers.
        let bom = match input.fill_buf() {
            Ok(b) if b.starts_with(b"\xEF\xBB\xBF") => 3,
            Ok(_) => 0,
            Err(source) => {
                return Err(ImportError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        input.consume(bom);
        let mut reader = Reader::from_reader(input);
        reader.config_mut().check_end_names = true;
        Ok(RowReader {
            path: path.to_path_buf(),
            file: handle,
            reader,
            buf: Vec::with_capacity(64 * 1024),
            base: bom as u64,
            fields,
            depth: 0,
            root: None,
            finished: false,
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's current size and modification time (read from the open file, so a file
    /// replaced by a rename keeps the fingerprint of the one being read).
    ///
    /// # Errors
    /// [`ImportError::Io`] when the metadata cannot be read.
    pub fn fingerprint(&self) -> Result<Fingerprint, ImportError> {
        Fingerprint::of(&self.file).map_err(|source| ImportError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// An [`ImportError::Malformed`] for this file at byte `offset`.
    pub fn error_at(&self, offset: u64, reason: impl Into<String>) -> ImportError {
        malformed(&self.path, offset, reason)
    }

    /// The next row, or `None` after the root element closed.
    ///
    /// # Errors
    /// [`ImportError::Malformed`] (with the line) for XML syntax errors, a missing or unclosed
    /// root element (a truncated file), elements other than `<row>` inside the root, or text
    /// between rows; [`ImportError::Io`] for read errors.
    pub fn next_row(&mut self) -> Result<Option<Row>, ImportError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            self.buf.clear();
            let start = self.base + self.reader.buffer_position();
            let event = match self.reader.read_event_into(&mut self.buf) {
                Ok(e) => e,
                Err(quick_xml::Error::Io(e)) => {
                    return Err(ImportError::Io {
                        path: self.path.clone(),
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    })
                }
                Err(e) => {
                    let at = self.base + self.reader.error_position();
                    return Err(malformed(&self.path, at, format!("XML syntax error: {e}")));
                }
            };
            let event_kind = match &event {
                Event::Empty(_) => Kind::Empty,
                _ => Kind::Other,
            };
            match event {
                Event::Start(e) | Event::Empty(e) if self.depth == 0 => {
                    if self.root.is_some() {
                        return Err(malformed(
                            &self.path,
                            start,
                            "a second root element after the first one closed",
                        ));
                    }
                    self.root = Some(String::from_utf8_lossy(e.local_name().as_ref()).into());
                    // An `<x/>` root (quick-xml's `Empty`) has no rows.
                    if !matches!(event_kind, Kind::Empty) {
                        self.depth = 1;
                    }
                }
                Event::Start(e) if self.depth == 1 => {
                    let row = row(&self.path, self.fields, self.reader.decoder(), &e, start)?;
                    self.depth = 2;
                    return Ok(Some(row));
                }
                Event::Empty(e) if self.depth == 1 => {
                    return row(&self.path, self.fields, self.reader.decoder(), &e, start)
                        .map(Some);
                }
                Event::Start(e) | Event::Empty(e) => {
                    let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                    return Err(malformed(
                        &self.path,
                        start,
                        format!("unexpected element <{name}> inside <row>"),
                    ));
                }
                Event::End(_) => {
                    self.depth = self.depth.saturating_sub(1);
                }
                Event::Text(t) => {
                    // Whitespace between rows is fine; point an error at the first other byte.
                    if let Some(at) = t.iter().position(|b| !b.is_ascii_whitespace()) {
                        let at = start + at as u64;
                        return Err(malformed(&self.path, at, text_reason(self.depth)));
                    }
                }
                Event::GeneralRef(_) => {
                    return Err(malformed(&self.path, start, text_reason(self.depth)));
                }
                Event::CData(_) => {
                    return Err(malformed(
                        &self.path,
                        start,
                        "unexpected CDATA between rows",
                    ));
                }
                Event::Eof => {
                    if self.root.is_none() {
                        return Err(malformed(
                            &self.path,
                            start,
                            "no root element (empty or truncated file)",
                        ));
                    }
                    if self.depth > 0 {
                        let root = self.root.clone().unwrap_or_default();
                        return Err(malformed(
                            &self.path,
                            start,
                            format!(
                                "unexpected end of file: <{root}> is not closed (truncated file?)"
                            ),
                        ));
                    }
                    self.finished = true;
                    return Ok(None);
                }
                // Whitespace, XML declaration, comments, processing instructions, DOCTYPE.
                _ => {}
            }
        }
    }
}

/// The row of the `<row>` element `e` that starts at byte `start` of `path`.
fn row(
    path: &Path,
    fields: &'static [&'static str],
    decoder: Decoder,
    e: &BytesStart<'_>,
    start: u64,
) -> Result<Row, ImportError> {
    if e.local_name().as_ref() != b"row" {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        return Err(malformed(
            path,
            start,
            format!("unexpected element <{name}>, expected <row>"),
        ));
    }
    let mut attrs = Vec::with_capacity(fields.len());
    for a in e.attributes() {
        let a =
            a.map_err(|err| malformed(path, start, format!("bad attribute in <row>: {err}")))?;
        let key = a.key.local_name();
        let Some(field) = fields.iter().find(|f| f.as_bytes() == key.as_ref()) else {
            continue;
        };
        let value: Cow<'_, str> = a.decode_and_unescape_value(decoder).map_err(|err| {
            malformed(
                path,
                start,
                format!("bad value of attribute {field}: {err}"),
            )
        })?;
        attrs.push((*field, value.into_owned()));
    }
    Ok(Row {
        offset: start,
        attrs,
    })
}

/// Why text (or an entity reference) at element depth `depth` is an error.
fn text_reason(depth: usize) -> &'static str {
    match depth {
        0 => "unexpected text outside the root element",
        1 => "unexpected text between rows",
        _ => "unexpected text inside <row>",
    }
}

/// Whether the event just read was an empty-element tag (`<x/>`).
enum Kind {
    Empty,
    Other,
}

/// An [`ImportError::Malformed`] for `path` at byte `offset` (line and column computed by
/// reading the file up to it).
pub fn malformed(path: &Path, offset: u64, reason: impl Into<String>) -> ImportError {
    let (line, column) = position_at(path, offset);
    ImportError::Malformed {
        path: path.to_path_buf(),
        line,
        column,
        reason: reason.into(),
    }
}

/// The 1-based line of byte `offset` in `path` (the number of newlines before it, plus one).
/// Reads the file up to `offset` once; used only when reporting an error.
pub fn line_at(path: &Path, offset: u64) -> u64 {
    position_at(path, offset).0
}

/// The 1-based line and column of byte `offset` in `path`. The column counts characters (bytes
/// that start a UTF-8 sequence, or are not part of one) from the start of the line; a byte
/// order mark at the start of the file is not counted. Reads the file up to `offset` once; used
/// only when reporting an error. `(0, 0)` when the file cannot be opened any more.
pub fn position_at(path: &Path, offset: u64) -> (u64, u64) {
    let Ok(file) = File::open(path) else {
        return (0, 0);
    };
    let mut reader = BufReader::new(file.take(offset));
    let (mut line, mut column) = (1u64, 1u64);
    let mut first = true;
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(c) => c,
        };
        let n = chunk.len();
        let text = match chunk.strip_prefix(b"\xEF\xBB\xBF") {
            Some(rest) if first => rest,
            _ => chunk,
        };
        first = false;
        for &b in text {
            if b == b'\n' {
                line += 1;
                column = 1;
            } else if b & 0xC0 != 0x80 {
                // Not a UTF-8 continuation byte: the start of a character.
                column += 1;
            }
        }
        reader.consume(n);
    }
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const FIELDS: &[&str] = &["Id", "Text"];

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn rows(text: &str) -> Result<Vec<Row>, ImportError> {
        let f = file(text);
        let mut r = RowReader::open(f.path(), FIELDS)?;
        let mut v = vec![];
        while let Some(row) = r.next_row()? {
            v.push(row);
        }
        Ok(v)
    }

    #[test]
    fn reads_rows_with_bom_unescaping_and_both_row_forms() {
        let v = rows(
            "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<comments>\n  \
             <row Id=\"1\" Text=\"a &amp; b&#xA;&lt;c&gt;\" Other=\"x\" />\n  \
             <row Id=\"2\" Text=\"two\"></row>\n</comments>\n",
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].get("Text"), Some("a & b\n<c>"));
        assert_eq!(v[0].get("Other"), None);
        assert_eq!(v[1].int("Id"), Ok(2));
        assert_eq!(rows("<posts/>").unwrap(), vec![]);
    }

    #[test]
    fn truncated_and_malformed_files_name_the_line() {
        let e = rows("<posts>\n  <row Id=\"1\" />\n  <row Id=\"2\" Te").unwrap_err();
        let ImportError::Malformed { line, column, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!((*line, *column), (3, 3), "{e}");
        // A byte order mark must not shift the line or column of an error.
        let e = rows("\u{feff}<posts>\n<row Id=\"1\" Te").unwrap_err();
        assert!(e.to_string().contains(":2:1: "), "{e}");
        let e = rows("\u{feff}<posts><row Id=\"1\" Te").unwrap_err();
        assert!(e.to_string().contains(":1:8: "), "{e}");
        // Columns count characters, not bytes.
        let e = rows("<posts>\n<!-- é --><row Id=\"1\" Te").unwrap_err();
        assert!(e.to_string().contains(":2:11: "), "{e}");
        let e = rows("<posts>\n  <row Id=\"1\" />\n").unwrap_err();
        assert!(e.to_string().contains("not closed"), "{e}");
        let e = rows("<posts>\n<row Id=\"1\" />\n<foo/>\n</posts>").unwrap_err();
        let ImportError::Malformed { line, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(*line, 3, "{e}");
        let e = rows("").unwrap_err();
        assert!(e.to_string().contains("no root element"), "{e}");
        let e = rows("<posts>\n<row Id=\"1\" Text=\"&bogus;\" />\n</posts>").unwrap_err();
        assert!(e.to_string().contains(":2:1: "), "{e}");
        // Entity references and text between or inside rows are not rows.
        let e = rows("<posts>\n<row Id=\"1\" />&amp;\n</posts>").unwrap_err();
        assert!(
            e.to_string()
                .contains(":2:15: unexpected text between rows"),
            "{e}"
        );
        let e = rows("<posts>\n<row Id=\"1\">x</row>\n</posts>").unwrap_err();
        assert!(e.to_string().contains("inside <row>"), "{e}");
        let e = rows("<posts/>\nx").unwrap_err();
        assert!(
            e.to_string().contains(":2:1: unexpected text outside"),
            "{e}"
        );
    }

    #[test]
    fn the_fingerprint_changes_with_the_file() {
        let mut f = file("<posts>\n<row Id=\"1\" />\n</posts>\n");
        let r = RowReader::open(f.path(), FIELDS).unwrap();
        let before = r.fingerprint().unwrap();
        assert_eq!(r.fingerprint().unwrap(), before);
        f.write_all(b"<!-- appended -->\n").unwrap();
        f.flush().unwrap();
        assert_ne!(r.fingerprint().unwrap(), before);
    }

    #[test]
    fn parses_dump_dates_as_utc() {
        let d = parse_dump_date("2011-10-11T19:42:20.713").unwrap();
        assert_eq!(d.to_rfc3339(), "2011-10-11T19:42:20.713+00:00");
        assert_eq!(
            parse_dump_date("2011-10-11T00:00:00").unwrap().to_rfc3339(),
            "2011-10-11T00:00:00+00:00"
        );
        assert!(parse_dump_date("yesterday").is_none());
    }
}
