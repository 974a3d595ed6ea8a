//! Task evaluation inside `sft`: every `eval_every` steps (and before the first),
//! the model as it is generates replies to the validation prompts with stated
//! decoding and seed, each named task parses and scores them, and the scores go
//! into `metrics.jsonl`, the stage metrics and `keep_best`.
//!
//! Decoding is the same at every evaluation: item `k` samples with
//! `Rng::new(seed).fork(k)`, so two evaluations differ only by the model, and a
//! resumed run's evaluations equal the uninterrupted run's.

use std::collections::BTreeMap;

use pipe_train::data::Record;
use pipe_train::generate::{generate, Sampling};
use pipe_train::model::Decoder;
use pipe_train::tokenizer::{Message, TextTokenizer};
use pipe_train::trainer::TaskScores;
use pipe_train::Rng;
use serde::Deserialize;
use serde_json::json;

use crate::metrics::calibration::{calibration_error, debiased_l2_ece_equal_mass};
use crate::metrics::ranking::{roc_auc, routing_curve};
use crate::task::{confidence, dot};

/// A task evaluator by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Graphviz DOT replies: `validity` (share of replies holding a graph Graphviz
    /// accepts), `node_f1`, `edge_f1` (means over items whose reference parses; an
    /// invalid reply scores 0).
    Dot,
    /// Confidence tokens (BoolQ/MedQA, [`crate::task::confidence`]): each validation
    /// record carries `dataset` (`boolq` | `medqa`), the gold `answer` (a bool, or the
    /// option letter) and for MedQA its `options`. The expected token is C iff the
    /// reply's answer is right; `accuracy` is the share whose token is the expected one
    /// (no token: wrong); `p_confident` is the softmax over the (C, U) logits where the
    /// token is (or, without one, after the reply). Metrics: `accuracy`,
    /// `calibration_error` (β-sample bins, `calib_beta`, `calib_p_norm`),
    /// `debiased_calibration_error`, `auroc` (p_confident for a right answer),
    /// `routing_auc`, `answer_accuracy`, `token_rate`, and `<dataset>_accuracy` /
    /// `<dataset>_calibration_error` per dataset; with both datasets the unprefixed
    /// accuracy and calibration error are the mean of the two.
    Confidence,
}

impl TaskKind {
    /// The metrics this task reports (per-dataset ones aside).
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            TaskKind::Dot => &["validity", "node_f1", "edge_f1"],
            TaskKind::Confidence => &[
                "accuracy",
                "calibration_error",
                "debiased_calibration_error",
                "auroc",
                "routing_auc",
                "answer_accuracy",
                "token_rate",
            ],
        }
    }
}

/// Settings of the `confidence` task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfidenceSettings {
    /// Samples per calibration bin.
    #[serde(default = "default_beta")]
    pub calib_beta: usize,
    /// `1`, `2` or `infty`.
    #[serde(default = "default_p")]
    pub calib_p_norm: crate::metrics::calibration::PNorm,
    /// Hendrycks' `calib_err` (drops the last bin; see
    /// [`crate::metrics::calibration::calibration_error`]).
    #[serde(default)]
    pub hendrycks_compat: bool,
}

fn default_beta() -> usize {
    100
}
fn default_p() -> crate::metrics::calibration::PNorm {
    crate::metrics::calibration::PNorm::Two
}

impl Default for ConfidenceSettings {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every field has a default")
    }
}

/// How the evaluation decodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDecoding {
    /// Tokens per reply at most.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus mass when sampling.
    #[serde(default = "one")]
    pub top_p: f64,
    /// A reply ends at one of these.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Seed of item `k`'s sampling: `fork(k)` of it.
    #[serde(default)]
    pub seed: u64,
    /// Evaluate on the first N validation records only (0: all).
    #[serde(default)]
    pub limit: usize,
    /// Prompts per generation batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_max_new() -> usize {
    256
}
fn one() -> f64 {
    1.0
}
fn default_batch() -> usize {
    8
}

impl Default for EvalDecoding {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every field has a default")
    }
}

impl EvalDecoding {
    fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.clone(),
            logprobs: None,
        }
    }
}

/// One validation item: the prompt's ids and the reference reply.
struct Item {
    prompt: String,
    ids: Vec<u32>,
    reference: String,
}

