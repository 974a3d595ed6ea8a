//! Named tensors as found in a checkpoint (HF names), with shape checks that say
//! which tensor in which file is wrong.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::linear::BaseQuant;
use crate::nf4::{Absmax, Nested, Nf4Matrix};
use crate::packed::PackedWeight;
use crate::rng::Rng;

/// A bag of checkpoint tensors, already on the target device and dtype; projections
/// may already be packed (NF4, int8) when the model is loaded with a quantized base.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    packed: HashMap<String, Arc<dyn PackedWeight>>,
    source: PathBuf,
}

/// Whether a checkpoint tensor is the weight of a decoder-layer projection (what a
/// quantized base packs; embeddings, `lm_head` and norms stay dense).
pub fn is_projection_weight(name: &str) -> bool {
    name.starts_with("model.layers.")
        && name.ends_with("_proj.weight")
        && (name.contains(".self_attn.") || name.contains(".mlp."))
}

impl Weights {
    /// Wraps tensors read from `source` (used in error messages).
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Weights {
        Weights {
            tensors,
            packed: HashMap::new(),
            source: source.into(),
        }
    }

    /// Packs the projection `name` (`[out, in]`, dense) as `how`, dropping the dense
    /// copy: called as each tensor is read, so a quantized base never exists in full
    /// precision as a whole.
    pub fn insert_packed_or_dense(
        &mut self,
        name: String,
        t: Tensor,
        how: BaseQuant,
        double_quant: bool,
    ) -> Result<()> {
        if how != BaseQuant::None && is_projection_weight(&name) && t.rank() == 2 {
            let mut lin = crate::linear::Linear::new(t, None);
            lin.pack(how, double_quant)?;
            if let Some(p) = lin.packed {
                self.packed.insert(name, p);
                return Ok(());
            }
            self.tensors.insert(name, lin.weight);
            return Ok(());
        }
        self.tensors.insert(name, t);
        Ok(())
    }

    /// Adds a projection that a checkpoint already stores packed.
    pub fn insert_packed(&mut self, name: String, p: Arc<dyn PackedWeight>) {
        self.packed.insert(name, p);
    }

    /// Takes a projection that was packed while loading.
    pub fn take_packed(&mut self, name: &str) -> Option<Arc<dyn PackedWeight>> {
        self.packed.remove(name)
    }

