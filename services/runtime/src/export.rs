//! `tektree export <read-model> --format jsonl|csv`: a read model for analysts, with the same
//! field names as the HTTP responses.

use std::io::Write;
use std::str::FromStr;

use tektree_projections::{ReadModel, ReadModelError, ReadModelStore};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header row; `null` is an empty field.
    Csv,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            _ => Err(format!("unknown format {s:?}: expected jsonl or csv")),
        }
    }
}

/// Errors of [`export`].
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the read model failed.
    #[error(transparent)]
    ReadModels(#[from] ReadModelError),
    /// Writing the output failed.
    #[error("write: {0}")]
    Io(#[from] std::io::Error),
    /// The read-model store returned the cursor it was given (a bug in its adapter): the
    /// export stops instead of paging forever.
    #[error("export cursor did not advance past {0}")]
    Stuck(String),
}

fn csv_field(v: Option<&serde_json::Value>) -> String {
    let s = match v {
        None | Some(serde_json::Value::Null) => return String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Writes every row of `model` to `out` in pages of 1,000 (constant memory), each page read
/// after the previous one's cursor ([`ReadModelStore::export`]: keyset paging, so a whole
/// export reads each row once). Returns the number of rows written.
///
/// # Errors
/// [`ExportError`] on read or write failure.
pub async fn export(
    read_models: &dyn ReadModelStore,
    model: ReadModel,
    format: Format,
    out: &mut dyn Write,
) -> Result<u64, ExportError> {
    let cols = model.columns();
    if format == Format::Csv {
        writeln!(out, "{}", cols.join(","))?;
    }
    let mut written = 0u64;
    let mut after = None;
    loop {
        let page = read_models.export(model, after.as_ref(), 1000).await?;
        written += page.rows.len() as u64;
        for row in &page.rows {
            match format {
                Format::Jsonl => writeln!(out, "{row}")?,
                Format::Csv => {
                    let line: Vec<String> = cols.iter().map(|c| csv_field(row.get(*c))).collect();
                    writeln!(out, "{}", line.join(","))?;
                }
            }
        }
        match page.next {
            // A cursor that does not move would page forever: an adapter bug, said loudly.
            Some(next) if after.as_ref() == Some(&next) => {
                return Err(ExportError::Stuck(format!("{next:?}")))
            }
            Some(next) => after = Some(next),
            None => break,
        }
    }
    out.flush()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_quote_separators_and_blank_nulls() {
        assert_eq!(csv_field(Some(&serde_json::json!("a,b"))), "\"a,b\"");
        assert_eq!(
            csv_field(Some(&serde_json::json!("say \"hi\""))),
            "\"say \"\"hi\"\"\""
        );
        assert_eq!(csv_field(Some(&serde_json::Value::Null)), "");
        assert_eq!(csv_field(Some(&serde_json::json!(-3))), "-3");
        assert_eq!(csv_field(Some(&serde_json::json!(true))), "true");
    }
}
