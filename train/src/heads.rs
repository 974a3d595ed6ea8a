//! Sequence heads on a decoder: regression, listwise ranking and pairwise reward
//! models, the shape of `AutoModelForSequenceClassification` + PEFT.
//!
//! A model is the base decoder (optionally with a LoRA [`Adapter`], optionally with
//! quantized frozen projections), a [`Pooling`] of its final hidden states and a
//! [`Head`]. Pooling reads the attention mask, never token ids: `last` is the last
//! valid token of each row whatever the padding side and whatever id it has (an
//! end-of-sequence token that doubles as the pad token is still found, which
//! transformers' id-based search gets wrong), `mean` averages the valid tokens.
//!
//! Three objectives, each a mean over training units:
//! - [`Objective::Mse`]: one sequence, `D` targets; `Σ_d (ŷ_d − y_d)² / D`;
//! - [`Objective::Listwise`]: a group of `K` candidates with a target distribution
//!   ([`listwise_targets`]: the best candidate, ties shared equally, or a softmax of
//!   their rewards); `logsumexp(s) − Σ_k t_k s_k`, the cross-entropy of the softmax
//!   over the group;
//! - [`Objective::Pairwise`]: chosen and rejected; the Bradley–Terry loss of
//!   [`crate::reward`] with its margin and centering.
//!
//! Saved in PEFT's sequence-classification layout ([`save`]): the adapter with
//! `task_type: SEQ_CLS` and `modules_to_save: ["score"]`, the linear head as
//! `base_model.model.score.weight` (`[D, hidden]`, no bias, as transformers' `score`),
//! and `head_config.json` (pooling, head, objective, target names and the per-dimension
//! standardisation, which `AutoModelForSequenceClassification` does not know about:
//! its outputs are the standardised values). An MLP head cannot live in transformers'
//! `score`, so it is saved beside the adapter as `head.safetensors`.
//!
//! [`train`] is the loop: AdamW, warmup and decay, clipping, gradient accumulation,
//! evaluation every `eval_every` steps with the best model kept by a named metric, and
//! checkpoints that resume exactly (data order from the seed and the step, as in
//! [`crate::trainer`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{read_json, save_safetensors, write_json};
use crate::lora::Adapter;
use crate::model::{Decoder, KeyMask};
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Decay};
use crate::rng::Rng;
use crate::trainer::{latest, load_map, Goal};

/// How a sequence's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The last valid (non-padding) token of the row.
    #[default]
    Last,
    /// The mean over the valid tokens.
    Mean,
}

/// The head's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// `score`: `[D, hidden]`, no bias (transformers' sequence-classification head).
    #[default]
    Linear,
    /// dropout → `dense` `[hidden/2, hidden]` + bias → GELU → dropout → `out_proj`
    /// `[D, hidden/2]` (+ bias for regression).
    Mlp,
}

/// What the head is trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Mean squared error against `D` targets per sequence.
    Mse,
    /// Softmax cross-entropy over a group of candidates.
    Listwise,
    /// Bradley–Terry on (chosen, rejected).
    Pairwise,
}

/// Which side of a batch row the padding goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Tokens first, padding after.
    #[default]
    Right,
    /// Padding first, tokens after.
    Left,
}

/// A head's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Pooling of the final hidden states.
    pub pooling: Pooling,
    /// Head shape.
    pub kind: HeadKind,
    /// The decoder's hidden size.
    pub hidden: usize,
    /// Outputs (`D`; 1 for ranking and reward models).
    pub outputs: usize,
    /// Dropout of the MLP head (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Whether the MLP's `out_proj` has a bias. A ranking or reward loss compares
    /// scores within a group, so a shared output bias never gets a gradient there:
    /// give it only to regression heads ([`HeadConfig::out_bias_for`]).
    #[serde(default)]
    pub out_bias: bool,
}

impl HeadConfig {
    /// Whether an MLP head trained for `objective` has an output bias.
    pub fn out_bias_for(objective: Objective) -> bool {
        objective == Objective::Mse
    }
}

const HEAD_FORK: u64 = 0x4EAD_D209;

/// The PEFT key of the linear head (`modules_to_save: ["score"]`).
pub const SCORE_KEY: &str = "base_model.model.score.weight";
const MLP_KEYS: [&str; 4] = [
    "score.dense.weight",
    "score.dense.bias",
    "score.out_proj.weight",
    "score.out_proj.bias",
];

/// A head's trainable tensors.
pub struct Head {
    /// Its configuration.
    pub config: HeadConfig,
    /// `(name, variable)`: [`SCORE_KEY`] for a linear head, `score.dense.*` and
    /// `score.out_proj.*` for an MLP.
    pub vars: Vec<(String, Var)>,
}

