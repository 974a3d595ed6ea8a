//! `evaluate`: a model with its adapter (`tuned`) and without it (`base`) answer the
//! test records; the answers are checked against the answer schema
//! ([`crate::task::factuality`]) and scored per model and as deltas:
//!
//! - `em`, `f1`: SQuAD-normalised, max over gold answers, on answerable items (at least
//!   one support chunk; a refusal or unparsable output scores 0);
//! - `hallucination_rate`: of the non-refusal answers, those with no valid citation,
//!   citing no support chunk, or answering although the evidence lacks the answer;
//! - `citation_precision`, `citation_recall` against the support chunks (answered,
//!   answerable items);
//! - `refusal_rate`, `refusal_precision` (refusals on unanswerable items / refusals),
//!   `refusal_recall` (unanswerable items refused / unanswerable items);
//! - `ece` (15 equal-width bins, top label, p = 1) and `ece_debiased_l2` (equal-mass
//!   bins) of `confidence` against correctness (an answer is correct on exact match, a
//!   refusal when the item is unanswerable);
//! - `parse_failure_rate`.
//!
//! Prompts are sorted by length and batched in that order, so long prompts do not pad
//! short ones. Each model's outputs are appended per batch to a file in the checkpoint
//! dir, so an interrupted run resumes after its last complete batch.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::metrics::agreement::{exact_match, set_precision_recall, token_f1};
use crate::metrics::calibration::{debiased_l2_ece_equal_mass, ece_equal_width};
use crate::model::chat::{ChatModel, ChatRequest, Message, Sampling};
use crate::params::{parse_params, ParamError};
use crate::task::factuality::check_answer;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluateParams {
    model: String,
    /// Prompt template file (minijinja; the record's fields are its variables).
    template: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default = "yes")]
    compare_base: bool,
    #[serde(default = "default_max_new")]
    max_new_tokens: usize,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default = "auto")]
    device: String,
    #[serde(default = "auto")]
    dtype: String,
    #[serde(default = "yes")]
    decode_int8: bool,
    /// Keep the model's projections as `nf4` or `int8` (QLoRA-style base), or `none`.
    #[serde(default)]
    quantize: crate::model::BaseQuant,
    /// nf4: quantize the block absmaxes too.
    #[serde(default)]
    double_quant: bool,
    #[serde(default = "default_bins")]
    bins: usize,
}

fn yes() -> bool {
    true
}
fn default_max_new() -> usize {
    128
}
fn default_batch() -> usize {
    8
}
fn auto() -> String {
    "auto".into()
}
fn default_bins() -> usize {
    15
}

/// Scores a fine-tuned model against its base on the answer-with-citations task.
pub struct EvaluateStage;

