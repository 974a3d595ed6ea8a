//! The decoder: one implementation for every family pipe-train knows (Llama, Qwen2,
//! Mistral, Qwen3, Gemma, Gemma 2, Phi-3), written for training. Every op has a
//! backward (RMSNorm, RoPE and softmax are fused CPU kernels with their own backward,
//! or composed from primitive ops), the mask is causal plus padding (plus a window on
//! sliding layers), hidden states and logits come out for every position, and the KV
//! cache lives outside the model. What differs between families is read from the
//! [`Config`]: fused projections, q/k norms, norm offset, activation, soft-capping and
//! the per-layer window.
//!
//! Field and tensor names follow HF checkpoints (`model.layers.N.self_attn.q_proj`).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::config::{Activation, Config};
use crate::error::Result;
use crate::linear::{embed, rms_norm, Linear};
use crate::rng::Rng;
use crate::weights::Weights;

/// Which keys each row may attend to: `valid[b * keys + j]` is false for padding.
#[derive(Debug, Clone)]
pub struct KeyMask {
    /// Rows in the batch.
    pub batch: usize,
    /// Keys per row (cached + new tokens).
    pub keys: usize,
    /// Row-major validity.
    pub valid: Vec<bool>,
}

impl KeyMask {
    /// Every key valid.
    pub fn full(batch: usize, keys: usize) -> KeyMask {
        KeyMask {
            batch,
            keys,
            valid: vec![true; batch * keys],
        }
    }

    /// Positions of the last `queries` keys of each row: the number of valid keys
    /// before them (so left padding does not shift RoPE), as HF computes them.
    pub fn positions(&self, queries: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.batch * queries);
        for b in 0..self.batch {
            let row = &self.valid[b * self.keys..(b + 1) * self.keys];
            let mut seen = 0usize;
            for (j, &v) in row.iter().enumerate() {
                if j >= self.keys - queries {
                    out.push(if v { seen as f32 } else { 1.0 });
                }
                seen += v as usize;
            }
        }
        out
    }

    /// Additive mask `[b, 1, queries, keys]`: 0 where allowed, a large negative
    /// number where not (finite, so fully padded rows do not produce NaN).
    pub fn additive(
        &self,
        queries: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let m = self.additive_values(queries, window);
        Ok(Tensor::from_vec(
            m,
            (self.batch, 1, queries, self.keys),
            device,
        )?)
    }

    /// The values of [`KeyMask::additive`], row-major `[b, queries, keys]`.
    pub fn additive_values(&self, queries: usize, window: Option<usize>) -> Vec<f32> {
        let past = self.keys - queries;
        let mut m = vec![0f32; self.batch * queries * self.keys];
        for b in 0..self.batch {
            for i in 0..queries {
                let qpos = past + i;
                for j in 0..self.keys {
                    let ok = self.valid[b * self.keys + j]
                        && j <= qpos
                        && window.is_none_or(|w| qpos - j < w);
                    if !ok {
                        m[(b * queries + i) * self.keys + j] = -1e30;
                    }
                }
            }
        }
        m
    }
}

/// Per-layer keys and values from earlier calls, `[b, kv_heads, t, head]`.
///
/// Decoding appends one token per step: the keys and values then live in buffers with
/// room to grow (written in place, doubled when full), so a step does not copy the
/// whole cache. A clone shares what is cached but not the room (its first append
/// copies), so two clones never write over each other.
#[derive(Debug, Default)]
pub struct KvCache {
    /// What is cached (views of `room` when there is one).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Buffers behind `layers`, longer along the token axis.
    room: Vec<Option<(Tensor, Tensor)>>,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            layers: self.layers.clone(),
            room: vec![None; self.layers.len()],
        }
    }
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> KvCache {
        KvCache {
            layers: vec![None; layers],
            room: vec![None; layers],
        }
    }

    /// From whole per-layer tensors.
    fn of(layers: Vec<Option<(Tensor, Tensor)>>) -> KvCache {
        let room = vec![None; layers.len()];
        KvCache { layers, room }
    }

    /// Appends `k`, `v` (`[b, kv_heads, s, head]`) to layer `l`; returns everything
    /// cached for it. Writes into the layer's buffer when it has room, else moves the
    /// layer into a new buffer twice as long.
    fn append(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, s, d) = k.dims4()?;
        let len = self.layers[l].as_ref().map_or(Ok(0), |(k, _)| k.dim(2))?;
        let need = len + s;
        let fits = matches!(&self.room[l], Some((rk, _)) if rk.dim(2)? >= need);
        if !fits {
            let cap = (2 * len).max(need + 64);
            let rk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let rv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let Some((pk, pv)) = &self.layers[l] {
                rk.slice_set(&pk.contiguous()?, 2, 0)?;
                rv.slice_set(&pv.contiguous()?, 2, 0)?;
            }
            self.room[l] = Some((rk, rv));
        }
        let (rk, rv) = self.room[l].as_ref().expect("room was made");
        rk.slice_set(&k.detach().contiguous()?, 2, len)?;
        rv.slice_set(&v.detach().contiguous()?, 2, len)?;
        let out = (rk.narrow(2, 0, need)?, rv.narrow(2, 0, need)?);
        self.layers[l] = Some(out.clone());
        Ok(out)
    }

    /// Forgets the buffers (after the cached tensors were replaced).
    fn drop_room(&mut self) {
        self.room = vec![None; self.layers.len()];
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only these batch rows (in this order): sequences that finished leave the batch.
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        let device = match self.layers.iter().flatten().next() {
            Some((k, _)) => k.device().clone(),
            None => return Ok(()),
        };
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &device,
        )?;
        self.select_rows(&idx)
    }

    /// The first `n` tokens of every layer (a prompt's cached start).
    pub fn prefix(&self, n: usize) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                Some((k, v)) => Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)),
                None => None,
            });
        }
        Ok(KvCache::of(layers))
    }

    /// Drops the first `n` tokens of every layer (key columns no row attends to).
    pub fn drop_front(&mut self, n: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let t = k.dim(2)?;
            *k = k.narrow(2, n, t - n)?;
            *v = v.narrow(2, n, t - n)?;
        }
        self.drop_room();
        Ok(())
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// One batch cache from several (each `[rows, kv_heads, t, head]`), each first
    /// left-padded with zeros by its count of key columns, so that all are as long.
    pub fn stack_left_padded(parts: &[(KvCache, usize)], layers: usize) -> Result<KvCache> {
        let mut out = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for (c, pad) in parts {
                let Some((k, v)) = &c.layers[l] else {
                    return Err(crate::Error::Invalid(format!(
                        "no keys cached for layer {l}"
                    )));
                };
                let padded = |x: &Tensor| -> Result<Tensor> {
                    if *pad == 0 {
                        return Ok(x.clone());
                    }
                    let (b, h, _, d) = x.dims4()?;
                    let z = Tensor::zeros((b, h, *pad, d), x.dtype(), x.device())?;
                    Ok(Tensor::cat(&[&z, x], 2)?)
                };
                ks.push(padded(k)?);
                vs.push(padded(v)?);
            }
            out.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        Ok(KvCache::of(out))
    }

    /// Keeps only the given batch rows (finished rows drop out of batched generation).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (layer, room) in self.layers.iter_mut().zip(self.room.iter_mut()) {
            let Some((k, v)) = layer else { continue };
            match room {
                // Select from the buffer, keeping its room.
                Some((rk, rv)) => {
                    *rk = rk.index_select(rows, 0)?;
                    *rv = rv.index_select(rows, 0)?;
                    let t = k.dim(2)?;
                    *k = rk.narrow(2, 0, t)?;
                    *v = rv.narrow(2, 0, t)?;
                }
                None => {
                    *k = k.contiguous()?.index_select(rows, 0)?;
                    *v = v.contiguous()?.index_select(rows, 0)?;
                }
            }
        }
        Ok(())
    }
}

