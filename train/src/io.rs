//! Atomic file writes (temp file in the same folder, fsync, rename) and safetensors
//! with the `format: pt` metadata that `transformers` and `peft` expect.

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
