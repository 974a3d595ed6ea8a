//! `dot_pairs`: reads (text, DOT) pairs into SFT records, refusing every pair whose
//! reference graph Graphviz would not read.
//!
//! The file (`with.path`, JSONL, a dep of the stage) holds one pair per line: the
//! description in `text_field` (default `text`), the reference graph in `dot_field`
//! (default `dot`), an id in `id_field` (default `id`), and any other fields (a `kind`,
//! a source), which are kept. Each kept record gains `prompt` (the instruction, a blank
//! line, the text) and `response` (the reference, in a ```` ```dot ```` block when
//! `fence` is set, the default, which is the form the `dot` evaluator reads first).
//! A line that is not JSON, lacks a string text or graph, repeats an id, or whose graph
//! fails the DOT grammar ([`crate::task::dot::parse`], checked against Graphviz) goes to
//! `rejects.jsonl` with `file:line`, the reason and, for a graph, the error's line and
//! column inside it; the stage fails when the rejected share is above
//! `max_reject_rate` (default 0.1), and never trains on a reject.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::data::readers::Reject;
use crate::params::{parse_params, ParamError};
use crate::records::{jsonl_lines, kind};
use crate::task::dot;

/// The instruction before each text when `with.instruction` is unset.
pub const DEFAULT_INSTRUCTION: &str =
    "Write the Graphviz DOT graph for the following. Reply with the DOT only, in a ```dot block.";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DotPairsParams {
    /// The JSONL file of pairs, relative to the workdir.
    path: String,
    #[serde(default = "default_text")]
    text_field: String,
    #[serde(default = "default_dot")]
    dot_field: String,
    #[serde(default = "default_id")]
    id_field: String,
    #[serde(default = "default_instruction")]
    instruction: String,
    /// Put the reference in a ```dot block.
    #[serde(default = "yes")]
    fence: bool,
    #[serde(default = "default_max_reject")]
    max_reject_rate: f64,
}

fn default_text() -> String {
    "text".into()
}
fn default_dot() -> String {
    "dot".into()
}
fn default_id() -> String {
    "id".into()
}
fn default_instruction() -> String {
    DEFAULT_INSTRUCTION.into()
}
fn yes() -> bool {
    true
}
fn default_max_reject() -> f64 {
    0.1
}

/// What [`read_pairs`] found.
#[derive(Debug, Default)]
struct Pairs {
    /// Kept records, each with `prompt` and `response` added.
    pub records: Vec<Value>,
    /// Refused lines, in file order.
    pub rejects: Vec<Reject>,
}

/// Reads the pairs in `text` (the contents of `file`, named in rejects).
fn read_pairs(file: &str, text: &str, p: &DotPairsParams) -> Pairs {
    let mut out = Pairs::default();
    let mut ids = BTreeSet::new();
    for (line, parsed) in jsonl_lines(text) {
        let at = format!("{file}:{line}");
        let reject = |reason: String| Reject {
            at: at.clone(),
            reason,
        };
        let mut rec = match parsed {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                out.rejects.push(reject(format!(
                    "expected a JSON object, found {}",
                    kind(&other)
                )));
                continue;
            }
            Err(e) => {
                out.rejects.push(reject(e));
                continue;
            }
        };
        let field = |rec: &serde_json::Map<String, Value>, name: &str| match rec.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(format!("`{name}` is empty")),
            Some(v) => Err(format!("expected a string `{name}`, found {}", kind(v))),
            None => Err(format!("expected a string `{name}`")),
        };
        let (description, graph) = match (field(&rec, &p.text_field), field(&rec, &p.dot_field)) {
            (Ok(t), Ok(d)) => (t, d),
            (Err(e), _) | (_, Err(e)) => {
                out.rejects.push(reject(e));
                continue;
            }
        };
        let id = match rec.get(&p.id_field) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            None => format!("line-{line}"),
            Some(v) => {
                out.rejects.push(reject(format!(
                    "expected `{}` to be a string or a number, found {}",
                    p.id_field,
                    kind(v)
                )));
                continue;
            }
        };
        if !ids.insert(id.clone()) {
            out.rejects
                .push(reject(format!("the id `{id}` appears on an earlier line")));
            continue;
        }
        if let Err(e) = dot::parse(&graph) {
            out.rejects.push(reject(format!(
                "the reference in `{}` does not parse as DOT: line {}, column {}: {}",
                p.dot_field, e.line, e.col, e.message
            )));
            continue;
        }
        let prompt = if p.instruction.is_empty() {
            description
        } else {
            format!("{}\n\n{description}", p.instruction)
        };
        let response = if p.fence {
            format!("```dot\n{}\n```", graph.trim_end())
        } else {
            graph.trim_end().to_string()
        };
        rec.insert(p.id_field.clone(), json!(id));
        rec.insert("prompt".into(), json!(prompt));
        rec.insert("response".into(), json!(response));
        out.records.push(Value::Object(rec));
    }
    out
}

/// (text, DOT) pairs into SFT records, with rejects.
pub struct DotPairsStage;

