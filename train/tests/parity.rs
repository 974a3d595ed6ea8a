//! pipe-train against PyTorch: tiny random models of every family (Llama, Qwen2,
//! Mistral, Qwen3, Gemma, Gemma 2, Phi-3) and a PEFT LoRA adapter on all linear
//! layers, built by `scripts/reference/make_parity_fixtures.py` (transformers 5.24,
//! peft 0.21.2, float32, CPU; versions in `fixtures/parity/VERSIONS.json`). Checked
//! here: base logits, LoRA logits, the LoRA loss and every LoRA gradient.
//! `PIPE_TEST_DEVICE=cuda` runs the same checks on the GPU (a `--features cuda` build;
//! the GPU device script does), with the same f32 tolerances.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pipe_train::loss::causal_lm_loss;
use pipe_train::weights::Weights;
use pipe_train::{lora, Config, Decoder, KeyMask};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(arch)
}

struct Case {
    model: Decoder,
    io: HashMap<String, Tensor>,
    ids: Tensor,
    keys: KeyMask,
    labels: Vec<Vec<i64>>,
}

/// The device under test: `PIPE_TEST_DEVICE` (`cpu` when unset).
fn device() -> Device {
    let name = std::env::var("PIPE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    pipe_train::device(&name).unwrap()
}

fn load(arch: &str) -> Case {
    let dir = fixture(arch);
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let dev = device();
    let w = Weights::from_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev).unwrap();
    let model = Decoder::new(&cfg, w).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let ids = io["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let mask: Vec<Vec<i64>> = io["attention_mask"].to_vec2().unwrap();
    let (b, s) = ids.dims2().unwrap();
    let keys = KeyMask {
        batch: b,
        keys: s,
        valid: mask.iter().flatten().map(|&m| m == 1).collect(),
    };
    let labels: Vec<Vec<i64>> = io["labels"].to_vec2().unwrap();
    Case {
        model,
        io,
        ids,
        keys,
        labels,
    }
}

/// Max |a − b| over positions whose attention mask is 1.
fn max_diff_valid(a: &Tensor, b: &Tensor, keys: &KeyMask) -> f32 {
    let a: Vec<Vec<Vec<f32>>> = a.to_device(&Device::Cpu).unwrap().to_vec3().unwrap();
    let b: Vec<Vec<Vec<f32>>> = b.to_vec3().unwrap();
    let mut worst = 0f32;
    for (r, (ra, rb)) in a.iter().zip(&b).enumerate() {
        for (t, (xa, xb)) in ra.iter().zip(rb).enumerate() {
            if keys.valid[r * keys.keys + t] {
                for (x, y) in xa.iter().zip(xb) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

fn check(arch: &str) {
    let mut c = load(arch);
    let base = c.model.forward(&c.ids, &c.keys).unwrap();
    let d = max_diff_valid(&base, &c.io["base_logits"], &c.keys);
    assert!(d <= 1e-4, "{arch}: base logits differ by {d}");
    report(arch, "base logits max |Δ|", d);

    let adapter = lora::load(&mut c.model, &fixture(arch).join("adapter")).unwrap();
    let logits = c.model.forward(&c.ids, &c.keys).unwrap();
    let d = max_diff_valid(&logits, &c.io["lora_logits"], &c.keys);
    assert!(d <= 1e-4, "{arch}: LoRA logits differ by {d}");
    report(arch, "LoRA logits max |Δ|", d);

    let loss = causal_lm_loss(&c.model, &c.ids, &c.keys, &c.labels, None).unwrap();
    let mean = (loss.sum / loss.tokens as f64).unwrap();
    let want: Vec<f32> = c.io["lora_loss"].to_vec1().unwrap();
    let got = mean.to_scalar::<f32>().unwrap();
    assert!(
        (got - want[0]).abs() <= 1e-5,
        "{arch}: loss {got} vs {}",
        want[0]
    );
    report(arch, "mean loss |Δ|", (got - want[0]).abs());

    let grads = mean.backward().unwrap();
    // 2 layers × projections × (A, B); Phi-3 fuses q/k/v and gate/up into two.
    let projections = if arch == "phi3" { 4 } else { 7 };
    assert_eq!(adapter.vars.len(), 2 * projections * 2);
    let mut worst_grad = 0f32;
    for (key, var) in &adapter.vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{arch}: no gradient for {key}"));
        let g = &g.to_device(&Device::Cpu).unwrap();
        let r = &c.io[&format!("grad.{key}")];
        let scale = r
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (g - r)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(scale > 0.0, "{arch}: reference gradient of {key} is zero");
        worst_grad = worst_grad.max(diff / scale);
        assert!(
            diff / scale <= 1e-4,
            "{arch}: gradient of {key} differs by {} relative",
            diff / scale
        );
    }
    report(arch, "worst LoRA gradient relative Δ", worst_grad);
}

/// Prints the measured figures (`cargo test --test parity -- --nocapture`).
fn report(arch: &str, what: &str, value: f32) {
    println!("{arch}: {what} = {value:.3e}");
}

#[test]
fn llama_matches_transformers_and_peft() {
    check("llama");
}

#[test]
fn qwen2_matches_transformers_and_peft() {
    check("qwen2");
}

#[test]
fn mistral_sliding_window_matches_transformers_and_peft() {
    check("mistral");
}

#[test]
fn qwen3_qk_norm_matches_transformers_and_peft() {
    check("qwen3");
}

#[test]
fn gemma_matches_transformers_and_peft() {
    check("gemma");
}

#[test]
fn gemma2_softcapping_and_alternating_windows_match_transformers_and_peft() {
    check("gemma2");
}

#[test]
fn phi3_fused_projections_match_transformers_and_peft() {
    check("phi3");
}
