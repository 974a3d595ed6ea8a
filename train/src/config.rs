//! Model configuration, read from an HF `config.json` (or GGUF metadata, or a
//! built-in tiny preset). One struct covers every family pipe-train implements:
//! Llama, Qwen2 and Mistral differ only in q/k/v bias, tied embeddings, RoPE scaling
//! and the sliding window; Qwen3 adds per-head q/k norms; Gemma scales embeddings,
//! offsets its norms (`x·(1+w)`) and uses GeGLU; Gemma 2 adds soft-capping, a query
//! scale, alternating sliding layers and two more norms per layer; Phi-3 fuses its
//! q/k/v and gate/up projections. Defaults that differ per family (Gemma's tied
//! embeddings and 256-wide heads, Qwen3's 128-wide heads, Gemma 2's caps) are applied
//! where transformers applies them, when a field is absent from `config.json`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};

/// The decoder families pipe-train implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, TinyLlama.
    Llama,
    /// Qwen2 / Qwen2.5: bias on q, k and v.
    Qwen2,
    /// Mistral: Llama with a sliding attention window.
    Mistral,
    /// Qwen3: per-head RMSNorm on queries and keys before RoPE, no q/k/v bias.
    Qwen3,
    /// Gemma: √hidden-scaled embeddings, `x·(1+w)` norms, GeGLU, tied embeddings.
    Gemma,
    /// Gemma 2: Gemma plus soft-capping, query scale, alternating sliding layers, four norms.
    Gemma2,
    /// Phi-3: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
}

impl Architecture {
    /// Every supported `model_type`, as HF writes it.
    pub const NAMES: &'static [&'static str] = &[
        "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "phi3",
    ];

    /// The architecture of an HF `model_type`.
    pub fn from_name(name: &str) -> Option<Architecture> {
        Some(match name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "mistral" => Architecture::Mistral,
            "qwen3" => Architecture::Qwen3,
            "gemma" => Architecture::Gemma,
            "gemma2" => Architecture::Gemma2,
            "phi3" => Architecture::Phi3,
            _ => return None,
        })
    }

    /// The HF `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Mistral => "mistral",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma => "gemma",
            Architecture::Gemma2 => "gemma2",
            Architecture::Phi3 => "phi3",
        }
    }

    /// The transformers class that loads it (`architectures` in an exported config).
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Gemma => "GemmaForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
            Architecture::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// Whether this family's norms compute `x·(1+w)` (Gemma) rather than `x·w`.
    pub fn offset_norms(self) -> bool {
        matches!(self, Architecture::Gemma | Architecture::Gemma2)
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Qwen, Mistral, Phi-3.
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma's `gelu_pytorch_tanh`.
    GeluTanh,
    /// Exact (erf) GELU.
    Gelu,
}