impl Stage for DotPairsStage {
    fn kind(&self) -> &'static str {
        "dot_pairs"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "(text, DOT) pairs into prompt/response records; a pair whose reference does not parse is rejected with file:line"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: DotPairsParams = parse_params(params)?;
        if p.path.is_empty() {
            return Err(ParamError::new(&["with", "path"], "expected a file path"));
        }
        if !(0.0..=1.0).contains(&p.max_reject_rate) {
            return Err(ParamError::new(
                &["with", "max_reject_rate"],
                format!("expected a share in [0, 1], found {}", p.max_reject_rate),
            ));
        }
        Ok(Signature {
            deps: vec![p.path.clone()],
            outputs: vec![
                OutputDecl::staged("records", "records.jsonl"),
                OutputDecl::staged("rejects", "rejects.jsonl"),
            ],
            ..Signature::default()
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: DotPairsParams = parse_params(&ctx.params)?;
        let path = ctx.workdir.join(&p.path);
        let text = std::fs::read_to_string(&path)
            .map_err(StageError::io(format!("reading {}", path.display())))?;
        let read = read_pairs(&p.path, &text, &p);
        for r in &read.rejects {
            ctx.log(&format!("{}: rejected: {}", r.at, r.reason));
        }
        let total = read.records.len() + read.rejects.len();
        let mut body = String::new();
        for r in &read.records {
            body.push_str(&r.to_string());
            body.push('\n');
        }
        crate::fsio::write_atomic(&ctx.out_dir.join("records.jsonl"), body.as_bytes())
            .map_err(StageError::io("writing records.jsonl"))?;
        let rej: String = read
            .rejects
            .iter()
            .map(|r| json!(r).to_string() + "\n")
            .collect();
        crate::fsio::write_atomic(&ctx.out_dir.join("rejects.jsonl"), rej.as_bytes())
            .map_err(StageError::io("writing rejects.jsonl"))?;
        let share = if total == 0 {
            0.0
        } else {
            read.rejects.len() as f64 / total as f64
        };
        if read.records.is_empty() {
            return Err(StageError::Failed(format!(
                "{}: no usable pair (of {total} lines; see rejects.jsonl)",
                p.path
            )));
        }
        if share > p.max_reject_rate {
            return Err(StageError::Failed(format!(
                "{}: {} of {total} pairs rejected ({:.1}%), above max_reject_rate {} (see rejects.jsonl; the first: {}: {})",
                p.path,
                read.rejects.len(),
                100.0 * share,
                p.max_reject_rate,
                read.rejects[0].at,
                read.rejects[0].reason
            )));
        }
        ctx.log(&format!(
            "{} pairs kept, {} rejected",
            read.records.len(),
            read.rejects.len()
        ));
        let mut metrics = BTreeMap::new();
        metrics.insert("pairs".into(), json!(read.records.len()));
        metrics.insert("rejects".into(), json!(read.rejects.len()));
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for r in &read.records {
            if let Some(k) = r.get("kind").and_then(Value::as_str) {
                *kinds.entry(k.to_string()).or_default() += 1;
            }
        }
        if !kinds.is_empty() {
            metrics.insert("kinds".into(), json!(kinds));
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DotPairsParams {
        serde_json::from_value(json!({"path": "pairs.jsonl"})).unwrap()
    }

    #[test]
    fn every_bad_pair_is_rejected_with_its_line() {
        let text = [
            r#"{"id": "a", "kind": "flow", "text": "x to y", "dot": "digraph { x -> y }"}"#,
            r#"{"id": "b", "text": "broken", "dot": "digraph { x -- y }"}"#,
            r#"not json"#,
            "",
            r#"{"id": "c", "text": "no graph"}"#,
            r#"{"id": "a", "text": "again", "dot": "graph { p -- q }"}"#,
            r#"{"id": 7, "text": "numbers", "dot": 3}"#,
            r#"[1, 2]"#,
            r#"{"id": "d", "text": "  ", "dot": "graph { p }"}"#,
            r#"{"id": "e", "text": "unclosed", "dot": "digraph {\n  a -> b;\n  c -> \n"}"#,
            r#"{"text": "no id", "dot": "strict graph { a -- b -- c }"}"#,
        ]
        .join("\n");
        let got = read_pairs("pairs.jsonl", &text, &params());
        let at: Vec<(&str, &str)> = got
            .rejects
            .iter()
            .map(|r| (r.at.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(got.records.len(), 2, "{at:?}");
        let lines: Vec<&str> = at.iter().map(|(a, _)| *a).collect();
        assert_eq!(
            lines,
            [
                "pairs.jsonl:2",
                "pairs.jsonl:3",
                "pairs.jsonl:5",
                "pairs.jsonl:6",
                "pairs.jsonl:7",
                "pairs.jsonl:8",
                "pairs.jsonl:9",
                "pairs.jsonl:10"
            ]
        );
        assert!(
            at[0].1.contains("does not parse as DOT: line 1"),
            "{}",
            at[0].1
        );
        assert!(at[1].1.contains("invalid JSON"));
        assert!(at[2].1.contains("expected a string `dot`"));
        assert!(at[3].1.contains("`a` appears on an earlier line"));
        assert!(at[4].1.contains("found a number"));
        assert!(at[5].1.contains("found a list"));
        assert!(at[6].1.contains("`text` is empty"));
        assert!(
            at[7].1.contains("line 3") || at[7].1.contains("line 4"),
            "{}",
            at[7].1
        );
        let first = &got.records[0];
        assert_eq!(first["kind"], "flow");
        assert_eq!(first["response"], "```dot\ndigraph { x -> y }\n```");
        assert!(first["prompt"].as_str().unwrap().ends_with("\n\nx to y"));
        assert_eq!(got.records[1]["id"], "line-11");
    }

    #[test]
    fn the_bundled_pairs_all_parse() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/data/anecdot/pairs.jsonl"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let got = read_pairs("pairs.jsonl", &text, &params());
        assert!(got.rejects.is_empty(), "{:?}", got.rejects);
        assert_eq!(got.records.len(), 160);
        let kinds: BTreeSet<&str> = got
            .records
            .iter()
            .filter_map(|r| r["kind"].as_str())
            .collect();
        assert_eq!(kinds.len(), 5, "{kinds:?}");
    }
}
