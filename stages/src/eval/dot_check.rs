//! `dot_check`: Graphviz DOT syntax validity of every record's text, and optionally
//! its structure against a reference graph and its validity against a baseline's.
//!
//! Input `records` is JSONL; `field` names the text to check (a model's generation,
//! a reference graph, any DOT a user has). With `extract: true` (the default) the
//! DOT is first taken out of the text as [`crate::task::dot::extract`] does for a
//! model's reply (a fenced block, else the first balanced graph); with `false` the
//! whole text must be DOT. Output `verdicts` holds each record with an added
//! `dot_check` object: `valid`, and for an invalid one the error's `line`, `col`
//! (in the checked DOT) and `message`. Metrics: records, valid, the validity rate,
//! and how many had no DOT at all.
//!
//! With `reference_field` (a field holding the reference DOT, fenced or not) each
//! verdict also carries node and edge precision, recall and F1 against it (names
//! canonicalised, edge chains expanded, an undirected edge read both ways; an invalid
//! reply scores 0), and the metrics their means over records whose reference parses.
//!
//! With a `baseline` input (the same records answered by another model, e.g. the base
//! model before tuning; line `i` of each must be the same item, checked by `id_field`
//! when both have it) the baseline is checked the same way and the metrics add its
//! validity, the difference `validity_diff` (records − baseline) and the pooled
//! two-proportion z statistic `validity_z` with its two-sided normal p-value
//! `validity_p`. The two proportions are paired (the same items), so z is the usual
//! unpaired approximation; `both_valid`, `only_records_valid` and `only_baseline_valid`
//! give the discordant counts for a paired (McNemar) reading.

use std::collections::BTreeMap;

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
    /// A field holding the reference graph, for node and edge F1.
    #[serde(default)]
    reference_field: Option<String>,
    /// The field that pairs a record with its baseline line (when both have it).
    #[serde(default = "default_id")]
    id_field: String,
}

fn default_id() -> String {
    "id".into()
}

fn yes() -> bool {
    true
}

/// The DOT in `text` parsed: `None` when there is none to check.
fn graph_of(text: &str, extract: bool) -> Option<Result<dot::Graph, dot::DotError>> {
    let src = if extract {
        dot::extract(text)
    } else {
        Some(text.to_string())
    };
    src.map(|s| dot::parse(&s))
}

/// The verdict on one text, as written into the record.
pub fn verdict(text: &str, extract: bool) -> Value {
    verdict_of(&graph_of(text, extract))
}

