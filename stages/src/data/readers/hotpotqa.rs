//! HotpotQA, distractor setting: questions, each with its context paragraphs (title +
//! sentences) and the supporting facts that say which sentences the answer rests on.
//!
//! Two layouts of the same data are read. The official files are one JSON array whose
//! items have `_id`, `context: [[title, [sentences]]]` and `supporting_facts: [[title,
//! index]]`; the Hugging Face dataset (`hotpotqa/hotpot_qa`, served as Parquet and so read
//! here as one JSON object per row) has `id`, `context: {title: [..], sentences: [[..]]}`
//! and `supporting_facts: {title: [..], sent_id: [..]}`.

use std::path::Path;

use serde_json::Value;

use super::{field_str, Chunk, QaRecord, Read};

/// HotpotQA: a JSON array (the official files) or JSON lines (rows of the HF Parquet).
pub fn hotpotqa(file: &Path, text: &str) -> Result<Read, String> {
    if !text.trim_start().starts_with('[') {
        let mut out = Read::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(v) => match hotpot_record(&v) {
                    Ok(r) => out.records.push(r),
                    Err(reason) => out.reject(file, i + 1, reason),
                },
                Err(e) => out.reject(file, i + 1, format!("invalid JSON: {e}")),
            }
        }
        return Ok(out);
    }
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(text)
        .map_err(|e| format!("{}: not a JSON array: {e}", file.display()))?;
    let mut out = Read::default();
    for raw in items {
        let offset = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        let line = text[..offset].matches('\n').count() + 1;
        let v: Value = match serde_json::from_str(raw.get()) {
            Ok(v) => v,
            Err(e) => {
                out.reject(file, line, format!("invalid JSON: {e}"));
                continue;
            }
        };
        match hotpot_record(&v) {
            Ok(r) => out.records.push(r),
            Err(reason) => out.reject(file, line, reason),
        }
    }
    Ok(out)
}

/// `(title, sentences)` of each context paragraph, in either layout.
fn paragraphs(v: &Value) -> Result<Vec<(String, Vec<String>)>, String> {
    let strings = |x: &Value| -> Vec<String> {
        x.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    match v.get("context") {
        Some(Value::Array(context)) => context
            .iter()
            .enumerate()
            .map(
                |(k, para)| match (para.get(0).and_then(Value::as_str), para.get(1)) {
                    (Some(title), Some(s)) if s.is_array() => Ok((title.to_string(), strings(s))),
                    _ => Err(format!("`context[{k}]` must be [title, [sentences]]")),
                },
            )
            .collect(),
        Some(Value::Object(c)) => {
            let (Some(Value::Array(titles)), Some(Value::Array(sents))) =
                (c.get("title"), c.get("sentences"))
            else {
                return Err("`context` must have `title` and `sentences` lists".into());
            };
            if titles.len() != sents.len() {
                return Err(format!(
                    "`context` has {} titles and {} sentence lists",
                    titles.len(),
                    sents.len()
                ));
            }
            titles
                .iter()
                .zip(sents)
                .map(|(t, s)| {
                    let t = t.as_str().ok_or("`context.title` must hold strings")?;
                    Ok((t.to_string(), strings(s)))
                })
                .collect()
        }
        _ => Err("missing `context` (a list of [title, sentences], or {title, sentences})".into()),
    }
}

/// Titles of the supporting facts, in either layout.
fn fact_titles(v: &Value) -> Result<Vec<String>, String> {
    match v.get("supporting_facts") {
        Some(Value::Array(facts)) => facts
            .iter()
            .map(|f| {
                f.get(0)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        "`supporting_facts` entries must be [title, sentence index]".to_string()
                    })
            })
            .collect(),
        Some(Value::Object(f)) => f
            .get("title")
            .and_then(Value::as_array)
            .ok_or("`supporting_facts` must have a `title` list")?
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "`supporting_facts.title` must hold strings".to_string())
            })
            .collect(),
        _ => Err("missing `supporting_facts`".into()),
    }
}

fn hotpot_record(v: &Value) -> Result<QaRecord, String> {
    let id = field_str(v, "_id")
        .or_else(|_| field_str(v, "id"))
        .map_err(|_| "missing `_id` (or the HF schema's `id`)".to_string())?;
    let question = field_str(v, "question")?;
    let answer = field_str(v, "answer")?;
    let evidence: Vec<Chunk> = paragraphs(v)?
        .into_iter()
        .enumerate()
        .map(|(k, (title, sents))| Chunk {
            id: format!("{id}:{k}"),
            title,
            text: sents.concat(),
        })
        .collect();
    let mut support = Vec::new();
    for title in fact_titles(v)? {
        if let Some(c) = evidence.iter().find(|c| c.title == title) {
            if !support.contains(&c.id) {
                support.push(c.id.clone());
            }
        } else {
            return Err(format!(
                "supporting fact title `{title}` is not in `context`"
            ));
        }
    }
    Ok(QaRecord {
        id,
        source: "hotpotqa".into(),
        question,
        answers: vec![answer],
        evidence,
        support,
        negatives: vec![],
    })
}
