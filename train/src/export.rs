//! Writing a model as an HF folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`), with any LoRA folded into the
//! weights: this is `merge`, and also how a tiny preset or a GGUF model becomes
//! something `transformers` loads.

use std::path::Path;

use serde_json::json;

use crate::error::Result;
use crate::io::{save_safetensors, write_json};
use crate::model::Decoder;
use crate::tokenizer::TextTokenizer;

/// Writes `model` (LoRA merged) and `tokenizer` into `dir`.
pub fn save_hf_dir(model: &mut Decoder, tokenizer: &TextTokenizer, dir: &Path) -> Result<()> {
    let cfg = model.config().clone();
    let mut c = serde_json::to_value(&cfg).expect("config serialises");
    let arch = cfg.architecture.hf_class();
    if let Some(o) = c.as_object_mut() {
        o.insert("architectures".into(), json!([arch]));
        o.insert(
            "torch_dtype".into(),
            json!(format!("{:?}", model.dtype())
                .to_lowercase()
                .replace("f32", "float32")
                .replace("bf16", "bfloat16")
                .replace("f16", "float16")),
        );
        if cfg.hidden_act.is_none() {
            let act = if cfg.architecture.offset_norms() {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            };
            o.insert("hidden_act".into(), json!(act));
        }
        o.retain(|_, v| !v.is_null());
    }
    write_json(&dir.join("config.json"), &c)?;
    save_safetensors(&dir.join("model.safetensors"), &model.merged_tensors()?)?;
    tokenizer.save(dir)
}