fn verdict_of(parsed: &Option<Result<dot::Graph, dot::DotError>>) -> Value {
    match parsed {
        None => json!({"valid": false, "found": false, "message": "no DOT graph in the text"}),
        Some(Ok(g)) => json!({"valid": true, "found": true, "directed": g.directed,
            "nodes": g.nodes.len(), "edges": g.edges.len()}),
        Some(Err(e)) => json!({"valid": false, "found": true, "line": e.line, "col": e.col,
            "message": e.message}),
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
            inputs: vec![
                InputDecl::required("records"),
                InputDecl::optional("baseline"),
            ],
            outputs: vec![OutputDecl::staged("verdicts", "verdicts.jsonl")],
            ..Signature::default()
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: DotCheckParams = parse_params(&ctx.params)?;
        let records = read_records(ctx.input("records")?, "records")?;
        let baseline = match ctx.inputs.get("baseline") {
            Some(path) => Some(read_records(path, "baseline")?),
            None => None,
        };
        if let Some(base) = &baseline {
            if base.len() != records.len() {
                return Err(StageError::Failed(format!(
                    "input `baseline` has {} records but `records` has {}: they must answer the same items, line for line",
                    base.len(),
                    records.len()
                )));
            }
            let show = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
            for (k, ((at, r), (bat, b))) in records.iter().zip(base).enumerate() {
                if let (Some(x), Some(y)) = (r.get(&p.id_field), b.get(&p.id_field)) {
                    if x != y {
                        return Err(StageError::Failed(format!(
                            "record {} of input `records` has {} `{}` but record {} of input `baseline` has `{}` ({at}, {bat}): the two inputs must answer the same items in the same order",
                            k + 1,
                            p.id_field,
                            show(x),
                            k + 1,
                            show(y)
                        )));
                    }
                }
            }
        }
        let mut main = Tally::default();
        let mut out = String::new();
        for (at, mut rec) in records.iter().cloned() {
            let v = check(&p, &at, "records", &rec, &mut main)?;
            if let Value::Object(m) = &mut rec {
                m.insert("dot_check".into(), v);
            }
            out.push_str(&rec.to_string());
            out.push('\n');
        }
        crate::fsio::write_atomic(&ctx.out_dir.join("verdicts.jsonl"), out.as_bytes())
            .map_err(StageError::io("writing verdicts.jsonl"))?;
        let n = main.n;
        ctx.log(&format!("{} of {n} records hold valid DOT", main.valid));
        let mut metrics = main.metrics("");
        if let Some(base) = &baseline {
            let mut b = Tally::default();
            for (at, rec) in base {
                check(&p, at, "baseline", rec, &mut b)?;
            }
            let (p1, p2) = (main.rate(), b.rate());
            let z = two_proportion_z(main.valid, b.valid, n);
            let both = main
                .valid_at
                .iter()
                .zip(&b.valid_at)
                .filter(|(x, y)| **x && **y)
                .count();
            metrics.extend(b.metrics("baseline_"));
            metrics.insert("validity_diff".into(), json!(p1 - p2));
            metrics.insert("validity_z".into(), json!(z));
            metrics.insert(
                "validity_p".into(),
                json!(z.map(|z| libm::erfc(z.abs() / std::f64::consts::SQRT_2))),
            );
            metrics.insert("both_valid".into(), json!(both));
            metrics.insert("only_records_valid".into(), json!(main.valid - both));
            metrics.insert("only_baseline_valid".into(), json!(b.valid - both));
            ctx.log(&format!(
                "validity {p1:.3} vs baseline {p2:.3}: difference {:+.3}, z {}",
                p1 - p2,
                z.map_or(
                    "undefined (both all valid or all invalid)".into(),
                    |z| format!("{z:.2}")
                )
            ));
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

/// The JSONL records of one input, each with its `file:line`.
fn read_records(path: &std::path::Path, input: &str) -> Result<Vec<(String, Value)>, StageError> {
    let rows = crate::records::read_jsonl_numbered(path).map_err(|e| match e {
        StageError::Failed(m) => StageError::Failed(format!("input `{input}`: {m}")),
        other => other,
    })?;
    Ok(rows
        .into_iter()
        .map(|(line, v)| (format!("{}:{line}", path.display()), v))
        .collect())
}

/// Counts over one input's records.
#[derive(Default)]
struct Tally {
    n: usize,
    valid: usize,
    missing: usize,
    valid_at: Vec<bool>,
    scored: usize,
    sums: [f64; 6],
}

impl Tally {
    fn rate(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.valid as f64 / self.n as f64
        }
    }

    fn metrics(&self, prefix: &str) -> BTreeMap<String, Value> {
        let mut m = BTreeMap::new();
        m.insert(format!("{prefix}records"), json!(self.n));
        m.insert(format!("{prefix}valid"), json!(self.valid));
        m.insert(format!("{prefix}no_dot"), json!(self.missing));
        m.insert(format!("{prefix}validity_rate"), json!(self.rate()));
        if self.scored > 0 {
            let names = [
                "node_precision",
                "node_recall",
                "node_f1",
                "edge_precision",
                "edge_recall",
                "edge_f1",
            ];
            for (name, sum) in names.iter().zip(self.sums) {
                m.insert(format!("{prefix}{name}"), json!(sum / self.scored as f64));
            }
            m.insert(format!("{prefix}scored"), json!(self.scored));
        }
        m
    }
}

/// One record's verdict, with F1 against its reference when `reference_field` is set.
fn check(
    p: &DotCheckParams,
    at: &str,
    input: &str,
    rec: &Value,
    tally: &mut Tally,
) -> Result<Value, StageError> {
    let text = rec.get(&p.field).and_then(Value::as_str).ok_or_else(|| {
        StageError::Failed(format!(
            "{at} (input `{input}`): expected a string field `{}` (with.field)",
            p.field
        ))
    })?;
    let reply = graph_of(text, p.extract);
    let mut v = verdict_of(&reply);
    tally.n += 1;
    let ok = v["valid"] == true;
    tally.valid_at.push(ok);
    if ok {
        tally.valid += 1;
    }
    if v["found"] == false {
        tally.missing += 1;
    }
    if let Some(field) = &p.reference_field {
        let reference = rec.get(field).and_then(Value::as_str).ok_or_else(|| {
            StageError::Failed(format!(
                "{at} (input `{input}`): expected a string field `{field}` (with.reference_field)"
            ))
        })?;
        let parsed = dot::extract(reference).and_then(|s| dot::parse(&s).ok());
        match parsed {
            None => {
                v["reference_valid"] = json!(false);
            }
            Some(r) => {
                let [np, nr, nf, ep, er, ef] = match &reply {
                    Some(Ok(g)) => dot::compare(g, &r),
                    _ => [0.0; 6],
                };
                tally.scored += 1;
                for (s, x) in tally.sums.iter_mut().zip([np, nr, nf, ep, er, ef]) {
                    *s += x;
                }
                v["node_f1"] = json!(nf);
                v["edge_f1"] = json!(ef);
                v["node_precision"] = json!(np);
                v["node_recall"] = json!(nr);
                v["edge_precision"] = json!(ep);
                v["edge_recall"] = json!(er);
            }
        }
    }
    Ok(v)
}

/// The pooled two-proportion z statistic of `a` and `b` successes out of `n` each;
/// `None` when the pooled share is 0 or 1 (no variance) or `n` is 0.
pub fn two_proportion_z(a: usize, b: usize, n: usize) -> Option<f64> {
    if n == 0 {
        return None;
    }
    let (p1, p2) = (a as f64 / n as f64, b as f64 / n as f64);
    let pooled = (a + b) as f64 / (2 * n) as f64;
    let var = pooled * (1.0 - pooled) * 2.0 / n as f64;
    (var > 0.0).then(|| (p1 - p2) / var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_proportion_z_by_hand() {
        // 30/40 vs 18/40: pooled 48/80 = 0.6, variance 0.6·0.4·2/40 = 0.012,
        // z = 0.3 / √0.012 = 2.7386.
        let z = two_proportion_z(30, 18, 40).unwrap();
        assert!((z - 0.3 / 0.012f64.sqrt()).abs() < 1e-12, "{z}");
        assert!((z - 2.738_612_787_5).abs() < 1e-9);
        assert_eq!(two_proportion_z(18, 30, 40).map(|x| -x), Some(z));
        assert_eq!(two_proportion_z(5, 5, 5), None);
        assert_eq!(two_proportion_z(0, 0, 5), None);
        assert_eq!(two_proportion_z(0, 0, 0), None);
        // Two-sided p of z = 1.96 is 0.05.
        assert!((libm::erfc(1.959_964 / std::f64::consts::SQRT_2) - 0.05).abs() < 1e-6);
    }
}
