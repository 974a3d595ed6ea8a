//! Record files: the JSONL that stages pass between each other (one JSON value per
//! line, blank lines skipped), read with the file and line named on bad JSON. Readers
//! of datasets' own formats live with the family that builds data (`data::readers`).

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use crate::contract::StageError;

/// Reads JSONL into values, naming file and line on bad JSON.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>, StageError> {
    let f =
        std::fs::File::open(path).map_err(StageError::io(format!("opening {}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(StageError::io(format!("reading {}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            StageError::Failed(format!(
                "{}:{}: invalid JSON record: {e}",
                path.display(),
                i + 1
            ))
        })?);
    }
    Ok(out)
}
