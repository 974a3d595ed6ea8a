//! Where models come from: an HF folder, the HF hub cache, a GGUF file, or a
//! tiny random preset. Each source yields a [`Decoder`], its [`TextTokenizer`] and
//! an identity digest (config + weights + tokenizer) for stage fingerprints.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::config::{Architecture, Config};
use crate::error::{Error, Result};
use crate::ggml::GgmlMatrix;
use crate::linear::BaseQuant;
use crate::model::Decoder;
use crate::tokenizer::TextTokenizer;
use crate::weights::{is_projection_weight, Weights};

/// A model reference as users write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// `tiny:llama`, `tiny:qwen2:7`: a 2-layer random model with a byte tokenizer, seeded.
    Tiny {
        /// Architecture.
        arch: Architecture,
        /// Seed of the random weights.
        seed: u64,
    },
    /// `random:CONFIG.json[:SEED]`: random weights of the shape an HF `config.json`
    /// declares, with a byte tokenizer: memory and speed of a model's shape without
    /// its weights (the benchmarks' 1.5B shape).
    Random {
        /// The config file.
        config: PathBuf,
        /// Seed of the random weights.
        seed: u64,
    },
    /// A local HF folder with config.json, safetensors and tokenizer files.
    Dir(PathBuf),
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// `org/name` in the HF hub cache (downloaded unless `HF_HUB_OFFLINE` is set).
    Hub(String),
}

impl ModelSpec {
    /// Reads a spec: `tiny:ARCH[:SEED]`, a path to a `.gguf` file or a folder, or
    /// `org/name`; the prefixes `gguf:` and `hf:` make the kind explicit.
    pub fn parse(s: &str) -> Result<ModelSpec> {
        if let Some(rest) = s.strip_prefix("tiny:") {
            let mut parts = rest.splitn(2, ':');
            let name = parts.next().unwrap_or_default();
            let Some(arch) = Architecture::from_name(name) else {
                return Err(Error::Model {
                    spec: s.into(),
                    message: format!(
                        "unknown tiny architecture `{name}`; expected one of {}",
                        Architecture::NAMES.join(", ")
                    ),
                });
            };
            let seed = match parts.next() {
                Some(n) => n.parse().map_err(|_| Error::Model {
                    spec: s.into(),
                    message: format!("seed `{n}` is not an integer"),
                })?,
                None => 0,
            };
            return Ok(ModelSpec::Tiny { arch, seed });
        }
        if let Some(rest) = s.strip_prefix("random:") {
            let (config, seed) = match rest.rsplit_once(':') {
                Some((c, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                    (c, n.parse().unwrap_or(0))
                }
                _ => (rest, 0),
            };
            return Ok(ModelSpec::Random {
                config: PathBuf::from(config),
                seed,
            });
        }
        if let Some(p) = s.strip_prefix("gguf:") {
            return Ok(ModelSpec::Gguf(PathBuf::from(p)));
        }
        if let Some(id) = s.strip_prefix("hf:") {
            let path = PathBuf::from(id);
            return Ok(if path.is_dir() {
                ModelSpec::Dir(path)
            } else {
                ModelSpec::Hub(id.to_string())
            });
        }
        let path = PathBuf::from(s);
        if s.ends_with(".gguf") {
            return Ok(ModelSpec::Gguf(path));
        }
        if path.is_dir() || s.starts_with('.') || s.starts_with('/') {
            return Ok(ModelSpec::Dir(path));
        }
        if s.split('/').count() == 2 && !s.contains(' ') {
            return Ok(ModelSpec::Hub(s.to_string()));
        }
        Err(Error::Model {
            spec: s.into(),
            message: "expected `tiny:ARCH`, a path to a .gguf file or an HF folder, or an HF repo id `org/name`".into(),
        })
    }

    /// The files the model is read from (empty for tiny presets).
    pub fn files(&self, spec: &str) -> Result<Vec<PathBuf>> {
        match self {
            ModelSpec::Tiny { .. } => Ok(vec![]),
            ModelSpec::Random { config, .. } => {
                if !config.is_file() {
                    return Err(Error::Model {
                        spec: spec.into(),
                        message: format!("config file {} does not exist", config.display()),
                    });
                }
                Ok(vec![config.clone()])
            }
            ModelSpec::Gguf(p) => {
                if !p.is_file() {
                    return Err(Error::Model {
                        spec: spec.into(),
                        message: format!("{} does not exist; `scripts/fetch_smollm2.sh` fetches the SmolLM2 GGUF", p.display()),
                    });
                }
                Ok(vec![p.clone()])
            }
            ModelSpec::Dir(d) => hf_files(d, spec, |f| {
                let p = d.join(f);
                p.exists().then_some(p)
            }),
            ModelSpec::Hub(id) => {
                let offline =
                    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty());
                let cache = hf_hub::Cache::from_env();
                let repo = cache.model(id.clone());
                if offline {
                    return hf_files(Path::new(id), spec, |f| repo.get(f)).map_err(|_| Error::Model {
                        spec: spec.into(),
                        message: format!(
                            "not in the HF cache and HF_HUB_OFFLINE is set; download it first (`huggingface-cli download {id}`), or point `model` at a local folder or .gguf file"
                        ),
                    });
                }
                let api = hf_hub::api::sync::Api::new().map_err(|e| Error::Model {
                    spec: spec.into(),
                    message: e.to_string(),
                })?;
                let remote = api.model(id.clone());
                hf_files(Path::new(id), spec, |f| {
                    repo.get(f).or_else(|| remote.get(f).ok())
                })
            }
        }
    }
}

