//! pipe-train: the candle training core of pipe.
//!
//! Decoder LMs (Llama, Qwen2, Mistral) written for training ([`model`]), LoRA
//! adapters in PEFT's format ([`lora`]), the trainer with exact resume
//! ([`trainer`]) and generation with an external KV cache ([`generate`]).
//! Models come from HF directories, the HF hub cache, GGUF files or tiny random
//! presets ([`loader`]). This crate knows nothing of YAML, tokio or the store:
//! stages in `pipe-stages` call it with plain paths and settings.
#![warn(missing_docs)]

pub mod allocator;
pub mod attention;
pub mod config;
pub mod constrain;
pub mod cross_entropy;
pub mod data;
pub mod error;
pub mod export;
pub mod fastmath;
pub mod fused;
pub mod generate;
pub mod ggml;
pub mod heads;
pub mod io;
pub mod kernels;
pub mod linear;
pub mod loader;
pub mod lora;
pub mod loss;
pub mod model;
pub mod nf4;
pub mod optim;
pub mod packed;
pub mod q8;
pub mod reward;
pub mod rng;
pub mod tokenizer;
pub mod trainer;
pub mod weights;

pub use config::{Architecture, Config};
pub use error::{Error, Result};
pub use model::{Decoder, KeyMask, KvCache};
pub use rng::Rng;

/// Fixes candle's CPU thread count for the life of the process. Unless
/// `RAYON_NUM_THREADS` is set, candle works the count out again on every f32
/// matmul, reading `/proc/cpuinfo` each time: 15% of token-by-token decoding
/// time on SmolLM2. This computes it once (the same way) and sets the variable.
/// Call it first thing in `main`, before any other thread exists.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Picks a device from `auto`, `cpu`, `cuda` or `cuda:N`. `auto` means the first
/// GPU when built with the `cuda` feature and one is present, else the CPU.
pub fn device(spec: &str) -> Result<candle_core::Device> {
    let cuda = |n: usize| {
        candle_core::Device::new_cuda(n).map_err(|e| {
            Error::Invalid(format!(
                "device `{spec}`: {e} (GPU support needs a build with `--features cuda`)"
            ))
        })
    };
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            cuda(0)?
        } else {
            candle_core::Device::Cpu
        }),
        "cuda" => cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => Err(Error::Invalid(format!(
                "device `{spec}`: expected auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// The dtype for `auto|f32|bf16|f16` on a device: f32 on CPU, bf16 on GPU for `auto`.
pub fn dtype(spec: &str, device: &candle_core::Device) -> Result<candle_core::DType> {
    use candle_core::DType;
    match spec {
        "auto" => Ok(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        }),
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::Invalid(format!(
            "dtype `{other}`: expected auto, f32, bf16 or f16"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers the unit tests share.
    use candle_core::Tensor;

    /// max |a − b| over all elements.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
