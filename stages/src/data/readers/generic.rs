//! Any JSONL of questions and answers, with `fields` mapping the unified names
//! (`id`, `question`, `answers`) to the file's own.

use std::collections::HashMap;
use std::path::Path;

use super::{field_str, jsonl, string_list, QaRecord, Read};

/// Generic JSONL: `fields` maps `id`, `question`, `answers` to the file's names.
pub fn generic(file: &Path, text: &str, source: &str, fields: &HashMap<String, String>) -> Read {
    let name = |k: &str| fields.get(k).cloned().unwrap_or_else(|| k.to_string());
    let mut out = Read::default();
    for (line, v) in jsonl(text) {
        let r = v.and_then(|v| {
            Ok(QaRecord {
                id: field_str(&v, &name("id")).unwrap_or_else(|_| format!("{source}-{line}")),
                source: source.to_string(),
                question: field_str(&v, &name("question"))?,
                answers: string_list(&v, &name("answers"))?,
                evidence: vec![],
                support: vec![],
                negatives: vec![],
            })
        });
        match r {
            Ok(r) => out.records.push(r),
            Err(reason) => out.reject(file, line, reason),
        }
    }
    out
}