    /// Reads one or several safetensors files, converting to `dtype` on `device`.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Weights> {
        Weights::from_safetensors_packed(files, dtype, device, BaseQuant::None, false)
    }

    /// [`Weights::from_safetensors`], packing each projection as `how` as soon as it is
    /// read (tensors are read one at a time, so the dense projections never coexist).
    pub fn from_safetensors_packed(
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        how: BaseQuant,
        double_quant: bool,
    ) -> Result<Weights> {
        let source = match files {
            [one] => one.clone(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        let mut w = Weights::new(HashMap::new(), source);
        for file in files {
            let bad = |e: String| Error::format(file, format!("cannot read safetensors: {e}"));
            let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
            let n = u64::from_le_bytes(len) as usize;
            if n > 100_000_000 {
                return Err(bad(format!("a header of {n} bytes")));
            }
            let mut header = vec![0u8; n];
            f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
            let meta: safetensors::tensor::Metadata =
                serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
            let base = 8 + n as u64;
            for name in meta.offset_keys() {
                let info = meta.info(&name).expect("listed by the header");
                let st_dtype =
                    DType::try_from(info.dtype).map_err(|e| bad(format!("{name}: {e}")))?;
                let (start, end) = info.data_offsets;
                let mut bytes = vec![0u8; end - start];
                f.seek(SeekFrom::Start(base + start as u64))
                    .map_err(|e| bad(e.to_string()))?;
                f.read_exact(&mut bytes).map_err(|e| bad(e.to_string()))?;
                let shape = info.shape.clone();
                let t = Tensor::from_raw_buffer(&bytes, st_dtype, &shape, &Device::Cpu)
                    .map_err(|e| bad(format!("{name}: {e}")))?;
                drop(bytes);
                // bitsandbytes' quantization statistics stay f32 whatever the model dtype.
                let t = if t.dtype().is_float() && !is_bnb_state(&name) {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                let t = t.to_device(device)?;
                w.insert_packed_or_dense(name, t, how, double_quant)?;
            }
        }
        Ok(w)
    }

    /// Takes the bitsandbytes 4-bit weight `{name}.weight` (packed u8 plus its
    /// `.absmax`, `.quant_map`, optional `.nested_absmax`/`.nested_quant_map` and the
    /// `.quant_state.bitsandbytes__nf4` JSON, as transformers' `save_pretrained`
    /// writes a 4-bit model), if the checkpoint holds one for this projection.
    pub fn take_bnb_4bit(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<Option<Nf4Matrix>> {
        let w = format!("{name}.weight");
        let state_name = format!("{w}.quant_state.bitsandbytes__nf4");
        if !self.tensors.contains_key(&state_name) {
            if self
                .tensors
                .contains_key(&format!("{w}.quant_state.bitsandbytes__fp4"))
            {
                return Err(self.bad(&w, "bitsandbytes FP4 weights are not supported; quantize with `bnb_4bit_quant_type=\"nf4\"`"));
            }
            return Ok(None);
        }
        let state = self.tensors.remove(&state_name).expect("checked");
        let bytes: Vec<u8> = state.flatten_all()?.to_vec1()?;
        let meta: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad(&state_name, &format!("not JSON: {e}")))?;
        let field = |k: &str| meta.get(k).cloned().unwrap_or(serde_json::Value::Null);
        if field("quant_type") != "nf4" {
            return Err(self.bad(
                &state_name,
                &format!("quant_type {} is not nf4", field("quant_type")),
            ));
        }
        if field("blocksize").as_u64() != Some(crate::nf4::BLOCK as u64) {
            return Err(self.bad(
                &state_name,
                &format!("blocksize {} is not 64", field("blocksize")),
            ));
        }
        let shape: Vec<usize> = serde_json::from_value(field("shape"))
            .map_err(|e| self.bad(&state_name, &format!("shape: {e}")))?;
        if shape != [out, inp] {
            return Err(self.bad(
                &w,
                &format!("quantized shape {shape:?}, expected [{out}, {inp}]"),
            ));
        }
        let packed: Vec<u8> = self.take_raw(&w)?.flatten_all()?.to_vec1()?;
        let quant_map: Vec<f32> = self
            .take_raw(&format!("{w}.quant_map"))?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let absmax_t = self.take_raw(&format!("{w}.absmax"))?;
        let absmax = if field("nested_blocksize").is_u64() {
            if field("nested_blocksize").as_u64() != Some(crate::nf4::NESTED_BLOCK as u64) {
                return Err(self.bad(&state_name, "nested_blocksize is not 256"));
            }
            let offset = field("nested_offset")
                .as_f64()
                .ok_or_else(|| self.bad(&state_name, "nested_offset is missing"))?
                as f32;
            Absmax::Nested(Nested {
                codes: absmax_t.flatten_all()?.to_vec1()?,
                offset,
                absmax: self
                    .take_raw(&format!("{w}.nested_absmax"))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
                code: self
                    .take_raw(&format!("{w}.nested_quant_map"))?
                    .to_dtype(DType::F32)?
                    .to_vec1()?,
            })
        } else {
            Absmax::Plain(absmax_t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let code = crate::nf4::nf4_code();
        if quant_map.len() != 16
            || quant_map
                .iter()
                .zip(&code)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(self.bad(&w, "its quant_map is not the NF4 code book"));
        }
        let m = Nf4Matrix {
            rows: out,
            cols: inp,
            packed,
            absmax,
        };
        m.validate().map_err(|e| self.bad(&w, &e.to_string()))?;
        Ok(Some(m))
    }

    /// Takes a tensor as stored (any shape or dtype).
    fn take_raw(&mut self, name: &str) -> Result<Tensor> {
        self.tensors.remove(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            path: self.source.clone(),
            message: "missing (a bitsandbytes 4-bit weight needs it)".into(),
        })
    }

    fn bad(&self, name: &str, message: &str) -> Error {
        Error::Tensor {
            name: name.to_string(),
            path: self.source.clone(),
            message: message.to_string(),
        }
    }

    /// Random weights for a config, as HF initialises them (normal σ = 0.02, norms 1, biases 0).
    pub fn random(cfg: &Config, seed: u64, dtype: DType, device: &Device) -> Result<Weights> {
        Weights::random_packed(cfg, seed, dtype, device, BaseQuant::None, false)
    }

    /// [`Weights::random`] with each projection packed as `how` as soon as it is drawn
    /// (so a large shape never exists in full precision as a whole).
    pub fn random_packed(
        cfg: &Config,
        seed: u64,
        dtype: DType,
        device: &Device,
        how: BaseQuant,
        double_quant: bool,
    ) -> Result<Weights> {
        let mut rng = Rng::new(seed);
        let mut weights = Weights::new(
            HashMap::new(),
            PathBuf::from(format!("<random seed {seed}>")),
        );
        let normal = |shape: &[usize], rng: &mut Rng| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_size());
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let ones = |n: usize| Tensor::ones(n, dtype, device);
        let zeros = |n: usize| Tensor::zeros(n, dtype, device);
        weights.tensors.insert(
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
                weights.insert_packed_or_dense(
                    format!("{p}.{name}.weight"),
                    normal(&[out, inp], &mut rng)?,
                    how,
                    double_quant,
                )?;
                let biased = if name == "self_attn.o_proj" {
                    cfg.o_bias()
                } else {
                    name.starts_with("self_attn") && cfg.qkv_bias()
                };
                if biased {
                    weights
                        .tensors
                        .insert(format!("{p}.{name}.bias"), zeros(out)?);
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
                weights
                    .tensors
                    .insert(format!("{p}.{name}.weight"), norm_init(n)?);
            }
        }
        weights
            .tensors
            .insert("model.norm.weight".into(), norm_init(h)?);
        if !cfg.tie_word_embeddings {
            weights.tensors.insert(
                "lm_head.weight".into(),
                normal(&[cfg.vocab_size, h], &mut rng)?,
            );
        }
        Ok(weights)
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
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .chain(self.packed.keys())
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Where the tensors came from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// Whether `name` is one of bitsandbytes' quantization statistics (kept in f32).
fn is_bnb_state(name: &str) -> bool {
    [
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}
