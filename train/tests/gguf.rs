//! A GGUF base kept in its own blocks (`quantize: keep`): the same logits and LoRA
//! gradients as the same file dequantized, for every kept block type; types it cannot
//! keep and non-GGUF models are refused by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use pipe_train::config::{Architecture, Config};
use pipe_train::data::{Example, Formatter, LossMask, Record};
use pipe_train::linear::BaseQuant;
use pipe_train::lora::{self, LoraConfig, Targets};
use pipe_train::loss::causal_lm_loss;
use pipe_train::tokenizer::TextTokenizer;
use pipe_train::weights::Weights;
use pipe_train::{loader, Decoder, KeyMask, Rng};

/// llama.cpp's name for an HF tensor of a Llama model.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
    let (layer, tail) = rest.split_once('.').unwrap();
    let module = match tail.trim_end_matches(".weight") {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{module}.weight")
}

/// `convert_hf_to_gguf.py`'s q/k permutation (interleaved RoPE pairs).
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// A tiny Llama wide enough for 256-element blocks (Q4_K), saved as an HF folder.
fn tiny_llama(dir: &Path) -> (Config, TextTokenizer) {
    let tok = TextTokenizer::bytes_chatml();
    let mut cfg = Config::tiny(Architecture::Llama, tok.vocab_size());
    cfg.hidden_size = 256;
    cfg.intermediate_size = 256;
    cfg.eos_token_id = tok.eos_id().map(pipe_train::config::TokenIds::One);
    let w = Weights::random(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
    let mut m = Decoder::new(&cfg, w).unwrap();
    pipe_train::export::save_hf_dir(&mut m, &tok, dir).unwrap();
    (cfg, tok)
}

/// Writes the HF folder's model as a llama.cpp-layout GGUF with projections in
/// `proj_type` (norms f32, embeddings Q8_0, as llama.cpp's quantizer leaves them).
fn write_gguf(dir: &Path, cfg: &Config, tok: &TextTokenizer, proj_type: GgmlDType) -> PathBuf {
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut q: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for hf in names {
        let mut t = tensors[hf].clone();
        if hf.ends_with("q_proj.weight") {
            t = permute(&t, cfg.num_attention_heads);
        } else if hf.ends_with("k_proj.weight") {
            t = permute(&t, cfg.kv_heads());
        }
        let ty = if hf.ends_with("_proj.weight") {
            proj_type
        } else if hf.contains("embed_tokens") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        };
        q.push((gguf_name(hf), QTensor::quantize(&t, ty).unwrap()));
    }
    let json: serde_json::Value = serde_json::from_str(&tok.to_json()).unwrap();
    let mut tokens = vec![String::new(); tok.vocab_size()];
    for (t, id) in json["model"]["vocab"].as_object().unwrap() {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for a in json["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_string();
        types[id] = 3;
    }
    let u = |n: usize| Value::U32(n as u32);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.block_count", u(cfg.num_hidden_layers)),
        ("llama.attention.head_count", u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv", u(cfg.kv_heads())),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            u(tok.eos_id().unwrap() as usize),
        ),
        (
            "tokenizer.chat_template",
            Value::String(tok.chat_template().unwrap().to_string()),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let path = dir.join(format!("model-{proj_type:?}.gguf"));
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    path
}

fn examples(tok: &TextTokenizer) -> Vec<Example> {
    let f = Formatter {
        tokenizer: tok,
        chat: true,
        mask: LossMask::AnswerOnly,
        max_len: 48,
        label_tokens: &[],
    };
    (0..3)
        .map(|i| {
            let r = Record::Pair {
                prompt: format!("{i} plus one is"),
                response: format!("{}", i + 1),
            };
            f.example(&r).unwrap().unwrap()
        })
        .collect()
}

/// Loss, then every LoRA gradient (B made non-zero so A has one too).
fn lora_grads(m: &mut loader::Loaded) -> (f32, Vec<(String, Tensor)>) {
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: Targets::Keyword("all-linear".into()),
        use_rslora: false,
    };
    let adapter = lora::attach(&mut m.model, &cfg, &mut Rng::new(1)).unwrap();
    let mut rng = Rng::new(5);
    for (k, v) in &adapter.vars {
        if k.contains("lora_B") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.normal() as f32 * 0.1)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let data = examples(&m.tokenizer);
    let refs: Vec<&Example> = data.iter().collect();
    let b = pipe_train::data::collate(&refs, 256, &Device::Cpu).unwrap();
    let l = causal_lm_loss(&m.model, &b.ids, &b.keys, &b.labels, None).unwrap();
    let g = l.sum.backward().unwrap();
    let loss = l.sum.to_scalar::<f32>().unwrap();
    let grads = adapter
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), g.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (loss, grads)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn kept_gguf_blocks_train_like_the_dequantized_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, tok) = tiny_llama(dir.path());
    // More rows than decoding calls have, so the product runs on the dequantized blocks.
    let seq: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 250).collect();
    let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let keys = KeyMask::full(1, seq.len());
    let logits = |m: &Decoder| m.forward(&ids, &keys).unwrap();
    let hf = loader::load(dir.path().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let reference = logits(&hf.model);
    for ty in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q8_0,
    ] {
        let path = write_gguf(dir.path(), &cfg, &tok, ty);
        let spec = path.to_str().unwrap();
        let mut dense = loader::load(spec, DType::F32, &Device::Cpu).unwrap();
        let mut kept =
            loader::load_with(spec, DType::F32, &Device::Cpu, BaseQuant::Keep, false).unwrap();
        let mut kinds = HashMap::new();
        let mut packed_bytes = 0;
        for (name, lin) in kept.model.linears_mut() {
            let p = lin
                .packed
                .as_ref()
                .unwrap_or_else(|| panic!("{ty:?}: {name} was not kept packed"));
            *kinds.entry(p.kind()).or_insert(0) += 1;
            packed_bytes += p.bytes();
            assert_eq!(lin.weight.elem_count(), 0, "{name}: no dense copy");
        }
        assert_eq!(kinds.len(), 1, "{ty:?}: {kinds:?}");
        let dense_bytes: usize = dense
            .model
            .linears_mut()
            .iter()
            .map(|(_, l)| l.weight.elem_count() * 4)
            .sum();
        assert!(
            packed_bytes * 3 < dense_bytes,
            "{ty:?}: {packed_bytes} B kept vs {dense_bytes} B dense"
        );
        // Same weights as the dequantized file (q/k rows moved back in the blocks).
        let (lk, ld) = (logits(&kept.model), logits(&dense.model));
        let d = max_abs(&(&lk - &ld).unwrap()) / max_abs(&ld);
        assert!(
            d <= 1e-5,
            "{ty:?}: logits differ from the dequantized file by {d}"
        );
        // And close to the unquantized model: a wrong row order would not be.
        let q = max_abs(&(&lk - &reference).unwrap()) / max_abs(&reference);
        let bound = if ty == GgmlDType::Q8_0 { 0.02 } else { 0.25 };
        assert!(q <= bound, "{ty:?}: logits vs the f32 model differ by {q}");
        let (l_kept, g_kept) = lora_grads(&mut kept);
        let (l_dense, g_dense) = lora_grads(&mut dense);
        assert!((l_kept - l_dense).abs() <= 1e-5 * l_dense.abs());
        let mut worst = 0f32;
        for ((name, a), (_, b)) in g_kept.iter().zip(&g_dense) {
            assert!(max_abs(b) > 0.0, "{ty:?}: {name} has no gradient");
            worst = worst.max(max_abs(&(a - b).unwrap()) / max_abs(b));
        }
        println!(
            "{ty:?}: kept {packed_bytes} B vs {dense_bytes} B f32; logits Δ {d:.2e} (vs f32 model {q:.3}); worst LoRA gradient Δ {worst:.2e}"
        );
        assert!(worst <= 1e-5, "{ty:?}: gradients differ by {worst}");
    }
}

