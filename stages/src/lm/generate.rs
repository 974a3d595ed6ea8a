//! `generate`: a model (plus an optional LoRA adapter from `sft`) completes the
//! prompts of a JSONL file. Each output line is the input record plus
//! `generation`, `finish` and `new_tokens`. Finished batches are appended to a
//! file in the checkpoint dir (fsynced), so an interrupted run resumes after the
//! last complete batch; sampling uses one seeded generator per record, so the
//! result does not depend on batching or on where a run was interrupted.

use std::collections::BTreeMap;
use std::io::Write;

use pipe_train::generate::{generate, Sampling};
use pipe_train::tokenizer::Message;
use pipe_train::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::model;
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateParams {
    model: String,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(default = "default_batch")]
    batch_size: usize,
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
    #[serde(default = "auto")]
    chat_template: String,
    #[serde(default = "default_prompt")]
    prompt_field: String,
    /// `true` (default): token-by-token decoding on the CPU uses Q8_0 copies of the
    /// dense weights; `false`: the weights as stored throughout.
    #[serde(default = "yes")]
    decode_int8: bool,
}

fn yes() -> bool {
    true
}

fn default_batch() -> usize {
    8
}
fn auto() -> String {
    "auto".into()
}
fn default_prompt() -> String {
    "prompt".into()
}

/// Text generation over a JSONL file of prompts.
pub struct GenerateStage;

impl Stage for GenerateStage {
    fn kind(&self) -> &'static str {
        "generate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "batched generation (greedy or seeded sampling) with an optional LoRA adapter, resumable per batch"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: GenerateParams = parse_params(params)?;
        crate::model::check_quantize(&p.model, p.quantize)?;
        model::model_dep(&p.model)?;
        if p.batch_size == 0 {
            return Err(ParamError::new(
                &["with", "batch_size"],
                "expected at least 1",
            ));
        }
        Ok(Signature {
            inputs: vec![
                InputDecl::required("prompts"),
                InputDecl::optional("adapter"),
            ],
            deps: model::model_dep(&p.model)?.into_iter().collect(),
            outputs: vec![OutputDecl::staged("generations", "generations.jsonl")],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        model::key_with_identity(params)
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: GenerateParams = parse_params(&ctx.params)?;
        let mut loaded = model::load_model(
            ctx,
            &p.model,
            &p.device,
            &p.dtype,
            p.quantize,
            p.double_quant,
        )?;
        if let Some(dir) = ctx.inputs.get("adapter") {
            pipe_train::lora::load(&mut loaded.model, dir)
                .map_err(model::failed("loading the adapter"))?;
            ctx.log(&format!("adapter {}", dir.display()));
        }
        if p.decode_int8 {
            loaded
                .model
                .quantize_for_decoding()
                .map_err(model::failed("quantizing for decoding"))?;
        }
        let chat = model::apply_template_choice(&mut loaded.tokenizer, &p.chat_template);
        let path = ctx.input("prompts")?;
        let records = crate::records::read_jsonl(path)?;
        let mut prompts = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let where_ = format!("{}: record {}", path.display(), i + 1);
            let text = if let Some(m) = r.get("messages") {
                let msgs: Vec<Message> = serde_json::from_value(m.clone())
                    .map_err(|e| StageError::Failed(format!("{where_}: `messages`: {e}")))?;
                loaded
                    .tokenizer
                    .apply_chat_template(&msgs, true)
                    .map_err(model::failed(&where_))?
            } else {
                let prompt = r
                    .get(&p.prompt_field)
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        StageError::Failed(format!(
                            "{where_}: expected a string field `{}` (or `messages`)",
                            p.prompt_field
                        ))
                    })?;
                if chat {
                    let msgs = [Message {
                        role: "user".into(),
                        content: prompt.into(),
                    }];
                    loaded
                        .tokenizer
                        .apply_chat_template(&msgs, true)
                        .map_err(model::failed(&where_))?
                } else {
                    prompt.to_string()
                }
            };
            prompts.push(
                loaded
                    .tokenizer
                    .encode(&text)
                    .map_err(model::failed(&where_))?,
            );
        }
        let eos = loaded.eos_ids();

        // Resume: lines already in the partial file are done.
        let partial = model::ckpt(ctx, "generations.partial.jsonl");
        std::fs::create_dir_all(&ctx.checkpoint_dir)
            .map_err(StageError::io("creating the checkpoint dir"))?;
        let done_lines: Vec<String> = std::fs::read_to_string(&partial)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok())
            .map(str::to_string)
            .collect();
        let done = done_lines.len().min(records.len());
        // Rewrite without a torn last line, then append batch by batch.
        std::fs::write(
            &partial,
            done_lines[..done]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
        .map_err(StageError::io("rewriting the partial generations"))?;
        if done > 0 {
            ctx.log(&format!(
                "resuming after {done} of {} records",
                records.len()
            ));
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .map_err(StageError::io("opening the partial generations"))?;
        let mut new_tokens = 0usize;
        let mut finishes: BTreeMap<String, u64> = BTreeMap::new();
        let started = std::time::Instant::now();
        let mut i = done;
        while i < records.len() {
            if ctx.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            let end = (i + p.batch_size).min(records.len());
            let mut rngs: Vec<Rng> = (i..end).map(|k| Rng::new(p.seed).fork(k as u64)).collect();
            let gens = generate(
                &loaded.model,
                &loaded.tokenizer,
                &prompts[i..end],
                &p.sampling,
                &eos,
                &mut rngs,
            )
            .map_err(model::failed("generating"))?;
            let mut chunk = String::new();
            for (k, g) in gens.iter().enumerate() {
                let mut rec = records[i + k].clone();
                if let Some(obj) = rec.as_object_mut() {
                    obj.insert("generation".into(), json!(g.text));
                    obj.insert("finish".into(), json!(g.finish));
                    obj.insert("new_tokens".into(), json!(g.ids.len()));
                }
                new_tokens += g.ids.len();
                *finishes
                    .entry(format!("{:?}", g.finish).to_lowercase())
                    .or_default() += 1;
                chunk.push_str(&rec.to_string());
                chunk.push('\n');
            }
            file.write_all(chunk.as_bytes())
                .map_err(StageError::io("appending generations"))?;
            file.sync_data()
                .map_err(StageError::io("syncing generations"))?;
            i = end;
            ctx.progress(
                i as u64,
                Some(records.len() as u64),
                &format!("{new_tokens} new tokens"),
            );
        }
        std::fs::copy(&partial, ctx.out_dir.join("generations.jsonl"))
            .map_err(StageError::io("writing generations.jsonl"))?;
        let secs = started.elapsed().as_secs_f64();
        let mut metrics = BTreeMap::new();
        metrics.insert("records".into(), json!(records.len()));
        metrics.insert("resumed_after".into(), json!(done));
        metrics.insert("new_tokens".into(), json!(new_tokens));
        if secs > 0.0 && new_tokens > 0 {
            metrics.insert("tokens_per_s".into(), json!(new_tokens as f64 / secs));
        }
        for (k, v) in finishes {
            metrics.insert(format!("finish.{k}"), json!(v));
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}