struct Rope {
    inv_freq: Tensor,
    inv_host: Vec<f32>,
}

impl Rope {
    fn new(cfg: &Config, device: &Device) -> Result<Rope> {
        let d = cfg.head_size();
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(s) = &cfg.rope_scaling {
            let old = s.original_max_position_embeddings as f64;
            let (low_wl, high_wl) = (old / s.low_freq_factor, old / s.high_freq_factor);
            for f in inv.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                if wl > low_wl {
                    *f /= s.factor;
                } else if wl >= high_wl {
                    let smooth =
                        (old / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let inv: Vec<f32> = inv.into_iter().map(|f| f as f32).collect();
        Ok(Rope {
            inv_freq: Tensor::from_vec(inv.clone(), (1, 1, d / 2), device)?,
            inv_host: inv,
        })
    }

    /// `cos`, `sin` of shape `[b, s, head/2]` on the host, for the fused kernels.
    fn host_tables(&self, positions: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::with_capacity(positions.len() * self.inv_host.len());
        let mut sin = Vec::with_capacity(cos.capacity());
        for &p in positions {
            for &f in &self.inv_host {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    /// `cos`, `sin` of shape `[b, 1, s, head]` for positions `[b, s]`.
    fn tables(
        &self,
        positions: &[f32],
        b: usize,
        s: usize,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let pos = Tensor::from_slice(positions, (b, s, 1), self.inv_freq.device())?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
}

fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h, n, t, d))?
        .reshape((b, h * n, t, d))?)
}

/// How a call runs its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proj {
    /// With gradients (and LoRA dropout).
    Train,
    /// Without (decoding: few rows take the int8 copy).
    Infer,
    /// A prompt's prefill: always the float weight, whatever the row count.
    Prefill,
}

fn project(lin: &Linear, x: &Tensor, dropout: Option<&mut Rng>, mode: Proj) -> Result<Tensor> {
    match mode {
        Proj::Train => lin.forward(x, dropout),
        Proj::Infer => lin.forward_inference(x),
        Proj::Prefill => lin.forward_prefill(x),
    }
}

/// The query, key and value projections of one layer.
#[derive(Debug, Clone)]
pub enum Qkv {
    /// Three projections (`q_proj`, `k_proj`, `v_proj`).
    Split {
        /// Query projection.
        q_proj: Linear,
        /// Key projection.
        k_proj: Linear,
        /// Value projection.
        v_proj: Linear,
    },
    /// One projection whose output rows are queries, then keys, then values (Phi-3's
    /// `qkv_proj`; LoRA adapts it as one module, as PEFT does).
    Fused {
        /// `[(heads + 2·kv_heads)·head_dim, hidden]`.
        qkv_proj: Linear,
    },
}

/// Self-attention projections of one layer.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query, key and value projections.
    pub qkv: Qkv,
    /// Output projection.
    pub o_proj: Linear,
    /// Qwen3: RMSNorm weight `[head_dim]` applied to each query head before RoPE.
    pub q_norm: Option<Tensor>,
    /// Qwen3: the same for keys.
    pub k_norm: Option<Tensor>,
}

/// The gate and up projections of one layer's MLP.
#[derive(Debug, Clone)]
pub enum GateUp {
    /// Two projections (`gate_proj`, `up_proj`).
    Split {
        /// Gate projection (the activated half).
        gate_proj: Linear,
        /// Up projection.
        up_proj: Linear,
    },
    /// One projection whose first half of rows is the gate (Phi-3's `gate_up_proj`).
    Fused {
        /// `[2·intermediate, hidden]`.
        gate_up_proj: Linear,
    },
}

/// Gated MLP of one layer: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate and up projections.
    pub gate_up: GateUp,
    /// Down projection.
    pub down_proj: Linear,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Norm before attention.
    pub input_layernorm: Tensor,
    /// Attention.
    pub self_attn: Attention,
    /// Llama and most families: the norm before the MLP. Gemma 2: the norm of the
    /// attention output (before the residual add).
    pub post_attention_layernorm: Tensor,
    /// Gemma 2: the norm before the MLP.
    pub pre_feedforward_layernorm: Option<Tensor>,
    /// Gemma 2: the norm of the MLP output (before the residual add).
    pub post_feedforward_layernorm: Option<Tensor>,
    /// MLP.
    pub mlp: Mlp,
}

