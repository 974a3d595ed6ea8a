//! `dot_check`: Graphviz DOT syntax validity of every record's text.
//!
//! Input `records` is JSONL; `field` names the text to check (a model's generation,
//! a reference graph, any DOT a user has). With `extract: true` (the default) the
//! DOT is first taken out of the text as [`crate::task::dot::extract`] does for a
//! model's reply (a fenced block, else the first balanced graph); with `false` the
//! whole text must be DOT. Output `verdicts` holds each record with an added
//! `dot_check` object: `valid`, and for an invalid one the error's `line`, `col`
//! (in the checked DOT) and `message`. Metrics: records, valid, the validity rate,
//! and how many had no DOT at all.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::params::{parse_params, ParamError};
use crate::task::dot;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DotCheckParams {
    /// The field that holds the text.
    field: String,
    /// Take the DOT out of surrounding prose first.
    #[serde(default = "yes")]
    extract: bool,
}

fn yes() -> bool {
    true
}

/// The verdict on one text, as written into the record.
pub fn verdict(text: &str, extract: bool) -> Value {
    let src = if extract {
        dot::extract(text)
    } else {
        Some(text.to_string())
    };
    match src {
        None => json!({"valid": false, "found": false, "message": "no DOT graph in the text"}),
        Some(src) => match dot::parse(&src) {
            Ok(g) => json!({"valid": true, "found": true, "directed": g.directed,
                "nodes": g.nodes.len(), "edges": g.edges.len()}),
            Err(e) => json!({"valid": false, "found": true, "line": e.line, "col": e.col,
                "message": e.message}),
        },
    }
}

/// Checks DOT syntax record by record.
pub struct DotCheckStage;

impl Stage for DotCheckStage {
    fn kind(&self) -> &'static str {
        "dot_check"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "Graphviz DOT syntax validity per record (line and column of each error), and the validity rate"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: DotCheckParams = parse_params(params)?;
        if p.field.is_empty() {
            return Err(ParamError::new(&["with", "field"], "expected a field name"));
        }
        Ok(Signature {
            inputs: vec![InputDecl::required("records")],
            outputs: vec![OutputDecl::staged("verdicts", "verdicts.jsonl")],
            ..Signature::default()
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: DotCheckParams = parse_params(&ctx.params)?;
        let path = ctx.input("records")?;
        let f = std::fs::File::open(path)
            .map_err(StageError::io(format!("opening {}", path.display())))?;
        let (mut n, mut valid, mut missing) = (0usize, 0usize, 0usize);
        let mut out = String::new();
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(StageError::io(format!("reading {}", path.display())))?;
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            let mut rec: Value = serde_json::from_str(&line)
                .map_err(|e| StageError::Failed(format!("{at}: invalid JSON record: {e}")))?;
            let text = rec.get(&p.field).and_then(Value::as_str).ok_or_else(|| {
                StageError::Failed(format!(
                    "{at} (input `records`): expected a string field `{}` (with.field)",
                    p.field
                ))
            })?;
            let v = verdict(text, p.extract);
            n += 1;
            if v["valid"] == true {
                valid += 1;
            }
            if v["found"] == false {
                missing += 1;
            }
            if let Value::Object(m) = &mut rec {
                m.insert("dot_check".into(), v);
            }
            out.push_str(&rec.to_string());
            out.push('\n');
        }
        crate::fsio::write_atomic(&ctx.out_dir.join("verdicts.jsonl"), out.as_bytes())
            .map_err(StageError::io("writing verdicts.jsonl"))?;
        ctx.log(&format!("{valid} of {n} records hold valid DOT"));
        let mut metrics = BTreeMap::new();
        metrics.insert("records".into(), json!(n));
        metrics.insert("valid".into(), json!(valid));
        metrics.insert("no_dot".into(), json!(missing));
        metrics.insert(
            "validity_rate".into(),
            json!(if n == 0 { 0.0 } else { valid as f64 / n as f64 }),
        );
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}
