//! Speed and memory of pipe-train on one model, one measurement per process so
//! peak memory (VmHWM) belongs to that measurement. Driven by
//! `scripts/bench/bench_train_generate.py`, which runs PyTorch and llama.cpp on
//! the same machine in the same run.
//!
//! ```text
//! bench train MODEL --steps N --batch 4 --seq 256 --r 16 [--targets attn|all]
//!       [--warmup 1] [--save-init DIR]
//! bench generate MODEL --batch B --new 128 [--prompt-len 32] [--schema FILE.json]
//! bench prefill MODEL --prompts 16 --prompt-len 256 [--repeat 5]
//! ```
//! Prints one JSON object. `train` reports the loss of every timed step and its
//! throughput from the second timed step on (the first one loads kernels). With
//! `--save-init DIR` (and `--warmup 0`) it writes what another implementation needs to
//! train the same thing from the same start (`scripts/bench/gpu.sh` gives it to
//! PyTorch and PEFT): `DIR/model.safetensors` and `DIR/config.json` (the base, HF names,
//! model dtype), `DIR/adapter/` (the initial LoRA in PEFT's format), `DIR/data.json`
//! (token ids in the order the steps take them) and `DIR/train.json` (optimizer settings).
//! With `--schema`, `generate` decodes under that JSON schema (constrained decoding); the
//! grammar is compiled and its masks cached in the warm-up, as a server's are after its
//! first request.

use pipe_train::data::Example;
use pipe_train::generate::{generate_constrained, Sampling};
use pipe_train::lora::{LoraConfig, Targets};
use pipe_train::optim::{AdamWConfig, Decay};
use pipe_train::trainer::{train, TrainSettings};
use pipe_train::{loader, lora, Rng};
use std::time::Instant;

/// Per-step losses and times of a training run.
#[derive(Default)]
struct Steps {
    losses: Vec<f64>,
    at: Vec<Instant>,
    tokens: Vec<u64>,
}

impl pipe_train::trainer::Observer for Steps {
    fn on_step(&mut self, m: &pipe_train::trainer::StepMetrics, _total: u64) {
        self.losses.push(m.loss);
        self.at.push(Instant::now());
        self.tokens.push(m.tokens_seen);
    }
}

