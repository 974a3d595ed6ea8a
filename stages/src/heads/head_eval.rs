//! `head_eval`: a `head_train` model on held-out records: predictions, metrics, a
//! report and, for regression with `gate:`, the DEPLOY / REVIEW / FAIL decision.
//!
//! Records become units exactly as in training (`head_spec.json` in the model).
//! Regression: MAE and RMSE overall and per dimension, Spearman per dimension, the
//! share of overall predictions within ±0.5 of their mean and their correlation with
//! the gold overall (a nearly constant predictor can have a low MAE), and with a
//! `filter`, tier accuracy and the tier confusion matrix, the overall score and tier
//! coming from the filter's one [`crate::task::filter::Filter::assess`]. Listwise:
//! top-1 and MRR; pairwise: accuracy and ROC-AUC.
//!
//! With `gate:` (thresholds of [`crate::metrics::regression::DeployThresholds`]; `{}`
//! takes the defaults) the stage is a gate like `calibrate`: DEPLOY lets downstream
//! stages run, REVIEW makes them wait for `--accept`, FAIL stops them. The validation
//! MAE and convergence come from the model's kept step.

use std::collections::BTreeMap;

use pipe_train::heads::{self, Objective, Padding};
use serde::Deserialize;
use serde_json::{json, Value};

use super::DataSpec;
use crate::contract::{
    Decision, Gate, InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError,
};
use crate::metrics::regression::{self as reg, DeployThresholds};
use crate::model;
use crate::params::{parse_params, ParamError};
use crate::task::filter::Filter;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadEvalParams {
    /// The filter whose tiers the overall scores fall in (regression).
    #[serde(default)]
    filter: Option<String>,
    /// Record field with the content type (for the filter's caps).
    #[serde(default)]
    content_type_field: Option<String>,
    /// Deployment-gate thresholds; absent: no gate.
    #[serde(default)]
    gate: Option<DeployThresholds>,
    /// Worst predictions quoted in the report.
    #[serde(default = "ten")]
    worst: usize,
    /// Record field that names an item in the report (default: `id`).
    #[serde(default = "id")]
    id_field: String,
    #[serde(default = "sixteen")]
    batch_size: usize,
    #[serde(default = "auto")]
    device: String,
    #[serde(default = "auto")]
    dtype: String,
    #[serde(default)]
    quantize: crate::model::BaseQuant,
    #[serde(default)]
    double_quant: bool,
}

fn ten() -> usize {
    10
}
fn sixteen() -> usize {
    16
}
fn id() -> String {
    "id".into()
}
fn auto() -> String {
    "auto".into()
}

/// The evaluator.
pub struct HeadEvalStage;

