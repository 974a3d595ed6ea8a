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
}

fn peft_key(module: &str, ab: char) -> String {
    format!("base_model.model.{module}.lora_{ab}.weight")
}

/// Attaches fresh adapters (PEFT init) to every matching projection.
pub fn attach(model: &mut Decoder, config: &LoraConfig, rng: &mut Rng) -> Result<Adapter> {
    config.validate()?;
    let device = model.device().clone();
    let mut vars = Vec::new();
    for (name, lin) in model.linears_mut() {
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
            "lora.target_modules {:?} matched no projection; names are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
            config.target_modules
        )));
    }
    Ok(Adapter {
        config: config.clone(),
        vars,
    })
}

impl Adapter {
    /// Trainable parameter count.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The weights as a map by PEFT key (f32).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        for (k, v) in &self.vars {
            // A copy: `Var::set` writes in place, so a shared tensor would change under us.
            m.insert(k.clone(), v.as_tensor().to_dtype(DType::F32)?.copy()?);
        }
        Ok(m)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        let mut modules: Vec<String> = self
            .vars
            .iter()
            .filter_map(|(k, _)| k.strip_suffix(".lora_A.weight"))
            .filter_map(|k| k.rsplit('.').next())
            .map(str::to_string)
            .collect();
        modules.sort();
        modules.dedup();
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
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
            "modules_to_save": null,
            "use_dora": false,
        });
        write_json(&dir.join("adapter_config.json"), &cfg)?;
        save_safetensors(&dir.join("adapter_model.safetensors"), &self.tensors()?)
    }

    /// Copies values from a map by PEFT key (a checkpoint), checking every key.
    pub fn restore(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        for (k, v) in &self.vars {
            let t = tensors.get(k).ok_or_else(|| Error::Tensor {
                name: k.clone(),
                path: source.to_path_buf(),
                message: "missing from the adapter".into(),
            })?;
            if t.dims() != v.dims() {
                return Err(Error::Tensor {
                    name: k.clone(),
                    path: source.to_path_buf(),
                    message: format!("expected shape {:?}, found {:?}", v.dims(), t.dims()),
                });
            }
            v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
        }
        Ok(())
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
    let adapter = attach(model, &config, &mut rng)?;
    let path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| Error::format(&path, format!("cannot read safetensors: {e}")))?;
    // PEFT saves keys without the adapter name; older versions kept `.default`.
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.replace(".default.weight", ".weight"), v))
        .collect();
    adapter.restore(&tensors, &path)?;
    Ok(adapter)
}