/// A confidence item's gold: the dataset, and the right answer.
struct Gold {
    dataset: confidence::Dataset,
    /// BoolQ: yes (true) / no.
    yes: Option<bool>,
    /// MedQA: the letter, and the options.
    letter: Option<String>,
    options: Vec<(String, String)>,
}

/// Reads a confidence item's gold from its record; the error says which field.
fn gold_of(v: &serde_json::Value) -> Result<Gold, String> {
    let dataset: confidence::Dataset =
        serde_json::from_value(v.get("dataset").cloned().unwrap_or(serde_json::Value::Null))
            .map_err(|_| "expected `dataset`: \"boolq\" or \"medqa\"".to_string())?;
    match dataset {
        confidence::Dataset::Boolq => {
            let yes = v
                .get("answer")
                .and_then(serde_json::Value::as_bool)
                .ok_or("expected a boolean `answer` (BoolQ)")?;
            Ok(Gold {
                dataset,
                yes: Some(yes),
                letter: None,
                options: Vec::new(),
            })
        }
        confidence::Dataset::Medqa => {
            let options: Vec<(String, String)> = v
                .get("options")
                .and_then(serde_json::Value::as_object)
                .ok_or("expected `options`: an object of letter → option text (MedQA)")?
                .iter()
                .map(|(k, t)| (k.clone(), t.as_str().unwrap_or_default().to_string()))
                .collect();
            let letter = v
                .get("answer_idx")
                .or_else(|| v.get("answer"))
                .and_then(serde_json::Value::as_str)
                .ok_or("expected the gold letter in `answer_idx` (MedQA)")?
                .to_string();
            if !options.iter().any(|(l, _)| *l == letter) {
                return Err(format!(
                    "the gold letter `{letter}` is not among the options"
                ));
            }
            Ok(Gold {
                dataset,
                yes: None,
                letter: Some(letter),
                options,
            })
        }
    }
}

/// Runs the named tasks on the validation records.
pub struct TaskEvaluator<'a> {
    tokenizer: &'a TextTokenizer,
    tasks: Vec<TaskKind>,
    decoding: EvalDecoding,
    samples: usize,
    eos: Vec<u32>,
    items: Vec<Item>,
    confidence: ConfidenceSettings,
    /// Per item, for the confidence task.
    golds: Vec<Gold>,
}