impl Stage for HeadEvalStage {
    fn kind(&self) -> &'static str {
        "head_eval"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "a head_train model on test records: predictions, MAE/RMSE/Spearman per dimension, tiers, constant-predictor flag, DEPLOY/REVIEW/FAIL gate"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: HeadEvalParams = parse_params(params)?;
        if p.batch_size == 0 {
            return Err(ParamError::new(&["batch_size"], "must be at least 1"));
        }
        Ok(Signature {
            inputs: vec![InputDecl::required("model"), InputDecl::required("test")],
            deps: p.filter.iter().cloned().collect(),
            outputs: vec![
                OutputDecl::staged("predictions", "predictions.jsonl"),
                OutputDecl::staged("report", "report.md"),
                OutputDecl::staged("report_json", "report.json"),
            ],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        model::key_without(params, &["device", "batch_size"])
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: HeadEvalParams = parse_params(&ctx.params)?;
        let dir = ctx.input("model")?;
        let spec_path = dir.join("head_spec.json");
        let spec_json: Value = serde_json::from_str(
            &std::fs::read_to_string(&spec_path)
                .map_err(StageError::io(format!("reading {}", spec_path.display())))?,
        )
        .map_err(|e| StageError::Failed(format!("{}: {e}", spec_path.display())))?;
        let spec: DataSpec = serde_json::from_value(spec_json["data"].clone())
            .map_err(|e| StageError::Failed(format!("{}: data: {e}", spec_path.display())))?;
        let base = spec_json["model"].as_str().unwrap_or_default().to_string();
        let filter = match &p.filter {
            Some(f) => Some(Filter::load(&ctx.workdir.join(f)).map_err(StageError::Failed)?),
            None => None,
        };
        if p.gate.is_some() && spec.objective != Objective::Mse {
            return Err(StageError::Failed(
                "with.gate: the deployment gate judges regression models (objective mse)".into(),
            ));
        }
        let mut loaded =
            model::load_model(ctx, &base, &p.device, &p.dtype, p.quantize, p.double_quant)?;
        let (head, _adapter, meta) =
            heads::load(&mut loaded.model, dir).map_err(model::failed("loading the head model"))?;
        if let Some(f) = &filter {
            let dims: Vec<String> = f.names().iter().map(|s| s.to_string()).collect();
            if dims != meta.outputs {
                return Err(StageError::Failed(format!(
                    "with.filter: its dimensions {dims:?} are not the model's outputs {:?}",
                    meta.outputs
                )));
            }
        }
        let test_path = ctx.input("test")?;
        let rows = crate::records::read_jsonl_numbered(test_path)?;
        let units = spec.units(
            &loaded.tokenizer,
            &format!("test ({})", test_path.display()),
            &rows,
        )?;
        ctx.progress(0, Some(units.len() as u64), "scoring");
        let sm = heads::SeqModel {
            decoder: &loaded.model,
            head: &head,
            pad_id: meta.pad_id,
            padding: Padding::Right,
        };
        let preds = sm
            .predict_units(&units, p.batch_size)
            .map_err(model::failed("scoring"))?;
        let mut metrics: BTreeMap<String, Value> = BTreeMap::new();
        let mut report = String::new();
        let mut gate = None;
        let mut predictions = String::new();
        let name_of = |r: &Value, line: usize| {
            super::lookup(r, &p.id_field)
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_else(|| format!("line {line}"))
        };
        metrics.insert("test_units".into(), json!(units.len()));
        match spec.objective {
            Objective::Mse => {
                let pred: Vec<Vec<f64>> = preds
                    .iter()
                    .map(|u| super::destandardize(&u[0], &meta.standardize))
                    .collect();
                let gold: Vec<Vec<f64>> = units
                    .iter()
                    .map(|u| u.target.iter().map(|&t| t as f64).collect())
                    .collect();
                let m = super::regression_metrics(&meta.outputs, &pred, &gold);
                let content = |r: &Value| {
                    p.content_type_field
                        .as_deref()
                        .and_then(|f| super::lookup(r, f))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                // The overall score: the filter's (weighted, capped) or the plain mean.
                let overall = |s: &[f64], r: &Value| -> (f64, Option<String>) {
                    match &filter {
                        Some(f) => {
                            let clamped: Vec<f64> = s.iter().map(|x| x.clamp(0.0, 10.0)).collect();
                            let a = f.assess(&clamped, content(r).as_deref());
                            (a.overall, Some(a.tier))
                        }
                        None => (s.iter().sum::<f64>() / s.len().max(1) as f64, None),
                    }
                };
                let mut op = Vec::new();
                let mut og = Vec::new();
                let mut tiers = Vec::new();
                let mut worst: Vec<(f64, usize)> = Vec::new();
                for (i, ((line, r), (pv, gv))) in
                    rows.iter().zip(pred.iter().zip(&gold)).enumerate()
                {
                    let (po, pt) = overall(pv, r);
                    let (go, gt) = overall(gv, r);
                    op.push(po);
                    og.push(go);
                    if let (Some(a), Some(b)) = (&pt, &gt) {
                        tiers.push((b.clone(), a.clone()));
                    }
                    let err = reg::mae(pv, gv);
                    worst.push((err, i));
                    let row = json!({
                        "id": name_of(r, *line),
                        "pred": meta.outputs.iter().zip(pv).map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                        "gold": meta.outputs.iter().zip(gv).map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                        "overall_pred": po, "overall_gold": go, "tier_pred": pt, "tier_gold": gt, "mae": err,
                    });
                    predictions.push_str(&row.to_string());
                    predictions.push('\n');
                }
                let near = reg::near_mean_share(&op, 0.5);
                let corr = reg::pearson(&op, &og);
                for (k, v) in &m {
                    metrics.insert(format!("test_{k}"), json!(v));
                }
                metrics.insert("overall_near_mean_share".into(), json!(near));
                metrics.insert("overall_pearson".into(), json!(corr));
                metrics.insert("overall_mae".into(), json!(reg::mae(&op, &og)));
                let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
                if let Some(f) = &filter {
                    for t in &f.tiers {
                        confusion.insert(
                            t.name.clone(),
                            f.tiers.iter().map(|u| (u.name.clone(), 0)).collect(),
                        );
                    }
                    for (g, pr) in &tiers {
                        *confusion.get_mut(g).unwrap().get_mut(pr).unwrap() += 1;
                    }
                    let right = tiers.iter().filter(|(g, pr)| g == pr).count();
                    metrics.insert(
                        "tier_accuracy".into(),
                        json!(right as f64 / tiers.len().max(1) as f64),
                    );
                    metrics.insert("tier_confusion".into(), json!(confusion));
                }
                let kept_val = &spec_json["kept"]["val"];
                let val_mae = kept_val["val_mae"].as_f64().unwrap_or(f64::NAN);
                let init_mae = spec_json["initial"]["val"]["val_mae"].as_f64();
                let kept_step = spec_json["kept"]["step"].as_u64().unwrap_or(0);
                let converged = kept_step > 0 && init_mae.is_none_or(|i| val_mae < i);
                let dim_mae: Vec<(String, f64)> = meta
                    .outputs
                    .iter()
                    .map(|n| (n.clone(), m[&format!("mae.{n}")]))
                    .collect();
                report.push_str(&format!(
                    "# head_eval: {}\n\n{} test records, model kept at step {kept_step} (val MAE {val_mae:.3}).\n\n",
                    ctx.stage,
                    units.len()
                ));
                if let Some(t) = &p.gate {
                    let (d, reasons) = reg::deploy_decision(
                        &reg::DeployEvidence {
                            test_mae: m["mae"],
                            val_mae,
                            dim_mae: &dim_mae,
                            converged,
                            near_mean_share: near,
                        },
                        t,
                    );
                    let word = match d {
                        Decision::Pass => "DEPLOY",
                        Decision::Review => "REVIEW",
                        Decision::Fail => "FAIL",
                    };
                    metrics.insert("decision".into(), json!(word));
                    report.push_str(&format!("## Decision: **{word}**\n\n"));
                    for r in &reasons {
                        report.push_str(&format!("- {r}\n"));
                    }
                    if reasons.is_empty() {
                        report.push_str(&format!(
                            "- test MAE {:.3} < {}, {} of {} dimensions under {}, |val − test| {:.3} ≤ {}\n",
                            m["mae"],
                            t.deploy_mae,
                            dim_mae.iter().filter(|(_, v)| *v < t.deploy_dim_mae).count(),
                            dim_mae.len(),
                            t.deploy_dim_mae,
                            (val_mae - m["mae"]).abs(),
                            t.max_val_test_gap
                        ));
                    }
                    report.push('\n');
                    gate = Some(Gate {
                        decision: d,
                        report: "report".into(),
                        reasons,
                    });
                }
                report.push_str(&format!(
                    "## Overall\n\n| | value |\n|---|---|\n| MAE (all dimensions) | {:.3} |\n| RMSE | {:.3} |\n| overall-score MAE | {:.3} |\n| overall predictions within ±0.5 of their mean | {:.1}% |\n| correlation of overall predicted vs gold | {} |\n",
                    m["mae"],
                    m["rmse"],
                    reg::mae(&op, &og),
                    100.0 * near,
                    corr.map(|c| format!("{c:.3}")).unwrap_or_else(|| "undefined (constant)".into())
                ));
                if let Some(a) = metrics.get("tier_accuracy") {
                    report.push_str(&format!(
                        "| tier accuracy | {:.3} |\n",
                        a.as_f64().unwrap_or(0.0)
                    ));
                }
                report.push_str("\n## Per dimension\n\n| dimension | MAE | RMSE | Spearman |\n|---|---|---|---|\n");
                for n in &meta.outputs {
                    report.push_str(&format!(
                        "| {n} | {:.3} | {:.3} | {} |\n",
                        m[&format!("mae.{n}")],
                        m[&format!("rmse.{n}")],
                        m.get(&format!("spearman.{n}"))
                            .map(|s| format!("{s:.3}"))
                            .unwrap_or_else(|| "undefined".into())
                    ));
                }
                if !confusion.is_empty() {
                    let names: Vec<&String> = confusion.keys().collect();
                    report.push_str(
                        "\n## Tiers (rows: gold, columns: predicted)\n\n| gold \\ pred |",
                    );
                    for n in &names {
                        report.push_str(&format!(" {n} |"));
                    }
                    report.push_str("\n|---|");
                    report.push_str(&"---|".repeat(names.len()));
                    report.push('\n');
                    for g in &names {
                        report.push_str(&format!("| {g} |"));
                        for pr in &names {
                            report.push_str(&format!(" {} |", confusion[*g][*pr]));
                        }
                        report.push('\n');
                    }
                }
                worst.sort_by(|a, b| b.0.total_cmp(&a.0));
                report.push_str(&format!(
                    "\n## Worst {} predictions (mean absolute error over the dimensions)\n\n| item | MAE | predicted | gold |\n|---|---|---|---|\n",
                    p.worst.min(worst.len())
                ));
                let fmt = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.1}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                for (err, i) in worst.iter().take(p.worst) {
                    report.push_str(&format!(
                        "| {} | {err:.2} | {} | {} |\n",
                        name_of(&rows[*i].1, rows[*i].0),
                        fmt(&pred[*i]),
                        fmt(&gold[*i])
                    ));
                }
            }
            Objective::Listwise | Objective::Pairwise => {
                let m = if spec.objective == Objective::Listwise {
                    let s: Vec<Vec<f64>> = preds
                        .iter()
                        .map(|u| u.iter().map(|r| r[0] as f64).collect())
                        .collect();
                    for ((line, r), s) in rows.iter().zip(&s) {
                        predictions
                            .push_str(&json!({"id": name_of(r, *line), "scores": s}).to_string());
                        predictions.push('\n');
                    }
                    super::listwise_metrics(&s, &units)
                } else {
                    let s: Vec<(f64, f64)> = preds
                        .iter()
                        .map(|u| (u[0][0] as f64, u[1][0] as f64))
                        .collect();
                    for ((line, r), (c, rj)) in rows.iter().zip(&s) {
                        predictions.push_str(
                            &json!({"id": name_of(r, *line), "chosen": c, "rejected": rj})
                                .to_string(),
                        );
                        predictions.push('\n');
                    }
                    super::pairwise_metrics(&s)
                };
                report.push_str(&format!(
                    "# head_eval: {}\n\n{} test units ({:?}).\n\n| metric | value |\n|---|---|\n",
                    ctx.stage,
                    units.len(),
                    spec.objective
                ));
                for (k, v) in &m {
                    metrics.insert(format!("test_{k}"), json!(v));
                    report.push_str(&format!("| {k} | {v:.4} |\n"));
                }
            }
        }
        crate::fsio::write_atomic(
            &ctx.out_dir.join("predictions.jsonl"),
            predictions.as_bytes(),
        )
        .map_err(StageError::io("writing predictions.jsonl"))?;
        crate::fsio::write_atomic(&ctx.out_dir.join("report.md"), report.as_bytes())
            .map_err(StageError::io("writing report.md"))?;
        crate::fsio::write_json_atomic(&ctx.out_dir.join("report.json"), &metrics)
            .map_err(StageError::io("writing report.json"))?;
        Ok(Outcome { metrics, gate })
    }
}
