//! PopQA: a TSV with a header whose `possible_answers` cell is a JSON list.

use std::path::Path;

use super::{QaRecord, Read};

/// PopQA: TSV with a header; `possible_answers` is a JSON list inside a cell.
pub fn popqa(file: &Path, text: &str) -> Result<Read, String> {
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, h)| h.split('\t').collect())
        .ok_or_else(|| format!("{}: empty file", file.display()))?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("{}:1: the header has no `{name}` column", file.display()))
    };
    let (c_id, c_q, c_a) = (col("id")?, col("question")?, col("possible_answers")?);
    let mut out = Read::default();
    for (i, l) in lines {
        if l.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = l.split('\t').collect();
        let r = (|| -> Result<QaRecord, String> {
            if cells.len() != header.len() {
                return Err(format!(
                    "{} cells, the header has {}",
                    cells.len(),
                    header.len()
                ));
            }
            let answers: Vec<String> = serde_json::from_str(cells[c_a])
                .map_err(|e| format!("`possible_answers` is not a JSON list of strings: {e}"))?;
            if answers.is_empty() || cells[c_q].trim().is_empty() {
                return Err("empty question or answers".into());
            }
            Ok(QaRecord {
                id: format!("popqa-{}", cells[c_id]),
                source: "popqa".into(),
                question: cells[c_q].to_string(),
                answers,
                evidence: vec![],
                support: vec![],
                negatives: vec![],
            })
        })();
        match r {
            Ok(r) => out.records.push(r),
            Err(reason) => out.reject(file, i + 1, reason),
        }
    }
    Ok(out)
}
