//! `reward_train`: a reward model = the base LM (frozen) + a scalar head on the
//! last token's hidden state, trained on judged pairs with the Bradley–Terry loss.
//!
//! The reward that ranks answers is the head's output minus anti-gaming penalties,
//! each weighted from the YAML (`penalties`), computed from the answer and its record:
//!
//! - `invalid_citation`: share of cited ids that are not evidence chunks (1 when the
//!   answer is not valid JSON);
//! - `over_citation`: citations beyond the support set (or one chunk when there is
//!   none), as a share of the evidence;
//! - `length`: words beyond `length_budget`, relative to the budget;
//! - `span`: 1 when the answer text appears in none of the cited chunks;
//! - `confidence`: |confidence − grounded|, where grounded is 1 when the answer appears
//!   in a cited support chunk.
//!
//! The loss is `−log σ(R_c − R_r − m)` on the penalised rewards (the penalties enter as
//! part of the margin, since they do not depend on the head). The stage holds out
//! `eval_fraction` of the pairs and builds an adversarial set from their chosen
//! answers (citing every chunk, padded to three times the length, confidence flipped),
//! which the penalised reward must rank below the original. Eval every `eval_every`
//! steps: pairwise accuracy, pooled ROC-AUC and mean margin on the held-out pairs, and
//! accuracy on the adversarial pairs; the head with the best ROC-AUC is saved as
//! `score.weight` (`[1, hidden]`, the name PEFT's `modules_to_save` gives a sequence-
//! classification head).
//!
//! Without `lora:` the base is frozen: its features are computed once and only the head
//! trains. With `lora:` the base is tuned too (pipe-train's sequence heads, pairwise
//! objective, the same penalised margins): every step runs the base, the adapter and the
//! head on the chosen and rejected texts, and the head is saved with the adapter in PEFT's
//! sequence-classification layout (`head/adapter_config.json`, `task_type: SEQ_CLS`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::metrics::agreement::normalize_answer;
use crate::metrics::ranking::roc_auc;
use crate::model::chat::Message;
use crate::params::{parse_params, ParamError};
use crate::task::factuality::check_answer;

/// Penalty weights.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Penalties {
    /// Weight of the invalid-citation share.
    #[serde(default)]
    pub invalid_citation: f64,
    /// Weight of over-citation.
    #[serde(default)]
    pub over_citation: f64,
    /// Weight of excess length.
    #[serde(default)]
    pub length: f64,
    /// Weight of the support-span mismatch.
    #[serde(default)]
    pub span: f64,
    /// Weight of the confidence mismatch.
    #[serde(default)]
    pub confidence: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RewardParams {
    /// Also write the step scalars as TensorBoard event files (output `tensorboard`).
    #[serde(default)]
    tensorboard: bool,
    model: String,
    /// Prompt template (as used to generate the candidates).
    template: String,
    #[serde(default)]
    penalties: Penalties,
    #[serde(default = "default_budget")]
    length_budget: usize,
    #[serde(default = "default_lr")]
    lr: f64,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default = "default_epochs")]
    epochs: usize,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default = "default_eval_every")]
    eval_every: u64,
    #[serde(default = "default_eval_fraction")]
    eval_fraction: f64,
    #[serde(default)]
    center: f64,
    #[serde(default)]
    use_judge_margin: bool,
    #[serde(default = "default_max_len")]
    max_len: usize,
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
    /// Tune the base with LoRA as well as the head.
    #[serde(default)]
    lora: Option<pipe_train::lora::LoraConfig>,
}

fn default_budget() -> usize {
    60
}
fn default_lr() -> f64 {
    1e-3
}
fn default_epochs() -> usize {
    3
}
fn default_batch() -> usize {
    16
}
fn default_eval_every() -> u64 {
    20
}
fn default_eval_fraction() -> f64 {
    0.2
}
fn default_max_len() -> usize {
    1024
}
fn auto() -> String {
    "auto".into()
}

