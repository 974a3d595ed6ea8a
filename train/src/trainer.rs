//! The training loop: micro-batches with gradient accumulation, AdamW, warmup and
//! decay, clipping, periodic evaluation and checkpoints that resume exactly.
//!
//! Data order is a pure function of the seed and the step: example `k` of the
//! stream is `perm(seed, k / n)[k % n]`, so a checkpoint needs only the step, the
//! dropout generator's state, the adapter and the optimizer moments. On CPU the
//! loss sequence after a resume equals the uninterrupted one (tested).
//!
//! A checkpoint is a folder `step-NNNNNNN/` written completely, then named in
//! `LATEST` (written atomically); older folders are removed after that.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::{collate, Example};
use crate::error::{Error, Result};
use crate::io::{read_json, save_safetensors, write_atomic, write_json};
use crate::lora::Adapter;
use crate::loss::{causal_lm_loss, loss_and_grads, targets};
use crate::model::Decoder;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Decay};
use crate::rng::Rng;

/// Loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Optimizer.
    pub optimizer: AdamWConfig,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Decay after warmup.
    pub decay: Decay,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps in all.
    pub steps: u64,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: never).
    pub save_every: u64,
    /// Seed of data order and dropout.
    pub seed: u64,
    /// Padding token id.
    pub pad_id: u32,
    /// Recompute each layer in the backward pass instead of keeping its activations
    /// (same losses and gradients, a fraction of the activation memory, ~⅓ more compute).
    pub gradient_checkpointing: bool,
    /// Metrics to keep the best adapter of, each with its direction: a task metric the
    /// observer's [`Observer::evaluate`] reports, or `eval_loss`.
    #[serde(default)]
    pub keep_best: Vec<(String, Goal)>,
}

/// Which way a kept metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// Larger is better (accuracy, validity, F1).
    Max,
    /// Smaller is better (loss, calibration error).
    Min,
}

impl Goal {
    /// Whether `new` is strictly better than `old` (the first value always is; NaN never).
    pub fn better(self, new: f64, old: Option<f64>) -> bool {
        if new.is_nan() {
            return false;
        }
        match (self, old) {
            (_, None) => true,
            (Goal::Max, Some(o)) => new > o,
            (Goal::Min, Some(o)) => new < o,
        }
    }
}

/// What a task evaluation of the current model gives: named scores, and sample
/// generations to store with the step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskScores {
    /// Metric name → value.
    pub metrics: BTreeMap<String, f64>,
    /// Free-form samples (prompt, generation, verdict), kept in the metrics log.
    pub samples: Vec<serde_json::Value>,
    /// Larger per-evaluation data (a reliability table), kept in the metrics log.
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The best adapter of one kept metric.
#[derive(Debug, Clone)]
pub struct KeptBest {
    /// The metric.
    pub metric: String,
    /// Its direction.
    pub goal: Goal,
    /// Its best value.
    pub value: f64,
    /// The step that reached it (0: the model before training).
    pub step: u64,
    /// The adapter at that step.
    pub adapter: HashMap<String, Tensor>,
}

impl TrainSettings {
    /// Steps needed to see the training set `epochs` times.
    pub fn steps_for_epochs(epochs: f64, examples: usize, batch: usize, accum: usize) -> u64 {
        let per_step = (batch * accum).max(1) as f64;
        ((epochs * examples as f64) / per_step).ceil().max(1.0) as u64
    }
}

/// One line of the metrics log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Mean token loss of the step's batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Throughput of this step (all tokens, padding excluded).
    pub tokens_per_s: f64,
    /// Tokens seen so far.
    pub tokens_seen: u64,
    /// Eval loss, on steps that evaluate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// Task metrics, on steps that evaluate.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub task: BTreeMap<String, f64>,
    /// Sample generations of the task evaluation.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub samples: Vec<serde_json::Value>,
    /// The task evaluation's larger data (e.g. `reliability`).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty", default)]
    pub task_details: serde_json::Map<String, serde_json::Value>,
}

