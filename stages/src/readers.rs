//! Readers for the raw formats `build_data` accepts, all producing one unified
//! [`QaRecord`]. A malformed record never stops a reader: it becomes a
//! [`Reject`] naming `file:line` and the reason, and the stage decides whether
//! the reject rate is acceptable.
//!
//! Formats: HotpotQA (distractor JSON array), FEVER (JSONL + wiki-pages JSONL for
//! evidence text), NQ-Open (JSONL), PopQA (TSV with header) and generic JSONL
//! with a field mapping.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// An evidence passage attached to a record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chunk {
    /// Stable id (`record:k`, `page:sentence`, or the corpus id).
    pub id: String,
    /// Title of the page.
    pub title: String,
    /// The text.
    pub text: String,
}

/// The unified record every reader produces.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QaRecord {
    /// Id, unique within its source.
    pub id: String,
    /// Source name (`hotpotqa`, `fever`, ...).
    pub source: String,
    /// The question or claim.
    pub question: String,
    /// Gold answers (FEVER: the normalised label).
    pub answers: Vec<String>,
    /// Evidence passages.
    pub evidence: Vec<Chunk>,
    /// Ids of the evidence chunks that support the answer.
    pub support: Vec<String>,
    /// Ids of hard negatives (filled by `build_data`).
    pub negatives: Vec<String>,
}

/// A record that could not be read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reject {
    /// `file:line`.
    pub at: String,
    /// Why.
    pub reason: String,
}

/// What a reader returns.
#[derive(Debug, Default)]
pub struct Read {
    /// Good records, in file order.
    pub records: Vec<QaRecord>,
    /// Malformed ones.
    pub rejects: Vec<Reject>,
}

impl Read {
    fn reject(&mut self, file: &Path, line: usize, reason: impl Into<String>) {
        self.rejects.push(Reject {
            at: format!("{}:{line}", file.display()),
            reason: reason.into(),
        });
    }
}

fn field_str(v: &Value, k: &str) -> Result<String, String> {
    match v.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("`{k}` is empty")),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(format!("`{k}` must be a string, found {}", kind(other))),
        None => Err(format!("missing `{k}`")),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string_list(v: &Value, k: &str) -> Result<Vec<String>, String> {
    match v.get(k) {
        Some(Value::Array(items)) => {
            let out: Vec<String> = items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect();
            if out.len() != items.len() {
                return Err(format!("`{k}` must be a list of strings"));
            }
            if out.is_empty() {
                return Err(format!("`{k}` is empty"));
            }
            Ok(out)
        }
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![s.clone()]),
        Some(other) => Err(format!(
            "`{k}` must be a list of strings, found {}",
            kind(other)
        )),
        None => Err(format!("missing `{k}`")),
    }
}