/// What the penalties see of a record.
pub struct Grounding<'a> {
    /// Evidence chunks (`id`, `text`).
    pub evidence: Vec<(&'a str, &'a str)>,
    /// Supporting chunk ids.
    pub support: Vec<&'a str>,
}

impl<'a> Grounding<'a> {
    /// From a unified record (`evidence`, `support`).
    pub fn of(record: &'a Value) -> Grounding<'a> {
        Grounding {
            evidence: record["evidence"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| Some((c["id"].as_str()?, c["text"].as_str().unwrap_or(""))))
                        .collect()
                })
                .unwrap_or_default(),
            support: record["support"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default(),
        }
    }
}

/// The weighted penalty of an answer (higher is worse), and its parts.
pub fn penalty(
    text: &str,
    g: &Grounding,
    w: &Penalties,
    length_budget: usize,
) -> (f64, BTreeMap<&'static str, f64>) {
    let ids: Vec<String> = g.evidence.iter().map(|e| e.0.to_string()).collect();
    let mut parts = BTreeMap::new();
    let words = text.split_whitespace().count();
    let budget = length_budget.max(1) as f64;
    parts.insert("length", ((words as f64 - budget) / budget).max(0.0));
    match check_answer(text, &ids) {
        Err(_) => {
            parts.insert("invalid_citation", 1.0);
            parts.insert("over_citation", 0.0);
            parts.insert("span", 1.0);
            parts.insert("confidence", 1.0);
        }
        Ok(a) => {
            let n = a.citations.len().max(1) as f64;
            parts.insert("invalid_citation", a.unknown_citations.len() as f64 / n);
            let allowed = g.support.len().max(1);
            let extra = a.citations.len().saturating_sub(allowed) as f64;
            parts.insert("over_citation", extra / g.evidence.len().max(1) as f64);
            let norm = normalize_answer(&a.answer);
            let cited_text = |only_support: bool| {
                g.evidence.iter().any(|(id, t)| {
                    a.citations.iter().any(|c| c == id)
                        && (!only_support || g.support.contains(id))
                        && !norm.is_empty()
                        && normalize_answer(t).contains(&norm)
                })
            };
            if a.refusal {
                parts.insert("span", 0.0);
                let grounded = if g.support.is_empty() { 1.0 } else { 0.0 };
                parts.insert("confidence", (a.confidence - grounded).abs());
            } else {
                parts.insert("span", if cited_text(false) { 0.0 } else { 1.0 });
                let grounded = if cited_text(true) { 1.0 } else { 0.0 };
                parts.insert("confidence", (a.confidence - grounded).abs());
            }
        }
    }
    let total = w.invalid_citation * parts["invalid_citation"]
        + w.over_citation * parts["over_citation"]
        + w.length * parts["length"]
        + w.span * parts["span"]
        + w.confidence * parts["confidence"];
    (total, parts)
}

/// Gamed versions of a valid JSON answer: (name, text).
pub fn gamed_variants(text: &str, g: &Grounding) -> Vec<(&'static str, String)> {
    let Some(obj) = crate::prompt::first_object(text) else {
        return vec![];
    };
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(obj) else {
        return vec![];
    };
    let mut out = Vec::new();
    let mut all = o.clone();
    all.insert(
        "citations".into(),
        json!(g.evidence.iter().map(|e| e.0).collect::<Vec<_>>()),
    );
    out.push(("cite_everything", Value::Object(all).to_string()));
    let mut padded = o.clone();
    if let Some(a) = o.get("answer").and_then(Value::as_str) {
        let filler =
            " As is widely known and can be verified from many sources, this is the answer."
                .repeat(6);
        padded.insert("answer".into(), json!(format!("{a}.{filler}")));
        out.push(("padded", Value::Object(padded).to_string()));
    }
    if let Some(c) = o.get("confidence").and_then(Value::as_f64) {
        let mut flipped = o.clone();
        flipped.insert("confidence".into(), json!(1.0 - c));
        out.push(("confidence_flipped", Value::Object(flipped).to_string()));
    }
    out
}