impl Head {
    /// A fresh head: weights normal with σ = 0.02 (transformers' `initializer_range`),
    /// biases zero.
    pub fn new(config: HeadConfig, rng: &mut Rng, device: &Device) -> Result<Head> {
        if config.outputs == 0 || config.hidden == 0 {
            return Err(Error::Invalid(format!(
                "a head needs at least one output and one input, got {} × {}",
                config.outputs, config.hidden
            )));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Invalid(format!(
                "head dropout must be in [0, 1), got {}",
                config.dropout
            )));
        }
        let mut normal = |rows: usize, cols: usize| -> Result<Var> {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| (rng.normal() * 0.02) as f32)
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                v,
                (rows, cols),
                device,
            )?)?)
        };
        let (h, d) = (config.hidden, config.outputs);
        let vars = match config.kind {
            HeadKind::Linear => vec![(SCORE_KEY.to_string(), normal(d, h)?)],
            HeadKind::Mlp => {
                let mid = (h / 2).max(1);
                vec![
                    (MLP_KEYS[0].to_string(), normal(mid, h)?),
                    (
                        MLP_KEYS[1].to_string(),
                        Var::zeros(mid, DType::F32, device)?,
                    ),
                    (MLP_KEYS[2].to_string(), normal(d, mid)?),
                ]
                .into_iter()
                .chain(
                    config
                        .out_bias
                        .then(|| {
                            Var::zeros(d, DType::F32, device).map(|v| (MLP_KEYS[3].to_string(), v))
                        })
                        .transpose()?,
                )
                .collect()
            }
        };
        Ok(Head { config, vars })
    }

    fn var(&self, i: usize) -> &Tensor {
        self.vars[i].1.as_tensor()
    }

    /// `[n, D]` outputs for pooled features `[n, hidden]` (any float dtype; computed in
    /// f32). `dropout` enables the MLP's dropout (training).
    pub fn forward(&self, pooled: &Tensor, dropout: Option<&mut Rng>) -> Result<Tensor> {
        let x = pooled.to_dtype(DType::F32)?;
        match self.config.kind {
            HeadKind::Linear => Ok(x.matmul(&self.var(0).t()?)?),
            HeadKind::Mlp => {
                let p = self.config.dropout;
                let mut rng = dropout;
                let mut drop = |t: Tensor| -> Result<Tensor> {
                    match rng.as_deref_mut() {
                        Some(r) if p > 0.0 => crate::linear::dropout_with(&t, p, r),
                        _ => Ok(t),
                    }
                };
                let x = drop(x)?;
                let x = x
                    .matmul(&self.var(0).t()?)?
                    .broadcast_add(self.var(1))?
                    .gelu_erf()?;
                let x = drop(x)?;
                let y = x.matmul(&self.var(2).t()?)?;
                Ok(if self.vars.len() > 3 {
                    y.broadcast_add(self.var(3))?
                } else {
                    y
                })
            }
        }
    }

    /// The weights by name (f32 copies).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        crate::io::named_tensors(&self.vars)
    }

    /// Copies values from a map by name, checking every name and shape.
    pub fn restore(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        crate::io::restore_named(&self.vars, tensors, source, "the head")
    }
}

/// Token ids padded into one batch, with the mask of valid keys.
pub fn batch_ids(
    seqs: &[&[u32]],
    pad_id: u32,
    side: Padding,
    device: &Device,
) -> Result<(Tensor, KeyMask)> {
    let s = seqs.iter().map(|q| q.len()).max().unwrap_or(0).max(1);
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * s);
    let mut valid = Vec::with_capacity(b * s);
    for q in seqs {
        if q.is_empty() {
            return Err(Error::Invalid("a sequence to score has no token".into()));
        }
        let pad = s - q.len();
        if side == Padding::Left {
            ids.extend(std::iter::repeat_n(pad_id, pad));
            valid.extend(std::iter::repeat_n(false, pad));
        }
        ids.extend(q.iter());
        valid.extend(std::iter::repeat_n(true, q.len()));
        if side == Padding::Right {
            ids.extend(std::iter::repeat_n(pad_id, pad));
            valid.extend(std::iter::repeat_n(false, pad));
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, s), device)?,
        KeyMask {
            batch: b,
            keys: s,
            valid,
        },
    ))
}

/// Pools hidden states `[b, s, hidden]` into `[b, hidden]` (f32) by the key mask.
pub fn pool(hidden: &Tensor, keys: &KeyMask, pooling: Pooling) -> Result<Tensor> {
    let (b, s, h) = hidden.dims3()?;
    if keys.batch != b || keys.keys != s {
        return Err(Error::Invalid(format!(
            "the mask is {} × {}, the hidden states {b} × {s}",
            keys.batch, keys.keys
        )));
    }
    let row = |r: usize| &keys.valid[r * s..(r + 1) * s];
    let hidden = hidden.to_dtype(DType::F32)?;
    match pooling {
        Pooling::Last => {
            let mut idx = Vec::with_capacity(b);
            for r in 0..b {
                let j = row(r)
                    .iter()
                    .rposition(|&v| v)
                    .ok_or_else(|| Error::Invalid(format!("batch row {r} has no valid token")))?;
                idx.push((r * s + j) as u32);
            }
            let idx = Tensor::from_vec(idx, b, hidden.device())?;
            Ok(hidden.reshape((b * s, h))?.index_select(&idx, 0)?)
        }
        Pooling::Mean => {
            let mut w = Vec::with_capacity(b * s);
            for r in 0..b {
                let n = row(r).iter().filter(|&&v| v).count();
                if n == 0 {
                    return Err(Error::Invalid(format!("batch row {r} has no valid token")));
                }
                w.extend(row(r).iter().map(|&v| if v { 1.0 / n as f32 } else { 0.0 }));
            }
            let w = Tensor::from_vec(w, (b, 1, s), hidden.device())?;
            Ok(w.matmul(&hidden)?.squeeze(1)?)
        }
    }
}