/// Resolves the files of an HF model through `find` (local folder or hub cache).
fn hf_files(
    root: &Path,
    spec: &str,
    find: impl Fn(&str) -> Option<PathBuf>,
) -> Result<Vec<PathBuf>> {
    let need = |f: &str| {
        find(f).ok_or_else(|| Error::Model {
            spec: spec.into(),
            message: format!("{} has no `{f}`", root.display()),
        })
    };
    let mut files = vec![need("config.json")?, need("tokenizer.json")?];
    files.extend(find("tokenizer_config.json"));
    files.extend(find("chat_template.jinja"));
    if let Some(index) = find("model.safetensors.index.json") {
        let v = crate::io::read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "no weight_map"))?;
        let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            files.push(need(s)?);
        }
    } else {
        files.push(need("model.safetensors")?);
    }
    Ok(files)
}

impl Loaded {
    /// Every id that ends a reply: the config's EOS ids and the tokenizer's, sorted.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut eos = self.config.eos_ids();
        eos.extend(self.tokenizer.eos_id());
        eos.sort();
        eos.dedup();
        eos
    }

    /// The padding id batches use: the tokenizer's end token, else the config's first
    /// EOS id, else 0 (padding is masked, so any id works; this one is a real token).
    pub fn pad_id(&self) -> u32 {
        self.tokenizer
            .eos_id()
            .or(self.config.eos_ids().first().copied())
            .unwrap_or(0)
    }
}

/// A loaded model with everything a stage needs.
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The network.
    pub model: Decoder,
    /// Tokenizer and chat template.
    pub tokenizer: TextTokenizer,
    /// sha256 of config, weights and tokenizer.
    pub identity: String,
    /// Name written as `base_model_name_or_path` in adapters.
    pub name: String,
}

