//! Atomic file writes (temp file in the same folder, fsync, rename), safetensors
//! with the `format: pt` metadata that `transformers` and `peft` expect, and named
//! variables to and from tensor maps (what adapters, heads and checkpoints save).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Writes pretty JSON atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("json values serialise");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes tensors as safetensors (sorted names, `format: pt` metadata), atomically.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut named: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        named.push((k, t.to_device(&candle_core::Device::Cpu)?.contiguous()?));
    }
    named.sort_by(|a, b| a.0.cmp(b.0));
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes =
        safetensors::tensor::serialize(named.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
            .map_err(|e| Error::format(path, format!("cannot serialise safetensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// f32 copies of named variables (a copy: `Var::set` writes in place, so a shared
/// tensor would change under the caller).
pub fn named_tensors(vars: &[(String, candle_core::Var)]) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    for (k, v) in vars {
        m.insert(
            k.clone(),
            v.as_tensor().to_dtype(candle_core::DType::F32)?.copy()?,
        );
    }
    Ok(m)
}

/// Sets named variables from a map by name (a checkpoint, a saved model), checking
/// that every name is there with the variable's shape; `what` names the map's owner
/// in the error (`the adapter`, `the head`).
pub fn restore_named(
    vars: &[(String, candle_core::Var)],
    tensors: &HashMap<String, Tensor>,
    source: &Path,
    what: &str,
) -> Result<()> {
    for (k, v) in vars {
        let t = tensors.get(k).ok_or_else(|| crate::Error::Tensor {
            name: k.clone(),
            path: source.to_path_buf(),
            message: format!("missing from {what}"),
        })?;
        if t.dims() != v.dims() {
            return Err(crate::Error::Tensor {
                name: k.clone(),
                path: source.to_path_buf(),
                message: format!("expected shape {:?}, found {:?}", v.dims(), t.dims()),
            });
        }
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    Ok(())
}
