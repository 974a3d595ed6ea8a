//! Named tensors as found in a checkpoint (HF names), with shape checks that say
//! which tensor in which file is wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// A bag of checkpoint tensors, already on the target device and dtype.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: PathBuf,
}

impl Weights {
    /// Wraps tensors read from `source` (used in error messages).
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Weights {
        Weights {
            tensors,
            source: source.into(),
        }
    }

    /// Reads one or several safetensors files, converting to `dtype` on `device`.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Weights> {
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(file, &Device::Cpu)
                .map_err(|e| Error::format(file, format!("cannot read safetensors: {e}")))?;
            for (name, t) in loaded {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                tensors.insert(name, t.to_device(device)?);
            }
        }
        let source = match files {
            [one] => one.clone(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        Ok(Weights { tensors, source })
    }

    /// Random weights for a config, as HF initialises them (normal σ = 0.02, norms 1, biases 0).
    pub fn random(cfg: &Config, seed: u64, dtype: DType, device: &Device) -> Result<Weights> {
        let mut rng = Rng::new(seed);
        let mut tensors = HashMap::new();
        let normal = |shape: &[usize], rng: &mut Rng| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_size());
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let ones = |n: usize| Tensor::ones(n, dtype, device);
        let zeros = |n: usize| Tensor::zeros(n, dtype, device);
        tensors.insert(
            "model.embed_tokens.weight".into(),
            normal(&[cfg.vocab_size, h], &mut rng)?,
        );
        // Norm weights start at the identity: 1, or 0 where the family computes x·(1+w).
        let norm_init = |n: usize| {
            if cfg.architecture.offset_norms() {
                zeros(n)
            } else {
                ones(n)
            }
        };
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut projections = if cfg.fused_projections() {
                vec![("self_attn.qkv_proj", q + 2 * kv, h)]
            } else {
                vec![
                    ("self_attn.q_proj", q, h),
                    ("self_attn.k_proj", kv, h),
                    ("self_attn.v_proj", kv, h),
                ]
            };
            projections.push(("self_attn.o_proj", h, q));
            if cfg.fused_projections() {
                projections.push(("mlp.gate_up_proj", 2 * i, h));
            } else {
                projections.push(("mlp.gate_proj", i, h));
                projections.push(("mlp.up_proj", i, h));
            }
            projections.push(("mlp.down_proj", h, i));
            for (name, out, inp) in projections {
                tensors.insert(format!("{p}.{name}.weight"), normal(&[out, inp], &mut rng)?);
                let biased = if name == "self_attn.o_proj" {
                    cfg.o_bias()
                } else {
                    name.starts_with("self_attn") && cfg.qkv_bias()
                };
                if biased {
                    tensors.insert(format!("{p}.{name}.bias"), zeros(out)?);
                }
            }
            let mut norms = vec![("input_layernorm", h), ("post_attention_layernorm", h)];
            if cfg.sandwich_norms() {
                norms.push(("pre_feedforward_layernorm", h));
                norms.push(("post_feedforward_layernorm", h));
            }
            if cfg.qk_norm() {
                norms.push(("self_attn.q_norm", hd));
                norms.push(("self_attn.k_norm", hd));
            }
            for (name, n) in norms {
                tensors.insert(format!("{p}.{name}.weight"), norm_init(n)?);
            }
        }
        tensors.insert("model.norm.weight".into(), norm_init(h)?);
        if !cfg.tie_word_embeddings {
            tensors.insert(
                "lm_head.weight".into(),
                normal(&[cfg.vocab_size, h], &mut rng)?,
            );
        }
        Ok(Weights {
            tensors,
            source: PathBuf::from(format!("<random seed {seed}>")),
        })
    }

    /// Takes a tensor and checks its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            path: self.source.clone(),
            message: "missing".into(),
        })?;
        if t.dims() != shape {
            return Err(Error::Tensor {
                name: name.to_string(),
                path: self.source.clone(),
                message: format!("expected shape {shape:?}, found {:?}", t.dims()),
            });
        }
        Ok(t)
    }

    /// Takes a tensor if present.
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names not taken yet, sorted.
    pub fn remaining(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    /// Where the tensors came from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}
