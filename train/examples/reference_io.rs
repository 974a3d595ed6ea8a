//! Reference I/O for the comparison scripts in `scripts/reference/`: tokenise
//! strings and compute logits with pipe-train, so Python can compare them with
//! llama.cpp, `transformers` and `peft`.
//!
//! ```text
//! reference_io tokenize MODEL < strings.json > ids.json
//! reference_io logits MODEL IDS_JSON OUT.safetensors [ADAPTER_DIR]
//! reference_io export MODEL DIR [ADAPTER_DIR]     # HF folder, LoRA merged
//! ```

use std::collections::HashMap;
use std::io::Read;

use candle_core::{DType, Device, Tensor};
use pipe_train::{loader, lora, KeyMask};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tokenize") => {
            let m = loader::load(&args[1], DType::F32, &Device::Cpu)?;
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let strings: Vec<String> = serde_json::from_str(&input)?;
            let ids: Vec<Vec<u32>> = strings
                .iter()
                .map(|s| m.tokenizer.encode(s))
                .collect::<Result<_, _>>()?;
            println!("{}", serde_json::to_string(&ids)?);
        }
        Some("logits") => {
            let mut m = loader::load(&args[1], DType::F32, &Device::Cpu)?;
            if let Some(dir) = args.get(4) {
                lora::load(&mut m.model, std::path::Path::new(dir))?;
            }
            let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
            let n = ids.len();
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = m.model.forward(&t, &KeyMask::full(1, n))?;
            let out = HashMap::from([("logits".to_string(), logits.squeeze(0)?)]);
            pipe_train::io::save_safetensors(std::path::Path::new(&args[3]), &out)?;
        }
        Some("export") => {
            let mut m = loader::load(&args[1], DType::F32, &Device::Cpu)?;
            if let Some(dir) = args.get(3) {
                lora::load(&mut m.model, std::path::Path::new(dir))?;
            }
            pipe_train::export::save_hf_dir(
                &mut m.model,
                &m.tokenizer,
                std::path::Path::new(&args[2]),
            )?;
        }
        _ => {
            eprintln!("usage: reference_io tokenize MODEL | logits MODEL IDS_JSON OUT [ADAPTER]");
            std::process::exit(2);
        }
    }
    Ok(())
}