/// One training or evaluation unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Token ids: one sequence (mse), the group's candidates (listwise), or chosen then
    /// rejected (pairwise).
    pub seqs: Vec<Vec<u32>>,
    /// `D` targets (mse) or the target distribution over the candidates (listwise);
    /// empty for pairwise.
    pub target: Vec<f32>,
    /// Pairwise margin (0 otherwise).
    pub margin: f32,
}

/// The listwise target distribution of a group from its candidates' rewards: with no
/// temperature, the best candidate, probability shared equally among tied bests; with
/// a temperature `τ`, `softmax(r / τ)`.
pub fn listwise_targets(rewards: &[f64], temperature: Option<f64>) -> Result<Vec<f32>> {
    if rewards.is_empty() || rewards.iter().any(|r| !r.is_finite()) {
        return Err(Error::Invalid(format!(
            "listwise rewards must be finite and non-empty, got {rewards:?}"
        )));
    }
    let max = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match temperature {
        None => {
            let best = rewards.iter().filter(|&&r| r == max).count() as f64;
            Ok(rewards
                .iter()
                .map(|&r| if r == max { (1.0 / best) as f32 } else { 0.0 })
                .collect())
        }
        Some(t) if t > 0.0 => {
            let e: Vec<f64> = rewards.iter().map(|r| ((r - max) / t).exp()).collect();
            let z: f64 = e.iter().sum();
            Ok(e.iter().map(|v| (v / z) as f32).collect())
        }
        Some(t) => Err(Error::Invalid(format!(
            "listwise temperature must be positive, got {t}"
        ))),
    }
}

/// Checks that `units` suit `objective` with `outputs` head outputs.
pub fn check_units(objective: Objective, outputs: usize, units: &[Unit]) -> Result<()> {
    for (i, u) in units.iter().enumerate() {
        let bad = |m: String| Err(Error::Invalid(format!("unit {}: {m}", i + 1)));
        if u.seqs.iter().any(Vec::is_empty) {
            return bad("a sequence has no token".into());
        }
        match objective {
            Objective::Mse => {
                if u.seqs.len() != 1 || u.target.len() != outputs {
                    return bad(format!(
                        "mse needs one sequence and {outputs} targets, got {} and {}",
                        u.seqs.len(),
                        u.target.len()
                    ));
                }
                if u.target.iter().any(|t| !t.is_finite()) {
                    return bad(format!("a target is not a finite number: {:?}", u.target));
                }
            }
            Objective::Listwise => {
                let sum: f32 = u.target.iter().sum();
                if u.seqs.len() < 2 || u.target.len() != u.seqs.len() || (sum - 1.0).abs() > 1e-4 {
                    return bad(format!(
                        "listwise needs 2+ candidates and a target distribution over them, got {} candidates, targets {:?}",
                        u.seqs.len(),
                        u.target
                    ));
                }
            }
            Objective::Pairwise => {
                if u.seqs.len() != 2 {
                    return bad(format!(
                        "pairwise needs chosen and rejected, got {} sequences",
                        u.seqs.len()
                    ));
                }
            }
        }
        if objective != Objective::Mse && outputs != 1 {
            return bad(format!(
                "{objective:?} scores with one output, the head has {outputs}"
            ));
        }
    }
    Ok(())
}

