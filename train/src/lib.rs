//! pipe-train: the candle training core of pipe.
//!
//! This crate will hold the decoder language models (Llama, Qwen2, Mistral) written
//! for training, LoRA adapters in PEFT's format, the trainers and generation. It knows
//! nothing of YAML, tokio or the store: the stages in `pipe-stages` call it with typed
//! parameters and paths. Until the training-core issue lands it is empty on purpose.
#![warn(missing_docs)]