impl Stage for EvaluateStage {
    fn kind(&self) -> &'static str {
        "evaluate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "tuned vs base on the test split: EM/F1, hallucination, citations, refusals, ECE, parse failures, reliability diagram"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: EvaluateParams = parse_params(params)?;
        crate::model::check_quantize(&p.model, p.quantize)?;
        if p.batch_size == 0 {
            return Err(ParamError::new(&["batch_size"], "expected at least 1"));
        }
        if p.bins == 0 {
            return Err(ParamError::new(&["bins"], "expected at least 1"));
        }
        let deps = crate::model::template_and_model_deps(&p.template, &p.model)?;
        Ok(Signature {
            inputs: vec![InputDecl::required("test"), InputDecl::optional("adapter")],
            deps,
            outputs: vec![
                OutputDecl::staged("report", "report"),
                OutputDecl::staged("predictions", "predictions.jsonl"),
            ],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        crate::model::key_without(params, &["batch_size", "device", "dtype"])
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: EvaluateParams = parse_params(&ctx.params)?;
        let template = crate::prompt::read_template(ctx, &p.template)?;
        let mut records = crate::records::read_jsonl(ctx.input("test")?)?;
        if let Some(n) = p.limit {
            records.truncate(n);
        }
        let prompts = crate::prompt::render_each(&template, &p.template, &records, "test")?;
        let adapter = ctx.inputs.get("adapter").cloned();
        let mut runs: Vec<(&str, Option<std::path::PathBuf>)> = Vec::new();
        if let Some(a) = adapter {
            runs.push(("tuned", Some(a)));
            if p.compare_base {
                runs.push(("base", None));
            }
        } else {
            runs.push(("base", None));
        }
        let mut per_model: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        let mut reliability: Vec<(String, Vec<(f64, bool)>)> = Vec::new();
        let mut predictions = String::new();
        for (name, adapter) in &runs {
            let model = ChatModel::load(
                &p.model,
                &ctx.workdir,
                adapter.as_deref(),
                &crate::model::LoadOptions {
                    device: ctx.device_for(&p.device),
                    dtype: p.dtype.clone(),
                    base: p.quantize,
                    double_quant: p.double_quant,
                    decode_int8: p.decode_int8,
                },
            )
            .map_err(StageError::Failed)?;
            let outputs = answer_all(ctx, &p, &model, name, &prompts)?;
            let scored = score(&records, &outputs, p.bins);
            for (i, (r, o)) in records.iter().zip(&outputs).enumerate() {
                predictions.push_str(
                    &json!({"model": name, "index": i, "id": r.get("id"), "output": o, "score": scored.items[i]})
                        .to_string(),
                );
                predictions.push('\n');
            }
            reliability.push((name.to_string(), scored.confidence.clone()));
            per_model.insert(name.to_string(), scored.metrics);
        }
        let dir = ctx.out_dir.join("report");
        std::fs::create_dir_all(&dir).map_err(StageError::io("creating the report dir"))?;
        crate::figure::reliability(&dir.join("reliability.png"), &reliability, p.bins)
            .map_err(StageError::io("writing reliability.png"))?;
        let mut deltas = BTreeMap::new();
        if let (Some(t), Some(b)) = (per_model.get("tuned"), per_model.get("base")) {
            for (k, v) in t {
                if let Some(bv) = b.get(k) {
                    deltas.insert(k.clone(), v - bv);
                }
            }
        }
        let report =
            json!({"items": records.len(), "models": per_model, "delta_tuned_minus_base": deltas});
        crate::fsio::write_json_atomic(&dir.join("report.json"), &report)
            .map_err(StageError::io("writing report.json"))?;
        crate::fsio::write_atomic(
            &dir.join("report.md"),
            markdown(&per_model, &deltas, records.len()).as_bytes(),
        )
        .map_err(StageError::io("writing report.md"))?;
        crate::fsio::write_atomic(
            &ctx.out_dir.join("predictions.jsonl"),
            predictions.as_bytes(),
        )
        .map_err(StageError::io("writing predictions.jsonl"))?;
        let mut metrics = BTreeMap::new();
        for (m, ms) in &per_model {
            for (k, v) in ms {
                metrics.insert(format!("{m}.{k}"), json!(v));
            }
        }
        for (k, v) in &deltas {
            metrics.insert(format!("delta.{k}"), json!(v));
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

/// Generates every prompt's answer (length-sorted batches), resuming from the
/// checkpoint file of this model.
fn answer_all(
    ctx: &StageContext,
    p: &EvaluateParams,
    model: &ChatModel,
    name: &str,
    prompts: &[String],
) -> Result<Vec<String>, StageError> {
    std::fs::create_dir_all(&ctx.checkpoint_dir)
        .map_err(StageError::io("creating the checkpoint dir"))?;
    let partial = ctx.checkpoint_dir.join(format!("{name}.partial.jsonl"));
    let mut done: BTreeMap<usize, String> = BTreeMap::new();
    for line in std::fs::read_to_string(&partial)
        .unwrap_or_default()
        .lines()
    {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if let (Some(i), Some(t)) = (v["i"].as_u64(), v["text"].as_str()) {
                done.insert(i as usize, t.to_string());
            }
        }
    }
    // Rewrite without a torn last line, then append batch by batch.
    let kept: String = done
        .iter()
        .map(|(i, t)| format!("{}\n", json!({"i": i, "text": t})))
        .collect();
    std::fs::write(&partial, kept).map_err(StageError::io("rewriting the partial answers"))?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .map_err(StageError::io("opening the partial answers"))?;
    if !done.is_empty() {
        ctx.log(&format!("{name}: resuming after {} answers", done.len()));
    }
    let mut order: Vec<usize> = (0..prompts.len())
        .filter(|i| !done.contains_key(i))
        .collect();
    order.sort_by_key(|&i| prompts[i].len());
    let sampling = Sampling {
        max_new_tokens: p.max_new_tokens,
        ..Sampling::default()
    };
    let total = prompts.len() as u64;
    for chunk in order.chunks(p.batch_size) {
        ctx.check_cancelled()?;
        let reqs: Vec<ChatRequest> = chunk
            .iter()
            .map(|&i| {
                let mut messages = Vec::new();
                if let Some(s) = &p.system {
                    messages.push(Message {
                        role: "system".into(),
                        content: s.clone(),
                    });
                }
                messages.push(Message {
                    role: "user".into(),
                    content: prompts[i].clone(),
                });
                ChatRequest {
                    messages,
                    sampling: sampling.clone(),
                    seed: 0,
                    schema: None,
                    prompt: None,
                }
            })
            .collect();
        let outs = model.complete(&reqs).map_err(StageError::Failed)?;
        let mut lines = String::new();
        for (&i, c) in chunk.iter().zip(outs) {
            lines.push_str(&format!("{}\n", json!({"i": i, "text": c.text})));
            done.insert(i, c.text);
        }
        file.write_all(lines.as_bytes())
            .and_then(|_| file.sync_data())
            .map_err(StageError::io("appending answers"))?;
        ctx.progress(done.len() as u64, Some(total), name);
    }
    Ok((0..prompts.len())
        .map(|i| done.remove(&i).unwrap_or_default())
        .collect())
}

struct Scored {
    metrics: BTreeMap<String, f64>,
    items: Vec<Value>,
    confidence: Vec<(f64, bool)>,
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Scores one model's outputs (see the module docs for the definitions).
fn score(records: &[Value], outputs: &[String], bins: usize) -> Scored {
    let n = records.len();
    let (mut em, mut f1, mut answerable) = (0.0, 0.0, 0usize);
    let (
        mut parse_fail,
        mut refusals,
        mut right_refusals,
        mut unanswerable,
        mut refused_unanswerable,
    ) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut answers, mut halluc) = (0usize, 0usize);
    let (mut cp, mut cr, mut cited_items) = (0.0, 0.0, 0usize);
    let mut confidence = Vec::new();
    let mut items = Vec::with_capacity(n);
    for (r, out) in records.iter().zip(outputs) {
        let gold = strings(r.get("answers"));
        let support = strings(r.get("support"));
        let ids: Vec<String> = r
            .get("evidence")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let can_answer = !support.is_empty();
        if can_answer {
            answerable += 1;
        } else {
            unanswerable += 1;
        }
        let mut item = json!({"answerable": can_answer});
        match check_answer(out, &ids) {
            Err(e) => {
                parse_fail += 1;
                item["parse_error"] = json!(e);
            }
            Ok(a) => {
                if a.refusal {
                    refusals += 1;
                    if !can_answer {
                        right_refusals += 1;
                        refused_unanswerable += 1;
                    }
                    confidence.push((a.confidence, !can_answer));
                    item["refusal"] = json!(true);
                } else {
                    answers += 1;
                    let valid: Vec<String> = a
                        .citations
                        .iter()
                        .filter(|c| !a.unknown_citations.contains(c))
                        .cloned()
                        .collect();
                    let hallucinated = valid.is_empty()
                        || !can_answer
                        || !valid.iter().any(|c| support.contains(c));
                    if hallucinated {
                        halluc += 1;
                    }
                    let (e, f) = if can_answer {
                        (exact_match(&a.answer, &gold), token_f1(&a.answer, &gold))
                    } else {
                        (0.0, 0.0)
                    };
                    if can_answer {
                        em += e;
                        f1 += f;
                        let (pr, rc) = set_precision_recall(&a.citations, &support);
                        cp += pr;
                        cr += rc;
                        cited_items += 1;
                    }
                    confidence.push((a.confidence, e == 1.0));
                    item["em"] = json!(e);
                    item["f1"] = json!(f);
                    item["hallucinated"] = json!(hallucinated);
                    item["unknown_citations"] = json!(a.unknown_citations);
                }
            }
        }
        items.push(item);
    }
    let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
    let conf: Vec<f64> = confidence.iter().map(|c| c.0).collect();
    let ok: Vec<bool> = confidence.iter().map(|c| c.1).collect();
    let mut m = BTreeMap::new();
    m.insert("items".into(), n as f64);
    m.insert("em".into(), ratio(em, answerable));
    m.insert("f1".into(), ratio(f1, answerable));
    m.insert("hallucination_rate".into(), ratio(halluc as f64, answers));
    m.insert("citation_precision".into(), ratio(cp, cited_items));
    m.insert("citation_recall".into(), ratio(cr, cited_items));
    m.insert(
        "refusal_rate".into(),
        ratio(refusals as f64, n - parse_fail),
    );
    m.insert(
        "refusal_precision".into(),
        ratio(right_refusals as f64, refusals),
    );
    m.insert(
        "refusal_recall".into(),
        ratio(refused_unanswerable as f64, unanswerable),
    );
    m.insert("parse_failure_rate".into(), ratio(parse_fail as f64, n));
    m.insert("ece".into(), ece_equal_width(&conf, &ok, bins));
    m.insert(
        "ece_debiased_l2".into(),
        debiased_l2_ece_equal_mass(&conf, &ok, bins),
    );
    Scored {
        metrics: m,
        items,
        confidence,
    }
}

fn markdown(
    per_model: &BTreeMap<String, BTreeMap<String, f64>>,
    deltas: &BTreeMap<String, f64>,
    n: usize,
) -> String {
    use std::fmt::Write;
    let mut s = format!("# evaluation on {n} test items\n\n![reliability](reliability.png) (accuracy per confidence bin for each model; the diagonal is perfect calibration)\n\n");
    let names: Vec<&String> = per_model.keys().collect();
    let _ = writeln!(
        s,
        "| metric | {} |{}",
        names
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        if deltas.is_empty() {
            ""
        } else {
            " tuned − base |"
        }
    );
    let _ = writeln!(
        s,
        "|---|{}{}",
        "---|".repeat(names.len()),
        if deltas.is_empty() { "" } else { "---|" }
    );
    if let Some(first) = per_model.values().next() {
        for k in first.keys() {
            let cells: Vec<String> = names
                .iter()
                .map(|n| format!("{:.4}", per_model[*n][k]))
                .collect();
            let _ = write!(s, "| {k} | {} |", cells.join(" | "));
            if let Some(d) = deltas.get(k) {
                let _ = write!(s, " {d:+.4} |");
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_counts_hallucinations_refusals_and_failures() {
        let rec = |support: &[&str]| json!({"answers": ["Vistula"], "support": support, "evidence": [{"id": "c1"}, {"id": "c2"}]});
        let records = vec![rec(&["c1"]), rec(&["c1"]), rec(&[]), rec(&[]), rec(&["c2"])];
        let outputs = vec![
            r#"{"answer": "the Vistula", "citations": ["c1"], "confidence": 0.9}"#.to_string(), // right, grounded
            r#"{"answer": "Oder", "citations": ["c2"], "confidence": 0.8}"#.to_string(), // wrong, cites a non-support chunk
            r#"{"answer": "insufficient evidence", "citations": [], "confidence": 0.7}"#
                .to_string(), // right refusal
            r#"{"answer": "Vistula", "citations": ["c9"], "confidence": 0.6}"#.to_string(), // unanswerable, unknown id
            "I think Vistula".to_string(), // parse failure
        ];
        let s = score(&records, &outputs, 15);
        let m = &s.metrics;
        assert_eq!(m["em"], 1.0 / 3.0); // answerable: items 0, 1, 4
        assert_eq!(m["hallucination_rate"], 2.0 / 3.0); // answers 0, 1, 3 → 1 and 3
        assert_eq!(m["refusal_rate"], 0.25);
        assert_eq!(m["refusal_precision"], 1.0);
        assert_eq!(m["refusal_recall"], 0.5);
        assert_eq!(m["parse_failure_rate"], 0.2);
        assert_eq!(m["citation_precision"], 0.5);
        // confidences: (0.9 ✓) (0.8 ✗) (0.7 ✓ refusal) (0.6 ✗), one per bin of 15:
        let want = (0.1 + 0.8 + 0.3 + 0.6) / 4.0;
        assert!((m["ece"] - want).abs() < 1e-12, "{} vs {want}", m["ece"]);
    }
}