/// The summed loss of `units` from their scores (`[Σ seqs, D]`, the units' sequences
/// in order): a scalar with a graph back to `scores`. `center` is the pairwise
/// centering coefficient.
pub fn units_loss(
    objective: Objective,
    scores: &Tensor,
    units: &[&Unit],
    center: f64,
) -> Result<Tensor> {
    let device = scores.device();
    let (_, d) = scores.dims2()?;
    match objective {
        Objective::Mse => {
            let t: Vec<f32> = units
                .iter()
                .flat_map(|u| u.target.iter().copied())
                .collect();
            let t = Tensor::from_vec(t, (units.len(), d), device)?;
            Ok(((scores - t)?.sqr()?.sum_all()? / d as f64)?)
        }
        Objective::Listwise => {
            let mut total: Option<Tensor> = None;
            let mut off = 0;
            for u in units {
                let k = u.seqs.len();
                let s = scores.narrow(0, off, k)?.squeeze(1)?;
                off += k;
                // logsumexp with the max taken out: its gradient through the max is 0.
                let m = s.max(0)?.detach();
                let lse = (s.broadcast_sub(&m)?.exp()?.sum_all()?.log()? + &m)?;
                let t = Tensor::from_vec(u.target.clone(), k, device)?;
                let l = (lse - (s * t)?.sum_all()?)?;
                total = Some(match total {
                    Some(acc) => (acc + l)?,
                    None => l,
                });
            }
            total.ok_or_else(|| Error::Invalid("no unit to score".into()))
        }
        Objective::Pairwise => {
            let n = units.len();
            let s = scores.squeeze(1)?.reshape((n, 2))?;
            let c = s.narrow(1, 0, 1)?.squeeze(1)?;
            let r = s.narrow(1, 1, 1)?.squeeze(1)?;
            let m = Tensor::from_vec(units.iter().map(|u| u.margin).collect(), n, device)?;
            let mut loss =
                crate::reward::neg_log_sigmoid(&((c.clone() - r.clone())? - m)?)?.sum_all()?;
            if center != 0.0 {
                loss = (loss + ((c + r)?.sqr()?.sum_all()? * center)?)?;
            }
            Ok(loss)
        }
    }
}

/// The same loss for one unit from plain scores (one row of `D` per sequence), in f64.
pub fn unit_loss(objective: Objective, scores: &[Vec<f32>], unit: &Unit, center: f64) -> f64 {
    match objective {
        Objective::Mse => {
            let d = unit.target.len().max(1) as f64;
            scores[0]
                .iter()
                .zip(&unit.target)
                .map(|(p, t)| (*p as f64 - *t as f64).powi(2))
                .sum::<f64>()
                / d
        }
        Objective::Listwise => {
            let s: Vec<f64> = scores.iter().map(|r| r[0] as f64).collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = s.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
            lse - s
                .iter()
                .zip(&unit.target)
                .map(|(a, t)| a * *t as f64)
                .sum::<f64>()
        }
        Objective::Pairwise => {
            let (c, r) = (scores[0][0] as f64, scores[1][0] as f64);
            let x = c - r - unit.margin as f64;
            (1.0 + (-x).exp()).ln() + center * (c + r).powi(2)
        }
    }
}

/// A decoder with a head (and whatever adapter is attached to the decoder).
pub struct SeqModel<'a> {
    /// The base (LoRA attached or not).
    pub decoder: &'a Decoder,
    /// The head.
    pub head: &'a Head,
    /// Padding id of batches.
    pub pad_id: u32,
    /// Padding side of batches.
    pub padding: Padding,
}

impl SeqModel<'_> {
    /// Scores `[n, D]` for `seqs` (no dropout; a graph when a weight is trainable).
    pub fn scores(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let (ids, keys) = batch_ids(seqs, self.pad_id, self.padding, self.decoder.device())?;
        let h = self.decoder.hidden(&ids, &keys, None, None)?;
        let pooled = pool(&h, &keys, self.head.config.pooling)?;
        self.head.forward(&pooled, None)
    }

    /// Scores of every sequence, without a graph, `batch` sequences at a time.
    pub fn predict(&self, seqs: &[&[u32]], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(batch.max(1)) {
            let s = self.scores(chunk)?.detach();
            out.extend(s.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// Scores per unit (one `Vec<f32>` of `D` per sequence of the unit).
    pub fn predict_units(&self, units: &[Unit], batch: usize) -> Result<Vec<Vec<Vec<f32>>>> {
        let seqs: Vec<&[u32]> = units
            .iter()
            .flat_map(|u| u.seqs.iter().map(Vec::as_slice))
            .collect();
        let flat = self.predict(&seqs, batch)?;
        let mut it = flat.into_iter();
        Ok(units
            .iter()
            .map(|u| it.by_ref().take(u.seqs.len()).collect())
            .collect())
    }
}

/// Loop settings of [`train`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadTrainSettings {
    /// The objective.
    pub objective: Objective,
    /// Pairwise centering coefficient.
    pub center: f64,
    /// Optimizer (head and adapter alike; `head_lr` overrides for the head).
    pub optimizer: AdamWConfig,
    /// Peak learning rate of the head when it should differ from `optimizer.lr`.
    pub head_lr: Option<f64>,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Decay after warmup.
    pub decay: Decay,
    /// Units per micro-batch.
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
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// The metric that picks the kept model (`eval_loss` or one the observer reports).
    pub keep_best: (String, Goal),
}

/// One optimizer step of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadStep {
    /// Optimizer step (1-based; 0 for the evaluation before training).
    pub step: u64,
    /// Mean unit loss of the step's batch (`None` at step 0).
    pub loss: Option<f64>,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Units per second of this step.
    pub units_per_s: f64,
    /// Mean training loss since the previous evaluation (eval steps).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub train_loss: Option<f64>,
    /// Mean unit loss on the eval set (eval steps).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// The observer's metrics (eval steps).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub metrics: BTreeMap<String, f64>,
}

