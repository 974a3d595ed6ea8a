//! `tag_confidence`: the base model answers the training questions and each answer
//! is tagged with the confidence token its correctness earns (Self-REF's data step):
//! `<C_…>` when right, `<U_…>` when wrong, `READ` for BoolQ and `MED` for MedQA.
//!
//! Inputs `medqa` and/or `boolq` are the datasets' JSONL ([`crate::task::choice`]);
//! a malformed record goes to `rejects.jsonl` with its file:line and is counted, never
//! tagged. The prompt is the question's one rendering (options and passage included),
//! so `sft` trains and validates on what tagging showed. Output `tagged` holds, per
//! question, the record `sft`'s confidence task reads (`dataset`, gold, `options`,
//! `prompt`) plus `response` / `tagged_response` (the answer, then the token at once),
//! `base_answer` and `correct`. `unconfident_ratio` keeps that share of the U-tagged
//! questions (a seeded draw), Self-REF's knob for the balance of the two tokens.
//! Decoding is greedy by default; item `k` samples with `fork(k)` of `seed`. An answer
//! that `max_new_tokens` cut is dropped and counted (`<dataset>_cut_answers_dropped`)
//! unless `keep_cut_answers` is set: its token would sit after a half sentence, where
//! the model writing freely never is, so training on it teaches nothing it can use.

use std::collections::BTreeMap;

use pipe_train::generate::{generate, Sampling};
use pipe_train::tokenizer::Message;
use pipe_train::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::model;
use crate::params::{parse_params, ParamError};
use crate::task::choice::{self, ChoiceQuestion};
use crate::task::confidence::{self, Dataset};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagParams {
    model: String,
    #[serde(default = "default_max_new")]
    max_new_tokens: usize,
    #[serde(default)]
    temperature: f64,
    #[serde(default = "one")]
    top_p: f64,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_batch")]
    batch_size: usize,
    /// Share of the U-tagged questions kept (1: all).
    #[serde(default = "one")]
    unconfident_ratio: f64,
    /// Keep answers that `max_new_tokens` cut (default: drop and count them; a token
    /// put after a cut answer sits where the model, writing freely, never is).
    #[serde(default)]
    keep_cut_answers: bool,
    #[serde(default = "auto")]
    device: String,
    #[serde(default = "auto")]
    dtype: String,
    #[serde(default)]
    quantize: crate::model::BaseQuant,
    #[serde(default)]
    double_quant: bool,
    #[serde(default = "auto")]
    chat_template: String,
}

fn default_max_new() -> usize {
    32
}
fn default_batch() -> usize {
    8
}
fn one() -> f64 {
    1.0
}
fn auto() -> String {
    "auto".into()
}

/// Tags the base model's answers with confidence tokens.
pub struct TagConfidenceStage;