/// Callbacks from the loop: progress, and whether to stop.
pub trait Observer {
    /// After each optimizer step.
    fn on_step(&mut self, _m: &StepMetrics, _total: u64) {}
    /// After a checkpoint was loaded, before the first step.
    fn on_resume(&mut self, _step: u64) {}
    /// Polled between micro-batches; `true` stops with [`Error::Cancelled`] after saving a checkpoint.
    fn cancelled(&self) -> bool {
        false
    }
    /// Task evaluation of the model as it is at `step` (0: before training), on the
    /// same schedule as the eval loss; `None` when there are no tasks. It must not
    /// depend on anything but the model and the step (seed its sampling), so that a
    /// resumed run evaluates as the uninterrupted one did.
    fn evaluate(&mut self, _model: &Decoder, _step: u64) -> Result<Option<TaskScores>> {
        Ok(None)
    }
}

impl Observer for () {}

/// What training produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Steps done.
    pub steps: u64,
    /// Step the run resumed from (0 for a fresh start).
    pub resumed_from: u64,
    /// Eval loss before the first step.
    pub initial_eval_loss: Option<f64>,
    /// Best eval loss and its step.
    pub best_eval_loss: Option<f64>,
    /// Step of the best eval loss.
    pub best_step: Option<u64>,
    /// Eval loss at the end.
    pub final_eval_loss: Option<f64>,
    /// Mean loss of the last step.
    pub final_train_loss: f64,
    /// Tokens seen.
    pub tokens_seen: u64,
    /// Every step's metrics, from step 1 (including steps before a resume).
    pub history: Vec<StepMetrics>,
    /// Adapter tensors of the best eval step (or the last step without eval).
    #[serde(skip)]
    pub best_adapter: HashMap<String, Tensor>,
    /// Task metrics of the model before training.
    pub initial_task: BTreeMap<String, f64>,
    /// The task evaluation's larger data before training.
    pub initial_task_details: serde_json::Map<String, serde_json::Value>,
    /// The best adapter of each `keep_best` metric, in the order given.
    #[serde(skip)]
    pub kept: Vec<KeptBest>,
}

#[derive(Serialize, Deserialize)]
struct State {
    step: u64,
    rng: u64,
    tokens_seen: u64,
    initial_eval_loss: Option<f64>,
    best_eval_loss: Option<f64>,
    best_step: Option<u64>,
    history: Vec<StepMetrics>,
    #[serde(default)]
    initial_task: BTreeMap<String, f64>,
    #[serde(default)]
    initial_task_details: serde_json::Map<String, serde_json::Value>,
    /// Per `keep_best` entry: its best value and step so far.
    #[serde(default)]
    kept: Vec<Option<(f64, u64)>>,
}

/// Mean token loss over `examples`, without dropout.
pub fn evaluate(model: &Decoder, examples: &[Example], batch: usize, pad_id: u32) -> Result<f64> {
    let mut sum = 0f64;
    let mut tokens = 0usize;
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = collate(&refs, pad_id, model.device())?;
        let l = causal_lm_loss(model, &b.ids, &b.keys, &b.labels, None)?;
        sum += l
            .sum
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        tokens += l.tokens;
    }
    if tokens == 0 {
        return Err(Error::Invalid(
            "the eval set has no token with a loss".into(),
        ));
    }
    Ok(sum / tokens as f64)
}

/// The order in which epoch `epoch` visits `n` training examples (0-based epochs):
/// step `k` of the epoch takes the `k`-th `batch_size` of them.
pub fn order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::new(seed).fork(epoch + 1).shuffle(&mut idx);
    idx
}