#[test]
fn a_block_type_that_cannot_stay_quantized_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, tok) = tiny_llama(dir.path());
    let path = write_gguf(dir.path(), &cfg, &tok, GgmlDType::Q6K);
    let spec = path.to_str().unwrap();
    let Err(e) = loader::load_with(spec, DType::F32, &Device::Cpu, BaseQuant::Keep, false) else {
        panic!("Q6_K blocks were accepted");
    };
    let err = e.to_string();
    assert!(
        err.contains("blk.0.") && err.contains("Q6K") && err.contains("Q4_0, Q4_1, Q4_K, Q8_0"),
        "{err}"
    );
    assert!(err.contains("quantize: none, int8 or nf4"), "{err}");
    // The same file loads when dequantized.
    loader::load(spec, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn keep_needs_a_gguf_model() {
    let Err(e) = loader::load_with(
        "tiny:llama",
        DType::F32,
        &Device::Cpu,
        BaseQuant::Keep,
        false,
    ) else {
        panic!("keep was accepted for a tiny model");
    };
    let err = e.to_string();
    assert!(
        err.contains("quantize: keep") && err.contains(".gguf"),
        "{err}"
    );
}

/// llama.cpp's own converter wrote these files from tiny transformers models (script:
/// scripts/reference/make_gguf_fixtures.py): the config comes from the metadata, the
/// weights from llama.cpp's tensor names (Gemma's norms stored as 1+w), the tokenizer
/// from tokens, scores, types and merges; logits equal transformers' on the same f16
/// weights and every test string tokenizes as the original tokenizer does.
#[test]
fn gguf_files_of_every_family_match_transformers_and_their_tokenizers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    for arch in ["gemma", "gemma2", "qwen3", "phi3"] {
        let dir = root.join(arch);
        let io: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("io.json")).unwrap()).unwrap();
        let spec = dir.join("model.gguf");
        let m = loader::load(spec.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.config.architecture.name(), arch);
        let ids: Vec<u32> = io["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = ids.len();
        let want: Vec<f32> = io["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        let want = Tensor::from_vec(want, (1, n, m.config.vocab_size), &Device::Cpu).unwrap();
        let got = m
            .model
            .forward(
                &Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                &KeyMask::full(1, n),
            )
            .unwrap();
        let d = max_abs(&(&got - &want).unwrap()) / max_abs(&want);
        let mut mismatched = Vec::new();
        let strings = io["strings"].as_array().unwrap();
        for s in strings {
            let text = s["text"].as_str().unwrap();
            let expect: Vec<u32> = s["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = m.tokenizer.encode(text).unwrap();
            if got != expect {
                mismatched.push(format!("{text:?}: {got:?} vs {expect:?}"));
            }
        }
        println!(
            "{arch}: logits relative Δ {d:.2e}; {} of {} strings tokenize identically",
            strings.len() - mismatched.len(),
            strings.len()
        );
        assert!(d <= 1e-4, "{arch}: logits differ by {d} relative");
        assert!(mismatched.is_empty(), "{arch}: {mismatched:#?}");
    }
}

/// Decoding on a kept base runs llama.cpp's block dot products (the input rounded to
/// 8-bit blocks): close to, not equal to, the dequantized product; training calls (a
/// gradient to track) take the dequantized path.
#[test]
fn decoding_on_kept_blocks_uses_the_block_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, tok) = tiny_llama(dir.path());
    let path = write_gguf(dir.path(), &cfg, &tok, GgmlDType::Q4K);
    let spec = path.to_str().unwrap();
    let mut kept =
        loader::load_with(spec, DType::F32, &Device::Cpu, BaseQuant::Keep, false).unwrap();
    let (_, lin) = kept.model.linears_mut().into_iter().next().unwrap();
    let mut rng = Rng::new(3);
    let xs: Vec<f32> = (0..2 * cfg.hidden_size)
        .map(|_| rng.normal() as f32)
        .collect();
    let x = Tensor::from_vec(xs, (2, cfg.hidden_size), &Device::Cpu).unwrap();
    let few = lin.forward_inference(&x).unwrap();
    let p = lin.packed.clone().unwrap();
    let dense = pipe_train::packed::packed_matmul(&x, &p).unwrap();
    let d = max_abs(&(&few - &dense).unwrap()) / max_abs(&dense);
    println!("Q4_K decoding kernel vs dequantized product: relative Δ {d:.2e}");
    assert!(d > 0.0 && d < 0.02, "relative Δ {d}");
}
