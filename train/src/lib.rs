//! pipe-train: the candle training core of pipe.
//!
//! Decoder LMs (Llama, Qwen2, Mistral) written for training ([`model`]), LoRA
//! adapters in PEFT's format ([`lora`]), the trainer with exact resume
//! ([`trainer`]) and generation with an external KV cache ([`generate`]).
//! Models come from HF directories, the HF hub cache, GGUF files or tiny random
//! presets ([`loader`]). This crate knows nothing of YAML, tokio or the store:
//! stages in `pipe-stages` call it with plain paths and settings.
#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod io;
pub mod linear;
pub mod loader;
pub mod lora;
pub mod loss;
pub mod model;
pub mod optim;
pub mod rng;
pub mod tokenizer;
pub mod trainer;
pub mod weights;

pub use config::{Architecture, Config};
pub use error::{Error, Result};
pub use model::{Decoder, KeyMask, KvCache};
pub use rng::Rng;
