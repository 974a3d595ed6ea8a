//! `sft`: supervised fine-tuning with LoRA.
//!
//! Inputs `train` (and optionally `val`) are JSONL with `prompt`/`response`
//! fields (names configurable) or chat `messages`. The output `adapter` is a PEFT
//! LoRA folder that Python's `peft` loads; `metrics` is one JSON line per step;
//! `curve` is the loss curve as PNG. Training checkpoints go to the stage's
//! checkpoint dir, so an interrupted run resumes at its last checkpoint and
//! continues with exactly the losses it would have had.

use std::collections::BTreeMap;

use pipe_train::data::{Formatter, LossMask, Record};
use pipe_train::lora::LoraConfig;
use pipe_train::optim::AdamWConfig;
use pipe_train::trainer::{self, Observer, StepMetrics, TrainSettings};
use pipe_train::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::model;
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SftParams {
    /// Also write the step scalars as TensorBoard event files (output `tensorboard`).
    #[serde(default)]
    tensorboard: bool,
    /// `tiny:ARCH[:SEED]`, a .gguf file, an HF folder or an HF repo id.
    model: String,
    #[serde(default)]
    lora: LoraConfig,
    #[serde(default)]
    optimizer: AdamWConfig,
    #[serde(default)]
    schedule: crate::params::Schedule,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default = "one")]
    grad_accum: usize,
    #[serde(default = "default_max_len")]
    max_len: usize,
    #[serde(default)]
    epochs: Option<f64>,
    #[serde(default)]
    steps: Option<u64>,
    #[serde(default)]
    eval_every: u64,
    #[serde(default)]
    save_every: u64,
    #[serde(default = "default_clip")]
    max_grad_norm: Option<f64>,
    #[serde(default)]
    seed: u64,
    #[serde(default = "auto")]
    device: String,
    #[serde(default = "auto")]
    dtype: String,
    /// Keep the frozen projections as `nf4` (QLoRA) or `int8` instead of dense.
    #[serde(default)]
    quantize: crate::model::BaseQuant,
    /// nf4: quantize the block absmaxes too (bitsandbytes' `bnb_4bit_use_double_quant`).
    #[serde(default)]
    double_quant: bool,
    /// Recompute each layer in the backward pass instead of keeping its activations:
    /// the same losses and adapter, less memory, more compute. Not part of the key.
    #[serde(default)]
    gradient_checkpointing: bool,
    #[serde(default = "default_mask")]
    loss_mask: LossMask,
    /// `auto` (the model's), `none` (plain text), or a Jinja template.
    #[serde(default = "auto")]
    chat_template: String,
    #[serde(default = "default_prompt")]
    prompt_field: String,
    #[serde(default = "default_response")]
    response_field: String,
    /// A prompt template file (minijinja over the record) instead of `prompt_field`.
    #[serde(default)]
    prompt_template: Option<String>,
    /// An inline template for the response instead of `response_field`, e.g.
    /// `'{{ oracle | tojson }}'` to train on a labelled JSON answer.
    #[serde(default)]
    response_template: Option<String>,
    /// Special tokens to add; their embedding rows start at the mean of the
    /// existing rows and are trained (PEFT `trainable_token_indices`).
    #[serde(default)]
    new_special_tokens: Vec<String>,
    /// Task evaluators run on generations for the `val` records at every evaluation
    /// (before step 1, every `eval_every` steps and at the end).
    #[serde(default)]
    eval_tasks: Vec<crate::lm::eval_tasks::TaskKind>,
    /// With `loss_mask: label-token`: the tokens the label goes on (e.g. the
    /// confidence tokens). A response holding none of them is rejected (logged with
    /// its file and record, counted); one whose token truncation cut is dropped.
    #[serde(default)]
    loss_tokens: Vec<String>,
    /// Settings of the `confidence` task (calib_beta, calib_p_norm, hendrycks_compat).
    #[serde(default)]
    confidence: crate::lm::eval_tasks::ConfidenceSettings,
    /// How the task evaluation decodes (greedy, 256 tokens, seed 0 by default).
    #[serde(default)]
    eval_decoding: crate::lm::eval_tasks::EvalDecoding,
    /// Generations stored per evaluation in `metrics.jsonl`.
    #[serde(default)]
    samples: usize,
    /// Metric → `max` | `min`: keep the adapter of each metric's best evaluation as
    /// output `best_<metric>` (a task metric, or `eval_loss`); its value and step are
    /// the stage metric `kept_<metric>`.
    #[serde(default)]
    keep_best: BTreeMap<String, pipe_train::trainer::Goal>,
}

