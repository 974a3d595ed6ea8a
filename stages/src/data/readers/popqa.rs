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
    if first.trim_start().starts_with('{') {
        return Ok(popqa_rows(file, text));
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
            record(&rec[c_id], &rec[c_q], answers)
        })();
        match r {
            Ok(r) => out.records.push(r),
            Err(reason) => out.reject(file, line, reason),
        }
    }
    Ok(out)
}

/// One PopQA question: no evidence of its own (build_data retrieves it).
fn record(id: &str, question: &str, answers: Vec<String>) -> Result<QaRecord, String> {
    if answers.is_empty() || question.trim().is_empty() {
        return Err("empty question or answers".into());
    }
    Ok(QaRecord {
        id: format!("popqa-{id}"),
        source: "popqa".into(),
        question: question.to_string(),
        answers,
        evidence: vec![],
        support: vec![],
        negatives: vec![],
    })
}

/// PopQA as JSON rows (the Hugging Face dataset's Parquet, read row by row): the TSV's
/// columns, with `possible_answers` a JSON list or the TSV's string of one.
fn popqa_rows(file: &Path, text: &str) -> Read {
    let mut out = Read::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = (|| -> Result<QaRecord, String> {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
            let id = match v.get("id") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => return Err("missing `id`".into()),
            };
            let question = v
                .get("question")
                .and_then(serde_json::Value::as_str)
                .ok_or("missing `question`")?;
            let answers: Vec<String> = match v.get("possible_answers") {
                Some(serde_json::Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                    format!("`possible_answers` is not a JSON list of strings: {e}")
                })?,
                Some(a @ serde_json::Value::Array(_)) => serde_json::from_value(a.clone())
                    .map_err(|e| format!("`possible_answers` must hold strings: {e}"))?,
                _ => return Err("missing `possible_answers`".into()),
            };
            record(&id, question, answers)
        })();
        match r {
            Ok(r) => out.records.push(r),
            Err(reason) => out.reject(file, i + 1, reason),
        }
    }
    out
}
