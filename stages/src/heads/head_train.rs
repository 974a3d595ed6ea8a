//! `head_train`: a sequence head (regression, listwise ranking or pairwise reward) on
//! a base decoder, with LoRA on the base or a frozen one, trained on `train` and
//! evaluated on `val`.
//!
//! Each record becomes one unit through the text `template` (minijinja over the
//! record): mse reads `D` numbers from `targets` (dotted fields) or, with `filter`,
//! one per filter dimension under `scores_field`; listwise renders each candidate of
//! the `candidates` array (as `candidate`) and targets the best by `reward` (ties
//! share) or `softmax(reward / temperature)`; pairwise renders `chosen` and
//! `rejected` (as `answer`). A value that is not a number fails with `file:line` and
//! the field. mse targets are standardised per dimension (stored with the model) unless
//! `standardize: false`.
//!
//! Outputs: `model` (PEFT's SEQ_CLS layout, `head_config.json`, `head_spec.json`:
//! how records became units, and the kept step's validation metrics), `metrics`
//! (one JSON line per step), `history` (`training_history.json`: per evaluation the
//! train and val loss and the val metrics, per dimension for mse) and `figures`
//! (`loss_curves.png`, `overall_metrics.png`, and for mse `per_dimension_mae.png`).
//! The model kept is the best by `keep_best` (default: val MAE for mse, top-1 for
//! listwise, ROC-AUC for pairwise). Checkpoints resume exactly.

use std::collections::BTreeMap;

use pipe_train::heads::{
    self, Head, HeadConfig, HeadKind, HeadTrainSettings, Objective, Padding, Pooling,
};
use pipe_train::lora::LoraConfig;
use pipe_train::optim::AdamWConfig;
use pipe_train::trainer::Goal;
use pipe_train::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{DataSpec, Truncate};
use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::model;
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeadTrainParams {
    model: String,
    /// LoRA on the base; absent: the base stays frozen and only the head trains.
    #[serde(default)]
    lora: Option<LoraConfig>,
    #[serde(default)]
    pooling: Pooling,
    #[serde(default)]
    head: HeadKind,
    #[serde(default)]
    head_dropout: f64,
    objective: Objective,
    /// Text template file (minijinja over the record).
    template: String,
    #[serde(default)]
    targets: Vec<String>,
    /// A filter file: the targets are its dimensions, under `scores_field`.
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    scores_field: Option<String>,
    #[serde(default = "yes")]
    standardize: bool,
    #[serde(default)]
    candidates: Option<String>,
    #[serde(default)]
    reward: Option<String>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    chosen: Option<String>,
    #[serde(default)]
    rejected: Option<String>,
    #[serde(default)]
    margin: Option<String>,
    /// Pairwise reward centering.
    #[serde(default)]
    center: f64,
    #[serde(default)]
    optimizer: AdamWConfig,
    /// Peak learning rate of the head when it should differ from `optimizer.lr`.
    #[serde(default)]
    head_lr: Option<f64>,
    #[serde(default)]
    schedule: crate::params::Schedule,
    #[serde(default = "four")]
    batch_size: usize,
    #[serde(default = "one")]
    grad_accum: usize,
    #[serde(default = "max_len")]
    max_len: usize,
    #[serde(default)]
    truncate: Truncate,
    #[serde(default)]
    epochs: Option<f64>,
    #[serde(default)]
    steps: Option<u64>,
    #[serde(default)]
    eval_every: u64,
    #[serde(default)]
    save_every: u64,
    #[serde(default = "clip")]
    max_grad_norm: Option<f64>,
    #[serde(default)]
    seed: u64,
    /// Metric → `min` | `max` (one entry): which evaluation's model is kept.
    #[serde(default)]
    keep_best: BTreeMap<String, Goal>,
    #[serde(default = "auto")]
    device: String,
    #[serde(default = "auto")]
    dtype: String,
    #[serde(default)]
    quantize: crate::model::BaseQuant,
    #[serde(default)]
    double_quant: bool,
    #[serde(default)]
    gradient_checkpointing: bool,
}

