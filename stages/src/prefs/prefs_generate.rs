//! `prefs_generate`: candidate answers for preference pairs. For each prompt, every
//! listed model (`tuned`: the model with the `adapter` input; `base`: without it)
//! samples `per_model` candidates.
//!
//! Every generation is memoised (namespace `generations`) under the model's identity
//! (weights + adapter digest), the digest of the exact messages, the decoding settings
//! and the sample's seed, which is derived from `seed`, the prompt and the sample index
//! (so it does not depend on batching or order). A run killed at any moment resumes
//! with every finished generation reused; a new model, or more prompts, generates only
//! what is new. Records whose prompt exceeds `max_input_tokens` are skipped and counted.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::model::chat::{ChatModel, ChatRequest, Message, Sampling};
use crate::oracle::memo::{Memo, Reply};
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefsGenerateParams {
    model: String,
    template: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default = "default_models")]
    models: Vec<String>,
    #[serde(default = "default_per_model")]
    per_model: usize,
    #[serde(default = "default_temperature")]
    temperature: f64,
    #[serde(default = "one")]
    top_p: f64,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_max_input")]
    max_input_tokens: usize,
    #[serde(default = "default_max_new")]
    max_new_tokens: usize,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default = "auto")]
    device: String,
    #[serde(default = "auto")]
    dtype: String,
    #[serde(default = "yes")]
    decode_int8: bool,
    /// Keep the model's projections as `nf4` or `int8` (QLoRA-style base), or `none`.
    #[serde(default)]
    quantize: crate::model::BaseQuant,
    /// nf4: quantize the block absmaxes too.
    #[serde(default)]
    double_quant: bool,
}

fn default_models() -> Vec<String> {
    vec!["tuned".into(), "base".into()]
}
fn default_per_model() -> usize {
    2
}
fn default_temperature() -> f64 {
    0.7
}
fn one() -> f64 {
    1.0
}
fn default_max_input() -> usize {
    2048
}
fn default_max_new() -> usize {
    128
}
fn default_batch() -> usize {
    8
}
fn auto() -> String {
    "auto".into()
}
fn yes() -> bool {
    true
}

/// Samples candidate answers from several models, memoised per generation.
pub struct PrefsGenerateStage;