/// sha256 of the model's files (or of the tiny preset's spec); cheap enough for fingerprints.
pub fn identity(spec_text: &str) -> Result<String> {
    let spec = ModelSpec::parse(spec_text)?;
    let mut h = Sha256::new();
    h.update(b"pipe-model-v1\n");
    if let ModelSpec::Random { seed, .. } = &spec {
        h.update(format!("random {seed}\n").as_bytes());
    }
    match &spec {
        ModelSpec::Tiny { arch, seed } => h.update(format!("tiny {arch:?} {seed}").as_bytes()),
        _ => {
            for f in spec.files(spec_text)? {
                let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
                let mut buf = vec![0u8; 1 << 20];
                h.update(
                    f.file_name()
                        .map(|n| n.as_encoded_bytes())
                        .unwrap_or_default(),
                );
                loop {
                    let n = file.read(&mut buf).map_err(|e| Error::io(&f, e))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Loads a model for training or float inference in `dtype` on `device`.
pub fn load(spec_text: &str, dtype: DType, device: &Device) -> Result<Loaded> {
    load_with(spec_text, dtype, device, BaseQuant::None, false)
}

/// [`load`] with the projections packed as `base` (NF4, int8) while the checkpoint is
/// read, one tensor at a time: the dense base never exists as a whole, so the peak is
/// the packed model plus one dense matrix (and the embeddings, which stay dense).
pub fn load_with(
    spec_text: &str,
    dtype: DType,
    device: &Device,
    base: BaseQuant,
    double_quant: bool,
) -> Result<Loaded> {
    let spec = ModelSpec::parse(spec_text)?;
    if base == BaseQuant::Keep && !device.is_cpu() {
        // NF4 and int8 have GPU kernels; GGUF's own block formats only CPU ones.
        return Err(Error::Invalid(format!(
            "quantize: keep (a GGUF file's own blocks) runs on the CPU only; on {device:?} use quantize: nf4, int8 or none"
        )));
    }
    if base == BaseQuant::Keep && !matches!(spec, ModelSpec::Gguf(_)) {
        return Err(Error::Model {
            spec: spec_text.to_string(),
            message: "quantize: keep keeps a GGUF file's own blocks, and this model is not a .gguf file; use quantize: none, int8 or nf4".into(),
        });
    }
    let identity = identity(spec_text)?;
    let (config, weights, tokenizer) = match &spec {
        ModelSpec::Tiny { arch, seed } => {
            let tokenizer = TextTokenizer::bytes_chatml();
            let mut cfg = Config::tiny(*arch, tokenizer.vocab_size());
            cfg.eos_token_id = tokenizer.eos_id().map(crate::config::TokenIds::One);
            cfg.pad_token_id = tokenizer.eos_id();
            let w = Weights::random(&cfg, *seed, dtype, device)?;
            (cfg, w, tokenizer)
        }
        ModelSpec::Random { config, seed } => {
            let tokenizer = TextTokenizer::bytes_chatml();
            let mut cfg = Config::from_file(config)?;
            if cfg.vocab_size < tokenizer.vocab_size() {
                return Err(Error::Model {
                    spec: spec_text.into(),
                    message: format!(
                        "vocab_size {} is smaller than the byte tokenizer's {}",
                        cfg.vocab_size,
                        tokenizer.vocab_size()
                    ),
                });
            }
            cfg.eos_token_id = tokenizer.eos_id().map(crate::config::TokenIds::One);
            cfg.pad_token_id = tokenizer.eos_id();
            let w = Weights::random_packed(&cfg, *seed, dtype, device, base, double_quant)?;
            (cfg, w, tokenizer)
        }
        ModelSpec::Gguf(path) => {
            let (cfg, w, tok) = read_gguf_with(path, dtype, device, base, double_quant)?;
            (cfg, w, tok)
        }
        ModelSpec::Dir(_) | ModelSpec::Hub(_) => {
            let files = spec.files(spec_text)?;
            let dir = files[0]
                .parent()
                .expect("config.json has a folder")
                .to_path_buf();
            let cfg = Config::from_file(&files[0])?;
            let shards: Vec<PathBuf> = files
                .iter()
                .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
                .cloned()
                .collect();
            let w = Weights::from_safetensors_packed(&shards, dtype, device, base, double_quant)?;
            (cfg, w, TextTokenizer::from_dir(&dir)?)
        }
    };
    let mut model = Decoder::new(&config, weights)?;
    // Tiny presets are generated dense; anything not packed while reading is packed now.
    model.quantize_base(base, double_quant)?;
    Ok(Loaded {
        config,
        model,
        tokenizer,
        identity,
        name: spec_text.to_string(),
    })
}

fn md_u(md: &HashMap<String, gguf_file::Value>, k: &str, path: &Path) -> Result<usize> {
    let v = md
        .get(k)
        .ok_or_else(|| Error::format(path, format!("GGUF metadata lacks `{k}`")))?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .map(|n| n as usize)
        .map_err(|e| Error::format(path, format!("{k}: {e}")))
}

/// Reads the config from GGUF metadata.
pub fn gguf_config(content: &gguf_file::Content, path: &Path) -> Result<Config> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| Error::format(path, "GGUF metadata lacks general.architecture"))?;
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gemma" => Architecture::Gemma,
        "gemma2" => Architecture::Gemma2,
        "phi3" => Architecture::Phi3,
        other => {
            return Err(Error::format(
                path,
                format!(
                    "GGUF architecture `{other}` is not supported (llama, qwen2, qwen3, gemma, gemma2, phi3)"
                ),
            ))
        }
    };
    for t in ["rope_factors_long.weight", "rope_factors_short.weight"] {
        if content.tensor_infos.contains_key(t) {
            return Err(Error::format(
                path,
                format!(
                    "`{t}`: LongRoPE scaling (Phi-3 128k) is not supported; use a 4k-context model"
                ),
            ));
        }
    }
    let a = arch_name.as_str();
    let f = |k: &str, d: f64| {
        md.get(&format!("{a}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(d)
    };
    let opt_f = |k: &str| {
        md.get(&format!("{a}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
    };
    let vocab = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len())
        .ok_or_else(|| Error::format(path, "GGUF metadata lacks tokenizer.ggml.tokens"))?;
    let heads = md_u(md, &format!("{a}.attention.head_count"), path)?;
    let hidden = md_u(md, &format!("{a}.embedding_length"), path)?;
    let layers = md_u(md, &format!("{a}.block_count"), path)?;
    // Families with an explicit head size write it as the key length.
    let head_dim = md_u(md, &format!("{a}.attention.key_length"), path).ok();
    let head_size = head_dim.unwrap_or(hidden / heads);
    let window = md_u(md, &format!("{a}.attention.sliding_window"), path)
        .ok()
        .filter(|&w| w > 0);
    let gemma2 = architecture == Architecture::Gemma2;
    // Phi-3 writes its rotary width; anything but the full head is partial rotary.
    let partial_rotary_factor = md_u(md, &format!("{a}.rope.dimension_count"), path)
        .ok()
        .map(|d| d as f64 / head_size as f64)
        .filter(|&r| (r - 1.0).abs() > 1e-12);
    let cfg = Config {
        architecture,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: md_u(md, &format!("{a}.feed_forward_length"), path)?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: md_u(md, &format!("{a}.attention.head_count_kv"), path).ok(),
        head_dim,
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta: f("rope.freq_base", 10_000.0),
        rope_scaling: None,
        rope_parameters: None,
        max_position_embeddings: md_u(md, &format!("{a}.context_length"), path).unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: false,
        sliding_window: window,
        use_sliding_window: false,
        bos_token_id: md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok()),
        eos_token_id: md
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .map(crate::config::TokenIds::One),
        pad_token_id: md
            .get("tokenizer.ggml.padding_token_id")
            .and_then(|v| v.to_u32().ok()),
        hidden_act: None,
        hidden_activation: None,
        // llama.cpp does not store Gemma 2's query scalar: it uses hidden / heads for
        // the 27B model (46 layers) and the head size otherwise, as its configs do.
        query_pre_attn_scalar: gemma2.then(|| {
            (if layers == 46 {
                hidden / heads
            } else {
                head_size
            }) as u32
        }),
        attn_logit_softcapping: if gemma2 {
            opt_f("attn_logit_softcapping")
        } else {
            None
        },
        final_logit_softcapping: if gemma2 {
            opt_f("final_logit_softcapping")
        } else {
            None
        },
        // Gemma 2 alternates from a sliding layer 0, the default when this is unset.
        layer_types: None,
        partial_rotary_factor,
    };
    cfg.validate().map_err(|m| Error::format(path, m))?;
    Ok(cfg)
}

/// HF name of a GGUF tensor of `arch` (llama.cpp's names, `gguf-py`'s tensor map).
fn hf_name(gguf: &str, arch: Architecture) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let gemma2 = arch == Architecture::Gemma2;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        // Gemma 2's pre-MLP norm; elsewhere the norm after attention, before the MLP.
        "ffn_norm" if gemma2 => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma2 => "post_attention_layernorm",
        "post_ffw_norm" if gemma2 => "post_feedforward_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_qkv" => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        // Phi-3's fused gate and up projections are one `ffn_up` (gate rows first).
        "ffn_up" if arch == Architecture::Phi3 => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp stores Llama's q/k rows permuted for interleaved RoPE; undo it so the
/// HF-style (half-split) RoPE applies.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let t = w
        .reshape((heads, out / heads / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?;
    Ok(t)
}

/// Reads a GGUF file: config, dequantized weights, tokenizer.
pub fn read_gguf(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Config, Weights, TextTokenizer)> {
    read_gguf_with(path, dtype, device, BaseQuant::None, false)
}

/// [`read_gguf`], packing each projection as `base` right after it is dequantized.
pub fn read_gguf_with(
    path: &Path,
    dtype: DType,
    device: &Device,
    base: BaseQuant,
    double_quant: bool,
) -> Result<(Config, Weights, TextTokenizer)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::format(path, format!("not a GGUF file: {e}")))?;
    let cfg = gguf_config(&content, path)?;
    let tokenizer = TextTokenizer::from_gguf(&content, path)?;
    let mut weights = Weights::new(HashMap::new(), path);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name, cfg.architecture) else {
            if name.starts_with("rope_") {
                continue;
            }
            return Err(Error::format(
                path,
                format!("unexpected GGUF tensor `{name}`"),
            ));
        };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| Error::format(path, format!("{name}: {e}")))?;
        let heads = if cfg.architecture != Architecture::Llama {
            None
        } else if hf.ends_with("q_proj.weight") {
            Some(cfg.num_attention_heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(cfg.kv_heads())
        } else {
            None
        };
        if base == BaseQuant::Keep
            && is_projection_weight(&hf)
            && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        {
            let (rows, cols) = q.shape().dims2()?;
            let order = heads.map(|h| crate::ggml::unpermute_rows(rows, h));
            let m = GgmlMatrix::from_blocks(q.dtype(), rows, cols, &q.data()?, order.as_deref())
                .map_err(|m| {
                    Error::format(
                        path,
                        format!("{name}: quantize: keep: {m}; use quantize: none, int8 or nf4 for this file"),
                    )
                })?;
            weights.insert_packed(hf, Arc::new(m));
            continue;
        }
        let mut t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        if let Some(h) = heads {
            t = unpermute(&t, h)?;
        }
        // llama.cpp stores Gemma's `x·(1+w)` norm weights as 1+w (its RMSNorm is `x·w`).
        if cfg.architecture.offset_norms() && hf.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        weights.insert_packed_or_dense(
            hf,
            t.to_dtype(dtype)?.to_device(device)?,
            base,
            double_quant,
        )?;
    }
    Ok((cfg, weights, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            ModelSpec::parse("tiny:qwen2:5").unwrap(),
            ModelSpec::Tiny {
                arch: Architecture::Qwen2,
                seed: 5
            }
        );
        assert_eq!(
            ModelSpec::parse("models/x.gguf").unwrap(),
            ModelSpec::Gguf("models/x.gguf".into())
        );
        assert_eq!(
            ModelSpec::parse("HuggingFaceTB/SmolLM2-135M").unwrap(),
            ModelSpec::Hub("HuggingFaceTB/SmolLM2-135M".into())
        );
        let err = ModelSpec::parse("tiny:gpt2").unwrap_err().to_string();
        assert!(err.contains("unknown tiny architecture `gpt2`"), "{err}");
    }

    #[test]
    fn offline_hub_miss_says_how_to_provide_the_model() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", dir.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let err = identity("someone/absent-model").unwrap_err().to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("local folder"),
            "{err}"
        );
    }

    #[test]
    fn gguf_unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, out/heads/2, 2, in).swapaxes(1, 2)
        // with head_dim 6, so the two middle axes differ in length.
        let heads = 2;
        let w = Tensor::arange(0f32, 12.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 3))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, 3, 3))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((12, 3))
            .unwrap();
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