/// JSONL lines as `(line number, parsed value or error)`, blank lines skipped.
fn jsonl(text: &str) -> impl Iterator<Item = (usize, Result<Value, String>)> + '_ {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotpotqa_reads_records_and_rejects_with_line_numbers() {
        let text = r#"[
 {"_id": "h1", "question": "Which city, Kraków or Łódź, is older?", "answer": "Kraków", "type": "comparison", "level": "hard",
  "supporting_facts": [["Kraków", 0], ["Łódź", 1]],
  "context": [["Kraków", ["Kraków is old.", " It is on the Vistula."]], ["Łódź", ["Łódź grew.", " Later."]], ["Other", ["x"]]]},
 {"_id": "h2", "answer": "x", "supporting_facts": [], "context": []},
 {"_id": "h3", "question": "q", "answer": "a", "supporting_facts": [["Missing", 0]], "context": [["T", ["s"]]]}
]"#;
        let r = hotpotqa(Path::new("h.json"), text).unwrap();
        assert_eq!(r.records.len(), 1);
        let rec = &r.records[0];
        assert_eq!(rec.support, vec!["h1:0", "h1:1"]);
        assert_eq!(rec.evidence[0].text, "Kraków is old. It is on the Vistula.");
        assert_eq!(
            r.rejects[0],
            Reject {
                at: "h.json:5".into(),
                reason: "missing `question`".into()
            }
        );
        assert_eq!(r.rejects[1].at, "h.json:6");
        assert!(r.rejects[1]
            .reason
            .contains("`Missing` is not in `context`"));
        assert!(hotpotqa(Path::new("h.json"), "{}")
            .unwrap_err()
            .contains("not a JSON array"));
    }

    #[test]
    fn fever_uses_wiki_sentences_and_checks_labels() {
        let wiki_text = "{\"id\": \"Nikolaj_Coster-Waldau\", \"text\": \"…\", \"lines\": \"0\\tNikolaj is Danish.\\tDenmark\\n1\\tHe acts.\"}\n";
        let (wiki, bad) = fever_wiki(Path::new("w.jsonl"), wiki_text);
        assert!(bad.is_empty());
        let claims = concat!(
            "{\"id\": 1, \"claim\": \"Nikolaj is Danish.\", \"label\": \"supports\", \"evidence\": [[[10, 20, \"Nikolaj_Coster-Waldau\", 0]]]}\n",
            "{\"id\": 2, \"claim\": \"Unknown.\", \"label\": \"NOT ENOUGH INFO\", \"evidence\": [[[11, null, null, null]]]}\n",
            "{\"id\": 3, \"claim\": \"x\", \"label\": \"MAYBE\", \"evidence\": []}\n",
            "{\"id\": 4, \"claim\": \"y\", \"label\": \"REFUTES\", \"evidence\": [[[1, 2, \"Absent_Page\", 3]]]}\n",
            "not json\n",
        );
        let r = fever(Path::new("f.jsonl"), claims, &wiki);
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.records[0].answers, vec!["SUPPORTS"]);
        assert_eq!(r.records[0].evidence[0].text, "Nikolaj is Danish.");
        assert_eq!(r.records[0].evidence[0].title, "Nikolaj Coster-Waldau");
        assert!(r.records[1].evidence.is_empty());
        let at: Vec<&str> = r.rejects.iter().map(|x| x.at.as_str()).collect();
        assert_eq!(at, vec!["f.jsonl:3", "f.jsonl:4", "f.jsonl:5"]);
        assert!(r.rejects[1].reason.contains("Absent_Page sentence 3"));
    }

    #[test]
    fn nq_open_popqa_and_generic() {
        let nq = "{\"question\": \"who wrote hamlet\", \"answer\": [\"Shakespeare\", \"William Shakespeare\"]}\n\n{\"question\": \"q\", \"answer\": []}\n";
        let r = nq_open(Path::new("nq.jsonl"), nq);
        assert_eq!(r.records[0].answers.len(), 2);
        assert_eq!(
            r.rejects[0],
            Reject {
                at: "nq.jsonl:3".into(),
                reason: "`answer` is empty".into()
            }
        );

        let tsv = "id\tsubj\tquestion\tpossible_answers\n7\tKraków\tWhat river flows through Kraków?\t[\"Vistula\", \"Wisła\"]\n8\tX\tq\tnot json\n9\tonly\n";
        let r = popqa(Path::new("p.tsv"), tsv).unwrap();
        assert_eq!(r.records[0].id, "popqa-7");
        assert_eq!(r.records[0].answers, vec!["Vistula", "Wisła"]);
        assert_eq!(
            r.rejects.iter().map(|x| x.at.as_str()).collect::<Vec<_>>(),
            vec!["p.tsv:3", "p.tsv:4"]
        );
        assert!(popqa(Path::new("p.tsv"), "id\tq\n")
            .unwrap_err()
            .contains("p.tsv:1: the header has no `question` column"));

        let fields = HashMap::from([
            ("question".to_string(), "q".to_string()),
            ("answers".to_string(), "golds".to_string()),
        ]);
        let r = generic(
            Path::new("g.jsonl"),
            "{\"q\": \"x?\", \"golds\": \"y\"}\n{\"q\": 3}\n",
            "mine",
            &fields,
        );
        assert_eq!(r.records[0].id, "mine-1");
        assert_eq!(r.records[0].answers, vec!["y"]);
        assert_eq!(r.rejects[0].reason, "missing `golds`");
    }
}