impl<'a> TaskEvaluator<'a> {
    /// Prompts rendered as training renders them (the chat template with the
    /// generation prompt when `chat`), references from the records' responses.
    /// `raw` are the records as read (task fields), one per entry of `records`, with
    /// where each came from for errors.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tokenizer: &'a TextTokenizer,
        chat: bool,
        records: &[Record],
        raw: &[(String, serde_json::Value)],
        tasks: Vec<TaskKind>,
        decoding: EvalDecoding,
        samples: usize,
        eos: Vec<u32>,
        confidence: ConfidenceSettings,
    ) -> pipe_train::Result<Self> {
        let take = if decoding.limit == 0 {
            records.len()
        } else {
            decoding.limit.min(records.len())
        };
        let mut items = Vec::with_capacity(take);
        let mut golds = Vec::new();
        if tasks.contains(&TaskKind::Confidence) {
            for (at, v) in &raw[..take] {
                golds.push(gold_of(v).map_err(|e| {
                    pipe_train::Error::Invalid(format!("{at}: confidence task: {e}"))
                })?);
            }
            for t in confidence::TOKENS {
                if tokenizer.token_id(t).is_none() {
                    return Err(pipe_train::Error::Invalid(format!(
                        "the confidence task needs the token `{t}`: add it with new_special_tokens"
                    )));
                }
            }
        }
        if confidence.hendrycks_compat && !golds.is_empty() && golds.len() < confidence.calib_beta {
            return Err(pipe_train::Error::Invalid(format!(
                "confidence.hendrycks_compat: {} validation items are fewer than calib_beta {} (Hendrycks' calib_err fails there)",
                golds.len(),
                confidence.calib_beta
            )));
        }
        if confidence.calib_beta == 0 {
            return Err(pipe_train::Error::Invalid(
                "confidence.calib_beta must be at least 1".into(),
            ));
        }
        for r in &records[..take] {
            let (msgs, reference) = match r {
                Record::Pair { prompt, response } => (
                    vec![Message {
                        role: "user".into(),
                        content: prompt.clone(),
                    }],
                    response.clone(),
                ),
                Record::Chat { messages } => {
                    let last = messages.len().saturating_sub(1);
                    (
                        messages[..last].to_vec(),
                        messages
                            .get(last)
                            .map(|m| m.content.clone())
                            .unwrap_or_default(),
                    )
                }
            };
            let prompt = if chat {
                tokenizer.apply_chat_template(&msgs, true)?
            } else {
                msgs.iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let ids = tokenizer.encode(&prompt)?;
            items.push(Item {
                prompt,
                ids,
                reference,
            });
        }
        Ok(TaskEvaluator {
            tokenizer,
            tasks,
            decoding,
            samples,
            eos,
            items,
            confidence,
            golds,
        })
    }

    /// Generates and scores.
    pub fn run(&self, model: &Decoder) -> pipe_train::Result<TaskScores> {
        let mut replies = Vec::with_capacity(self.items.len());
        for (c, chunk) in self
            .items
            .chunks(self.decoding.batch_size.max(1))
            .enumerate()
        {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|i| i.ids.clone()).collect();
            let first = c * self.decoding.batch_size.max(1);
            let mut rngs: Vec<Rng> = (0..chunk.len())
                .map(|k| Rng::new(self.decoding.seed).fork((first + k) as u64))
                .collect();
            let gens = generate(
                model,
                self.tokenizer,
                &prompts,
                &self.decoding.sampling(),
                &self.eos,
                &mut rngs,
            )?;
            replies.extend(gens.into_iter().map(|g| (g.text, g.ids)));
        }
        let mut scores = TaskScores::default();
        let mut verdicts: Vec<BTreeMap<String, serde_json::Value>> =
            vec![BTreeMap::new(); replies.len()];
        let texts: Vec<String> = replies.iter().map(|r| r.0.clone()).collect();
        for task in &self.tasks {
            match task {
                TaskKind::Dot => self.dot(&texts, &mut scores, &mut verdicts),
                TaskKind::Confidence => {
                    self.confidence(model, &replies, &mut scores, &mut verdicts)?
                }
            }
        }
        for (k, (item, (_, ids))) in self
            .items
            .iter()
            .zip(&replies)
            .take(self.samples)
            .enumerate()
        {
            // With its special tokens (a confidence token is one), EOS excluded.
            let generation = self.tokenizer.decode(ids, false)?;
            scores.samples.push(json!({
                "item": k, "prompt": item.prompt, "reference": item.reference,
                "generation": generation, "verdict": verdicts[k],
            }));
        }
        Ok(scores)
    }

    /// The confidence task: grade, read the token, take p_confident from the logits.
    fn confidence(
        &self,
        model: &Decoder,
        replies: &[(String, Vec<u32>)],
        scores: &mut TaskScores,
        verdicts: &mut [BTreeMap<String, serde_json::Value>],
    ) -> pipe_train::Result<()> {
        #[derive(Default)]
        struct Acc {
            p: Vec<f64>,
            right: Vec<bool>,
            token_ok: Vec<bool>,
            with_token: usize,
        }
        let mut by: BTreeMap<&'static str, Acc> = BTreeMap::new();
        let mut all = Acc::default();
        for (((item, (text, ids)), gold), v) in self
            .items
            .iter()
            .zip(replies)
            .zip(&self.golds)
            .zip(verdicts.iter_mut())
        {
            let (c, u) = gold.dataset.tokens();
            let (c_id, u_id) = (
                self.tokenizer.token_id(c).expect("checked in new"),
                self.tokenizer.token_id(u).expect("checked in new"),
            );
            // The token is found by id: the reply's text is decoded without special
            // tokens, so it never shows one. The answer is what comes before it (or
            // the whole reply without one).
            let found = ids.iter().position(|t| *t == c_id || *t == u_id);
            let at = found.unwrap_or(ids.len());
            let answer = match found {
                Some(j) => self.tokenizer.decode(&ids[..j], true)?,
                None => text.clone(),
            };
            let reply = confidence::Reply {
                answer: answer.trim(),
                confident: found.map(|j| ids[j] == c_id),
            };
            let right = match (gold.dataset, gold.yes, &gold.letter) {
                (confidence::Dataset::Boolq, Some(yes), _) => {
                    confidence::boolq_correct(reply.answer, yes)
                }
                (_, _, Some(letter)) => {
                    confidence::medqa_correct(reply.answer, &gold.options, letter)
                }
                _ => false,
            };
            let mut seq = item.ids.clone();
            seq.extend(&ids[..at]);
            let t = candle_core::Tensor::new(seq.as_slice(), model.device())?.unsqueeze(0)?;
            let logits = model
                .forward(&t, &pipe_train::KeyMask::full(1, seq.len()))?
                .squeeze(0)?
                .get(seq.len() - 1)?
                .to_dtype(candle_core::DType::F32)?;
            let (lc, lu) = (
                logits.get(c_id as usize)?.to_scalar::<f32>()? as f64,
                logits.get(u_id as usize)?.to_scalar::<f32>()? as f64,
            );
            let p = 1.0 / (1.0 + (lu - lc).exp());
            let token_ok = reply.confident == Some(right);
            v.insert("answer_correct".into(), json!(right));
            v.insert("confident_token".into(), json!(reply.confident));
            v.insert("p_confident".into(), json!(p));
            for acc in [by.entry(gold.dataset.name()).or_default(), &mut all] {
                acc.p.push(p);
                acc.right.push(right);
                acc.token_ok.push(token_ok);
                acc.with_token += usize::from(reply.confident.is_some());
            }
        }
        let cs = &self.confidence;
        let ce = |a: &Acc| {
            calibration_error(
                &a.p,
                &a.right,
                cs.calib_beta,
                cs.calib_p_norm,
                cs.hendrycks_compat,
            )
            .map_err(pipe_train::Error::Invalid)
        };
        let share = |xs: &[bool]| xs.iter().filter(|&&x| x).count() as f64 / xs.len().max(1) as f64;
        let m = &mut scores.metrics;
        for (name, a) in &by {
            m.insert(format!("{name}_accuracy"), share(&a.token_ok));
            m.insert(format!("{name}_calibration_error"), ce(a)?);
        }
        if by.len() > 1 {
            let mean =
                |k: &str| by.keys().map(|d| m[&format!("{d}_{k}")]).sum::<f64>() / by.len() as f64;
            let (acc, cal) = (mean("accuracy"), mean("calibration_error"));
            m.insert("accuracy".into(), acc);
            m.insert("calibration_error".into(), cal);
        } else {
            m.insert("accuracy".into(), share(&all.token_ok));
            m.insert("calibration_error".into(), ce(&all)?);
        }
        let bins = (all.p.len() / cs.calib_beta.max(1)).max(1);
        m.insert(
            "debiased_calibration_error".into(),
            debiased_l2_ece_equal_mass(&all.p, &all.right, bins),
        );
        // Undefined when every answer is right or every one wrong: then not reported.
        if let Some(auc) = roc_auc(&all.p, &all.right) {
            m.insert("auroc".into(), auc);
        }
        m.insert("routing_auc".into(), routing_curve(&all.p, &all.right).1);
        m.insert("answer_accuracy".into(), share(&all.right));
        m.insert(
            "token_rate".into(),
            all.with_token as f64 / all.p.len().max(1) as f64,
        );
        scores.details.insert(
            "reliability".into(),
            json!({"confidence_scores": all.p, "correctness": all.right}),
        );
        Ok(())
    }

    fn dot(
        &self,
        replies: &[String],
        scores: &mut TaskScores,
        verdicts: &mut [BTreeMap<String, serde_json::Value>],
    ) {
        let (mut valid, mut scored) = (0usize, 0usize);
        let (mut node_f1, mut edge_f1) = (0.0, 0.0);
        for ((item, reply), v) in self.items.iter().zip(replies).zip(verdicts.iter_mut()) {
            let got = dot::extract(reply).map(|src| dot::parse(&src));
            let reference = dot::extract(&item.reference).and_then(|s| dot::parse(&s).ok());
            match &got {
                Some(Ok(_)) => {
                    valid += 1;
                    v.insert("dot_valid".into(), json!(true));
                }
                Some(Err(e)) => {
                    v.insert("dot_valid".into(), json!(false));
                    v.insert("dot_error".into(), json!(e.to_string()));
                }
                None => {
                    v.insert("dot_valid".into(), json!(false));
                    v.insert("dot_error".into(), json!("no DOT graph in the reply"));
                }
            }
            if let Some(r) = reference {
                scored += 1;
                if let Some(Ok(g)) = &got {
                    let [_, _, nf, _, _, ef] = dot::compare(g, &r);
                    node_f1 += nf;
                    edge_f1 += ef;
                    v.insert("node_f1".into(), json!(nf));
                    v.insert("edge_f1".into(), json!(ef));
                }
            }
        }
        let n = replies.len().max(1) as f64;
        scores.metrics.insert("validity".into(), valid as f64 / n);
        let s = scored.max(1) as f64;
        scores.metrics.insert("node_f1".into(), node_f1 / s);
        scores.metrics.insert("edge_f1".into(), edge_f1 / s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated text is decoded without special tokens, so the confidence token must
    /// be read from the ids: a reply that wrote `<C_READ>` counts as confident, with
    /// the answer before it graded, and p_confident taken where the token is.
    #[test]
    fn the_confidence_token_is_read_from_the_ids_not_the_text() {
        use candle_core::{DType, Device};
        let mut m = pipe_train::loader::load("tiny:qwen2:3", DType::F32, &Device::Cpu).unwrap();
        let toks: Vec<String> = confidence::TOKENS.iter().map(|t| t.to_string()).collect();
        let new = m.tokenizer.add_special_tokens(&toks).unwrap();
        m.model
            .resize_vocab(*new.iter().max().unwrap() as usize + 1)
            .unwrap();
        let records = vec![
            Record::Pair {
                prompt: "Is it? Answer yes or no.".into(),
                response: "Yes<C_READ>".into(),
            };
            3
        ];
        let raw: Vec<(String, serde_json::Value)> = (1..=3)
            .map(|i| {
                (
                    format!("val.jsonl:{i}"),
                    json!({"dataset": "boolq", "answer": true}),
                )
            })
            .collect();
        let settings = ConfidenceSettings {
            calib_beta: 3,
            ..ConfidenceSettings::default()
        };
        let tok = &m.tokenizer;
        let ev = TaskEvaluator::new(
            tok,
            true,
            &records,
            &raw,
            vec![TaskKind::Confidence],
            EvalDecoding::default(),
            3,
            vec![],
            settings,
        )
        .unwrap();
        let (c, u) = (
            tok.token_id("<C_READ>").unwrap(),
            tok.token_id("<U_READ>").unwrap(),
        );
        let yes = tok.encode("Yes").unwrap();
        let no = tok.encode("No").unwrap();
        let with = |answer: &[u32], t: u32| -> Vec<u32> {
            let mut v = answer.to_vec();
            v.push(t);
            v
        };
        let replies: Vec<(String, Vec<u32>)> = [with(&yes, c), with(&no, u), yes.clone()]
            .into_iter()
            .map(|ids| (tok.decode(&ids, true).unwrap(), ids))
            .collect();
        assert!(!replies[0].0.contains("<C_READ>"), "the text hides it");
        let mut scores = TaskScores::default();
        let mut verdicts = vec![BTreeMap::new(); 3];
        ev.confidence(&m.model, &replies, &mut scores, &mut verdicts)
            .unwrap();
        // Right and confident; wrong and unconfident (both the expected token); no token.
        assert_eq!(verdicts[0]["confident_token"], json!(true));
        assert_eq!(verdicts[0]["answer_correct"], json!(true));
        assert_eq!(verdicts[1]["confident_token"], json!(false));
        assert_eq!(verdicts[1]["answer_correct"], json!(false));
        assert_eq!(verdicts[2]["confident_token"], serde_json::Value::Null);
        let metric = |k: &str| scores.metrics[k];
        assert!((metric("token_rate") - 2.0 / 3.0).abs() < 1e-12);
        assert!((metric("accuracy") - 2.0 / 3.0).abs() < 1e-12);
        assert!((metric("answer_accuracy") - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn bad_gold_fields_are_named() {
        let e = |v: serde_json::Value| gold_of(&v).err().unwrap();
        assert!(e(json!({"dataset": "boolq", "answer": "yes"})).contains("boolean `answer`"));
        assert!(e(json!({"dataset": "squad"})).contains("`dataset`"));
        assert!(
            e(json!({"dataset": "medqa", "answer_idx": "E", "options": {"A": "x"}}))
                .contains("`E` is not among the options")
        );
        assert!(e(json!({"dataset": "medqa", "answer_idx": "A"})).contains("`options`"));
        let g = gold_of(
            &json!({"dataset": "medqa", "answer_idx": "A", "options": {"A": "x", "B": "y"}}),
        )
        .unwrap();
        assert_eq!((g.letter.as_deref(), g.options.len()), (Some("A"), 2));
        assert_eq!(
            gold_of(&json!({"dataset": "boolq", "answer": false}))
                .unwrap()
                .yes,
            Some(false)
        );
    }
}