/// Callbacks of [`train`].
pub trait HeadObserver {
    /// After each optimizer step.
    fn on_step(&mut self, _m: &HeadStep, _total: u64) {}
    /// After a checkpoint was loaded.
    fn on_resume(&mut self, _step: u64) {}
    /// Polled between micro-batches; `true` stops with [`Error::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
    /// Metrics of the eval set's predictions at `step` (one entry per unit, one row of
    /// `D` per sequence). Must depend only on the predictions and the step.
    fn evaluate(&mut self, _step: u64, _preds: &[Vec<Vec<f32>>]) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
}

impl HeadObserver for () {}

/// What [`train`] produced.
pub struct HeadReport {
    /// Steps done.
    pub steps: u64,
    /// Step the run resumed from (0: a fresh start).
    pub resumed_from: u64,
    /// Every step from 1, and the evaluation at step 0 first.
    pub history: Vec<HeadStep>,
    /// The kept metric's best value and its step.
    pub best: Option<(f64, u64)>,
    /// Adapter and head tensors of the kept step, by name.
    pub best_tensors: HashMap<String, Tensor>,
}

#[derive(Serialize, Deserialize)]
struct State {
    step: u64,
    rng: u64,
    history: Vec<HeadStep>,
    best: Option<(f64, u64)>,
    since_eval: (f64, u64),
}