impl Activation {
    /// Reads an HF activation name.
    pub fn parse(name: &str) -> std::result::Result<Activation, String> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_tanh" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(format!(
                "activation `{other}` is not supported; expected silu, gelu_pytorch_tanh or gelu"
            ))
            }
        })
    }
}

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Must be `llama3`; other scalings are rejected when the config is read.
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Frequency divisor for long wavelengths.
    pub factor: f64,
    /// Low-frequency boundary factor.
    pub low_freq_factor: f64,
    /// High-frequency boundary factor.
    pub high_freq_factor: f64,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// A decoder configuration with HF field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// HF `model_type`.
    #[serde(rename = "model_type")]
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Optional Llama 3 RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers ≥ 5 writes `rope_theta` and the scaling here instead;
    /// [`Config::from_file`] folds it into the two fields above.
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Longest supported context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o (Llama's `attention_bias`); Qwen2 always has q/k/v bias.
    #[serde(default)]
    pub attention_bias: bool,
    /// Mistral's sliding attention window, in tokens.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for the sliding window (off in released checkpoints).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding token, kept so an exported config says what the source said (transformers'
    /// Phi-3 otherwise assumes 32000, past a small vocabulary).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// The MLP activation (`silu` unless said otherwise).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Gemma's name for it, which wins over `hidden_act` when both are set.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Gemma 2: attention scores are scaled by `query_pre_attn_scalar^-½` (not `head_dim^-½`).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<u32>,
    /// Gemma 2: attention logits become `cap·tanh(logits/cap)` before the mask.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: output logits become `cap·tanh(logits/cap)`.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Per-layer attention kind (`sliding_attention` / `full_attention`), Gemma 2.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Phi-3: the share of each head that RoPE rotates (only 1.0 is supported).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// One token id or several (Llama 3 lists its stop tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl Config {
    /// Reads and checks an HF `config.json`.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not JSON: {e}")))?;
        Config::from_value(value).map_err(|m| Error::format(path, m))
    }

    /// Reads an HF config from its JSON, applying the family's defaults for absent
    /// fields as transformers does, then checks it.
    pub fn from_value(mut value: serde_json::Value) -> std::result::Result<Config, String> {
        let supported = Architecture::NAMES.join(", ");
        let model_type = match value.get("model_type").and_then(|v| v.as_str()) {
            Some(t) => t.to_string(),
            None => return Err(format!("`model_type` is missing; supported: {supported}")),
        };
        let Some(arch) = Architecture::from_name(&model_type) else {
            return Err(format!(
                "model_type `{model_type}` is not supported; supported: {supported}"
            ));
        };
        if let Some(obj) = value.as_object_mut() {
            let mut default = |k: &str, v: serde_json::Value| {
                if obj.get(k).is_none_or(|x| x.is_null()) {
                    obj.insert(k.to_string(), v);
                }
            };
            match arch {
                Architecture::Gemma => {
                    default("tie_word_embeddings", true.into());
                    default("head_dim", 256.into());
                }
                Architecture::Gemma2 => {
                    default("tie_word_embeddings", true.into());
                    default("head_dim", 256.into());
                    default("query_pre_attn_scalar", 256.into());
                    default("attn_logit_softcapping", 50.0.into());
                    default("final_logit_softcapping", 30.0.into());
                    default("sliding_window", 4096.into());
                }
                Architecture::Qwen3 => default("head_dim", 128.into()),
                _ => {}
            }
        }
        let cfg: Config = serde_json::from_value(value)
            .map_err(|e| format!("not a supported {model_type} config: {e}"))?;
        cfg.resolve()
    }

    /// Folds `rope_parameters` into `rope_theta`/`rope_scaling` and validates.
    pub fn resolve(mut self) -> std::result::Result<Config, String> {
        if let Some(p) = self.rope_parameters.take() {
            if let Some(theta) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                self.rope_theta = theta;
            }
            if let Some(f) = p.get("partial_rotary_factor").and_then(|t| t.as_f64()) {
                self.partial_rotary_factor = Some(f);
            }
            let kind = p
                .get("rope_type")
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                let scaling: RopeScaling = serde_json::from_value(p.clone())
                    .map_err(|e| format!("rope_parameters: {e}"))?;
                self.rope_scaling = Some(scaling);
            }
        }
        if let Some(s) = &self.rope_scaling {
            if s.rope_type == "default" {
                self.rope_scaling = None;
            }
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks the invariants the model code relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 || self.hidden_size == 0 {
            return Err(
                "hidden_size, num_attention_heads and num_hidden_layers must be positive".into(),
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_size().is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_size()
            ));
        }
        self.activation()?;
        if let Some(f) = self.partial_rotary_factor {
            if (f - 1.0).abs() > 1e-12 {
                return Err(format!(
                    "partial_rotary_factor {f} is not supported (only 1.0)"
                ));
            }
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(format!(
                    "layer_types lists {} layers but num_hidden_layers is {}",
                    types.len(),
                    self.num_hidden_layers
                ));
            }
            if let Some(t) = types
                .iter()
                .find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention"))
            {
                return Err(format!(
                    "layer_types: `{t}` is not sliding_attention or full_attention"
                ));
            }
            if types.iter().any(|t| t == "sliding_attention") && self.sliding_window.is_none() {
                return Err(
                    "layer_types names sliding layers but sliding_window is missing".into(),
                );
            }
        }
        for (field, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
            (
                "query_pre_attn_scalar",
                self.query_pre_attn_scalar.map(f64::from),
            ),
        ] {
            if cap.is_some_and(|c| c <= 0.0) {
                return Err(format!("{field} must be positive"));
            }
        }
        if let Some(s) = &self.rope_scaling {
            if s.rope_type != "llama3" {
                return Err(format!(
                    "rope_scaling type `{}` is not supported (only `llama3`)",
                    s.rope_type
                ));
            }
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.architecture == Architecture::Qwen2 || self.attention_bias
    }

    /// Whether queries and keys get a per-head RMSNorm before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.architecture == Architecture::Qwen3
    }

    /// Whether q/k/v (and gate/up) are one fused projection each (Phi-3).
    pub fn fused_projections(&self) -> bool {
        self.architecture == Architecture::Phi3
    }

    /// Whether each layer also normalises the attention output and the MLP input and
    /// output (Gemma 2's four norms).
    pub fn sandwich_norms(&self) -> bool {
        self.architecture == Architecture::Gemma2
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        self.architecture != Architecture::Qwen2 && self.attention_bias
    }

    /// The attention window of layer `layer`, if the architecture limits it there.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.architecture {
            Architecture::Mistral | Architecture::Phi3 => self.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 if self.use_sliding_window => {
                self.sliding_window
            }
            Architecture::Gemma2 => {
                let sliding = match &self.layer_types {
                    Some(types) => types[layer] == "sliding_attention",
                    // transformers' default: even layers slide.
                    None => layer.is_multiple_of(2),
                };
                if sliding {
                    self.sliding_window
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// The MLP activation: `hidden_activation`, else `hidden_act`, else the family's
    /// (Gemma falls back to `gelu_pytorch_tanh` whatever `hidden_act` says, as
    /// transformers does).
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        if let Some(a) = &self.hidden_activation {
            return Activation::parse(a);
        }
        match self.architecture {
            Architecture::Gemma | Architecture::Gemma2 => Ok(Activation::GeluTanh),
            _ => Activation::parse(self.hidden_act.as_deref().unwrap_or("silu")),
        }
    }

    /// The factor applied to attention scores.
    pub fn attention_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) if self.architecture == Architecture::Gemma2 => 1.0 / (s as f64).sqrt(),
            _ => 1.0 / (self.head_size() as f64).sqrt(),
        }
    }

    /// Stop tokens from the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// A tiny configuration for tests: 2 layers, width 64, 4 query / 2 KV heads
    /// (Gemma: one KV head, as in the 2B model; Gemma 2: a window of 4 on layer 0).
    pub fn tiny(architecture: Architecture, vocab_size: usize) -> Config {
        use Architecture as A;
        let gemma = matches!(architecture, A::Gemma | A::Gemma2);
        let cfg = Config {
            architecture,
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: 512,
            tie_word_embeddings: matches!(architecture, A::Qwen2 | A::Gemma | A::Gemma2),
            attention_bias: false,
            sliding_window: match architecture {
                A::Mistral | A::Phi3 => Some(256),
                A::Gemma2 => Some(4),
                _ => None,
            },
            use_sliding_window: false,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            hidden_act: None,
            hidden_activation: None,
            query_pre_attn_scalar: (architecture == A::Gemma2).then_some(24),
            attn_logit_softcapping: (architecture == A::Gemma2).then_some(50.0),
            final_logit_softcapping: (architecture == A::Gemma2).then_some(30.0),
            layer_types: None,
            partial_rotary_factor: None,
        };
        if gemma {
            Config {
                num_key_value_heads: Some(1),
                head_dim: Some(24),
                ..cfg
            }
        } else if architecture == A::Qwen3 {
            Config {
                head_dim: Some(24),
                ..cfg
            }
        } else {
            cfg
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_fields_with_defaults() {
        let cfg: Config = serde_json::from_str(
            r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
                "tie_word_embeddings":true,"eos_token_id":[1,2],"torch_dtype":"bfloat16"}"#,
        )
        .unwrap();
        assert!(cfg.qkv_bias() && !cfg.o_bias());
        assert_eq!(cfg.head_size(), 4);
        assert_eq!(cfg.eos_ids(), vec![1, 2]);
        assert_eq!(cfg.rope_theta, 10_000.0);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn family_defaults_apply_only_when_a_field_is_absent() {
        let base = serde_json::json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2});
        let with = |extra: serde_json::Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Config::from_value(v)
        };
        let g = with(serde_json::json!({"model_type": "gemma2"})).unwrap();
        assert!(g.tie_word_embeddings);
        assert_eq!(g.head_size(), 256);
        assert_eq!(g.attn_logit_softcapping, Some(50.0));
        assert_eq!(g.final_logit_softcapping, Some(30.0));
        assert_eq!((g.window(0), g.window(1)), (Some(4096), None));
        assert!((g.attention_scale() - 1.0 / 16.0).abs() < 1e-12);
        assert_eq!(g.activation().unwrap(), Activation::GeluTanh);
        let g = with(
            serde_json::json!({"model_type": "gemma", "tie_word_embeddings": false,
            "head_dim": 4, "hidden_act": "gelu"}),
        )
        .unwrap();
        assert!(!g.tie_word_embeddings);
        assert_eq!(g.head_size(), 4);
        // transformers' Gemma ignores `hidden_act` and uses the tanh approximation.
        assert_eq!(g.activation().unwrap(), Activation::GeluTanh);
        let q = with(serde_json::json!({"model_type": "qwen3"})).unwrap();
        assert_eq!(q.head_size(), 128);
        assert!(q.qk_norm() && !q.qkv_bias());
        let p = with(serde_json::json!({"model_type": "phi3", "sliding_window": 7})).unwrap();
        assert!(p.fused_projections());
        assert_eq!(p.window(1), Some(7));
    }

    #[test]
    fn bad_configs_name_what_is_wrong() {
        let err = |v: serde_json::Value| Config::from_value(v).unwrap_err();
        let e = err(serde_json::json!({"model_type": "gpt2"}));
        assert!(
            e.contains("model_type `gpt2` is not supported")
                && e.contains("llama, qwen2, mistral, qwen3, gemma, gemma2, phi3"),
            "{e}"
        );
        assert!(err(serde_json::json!({"hidden_size": 8})).contains("`model_type` is missing"));
        let e = err(serde_json::json!({"model_type": "gemma", "vocab_size": 10}));
        assert!(
            e.contains("gemma config") && e.contains("missing field `hidden_size`"),
            "{e}"
        );
        let e = err(
            serde_json::json!({"model_type": "phi3", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}),
        );
        assert!(e.contains("partial_rotary_factor 0.5"), "{e}");
        let e = err(
            serde_json::json!({"model_type": "gemma2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "layer_types": ["full_attention"]}),
        );
        assert!(e.contains("layer_types lists 1 layers"), "{e}");
        let e = err(
            serde_json::json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "hidden_act": "relu2"}),
        );
        assert!(e.contains("activation `relu2` is not supported"), "{e}");
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let err = serde_json::from_str::<Config>(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `gpt2`"), "{err}");
        let mut cfg = Config::tiny(Architecture::Llama, 32);
        cfg.num_key_value_heads = Some(3);
        assert!(cfg.validate().unwrap_err().contains("multiple"));
    }
}
