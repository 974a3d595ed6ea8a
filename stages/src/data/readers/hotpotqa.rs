//! HotpotQA, distractor setting: a JSON array of questions, each with its context
//! paragraphs (title + sentences) and the supporting facts that say which sentences
//! the answer rests on.

use std::path::Path;

use serde_json::Value;

use super::{field_str, Chunk, QaRecord, Read};

/// HotpotQA distractor setting: a JSON array of questions with context paragraphs.
pub fn hotpotqa(file: &Path, text: &str) -> Result<Read, String> {
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

fn hotpot_record(v: &Value) -> Result<QaRecord, String> {
    let id = field_str(v, "_id")?;
    let question = field_str(v, "question")?;
    let answer = field_str(v, "answer")?;
    let context = v
        .get("context")
        .and_then(Value::as_array)
        .ok_or("missing `context` (a list of [title, sentences])")?;
    let mut evidence = Vec::new();
    for (k, para) in context.iter().enumerate() {
        let (Some(title), Some(sents)) = (
            para.get(0).and_then(Value::as_str),
            para.get(1).and_then(Value::as_array),
        ) else {
            return Err(format!("`context[{k}]` must be [title, [sentences]]"));
        };
        let text: Vec<&str> = sents.iter().filter_map(Value::as_str).collect();
        evidence.push(Chunk {
            id: format!("{id}:{k}"),
            title: title.to_string(),
            text: text.join(""),
        });
    }
    let facts = v
        .get("supporting_facts")
        .and_then(Value::as_array)
        .ok_or("missing `supporting_facts`")?;
    let mut support = Vec::new();
    for f in facts {
        let title = f
            .get(0)
            .and_then(Value::as_str)
            .ok_or("`supporting_facts` entries must be [title, sentence index]")?;
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