/// Held-out metrics from penalised rewards `r(k)`: pairwise accuracy, pooled ROC-AUC,
/// mean margin and the adversarial accuracy.
fn ranking_metrics(
    reward: &dyn Fn(usize) -> f64,
    eval_pairs: &[(usize, usize)],
    adversarial: &[(usize, usize)],
) -> BTreeMap<&'static str, f64> {
    let (mut right, mut margin, mut scores, mut labels) = (0usize, 0.0, Vec::new(), Vec::new());
    for &(c, r) in eval_pairs {
        let (rc, rr) = (reward(c), reward(r));
        if rc > rr {
            right += 1;
        }
        margin += rc - rr;
        scores.extend([rc, rr]);
        labels.extend([true, false]);
    }
    let adv_right = adversarial
        .iter()
        .filter(|(orig, gamed)| reward(*orig) > reward(*gamed))
        .count();
    let mut m = BTreeMap::new();
    let n = eval_pairs.len().max(1) as f64;
    m.insert("eval_accuracy", right as f64 / n);
    m.insert("eval_roc_auc", roc_auc(&scores, &labels).unwrap_or(0.5));
    m.insert("eval_mean_margin", margin / n);
    if !adversarial.is_empty() {
        m.insert(
            "adversarial_accuracy",
            adv_right as f64 / adversarial.len() as f64,
        );
    }
    m
}

