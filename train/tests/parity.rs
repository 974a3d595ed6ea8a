//! pipe-train against PyTorch: tiny random models of every family (Llama, Qwen2,
//! Mistral, Qwen3, Gemma, Gemma 2, Phi-3) and a PEFT LoRA adapter on all linear
//! layers, built by `scripts/reference/make_parity_fixtures.py` (transformers 5.24,
//! peft 0.21.2, float32, CPU; versions in `fixtures/parity/VERSIONS.json`). Checked
//! here: base logits, LoRA logits, the LoRA loss and every LoRA gradient.
//! `PIPE_TEST_DEVICE=cuda` runs the same checks on the GPU (a `--features cuda` build;
//! the GPU device script does), with the same tolerances. Every check runs in f32
//! (logits within 1e-4, loss 1e-5, each gradient 1e-4 of its largest value) and once
//! more with the base in bf16 against the same f32 reference (logits within 0.1, loss
//! 0.01, gradients 0.1 relative: bf16 keeps 8 significant bits, so each rounding is
//! worth up to 2⁻⁹ ≈ 2e-3 and two layers compound them; measured on the CPU: logits
//! ≤ 5.4e-2, loss ≤ 4e-3, gradients ≤ 4.1e-2). `PIPE_FIXTURES` points at
//! the fixtures when the test binary runs away from its source tree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pipe_train::loss::causal_lm_loss;
use pipe_train::weights::Weights;
use pipe_train::{lora, Config, Decoder, KeyMask};

fn fixture(arch: &str) -> PathBuf {
    let root = std::env::var_os("PIPE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    root.join("parity").join(arch)
}

/// What a dtype is allowed to differ from the f32 reference by.
struct Tol {
    dtype: DType,
    logits: f32,
    loss: f32,
    grad: f32,
}

const F32: Tol = Tol {
    dtype: DType::F32,
    logits: 1e-4,
    loss: 1e-5,
    grad: 1e-4,
};

const BF16: Tol = Tol {
    dtype: DType::BF16,
    logits: 0.1,
    loss: 0.01,
    grad: 0.1,
};

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

fn load(arch: &str, dtype: DType) -> Case {
    let dir = fixture(arch);
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let dev = device();
    let w = Weights::from_safetensors(&[dir.join("model.safetensors")], dtype, &dev).unwrap();
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
    let a: Vec<Vec<Vec<f32>>> = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec3()
        .unwrap();
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
    check_with(arch, &F32);
}

fn check_with(arch: &str, tol: &Tol) {
    check_case(arch, tol, None);
}

fn check_case(arch: &str, tol: &Tol, chunk_rows: Option<usize>) {
    let mut c = load(arch, tol.dtype);
    c.model.use_chunked_attention(chunk_rows);
    let what = |w: &str| format!("{:?} {w}", tol.dtype);
    let base = c.model.forward(&c.ids, &c.keys).unwrap();
    let d = max_diff_valid(&base, &c.io["base_logits"], &c.keys);
    assert!(d <= tol.logits, "{arch}: base logits differ by {d}");
    report(arch, &what("base logits max |Δ|"), d);

    let adapter = lora::load(&mut c.model, &fixture(arch).join("adapter")).unwrap();
    let logits = c.model.forward(&c.ids, &c.keys).unwrap();
    let d = max_diff_valid(&logits, &c.io["lora_logits"], &c.keys);
    assert!(d <= tol.logits, "{arch}: LoRA logits differ by {d}");
    report(arch, &what("LoRA logits max |Δ|"), d);

    let loss = causal_lm_loss(&c.model, &c.ids, &c.keys, &c.labels, None).unwrap();
    let mean = (loss.sum / loss.tokens as f64).unwrap();
    let want: Vec<f32> = c.io["lora_loss"].to_vec1().unwrap();
    let got = mean
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (got - want[0]).abs() <= tol.loss,
        "{arch}: loss {got} vs {}",
        want[0]
    );
    report(arch, &what("mean loss |Δ|"), (got - want[0]).abs());

    let grads = mean.backward().unwrap();
    // 2 layers × projections × (A, B); Phi-3 fuses q/k/v and gate/up into two.
    let projections = if arch == "phi3" { 4 } else { 7 };
    assert_eq!(adapter.vars.len(), 2 * projections * 2);
    let mut worst_grad = 0f32;
    for (key, var) in &adapter.vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{arch}: no gradient for {key}"));
        let g = &g
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
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
            diff / scale <= tol.grad,
            "{arch}: gradient of {key} differs by {} relative",
            diff / scale
        );
    }
    report(arch, &what("worst LoRA gradient relative Δ"), worst_grad);
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

#[test]
fn every_family_in_bf16_stays_within_the_stated_tolerances() {
    for arch in [
        "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "phi3",
    ] {
        check_with(arch, &BF16);
    }
}

#[test]
fn every_family_matches_with_the_gpus_chunked_attention() {
    // The attention the GPU trains with (query chunks on the matmul, recomputed in the
    // backward), here on the CPU in chunks of 3 query rows: same f32 tolerances.
    for arch in [
        "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "phi3",
    ] {
        check_case(arch, &F32, Some(3));
    }
}