/// Embedding rows whose values are trained (new special tokens). With tied
/// embeddings the same rows serve as output rows, as in PEFT.
#[derive(Debug, Clone)]
pub struct TrainableTokens {
    /// Token ids, in order.
    pub ids: Vec<u32>,
    /// Their embedding rows, `[ids, hidden]`.
    pub values: Var,
    /// Their rows of an untied output layer, `[ids, hidden]` (a tied model's output
    /// rows are `values`).
    pub head: Option<Var>,
    ids_t: Tensor,
}

/// RoPE tables: host vectors for the fused CPU kernel, tensors elsewhere.
enum Tables {
    /// f32 `[b, s, d/2]` angle tables for the fused rotation (CPU f32, GPU).
    Fused(Tensor, Tensor),
    /// `[b, 1, s, d]` tables in the model dtype for the composed rotation.
    Composed(Tensor, Tensor),
}

/// The additive attention mask for one window.
struct Mask {
    window: Option<usize>,
    /// Values for the fused kernel.
    values: Arc<Vec<f32>>,
    /// The same as a `[b, 1, q, k]` tensor when the fused kernel is not used.
    tensor: Option<Tensor>,
}

/// What every layer of one forward call shares.
struct Step {
    b: usize,
    s: usize,
    tables: Tables,
    masks: Vec<Mask>,
    fused: bool,
    inference: bool,
    /// A packed prefill: the one row holds several prompts one after the other, each
    /// attending to its own cached past and its own tokens only.
    segments: Vec<PackedSegment>,
}

/// One prompt of a packed call: where its tokens sit in the row, what it attends to.
struct PackedSegment {
    start: usize,
    len: usize,
    past: Option<KvCache>,
    masks: Vec<Mask>,
}

/// The shapes and scaling of one attention call.
#[derive(Debug, Clone, Copy)]
struct Attend {
    b: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    scale: f64,
    softcap: Option<f64>,
}

/// Where a layer's keys and values go.
enum CacheSink<'a> {
    /// Nowhere (training, scoring).
    None,
    /// Appended to a batch's cache.
    Batch(&'a mut KvCache),
    /// One cache per segment of a packed call.
    Segments(&'a mut [KvCache]),
}

/// A prompt for [`Decoder::prefill_packed`]: `ids` continue what `past` (a one-row cache
/// of the tokens before them, e.g. a shared system prompt) already holds.
#[derive(Debug, Clone, Copy)]
pub struct Prefill<'a> {
    /// The tokens to run.
    pub ids: &'a [u32],
    /// Keys and values of the tokens before `ids`, when some are cached.
    pub past: Option<&'a KvCache>,
}

/// The decoder LM.
pub struct Decoder {
    cfg: Config,
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// Layers in order.
    pub layers: Vec<Layer>,
    /// Final norm.
    pub norm: Tensor,
    /// Output projection; shares the embedding when the config ties them.
    pub lm_head: Linear,
    /// Embedding rows trained as values (new special tokens), PEFT's trainable-tokens layout.
    pub tokens: Option<TrainableTokens>,
    rope: Rope,
    activation: Activation,
    dtype: DType,
    device: Device,
    /// Use [`crate::attention::ChunkedAttention`] on every device, with this many query
    /// rows per chunk (0: by its budget); the GPU always does for calls with many rows.
    /// Tests run the GPU's attention path on the CPU with it.
    chunked_attention: Option<usize>,
}