/// Trains `head` (and `adapter`'s tensors, when given, which must be attached to
/// `model.decoder`) on `train_set`, evaluating on `eval_set`; resumes from
/// `checkpoints` when it holds a checkpoint.
pub fn train(
    model: &SeqModel,
    adapter: Option<&Adapter>,
    train_set: &[Unit],
    eval_set: &[Unit],
    s: &HeadTrainSettings,
    checkpoints: Option<&Path>,
    observer: &mut dyn HeadObserver,
) -> Result<HeadReport> {
    let outputs = model.head.config.outputs;
    check_units(s.objective, outputs, train_set)?;
    check_units(s.objective, outputs, eval_set)?;
    if train_set.is_empty() {
        return Err(Error::Invalid("the training set is empty".into()));
    }
    if s.batch_size == 0 || s.grad_accum == 0 {
        return Err(Error::Invalid(
            "batch_size and grad_accum must be at least 1".into(),
        ));
    }
    let mut vars: Vec<(String, Var)> = adapter.map(|a| a.vars.clone()).unwrap_or_default();
    vars.extend(model.head.vars.iter().cloned());
    let snapshot = crate::io::named_tensors;
    let restore = |vars: &[(String, Var)], t: &HashMap<String, Tensor>, src: &Path| {
        crate::io::restore_named(vars, t, src, "the checkpoint")
    };
    let mut opt = AdamW::new(vars.clone(), s.optimizer.clone())?;
    if let Some(h) = s.head_lr {
        if !(h > 0.0 && s.optimizer.lr > 0.0) {
            return Err(Error::Invalid(format!(
                "head_lr {h} and lr {} must both be positive",
                s.optimizer.lr
            )));
        }
        for (k, _) in &model.head.vars {
            opt.scale_lr(k, h / s.optimizer.lr);
        }
    }
    let mut st = State {
        step: 0,
        rng: Rng::new(s.seed).fork(0x4EAD).state(),
        history: Vec::new(),
        best: None,
        since_eval: (0.0, 0),
    };
    let mut best_tensors = snapshot(&vars)?;
    if let Some(dir) = checkpoints {
        if let Some((saved, path)) = latest(dir)? {
            st = saved;
            restore(
                &vars,
                &load_map(&path.join("trainable.safetensors"))?,
                &path,
            )?;
            opt.load_state(&load_map(&path.join("optimizer.safetensors"))?, &path)?;
            best_tensors = load_map(&path.join("best.safetensors"))?;
            tracing::info!(step = st.step, "resumed from checkpoint {}", path.display());
            observer.on_resume(st.step);
        }
    }
    let resumed_from = st.step;
    let eval_batch = (s.batch_size * 2).max(8);
    let evaluate = |step: u64,
                    observer: &mut dyn HeadObserver|
     -> Result<(Option<f64>, BTreeMap<String, f64>)> {
        if eval_set.is_empty() {
            return Ok((None, observer.evaluate(step, &[])));
        }
        let preds = model.predict_units(eval_set, eval_batch)?;
        let loss = preds
            .iter()
            .zip(eval_set)
            .map(|(p, u)| unit_loss(s.objective, p, u, s.center))
            .sum::<f64>()
            / eval_set.len() as f64;
        Ok((Some(loss), observer.evaluate(step, &preds)))
    };
    let pick = |loss: Option<f64>, metrics: &BTreeMap<String, f64>| -> Option<f64> {
        if s.keep_best.0 == "eval_loss" {
            loss
        } else {
            metrics.get(&s.keep_best.0).copied()
        }
    };
    if st.step == 0 {
        let (loss, metrics) = evaluate(0, observer)?;
        if let Some(v) = pick(loss, &metrics) {
            st.best = Some((v, 0));
        }
        st.history.push(HeadStep {
            step: 0,
            loss: None,
            lr: 0.0,
            grad_norm: 0.0,
            units_per_s: 0.0,
            train_loss: None,
            eval_loss: loss,
            metrics,
        });
    }
    let n = train_set.len();
    let per_step = s.batch_size * s.grad_accum;
    let names: HashMap<candle_core::TensorId, usize> = vars
        .iter()
        .enumerate()
        .map(|(i, (_, v))| (v.as_tensor().id(), i))
        .collect();
    let mut orders = (u64::MAX, Vec::new());
    while st.step < s.steps {
        let started = Instant::now();
        let first = st.step as usize * per_step;
        let picked: Vec<&Unit> = (first..first + per_step)
            .map(|k| {
                let epoch = (k / n) as u64;
                if orders.0 != epoch {
                    orders = (epoch, crate::trainer::order(s.seed, epoch, n));
                }
                &train_set[orders.1[k % n]]
            })
            .collect();
        let mut rng = Rng::new(st.rng);
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        let scale = 1.0 / picked.len() as f64;
        let var_refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        for micro in picked.chunks(s.batch_size) {
            if observer.cancelled() {
                return Err(Error::Cancelled);
            }
            let seqs: Vec<&[u32]> = micro
                .iter()
                .flat_map(|u| u.seqs.iter().map(Vec::as_slice))
                .collect();
            let (ids, keys) =
                batch_ids(&seqs, model.pad_id, model.padding, model.decoder.device())?;
            // The head's dropout draws from a fork of the step's generator, so that both
            // paths (and the recomputed layers) see the same masks.
            let mut head_rng = rng.fork(HEAD_FORK);
            let (value, g) = if s.gradient_checkpointing {
                let head_rng = std::cell::RefCell::new(&mut head_rng);
                let head = |h: &Tensor| -> Result<Tensor> {
                    let pooled = pool(h, &keys, model.head.config.pooling)?;
                    let mut r = head_rng.borrow_mut();
                    let sc = model.head.forward(&pooled, Some(&mut **r))?;
                    Ok((units_loss(s.objective, &sc, micro, s.center)? * scale)?)
                };
                model
                    .decoder
                    .checkpointed_grads(&ids, &keys, Some(&mut rng), &var_refs, &head)?
            } else {
                let h = model.decoder.hidden(&ids, &keys, None, Some(&mut rng))?;
                let pooled = pool(&h, &keys, model.head.config.pooling)?;
                let sc = model.head.forward(&pooled, Some(&mut head_rng))?;
                let loss = (units_loss(s.objective, &sc, micro, s.center)? * scale)?;
                let g = loss.backward()?;
                let grads = var_refs
                    .iter()
                    .map(|v| g.get(v.as_tensor()).cloned())
                    .collect();
                (loss, grads)
            };
            rng = rng.fork(HEAD_FORK);
            loss_sum += value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            for (v, t) in var_refs.iter().zip(g) {
                if let Some(t) = t {
                    let key = vars[names[&v.as_tensor().id()]].0.clone();
                    let acc = match grads.remove(&key) {
                        Some(a) => (a + t)?,
                        None => t,
                    };
                    grads.insert(key, acc);
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, s.max_grad_norm)?;
        let lr = lr_at(st.step, s.optimizer.lr, s.warmup_steps, s.steps, s.decay);
        opt.step(&grads, lr)?;
        st.step += 1;
        st.rng = rng.state();
        st.since_eval = (st.since_eval.0 + loss_sum, st.since_eval.1 + 1);
        let mut m = HeadStep {
            step: st.step,
            loss: Some(loss_sum),
            lr,
            grad_norm,
            units_per_s: picked.len() as f64 / started.elapsed().as_secs_f64().max(1e-9),
            train_loss: None,
            eval_loss: None,
            metrics: BTreeMap::new(),
        };
        if (s.eval_every > 0 && st.step.is_multiple_of(s.eval_every)) || st.step == s.steps {
            let (loss, metrics) = evaluate(st.step, observer)?;
            m.train_loss = Some(st.since_eval.0 / st.since_eval.1.max(1) as f64);
            st.since_eval = (0.0, 0);
            m.eval_loss = loss;
            if let Some(v) = pick(loss, &metrics) {
                if s.keep_best.1.better(v, st.best.map(|b| b.0)) {
                    st.best = Some((v, st.step));
                    best_tensors = snapshot(&vars)?;
                }
            }
            m.metrics = metrics;
        }
        observer.on_step(&m, s.steps);
        st.history.push(m);
        if let Some(dir) = checkpoints {
            if s.save_every > 0 && st.step.is_multiple_of(s.save_every) && st.step < s.steps {
                save_checkpoint(dir, &st, &snapshot(&vars)?, &opt, &best_tensors)?;
            }
        }
    }
    if st.best.is_none() {
        best_tensors = snapshot(&vars)?;
    }
    Ok(HeadReport {
        steps: st.step,
        resumed_from,
        history: st.history,
        best: st.best,
        best_tensors,
    })
}

fn save_checkpoint(
    dir: &Path,
    st: &State,
    trainable: &HashMap<String, Tensor>,
    opt: &AdamW,
    best: &HashMap<String, Tensor>,
) -> Result<()> {
    let moments = opt.state()?;
    crate::trainer::write_checkpoint(
        dir,
        st.step,
        st,
        &[
            ("trainable.safetensors", trainable),
            ("optimizer.safetensors", &moments),
            ("best.safetensors", best),
        ],
    )
}

/// What `head_config.json` records beside the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedHead {
    /// The head.
    pub head: HeadConfig,
    /// Its objective.
    pub objective: Objective,
    /// Names of the outputs (target fields), `D` of them.
    pub outputs: Vec<String>,
    /// Per-output `(mean, std)` the targets were standardised with: a prediction is
    /// `mean + std · output`. Empty when the targets were used as they are.
    #[serde(default)]
    pub standardize: Vec<(f64, f64)>,
    /// Padding id the model was trained with.
    pub pad_id: u32,
    /// The base model.
    pub base_model: String,
    /// Whether a LoRA adapter is part of the model.
    pub lora: bool,
}

/// Saves a trained sequence model into `dir`: with an adapter, PEFT's
/// sequence-classification layout (`adapter_config.json`, `adapter_model.safetensors`
/// with the linear head as `modules_to_save`); without one, the head alone
/// (`head.safetensors`). An MLP head always goes to `head.safetensors`.
/// `head_config.json` describes it. `tensors` are the trained values by name (a
/// [`HeadReport::best_tensors`]); the adapter and the head are set to them first, so
/// that they hold what was saved.
pub fn save(
    dir: &Path,
    adapter: Option<&Adapter>,
    head: &Head,
    tensors: &HashMap<String, Tensor>,
    meta: &SavedHead,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let head_tensors: HashMap<String, Tensor> = head
        .vars
        .iter()
        .map(|(k, _)| {
            tensors
                .get(k)
                .cloned()
                .map(|t| (k.clone(), t))
                .ok_or_else(|| Error::Invalid(format!("the trained tensors have no `{k}`")))
        })
        .collect::<Result<_>>()?;
    let in_peft = adapter.is_some() && head.config.kind == HeadKind::Linear;
    head.restore(tensors, Path::new("the trained tensors"))?;
    if let Some(a) = adapter {
        a.restore(tensors, Path::new("the trained tensors"))?;
        let (modules, extra) = if in_peft {
            (Some(vec!["score".to_string()]), head_tensors.clone())
        } else {
            (None, HashMap::new())
        };
        a.save_as(dir, &meta.base_model, "SEQ_CLS", modules, extra)?;
    }
    if !in_peft {
        save_safetensors(&dir.join("head.safetensors"), &head_tensors)?;
    }
    write_json(
        &dir.join("head_config.json"),
        &serde_json::to_value(meta).expect("head config serialises"),
    )
}

/// Reads `head_config.json` of a saved sequence model.
pub fn read_saved(dir: &Path) -> Result<SavedHead> {
    let path = dir.join("head_config.json");
    serde_json::from_value(read_json(&path)?)
        .map_err(|e| Error::format(&path, format!("not a head config: {e}")))
}

/// Loads a model saved by [`save`] onto `decoder` (attaching its adapter, if any):
/// the head, the adapter and what `head_config.json` says.
pub fn load(decoder: &mut Decoder, dir: &Path) -> Result<(Head, Option<Adapter>, SavedHead)> {
    let meta = read_saved(dir)?;
    if meta.head.hidden != decoder.config().hidden_size {
        return Err(Error::format(
            dir.join("head_config.json"),
            format!(
                "the head takes hidden size {}, the base model has {}",
                meta.head.hidden,
                decoder.config().hidden_size
            ),
        ));
    }
    let adapter = if meta.lora {
        Some(crate::lora::load(decoder, dir)?)
    } else {
        None
    };
    let head = Head::new(meta.head.clone(), &mut Rng::new(0), decoder.device())?;
    let path = if adapter.is_some() && meta.head.kind == HeadKind::Linear {
        dir.join("adapter_model.safetensors")
    } else {
        dir.join("head.safetensors")
    };
    head.restore(&load_map(&path)?, &path)?;
    Ok((head, adapter, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, Config};

    fn tiny(arch: Architecture) -> Decoder {
        let cfg = Config::tiny(arch, 64);
        let w = crate::weights::Weights::random(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
        Decoder::new(&cfg, w).unwrap()
    }

    fn last_of_alone(model: &Decoder, seq: &[u32]) -> Vec<f32> {
        let ids = Tensor::from_vec(seq.to_vec(), (1, seq.len()), &Device::Cpu).unwrap();
        let h = model
            .hidden(&ids, &KeyMask::full(1, seq.len()), None, None)
            .unwrap();
        h.get(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn last_pooling_finds_the_last_real_token_for_either_padding_and_pad_equal_to_eos() {
        let model = tiny(Architecture::Llama);
        let eos = 2u32;
        // The second sequence ends with the end token, which is also the pad id: an
        // id-based search would stop one token early (transformers #35352).
        let seqs: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8, 9, 10], vec![11, 12, eos], vec![13]];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        for side in [Padding::Right, Padding::Left] {
            let (ids, keys) = batch_ids(&refs, eos, side, &Device::Cpu).unwrap();
            let h = model.hidden(&ids, &keys, None, None).unwrap();
            let pooled = pool(&h, &keys, Pooling::Last)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (row, s) in seqs.iter().enumerate() {
                let want = last_of_alone(&model, s);
                let d = pooled[row]
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "{side:?} row {row}: differs by {d}");
            }
            // The token before the end is a different vector: the test can tell.
            let before = last_of_alone(&model, &seqs[1][..2]);
            let d = pooled[1]
                .iter()
                .zip(&before)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d > 1e-3,
                "{side:?}: the end token's state equals the one before"
            );
        }
    }

    #[test]
    fn mean_pooling_ignores_padding() {
        let model = tiny(Architecture::Qwen2);
        let seqs: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8], vec![9, 10]];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let mut got = Vec::new();
        for side in [Padding::Right, Padding::Left] {
            let (ids, keys) = batch_ids(&refs, 0, side, &Device::Cpu).unwrap();
            let h = model.hidden(&ids, &keys, None, None).unwrap();
            got.push(
                pool(&h, &keys, Pooling::Mean)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
        }
        let ids = Tensor::from_vec(vec![9u32, 10], (1, 2), &Device::Cpu).unwrap();
        let h = model
            .hidden(&ids, &KeyMask::full(1, 2), None, None)
            .unwrap();
        let alone: Vec<f32> = h.get(0).unwrap().mean(0).unwrap().to_vec1().unwrap();
        for g in &got {
            let d = g[1]
                .iter()
                .zip(&alone)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "mean of the short row differs by {d}");
        }
    }

    #[test]
    fn listwise_targets_share_ties_and_soften_with_a_temperature() {
        assert_eq!(
            listwise_targets(&[1.0, 3.0, 3.0, 0.0], None).unwrap(),
            vec![0.0, 0.5, 0.5, 0.0]
        );
        assert_eq!(
            listwise_targets(&[2.0, 2.0, 2.0], None).unwrap(),
            vec![1.0 / 3.0; 3]
        );
        let soft = listwise_targets(&[0.0, (2f64).ln()], Some(1.0)).unwrap();
        assert!((soft[0] - 1.0 / 3.0).abs() < 1e-6 && (soft[1] - 2.0 / 3.0).abs() < 1e-6);
        assert!(listwise_targets(&[1.0, f64::NAN], None).is_err());
        assert!(listwise_targets(&[1.0], Some(0.0)).is_err());
    }

    #[test]
    fn tensor_and_plain_losses_agree() {
        let mut rng = Rng::new(3);
        let mut r = || rng.normal() as f32;
        let mse = Unit {
            seqs: vec![vec![1]],
            target: vec![r(), r(), r()],
            margin: 0.0,
        };
        let list = Unit {
            seqs: vec![vec![1], vec![2], vec![3]],
            target: listwise_targets(&[0.0, 1.0, 1.0], None).unwrap(),
            margin: 0.0,
        };
        let pair = Unit {
            seqs: vec![vec![1], vec![2]],
            target: vec![],
            margin: 0.3,
        };
        for (obj, u, d) in [
            (Objective::Mse, &mse, 3),
            (Objective::Listwise, &list, 1),
            (Objective::Pairwise, &pair, 1),
        ] {
            let rows: Vec<Vec<f32>> = (0..u.seqs.len())
                .map(|_| (0..d).map(|_| r()).collect())
                .collect();
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (u.seqs.len(), d), &Device::Cpu).unwrap();
            let a = units_loss(obj, &t, &[u], 0.01)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let b = unit_loss(obj, &rows, u, 0.01);
            assert!((a - b).abs() < 1e-5, "{obj:?}: {a} vs {b}");
        }
    }

    #[test]
    fn bad_units_are_refused_with_their_number() {
        let u = Unit {
            seqs: vec![vec![1]],
            target: vec![f32::NAN, 1.0],
            margin: 0.0,
        };
        let e = check_units(Objective::Mse, 2, &[u])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unit 1") && e.contains("finite"), "{e}");
    }
}
