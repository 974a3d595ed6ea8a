//! LoRA adapters in PEFT's layout: attach to a [`Decoder`], save as
//! `adapter_config.json` + `adapter_model.safetensors`, load back, merge.
//!
//! Initialisation follows PEFT's default (`init_lora_weights=True`): `A` is
//! Kaiming-uniform with `a = √5`, i.e. uniform in ±1/√in, and `B` is zero, so an
//! adapter at step 0 leaves the model's output unchanged.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{read_json, save_safetensors, write_json};
use crate::linear::LoraPair;
use crate::model::Decoder;
use crate::rng::Rng;

/// Which projections get an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// `all-linear`: every projection of every layer (not `lm_head`), as in PEFT.
    Keyword(String),
    /// Module names, matched against the last component (`q_proj`) or the full name.
    Names(Vec<String>),
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input, training only.
    #[serde(default)]
    pub dropout: f64,
    /// Target projections.
    #[serde(default = "default_targets")]
    pub target_modules: Targets,
    /// rsLoRA: scale by `alpha / √r` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> Targets {
    Targets::Names(vec![
        "q_proj".into(),
        "k_proj".into(),
        "v_proj".into(),
        "o_proj".into(),
    ])
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks ranges and target names.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Invalid("lora.r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "lora.dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if let Targets::Keyword(k) = &self.target_modules {
            if k != "all-linear" {
                return Err(Error::Invalid(format!(
                    "lora.target_modules: expected `all-linear` or a list of module names, got `{k}`"
                )));
            }
        }
        Ok(())
    }

    fn matches(&self, full_name: &str) -> bool {
        match &self.target_modules {
            Targets::Keyword(_) => true,
            Targets::Names(names) => {
                let last = full_name.rsplit('.').next().unwrap_or(full_name);
                names
                    .iter()
                    .any(|n| n == last || n == full_name || full_name.ends_with(&format!(".{n}")))
            }
        }
    }
}

/// The trainable tensors of an attached adapter, by PEFT key.
pub struct Adapter {
    /// The configuration it was built with.
    pub config: LoraConfig,
    /// `(peft key, variable)` in a stable order (layer, module, A before B).
    pub vars: Vec<(String, Var)>,
    /// Trained token rows, if any (PEFT `trainable_token_indices`).
    pub tokens: Option<TokenRows>,
}

/// What saving trained token rows in PEFT's layout needs besides their values.
pub struct TokenRows {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether the output layer shares the rows.
    pub tied: bool,
    /// The resized base matrices `(embedding, untied lm_head)`, saved when the
    /// vocabulary grew so that `peft` can restore them into a resized base model.
    pub resized: Option<(Tensor, Option<Tensor>)>,
}

/// The adapter key of the trained input-embedding rows (PEFT's trainable tokens).
pub const TOKENS_KEY: &str =
    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
const TOKENS_BASE_KEY: &str = "base_model.model.model.embed_tokens.token_adapter.base_layer.weight";
/// The adapter key of the trained output rows of an untied model.
pub const HEAD_TOKENS_KEY: &str = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";
const HEAD_TOKENS_BASE_KEY: &str = "base_model.model.lm_head.token_adapter.base_layer.weight";
const HEAD_KEY: &str = "base_model.model.lm_head.weight";

/// Makes the embedding rows of `ids` trainable (growing the vocabulary with
/// mean-initialised rows first if an id is beyond it) and adds them to `adapter`.
pub fn add_trainable_tokens(
    model: &mut Decoder,
    adapter: &mut Adapter,
    ids: Vec<u32>,
) -> Result<()> {
    let need = ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
    let grew = need > model.config().vocab_size;
    model.resize_vocab(need)?;
    let (values, head_rows) = model.train_tokens(ids.clone())?;
    let tied = model.config().tie_word_embeddings;
    let resized = if grew {
        let head = if tied {
            None
        } else {
            Some(model.lm_head.weight.clone())
        };
        Some((model.embed_tokens.clone(), head))
    } else {
        None
    };
    adapter.vars.push((TOKENS_KEY.to_string(), values));
    if let Some(h) = head_rows {
        adapter.vars.push((HEAD_TOKENS_KEY.to_string(), h));
    }
    adapter.tokens = Some(TokenRows { ids, tied, resized });
    Ok(())
}

fn peft_key(module: &str, ab: char) -> String {
    format!("base_model.model.{module}.lora_{ab}.weight")
}

/// Attaches fresh adapters (PEFT init) to every matching projection.
pub fn attach(model: &mut Decoder, config: &LoraConfig, rng: &mut Rng) -> Result<Adapter> {
    config.validate()?;
    let device = model.device().clone();
    let mut vars = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (name, lin) in model.linears_mut() {
        let short = name.rsplit('.').next().unwrap_or(&name).to_string();
        if !names.contains(&short) {
            names.push(short);
        }
        if !config.matches(&name) {
            continue;
        }
        let (inp, out) = lin.in_out();
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..config.r * inp)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (config.r, inp), &device)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out, config.r), DType::F32, &device)?)?;
        vars.push((peft_key(&name, 'A'), a.clone()));
        vars.push((peft_key(&name, 'B'), b.clone()));
        lin.lora = Some(LoraPair {
            a,
            b,
            scale: config.scale(),
            dropout: config.dropout,
        });
    }
    if vars.is_empty() {
        return Err(Error::Invalid(format!(
            "lora.target_modules {:?} matched no projection; this model's are {}",
            config.target_modules,
            names.join(", ")
        )));
    }
    Ok(Adapter {
        config: config.clone(),
        vars,
        tokens: None,
    })
}

