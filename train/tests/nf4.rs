//! pipe-train's NF4 against bitsandbytes: the fixture (`fixtures/nf4`, written by
//! `scripts/reference/make_nf4_fixtures.py` with bitsandbytes on CPU) holds, for
//! three weight shapes (one not a multiple of 64, one with a partial nested block),
//! bitsandbytes' packed codes and absmaxes with and without double quantization and
//! its `dequantize_4bit` of each. Quantizing the same weights must give the same
//! bytes and the same f32 bits; dequantizing must give bitsandbytes' values exactly.
//! And a tiny Llama that bitsandbytes saved in 4-bit (`fixtures/bnb4bit`, from
//! `scripts/reference/make_bnb4bit_fixtures.py`) loads packed and gives the logits
//! transformers computes from the same checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use pipe_train::nf4::{mean_f32, nf4_code, Absmax, Nf4Matrix};

fn fixture() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4/nf4.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const SHAPES: [(usize, usize); 3] = [(8, 64), (5, 70), (64, 300)];

#[test]
fn code_book_is_bitsandbytes_nf4() {
    let f = fixture();
    assert_eq!(bits(&nf4_code()), bits(&f32s(&f["nf4_code"])));
}

#[test]
fn quantizing_gives_bitsandbytes_bytes_without_double_quant() {
    let f = fixture();
    for (i, (rows, cols)) in SHAPES.into_iter().enumerate() {
        let w = f32s(&f[&format!("w.{i}")]);
        let q = Nf4Matrix::quantize(&w, rows, cols, false);
        assert_eq!(
            q.packed,
            bytes(&f[&format!("packed.{i}")]),
            "shape {i}: codes"
        );
        let Absmax::Plain(a) = &q.absmax else {
            panic!("plain absmax expected")
        };
        assert_eq!(
            bits(a),
            bits(&f32s(&f[&format!("absmax.{i}")])),
            "shape {i}: absmax"
        );
        assert_eq!(
            bits(&q.dequantize()),
            bits(&f32s(&f[&format!("dequant.{i}")])),
            "shape {i}: dequantized"
        );
        q.validate().unwrap();
    }
}

#[test]
fn quantizing_gives_bitsandbytes_bytes_with_double_quant() {
    let f = fixture();
    for (i, (rows, cols)) in SHAPES.into_iter().enumerate() {
        let w = f32s(&f[&format!("w.{i}")]);
        let q = Nf4Matrix::quantize(&w, rows, cols, true);
        assert_eq!(
            q.packed,
            bytes(&f[&format!("dq.packed.{i}")]),
            "shape {i}: codes"
        );
        let Absmax::Nested(n) = &q.absmax else {
            panic!("nested absmax expected")
        };
        let want_offset = f32s(&f[&format!("dq.offset.{i}")])[0];
        assert_eq!(
            n.offset.to_bits(),
            want_offset.to_bits(),
            "shape {i}: offset {} vs {want_offset}",
            n.offset
        );
        assert_eq!(
            bits(&n.code),
            bits(&f32s(&f[&format!("dq.nested_code.{i}")])),
            "shape {i}: code book"
        );
        assert_eq!(
            n.codes,
            bytes(&f[&format!("dq.absmax.{i}")]),
            "shape {i}: nested codes"
        );
        assert_eq!(
            bits(&n.absmax),
            bits(&f32s(&f[&format!("dq.nested_absmax.{i}")])),
            "shape {i}: nested absmax"
        );
        assert_eq!(
            bits(&q.dequantize()),
            bits(&f32s(&f[&format!("dq.dequant.{i}")])),
            "shape {i}: dequantized"
        );
        q.validate().unwrap();
    }
}

#[test]
fn offset_is_torchs_f32_mean_bit_for_bit() {
    let f = fixture();
    for n in [1usize, 9, 33, 100, 257, 511, 1000, 5000, 12345] {
        let v = f32s(&f[&format!("mean_in.{n}")]);
        let want = f32s(&f[&format!("mean_out.{n}")])[0];
        assert_eq!(
            mean_f32(&v).to_bits(),
            want.to_bits(),
            "n = {n}: {} vs {want}",
            mean_f32(&v)
        );
    }
}

fn bnb_checkpoint_matches_transformers(variant: &str) {
    use pipe_train::weights::Weights;
    use pipe_train::{Config, Decoder, KeyMask};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bnb4bit")
        .join(variant);
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let w = Weights::from_safetensors(
        &[dir.join("model.safetensors")],
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut model = Decoder::new(&cfg, w).unwrap();
    let packed = model
        .linears_mut()
        .iter()
        .filter(|(_, l)| l.packed.as_ref().is_some_and(|p| p.kind() == "nf4"))
        .count();
    assert_eq!(packed, 14, "{variant}: every projection stays packed");
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let ids = io["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let mask: Vec<Vec<i64>> = io["attention_mask"].to_vec2().unwrap();
    let keys = KeyMask {
        batch: 2,
        keys: 7,
        valid: mask.iter().flatten().map(|&m| m == 1).collect(),
    };
    let got: Vec<Vec<Vec<f32>>> = model.forward(&ids, &keys).unwrap().to_vec3().unwrap();
    let diff = |name: &str| {
        let want: Vec<Vec<Vec<f32>>> = io[name].to_vec3().unwrap();
        let mut worst = 0f32;
        for r in 0..2 {
            for t in 0..7 {
                if keys.valid[r * 7 + t] {
                    for (a, b) in got[r][t].iter().zip(&want[r][t]) {
                        worst = worst.max((a - b).abs());
                    }
                }
            }
        }
        worst
    };
    // The checkpoint's meaning in f32: transformers after `model.dequantize()`.
    let exact = diff("logits_dequantized");
    // bitsandbytes' own CPU 4-bit forward computes in bf16: a loose reference.
    let kernel = diff("logits");
    println!(
        "{variant}: logits max |Δ| vs transformers on the dequantized checkpoint = {exact:.3e}, \
         vs bitsandbytes' bf16 CPU kernel = {kernel:.3e}"
    );
    assert!(exact <= 1e-4, "{variant}: logits differ by {exact}");
    assert!(
        kernel <= 5e-2,
        "{variant}: logits differ from bitsandbytes' forward by {kernel}"
    );
}

#[test]
fn bitsandbytes_4bit_checkpoint_with_double_quant_loads_and_matches_transformers() {
    bnb_checkpoint_matches_transformers("double_quant");
}

#[test]
fn bitsandbytes_4bit_checkpoint_without_double_quant_loads_and_matches_transformers() {
    bnb_checkpoint_matches_transformers("plain");
}