fn default_batch() -> usize {
    4
}
fn one() -> usize {
    1
}
fn default_max_len() -> usize {
    512
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn auto() -> String {
    "auto".into()
}
fn default_mask() -> LossMask {
    LossMask::AnswerOnly
}
fn default_prompt() -> String {
    "prompt".into()
}
fn default_response() -> String {
    "response".into()
}

impl SftParams {
    fn validate(&self) -> Result<(), ParamError> {
        model::model_dep(&self.model)?;
        model::check_quantize(&self.model, self.quantize)?;
        self.lora
            .validate()
            .map_err(|e| ParamError::new(&["with", "lora"], e.to_string()))?;
        if self.epochs.is_some() && self.steps.is_some() {
            return Err(ParamError::new(
                &["with", "steps"],
                "give `epochs` or `steps`, not both",
            ));
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_len < 2 {
            return Err(ParamError::new(
                &["with", "batch_size"],
                "batch_size and grad_accum must be ≥ 1 and max_len ≥ 2",
            ));
        }
        let known: Vec<&str> = std::iter::once("eval_loss")
            .chain(
                self.eval_tasks
                    .iter()
                    .flat_map(|t| t.metrics().iter().copied()),
            )
            .collect();
        for metric in self.keep_best.keys() {
            if !known.contains(&metric.as_str()) {
                return Err(ParamError::new(
                    &["with", "keep_best", metric],
                    format!(
                        "not a metric of this stage's evaluation; it has {}",
                        known
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        if (self.loss_mask == LossMask::LabelToken) == self.loss_tokens.is_empty() {
            return Err(ParamError::new(
                &["with", "loss_tokens"],
                "`loss_tokens` names the label tokens of `loss_mask: label-token`, and only of it",
            ));
        }
        if !self.eval_tasks.is_empty() && self.eval_decoding.max_new_tokens == 0 {
            return Err(ParamError::new(
                &["with", "eval_decoding", "max_new_tokens"],
                "expected at least 1 token per reply",
            ));
        }
        if !(self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite()) {
            return Err(ParamError::new(
                &["with", "optimizer", "lr"],
                format!(
                    "expected a positive learning rate, found {}",
                    self.optimizer.lr
                ),
            ));
        }
        Ok(())
    }

    fn record(
        &self,
        v: &Value,
        where_: &str,
        prompt_t: Option<&str>,
    ) -> Result<Record, StageError> {
        if prompt_t.is_some() || self.response_template.is_some() {
            let render = |t: &str, what: &str| {
                crate::prompt::render_template(t, v)
                    .map_err(|e| StageError::Failed(format!("{where_}: {what}: {e}")))
            };
            let field = |f: &str| {
                v.get(f)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        StageError::Failed(format!("{where_}: expected a string field `{f}`"))
                    })
            };
            return Ok(Record::Pair {
                prompt: match prompt_t {
                    Some(t) => render(t, "prompt_template")?,
                    None => field(&self.prompt_field)?,
                },
                response: match &self.response_template {
                    Some(t) => render(t, "response_template")?,
                    None => field(&self.response_field)?,
                },
            });
        }
        if v.get("messages").is_some() {
            return serde_json::from_value(v.clone()).map_err(|e| {
                StageError::Failed(format!(
                    "{where_}: `messages` must be a list of {{role, content}}: {e}"
                ))
            });
        }
        let field = |f: &str| {
            v.get(f).and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
                StageError::Failed(format!("{where_}: expected a string field `{f}` (or `messages`); set `prompt_field`/`response_field` for other names"))
            })
        };
        Ok(Record::Pair {
            prompt: field(&self.prompt_field)?,
            response: field(&self.response_field)?,
        })
    }
}

struct Progress<'a>(
    &'a StageContext,
    Option<crate::lm::eval_tasks::TaskEvaluator<'a>>,
);

impl Observer for Progress<'_> {
    fn evaluate(
        &mut self,
        model: &pipe_train::model::Decoder,
        step: u64,
    ) -> pipe_train::Result<Option<pipe_train::trainer::TaskScores>> {
        let Some(tasks) = &self.1 else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let scores = tasks.run(model)?;
        let shown: Vec<String> = scores
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        self.0.log(&format!(
            "step {step}: task evaluation {} ({:.1}s)",
            shown.join(", "),
            started.elapsed().as_secs_f64()
        ));
        let values: Vec<(&str, f64)> = scores
            .metrics
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        self.0.scalars(step, &values);
        Ok(Some(scores))
    }

    fn on_step(&mut self, m: &StepMetrics, total: u64) {
        let eval = m
            .eval_loss
            .map(|l| format!(" eval {l:.4}"))
            .unwrap_or_default();
        let msg = format!(
            "loss {:.4}{eval} lr {:.2e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        );
        self.0.progress(m.step, Some(total), &msg);
        let mut values = vec![
            ("loss", m.loss),
            ("lr", m.lr),
            ("grad_norm", m.grad_norm),
            ("tokens_per_s", m.tokens_per_s),
            ("tokens_seen", m.tokens_seen as f64),
        ];
        if let Some(e) = m.eval_loss {
            values.push(("eval_loss", e));
        }
        self.0.scalars(m.step, &values);
        self.0.log(&format!(
            "step {}/{total}: {msg} grad-norm {:.3}",
            m.step, m.grad_norm
        ));
    }

    fn on_resume(&mut self, step: u64) {
        self.0
            .log(&format!("resuming at step {step} from a checkpoint"));
    }

    fn cancelled(&self) -> bool {
        self.0.cancel.is_cancelled()
    }
}

/// `task_curve.png`: every task metric at every evaluation (step 0 is the model
/// before training). With a reliability table (the confidence task), also
/// `reliability.png` and `routing.png`: the first evaluation against the last.
fn task_figures(
    ctx: &StageContext,
    report: &trainer::TrainReport,
    tasks: &[crate::lm::eval_tasks::TaskKind],
) -> std::io::Result<()> {
    use crate::figure::Figure;
    // The tasks' headline metrics (per-dataset ones are in metrics.jsonl).
    let shown: Vec<&str> = tasks
        .iter()
        .flat_map(|t| t.metrics().iter().copied())
        .collect();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let steps = std::iter::once((0u64, &report.initial_task))
        .chain(report.history.iter().map(|m| (m.step, &m.task)));
    for (step, task) in steps {
        for (k, v) in task {
            if shown.contains(&k.as_str()) {
                series.entry(k.clone()).or_default().push((step as f64, *v));
            }
        }
    }
    Figure::Lines {
        title: "Task metrics at each evaluation (step 0: before training)".into(),
        x: "step".into(),
        y: "value".into(),
        series: series.into_iter().collect(),
    }
    .save(&ctx.out_dir.join("task_curve.png"))?;
    let table = |d: &serde_json::Map<String, Value>| -> Option<Vec<(f64, bool)>> {
        let r = d.get("reliability")?;
        let p = r.get("confidence_scores")?.as_array()?;
        let c = r.get("correctness")?.as_array()?;
        Some(
            p.iter()
                .zip(c)
                .map(|(p, c)| (p.as_f64().unwrap_or(f64::NAN), c.as_bool().unwrap_or(false)))
                .collect(),
        )
    };
    let evals: Vec<(u64, Vec<(f64, bool)>)> = table(&report.initial_task_details)
        .map(|t| (0, t))
        .into_iter()
        .chain(
            report
                .history
                .iter()
                .filter_map(|m| table(&m.task_details).map(|t| (m.step, t))),
        )
        .collect();
    if let (Some(first), Some(last)) = (evals.first(), evals.last()) {
        let named = |(step, t): &(u64, Vec<(f64, bool)>)| match step {
            0 => ("before training".to_string(), t.clone()),
            s => (format!("step {s}"), t.clone()),
        };
        let mut both = vec![named(first)];
        if last.0 != first.0 {
            both.push(named(last));
        }
        crate::figure::reliability(&ctx.out_dir.join("reliability.png"), &both, 10)?;
        let curves = both
            .iter()
            .map(|(name, t)| {
                let (p, c): (Vec<f64>, Vec<bool>) = t.iter().copied().unzip();
                (
                    name.clone(),
                    crate::metrics::ranking::routing_curve(&p, &c).0,
                )
            })
            .collect();
        Figure::Lines {
            title: "Accuracy of the answers kept when the least confident are routed away".into(),
            x: "routing rate (share routed away)".into(),
            y: "accuracy of the kept answers".into(),
            series: curves,
        }
        .save(&ctx.out_dir.join("routing.png"))?;
    }
    Ok(())
}

/// LoRA supervised fine-tuning.
pub struct SftStage;

impl Stage for SftStage {
    fn kind(&self) -> &'static str {
        "sft"
    }

    fn version(&self) -> u32 {
        2
    }

    fn summary(&self) -> &'static str {
        "LoRA supervised fine-tuning (answer-only loss), PEFT-compatible adapter"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: SftParams = parse_params(params)?;
        p.validate()?;
        Ok(Signature {
            inputs: vec![InputDecl::required("train"), InputDecl::optional("val")],
            deps: model::model_dep(&p.model)?
                .into_iter()
                .chain(p.prompt_template.clone())
                .collect(),
            outputs: [
                OutputDecl::staged("adapter", "adapter"),
                OutputDecl::staged("metrics", "metrics.jsonl"),
                OutputDecl::staged("curve", "loss_curve.png"),
                OutputDecl::staged("curve_svg", "loss_curve.svg"),
            ]
            .into_iter()
            .chain(
                p.tensorboard
                    .then(|| OutputDecl::staged("tensorboard", "tensorboard")),
            )
            .chain(
                (!p.keep_best.is_empty() || !p.eval_tasks.is_empty())
                    .then(|| OutputDecl::staged("final", "final")),
            )
            .chain(
                (!p.eval_tasks.is_empty())
                    .then(|| OutputDecl::staged("task_curve", "task_curve.png")),
            )
            .chain(
                p.eval_tasks
                    .contains(&crate::lm::eval_tasks::TaskKind::Confidence)
                    .then(|| {
                        [
                            OutputDecl::staged("reliability", "reliability.png"),
                            OutputDecl::staged("routing", "routing.png"),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .chain(
                p.keep_best
                    .keys()
                    .map(|m| OutputDecl::staged(&format!("best_{m}"), &format!("best_{m}"))),
            )
            .collect(),
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        // Checkpointing changes how the gradients are computed, not what they are.
        model::key_without(params, &["gradient_checkpointing"])
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: SftParams = parse_params(&ctx.params)?;
        p.validate()?;
        let mut loaded = model::load_model(
            ctx,
            &p.model,
            &p.device,
            &p.dtype,
            p.quantize,
            p.double_quant,
        )?;
        let new_ids = if p.new_special_tokens.is_empty() {
            Vec::new()
        } else {
            loaded
                .tokenizer
                .add_special_tokens(&p.new_special_tokens)
                .map_err(model::failed("with.new_special_tokens"))?
        };
        let chat = model::apply_template_choice(&mut loaded.tokenizer, &p.chat_template);
        let mut label_ids = Vec::new();
        for t in &p.loss_tokens {
            label_ids.push(loaded.tokenizer.token_id(t).ok_or_else(|| {
                StageError::Failed(format!(
                    "with.loss_tokens: `{t}` is not one token of this tokenizer; add it with new_special_tokens"
                ))
            })?);
        }
        let fmt = Formatter {
            tokenizer: &loaded.tokenizer,
            chat,
            mask: p.loss_mask,
            max_len: p.max_len,
            label_tokens: &label_ids,
        };
        let prompt_t = match &p.prompt_template {
            Some(f) => Some(crate::prompt::read_template(ctx, f)?),
            None => None,
        };
        let mut sets = Vec::new();
        let mut dropped = 0usize;
        let mut rejected = 0usize;
        let mut val_records = Vec::new();
        let mut val_raw = Vec::new();
        for name in ["train", "val"] {
            let Some(path) = ctx.inputs.get(name) else {
                sets.push(Vec::new());
                continue;
            };
            let mut out = Vec::new();
            for (i, v) in crate::records::read_jsonl(path)?.iter().enumerate() {
                let r = p.record(
                    v,
                    &format!("{}: record {}", path.display(), i + 1),
                    prompt_t.as_deref(),
                )?;
                if !p.loss_tokens.is_empty() {
                    let answer = match &r {
                        Record::Pair { response, .. } => response.as_str(),
                        Record::Chat { messages } => {
                            messages.last().map_or("", |m| m.content.as_str())
                        }
                    };
                    if !p.loss_tokens.iter().any(|t| answer.contains(t.as_str())) {
                        rejected += 1;
                        ctx.log(&format!(
                            "{}: record {}: rejected: the response holds none of the label tokens {:?}",
                            path.display(),
                            i + 1,
                            p.loss_tokens
                        ));
                        continue;
                    }
                }
                if name == "val" {
                    val_records.push(r.clone());
                    val_raw.push((format!("{}: record {}", path.display(), i + 1), v.clone()));
                }
                match fmt.example(&r).map_err(model::failed(&format!(
                    "{}: record {}",
                    path.display(),
                    i + 1
                )))? {
                    Some(e) => out.push(e),
                    None => dropped += 1,
                }
            }
            sets.push(out);
        }
        let (train_set, val_set) = (&sets[0], &sets[1]);
        let steps = p.steps.unwrap_or_else(|| {
            TrainSettings::steps_for_epochs(
                p.epochs.unwrap_or(1.0),
                train_set.len(),
                p.batch_size,
                p.grad_accum,
            )
        });
        let pad_id = loaded.pad_id();
        let settings = TrainSettings {
            optimizer: p.optimizer.clone(),
            warmup_steps: p.schedule.warmup(steps),
            decay: p.schedule.decay,
            batch_size: p.batch_size,
            grad_accum: p.grad_accum,
            steps,
            max_grad_norm: p.max_grad_norm,
            eval_every: p.eval_every,
            save_every: p.save_every,
            seed: p.seed,
            pad_id,
            gradient_checkpointing: p.gradient_checkpointing,
            keep_best: p.keep_best.iter().map(|(k, g)| (k.clone(), *g)).collect(),
        };
        if !p.eval_tasks.is_empty() && val_records.is_empty() {
            return Err(StageError::Failed(
                "with.eval_tasks: the task evaluation runs on the `val` input, which is not bound or empty".into(),
            ));
        }
        if p.keep_best.contains_key("eval_loss") && val_set.is_empty() {
            return Err(StageError::Failed(
                "with.keep_best.eval_loss: there is no eval loss without a `val` input".into(),
            ));
        }
        let mut adapter = pipe_train::lora::attach(
            &mut loaded.model,
            &p.lora,
            &mut Rng::new(p.seed).fork(0x10A),
        )
        .map_err(model::failed("attaching LoRA"))?;
        if !new_ids.is_empty() {
            pipe_train::lora::add_trainable_tokens(
                &mut loaded.model,
                &mut adapter,
                new_ids.clone(),
            )
            .map_err(model::failed("adding trainable token rows"))?;
            ctx.log(&format!(
                "new special tokens {:?} → ids {new_ids:?}",
                p.new_special_tokens
            ));
        }
        ctx.log(&format!(
            "{} train / {} val examples ({dropped} dropped: the answer, or its labelled token, does not fit in max_len {}), {steps} steps, {} trainable parameters",
            train_set.len(),
            val_set.len(),
            p.max_len,
            adapter.parameters()
        ));
        let evaluator = if p.eval_tasks.is_empty() {
            None
        } else {
            let eos = loaded.eos_ids();
            Some(
                crate::lm::eval_tasks::TaskEvaluator::new(
                    &loaded.tokenizer,
                    chat,
                    &val_records,
                    &val_raw,
                    p.eval_tasks.clone(),
                    p.eval_decoding.clone(),
                    p.samples,
                    eos,
                    p.confidence.clone(),
                )
                .map_err(model::failed("preparing the task evaluation"))?,
            )
        };
        let report = trainer::train(
            &loaded.model,
            &adapter,
            train_set,
            val_set,
            &settings,
            Some(&ctx.checkpoint_dir),
            &mut Progress(ctx, evaluator),
        )
        .map_err(model::failed("training"))?;
        let mut kept_metrics = BTreeMap::new();
        if !p.eval_tasks.is_empty() || !p.keep_best.is_empty() {
            let dir = ctx.out_dir.join("final");
            std::fs::create_dir_all(&dir).map_err(StageError::io("creating final/"))?;
            adapter
                .save(&dir, &loaded.name)
                .map_err(model::failed("saving the final adapter"))?;
            for metric in p.keep_best.keys() {
                if !report.kept.iter().any(|k| &k.metric == metric) {
                    // Never defined in any evaluation (AUROC with every answer wrong):
                    // the output still exists, holding the final adapter.
                    ctx.log(&format!(
                        "keep_best.{metric}: no evaluation reported it; best_{metric}/ holds the final adapter"
                    ));
                    let dir = ctx.out_dir.join(format!("best_{metric}"));
                    std::fs::create_dir_all(&dir)
                        .map_err(StageError::io(format!("creating best_{metric}/")))?;
                    adapter
                        .save(&dir, &loaded.name)
                        .map_err(model::failed("saving a kept adapter"))?;
                    kept_metrics.insert(format!("kept_{metric}"), Value::Null);
                }
            }
            for k in &report.kept {
                adapter
                    .restore(&k.adapter, &ctx.checkpoint_dir)
                    .map_err(model::failed("restoring a kept adapter"))?;
                let dir = ctx.out_dir.join(format!("best_{}", k.metric));
                std::fs::create_dir_all(&dir)
                    .map_err(StageError::io(format!("creating best_{}/", k.metric)))?;
                adapter
                    .save(&dir, &loaded.name)
                    .map_err(model::failed("saving a kept adapter"))?;
                kept_metrics.insert(
                    format!("kept_{}", k.metric),
                    json!({"value": k.value, "step": k.step}),
                );
            }
        }
        adapter
            .restore(&report.best_adapter, &ctx.checkpoint_dir)
            .map_err(model::failed("restoring the best adapter"))?;
        let dir = ctx.out_dir.join("adapter");
        std::fs::create_dir_all(&dir).map_err(StageError::io("creating the adapter folder"))?;
        adapter
            .save(&dir, &loaded.name)
            .map_err(model::failed("saving the adapter"))?;
        let history = trainer::metrics_jsonl(&report.history);
        std::fs::write(ctx.out_dir.join("metrics.jsonl"), &history)
            .map_err(StageError::io("writing metrics.jsonl"))?;
        if p.tensorboard {
            crate::scalars::write_tfevents(
                &ctx.out_dir.join("tensorboard"),
                &crate::scalars::from_jsonl(&history),
            )
            .map_err(StageError::io("writing the TensorBoard event file"))?;
        }
        let train_pts: Vec<(f64, f64)> = report
            .history
            .iter()
            .map(|m| (m.step as f64, m.loss))
            .collect();
        let mut eval_pts: Vec<(f64, f64)> = report
            .initial_eval_loss
            .map(|l| (0.0, l))
            .into_iter()
            .collect();
        eval_pts.extend(
            report
                .history
                .iter()
                .filter_map(|m| m.eval_loss.map(|l| (m.step as f64, l))),
        );
        crate::figure::loss_curve(&ctx.out_dir.join("loss_curve.png"), &train_pts, &eval_pts)
            .map_err(StageError::io("writing loss_curve.png"))?;

        if !p.eval_tasks.is_empty() {
            task_figures(ctx, &report, &p.eval_tasks)
                .map_err(StageError::io("writing the task figures"))?;
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("steps".into(), json!(report.steps));
        metrics.insert("resumed_from_step".into(), json!(report.resumed_from));
        metrics.insert("train_examples".into(), json!(train_set.len()));
        metrics.insert("dropped_examples".into(), json!(dropped));
        if !p.loss_tokens.is_empty() {
            metrics.insert("rejected_examples".into(), json!(rejected));
        }
        metrics.insert("tokens_seen".into(), json!(report.tokens_seen));
        metrics.insert("trainable_parameters".into(), json!(adapter.parameters()));
        metrics.insert("final_train_loss".into(), json!(report.final_train_loss));
        let tps: Vec<f64> = report.history.iter().map(|m| m.tokens_per_s).collect();
        if !tps.is_empty() {
            metrics.insert(
                "tokens_per_s".into(),
                json!(tps.iter().sum::<f64>() / tps.len() as f64),
            );
        }
        for (k, v) in [
            ("initial_eval_loss", report.initial_eval_loss),
            ("best_eval_loss", report.best_eval_loss),
            ("final_eval_loss", report.final_eval_loss),
        ] {
            if let Some(v) = v {
                metrics.insert(k.into(), json!(v));
            }
        }
        if let Some(s) = report.best_step {
            metrics.insert("best_step".into(), json!(s));
        }
        metrics.extend(kept_metrics);
        for (k, v) in &report.initial_task {
            metrics.insert(format!("initial_{k}"), json!(v));
        }
        if let Some(last) = report.history.iter().rev().find(|m| !m.task.is_empty()) {
            for (k, v) in &last.task {
                metrics.insert(format!("final_{k}"), json!(v));
            }
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}