impl Decoder {
    /// Builds the model from checkpoint tensors; every tensor must be used.
    pub fn new(cfg: &Config, mut w: Weights) -> Result<Decoder> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_size());
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let activation = cfg
            .activation()
            .map_err(|m| crate::Error::format(w.source(), m))?;
        let embed_tokens = w.take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let dtype = embed_tokens.dtype();
        let device = embed_tokens.device().clone();
        let linear =
            |w: &mut Weights, name: String, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let bias = if bias {
                    Some(w.take(&format!("{name}.bias"), &[out])?)
                } else {
                    None
                };
                // A checkpoint bitsandbytes saved in 4-bit stays packed.
                if let Some(q) = w.take_bnb_4bit(&name, out, inp)? {
                    return Linear::from_packed(Arc::new(q), bias, dtype, &device);
                }
                // So does a projection packed while loading (a quantized base).
                if let Some(p) = w.take_packed(&format!("{name}.weight")) {
                    if (p.rows(), p.cols()) != (out, inp) {
                        return Err(crate::Error::Tensor {
                            name: format!("{name}.weight"),
                            path: w.source().to_path_buf(),
                            message: format!(
                                "shape [{}, {}], expected [{out}, {inp}]",
                                p.rows(),
                                p.cols()
                            ),
                        });
                    }
                    return Linear::from_packed(p, bias, dtype, &device);
                }
                let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
                Ok(Linear::new(weight, bias))
            };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let qkv = if cfg.fused_projections() {
                Qkv::Fused {
                    qkv_proj: linear(
                        &mut w,
                        format!("{p}.self_attn.qkv_proj"),
                        q + 2 * kv,
                        h,
                        cfg.qkv_bias(),
                    )?,
                }
            } else {
                Qkv::Split {
                    q_proj: linear(
                        &mut w,
                        format!("{p}.self_attn.q_proj"),
                        q,
                        h,
                        cfg.qkv_bias(),
                    )?,
                    k_proj: linear(
                        &mut w,
                        format!("{p}.self_attn.k_proj"),
                        kv,
                        h,
                        cfg.qkv_bias(),
                    )?,
                    v_proj: linear(
                        &mut w,
                        format!("{p}.self_attn.v_proj"),
                        kv,
                        h,
                        cfg.qkv_bias(),
                    )?,
                }
            };
            let (q_norm, k_norm) = if cfg.qk_norm() {
                (
                    Some(w.take(&format!("{p}.self_attn.q_norm.weight"), &[hd])?),
                    Some(w.take(&format!("{p}.self_attn.k_norm.weight"), &[hd])?),
                )
            } else {
                (None, None)
            };
            let gate_up = if cfg.fused_projections() {
                GateUp::Fused {
                    gate_up_proj: linear(&mut w, format!("{p}.mlp.gate_up_proj"), 2 * i, h, false)?,
                }
            } else {
                GateUp::Split {
                    gate_proj: linear(&mut w, format!("{p}.mlp.gate_proj"), i, h, false)?,
                    up_proj: linear(&mut w, format!("{p}.mlp.up_proj"), i, h, false)?,
                }
            };
            let (pre_ff, post_ff) = if cfg.sandwich_norms() {
                (
                    Some(w.take(&format!("{p}.pre_feedforward_layernorm.weight"), &[h])?),
                    Some(w.take(&format!("{p}.post_feedforward_layernorm.weight"), &[h])?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: Attention {
                    qkv,
                    o_proj: linear(&mut w, format!("{p}.self_attn.o_proj"), h, q, cfg.o_bias())?,
                    q_norm,
                    k_norm,
                },
                post_attention_layernorm: w
                    .take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                pre_feedforward_layernorm: pre_ff,
                post_feedforward_layernorm: post_ff,
                mlp: Mlp {
                    gate_up,
                    down_proj: linear(&mut w, format!("{p}.mlp.down_proj"), h, i, false)?,
                },
            });
        }
        let norm = w.take("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            // Some tied checkpoints still ship a copy; it must be the same matrix.
            let _ = w.take_opt("lm_head.weight", &[cfg.vocab_size, h])?;
            Linear::new(embed_tokens.clone(), None)
        } else {
            linear(&mut w, "lm_head".into(), cfg.vocab_size, h, false)?
        };
        let left: Vec<String> = w
            .remaining()
            .into_iter()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !left.is_empty() {
            return Err(crate::Error::format(
                w.source(),
                format!(
                    "tensors not used by a {:?} model: {}",
                    cfg.architecture,
                    left.join(", ")
                ),
            ));
        }
        Ok(Decoder {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            tokens: None,
            rope: Rope::new(cfg, &device)?,
            activation,
            dtype,
            device,
            chunked_attention: None,
        })
    }

    /// Computes attention by query chunks of `rows` rows (0: by the budget;
    /// [`crate::attention::ChunkedAttention`], what the GPU trains with) on any device,
    /// instead of the device's default; `None` restores the default.
    pub fn use_chunked_attention(&mut self, rows: Option<usize>) {
        self.chunked_attention = rows;
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Weight dtype (activations use it too).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Keeps every projection of every layer packed as `how` (NF4 or int8) instead of
    /// dense, for training adapters on a quantized base (QLoRA). The embedding and
    /// `lm_head` stay dense, as bitsandbytes leaves them.
    pub fn quantize_base(
        &mut self,
        how: crate::linear::BaseQuant,
        double_quant: bool,
    ) -> Result<()> {
        for (_, lin) in self.linears_mut() {
            lin.pack(how, double_quant)?;
        }
        Ok(())
    }

    /// Adds int8 copies of every projection and of `lm_head` for decoding (see
    /// [`Linear::quantize`]); training and prefill keep using f32.
    pub fn quantize_for_decoding(&mut self) -> Result<()> {
        for (_, lin) in self.linears_mut() {
            lin.quantize()?;
        }
        self.lm_head.quantize()
    }

    /// Every projection with its checkpoint name (without `.weight`), in layer order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            let a = &mut layer.self_attn;
            match &mut a.qkv {
                Qkv::Split {
                    q_proj,
                    k_proj,
                    v_proj,
                } => {
                    out.push((format!("{p}.self_attn.q_proj"), q_proj));
                    out.push((format!("{p}.self_attn.k_proj"), k_proj));
                    out.push((format!("{p}.self_attn.v_proj"), v_proj));
                }
                Qkv::Fused { qkv_proj } => out.push((format!("{p}.self_attn.qkv_proj"), qkv_proj)),
            }
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut layer.mlp;
            match &mut m.gate_up {
                GateUp::Split { gate_proj, up_proj } => {
                    out.push((format!("{p}.mlp.gate_proj"), gate_proj));
                    out.push((format!("{p}.mlp.up_proj"), up_proj));
                }
                GateUp::Fused { gate_up_proj } => {
                    out.push((format!("{p}.mlp.gate_up_proj"), gate_up_proj))
                }
            }
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    /// RMSNorm as this family computes it: `x·w`, or `x·(1+w)` in f32 for Gemma.
    fn norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        if !self.cfg.architecture.offset_norms() {
            return rms_norm(x, weight, eps);
        }
        let dtype = x.dtype();
        let w1 = (weight.to_dtype(DType::F32)? + 1.0)?;
        if dtype == DType::F32 {
            return rms_norm(x, &w1, eps);
        }
        if x.device().is_cuda() {
            // One rounding at the end, as Gemma does.
            let op = crate::fused::RmsNorm {
                eps: eps as f32,
                round_first: false,
            };
            return Ok(x.contiguous()?.apply_op2(&w1, op)?);
        }
        // Gemma multiplies in f32 and rounds once, unlike Llama (round, then multiply).
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&w1)?.to_dtype(dtype)?)
    }

    /// Final hidden states `[b, s, hidden]` for `ids: [b, s]`.
    ///
    /// `keys` covers the cached tokens plus `ids`. With `cache`, keys and values
    /// of this call are appended to it. `dropout` enables LoRA dropout (training).
    pub fn hidden(
        &self,
        ids: &Tensor,
        keys: &KeyMask,
        mut cache: Option<&mut KvCache>,
        mut dropout: Option<&mut Rng>,
    ) -> Result<Tensor> {
        // With a cache this is generation: nothing needs a gradient.
        let st = self.step(ids, keys, cache.is_some())?;
        let mut x = self.embed_ids(ids, st.inference)?;
        for l in 0..self.layers.len() {
            let sink = match cache.as_deref_mut() {
                Some(c) => CacheSink::Batch(c),
                None => CacheSink::None,
            };
            x = self.layer_forward(l, x, &st, sink, dropout.as_deref_mut())?;
        }
        self.norm(&x, &self.norm)
    }

    /// Runs several prompts in one call without padding: their tokens are laid end to
    /// end in one row, so every projection is one matmul over all of them, while each
    /// prompt attends only to its own past (`Prefill::past`) and its own earlier tokens,
    /// at its own positions. Returns the final hidden state of each prompt's last token
    /// (`[prompts, hidden]`) and each prompt's one-row cache (past plus its tokens),
    /// ready to decode from. Inference only.
    pub fn prefill_packed(&self, prompts: &[Prefill]) -> Result<(Tensor, Vec<KvCache>)> {
        let layers = self.layers.len();
        let total: usize = prompts.iter().map(|p| p.ids.len()).sum();
        if prompts.iter().any(|p| p.ids.is_empty()) {
            return Err(crate::Error::Invalid(
                "prefill_packed: a prompt has no tokens".into(),
            ));
        }
        let mut flat = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut segments = Vec::with_capacity(prompts.len());
        let fused = self.fused();
        for p in prompts {
            let past = p.past.map_or(0, KvCache::len);
            positions.extend((past..past + p.ids.len()).map(|x| x as f32));
            let keys = KeyMask::full(1, past + p.ids.len());
            let mut masks: Vec<Mask> = Vec::new();
            for l in 0..layers {
                let window = self.cfg.window(l);
                if !masks.iter().any(|m| m.window == window) {
                    masks.push(self.mask(&keys, p.ids.len(), window, fused)?);
                }
            }
            segments.push(PackedSegment {
                start: flat.len(),
                len: p.ids.len(),
                past: p.past.cloned(),
                masks,
            });
            flat.extend_from_slice(p.ids);
        }
        let ids = Tensor::from_vec(flat, (1, total), &self.device)?;
        let st = Step {
            b: 1,
            s: total,
            tables: self.tables(&positions, 1, total, fused)?,
            masks: Vec::new(),
            fused,
            inference: true,
            segments,
        };
        let mut caches = vec![KvCache::new(layers); prompts.len()];
        let mut x = self.embed_ids(&ids, true)?;
        for l in 0..layers {
            x = self.layer_forward(l, x, &st, CacheSink::Segments(&mut caches), None)?;
        }
        let lasts: Vec<u32> = st
            .segments
            .iter()
            .map(|g| (g.start + g.len - 1) as u32)
            .collect();
        let idx = Tensor::from_vec(lasts, prompts.len(), &self.device)?;
        let last = x.squeeze(0)?.index_select(&idx, 0)?;
        Ok((self.norm(&last, &self.norm)?, caches))
    }

    /// Whether this call runs the fused kernels: the CPU ones in f32, the GPU ones in
    /// f32 and bf16.
    fn fused(&self) -> bool {
        (self.device.is_cpu() && self.dtype == DType::F32)
            || (self.device.is_cuda() && matches!(self.dtype, DType::F32 | DType::BF16))
    }

    /// RoPE tables for `positions` (`[b, s]`, row-major).
    fn tables(&self, positions: &[f32], b: usize, s: usize, fused: bool) -> Result<Tables> {
        if fused {
            let (cos, sin) = self.rope.host_tables(positions);
            let half = cos.len() / (b * s).max(1);
            let t = |v: Vec<f32>| Tensor::from_vec(v, (b, s, half), &self.device);
            Ok(Tables::Fused(t(cos)?, t(sin)?))
        } else {
            let (cos, sin) = self.rope.tables(positions, b, s, self.dtype)?;
            Ok(Tables::Composed(cos, sin))
        }
    }

    /// The additive mask of `s` new queries over `keys` for one window.
    fn mask(&self, keys: &KeyMask, s: usize, window: Option<usize>, fused: bool) -> Result<Mask> {
        let values = Arc::new(keys.additive_values(s, window));
        // The fused CPU kernel reads the values; the GPU's tiled attention reads the
        // tensor (uploaded once per call, shared by the layers).
        let tensor = if fused && !self.device.is_cuda() && self.chunked_attention.is_none() {
            None
        } else {
            Some(Tensor::from_vec(
                values.as_ref().clone(),
                (keys.batch, 1, s, keys.keys),
                &self.device,
            )?)
        };
        Ok(Mask {
            window,
            values,
            tensor,
        })
    }

    /// What every layer of one call shares: shapes, RoPE tables, a mask per window.
    fn step(&self, ids: &Tensor, keys: &KeyMask, inference: bool) -> Result<Step> {
        let (b, s) = ids.dims2()?;
        let fused = self.fused();
        let tables = self.tables(&keys.positions(s), b, s, fused)?;
        // One mask per distinct window (Gemma 2 alternates two).
        let mut masks: Vec<Mask> = Vec::new();
        for l in 0..self.layers.len() {
            let window = self.cfg.window(l);
            if !masks.iter().any(|m| m.window == window) {
                masks.push(self.mask(keys, s, window, fused)?);
            }
        }
        Ok(Step {
            b,
            s,
            tables,
            masks,
            fused,
            inference,
            segments: Vec::new(),
        })
    }

    /// Token embeddings (trained rows in place; √hidden-scaled for Gemma).
    fn embed_ids(&self, ids: &Tensor, inference: bool) -> Result<Tensor> {
        let mut x = embed(&self.embedding(inference)?, ids)?;
        if self.cfg.architecture.offset_norms() {
            // Gemma scales embeddings by √hidden, rounded to the activation dtype.
            x = x.affine((self.cfg.hidden_size as f64).sqrt(), 0.0)?;
        }
        Ok(x)
    }

    /// Decoder layer `l` on the residual stream `x`.
    fn layer_forward(
        &self,
        l: usize,
        mut x: Tensor,
        st: &Step,
        cache: CacheSink,
        mut dropout: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, s, inference, fused) = (st.b, st.s, st.inference, st.fused);
        let mode = match (inference, st.segments.is_empty()) {
            (false, _) => Proj::Train,
            (true, true) => Proj::Infer,
            (true, false) => Proj::Prefill,
        };
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_size());
        let scale = cfg.attention_scale();
        let softcap = cfg
            .attn_logit_softcapping
            .filter(|_| cfg.architecture == crate::Architecture::Gemma2);
        let rope = |x: &Tensor| -> Result<Tensor> {
            match &st.tables {
                Tables::Fused(cos, sin) => {
                    Ok(x.contiguous()?
                        .apply_op3(cos, sin, crate::fused::Rope::FORWARD)?)
                }
                Tables::Composed(cos, sin) => apply_rope(x, cos, sin),
            }
        };
        let layer = &self.layers[l];
        let a = &layer.self_attn;
        let h = self.norm(&x, &layer.input_layernorm)?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = match &a.qkv {
            Qkv::Split {
                q_proj,
                k_proj,
                v_proj,
            } => (
                project(q_proj, &h, dropout.as_deref_mut(), mode)?,
                project(k_proj, &h, dropout.as_deref_mut(), mode)?,
                project(v_proj, &h, dropout.as_deref_mut(), mode)?,
            ),
            Qkv::Fused { qkv_proj } => {
                let y = project(qkv_proj, &h, dropout.as_deref_mut(), mode)?;
                let (nq, nk) = (nh * hd, nkv * hd);
                (
                    y.narrow(D::Minus1, 0, nq)?,
                    y.narrow(D::Minus1, nq, nk)?,
                    y.narrow(D::Minus1, nq + nk, nk)?,
                )
            }
        };
        let mut q = heads(q, nh)?;
        let mut k = heads(k, nkv)?;
        let v = heads(v, nkv)?;
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            q = rms_norm(&q, qn, cfg.rms_norm_eps)?;
            k = rms_norm(&k, kn, cfg.rms_norm_eps)?;
        }
        let q = rope(&q)?;
        let k = rope(&k)?;
        let window = cfg.window(l);
        fn mask_of(masks: &[Mask], window: Option<usize>) -> &Mask {
            masks
                .iter()
                .find(|m| m.window == window)
                .expect("a mask per window")
        }
        let at = Attend {
            b,
            s,
            nh,
            nkv,
            hd,
            scale,
            softcap,
        };
        let o = match cache {
            CacheSink::Segments(caches) => {
                // A packed prefill: each prompt attends to its own past and tokens.
                let mut outs = Vec::with_capacity(st.segments.len());
                for (g, c) in st.segments.iter().zip(caches.iter_mut()) {
                    let q = q.narrow(2, g.start, g.len)?.contiguous()?;
                    let mut k = k.narrow(2, g.start, g.len)?;
                    let mut v = v.narrow(2, g.start, g.len)?;
                    if let Some((pk, pv)) = g.past.as_ref().and_then(|p| p.layers[l].as_ref()) {
                        k = Tensor::cat(&[pk, &k], 2)?;
                        v = Tensor::cat(&[pv, &v], 2)?;
                    }
                    let (k, v) = (k.contiguous()?, v.contiguous()?);
                    c.layers[l] = Some((k.clone(), v.clone()));
                    let one = Attend {
                        b: 1,
                        s: g.len,
                        ..at
                    };
                    outs.push(self.attend(&q, &k, &v, mask_of(&g.masks, window), one)?);
                }
                Tensor::cat(&outs, 2)?
            }
            sink => {
                let (mut k, mut v) = (k, v);
                if let CacheSink::Batch(c) = sink {
                    // Cached values never need a gradient (they are stored detached).
                    (k, v) = c.append(l, &k, &v)?;
                }
                self.attend(&q, &k, &v, mask_of(&st.masks, window), at)?
            }
        };
        let o = o.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        let mut o = project(&a.o_proj, &o, dropout.as_deref_mut(), mode)?;
        let h = match &layer.pre_feedforward_layernorm {
            Some(pre) => {
                o = self.norm(&o, &layer.post_attention_layernorm)?;
                x = (x + o)?;
                self.norm(&x, pre)?
            }
            None => {
                x = (x + o)?;
                self.norm(&x, &layer.post_attention_layernorm)?
            }
        };
        let m = &layer.mlp;
        let (g, u) = match &m.gate_up {
            GateUp::Split { gate_proj, up_proj } => (
                project(gate_proj, &h, dropout.as_deref_mut(), mode)?,
                project(up_proj, &h, dropout.as_deref_mut(), mode)?,
            ),
            GateUp::Fused { gate_up_proj } => {
                let y = project(gate_up_proj, &h, dropout.as_deref_mut(), mode)?;
                let half = y.dim(D::Minus1)? / 2;
                (
                    y.narrow(D::Minus1, 0, half)?,
                    y.narrow(D::Minus1, half, half)?,
                )
            }
        };
        let glu = match self.activation {
            Activation::Silu => crate::fused::GluAct::Silu,
            Activation::GeluTanh => crate::fused::GluAct::GeluTanh,
            Activation::Gelu => crate::fused::GluAct::GeluErf,
        };
        let act = match self.activation {
            _ if fused => g
                .contiguous()?
                .apply_op2(&u.contiguous()?, crate::fused::Glu { act: glu })?,
            Activation::Silu => (g.silu()? * u)?,
            Activation::GeluTanh => (g.gelu()? * u)?,
            Activation::Gelu => (g.gelu_erf()? * u)?,
        };
        let mut m = project(&m.down_proj, &act, dropout, mode)?;
        if let Some(post) = &layer.post_feedforward_layernorm {
            m = self.norm(&m, post)?;
        }
        x = (x + m)?;
        Ok(x)
    }

    /// Scaled dot-product attention of `q` (`[b, heads, s, head]`) over `k`, `v`
    /// (`[b, kv_heads, t, head]`) under `mask`, by the path this device takes:
    /// `[b, heads, s, head]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, m: &Mask, at: Attend) -> Result<Tensor> {
        let Attend {
            b,
            s,
            nh,
            nkv,
            hd,
            scale,
            softcap,
        } = at;
        let (mask_values, mask) = (&m.values, &m.tensor);
        // Gemma 2 caps the scaled scores: cap·tanh(scores·scale / cap).
        let capped = |scores: Tensor| -> Result<Tensor> {
            match softcap {
                Some(cap) => Ok(scores.affine(scale / cap, 0.0)?.tanh()?.affine(cap, 0.0)?),
                None => Ok(scores.affine(scale, 0.0)?),
            }
        };
        Ok(match mask {
            // On the GPU, calls with many query rows (training, prefill): attention by
            // query chunks on cuBLAS, recomputed in the backward (one chunk's scores in
            // memory, never [heads, s, t]).
            Some(mask)
                if self.chunked_attention.is_some()
                    || (self.device.is_cuda() && s > crate::linear::QUANTIZED_MAX_ROWS) =>
            {
                crate::attention::chunked_attention(
                    q,
                    k,
                    v,
                    crate::attention::ChunkedAttention {
                        mask: mask.clone(),
                        scale: scale as f32,
                        softcap: softcap.map(|c| c as f32),
                        chunk: self.chunked_attention.unwrap_or(0),
                    },
                )?
            }
            // Few rows (decoding): the tiled kernel, one warp per query row.
            _ if self.device.is_cuda() => crate::attention::tiled_attention(
                q,
                k,
                v,
                crate::attention::TiledAttention {
                    mask: mask_values.clone(),
                    device_mask: mask.clone(),
                    scale: scale as f32,
                    softcap: softcap.map(|c| c as f32),
                },
            )?,
            None => {
                // Grouped-query attention without copying K/V per query head:
                // the `rep` query heads of a KV head become `rep · s` rows.
                let rep = nh / nkv;
                let qg = q.reshape((b, nkv, rep * s, hd))?;
                let scores = qg.matmul(&k.t()?)?;
                let (scores, kernel_scale) = match softcap {
                    Some(_) => (capped(scores)?, 1.0),
                    None => (scores, scale as f32),
                };
                let probs = scores.apply_op1(crate::fused::MaskedSoftmax {
                    mask: mask_values.clone(),
                    scale: kernel_scale,
                    queries: s,
                })?;
                // `v` may be a view of a cache buffer: the matmul reads it strided.
                probs.matmul(v)?.reshape((b, nh, s, hd))?
            }
            Some(mask) => {
                let k = repeat_kv(k.clone(), nh / nkv)?;
                let v = repeat_kv(v.clone(), nh / nkv)?;
                let scores = capped(q.matmul(&k.t()?)?)?.to_dtype(DType::F32)?;
                let probs = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
                probs.to_dtype(self.dtype)?.matmul(&v.contiguous()?)?
            }
        })
    }

    /// Gradients of `head(final hidden states)` for `vars`, with gradient checkpointing:
    /// the forward keeps only each layer's input (the residual stream, `[b, s,
    /// hidden]`), and the backward recomputes one layer at a time from it, with the
    /// same LoRA dropout masks (the generator's state before the layer is replayed),
    /// back-propagating the layer's output gradient through it. The result equals
    /// `head(hidden(..)).backward()`; activation memory is one layer's instead of all
    /// of them. Returns the (detached) head value and one gradient per var (`None`
    /// for a var the loss does not reach).
    pub fn checkpointed_grads(
        &self,
        ids: &Tensor,
        keys: &KeyMask,
        mut dropout: Option<&mut Rng>,
        vars: &[&Var],
        head: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let st = self.step(ids, keys, false)?;
        let x0 = self.embed_ids(ids, false)?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut states = Vec::with_capacity(self.layers.len());
        let mut x = x0.detach();
        for l in 0..self.layers.len() {
            inputs.push(x.clone());
            states.push(dropout.as_deref().copied());
            x = self
                .layer_forward(l, x, &st, CacheSink::None, dropout.as_deref_mut())?
                .detach();
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let collect =
            |g: &candle_core::backprop::GradStore, grads: &mut Vec<Option<Tensor>>| -> Result<()> {
                for (slot, v) in grads.iter_mut().zip(vars) {
                    if let Some(t) = g.get(v.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + t)?,
                            None => t.clone(),
                        });
                    }
                }
                Ok(())
            };
        let last = Var::from_tensor(&x)?;
        let value = head(&self.norm(last.as_tensor(), &self.norm)?)?;
        let g = value.backward()?;
        collect(&g, &mut grads)?;
        let Some(mut dy) = g.get(last.as_tensor()).cloned() else {
            return Ok((value.detach(), grads));
        };
        for l in (0..self.layers.len()).rev() {
            let input = Var::from_tensor(&inputs[l])?;
            let mut rng = states[l];
            let y = self.layer_forward(
                l,
                input.as_tensor().clone(),
                &st,
                CacheSink::None,
                rng.as_mut(),
            )?;
            let g = (y * &dy)?.sum_all()?.backward()?;
            collect(&g, &mut grads)?;
            dy = match g.get(input.as_tensor()) {
                Some(t) => t.clone(),
                None => dy.zeros_like()?,
            };
        }
        if x0.track_op() {
            // Trained token rows: the embedding lookup's share of their gradient.
            let g = (x0 * dy)?.sum_all()?.backward()?;
            collect(&g, &mut grads)?;
        }
        Ok((value.detach(), grads))
    }

    /// Logits `[..., vocab]` for hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let inference = !hidden.track_op();
        let base = if inference {
            self.lm_head.forward_inference(hidden)?
        } else {
            self.lm_head.forward(hidden, None)?
        };
        let rows = self.tokens.as_ref().and_then(|t| {
            if self.cfg.tie_word_embeddings {
                Some((t, &t.values))
            } else {
                t.head.as_ref().map(|h| (t, h))
            }
        });
        match rows {
            Some((t, rows)) => {
                // Columns of the trained rows: replace the frozen values, keep the gradient path.
                let mut v = rows.as_tensor().to_dtype(base.dtype())?;
                if inference {
                    v = v.detach();
                }
                let cols = hidden.broadcast_matmul(&v.t()?)?;
                let dim = base.rank() - 1;
                let old = base.index_select(&t.ids_t, dim)?.detach();
                self.cap_logits(base.index_add(&t.ids_t, &(cols - old)?, dim)?)
            }
            _ => self.cap_logits(base),
        }
    }

    /// The output projection and the final soft-cap when the logits are just
    /// `cap(hidden · Wᵀ)` with a frozen dense `W` (no LoRA, bias, packing or trained token
    /// columns): then the loss can compute them a chunk of rows at a time.
    pub(crate) fn plain_lm_head(&self) -> Option<(&Tensor, Option<f32>)> {
        let l = &self.lm_head;
        let trained_columns = self
            .tokens
            .as_ref()
            .is_some_and(|t| self.cfg.tie_word_embeddings || t.head.is_some());
        if l.lora.is_some() || l.packed.is_some() || l.bias.is_some() || trained_columns {
            return None;
        }
        let cap = self
            .cfg
            .final_logit_softcapping
            .filter(|_| self.cfg.architecture == crate::Architecture::Gemma2);
        Some((&l.weight, cap.map(|c| c as f32)))
    }

    /// Gemma 2's final soft-capping, `cap·tanh(logits / cap)`.
    fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        match self.cfg.final_logit_softcapping {
            Some(cap) if self.cfg.architecture == crate::Architecture::Gemma2 => {
                Ok(logits.affine(1.0 / cap, 0.0)?.tanh()?.affine(cap, 0.0)?)
            }
            _ => Ok(logits),
        }
    }

    /// The input embedding matrix with trained rows in place.
    fn embedding(&self, inference: bool) -> Result<Tensor> {
        let Some(t) = &self.tokens else {
            return Ok(self.embed_tokens.clone());
        };
        let mut v = t.values.as_tensor().to_dtype(self.dtype)?;
        if inference {
            v = v.detach();
        }
        let old = self.embed_tokens.index_select(&t.ids_t, 0)?;
        Ok(self.embed_tokens.index_add(&t.ids_t, &(v - old)?, 0)?)
    }

    /// Grows the vocabulary to `vocab` rows; new embedding (and untied output)
    /// rows are the mean of the existing ones, as `resize_token_embeddings` does
    /// with `mean_resizing`.
    pub fn resize_vocab(&mut self, vocab: usize) -> Result<()> {
        let old = self.cfg.vocab_size;
        if vocab <= old {
            return Ok(());
        }
        let grow = |w: &Tensor| -> Result<Tensor> {
            let mean = w
                .to_dtype(DType::F32)?
                .mean_keepdim(0)?
                .to_dtype(w.dtype())?;
            Ok(Tensor::cat(&[w, &mean.repeat((vocab - old, 1))?], 0)?)
        };
        self.embed_tokens = grow(&self.embed_tokens)?;
        if self.cfg.tie_word_embeddings {
            self.lm_head = Linear::new(self.embed_tokens.clone(), None);
        } else {
            self.lm_head = Linear::new(grow(&self.lm_head.weight)?, None);
        }
        self.cfg.vocab_size = vocab;
        Ok(())
    }

    /// Makes the embedding rows of `ids` trainable, starting from their current values.
    /// An untied model's output rows of `ids` train too (the second value).
    pub fn train_tokens(&mut self, ids: Vec<u32>) -> Result<(Var, Option<Var>)> {
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let values = Var::from_tensor(
            &self
                .embed_tokens
                .index_select(&ids_t, 0)?
                .to_dtype(DType::F32)?,
        )?;
        let head = if self.cfg.tie_word_embeddings {
            None
        } else {
            Some(Var::from_tensor(
                &self
                    .lm_head
                    .dense_weight(DType::F32)?
                    .index_select(&ids_t, 0)?,
            )?)
        };
        self.tokens = Some(TrainableTokens {
            ids,
            values: values.clone(),
            head: head.clone(),
            ids_t,
        });
        Ok((values, head))
    }

    /// Logits for every position, without cache or dropout.
    pub fn forward(&self, ids: &Tensor, keys: &KeyMask) -> Result<Tensor> {
        self.logits(&self.hidden(ids, keys, None, None)?)
    }

    /// All weights under their HF names, LoRA folded in (for `merge`).
    pub fn merged_tensors(&mut self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert(
            "model.embed_tokens.weight".to_string(),
            self.embedding(true)?,
        );
        out.insert("model.norm.weight".to_string(), self.norm.clone());
        if !self.cfg.tie_word_embeddings {
            let mut head = self.lm_head.merged_weight()?;
            if let Some((t, rows)) = self
                .tokens
                .as_ref()
                .and_then(|t| t.head.as_ref().map(|h| (t, h)))
            {
                let v = rows.as_tensor().to_dtype(head.dtype())?;
                let old = head.index_select(&t.ids_t, 0)?;
                head = head.index_add(&t.ids_t, &(v - old)?, 0)?;
            }
            out.insert("lm_head.weight".to_string(), head);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.insert(
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.clone(),
            );
            out.insert(
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.clone(),
            );
            for (name, t) in [
                (
                    "pre_feedforward_layernorm",
                    &layer.pre_feedforward_layernorm,
                ),
                (
                    "post_feedforward_layernorm",
                    &layer.post_feedforward_layernorm,
                ),
                ("self_attn.q_norm", &layer.self_attn.q_norm),
                ("self_attn.k_norm", &layer.self_attn.k_norm),
            ] {
                if let Some(t) = t {
                    out.insert(format!("{p}.{name}.weight"), t.clone());
                }
            }
        }
        for (name, lin) in self.linears_mut() {
            out.insert(format!("{name}.weight"), lin.merged_weight()?);
            if let Some(b) = &lin.bias {
                out.insert(format!("{name}.bias"), b.clone());
            }
        }
        Ok(out)
    }
}
