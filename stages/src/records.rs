//! Record files: the JSONL that stages pass between each other (one JSON value per
//! line, blank lines skipped), read with the file and line named on bad JSON, and
//! Parquet (how every Hugging Face dataset is served), whose rows become the same JSON
//! values: list columns become arrays, struct columns objects (the `parquet` crate's row
//! reader; snappy, gzip, zstd and lz4 pages). A file is Parquet when it starts with
//! Parquet's magic bytes, whatever its name. Readers of datasets' own formats live with
//! the family that builds data (`data::readers`).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use crate::contract::StageError;

/// Parquet's magic bytes, at the start (and end) of every Parquet file.
const PARQUET_MAGIC: &[u8; 4] = b"PAR1";

/// Whether `bytes` (a file's start) is Parquet.
pub fn is_parquet(bytes: &[u8]) -> bool {
    bytes.starts_with(PARQUET_MAGIC)
}

/// Whether the file at `path` is Parquet (by its magic bytes).
pub fn is_parquet_file(path: &Path) -> Result<bool, StageError> {
    let mut f =
        std::fs::File::open(path).map_err(StageError::io(format!("opening {}", path.display())))?;
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(StageError::io(format!("reading {}", path.display()))(e)),
        }
    }
    Ok(is_parquet(&head[..n]))
}

/// The rows of a Parquet file as JSON objects (column name → value).
pub fn read_parquet(path: &Path) -> Result<Vec<Value>, StageError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f =
        std::fs::File::open(path).map_err(StageError::io(format!("opening {}", path.display())))?;
    let bad = |e: parquet::errors::ParquetError| {
        StageError::Failed(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    };
    let reader = SerializedFileReader::new(f).map_err(bad)?;
    let rows = reader.get_row_iter(None).map_err(bad)?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row =
            row.map_err(|e| StageError::Failed(format!("{}: row {}: {e}", path.display(), i + 1)))?;
        let mut v = row.to_json_value();
        // A null cell of an optional column is a field the record does not have, as in
        // JSONL, so readers say "missing `x`" alike for both.
        if let Value::Object(m) = &mut v {
            m.retain(|_, x| !x.is_null());
        }
        out.push(v);
    }
    Ok(out)
}

/// A Parquet file's rows as JSONL text, for readers that take text.
pub fn parquet_as_jsonl(path: &Path) -> Result<String, StageError> {
    let mut text = String::new();
    for v in read_parquet(path)? {
        text.push_str(&v.to_string());
        text.push('\n');
    }
    Ok(text)
}

/// Reads JSONL (or Parquet) into values, naming file and line on bad JSON.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>, StageError> {
    if is_parquet_file(path)? {
        return read_parquet(path);
    }
    Ok(read_jsonl_numbered(path)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Reads a JSONL file into values with their 1-based line numbers (blank lines
/// skipped), naming file and line on bad JSON.
pub fn read_jsonl_numbered(path: &Path) -> Result<Vec<(usize, Value)>, StageError> {
    let f =
        std::fs::File::open(path).map_err(StageError::io(format!("opening {}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(StageError::io(format!("reading {}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(&line).map_err(|e| {
            StageError::Failed(format!(
                "{}:{}: invalid JSON record: {e}",
                path.display(),
                i + 1
            ))
        })?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// Non-blank lines of JSONL text with their 1-based line numbers, each parsed or the
/// parse error (readers turn an error into a reject naming the line).
pub fn jsonl_lines(text: &str) -> impl Iterator<Item = (usize, Result<Value, String>)> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            (
                i + 1,
                serde_json::from_str::<Value>(l).map_err(|e| format!("invalid JSON: {e}")),
            )
        })
}

/// What kind of JSON value `v` is, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
