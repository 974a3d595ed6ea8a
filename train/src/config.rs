//! Model configuration, read from an HF `config.json` (or GGUF metadata, or a
//! built-in tiny preset). One struct covers Llama, Qwen2 and Mistral: they differ
//! only in q/k/v bias, tied embeddings, RoPE scaling and the sliding window.

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
        let cfg: Config = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                path,
                format!("not a supported decoder config ({e}); model_type must be llama, qwen2 or mistral"),
            )
        })?;
        cfg.resolve().map_err(|m| Error::format(path, m))
    }

    /// Folds `rope_parameters` into `rope_theta`/`rope_scaling` and validates.
    pub fn resolve(mut self) -> std::result::Result<Config, String> {
        if let Some(p) = self.rope_parameters.take() {
            if let Some(theta) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                self.rope_theta = theta;
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

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        self.architecture != Architecture::Qwen2 && self.attention_bias
    }

    /// The attention window, if the architecture limits it.
    pub fn window(&self) -> Option<usize> {
        match self.architecture {
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 if self.use_sliding_window => self.sliding_window,
            _ => None,
        }
    }

    /// Stop tokens from the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// A tiny configuration for tests: 2 layers, width 64, 4 query / 2 KV heads.
    pub fn tiny(architecture: Architecture, vocab_size: usize) -> Config {
        Config {
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
            tie_word_embeddings: architecture == Architecture::Qwen2,
            attention_bias: false,
            sliding_window: (architecture == Architecture::Mistral).then_some(256),
            use_sliding_window: false,
            bos_token_id: None,
            eos_token_id: None,
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
    fn rejects_unknown_architecture_and_bad_heads() {
        let err = serde_json::from_str::<Config>(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `gpt2`"), "{err}");
        let mut cfg = Config::tiny(Architecture::Llama, 32);
        cfg.num_key_value_heads = Some(3);
        assert!(cfg.validate().unwrap_err().contains("multiple"));
    }
}
