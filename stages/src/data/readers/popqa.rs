//! PopQA: the official `popQA.tsv`, tab-separated with a header, cells quoted CSV-style
//! when they hold quotes (`"[""political leader"",""politician""]"`); `possible_answers` is
//! a JSON list inside its cell. Read with the `csv` crate (its quoting rules are the ones
//! the file was written with), never split by hand.

use std::path::Path;

use super::{QaRecord, Read};

/// PopQA: TSV with a header; `possible_answers` is a JSON list inside a cell.
pub fn popqa(file: &Path, text: &str) -> Result<Read, String> {
    let first = text.lines().next().unwrap_or("");
    if first.trim().is_empty() {
        return Err(format!("{}: empty file", file.display()));
    }
    if !first.contains('\t') {
        return Err(format!(
            "{}:1: not a tab-separated file (its first line has no tab); `format: popqa` reads PopQA's TSV",
            file.display()
        ));
    }
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| format!("{}:1: {e}", file.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("{}:1: the header has no `{name}` column", file.display()))
    };
    let (c_id, c_q, c_a) = (col("id")?, col("question")?, col("possible_answers")?);
    let mut out = Read::default();
    for rec in rdr.records() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                out.reject(file, line, format!("not a TSV row: {e}"));
                continue;
            }
        };
        let line = rec.position().map_or(0, |p| p.line() as usize);
        if rec.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let r = (|| -> Result<QaRecord, String> {
            if rec.len() != header.len() {
                return Err(format!(
                    "{} cells, the header has {}",
                    rec.len(),
                    header.len()
                ));
            }
            let answers: Vec<String> = serde_json::from_str(&rec[c_a])
                .map_err(|e| format!("`possible_answers` is not a JSON list of strings: {e}"))?;
            if answers.is_empty() || rec[c_q].trim().is_empty() {
                return Err("empty question or answers".into());
            }
            Ok(QaRecord {
                id: format!("popqa-{}", &rec[c_id]),
                source: "popqa".into(),
                question: rec[c_q].to_string(),
                answers,
                evidence: vec![],
                support: vec![],
                negatives: vec![],
            })
        })();
        match r {
            Ok(r) => out.records.push(r),
            Err(reason) => out.reject(file, line, reason),
        }
    }
    Ok(out)
}
