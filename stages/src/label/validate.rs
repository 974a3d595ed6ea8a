//! `validate`: the gate that re-measures a calibrated oracle on a fresh sample.
//!
//! The sample is drawn with another seed and the calibration items excluded; the
//! oracle, template and thresholds come from the calibration report. Each thresholded
//! metric is also compared with its calibration value: a drift beyond `tolerance`
//! turns a PASS into REVIEW (the prompt was tuned to the calibration items).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{json, Value};

use super::gate::{
    check_sample, check_thresholds, combine, decide, default_quote, draw, filter_decision,
    label_sample, load_filter, measure, signature, GateSetup, SampleSpec,
};
use super::report::finish;
use crate::contract::{Decision, InputDecl, Outcome, Signature, Stage, StageContext, StageError};
use crate::oracle::{Oracle, OracleSpec};
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateParams {
    sample: SampleSpec,
    #[serde(default = "default_tolerance")]
    tolerance: f64,
    #[serde(default)]
    pass_if: Option<BTreeMap<String, String>>,
    #[serde(default)]
    review_if: Option<BTreeMap<String, String>>,
    #[serde(default)]
    max_cost_usd: Option<f64>,
    #[serde(default = "default_quote")]
    quote: usize,
}

fn default_tolerance() -> f64 {
    0.05
}

/// The gate that re-measures it on a fresh sample.
pub struct ValidateStage;

impl Stage for ValidateStage {
    fn kind(&self) -> &'static str {
        "validate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "gate: the calibrated oracle on a fresh disjoint sample, compared with calibration within a tolerance"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: ValidateParams = parse_params(params)?;
        check_sample(&p.sample)?;
        if !(0.0..=1.0).contains(&p.tolerance) {
            return Err(ParamError::new(
                &["tolerance"],
                "expected a number in [0, 1]",
            ));
        }
        let mut sig = signature(vec![]);
        sig.inputs.push(InputDecl::required("calibration"));
        Ok(sig)
    }

    fn key_params(&self, params: &Value) -> Value {
        crate::oracle::stage_key(params, "oracle")
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: ValidateParams = parse_params(&ctx.params)?;
        let cal_path = ctx.input("calibration")?;
        let cal_file = if cal_path.is_dir() {
            cal_path.join("report.json")
        } else {
            cal_path.to_path_buf()
        };
        let cal: Value = serde_json::from_slice(
            &std::fs::read(&cal_file)
                .map_err(StageError::io(format!("reading {}", cal_file.display())))?,
        )
        .map_err(|e| {
            StageError::Failed(format!(
                "{}: not a calibration report: {e}",
                cal_file.display()
            ))
        })?;
        let bad = |what: &str| {
            StageError::Failed(format!("{}: the calibration report lacks `{what}`; bind `calibration` to a calibrate stage's `report`", cal_file.display()))
        };
        let spec = OracleSpec::from_value(
            cal.get("oracle_spec").ok_or_else(|| bad("oracle_spec"))?,
            "oracle",
        )?;
        let template = cal
            .get("template_text")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("template_text"))?;
        let setup_v = cal.get("setup").ok_or_else(|| bad("setup"))?;
        let mut setup: GateSetup = serde_json::from_value(setup_v.clone())
            .map_err(|e| StageError::Failed(format!("{}: `setup`: {e}", cal_file.display())))?;
        setup.kind = "validate";
        if let Some(t) = p.pass_if {
            setup.pass_if = t;
        }
        if let Some(t) = p.review_if {
            setup.review_if = t;
        }
        setup.quote = p.quote;
        setup.max_cost_usd = p.max_cost_usd;
        check_thresholds("pass_if", &setup.pass_if, &setup.compare)?;
        check_thresholds("review_if", &setup.review_if, &setup.compare)?;
        let cal_ids: BTreeSet<String> = cal
            .get("sample_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let records = crate::records::read_jsonl(ctx.input("corpus")?)?;
        let sample = draw(&records, &p.sample, &setup.id_field, &cal_ids)?;
        let oracle = Oracle::with_template(&spec, template, ctx)?;
        let (labels, stats, spent) = label_sample(ctx, &oracle, &records, &sample, p.max_cost_usd)?;
        let filter = load_filter(ctx, &setup.compare, &spec.returns)?;
        let m = measure(&setup, &records, &sample, &labels, filter.as_ref());
        let (mut decision, mut reasons) = combine(
            decide(&m.metrics, &setup.pass_if, &setup.review_if),
            filter_decision(&setup.compare, &m.metrics),
        );
        let cal_metrics = cal.get("metrics").cloned().unwrap_or(Value::Null);
        let mut drift = BTreeMap::new();
        let judged: Vec<String> = setup
            .pass_if
            .keys()
            .cloned()
            .chain(setup.compare.filter.iter().flat_map(|_| {
                super::gate::FILTER_METRICS[..3]
                    .iter()
                    .map(|s| s.to_string())
            }))
            .collect();
        for name in &judged {
            if let (Some(now), Some(then)) = (
                m.metrics.get(name),
                cal_metrics.get(name).and_then(Value::as_f64),
            ) {
                let d = now - then;
                drift.insert(name.clone(), d);
                if d.abs() > p.tolerance {
                    reasons.push(format!(
                        "{name} {now:.3} vs {then:.3} at calibration: drift {d:+.3} beyond the tolerance {}",
                        p.tolerance
                    ));
                    if decision == Decision::Pass {
                        decision = Decision::Review;
                    }
                }
            }
        }
        let extra = json!({"calibration_metrics": cal_metrics, "tolerance": p.tolerance, "drift": drift, "excluded_calibration_items": cal_ids.len()});
        finish(
            ctx,
            &setup,
            &oracle,
            &records,
            &sample,
            &labels,
            &m,
            decision,
            reasons,
            &stats,
            spent,
            extra,
            Some(&drift),
        )
    }
}
