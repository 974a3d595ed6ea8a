//! Models for stages: what every family that loads a model shares. The `model` param
//! (a GGUF file, an HF folder, a hub id or `tiny:...`) and how it enters the
//! fingerprint (a file is a dep, a cached hub model adds its identity), device and
//! dtype selection, loading relative to the workdir, the `chat_template` choice, and
//! the bridge from pipe-train's errors to [`StageError`]. [`chat`] is a loaded model
//! answering chat requests (the local oracle backend, `evaluate`, the preference
//! stages and `pipe serve`).

pub mod chat;

use std::path::{Path, PathBuf};

pub use pipe_train::linear::BaseQuant;
use pipe_train::loader::ModelSpec;
use serde_json::Value;

use crate::contract::{StageContext, StageError};
use crate::params::ParamError;

/// Checks a `model` param and returns the workspace path to declare as a dep, if it is a file or folder.
pub fn model_dep(model: &str) -> Result<Option<String>, ParamError> {
    match ModelSpec::parse(model).map_err(|e| ParamError::new(&["with", "model"], e.to_string()))? {
        ModelSpec::Gguf(p) | ModelSpec::Dir(p) | ModelSpec::Random { config: p, .. } => {
            Ok(Some(p.to_string_lossy().into_owned()))
        }
        ModelSpec::Tiny { .. } | ModelSpec::Hub(_) => Ok(None),
    }
}

/// Checks that `quantize: keep` names a GGUF model (it keeps the file's own blocks).
pub fn check_quantize(model: &str, base: BaseQuant) -> Result<(), ParamError> {
    if base == BaseQuant::Keep && !matches!(ModelSpec::parse(model), Ok(ModelSpec::Gguf(_))) {
        return Err(ParamError::new(
            &["with", "quantize"],
            format!("`keep` keeps a GGUF file's own quantized blocks, and model `{model}` is not a .gguf file; expected none, int8 or nf4"),
        ));
    }
    Ok(())
}

/// Adds the identity of a hub model found in the local cache to the key params, so a
/// new revision in the cache changes the fingerprint (files and folders are deps instead).
pub fn key_with_identity(params: &Value) -> Value {
    let mut out = params.clone();
    if let Some(model) = params.get("model").and_then(Value::as_str) {
        if let Ok(ModelSpec::Hub(_)) = ModelSpec::parse(model) {
            if let (Ok(id), Some(obj)) = (pipe_train::loader::identity(model), out.as_object_mut())
            {
                obj.insert("model_identity".into(), Value::String(id));
            }
        }
    }
    out
}

/// Workspace deps of a stage that renders `template` and loads `model`.
pub fn template_and_model_deps(template: &str, model: &str) -> Result<Vec<String>, ParamError> {
    let mut deps = vec![template.to_string()];
    deps.extend(model_dep(model).map_err(|mut e| {
        e.path = vec!["model".into()];
        e
    })?);
    Ok(deps)
}

/// [`key_with_identity`] without `execution_only` keys (device, batch size...), which
/// change how the work is done, not its result.
pub fn key_without(params: &Value, execution_only: &[&str]) -> Value {
    let mut v = key_with_identity(params);
    if let Some(o) = v.as_object_mut() {
        for k in execution_only {
            o.remove(*k);
        }
    }
    v
}

/// The model spec with a file path made absolute against the workdir.
pub fn resolve_model(model: &str, workdir: &Path) -> String {
    match ModelSpec::parse(model) {
        Ok(ModelSpec::Gguf(p)) | Ok(ModelSpec::Dir(p)) if p.is_relative() => {
            workdir.join(p).to_string_lossy().into_owned()
        }
        _ => model.to_string(),
    }
}

/// How a stage loads a model: device, dtype and how the frozen base is stored.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `auto|cpu|cuda|cuda:N`.
    pub device: String,
    /// `auto|f32|bf16|f16`.
    pub dtype: String,
    /// Frozen projections kept as NF4 or int8 (`quantize:`), or dense.
    pub base: BaseQuant,
    /// NF4 only: quantize the block absmaxes too (`double_quant:`).
    pub double_quant: bool,
    /// Decode few-row calls with int8 copies of dense weights (faster generation).
    pub decode_int8: bool,
}