fn opt_arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

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
            let attn = ["q_proj", "k_proj", "v_proj", "o_proj"];
            let mlp = ["gate_proj", "up_proj", "down_proj"];
            let mut names: Vec<String> = attn.map(String::from).to_vec();
            match opt_arg(&args, "--targets").unwrap_or("attn") {
                "attn" => {}
                "all" => names.extend(mlp.map(String::from)),
                other => return Err(format!("--targets {other}: expected attn or all").into()),
            }
            let targets_json = names.clone();
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
            let warmup = arg(&args, "--warmup", 1);
            let data: Vec<Example> = (0..batch * (steps + warmup))
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
                keep_best: Vec::new(),
            };
            // Warm-up steps (default one), then the timed steps.
            for w in 0..warmup {
                let chunk = &data[w * batch..][..batch];
                train(&m.model, &adapter, chunk, &[], &s, None, &mut ())?;
            }
            let timed = TrainSettings {
                steps: steps as u64,
                ..s
            };
            let timed_data = &data[warmup * batch..];
            if let Some(dir) = opt_arg(&args, "--save-init") {
                save_init(
                    std::path::Path::new(dir),
                    &args[1],
                    &mut m.model,
                    &adapter,
                    timed_data,
                    &timed,
                )?;
            }
            let mut obs = Steps::default();
            let t = Instant::now();
            let rep = train(&m.model, &adapter, timed_data, &[], &timed, None, &mut obs)?;
            let secs = t.elapsed().as_secs_f64();
            // Throughput after the first timed step (kernel loading, allocator warm-up).
            let steady = match (obs.at.first(), obs.at.last(), obs.tokens.first()) {
                (Some(a), Some(b), Some(&t0)) if obs.at.len() > 1 => {
                    (rep.tokens_seen - t0) as f64 / (*b - *a).as_secs_f64()
                }
                _ => rep.tokens_seen as f64 / secs,
            };
            println!(
                "{}",
                serde_json::json!({"impl": "pipe", "what": "train", "tokens_per_s": rep.tokens_seen as f64 / secs,
                    "steady_tokens_per_s": steady, "losses": obs.losses, "targets": targets_json,
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
            let grammar = match opt_arg(&args, "--schema") {
                None => None,
                Some(path) => {
                    let v: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(path)?)?;
                    let schema = pipe_train::constrain::Schema::from_json_schema(&v)?;
                    let vocab = std::sync::Arc::new(pipe_train::constrain::Vocab::new(
                        m.tokenizer.token_bytes(),
                    ));
                    Some(std::sync::Arc::new(pipe_train::constrain::Grammar::new(
                        &schema, vocab,
                    )))
                }
            };
            let constraint = grammar.as_ref().map(|g| (g.clone(), g.start()));
            // Warm-up: the same run once (kernels, and the grammar's masks).
            generate_constrained(
                &m.model,
                &m.tokenizer,
                &prompts,
                &s,
                &[],
                &mut rngs.clone(),
                constraint.clone(),
            )?;
            let t = Instant::now();
            let out = generate_constrained(
                &m.model,
                &m.tokenizer,
                &prompts,
                &s,
                &[],
                &mut rngs,
                constraint,
            )?;
            let secs = t.elapsed().as_secs_f64();
            let n: usize = out.iter().map(|g| g.ids.len()).sum();
            println!(
                "{}",
                serde_json::json!({"impl": "pipe", "what": "generate", "batch": batch, "new_tokens": n,
                    "constrained": grammar.is_some(),
                    "tokens_per_s": n as f64 / secs, "seconds": secs, "peak_rss_mb": peak_rss_mb(),
                    "dtype": format!("{dtype:?}"), "device": format!("{device:?}")})
            );
        }
        "prefill" => {
            // Packed prefill of distinct random prompts (nothing shared, nothing cached), and
            // the rate of one large f32 matmul on the same machine, for the FMA ceiling.
            let (n, plen) = (arg(&args, "--prompts", 16), arg(&args, "--prompt-len", 256));
            if std::env::var("PIPE_BENCH_QUANT").as_deref() != Ok("none") {
                m.model.quantize_for_decoding()?;
            }
            let prompts: Vec<Vec<u32>> = (0..n)
                .map(|_| {
                    (0..plen)
                        .map(|_| 100 + rng.below(vocab - 200) as u32)
                        .collect()
                })
                .collect();
            let parts: Vec<pipe_train::model::Prefill> = prompts
                .iter()
                .map(|p| pipe_train::model::Prefill { ids: p, past: None })
                .collect();
            m.model.prefill_packed(&parts[..1])?;
            // FLOPs: 2 per weight per token in the projections (lm_head not run on every
            // token), plus QKᵀ and PV: 4 · heads · head_dim per (query, key) pair, causal.
            let tokens = (n * plen) as f64;
            let c = &m.config;
            let hd = c.head_size();
            let proj = c.num_hidden_layers
                * (c.hidden_size * hd * (c.num_attention_heads + 2 * c.kv_heads())
                    + c.num_attention_heads * hd * c.hidden_size
                    + 3 * c.hidden_size * c.intermediate_size);
            let pairs = (plen * (plen + 1) / 2 * n) as f64;
            let flops = 2.0 * proj as f64 * tokens
                + 4.0 * (c.num_hidden_layers * c.num_attention_heads * hd) as f64 * pairs;
            // A shared VM's speed drifts by tens of percent within a minute, so each
            // repetition's prefill is measured between two peak measurements and its
            // share is against their mean; the medians are reported.
            let threads = candle_core::utils::get_num_threads();
            let reps = arg(&args, "--repeat", 5).max(1);
            let (mut secs, mut peaks, mut shares) = (Vec::new(), Vec::new(), Vec::new());
            let mut isa = "";
            let mut before = fma_peak_gflops(threads);
            for _ in 0..reps {
                let t = Instant::now();
                m.model.prefill_packed(&parts)?;
                let s = t.elapsed().as_secs_f64();
                let after = fma_peak_gflops(threads);
                let peak = (before.0 + after.0) / 2.0;
                isa = after.1;
                shares.push(flops / s / 1e9 / peak);
                secs.push(s);
                peaks.push(peak);
                before = after;
            }
            let med = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let secs_med = med(&secs);
            println!(
                "{}",
                serde_json::json!({"impl": "pipe", "what": "prefill", "prompts": n, "prompt_len": plen,
                    "repeats": reps, "tokens_per_s": tokens / secs_med, "gflops": flops / secs_med / 1e9,
                    "flops_per_token": flops / tokens, "seconds": secs_med,
                    "fma_peak_gflops": med(&peaks), "fma_peak_isa": isa,
                    "share_of_peak": med(&shares), "shares": shares,
                    "threads": threads})
            );
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    Ok(())
}

/// The machine's f32 multiply-add ceiling, measured rather than derived from a data sheet
/// (a core's vector width, FMA units and clock under load are not what its name says:
/// Zen 4 runs AVX-512 as two 256-bit halves, a VM's clock is the host's): `threads`
/// threads each run independent chains of vector FMAs on registers for ~0.3 s. Returns
/// GFLOP/s (2 FLOPs per lane per FMA) and the instruction set of the faster loop.
fn fma_peak_gflops(threads: usize) -> (f64, &'static str) {
    let mut best = (0.0, "scalar");
    for (isa, lanes) in [("avx2+fma", 8usize), ("avx512f", 16)] {
        if !fma::available(isa) {
            continue;
        }
        let iters = 40_000_000u64;
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(fma::run(isa, iters)));
            }
        });
        let secs = t.elapsed().as_secs_f64();
        let gflops =
            (threads as u64 * iters * fma::CHAINS as u64 * lanes as u64 * 2) as f64 / secs / 1e9;
        if gflops > best.0 {
            best = (gflops, isa);
        }
    }
    best
}