/// `reward_train` with `lora:`: base + adapter + scalar head trained together on the
/// pairs (pairwise objective, penalised margins), kept by held-out ROC-AUC.
#[allow(clippy::too_many_arguments)]
fn train_with_lora(
    ctx: &StageContext,
    p: &RewardParams,
    cfg: &pipe_train::lora::LoraConfig,
    loaded: &mut pipe_train::loader::Loaded,
    seqs: &[Vec<u32>],
    pens: &[f64],
    pair_ix: &[(usize, usize)],
    train_idx: &[usize],
    eval_idx: &[usize],
    adversarial: &[(usize, usize)],
    judge_margin: &dyn Fn(usize) -> f64,
) -> Result<Outcome, StageError> {
    use pipe_train::heads::{self, Head, HeadConfig, HeadKind, Objective, Padding, Pooling, Unit};
    let adapter = pipe_train::lora::attach(
        &mut loaded.model,
        cfg,
        &mut pipe_train::Rng::new(p.seed).fork(0x10A),
    )
    .map_err(crate::model::failed("attaching LoRA"))?;
    let head = Head::new(
        HeadConfig {
            pooling: Pooling::Last,
            kind: HeadKind::Linear,
            hidden: loaded.config.hidden_size,
            outputs: 1,
            dropout: 0.0,
            out_bias: false,
        },
        &mut pipe_train::Rng::new(p.seed).fork(0x4EAD),
        loaded.model.device(),
    )
    .map_err(crate::model::failed("creating the head"))?;
    let unit = |c: usize, r: usize, margin: f64| Unit {
        seqs: vec![seqs[c].clone(), seqs[r].clone()],
        target: vec![],
        margin: margin as f32,
    };
    let train: Vec<Unit> = train_idx
        .iter()
        .map(|&i| {
            let (c, r) = pair_ix[i];
            unit(c, r, judge_margin(i) + pens[c] - pens[r])
        })
        .collect();
    // Scored at every evaluation: the held-out pairs, then the adversarial pairs.
    let eval_pairs: Vec<(usize, usize)> = eval_idx.iter().map(|&i| pair_ix[i]).collect();
    let eval: Vec<Unit> = eval_pairs
        .iter()
        .chain(adversarial)
        .map(|&(c, r)| unit(c, r, pens[c] - pens[r]))
        .collect();
    let pad_id = loaded.pad_id();
    struct Obs<'a> {
        ctx: &'a StageContext,
        pens: &'a [f64],
        eval_pairs: &'a [(usize, usize)],
        adversarial: &'a [(usize, usize)],
        history: String,
    }
    impl heads::HeadObserver for Obs<'_> {
        fn on_step(&mut self, m: &heads::HeadStep, total: u64) {
            self.ctx.progress(
                m.step,
                Some(total),
                &format!("loss {:.4}", m.loss.unwrap_or(f64::NAN)),
            );
        }
        fn cancelled(&self) -> bool {
            self.ctx.cancel.is_cancelled()
        }
        fn evaluate(&mut self, step: u64, preds: &[Vec<Vec<f32>>]) -> BTreeMap<String, f64> {
            // Text index → head score, from the units' order (pairs, then adversarial).
            let mut score: std::collections::HashMap<usize, f64> = Default::default();
            for (u, &(c, r)) in preds
                .iter()
                .zip(self.eval_pairs.iter().chain(self.adversarial))
            {
                score.insert(c, u[0][0] as f64);
                score.insert(r, u[1][0] as f64);
            }
            let reward = |k: usize| score[&k] - self.pens[k];
            let m = ranking_metrics(&reward, self.eval_pairs, self.adversarial);
            self.history
                .push_str(&(json!({"step": step, "eval": m}).to_string() + "\n"));
            let names: Vec<String> = m.keys().map(|k| format!("eval.{k}")).collect();
            let values: Vec<(&str, f64)> = names
                .iter()
                .map(String::as_str)
                .zip(m.values().copied())
                .collect();
            self.ctx.scalars(step, &values);
            m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        }
    }
    let steps = pipe_train::trainer::TrainSettings::steps_for_epochs(
        p.epochs as f64,
        train.len(),
        p.batch_size,
        1,
    );
    let settings = heads::HeadTrainSettings {
        objective: Objective::Pairwise,
        center: p.center,
        optimizer: pipe_train::optim::AdamWConfig {
            lr: p.lr,
            weight_decay: p.weight_decay,
            ..Default::default()
        },
        head_lr: None,
        warmup_steps: (steps / 10).max(1),
        decay: pipe_train::optim::Decay::Constant,
        batch_size: p.batch_size,
        grad_accum: 1,
        steps,
        max_grad_norm: Some(1.0),
        eval_every: p.eval_every,
        save_every: p.eval_every,
        seed: p.seed,
        gradient_checkpointing: false,
        keep_best: ("eval_roc_auc".into(), pipe_train::trainer::Goal::Max),
    };
    let model = heads::SeqModel {
        decoder: &loaded.model,
        head: &head,
        pad_id,
        padding: Padding::Right,
    };
    let mut obs = Obs {
        ctx,
        pens,
        eval_pairs: &eval_pairs,
        adversarial,
        history: String::new(),
    };
    let report = heads::train(
        &model,
        Some(&adapter),
        &train,
        &eval,
        &settings,
        Some(&ctx.checkpoint_dir),
        &mut obs,
    )
    .map_err(crate::model::failed("training the reward model"))?;
    let dir = ctx.out_dir.join("head");
    let meta = heads::SavedHead {
        head: head.config.clone(),
        objective: Objective::Pairwise,
        outputs: vec!["reward".into()],
        standardize: vec![],
        pad_id,
        base_model: p.model.clone(),
        lora: true,
    };
    heads::save(&dir, Some(&adapter), &head, &report.best_tensors, &meta)
        .map_err(crate::model::failed("saving the reward model"))?;
    crate::fsio::write_json_atomic(
        &dir.join("reward_config.json"),
        &json!({
            "base_model_name_or_path": p.model,
            "base_model_identity": loaded.identity,
            "head": "LoRA + score.weight [1, hidden] on the last token (PEFT SEQ_CLS)",
            "penalties": p.penalties,
            "length_budget": p.length_budget,
            "template": p.template,
        }),
    )
    .map_err(StageError::io("writing reward_config.json"))?;
    let mut lines = String::new();
    for h in &report.history {
        if let Some(l) = h.loss {
            lines.push_str(&json!({"step": h.step, "loss": l}).to_string());
            lines.push('\n');
            ctx.scalars(h.step, &[("loss", l)]);
        }
    }
    lines.push_str(&obs.history);
    crate::fsio::write_atomic(&ctx.out_dir.join("metrics.jsonl"), lines.as_bytes())
        .map_err(StageError::io("writing metrics.jsonl"))?;
    if p.tensorboard {
        crate::scalars::write_tfevents(
            &ctx.out_dir.join("tensorboard"),
            &crate::scalars::from_jsonl(&lines),
        )
        .map_err(StageError::io("writing the TensorBoard event file"))?;
    }
    let kept_step = report.best.map(|b| b.1).unwrap_or(report.steps);
    let kept = report
        .history
        .iter()
        .find(|h| h.step == kept_step && !h.metrics.is_empty());
    let figures = ctx.out_dir.join("figures");
    std::fs::create_dir_all(&figures).map_err(StageError::io("creating figures/"))?;
    let loss_pts: Vec<(f64, f64)> = report
        .history
        .iter()
        .filter_map(|h| Some((h.step as f64, h.loss?)))
        .collect();
    crate::figure::Figure::Lines {
        title: "Reward model (LoRA + head) training loss".into(),
        x: "optimizer step".into(),
        y: "pairwise logistic loss".into(),
        series: vec![("train loss".into(), loss_pts)],
    }
    .save(&figures.join("loss_curve.png"))
    .map_err(StageError::io("writing figures/loss_curve.png"))?;
    let mut metrics = BTreeMap::new();
    metrics.insert("train_pairs".into(), json!(train.len()));
    metrics.insert("eval_pairs".into(), json!(eval_pairs.len()));
    metrics.insert("adversarial_pairs".into(), json!(adversarial.len()));
    metrics.insert("lora".into(), json!(true));
    metrics.insert("kept_step".into(), json!(kept_step));
    if let Some(l) = report.history.last().and_then(|h| h.loss) {
        metrics.insert("final_loss".into(), json!(l));
    }
    if let Some(k) = kept {
        for (name, v) in &k.metrics {
            metrics.insert(name.clone(), json!(v));
        }
    }
    Ok(Outcome {
        metrics,
        ..Outcome::default()
    })
}