fn yes() -> bool {
    true
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn max_len() -> usize {
    512
}
fn clip() -> Option<f64> {
    Some(1.0)
}
fn auto() -> String {
    "auto".into()
}

/// The metrics an objective's evaluation reports (with the `val_` prefix) and the
/// default kept one.
fn objective_metrics(o: Objective) -> (&'static [&'static str], (&'static str, Goal)) {
    match o {
        Objective::Mse => (&["val_loss", "val_mae", "val_rmse"], ("val_mae", Goal::Min)),
        Objective::Listwise => (
            &["val_loss", "val_top1", "val_mrr"],
            ("val_top1", Goal::Max),
        ),
        Objective::Pairwise => (
            &["val_loss", "val_accuracy", "val_roc_auc"],
            ("val_roc_auc", Goal::Max),
        ),
    }
}

impl HeadTrainParams {
    fn validate(&self) -> Result<(), ParamError> {
        model::model_dep(&self.model)?;
        model::check_quantize(&self.model, self.quantize)?;
        if let Some(l) = &self.lora {
            l.validate()
                .map_err(|e| ParamError::new(&["lora"], e.to_string()))?;
        }
        if self.epochs.is_some() && self.steps.is_some() {
            return Err(ParamError::new(
                &["steps"],
                "give `epochs` or `steps`, not both",
            ));
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_len < 2 {
            return Err(ParamError::new(
                &["batch_size"],
                "batch_size and grad_accum must be ≥ 1 and max_len ≥ 2",
            ));
        }
        if !(0.0..1.0).contains(&self.head_dropout) {
            return Err(ParamError::new(
                &["head_dropout"],
                "expected a number in [0, 1)",
            ));
        }
        match self.objective {
            Objective::Mse => {
                if self.targets.is_empty() == self.filter.is_none() {
                    return Err(ParamError::new(
                        &["targets"],
                        "mse needs the target fields: `targets: [field, ...]`, or `filter: FILE` with `scores_field` (one target per dimension); give one of them",
                    ));
                }
                if self.filter.is_some() && self.scores_field.is_none() {
                    return Err(ParamError::new(
                        &["scores_field"],
                        "with `filter`, name the record field holding the scores (e.g. `oracle`)",
                    ));
                }
            }
            Objective::Listwise | Objective::Pairwise => {
                if !self.targets.is_empty() || self.filter.is_some() {
                    return Err(ParamError::new(
                        &["targets"],
                        "targets and filter are for `objective: mse`",
                    ));
                }
            }
        }
        if let Some(t) = self.temperature {
            if t.is_nan() || t <= 0.0 {
                return Err(ParamError::new(
                    &["temperature"],
                    "expected a positive number",
                ));
            }
        }
        let (known, _) = objective_metrics(self.objective);
        if self.keep_best.len() > 1 {
            return Err(ParamError::new(&["keep_best"], "name one metric"));
        }
        for m in self.keep_best.keys() {
            let per_dim = self.objective == Objective::Mse
                && (m.starts_with("val_mae.") || m.starts_with("val_rmse."));
            if !known.contains(&m.as_str()) && !per_dim {
                return Err(ParamError::new(
                    &["keep_best", m],
                    format!(
                        "not a metric of this objective's evaluation; it has {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The sequence-head trainer.
pub struct HeadTrainStage;

struct Progress<'a> {
    ctx: &'a StageContext,
    spec: &'a DataSpec,
    eval: &'a [pipe_train::heads::Unit],
    gold: Vec<Vec<f64>>,
    stats: Vec<(f64, f64)>,
}

impl pipe_train::heads::HeadObserver for Progress<'_> {
    fn on_step(&mut self, m: &heads::HeadStep, total: u64) {
        self.ctx.progress(
            m.step,
            Some(total),
            &format!("loss {:.4}", m.loss.unwrap_or(f64::NAN)),
        );
        let mut values = vec![
            ("loss", m.loss.unwrap_or(f64::NAN)),
            ("lr", m.lr),
            ("grad_norm", m.grad_norm),
        ];
        if let Some(v) = m.eval_loss {
            values.push(("val_loss", v));
        }
        self.ctx.scalars(m.step, &values);
        if m.eval_loss.is_some() {
            let shown: Vec<String> = m
                .metrics
                .iter()
                .filter(|(k, _)| !k.contains('.'))
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect();
            self.ctx
                .log(&format!("step {}/{total}: {}", m.step, shown.join(", ")));
        }
    }

    fn on_resume(&mut self, step: u64) {
        self.ctx
            .log(&format!("resuming at step {step} from a checkpoint"));
    }

    fn cancelled(&self) -> bool {
        self.ctx.cancel.is_cancelled()
    }

    fn evaluate(&mut self, _step: u64, preds: &[Vec<Vec<f32>>]) -> BTreeMap<String, f64> {
        let m = match self.spec.objective {
            Objective::Mse => {
                let p: Vec<Vec<f64>> = preds
                    .iter()
                    .map(|u| super::destandardize(&u[0], &self.stats))
                    .collect();
                super::regression_metrics(&self.spec.names, &p, &self.gold)
            }
            Objective::Listwise => {
                let s: Vec<Vec<f64>> = preds
                    .iter()
                    .map(|u| u.iter().map(|r| r[0] as f64).collect())
                    .collect();
                super::listwise_metrics(&s, self.eval)
            }
            Objective::Pairwise => {
                let s: Vec<(f64, f64)> = preds
                    .iter()
                    .map(|u| (u[0][0] as f64, u[1][0] as f64))
                    .collect();
                super::pairwise_metrics(&s)
            }
        };
        m.into_iter()
            .map(|(k, v)| (format!("val_{k}"), v))
            .collect()
    }
}

impl Stage for HeadTrainStage {
    fn kind(&self) -> &'static str {
        "head_train"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "sequence head on a (LoRA-tuned or frozen) base: regression (mse), listwise ranking or pairwise reward; PEFT SEQ_CLS layout"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: HeadTrainParams = parse_params(params)?;
        p.validate()?;
        let mut deps = model::template_and_model_deps(&p.template, &p.model)?;
        if let Some(f) = &p.filter {
            deps.push(f.clone());
        }
        let mut outputs = vec![
            OutputDecl::staged("model", "model"),
            OutputDecl::staged("metrics", "metrics.jsonl"),
            OutputDecl::staged("history", "training_history.json"),
            OutputDecl::staged("figures", "figures"),
        ];
        outputs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Signature {
            inputs: vec![InputDecl::required("train"), InputDecl::optional("val")],
            deps,
            outputs,
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        model::key_without(params, &["gradient_checkpointing"])
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: HeadTrainParams = parse_params(&ctx.params)?;
        p.validate()?;
        let template = crate::prompt::read_template(ctx, &p.template)?;
        let (targets, names) = match (&p.filter, &p.scores_field) {
            (Some(f), Some(field)) => {
                let filter = crate::task::filter::Filter::load(&ctx.workdir.join(f))
                    .map_err(StageError::Failed)?;
                let names: Vec<String> = filter.names().iter().map(|s| s.to_string()).collect();
                (
                    names.iter().map(|n| format!("{field}.{n}")).collect(),
                    names,
                )
            }
            _ => (
                p.targets.clone(),
                p.targets
                    .iter()
                    .map(|t| t.rsplit('.').next().unwrap_or(t).to_string())
                    .collect(),
            ),
        };
        let spec = DataSpec {
            objective: p.objective,
            template,
            targets,
            names: names.clone(),
            candidates: p.candidates.clone(),
            reward: p.reward.clone(),
            temperature: p.temperature,
            chosen: p.chosen.clone(),
            rejected: p.rejected.clone(),
            margin: p.margin.clone(),
            max_len: p.max_len,
            truncate: p.truncate,
        };
        let mut loaded = model::load_model(
            ctx,
            &p.model,
            &p.device,
            &p.dtype,
            p.quantize,
            p.double_quant,
        )?;
        let read = |name: &str| -> Result<Vec<pipe_train::heads::Unit>, StageError> {
            let path = ctx.input(name)?;
            let rows = crate::records::read_jsonl_numbered(path)?;
            spec.units(
                &loaded.tokenizer,
                &format!("{name} ({})", path.display()),
                &rows,
            )
        };
        let train_raw = read("train")?;
        let val_raw = if ctx.inputs.contains_key("val") {
            read("val")?
        } else {
            Vec::new()
        };
        let stats = if p.objective == Objective::Mse && p.standardize {
            super::standardization(&train_raw)
        } else {
            Vec::new()
        };
        let (train_set, val_set) = if stats.is_empty() {
            (train_raw.clone(), val_raw.clone())
        } else {
            (
                super::standardize(&train_raw, &stats),
                super::standardize(&val_raw, &stats),
            )
        };
        let gold: Vec<Vec<f64>> = val_raw
            .iter()
            .map(|u| u.target.iter().map(|&t| t as f64).collect())
            .collect();
        let outputs = if p.objective == Objective::Mse {
            spec.targets.len()
        } else {
            1
        };
        let pad_id = loaded.pad_id();
        let adapter = match &p.lora {
            Some(cfg) => Some(
                pipe_train::lora::attach(&mut loaded.model, cfg, &mut Rng::new(p.seed).fork(0x10A))
                    .map_err(model::failed("attaching LoRA"))?,
            ),
            None => None,
        };
        let head = Head::new(
            HeadConfig {
                pooling: p.pooling,
                kind: p.head,
                hidden: loaded.config.hidden_size,
                outputs,
                dropout: p.head_dropout,
                out_bias: HeadConfig::out_bias_for(p.objective),
            },
            &mut Rng::new(p.seed).fork(0x4EAD),
            loaded.model.device(),
        )
        .map_err(model::failed("creating the head"))?;
        let steps = p.steps.unwrap_or_else(|| {
            pipe_train::trainer::TrainSettings::steps_for_epochs(
                p.epochs.unwrap_or(1.0),
                train_set.len(),
                p.batch_size,
                p.grad_accum,
            )
        });
        let (_, default_keep) = objective_metrics(p.objective);
        let keep_best = p
            .keep_best
            .iter()
            .next()
            .map(|(k, g)| (k.clone(), *g))
            .unwrap_or((default_keep.0.to_string(), default_keep.1));
        if val_set.is_empty() && keep_best.0.starts_with("val_") {
            ctx.log("no `val` input: the model of the last step is kept");
        }
        let settings = HeadTrainSettings {
            objective: p.objective,
            center: p.center,
            optimizer: p.optimizer.clone(),
            head_lr: p.head_lr,
            warmup_steps: p.schedule.warmup(steps),
            decay: p.schedule.decay,
            batch_size: p.batch_size,
            grad_accum: p.grad_accum,
            steps,
            max_grad_norm: p.max_grad_norm,
            eval_every: p.eval_every,
            save_every: p.save_every,
            seed: p.seed,
            gradient_checkpointing: p.gradient_checkpointing,
            keep_best: if keep_best.0 == "val_loss" {
                ("eval_loss".into(), keep_best.1)
            } else {
                keep_best.clone()
            },
        };
        ctx.log(&format!(
            "{} train / {} val units, {steps} steps, {} outputs, {} trainable parameters (LoRA {}, head {})",
            train_set.len(),
            val_set.len(),
            outputs,
            adapter.as_ref().map(|a| a.parameters()).unwrap_or(0)
                + head.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
            adapter.as_ref().map(|a| a.parameters()).unwrap_or(0),
            head.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>()
        ));
        let seq_model = heads::SeqModel {
            decoder: &loaded.model,
            head: &head,
            pad_id,
            padding: Padding::Right,
        };
        let mut progress = Progress {
            ctx,
            spec: &spec,
            eval: &val_set,
            gold,
            stats: stats.clone(),
        };
        let report = heads::train(
            &seq_model,
            adapter.as_ref(),
            &train_set,
            &val_set,
            &settings,
            Some(&ctx.checkpoint_dir),
            &mut progress,
        )
        .map_err(model::failed("training"))?;
        // The kept evaluation and the one before training.
        let kept_step = report.best.map(|b| b.1).unwrap_or(report.steps);
        let at = |step: u64| {
            report
                .history
                .iter()
                .find(|h| h.step == step && (h.eval_loss.is_some() || !h.metrics.is_empty()))
        };
        let kept = at(kept_step);
        let initial = at(0);
        let dir = ctx.out_dir.join("model");
        let meta = heads::SavedHead {
            head: head.config.clone(),
            objective: p.objective,
            outputs: if p.objective == Objective::Mse {
                names.clone()
            } else {
                vec!["score".into()]
            },
            standardize: stats.clone(),
            pad_id,
            base_model: p.model.clone(),
            lora: adapter.is_some(),
        };
        heads::save(&dir, adapter.as_ref(), &head, &report.best_tensors, &meta)
            .map_err(model::failed("saving the model"))?;
        let kept_json = |h: Option<&heads::HeadStep>| {
            h.map(|h| {
                let mut m = serde_json::Map::new();
                if let Some(l) = h.eval_loss {
                    m.insert("val_loss".into(), json!(l));
                }
                for (k, v) in &h.metrics {
                    m.insert(k.clone(), json!(v));
                }
                Value::Object(m)
            })
            .unwrap_or(Value::Null)
        };
        crate::fsio::write_json_atomic(
            &dir.join("head_spec.json"),
            &json!({
                "data": spec,
                "model": p.model,
                "base_model_identity": loaded.identity,
                "kept": {"metric": keep_best.0, "step": kept_step, "val": kept_json(kept)},
                "initial": {"val": kept_json(initial)},
            }),
        )
        .map_err(StageError::io("writing head_spec.json"))?;
        // metrics.jsonl, training_history.json
        let mut lines = String::new();
        for h in &report.history {
            lines.push_str(&serde_json::to_string(h).expect("step serialises"));
            lines.push('\n');
        }
        crate::fsio::write_atomic(&ctx.out_dir.join("metrics.jsonl"), lines.as_bytes())
            .map_err(StageError::io("writing metrics.jsonl"))?;
        let evals: Vec<&heads::HeadStep> = report
            .history
            .iter()
            .filter(|h| h.eval_loss.is_some() || h.step == 0)
            .collect();
        let history: Vec<Value> = evals
            .iter()
            .map(|h| {
                let mut o =
                    json!({"step": h.step, "train_loss": h.train_loss, "val_loss": h.eval_loss});
                for (k, v) in &h.metrics {
                    o[k] = json!(v);
                }
                o
            })
            .collect();
        crate::fsio::write_json_atomic(
            &ctx.out_dir.join("training_history.json"),
            &json!({"objective": p.objective, "dimensions": names, "kept_step": kept_step, "evaluations": history}),
        )
        .map_err(StageError::io("writing training_history.json"))?;
        figures(ctx, &report, &evals, p.objective, &names, kept)
            .map_err(StageError::io("drawing the figures"))?;
        let mut metrics = BTreeMap::new();
        metrics.insert("train_units".into(), json!(train_set.len()));
        metrics.insert("val_units".into(), json!(val_set.len()));
        metrics.insert("steps".into(), json!(report.steps));
        metrics.insert("kept_step".into(), json!(kept_step));
        metrics.insert("resumed_from".into(), json!(report.resumed_from));
        if let Some(l) = report.history.last().and_then(|h| h.loss) {
            metrics.insert("final_train_loss".into(), json!(l));
        }
        if let Value::Object(o) = kept_json(kept) {
            for (k, v) in o {
                metrics.insert(k, v);
            }
        }
        if let Value::Object(o) = kept_json(initial) {
            if let Some(v) = o.get(keep_best.0.as_str()) {
                metrics.insert(format!("initial_{}", keep_best.0), v.clone());
            }
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

fn figures(
    ctx: &StageContext,
    report: &heads::HeadReport,
    evals: &[&heads::HeadStep],
    objective: Objective,
    names: &[String],
    kept: Option<&heads::HeadStep>,
) -> std::io::Result<()> {
    use crate::figure::Figure;
    let dir = ctx.out_dir.join("figures");
    std::fs::create_dir_all(&dir)?;
    let train: Vec<(f64, f64)> = report
        .history
        .iter()
        .filter_map(|h| Some((h.step as f64, h.loss?)))
        .collect();
    let val: Vec<(f64, f64)> = evals
        .iter()
        .filter_map(|h| Some((h.step as f64, h.eval_loss?)))
        .collect();
    let loss_name = match objective {
        Objective::Mse => "MSE (standardised targets)",
        Objective::Listwise => "listwise cross-entropy",
        Objective::Pairwise => "pairwise logistic loss",
    };
    Figure::Lines {
        title: "Training and validation loss".into(),
        x: "optimizer step".into(),
        y: loss_name.into(),
        series: vec![
            ("train (per step)".into(), train),
            ("validation".into(), val),
        ],
    }
    .save(&dir.join("loss_curves.png"))?;
    let keys: Vec<(&str, &str)> = match objective {
        Objective::Mse => vec![
            ("val_mae", "validation MAE"),
            ("val_rmse", "validation RMSE"),
        ],
        Objective::Listwise => vec![
            ("val_top1", "validation top-1"),
            ("val_mrr", "validation MRR"),
        ],
        Objective::Pairwise => vec![
            ("val_accuracy", "validation accuracy"),
            ("val_roc_auc", "validation ROC-AUC"),
        ],
    };
    let series: Vec<(String, Vec<(f64, f64)>)> = keys
        .iter()
        .map(|(k, label)| {
            (
                label.to_string(),
                evals
                    .iter()
                    .filter_map(|h| Some((h.step as f64, *h.metrics.get(*k)?)))
                    .collect(),
            )
        })
        .collect();
    Figure::Lines {
        title: "Validation metrics by step (step 0: before training)".into(),
        x: "optimizer step".into(),
        y: if objective == Objective::Mse {
            "error (target units)".into()
        } else {
            "score".into()
        },
        series,
    }
    .save(&dir.join("overall_metrics.png"))?;
    if objective == Objective::Mse {
        let first = evals.first();
        let get = |h: Option<&&heads::HeadStep>, n: &str| {
            h.and_then(|h| h.metrics.get(&format!("val_mae.{n}")).copied())
                .unwrap_or(f64::NAN)
        };
        Figure::Bars {
            title: format!(
                "Validation MAE per dimension: before training vs kept step {}",
                kept.map(|k| k.step).unwrap_or(0)
            ),
            x: "dimension".into(),
            y: "MAE (0-10 scale)".into(),
            categories: names.to_vec(),
            series: vec![
                (
                    "before training".into(),
                    names.iter().map(|n| get(first, n)).collect(),
                ),
                (
                    "kept model".into(),
                    names.iter().map(|n| get(kept.as_ref(), n)).collect(),
                ),
            ],
        }
        .save(&dir.join("per_dimension_mae.png"))?;
    }
    Ok(())
}