/// Register-only FMA loops for [`fma_peak_gflops`]. `unsafe` only to call functions
/// compiled for a target feature, after checking that the CPU has it.
#[allow(unsafe_code)]
mod fma {
    /// Independent accumulator chains: enough to cover FMA latency (4 cycles) on two ports.
    pub const CHAINS: usize = 12;

    pub fn available(isa: &str) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match isa {
                "avx2+fma" => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                "avx512f" => is_x86_feature_detected!("avx512f"),
                _ => false,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = isa;
            false
        }
    }

    /// Runs `iters` rounds of [`CHAINS`] FMAs; returns a value that depends on all of them.
    pub fn run(isa: &str, iters: u64) -> f32 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers check `available(isa)` first, so the target features exist.
        unsafe {
            match isa {
                "avx2+fma" => avx2(iters),
                _ => avx512(iters),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, iters);
            0.0
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let mul = _mm256_set1_ps(0.999_999);
        let add = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, mul, add);
            }
        }
        let mut sum = _mm256_setzero_ps();
        for a in acc {
            sum = _mm256_add_ps(sum, a);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), sum);
        out.iter().sum()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let mul = _mm512_set1_ps(0.999_999);
        let add = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, mul, add);
            }
        }
        let mut sum = _mm512_setzero_ps();
        for a in acc {
            sum = _mm512_add_ps(sum, a);
        }
        _mm512_reduce_add_ps(sum)
    }
}

/// Writes the start of a training run for another implementation (see the module doc).
fn save_init(
    dir: &std::path::Path,
    spec: &str,
    model: &mut pipe_train::Decoder,
    adapter: &lora::Adapter,
    data: &[Example],
    s: &TrainSettings,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let config = spec
        .strip_prefix("random:")
        .map(|r| {
            r.rsplit_once(':').map_or(
                r,
                |(c, seed)| if seed.parse::<u64>().is_ok() { c } else { r },
            )
        })
        .ok_or("--save-init takes a random:CONFIG.json[:SEED] model")?;
    std::fs::copy(config, dir.join("config.json"))?;
    let tensors = model.merged_tensors()?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    drop(tensors);
    adapter.save(&dir.join("adapter"), spec)?;
    let order = pipe_train::trainer::order(s.seed, 0, data.len());
    let ids: Vec<&Vec<u32>> = order.iter().map(|&i| &data[i].ids).collect();
    std::fs::write(dir.join("data.json"), serde_json::to_vec(&ids)?)?;
    let o = &s.optimizer;
    std::fs::write(
        dir.join("train.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps,
            "weight_decay": o.weight_decay, "max_grad_norm": s.max_grad_norm,
            "batch_size": s.batch_size, "steps": s.steps, "lr_schedule": "constant", "warmup_steps": 0,
        }))?,
    )?;
    Ok(())
}
