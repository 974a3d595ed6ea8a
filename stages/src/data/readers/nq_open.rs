//! NQ-Open: JSONL of `question` and `answer` (a list); no evidence, which
//! `build_data` retrieves with BM25.

use std::path::Path;

use super::{field_str, jsonl, string_list, QaRecord, Read};

/// NQ-Open: JSONL `question`, `answer` (list). Ids are `nq-LINE`.
pub fn nq_open(file: &Path, text: &str) -> Read {
    let mut out = Read::default();
    for (line, v) in jsonl(text) {
        let r = v.and_then(|v| {
            Ok(QaRecord {
                id: format!("nq-{line}"),
                source: "nq_open".into(),
                question: field_str(&v, "question")?,
                answers: string_list(&v, "answer")?,
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
