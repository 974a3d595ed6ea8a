//! `batch_label`: the oracle labels a whole corpus, batch by batch.
//!
//! Every reply is memoised (fsynced) the moment it arrives, keyed by the oracle's
//! identity, decoding settings and the exact prompt, so a run killed at any moment
//! resumes without asking again for finished items, a corpus that grew asks only
//! for its new rows, and a second stage with the same oracle reuses the replies
//! of the first. Items whose replies never parse (or whose requests failed for
//! good) go to `failures.jsonl` with their reason; they are asked again on the
//! next run only if the request failed (a parse failure has used its attempts).
//! `max_cost_usd` is checked before every request; reaching it stops the stage
//! cleanly with everything answered so far kept.
//!
//! With `filter: FILE` (a rubric oracle), each reply's scores are checked per
//! dimension and the filter's overall score and tier are added to the record as
//! `overall` and `tier` (what `split` stratifies by and `head_eval` compares with);
//! a reply the filter rejects goes to the failures with its reason.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::oracle::{self, Budget, LabelStats, Oracle, OracleSpec};
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLabelParams {
    oracle: Value,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default)]
    max_cost_usd: Option<f64>,
    /// Label only the first N records.
    #[serde(default)]
    limit: Option<usize>,
    /// Field of the output records that holds the parsed reply.
    #[serde(default = "default_into")]
    into: String,
    /// A filter file: add its `overall` score and `tier` to each labelled record.
    #[serde(default)]
    filter: Option<String>,
}

fn default_batch() -> usize {
    32
}
fn default_into() -> String {
    "label".into()
}

/// Labels a corpus with an oracle; resumable per item, budget-safe.
pub struct BatchLabelStage;

impl Stage for BatchLabelStage {
    fn kind(&self) -> &'static str {
        "batch_label"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "oracle labels a whole corpus; replies memoised per item (kill-safe, new rows only), failures kept, max_cost_usd"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: BatchLabelParams = parse_params(params)?;
        let spec = OracleSpec::from_value(&p.oracle, "oracle")?;
        if p.batch_size == 0 {
            return Err(ParamError::new(&["batch_size"], "expected at least 1"));
        }
        if p.into.is_empty() {
            return Err(ParamError::new(&["into"], "expected a field name"));
        }
        let mut deps = spec.deps();
        deps.extend(p.filter.iter().cloned());
        Ok(Signature {
            inputs: vec![InputDecl::required("corpus")],
            deps,
            outputs: vec![
                OutputDecl::staged("labels", "labels.jsonl"),
                OutputDecl::staged("failures", "failures.jsonl"),
            ],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        let mut v = crate::oracle::stage_key(params, "oracle");
        if let Some(o) = v.as_object_mut() {
            o.remove("batch_size");
        }
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: BatchLabelParams = parse_params(&ctx.params)?;
        let spec = OracleSpec::from_value(&p.oracle, "oracle")?;
        let mut records = crate::records::read_jsonl(ctx.input("corpus")?)?;
        if let Some(n) = p.limit {
            records.truncate(n);
        }
        let oracle = Oracle::open(&spec, ctx)?;
        let filter = match &p.filter {
            Some(f) => Some(
                crate::task::filter::Filter::load(&ctx.workdir.join(f))
                    .map_err(|e| StageError::Failed(format!("with.filter: {e}")))?,
            ),
            None => None,
        };
        let mut tiers: BTreeMap<String, usize> = BTreeMap::new();
        let budget = Budget::new(
            p.max_cost_usd,
            spec.prices.clone(),
            oracle::spent_so_far(&ctx.checkpoint_dir),
        );
        let spent_before = budget.spent();
        let total = records.len();
        let mut stats = LabelStats::default();
        let started = Instant::now();
        let mut labels_out = String::new();
        let mut failures_out = String::new();
        let (mut labelled, mut failed, mut parse_failed) = (0usize, 0usize, 0usize);
        let mut cost_total = 0.0;
        ctx.progress(0, Some(total as u64), "labelling");
        let results = oracle.label_in_chunks(
            ctx,
            &records,
            p.batch_size,
            &budget,
            &mut stats,
            |done, st, spent| {
                format!(
                    "{:.2} items/s, {} asked, {} memoised, ${spent:.4}",
                    done as f64 / started.elapsed().as_secs_f64().max(1e-9),
                    st.asked,
                    st.memo_hits,
                )
            },
        )?;
        for (r, mut l) in records.iter().zip(results) {
            cost_total += l.cost_usd;
            let mut assessed = None;
            if let (Some(f), Some(v)) = (&filter, &l.label) {
                match f.read_reply(v) {
                    Ok((scores, ct)) => assessed = Some(f.assess(&scores, ct.as_deref())),
                    Err(e) => {
                        l.errors.push(format!("the filter rejects the reply: {e}"));
                        l.label = None;
                    }
                }
            }
            match &l.label {
                Some(v) => {
                    let mut rec = r.clone();
                    if let (Some(a), Some(o)) = (&assessed, rec.as_object_mut()) {
                        o.insert("overall".into(), json!(a.overall));
                        o.insert("tier".into(), json!(a.tier));
                        if !a.capped_by.is_empty() {
                            o.insert("capped_by".into(), json!(a.capped_by));
                        }
                        *tiers.entry(a.tier.clone()).or_default() += 1;
                    }
                    if let Some(o) = rec.as_object_mut() {
                        o.insert(p.into.clone(), v.clone());
                    } else {
                        rec = json!({"record": r, p.into.clone(): v});
                    }
                    labels_out.push_str(&rec.to_string());
                    labels_out.push('\n');
                    labelled += 1;
                }
                None => {
                    failed += 1;
                    if !l.request_failed {
                        parse_failed += 1;
                    }
                    failures_out.push_str(
                        &json!({
                            "id": r.get("id"),
                            "record": r,
                            "reason": l.errors.join("; "),
                            "raw": l.raw,
                            "attempts": l.attempts,
                        })
                        .to_string(),
                    );
                    failures_out.push('\n');
                }
            }
        }
        crate::fsio::write_atomic(&ctx.out_dir.join("labels.jsonl"), labels_out.as_bytes())
            .map_err(StageError::io("writing labels.jsonl"))?;
        crate::fsio::write_atomic(&ctx.out_dir.join("failures.jsonl"), failures_out.as_bytes())
            .map_err(StageError::io("writing failures.jsonl"))?;
        let secs = started.elapsed().as_secs_f64();
        let mut metrics = BTreeMap::new();
        metrics.insert("items".into(), json!(total));
        metrics.insert("labelled".into(), json!(labelled));
        metrics.insert("failed".into(), json!(failed));
        metrics.insert("parse_failures".into(), json!(parse_failed));
        metrics.insert("requests".into(), json!(stats.asked));
        metrics.insert("memo_hits".into(), json!(stats.memo_hits));
        metrics.insert("prompt_tokens".into(), json!(stats.prompt_tokens));
        metrics.insert("completion_tokens".into(), json!(stats.completion_tokens));
        metrics.insert("cost_usd".into(), json!(cost_total));
        metrics.insert(
            "spent_this_run_usd".into(),
            json!(budget.spent() - spent_before),
        );
        if secs > 0.0 {
            metrics.insert("items_per_s".into(), json!(total as f64 / secs));
        }
        if filter.is_some() {
            metrics.insert("tiers".into(), json!(tiers));
        }
        ctx.log(&format!(
            "{labelled} labelled, {failed} failed ({parse_failed} unparsable), {} requests, {} memoised replies, {:.1}s",
            stats.asked, stats.memo_hits, secs
        ));
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}
