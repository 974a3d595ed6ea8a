//! Speed and memory of pipe-train on one model, one measurement per process so
//! peak memory (VmHWM) belongs to that measurement. Driven by
//! `scripts/bench/bench_train_generate.py`, which runs PyTorch and llama.cpp on
//! the same machine in the same run.
//!
//! ```text
//! bench train MODEL --steps N --batch 4 --seq 256 --r 16
//! bench generate MODEL --batch B --new 128 [--prompt-len 32]
//! ```
//! Prints one JSON object.

use pipe_train::data::Example;
use pipe_train::generate::{generate, Sampling};
use pipe_train::lora::{LoraConfig, Targets};
use pipe_train::optim::{AdamWConfig, Decay};
use pipe_train::trainer::{train, TrainSettings};
use pipe_train::{loader, lora, Rng};
use std::time::Instant;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    pipe_train::allocator::keep_freed_memory();
    pipe_train::fix_thread_count();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = pipe_train::device(
        std::env::var("PIPE_BENCH_DEVICE")
            .as_deref()
            .unwrap_or("cpu"),
    )?;
    let dtype = pipe_train::dtype(
        std::env::var("PIPE_BENCH_DTYPE")
            .as_deref()
            .unwrap_or("auto"),
        &device,
    )?;
    // PIPE_BENCH_BASE=nf4|int8 packs the projections while loading (PIPE_BENCH_DQ=1:
    // double quantization); training then runs on the packed base.
    let base = std::env::var("PIPE_BENCH_BASE").unwrap_or_else(|_| "none".into());
    let base = pipe_train::linear::BaseQuant::parse(&base)?;
    let dq = std::env::var("PIPE_BENCH_DQ").as_deref() == Ok("1");
    let mut m = loader::load_with(&args[1], dtype, &device, base, dq)?;
    let vocab = m.config.vocab_size;
    let mut rng = Rng::new(0);
    match args[0].as_str() {
        "train" => {
            let (steps, batch, seq, r) = (
                arg(&args, "--steps", 6),
                arg(&args, "--batch", 4),
                arg(&args, "--seq", 256),
                arg(&args, "--r", 16),
            );
            let names = ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec();
            let cfg = LoraConfig {
                r,
                alpha: 2.0 * r as f64,
                dropout: 0.0,
                target_modules: Targets::Names(names),
                use_rslora: false,
            };
            let adapter = lora::attach(&mut m.model, &cfg, &mut rng)?;
            // Resident memory once the model is ready (weights, packed or not, plus
            // what loading left in the allocator); the training peak minus this is
            // what the steps added (activations, gradients, optimizer state).
            let ready_mb = rss_mb();
            let data: Vec<Example> = (0..batch * (steps + 1))
                .map(|_| {
                    let ids: Vec<u32> = (0..seq).map(|_| rng.below(vocab) as u32).collect();
                    Example {
                        labels: ids.iter().map(|&i| i as i64).collect(),
                        ids,
                    }
                })
                .collect();
            let s = TrainSettings {
                optimizer: AdamWConfig {
                    lr: 1e-4,
                    ..Default::default()
                },
                warmup_steps: 0,
                decay: Decay::Constant,
                batch_size: batch,
                grad_accum: 1,
                steps: 1,
                max_grad_norm: Some(1.0),
                eval_every: 0,
                save_every: 0,
                seed: 0,
                pad_id: 0,
                gradient_checkpointing: std::env::var("PIPE_BENCH_CKPT").as_deref() == Ok("1"),
            };
            // Warm-up steps (default one), then the timed steps.
            for w in 0..arg(&args, "--warmup", 1) {
                let chunk = &data[(w % (steps + 1)) * batch..][..batch];
                train(&m.model, &adapter, chunk, &[], &s, None, &mut ())?;
            }
            let timed = TrainSettings {
                steps: steps as u64,
                ..s
            };
            let t = Instant::now();
            let rep = train(
                &m.model,
                &adapter,
                &data[batch..],
                &[],
                &timed,
                None,
                &mut (),
            )?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"impl": "pipe", "what": "train", "tokens_per_s": rep.tokens_seen as f64 / secs,
                    "steps": steps, "batch": batch, "seq": seq, "r": r, "last_loss": rep.final_train_loss,
                    "peak_rss_mb": peak_rss_mb(), "dtype": format!("{dtype:?}"), "device": format!("{device:?}"),
                    "base": format!("{base:?}").to_lowercase(),
                    "gradient_checkpointing": timed.gradient_checkpointing, "ready_rss_mb": ready_mb})
            );
        }
        "generate" => {
            let (batch, new, plen) = (
                arg(&args, "--batch", 1),
                arg(&args, "--new", 128),
                arg(&args, "--prompt-len", 32),
            );
            if std::env::var("PIPE_BENCH_QUANT").as_deref() != Ok("none") {
                m.model.quantize_for_decoding()?;
            }
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|_| {
                    (0..plen)
                        .map(|_| 100 + rng.below(vocab - 200) as u32)
                        .collect()
                })
                .collect();
            let s = Sampling {
                max_new_tokens: new,
                ..Default::default()
            };
            let mut rngs = vec![Rng::new(0); batch];
            // Warm-up on a short run.
            generate(
                &m.model,
                &m.tokenizer,
                &prompts[..1],
                &Sampling {
                    max_new_tokens: 2,
                    ..s.clone()
                },
                &[],
                &mut rngs[..1].to_vec(),
            )?;
            let t = Instant::now();
            let out = generate(&m.model, &m.tokenizer, &prompts, &s, &[], &mut rngs)?;
            let secs = t.elapsed().as_secs_f64();
            let n: usize = out.iter().map(|g| g.ids.len()).sum();
            println!(
                "{}",
                serde_json::json!({"impl": "pipe", "what": "generate", "batch": batch, "new_tokens": n,
                    "tokens_per_s": n as f64 / secs, "seconds": secs, "peak_rss_mb": peak_rss_mb(),
                    "dtype": format!("{dtype:?}"), "device": format!("{device:?}")})
            );
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    Ok(())
}
