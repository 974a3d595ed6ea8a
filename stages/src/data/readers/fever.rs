//! FEVER: claims (JSONL) labelled SUPPORTS / REFUTES / NOT ENOUGH INFO with evidence
//! sets of (page, sentence), and the wiki-pages JSONL whose `lines` give the sentence
//! texts.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::{field_str, jsonl, Chunk, QaRecord, Read, Reject};

/// FEVER claims. `wiki` maps page id → sentences (from wiki-pages `lines`).
pub fn fever(file: &Path, text: &str, wiki: &HashMap<String, Vec<String>>) -> Read {
    let mut out = Read::default();
    for (line, v) in jsonl(text) {
        let r = v.and_then(|v| {
            let id = field_str(&v, "id")?;
            let claim = field_str(&v, "claim")?;
            let label = field_str(&v, "label")?.to_uppercase();
            if !matches!(label.as_str(), "SUPPORTS" | "REFUTES" | "NOT ENOUGH INFO") {
                return Err(format!(
                    "`label` must be SUPPORTS, REFUTES or NOT ENOUGH INFO, found `{label}`"
                ));
            }
            let mut evidence = Vec::new();
            let mut support = Vec::new();
            for set in v
                .get("evidence")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for ev in set.as_array().into_iter().flatten() {
                    let (Some(page), Some(sent)) = (
                        ev.get(2).and_then(Value::as_str),
                        ev.get(3).and_then(Value::as_u64),
                    ) else {
                        continue; // NEI annotations carry nulls
                    };
                    let cid = format!("{page}:{sent}");
                    if support.contains(&cid) {
                        continue;
                    }
                    let text = wiki
                        .get(page)
                        .and_then(|lines| lines.get(sent as usize))
                        .ok_or_else(|| {
                            format!("evidence {page} sentence {sent} is not in the wiki pages")
                        })?;
                    evidence.push(Chunk {
                        id: cid.clone(),
                        title: page.replace('_', " "),
                        text: text.clone(),
                    });
                    support.push(cid);
                }
            }
            if label != "NOT ENOUGH INFO" && support.is_empty() {
                return Err(format!("label {label} without evidence"));
            }
            Ok(QaRecord {
                id,
                source: "fever".into(),
                question: claim,
                answers: vec![label],
                evidence,
                support,
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

/// FEVER wiki-pages JSONL: `id`, `text`, `lines` (`"0\tFirst sentence.\tlink…\n1\t…"`).
pub fn fever_wiki(file: &Path, text: &str) -> (HashMap<String, Vec<String>>, Vec<Reject>) {
    let mut pages = HashMap::new();
    let mut rejects = Vec::new();
    for (line, v) in jsonl(text) {
        let page = v.and_then(|v| {
            let id = field_str(&v, "id")?;
            let lines = v
                .get("lines")
                .and_then(Value::as_str)
                .ok_or("missing `lines`")?;
            let mut sents = Vec::new();
            for l in lines.split('\n') {
                let mut parts = l.split('\t');
                let idx: usize = parts
                    .next()
                    .unwrap_or("")
                    .parse()
                    .map_err(|_| format!("bad line index in `{l}`"))?;
                if idx != sents.len() {
                    return Err(format!("line index {idx} out of order"));
                }
                sents.push(parts.next().unwrap_or("").to_string());
            }
            Ok((id, sents))
        });
        match page {
            Ok((id, sents)) => {
                pages.insert(id, sents);
            }
            Err(reason) => rejects.push(Reject {
                at: format!("{}:{line}", file.display()),
                reason,
            }),
        }
    }
    (pages, rejects)
}