/// Runs the loop on `model` (with `adapter` attached), resuming from `checkpoints` if it holds one.
pub fn train(
    model: &Decoder,
    adapter: &Adapter,
    train_set: &[Example],
    eval_set: &[Example],
    s: &TrainSettings,
    checkpoints: Option<&Path>,
    observer: &mut dyn Observer,
) -> Result<TrainReport> {
    if train_set.is_empty() {
        return Err(Error::Invalid("the training set is empty (after dropping examples with no answer token within max_len)".into()));
    }
    if s.batch_size == 0 || s.grad_accum == 0 {
        return Err(Error::Invalid(
            "batch_size and grad_accum must be at least 1".into(),
        ));
    }
    let mut opt = AdamW::new(adapter.vars.clone(), s.optimizer.clone())?;
    if let Some(token_lr) = s.optimizer.token_lr {
        if !(token_lr > 0.0 && s.optimizer.lr > 0.0) {
            return Err(Error::Invalid(format!(
                "optimizer.token_lr {token_lr} and lr {} must both be positive",
                s.optimizer.lr
            )));
        }
        for key in [crate::lora::TOKENS_KEY, crate::lora::HEAD_TOKENS_KEY] {
            opt.scale_lr(key, token_lr / s.optimizer.lr);
        }
    }
    let mut st = State {
        step: 0,
        rng: Rng::new(s.seed).fork(0xD20).state(),
        tokens_seen: 0,
        initial_eval_loss: None,
        best_eval_loss: None,
        best_step: None,
        history: vec![],
        initial_task: BTreeMap::new(),
        initial_task_details: serde_json::Map::new(),
        kept: vec![None; s.keep_best.len()],
    };
    let mut best_adapter = adapter.tensors()?;
    let mut kept_adapters: Vec<Option<HashMap<String, Tensor>>> = vec![None; s.keep_best.len()];
    if let Some(dir) = checkpoints {
        if let Some((saved, path)) = latest(dir)? {
            st = saved;
            let tensors = load_map(&path.join("adapter.safetensors"))?;
            adapter.restore(&tensors, &path)?;
            opt.load_state(&load_map(&path.join("optimizer.safetensors"))?, &path)?;
            let best = path.join("best.safetensors");
            best_adapter = if best.exists() {
                load_map(&best)?
            } else {
                tensors
            };
            if st.kept.len() != s.keep_best.len() {
                return Err(Error::Invalid(format!(
                    "the checkpoint in {} kept the best of {} metrics, this run keeps {}: remove the checkpoint or keep the same metrics",
                    path.display(),
                    st.kept.len(),
                    s.keep_best.len()
                )));
            }
            for (i, k) in st.kept.iter().enumerate() {
                if k.is_some() {
                    kept_adapters[i] = Some(load_map(&path.join(format!("kept-{i}.safetensors")))?);
                }
            }
            tracing::info!(step = st.step, "resumed from checkpoint {}", path.display());
            observer.on_resume(st.step);
        }
    }
    let resumed_from = st.step;
    let do_eval = !eval_set.is_empty();
    if st.step == 0 {
        let mut scores = BTreeMap::new();
        if do_eval {
            let l = evaluate(model, eval_set, s.batch_size, s.pad_id)?;
            st.initial_eval_loss = Some(l);
            scores.insert("eval_loss".to_string(), l);
        }
        if let Some(t) = observer.evaluate(model, 0)? {
            st.initial_task = t.metrics.clone();
            st.initial_task_details = t.details;
            scores.extend(t.metrics);
        }
        keep(
            &s.keep_best,
            &scores,
            0,
            adapter,
            &mut st.kept,
            &mut kept_adapters,
        )?;
    }
    let n = train_set.len();
    let per_step = s.batch_size * s.grad_accum;
    let names: HashMap<candle_core::TensorId, String> = adapter
        .vars
        .iter()
        .map(|(k, v)| (v.as_tensor().id(), k.clone()))
        .collect();
    let orders = &mut (u64::MAX, Vec::new());
    while st.step < s.steps {
        let started = Instant::now();
        let first = st.step as usize * per_step;
        let picked: Vec<&Example> = (first..first + per_step)
            .map(|k| {
                let epoch = (k / n) as u64;
                if orders.0 != epoch {
                    *orders = (epoch, order(s.seed, epoch, n));
                }
                &train_set[orders.1[k % n]]
            })
            .collect();
        let total_targets: usize = picked
            .chunks(s.batch_size)
            .map(|c| {
                targets(&c.iter().map(|e| e.labels.clone()).collect::<Vec<_>>())
                    .0
                    .len()
            })
            .sum();
        let mut rng = Rng::new(st.rng);
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        for micro in picked.chunks(s.batch_size) {
            if observer.cancelled() {
                return Err(Error::Cancelled);
            }
            let b = collate(micro, s.pad_id, model.device())?;
            tokens += b.tokens;
            let vars: Vec<&candle_core::Var> = adapter.vars.iter().map(|(_, v)| v).collect();
            let (value, n, g) = loss_and_grads(
                model,
                &b,
                Some(&mut rng),
                1.0 / total_targets as f64,
                &vars,
                s.gradient_checkpointing,
            )?;
            if n == 0 {
                continue;
            }
            loss_sum += value;
            for ((_, var), t) in adapter.vars.iter().zip(g) {
                if let Some(t) = t {
                    let key = names[&var.as_tensor().id()].clone();
                    let entry = grads.remove(&key);
                    grads.insert(
                        key,
                        match entry {
                            Some(acc) => (acc + t)?,
                            None => t,
                        },
                    );
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, s.max_grad_norm)?;
        let lr = lr_at(st.step, s.optimizer.lr, s.warmup_steps, s.steps, s.decay);
        opt.step(&grads, lr)?;
        st.step += 1;
        st.rng = rng.state();
        st.tokens_seen += tokens as u64;
        let mut m = StepMetrics {
            step: st.step,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            tokens_seen: st.tokens_seen,
            eval_loss: None,
            task: BTreeMap::new(),
            samples: Vec::new(),
            task_details: serde_json::Map::new(),
        };
        let eval_step =
            (s.eval_every > 0 && st.step.is_multiple_of(s.eval_every)) || st.step == s.steps;
        if eval_step {
            let mut scores = BTreeMap::new();
            if do_eval {
                let l = evaluate(model, eval_set, s.batch_size, s.pad_id)?;
                m.eval_loss = Some(l);
                scores.insert("eval_loss".to_string(), l);
                if st.best_eval_loss.is_none_or(|b| l < b) {
                    st.best_eval_loss = Some(l);
                    st.best_step = Some(st.step);
                    best_adapter = adapter.tensors()?;
                }
            }
            if let Some(t) = observer.evaluate(model, st.step)? {
                scores.extend(t.metrics.clone());
                m.task = t.metrics;
                m.samples = t.samples;
                m.task_details = t.details;
            }
            keep(
                &s.keep_best,
                &scores,
                st.step,
                adapter,
                &mut st.kept,
                &mut kept_adapters,
            )?;
        }
        if !do_eval {
            best_adapter = adapter.tensors()?;
        }
        observer.on_step(&m, s.steps);
        st.history.push(m);
        if let Some(dir) = checkpoints {
            if s.save_every > 0 && st.step.is_multiple_of(s.save_every) && st.step < s.steps {
                save_checkpoint(dir, &st, adapter, &opt, &best_adapter, &kept_adapters)?;
            }
        }
    }
    let last = st.history.last().cloned();
    Ok(TrainReport {
        steps: st.step,
        resumed_from,
        initial_eval_loss: st.initial_eval_loss,
        best_eval_loss: st.best_eval_loss,
        best_step: st.best_step,
        final_eval_loss: last.as_ref().and_then(|m| m.eval_loss),
        final_train_loss: last.map(|m| m.loss).unwrap_or(f64::NAN),
        tokens_seen: st.tokens_seen,
        history: st.history,
        best_adapter,
        initial_task: st.initial_task,
        initial_task_details: st.initial_task_details,
        kept: s
            .keep_best
            .iter()
            .zip(st.kept)
            .zip(kept_adapters)
            .filter_map(|(((metric, goal), k), a)| {
                let (value, step) = k?;
                Some(KeptBest {
                    metric: metric.clone(),
                    goal: *goal,
                    value,
                    step,
                    adapter: a?,
                })
            })
            .collect(),
    })
}

/// Updates the kept bests with this evaluation's `scores`.
fn keep(
    keep_best: &[(String, Goal)],
    scores: &BTreeMap<String, f64>,
    step: u64,
    adapter: &Adapter,
    kept: &mut [Option<(f64, u64)>],
    adapters: &mut [Option<HashMap<String, Tensor>>],
) -> Result<()> {
    for (i, (metric, goal)) in keep_best.iter().enumerate() {
        // A metric an evaluation leaves out (undefined there, e.g. AUROC when every
        // answer is wrong) keeps its best so far; one never reported has no entry in
        // the report (`sft` checks the names before training).
        let Some(&v) = scores.get(metric) else {
            continue;
        };
        if goal.better(v, kept[i].map(|k| k.0)) {
            kept[i] = Some((v, step));
            adapters[i] = Some(adapter.tensors()?);
        }
    }
    Ok(())
}

/// Tensors of a checkpoint file, on the CPU.
pub(crate) fn load_map(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| Error::format(path, format!("cannot read checkpoint tensors: {e}")))
}

/// The state and folder of the checkpoint `LATEST` names in `dir`, if any.
pub(crate) fn latest<S: serde::de::DeserializeOwned>(dir: &Path) -> Result<Option<(S, PathBuf)>> {
    let pointer = dir.join("LATEST");
    let Ok(name) = std::fs::read_to_string(&pointer) else {
        return Ok(None);
    };
    let path = dir.join(name.trim());
    let v = read_json(&path.join("state.json"))?;
    let st: S = serde_json::from_value(v)
        .map_err(|e| Error::format(path.join("state.json"), e.to_string()))?;
    Ok(Some((st, path)))
}

/// Writes checkpoint `step-NNNNNNN/` in `dir`: `files` (tensor maps by file name) and
/// `state.json`, then names it in `LATEST` (atomically) and removes older folders.
pub(crate) fn write_checkpoint<S: Serialize>(
    dir: &Path,
    step: u64,
    state: &S,
    files: &[(&str, &HashMap<String, Tensor>)],
) -> Result<()> {
    let name = format!("step-{step:07}");
    let path = dir.join(&name);
    for (file, tensors) in files {
        save_safetensors(&path.join(file), tensors)?;
    }
    write_json(
        &path.join("state.json"),
        &serde_json::to_value(state).expect("state serialises"),
    )?;
    write_atomic(&dir.join("LATEST"), name.as_bytes())?;
    for entry in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let n = entry.file_name().to_string_lossy().to_string();
        if n.starts_with("step-") && n != name {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    tracing::debug!(step, "checkpoint saved");
    Ok(())
}

fn save_checkpoint(
    dir: &Path,
    st: &State,
    adapter: &Adapter,
    opt: &AdamW,
    best: &HashMap<String, Tensor>,
    kept: &[Option<HashMap<String, Tensor>>],
) -> Result<()> {
    let trained = adapter.tensors()?;
    let moments = opt.state()?;
    let kept_names: Vec<String> = (0..kept.len())
        .map(|i| format!("kept-{i}.safetensors"))
        .collect();
    let mut files: Vec<(&str, &HashMap<String, Tensor>)> = vec![
        ("adapter.safetensors", &trained),
        ("optimizer.safetensors", &moments),
        ("best.safetensors", best),
    ];
    for (name, k) in kept_names.iter().zip(kept) {
        if let Some(t) = k {
            files.push((name.as_str(), t));
        }
    }
    write_checkpoint(dir, st.step, st, &files)
}

/// Metrics as JSON lines.
pub fn metrics_jsonl(history: &[StepMetrics]) -> String {
    history
        .iter()
        .map(|m| json!(m).to_string() + "\n")
        .collect()
}