/// The identity of a model loaded with `base` storage: the file identity, plus the
/// storage when the base is quantized (so replies or generations of an NF4 base are
/// never taken for those of the dense model).
pub fn identity_with_base(identity: &str, base: BaseQuant, double_quant: bool) -> String {
    match base {
        BaseQuant::None => identity.to_string(),
        b => format!("{identity}+{b:?}{}", if double_quant { "+dq" } else { "" }).to_lowercase(),
    }
}

/// Maps a pipe-train error to a stage error; running out of GPU (or host) memory says
/// which settings lower it.
pub fn failed(context: &str) -> impl Fn(pipe_train::Error) -> StageError + '_ {
    move |e| match e {
        pipe_train::Error::Cancelled => StageError::Cancelled,
        e => {
            let text = e.to_string();
            let oom =
                text.contains("OUT_OF_MEMORY") || text.to_lowercase().contains("out of memory");
            let hint = if oom {
                "; to need less memory: `quantize: nf4` (a 4-bit frozen base), `gradient_checkpointing: true`, or a smaller `batch_size` (with `grad_accum` to keep the effective batch)"
            } else {
                ""
            };
            StageError::Failed(format!("{context}: {text}{hint}"))
        }
    }
}

/// Device and dtype from the `device`/`dtype` params.
pub fn device(
    ctx_device: &str,
    ctx_dtype: &str,
) -> Result<(candle_core::Device, candle_core::DType), StageError> {
    let d = pipe_train::device(ctx_device).map_err(|e| StageError::Failed(e.to_string()))?;
    let t = pipe_train::dtype(ctx_dtype, &d).map_err(|e| StageError::Failed(e.to_string()))?;
    Ok((d, t))
}

/// Loads a model relative to the stage's workdir, its projections packed as `base`
/// (NF4, int8) while they are read, logging what was loaded.
pub fn load_model(
    ctx: &StageContext,
    model: &str,
    dev: &str,
    dtype: &str,
    base: BaseQuant,
    double_quant: bool,
) -> Result<pipe_train::loader::Loaded, StageError> {
    let (device, dtype) = device(&ctx.device_for(dev), dtype)?;
    let spec = resolve_model(model, &ctx.workdir);
    ctx.progress(0, None, "loading model");
    let mut loaded = pipe_train::loader::load_with(&spec, dtype, &device, base, double_quant)
        .map_err(failed("loading the model"))?;
    loaded.name = model.to_string();
    if base != BaseQuant::None {
        let packed: usize = loaded
            .model
            .linears_mut()
            .iter()
            .filter_map(|(_, l)| l.packed.as_ref().map(|p| p.bytes()))
            .sum();
        ctx.log(&format!(
            "base projections packed as {base:?}{}: {:.1} MB",
            if double_quant {
                " (double quantization)"
            } else {
                ""
            },
            packed as f64 / 1e6
        ));
    }
    ctx.log(&format!(
        "model {model}: {:?}, {} layers, hidden {}, vocab {}, identity {}, {device:?} {dtype:?}",
        loaded.config.architecture,
        loaded.config.num_hidden_layers,
        loaded.config.hidden_size,
        loaded.config.vocab_size,
        &loaded.identity[..12]
    ));
    Ok(loaded)
}

/// The `chat_template` param: `auto` (the model's), `none` (plain text) or a Jinja template.
pub fn apply_template_choice(tok: &mut pipe_train::tokenizer::TextTokenizer, choice: &str) -> bool {
    match choice {
        "auto" => true,
        "none" => false,
        t => {
            tok.set_chat_template(Some(t.to_string()));
            true
        }
    }
}

/// A path under the checkpoint dir.
pub fn ckpt(ctx: &StageContext, name: &str) -> PathBuf {
    ctx.checkpoint_dir.join(name)
}

#[cfg(test)]
mod oom_tests {
    use super::*;

    #[test]
    fn out_of_memory_says_what_lowers_memory() {
        let e = pipe_train::Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        let StageError::Failed(m) = failed("training")(e) else {
            panic!("not a failure")
        };
        assert!(
            m.starts_with("training: ")
                && m.contains("quantize: nf4")
                && m.contains("gradient_checkpointing")
                && m.contains("batch_size"),
            "{m}"
        );
        let e = pipe_train::Error::Invalid("bad".into());
        let StageError::Failed(m) = failed("training")(e) else {
            panic!("not a failure")
        };
        assert_eq!(m, "training: bad");
    }
}