impl Stage for TagConfidenceStage {
    fn kind(&self) -> &'static str {
        "tag_confidence"
    }

    fn version(&self) -> u32 {
        3
    }

    fn summary(&self) -> &'static str {
        "the base model answers MedQA/BoolQ questions; each answer is tagged C if right, U if wrong"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: TagParams = parse_params(params)?;
        model::check_quantize(&p.model, p.quantize)?;
        if !(p.unconfident_ratio > 0.0 && p.unconfident_ratio <= 1.0) {
            return Err(ParamError::new(
                &["with", "unconfident_ratio"],
                format!("expected a share in (0, 1], found {}", p.unconfident_ratio),
            ));
        }
        if p.batch_size == 0 || p.max_new_tokens == 0 {
            return Err(ParamError::new(
                &["with", "batch_size"],
                "batch_size and max_new_tokens must be at least 1",
            ));
        }
        Ok(Signature {
            inputs: vec![InputDecl::optional("medqa"), InputDecl::optional("boolq")],
            deps: model::model_dep(&p.model)?.into_iter().collect(),
            outputs: vec![
                OutputDecl::staged("tagged", "tagged.jsonl"),
                OutputDecl::staged("rejects", "rejects.jsonl"),
            ],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        model::key_with_identity(params)
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: TagParams = parse_params(&ctx.params)?;
        let mut questions: Vec<ChoiceQuestion> = Vec::new();
        let mut rejects = Vec::new();
        for name in ["medqa", "boolq"] {
            let Some(path) = ctx.inputs.get(name) else {
                continue;
            };
            let text = std::fs::read_to_string(path)
                .map_err(StageError::io(format!("reading {}", path.display())))?;
            let read = if name == "medqa" {
                choice::medqa(path, &text)
            } else {
                choice::boolq(path, &text)
            };
            questions.extend(read.questions);
            rejects.extend(read.rejects.into_iter().map(|r| (name, r)));
        }
        if ctx.inputs.is_empty() {
            return Err(StageError::Failed(
                "tag_confidence needs a `medqa` or a `boolq` input".into(),
            ));
        }
        for (name, r) in &rejects {
            ctx.log(&format!(
                "{} (input `{name}`): rejected: {}",
                r.at, r.reason
            ));
        }
        let mut loaded = model::load_model(
            ctx,
            &p.model,
            &p.device,
            &p.dtype,
            p.quantize,
            p.double_quant,
        )?;
        let chat = model::apply_template_choice(&mut loaded.tokenizer, &p.chat_template);
        let mut prompts = Vec::with_capacity(questions.len());
        for q in &questions {
            let text = if chat {
                loaded
                    .tokenizer
                    .apply_chat_template(
                        &[Message {
                            role: "user".into(),
                            content: q.prompt(),
                        }],
                        true,
                    )
                    .map_err(model::failed(&q.id))?
            } else {
                q.prompt()
            };
            prompts.push(
                loaded
                    .tokenizer
                    .encode(&text)
                    .map_err(model::failed(&q.id))?,
            );
        }
        let eos = loaded.eos_ids();
        let sampling = Sampling {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            stop: vec!["\n\n".into()],
            logprobs: None,
        };
        let mut answers = Vec::with_capacity(questions.len());
        for (c, chunk) in prompts.chunks(p.batch_size).enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            let first = c * p.batch_size;
            let mut rngs: Vec<Rng> = (0..chunk.len())
                .map(|k| Rng::new(p.seed).fork((first + k) as u64))
                .collect();
            let gens = generate(
                &loaded.model,
                &loaded.tokenizer,
                chunk,
                &sampling,
                &eos,
                &mut rngs,
            )
            .map_err(model::failed("generating"))?;
            answers.extend(gens.into_iter().map(|g| {
                (
                    g.text.trim().to_string(),
                    g.finish == pipe_train::generate::Finish::Length,
                )
            }));
            ctx.progress(
                answers.len() as u64,
                Some(questions.len() as u64),
                "answered",
            );
        }
        // The U-tagged questions kept: a seeded draw, the same for the same inputs.
        let mut keep_rng = Rng::new(p.seed).fork(0x55);
        let mut out = String::new();
        let mut counts: BTreeMap<String, [usize; 4]> = BTreeMap::new(); // n, right, C, U kept
        let mut cut: BTreeMap<String, usize> = BTreeMap::new();
        for (q, (answer, was_cut)) in questions.iter().zip(&answers) {
            let dataset = if q.dataset == "boolq" {
                Dataset::Boolq
            } else {
                Dataset::Medqa
            };
            let right = match (dataset, q.answer, &q.answer_idx) {
                (Dataset::Boolq, Some(yes), _) => confidence::boolq_correct(answer, yes),
                (_, _, Some(letter)) => confidence::medqa_correct(answer, &q.options, letter),
                _ => false,
            };
            let c = counts.entry(q.dataset.clone()).or_default();
            c[0] += 1;
            c[1] += usize::from(right);
            if *was_cut && !p.keep_cut_answers {
                *cut.entry(q.dataset.clone()).or_default() += 1;
                continue;
            }
            if !right && keep_rng.uniform() >= p.unconfident_ratio {
                continue;
            }
            c[if right { 2 } else { 3 }] += 1;
            let (ct, ut) = dataset.tokens();
            // The token right after the answer's last token, no space between: a space
            // would be a token of its own that the label-token loss never trains, so a
            // model writing freely would end its turn where training put the space.
            let tagged = format!("{answer}{}", if right { ct } else { ut });
            let mut rec = q.to_record();
            rec["base_answer"] = json!(answer);
            rec["correct"] = json!(right);
            rec["response"] = json!(tagged);
            rec["tagged_response"] = json!(tagged);
            out.push_str(&rec.to_string());
            out.push('\n');
        }
        crate::fsio::write_atomic(&ctx.out_dir.join("tagged.jsonl"), out.as_bytes())
            .map_err(StageError::io("writing tagged.jsonl"))?;
        let rej: String = rejects
            .iter()
            .map(|(name, r)| {
                json!({"input": name, "at": r.at, "reason": r.reason}).to_string() + "\n"
            })
            .collect();
        crate::fsio::write_atomic(&ctx.out_dir.join("rejects.jsonl"), rej.as_bytes())
            .map_err(StageError::io("writing rejects.jsonl"))?;
        let mut metrics = BTreeMap::new();
        metrics.insert("rejects".into(), json!(rejects.len()));
        for (d, [n, right, c, u]) in &counts {
            metrics.insert(format!("{d}_questions"), json!(n));
            metrics.insert(
                format!("{d}_cut_answers_dropped"),
                json!(cut.get(d).copied().unwrap_or(0)),
            );
            metrics.insert(
                format!("{d}_base_accuracy"),
                json!(*right as f64 / (*n).max(1) as f64),
            );
            metrics.insert(format!("{d}_confident"), json!(c));
            metrics.insert(format!("{d}_unconfident_kept"), json!(u));
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}
