//! `calibrate`: the gate that measures an oracle before it labels a corpus.
//!
//! It draws a seeded stratified sample (`per_stratum` items of each value of
//! `sample.by`, or `counts` per named stratum), has the oracle label it, and
//! compares the replies with gold where the records have it: exact match and token
//! F1 for answers, precision/recall for citations, agreement and Cohen's kappa for
//! labels, distributions per stratum for numeric scores, plus parse-failure rate and
//! cost. `pass_if` thresholds all met → PASS; else `review_if` all met → REVIEW; else
//! FAIL. The report (markdown + JSON, the worst disagreements quoted) is the gate's
//! output. The machinery it shares with [`super::validate`] is in `gate`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{json, Value};

use super::gate::{
    check_sample, check_thresholds, combine, decide, default_quote, draw, filter_decision,
    label_sample, load_filter, measure, signature, Compare, GateSetup, SampleSpec,
};
use super::report::finish;
use crate::contract::{Outcome, Signature, Stage, StageContext, StageError};
use crate::oracle::{Oracle, OracleSpec};
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrateParams {
    oracle: Value,
    #[serde(default)]
    compare: Compare,
    sample: SampleSpec,
    #[serde(default)]
    pass_if: BTreeMap<String, String>,
    #[serde(default)]
    review_if: BTreeMap<String, String>,
    #[serde(default)]
    max_cost_usd: Option<f64>,
    #[serde(default = "default_quote")]
    quote: usize,
    #[serde(default = "default_id")]
    id_field: String,
}

fn default_id() -> String {
    "id".into()
}

/// The gate that measures an oracle on a stratified sample.
pub struct CalibrateStage;

impl Stage for CalibrateStage {
    fn kind(&self) -> &'static str {
        "calibrate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "gate: an oracle labels a seeded stratified sample, measured against gold → PASS / REVIEW / FAIL with a report"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: CalibrateParams = parse_params(params)?;
        let spec = OracleSpec::from_value(&p.oracle, "oracle")?;
        check_sample(&p.sample)?;
        if p.pass_if.is_empty() && p.compare.filter.is_none() {
            return Err(ParamError::new(
                &["pass_if"],
                "a gate needs at least one `pass_if` threshold, e.g. `answer_f1: \">= 0.6\"` (or a `compare.filter` rubric, judged by its decision matrix)",
            ));
        }
        check_thresholds("pass_if", &p.pass_if, &p.compare)?;
        check_thresholds("review_if", &p.review_if, &p.compare)?;
        for (name, fg) in [
            ("answer", &p.compare.answer),
            ("citations", &p.compare.citations),
            ("label", &p.compare.label),
        ] {
            if let Some(fg) = fg {
                if !spec.returns.contains_key(&fg.field) {
                    return Err(ParamError::new(
                        &["compare", name, "field"],
                        format!(
                            "`{}` is not among the oracle's declared `returns`",
                            fg.field
                        ),
                    ));
                }
            }
        }
        let mut deps = spec.deps();
        if let Some(f) = &p.compare.filter {
            deps.push(f.file.clone());
        }
        Ok(signature(deps))
    }

    fn key_params(&self, params: &Value) -> Value {
        crate::oracle::stage_key(params, "oracle")
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: CalibrateParams = parse_params(&ctx.params)?;
        let spec = OracleSpec::from_value(&p.oracle, "oracle")?;
        let records = crate::records::read_jsonl(ctx.input("corpus")?)?;
        let sample = draw(&records, &p.sample, &p.id_field, &BTreeSet::new())?;
        let oracle = Oracle::open(&spec, ctx)?;
        let template = std::fs::read_to_string(ctx.workdir.join(&spec.template))
            .map_err(StageError::io("reading the oracle template"))?;
        let setup = GateSetup {
            kind: "calibrate",
            compare: p.compare,
            pass_if: p.pass_if,
            review_if: p.review_if,
            quote: p.quote,
            id_field: p.id_field,
            max_cost_usd: p.max_cost_usd,
        };
        let filter = load_filter(ctx, &setup.compare, &spec.returns)?;
        let (labels, stats, spent) = label_sample(ctx, &oracle, &records, &sample, p.max_cost_usd)?;
        let m = measure(&setup, &records, &sample, &labels, filter.as_ref());
        let (decision, reasons) = combine(
            decide(&m.metrics, &setup.pass_if, &setup.review_if),
            filter_decision(&setup.compare, &m.metrics),
        );
        let extra = json!({
            "oracle_spec": spec,
            "template_text": template,
            "sample_spec": p.sample,
        });
        finish(
            ctx, &setup, &oracle, &records, &sample, &labels, &m, decision, reasons, &stats, spent,
            extra, None,
        )
    }
}