impl Adapter {
    /// Trainable parameter count.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The weights as a map by PEFT key (f32).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        crate::io::named_tensors(&self.vars)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.save_as(dir, base_model, "CAUSAL_LM", None, HashMap::new())
    }

    /// [`Adapter::save`] for another PEFT task type (`SEQ_CLS` for a sequence head),
    /// with `modules_to_save` named in the config and their tensors (`extra`, by
    /// PEFT key, e.g. `base_model.model.score.weight`) saved beside the adapter's.
    pub fn save_as(
        &self,
        dir: &Path,
        base_model: &str,
        task_type: &str,
        modules_to_save: Option<Vec<String>>,
        extra: HashMap<String, Tensor>,
    ) -> Result<()> {
        let mut modules: Vec<String> = self
            .vars
            .iter()
            .filter_map(|(k, _)| k.strip_suffix(".lora_A.weight"))
            .filter_map(|k| k.rsplit('.').next())
            .map(str::to_string)
            .collect();
        modules.sort();
        modules.dedup();
        let mut cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": modules,
            "bias": "none",
            "use_rslora": self.config.use_rslora,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": modules_to_save,
            "use_dora": false,
        });
        let mut tensors = self.tensors()?;
        for (k, v) in extra {
            tensors.insert(k, v.to_dtype(DType::F32)?);
        }
        if let Some(t) = &self.tokens {
            // An untied output layer's rows are trained as their own layer.
            cfg["trainable_token_indices"] = if t.tied {
                serde_json::json!({"embed_tokens": t.ids})
            } else {
                serde_json::json!({"embed_tokens": t.ids, "lm_head": t.ids})
            };
            let values = tensors[TOKENS_KEY].clone();
            if t.tied {
                tensors.insert(HEAD_TOKENS_KEY.to_string(), values);
            }
            if let Some((embed, head)) = &t.resized {
                tensors.insert(TOKENS_BASE_KEY.to_string(), embed.to_dtype(DType::F32)?);
                if t.tied {
                    tensors.insert(
                        HEAD_TOKENS_BASE_KEY.to_string(),
                        embed.to_dtype(DType::F32)?,
                    );
                }
                // An untied output layer is wrapped as a token layer of its own too.
                if let Some(h) = head {
                    tensors.insert(HEAD_TOKENS_BASE_KEY.to_string(), h.to_dtype(DType::F32)?);
                }
            }
        }
        write_json(&dir.join("adapter_config.json"), &cfg)?;
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)
    }

    /// Copies values from a map by PEFT key (a checkpoint), checking every key.
    pub fn restore(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        crate::io::restore_named(&self.vars, tensors, source, "the adapter")
    }
}

/// Loads a PEFT LoRA adapter directory onto `model`.
pub fn load(model: &mut Decoder, dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join("adapter_config.json");
    let raw = read_json(&cfg_path)?;
    let field = |k: &str| raw.get(k).cloned().unwrap_or(serde_json::Value::Null);
    if field("peft_type").as_str() != Some("LORA") {
        return Err(Error::format(&cfg_path, "peft_type must be \"LORA\""));
    }
    if field("use_dora").as_bool() == Some(true) {
        return Err(Error::format(&cfg_path, "DoRA adapters are not supported"));
    }
    let targets: Targets = serde_json::from_value(field("target_modules"))
        .map_err(|e| Error::format(&cfg_path, format!("target_modules: {e}")))?;
    let config = LoraConfig {
        r: field("r")
            .as_u64()
            .ok_or_else(|| Error::format(&cfg_path, "`r` must be an integer"))? as usize,
        alpha: field("lora_alpha").as_f64().unwrap_or(8.0),
        dropout: field("lora_dropout").as_f64().unwrap_or(0.0),
        target_modules: targets,
        use_rslora: field("use_rslora").as_bool().unwrap_or(false),
    };
    let mut rng = Rng::new(0);
    let mut adapter = attach(model, &config, &mut rng)?;
    let path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| Error::format(&path, format!("cannot read safetensors: {e}")))?;
    // PEFT saves keys without the adapter name; older versions kept `.default`.
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.replace(".default.weight", ".weight"), v))
        .collect();
    if let Some(idx) = raw.get("trainable_token_indices").filter(|v| !v.is_null()) {
        let ids: Vec<u32> = serde_json::from_value(
            idx.get("embed_tokens").cloned().unwrap_or_default(),
        )
        .map_err(|e| {
            Error::format(
                &cfg_path,
                format!("trainable_token_indices.embed_tokens: {e}"),
            )
        })?;
        let device = model.device().clone();
        let dtype = model.dtype();
        let tied = model.config().tie_word_embeddings;
        // When the vocabulary grew, the adapter carries the resized base matrices.
        if let Some(base) = tensors.get(TOKENS_BASE_KEY) {
            model.resize_vocab(base.dim(0)?)?;
            model.embed_tokens = base.to_dtype(dtype)?.to_device(&device)?;
            if tied {
                model.lm_head = crate::linear::Linear::new(model.embed_tokens.clone(), None);
            }
        }
        let head = tensors
            .get(HEAD_TOKENS_BASE_KEY)
            .or_else(|| tensors.get(HEAD_KEY));
        if let (Some(head), false) = (head, tied) {
            model.lm_head =
                crate::linear::Linear::new(head.to_dtype(dtype)?.to_device(&device)?, None);
        }
        add_trainable_tokens(model, &mut adapter, ids)?;
    }
    adapter.restore(&tensors, &path)?;
    Ok(adapter)
}
