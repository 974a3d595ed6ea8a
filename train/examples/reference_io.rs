//! Reference I/O for the comparison scripts in `scripts/reference/`: tokenise
//! strings and compute logits with pipe-train, so Python can compare them with
//! llama.cpp, `transformers` and `peft`.
//!
//! ```text
//! reference_io tokenize MODEL < strings.json > ids.json
//! reference_io logits MODEL IDS_JSON OUT.safetensors [ADAPTER_DIR]
//! reference_io export MODEL DIR [ADAPTER_DIR]     # HF folder, LoRA merged
//! reference_io head MODEL mse|listwise|pairwise OUT_DIR
//! ```
//!
//! `head` trains a LoRA + linear sequence head on random token sequences for a few
//! steps, saves it in PEFT's sequence-classification layout under `OUT_DIR/model`
//! and writes `OUT_DIR/scores.json`: probe sequences (ids never equal to the pad id
//! 0) and pipe's scores for them in a right-padded and a left-padded batch.

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
        Some("head") => head(&args[1], &args[2], std::path::Path::new(&args[3]))?,
        _ => {
            eprintln!("usage: reference_io tokenize MODEL | logits MODEL IDS_JSON OUT [ADAPTER]");
            std::process::exit(2);
        }
    }
    Ok(())
}

fn head(
    spec: &str,
    objective: &str,
    out: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use pipe_train::heads::{self, Head, HeadConfig, HeadKind, Objective, Padding, Pooling};
    let objective = match objective {
        "mse" => Objective::Mse,
        "listwise" => Objective::Listwise,
        "pairwise" => Objective::Pairwise,
        o => return Err(format!("objective `{o}`: expected mse, listwise or pairwise").into()),
    };
    let mut m = loader::load(spec, DType::F32, &Device::Cpu)?;
    let cfg = lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: lora::Targets::Keyword("all-linear".into()),
        use_rslora: false,
    };
    let mut rng = pipe_train::Rng::new(7);
    let adapter = lora::attach(&mut m.model, &cfg, &mut rng)?;
    let outputs = if objective == Objective::Mse { 3 } else { 1 };
    let head = Head::new(
        HeadConfig {
            pooling: Pooling::Last,
            kind: HeadKind::Linear,
            hidden: m.model.config().hidden_size,
            outputs,
            dropout: 0.0,
            out_bias: false,
        },
        &mut rng,
        &Device::Cpu,
    )?;
    let seq = |rng: &mut pipe_train::Rng| -> Vec<u32> {
        let n = 3 + rng.below(9);
        (0..n).map(|_| 3 + rng.below(240) as u32).collect()
    };
    let units: Vec<heads::Unit> = (0..12)
        .map(|_| match objective {
            Objective::Mse => heads::Unit {
                seqs: vec![seq(&mut rng)],
                target: (0..3).map(|_| rng.below(11) as f32).collect(),
                margin: 0.0,
            },
            Objective::Listwise => {
                let rewards: Vec<f64> = (0..3).map(|_| rng.below(3) as f64).collect();
                heads::Unit {
                    seqs: (0..3).map(|_| seq(&mut rng)).collect(),
                    target: heads::listwise_targets(&rewards, None).unwrap(),
                    margin: 0.0,
                }
            }
            Objective::Pairwise => heads::Unit {
                seqs: vec![seq(&mut rng), seq(&mut rng)],
                target: vec![],
                margin: 0.0,
            },
        })
        .collect();
    let pad_id = 0;
    let model = heads::SeqModel {
        decoder: &m.model,
        head: &head,
        pad_id,
        padding: Padding::Right,
    };
    let settings = heads::HeadTrainSettings {
        objective,
        center: 0.0,
        optimizer: pipe_train::optim::AdamWConfig {
            lr: 2e-2,
            ..Default::default()
        },
        head_lr: None,
        warmup_steps: 0,
        decay: pipe_train::optim::Decay::Constant,
        batch_size: 4,
        grad_accum: 1,
        steps: 12,
        max_grad_norm: Some(1.0),
        eval_every: 0,
        save_every: 0,
        seed: 1,
        gradient_checkpointing: false,
        keep_best: ("eval_loss".into(), pipe_train::trainer::Goal::Min),
    };
    let report = heads::train(
        &model,
        Some(&adapter),
        &units,
        &[],
        &settings,
        None,
        &mut (),
    )?;
    let meta = heads::SavedHead {
        head: head.config.clone(),
        objective,
        outputs: (0..outputs).map(|i| format!("y{i}")).collect(),
        standardize: vec![],
        pad_id,
        base_model: spec.to_string(),
        lora: true,
    };
    heads::save(
        &out.join("model"),
        Some(&adapter),
        &head,
        &report.best_tensors,
        &meta,
    )?;
    let probes: Vec<Vec<u32>> = (0..5).map(|_| seq(&mut rng)).collect();
    let refs: Vec<&[u32]> = probes.iter().map(Vec::as_slice).collect();
    let mut scores = serde_json::Map::new();
    for (name, side) in [("right", Padding::Right), ("left", Padding::Left)] {
        let sm = heads::SeqModel {
            decoder: &m.model,
            head: &head,
            pad_id,
            padding: side,
        };
        scores.insert(
            name.into(),
            serde_json::json!(sm.predict(&refs, refs.len())?),
        );
    }
    let losses: Vec<f64> = report.history.iter().filter_map(|h| h.loss).collect();
    std::fs::write(
        out.join("scores.json"),
        serde_json::to_string(&serde_json::json!({
            "ids": probes,
            "pad_id": pad_id,
            "scores": scores,
            "train_losses": losses,
        }))?,
    )?;
    Ok(())
}