/// The reward model trainer.
pub struct RewardTrainStage;

impl Stage for RewardTrainStage {
    fn kind(&self) -> &'static str {
        "reward_train"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "reward model: frozen (or LoRA-tuned) base + scalar head, Bradley-Terry on judged pairs with anti-gaming penalties; ROC-AUC and adversarial eval"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: RewardParams = parse_params(params)?;
        crate::model::check_quantize(&p.model, p.quantize)?;
        if !(0.0..1.0).contains(&p.eval_fraction) {
            return Err(ParamError::new(
                &["eval_fraction"],
                "expected a number in [0, 1)",
            ));
        }
        if p.epochs == 0 || p.batch_size == 0 {
            return Err(ParamError::new(
                &["epochs"],
                "epochs and batch_size must be at least 1",
            ));
        }
        let deps = crate::model::template_and_model_deps(&p.template, &p.model)?;
        Ok(Signature {
            inputs: vec![InputDecl::required("pairs")],
            deps,
            outputs: [
                OutputDecl::staged("head", "head"),
                OutputDecl::staged("metrics", "metrics.jsonl"),
                OutputDecl::staged("figures", "figures"),
            ]
            .into_iter()
            .chain(
                p.tensorboard
                    .then(|| OutputDecl::staged("tensorboard", "tensorboard")),
            )
            .collect(),
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        crate::model::key_without(params, &["device", "dtype"])
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: RewardParams = parse_params(&ctx.params)?;
        let template = crate::prompt::read_template(ctx, &p.template)?;
        let rows = crate::records::read_jsonl(ctx.input("pairs")?)?;
        if rows.len() < 2 {
            return Err(StageError::Failed(format!(
                "{} pairs: a reward model needs at least 2 (lower prefs_judge's min_margin?)",
                rows.len()
            )));
        }
        let loaded = crate::model::load_model(
            ctx,
            &p.model,
            &p.device,
            &p.dtype,
            p.quantize,
            p.double_quant,
        )?;
        let mut order: Vec<usize> = (0..rows.len()).collect();
        pipe_train::Rng::new(p.seed).shuffle(&mut order);
        let n_eval =
            ((rows.len() as f64 * p.eval_fraction).round() as usize).clamp(1, rows.len() - 1);
        let (eval_idx, train_idx) = order.split_at(n_eval);
        // Texts to featurise: (row, answer text).
        let mut texts: Vec<(usize, String)> = Vec::new();
        let mut push = |row: usize, t: &str| {
            texts.push((row, t.to_string()));
            texts.len() - 1
        };
        let mut pair_ix = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let c = r["chosen"].as_str().unwrap_or_default();
            let rj = r["rejected"].as_str().unwrap_or_default();
            pair_ix.push((push(i, c), push(i, rj)));
        }
        let mut adversarial = Vec::new();
        for &i in eval_idx {
            let g = Grounding::of(&rows[i]["record"]);
            for (name, t) in gamed_variants(rows[i]["chosen"].as_str().unwrap_or_default(), &g) {
                adversarial.push((name, pair_ix[i].0, push(i, &t)));
            }
        }
        ctx.progress(0, Some(texts.len() as u64), "featurising");
        let mut seqs = Vec::with_capacity(texts.len());
        for (row, t) in &texts {
            let prompt = crate::prompt::render_template(&template, &rows[*row]["record"])
                .map_err(|e| StageError::Failed(format!("pairs row {}: {e}", row + 1)))?;
            let msgs = [
                Message {
                    role: "user".into(),
                    content: prompt,
                },
                Message {
                    role: "assistant".into(),
                    content: t.clone(),
                },
            ];
            let text = loaded
                .tokenizer
                .apply_chat_template(&msgs, false)
                .map_err(crate::model::failed("chat template"))?;
            let mut ids = loaded
                .tokenizer
                .encode(&text)
                .map_err(crate::model::failed("tokenizing"))?;
            if ids.len() > p.max_len {
                ids.drain(..ids.len() - p.max_len);
            }
            seqs.push(ids);
        }
        let pens: Vec<f64> = texts
            .iter()
            .map(|(row, t)| {
                penalty(
                    t,
                    &Grounding::of(&rows[*row]["record"]),
                    &p.penalties,
                    p.length_budget,
                )
                .0
            })
            .collect();
        let judge_margin = |i: usize| {
            if p.use_judge_margin {
                rows[i]["margin"].as_f64().unwrap_or(0.0)
            } else {
                0.0
            }
        };
        if let Some(cfg) = &p.lora {
            let mut loaded = loaded;
            let adv: Vec<(usize, usize)> = adversarial.iter().map(|(_, o, g)| (*o, *g)).collect();
            return train_with_lora(
                ctx,
                &p,
                cfg,
                &mut loaded,
                &seqs,
                &pens,
                &pair_ix,
                train_idx,
                eval_idx,
                &adv,
                &|i| judge_margin(i),
            );
        }
        let feats = pipe_train::reward::last_hidden(&loaded.model, &seqs, 8)
            .map_err(crate::model::failed("featurising"))?;
        let train: Vec<pipe_train::reward::FeaturePair> = train_idx
            .iter()
            .map(|&i| {
                let (c, r) = pair_ix[i];
                pipe_train::reward::FeaturePair {
                    chosen: feats[c].clone(),
                    rejected: feats[r].clone(),
                    margin: (judge_margin(i) + pens[c] - pens[r]) as f32,
                }
            })
            .collect();
        let reward = |w: &[f32], k: usize| {
            feats[k]
                .iter()
                .zip(w)
                .map(|(a, b)| (a * b) as f64)
                .sum::<f64>()
                - pens[k]
        };
        let mut history = String::new();
        let mut last_eval = BTreeMap::new();
        let eval_pairs: Vec<(usize, usize)> = eval_idx.iter().map(|&i| pair_ix[i]).collect();
        let adv_pairs: Vec<(usize, usize)> = adversarial.iter().map(|(_, o, g)| (*o, *g)).collect();
        let evaluate = |w: &[f32]| ranking_metrics(&|k| reward(w, k), &eval_pairs, &adv_pairs);
        let settings = pipe_train::reward::HeadSettings {
            lr: p.lr,
            weight_decay: p.weight_decay,
            epochs: p.epochs,
            batch_size: p.batch_size,
            eval_every: p.eval_every,
            center: p.center,
            seed: p.seed,
        };
        let (head, losses) = pipe_train::reward::train_head(&train, &settings, |step, w| {
            let m = evaluate(w);
            history.push_str(&json!({"step": step, "eval": m}).to_string());
            history.push('\n');
            let names: Vec<String> = m.keys().map(|k| format!("eval.{k}")).collect();
            let values: Vec<(&str, f64)> = names
                .iter()
                .map(String::as_str)
                .zip(m.values().copied())
                .collect();
            ctx.scalars(step, &values);
            ctx.progress(
                step,
                None,
                &format!("step {step}: eval ROC-AUC {:.3}", m["eval_roc_auc"]),
            );
            let auc = m["eval_roc_auc"];
            last_eval = m;
            auc
        })
        .map_err(crate::model::failed("training the head"))?;
        let best = evaluate(&head);
        let figures = ctx.out_dir.join("figures");
        std::fs::create_dir_all(&figures).map_err(StageError::io("creating figures/"))?;
        let margins: Vec<f64> = eval_idx
            .iter()
            .map(|&i| {
                let (c, r) = pair_ix[i];
                reward(&head, c) - reward(&head, r)
            })
            .collect();
        crate::figure::Figure::Histogram {
            title: format!(
                "Held-out reward margins ({} pairs; > 0 ranks the chosen answer first)",
                margins.len()
            ),
            x: "r(chosen) − r(rejected)".into(),
            series: vec![("held-out pairs".into(), margins)],
            bins: 20,
        }
        .save(&figures.join("margins.png"))
        .map_err(StageError::io("writing figures/margins.png"))?;
        let loss_pts: Vec<(f64, f64)> = losses.iter().map(|(s, l)| (*s as f64, *l)).collect();
        crate::figure::Figure::Lines {
            title: "Reward head training loss".into(),
            x: "optimizer step".into(),
            y: "pairwise logistic loss".into(),
            series: vec![("train loss".into(), loss_pts)],
        }
        .save(&figures.join("loss_curve.png"))
        .map_err(StageError::io("writing figures/loss_curve.png"))?;
        let mut lines = String::new();
        for (step, loss) in &losses {
            lines.push_str(&json!({"step": step, "loss": loss}).to_string());
            lines.push('\n');
            // The head's loop reports its losses at the end, not per step.
            ctx.scalars(*step, &[("loss", *loss)]);
        }
        lines.push_str(&history);
        crate::fsio::write_atomic(&ctx.out_dir.join("metrics.jsonl"), lines.as_bytes())
            .map_err(StageError::io("writing metrics.jsonl"))?;
        if p.tensorboard {
            crate::scalars::write_tfevents(
                &ctx.out_dir.join("tensorboard"),
                &crate::scalars::from_jsonl(&lines),
            )
            .map_err(StageError::io("writing the TensorBoard event file"))?;
        }
        let dir = ctx.out_dir.join("head");
        std::fs::create_dir_all(&dir).map_err(StageError::io("creating the head dir"))?;
        let hidden = head.len();
        let w = candle_core::Tensor::from_vec(head, (1, hidden), &candle_core::Device::Cpu)
            .map_err(|e| StageError::Failed(e.to_string()))?;
        candle_core::safetensors::save(
            &[("score.weight".to_string(), w)].into_iter().collect(),
            dir.join("score.safetensors"),
        )
        .map_err(|e| StageError::Failed(format!("saving score.safetensors: {e}")))?;
        let config = json!({
            "base_model_name_or_path": p.model,
            "base_model_identity": loaded.identity,
            "head": "score.weight [1, hidden] on the last token's final hidden state",
            "penalties": p.penalties,
            "length_budget": p.length_budget,
            "template": p.template,
        });
        crate::fsio::write_json_atomic(&dir.join("reward_config.json"), &config)
            .map_err(StageError::io("writing reward_config.json"))?;
        let mut metrics = BTreeMap::new();
        metrics.insert("train_pairs".into(), json!(train.len()));
        metrics.insert("eval_pairs".into(), json!(eval_idx.len()));
        metrics.insert("adversarial_pairs".into(), json!(adversarial.len()));
        if let Some((_, l)) = losses.last() {
            metrics.insert("final_loss".into(), json!(l));
        }
        for (k, v) in best {
            metrics.insert(k.to_string(), json!(v));
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Value {
        json!({
            "evidence": [
                {"id": "c1", "text": "The Vistula flows through Kraków."},
                {"id": "c2", "text": "Gdańsk is a port."},
                {"id": "c3", "text": "The Oder is a river."},
            ],
            "support": ["c1"],
        })
    }

    fn weights() -> Penalties {
        Penalties {
            invalid_citation: 0.2,
            over_citation: 0.15,
            length: 0.05,
            span: 0.25,
            confidence: 0.1,
        }
    }

    #[test]
    fn each_penalty_lowers_the_reward_of_the_gamed_answer() {
        let r = record();
        let g = Grounding::of(&r);
        let good = r#"{"answer": "Vistula", "citations": ["c1"], "confidence": 0.9}"#;
        let (base, parts) = penalty(good, &g, &weights(), 20);
        assert!(parts.values().all(|v| *v <= 0.1 + 1e-12), "{parts:?}");
        let gamed = [
            (
                "invalid_citation",
                r#"{"answer": "Vistula", "citations": ["c1", "c77"], "confidence": 0.9}"#
                    .to_string(),
            ),
            (
                "over_citation",
                r#"{"answer": "Vistula", "citations": ["c1", "c2", "c3"], "confidence": 0.9}"#
                    .to_string(),
            ),
            (
                "length",
                format!(
                    r#"{{"answer": "Vistula{}", "citations": ["c1"], "confidence": 0.9}}"#,
                    " indeed".repeat(40)
                ),
            ),
            (
                "span",
                r#"{"answer": "Danube", "citations": ["c1"], "confidence": 0.9}"#.to_string(),
            ),
            (
                "confidence",
                r#"{"answer": "Vistula", "citations": ["c1"], "confidence": 0.1}"#.to_string(),
            ),
        ];
        for (name, text) in gamed {
            let (p, parts) = penalty(&text, &g, &weights(), 20);
            assert!(p > base, "{name}: {p} vs {base} ({parts:?})");
            // With only this penalty weighted, it alone makes the difference.
            let mut only = Penalties::default();
            match name {
                "invalid_citation" => only.invalid_citation = 1.0,
                "over_citation" => only.over_citation = 1.0,
                "length" => only.length = 1.0,
                "span" => only.span = 1.0,
                _ => only.confidence = 1.0,
            }
            assert!(
                penalty(&text, &g, &only, 20).0 > penalty(good, &g, &only, 20).0,
                "{name}"
            );
        }
        // Unparsable output is penalised as invalid and ungrounded.
        assert!(penalty("Vistula!", &g, &weights(), 20).0 > base);
    }

    #[test]
    fn adversarial_variants_are_penalised() {
        let r = record();
        let g = Grounding::of(&r);
        let good = r#"{"answer": "Vistula", "citations": ["c1"], "confidence": 0.9}"#;
        let v = gamed_variants(good, &g);
        assert_eq!(
            v.iter().map(|x| x.0).collect::<Vec<_>>(),
            ["cite_everything", "padded", "confidence_flipped"]
        );
        let base = penalty(good, &g, &weights(), 20).0;
        for (name, t) in v {
            assert!(penalty(&t, &g, &weights(), 20).0 > base, "{name}");
        }
    }
}