impl Stage for PrefsGenerateStage {
    fn kind(&self) -> &'static str {
        "prefs_generate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "N sampled candidates per prompt from the tuned and base models; every generation memoised (kill-safe, reused across runs)"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: PrefsGenerateParams = parse_params(params)?;
        crate::model::check_quantize(&p.model, p.quantize)?;
        if p.models.is_empty() {
            return Err(ParamError::new(
                &["models"],
                "list at least one of `tuned`, `base`",
            ));
        }
        for (i, m) in p.models.iter().enumerate() {
            if m != "tuned" && m != "base" {
                return Err(ParamError::new(
                    &["models", &i.to_string()],
                    format!(
                        "`{m}`: expected `tuned` (the model with the `adapter` input) or `base`"
                    ),
                ));
            }
        }
        if p.per_model == 0 || p.batch_size == 0 {
            return Err(ParamError::new(
                &["per_model"],
                "per_model and batch_size must be at least 1",
            ));
        }
        let deps = crate::model::template_and_model_deps(&p.template, &p.model)?;
        Ok(Signature {
            inputs: vec![
                InputDecl::required("prompts"),
                InputDecl::optional("adapter"),
            ],
            deps,
            outputs: vec![OutputDecl::staged("candidates", "candidates.jsonl")],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        crate::model::key_without(params, &["batch_size", "device", "dtype"])
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: PrefsGenerateParams = parse_params(&ctx.params)?;
        let template = crate::prompt::read_template(ctx, &p.template)?;
        let mut records = crate::records::read_jsonl(ctx.input("prompts")?)?;
        if let Some(n) = p.limit {
            records.truncate(n);
        }
        let adapter = ctx.inputs.get("adapter").cloned();
        if p.models.iter().any(|m| m == "tuned") && adapter.is_none() {
            return Err(StageError::Failed(
                "`models` lists `tuned` but no `adapter` input is bound (e.g. `adapter: sft.adapter`)".into(),
            ));
        }
        let texts = crate::prompt::render_each(&template, &p.template, &records, "prompt")?;
        let mut messages = Vec::with_capacity(records.len());
        for text in texts {
            let mut m = Vec::new();
            if let Some(s) = &p.system {
                m.push(Message {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            m.push(Message {
                role: "user".into(),
                content: text,
            });
            messages.push(m);
        }
        let sampling = Sampling {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            stop: vec![],
            logprobs: None,
        };
        let memo = Memo::new(ctx.memo_dir("generations"));
        let base_identity =
            pipe_train::loader::identity(&crate::model::resolve_model(&p.model, &ctx.workdir))
                .map_err(|e| StageError::Failed(format!("model identity: {e}")))?;
        let base_identity =
            crate::model::identity_with_base(&base_identity, p.quantize, p.double_quant);
        // candidates[record][model] = texts by sample index
        let mut candidates: Vec<BTreeMap<String, Vec<Option<String>>>> =
            vec![BTreeMap::new(); records.len()];
        let (mut generated, mut reused, mut skipped_long) = (0u64, 0u64, 0u64);
        let mut new_tokens = 0u64;
        let started = std::time::Instant::now();
        let total = (records.len() * p.models.len() * p.per_model) as u64;
        for name in &p.models {
            let adapter_dir = if name == "tuned" {
                adapter.as_deref()
            } else {
                None
            };
            let identity = match adapter_dir {
                Some(dir) => format!("{base_identity}+{}", dir_digest(dir)?),
                None => base_identity.clone(),
            };
            // Which generations are missing?
            let mut jobs: Vec<(usize, usize, String, u64)> = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                let slot = candidates[i]
                    .entry(name.clone())
                    .or_insert_with(|| vec![None; p.per_model]);
                let prompt_digest = digest(
                    &json!(m.iter().map(|x| [&x.role, &x.content]).collect::<Vec<_>>()).to_string(),
                );
                for (k, s) in slot.iter_mut().enumerate() {
                    let seed = derive_seed(p.seed, &prompt_digest, k);
                    let key = digest(&json!({"identity": identity, "prompt": prompt_digest, "sampling": sampling, "seed": seed}).to_string());
                    match memo.get(&key) {
                        Some(r) => {
                            *s = Some(r.text);
                            reused += 1;
                        }
                        None => jobs.push((i, k, key, seed)),
                    }
                }
            }
            if jobs.is_empty() {
                continue;
            }
            let model = ChatModel::load(
                &p.model,
                &ctx.workdir,
                adapter_dir,
                &crate::model::LoadOptions {
                    device: ctx.device_for(&p.device),
                    dtype: p.dtype.clone(),
                    base: p.quantize,
                    double_quant: p.double_quant,
                    decode_int8: p.decode_int8,
                },
            )
            .map_err(StageError::Failed)?;
            // Too-long prompts are skipped (all their samples).
            let mut runnable = Vec::new();
            for j in jobs {
                let n = model
                    .prompt_tokens(&messages[j.0])
                    .map_err(StageError::Failed)?;
                if n > p.max_input_tokens {
                    if j.1 == 0 {
                        skipped_long += 1;
                    }
                    continue;
                }
                runnable.push(j);
            }
            runnable.sort_by_key(|j| messages[j.0].iter().map(|m| m.content.len()).sum::<usize>());
            for chunk in runnable.chunks(p.batch_size) {
                ctx.check_cancelled()?;
                let reqs: Vec<ChatRequest> = chunk
                    .iter()
                    .map(|(i, _, _, seed)| ChatRequest {
                        messages: messages[*i].clone(),
                        sampling: sampling.clone(),
                        seed: *seed,
                        schema: None,
                        prompt: None,
                    })
                    .collect();
                let outs = model.complete(&reqs).map_err(StageError::Failed)?;
                for ((i, k, key, _), c) in chunk.iter().zip(outs) {
                    memo.put(
                        key,
                        &Reply {
                            text: c.text.clone(),
                            prompt_tokens: c.prompt_tokens,
                            completion_tokens: c.completion_tokens,
                            cost_usd: 0.0,
                        },
                    )
                    .map_err(StageError::io("memoising a generation"))?;
                    new_tokens += c.completion_tokens as u64;
                    candidates[*i].get_mut(name).expect("slot")[*k] = Some(c.text);
                    generated += 1;
                }
                ctx.progress(
                    generated + reused,
                    Some(total),
                    &format!("{name}: {generated} generated, {reused} reused"),
                );
            }
        }
        let mut out = String::new();
        let mut written = 0u64;
        for (r, c) in records.iter().zip(&candidates) {
            let mut list = Vec::new();
            for name in &p.models {
                for (k, t) in c.get(name).into_iter().flatten().enumerate() {
                    if let Some(t) = t {
                        list.push(json!({"model": name, "sample": k, "text": t}));
                    }
                }
            }
            if list.is_empty() {
                continue;
            }
            written += 1;
            out.push_str(&json!({"id": r.get("id"), "record": r, "candidates": list}).to_string());
            out.push('\n');
        }
        crate::fsio::write_atomic(&ctx.out_dir.join("candidates.jsonl"), out.as_bytes())
            .map_err(StageError::io("writing candidates.jsonl"))?;
        let secs = started.elapsed().as_secs_f64();
        ctx.log(&format!("{generated} generated, {reused} reused from the memo, {skipped_long} prompts over max_input_tokens, {secs:.1}s"));
        let mut metrics = BTreeMap::new();
        metrics.insert("prompts".into(), json!(written));
        metrics.insert("generated".into(), json!(generated));
        metrics.insert("reused".into(), json!(reused));
        metrics.insert("skipped_long_prompts".into(), json!(skipped_long));
        metrics.insert("new_tokens".into(), json!(new_tokens));
        if generated > 0 && secs > 0.0 {
            metrics.insert("tokens_per_s".into(), json!(new_tokens as f64 / secs));
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

fn digest(s: &str) -> String {
    format!("{:x}", Sha256::digest(s.as_bytes()))
}

/// The seed of sample `k` of a prompt: independent of batching and order.
fn derive_seed(seed: u64, prompt_digest: &str, k: usize) -> u64 {
    let h = Sha256::digest(format!("{seed}:{prompt_digest}:{k}").as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

/// sha256 over an adapter folder's files (names and contents, sorted).
fn dir_digest(dir: &Path) -> Result<String, StageError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(StageError::io(format!("reading {}", dir.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(std::fs::read(&f).map_err(StageError::io(format!("reading {}", f.display())))?);
    }
    Ok(format!("{:x}", h.finalize()))
}
