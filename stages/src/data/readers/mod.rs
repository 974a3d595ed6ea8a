//! Readers for the raw formats `build_data` accepts, all producing one unified
//! [`QaRecord`]. A malformed record never stops a reader: it becomes a
//! [`Reject`] naming `file:line` and the reason, and the stage decides whether
//! the reject rate is acceptable.
//!
//! One file per format: HotpotQA (distractor JSON array), FEVER (JSONL + wiki-pages
//! JSONL for evidence text), NQ-Open (JSONL), PopQA (TSV with header) and generic
//! JSONL with a field mapping. A new dataset gets its own file here, re-exported
//! below, and a `format:` name in `build_data`. The option-letter and yes/no datasets
//! of the confidence-token workflow (MedQA, BoolQ) are read by [`crate::task::choice`],
//! shared with the stage that tags them.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

mod fever;
mod generic;
mod hotpotqa;
mod nq_open;
mod popqa;

pub use fever::{fever, fever_wiki};
pub use generic::generic;
pub use hotpotqa::hotpotqa;
pub use nq_open::nq_open;
pub use popqa::popqa;

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
    pub(super) fn reject(&mut self, file: &Path, line: usize, reason: impl Into<String>) {
        self.rejects.push(Reject {
            at: format!("{}:{line}", file.display()),
            reason: reason.into(),
        });
    }
}

pub(super) fn field_str(v: &Value, k: &str) -> Result<String, String> {
    match v.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("`{k}` is empty")),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(format!("`{k}` must be a string, found {}", kind(other))),
        None => Err(format!("missing `{k}`")),
    }
}

pub(super) use crate::records::kind;

pub(super) fn string_list(v: &Value, k: &str) -> Result<Vec<String>, String> {
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
pub(super) use crate::records::jsonl_lines as jsonl;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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
        assert!(hotpotqa(Path::new("h.json"), "[{}")
            .unwrap_err()
            .contains("not a JSON array"));
        // Not an array: JSON rows (the HF Parquet read row by row), each checked alike.
        let rows = hotpotqa(Path::new("h.parquet"), "{}\n").unwrap();
        assert_eq!(rows.rejects[0].at, "h.parquet:1");
        assert!(rows.rejects[0].reason.contains("missing `_id`"));
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
        // The official file's quoting: list cells CSV-quoted with doubled quotes; a
        // quoted cell may hold a tab.
        let official = "id\tsubj\tprop\tquestion\ts_aliases\tpossible_answers\n\
4222362\tGeorge Rankin\toccupation\tWhat is George Rankin's occupation?\t\"[\"\"George James Rankin\"\"]\"\t\"[\"\"politician\"\", \"\"political leader\"\"]\"\n\
1\tA\tb\t\"What is \tA?\"\t[]\t\"[\"\"x\"\"]\"\n";
        let r = popqa(Path::new("popQA.tsv"), official).unwrap();
        assert!(r.rejects.is_empty(), "{:?}", r.rejects);
        assert_eq!(r.records[0].id, "popqa-4222362");
        assert_eq!(r.records[0].answers, vec!["politician", "political leader"]);
        assert_eq!(r.records[1].question, "What is \tA?");
        assert!(popqa(Path::new("x.txt"), "id,question\n")
            .unwrap_err()
            .contains("x.txt:1: not a tab-separated file"));
        // JSON rows (the HF Parquet): an integer id, answers as the TSV's string or a list.
        let rows = popqa(
            Path::new("p.parquet"),
            "{\"id\": 7, \"question\": \"Q?\", \"possible_answers\": \"[\\\"a\\\"]\"}\n{\"id\": \"8\", \"question\": \"R?\", \"possible_answers\": [\"b\"]}\n{\"id\": 9}\n",
        )
        .unwrap();
        assert_eq!(rows.records[0].id, "popqa-7");
        assert_eq!(rows.records[0].answers, vec!["a"]);
        assert_eq!(rows.records[1].answers, vec!["b"]);
        assert_eq!(rows.rejects[0].at, "p.parquet:3");

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
