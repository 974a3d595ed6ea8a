//! Tokenizers and chat templates.
//!
//! A [`TextTokenizer`] wraps an HF `tokenizers` tokenizer together with the chat
//! template and special tokens from `tokenizer_config.json`. It can also be
//! rebuilt from GGUF metadata (byte-level BPE: vocab, merges, token types, the
//! `pre` pre-tokenizer name; SentencePiece: tokens, scores, types) so that a GGUF
//! file alone is enough. candle's own
//! GGUF tokenizer adds a prefix space that SmolLM2's does not have, and
//! `transformers`' GGUF tokenizer lacks its digit split; this one follows the
//! original `tokenizer.json` (checked against llama.cpp by a script).

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Tokenizer plus chat template and special tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    /// Canonical JSON of the tokenizer and template, for the model identity.
    pub(crate) fingerprint: String,
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from an HF folder.
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::format(&path, format!("not a tokenizer.json: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            crate::io::read_json(&cfg_path)?
        } else {
            json!({})
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take `default`.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        let fingerprint = format!(
            "{}\n{}",
            String::from_utf8_lossy(&bytes),
            chat_template.clone().unwrap_or_default()
        );
        Ok(TextTokenizer {
            inner,
            chat_template,
            bos: token_text(cfg.get("bos_token")),
            eos: token_text(cfg.get("eos_token")),
            fingerprint,
        })
    }

    /// Rebuilds the tokenizer a GGUF file describes (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<TextTokenizer> {
        let md = &content.metadata;
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| Error::format(path, format!("GGUF metadata lacks `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| Error::format(path, e.to_string()))?;
        if model != "gpt2" && model != "llama" {
            return Err(Error::format(
                path,
                format!("GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2`, SentencePiece `llama`); put a tokenizer.json beside the model"),
            ));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)?
                .to_vec()
                .map_err(|e| Error::format(path, format!("{k}: {e}")))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| Error::format(path, format!("{k}: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| Error::format(path, e.to_string()))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let id_of = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let bos = name_of(id_of("tokenizer.ggml.bos_token_id"));
        let eos = name_of(id_of("tokenizer.ggml.eos_token_id"));
        // Control tokens (type 3) are special added tokens, as in tokenizer.json; so are
        // a SentencePiece model's user-defined ones (type 4), which it never splits.
        let special: Vec<(u32, String)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                types.get(*i) == Some(&3) || (model == "llama" && types.get(*i) == Some(&4))
            })
            .map(|(i, t)| (i as u32, t.clone()))
            .collect();
        let chat_template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let json = if model == "gpt2" {
            let merges = strings("tokenizer.ggml.merges")?;
            byte_level_bpe_json(&tokens, &merges, &special, &pre)
        } else {
            let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                Some(v) => v
                    .to_vec()
                    .map_err(|e| Error::format(path, e.to_string()))?
                    .iter()
                    .map(|s| s.to_f32().unwrap_or(0.0))
                    .collect(),
                None => vec![0.0; tokens.len()],
            };
            let add_space_prefix = md
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(true);
            let unk = id_of("tokenizer.ggml.unknown_token_id")
                .and_then(|i| tokens.get(i as usize).cloned());
            Ok(sentencepiece_bpe_json(
                &tokens,
                &special,
                &scores,
                &types,
                add_space_prefix,
                unk.as_deref(),
            ))
        }
        .map_err(|m| Error::format(path, m))?;
        let text = serde_json::to_string(&json).expect("json");
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| Error::format(path, format!("cannot rebuild the tokenizer: {e}")))?;
        let fingerprint = format!("{text}\n{}", chat_template.clone().unwrap_or_default());
        Ok(TextTokenizer {
            inner,
            chat_template,
            bos,
            eos,
            fingerprint,
        })
    }

    /// A byte-level tokenizer without merges (256 byte tokens, then `<|endoftext|>`,
    /// `<|im_start|>`, `<|im_end|>`) and a ChatML template: for tiny test models.
    pub fn bytes_chatml() -> TextTokenizer {
        let tokens: Vec<String> = byte_alphabet().into_iter().map(|c| c.to_string()).collect();
        let names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let special: Vec<(u32, String)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| ((256 + i) as u32, n.to_string()))
            .collect();
        let mut all = tokens;
        all.extend(names.iter().map(|s| s.to_string()));
        let json = byte_level_bpe_json(&all, &[], &special, "gpt2").expect("valid");
        let text = serde_json::to_string(&json).expect("json");
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes()).expect("valid tokenizer");
        let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        TextTokenizer {
            inner,
            chat_template: Some(template.into()),
            bos: None,
            eos: Some("<|im_end|>".into()),
            fingerprint: format!("bytes-chatml-v1\n{template}"),
        }
    }

    /// Replaces the chat template.
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.fingerprint
            .push_str(&format!("\noverride:{template:?}"));
        self.chat_template = template;
    }

    /// The chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Adds special tokens (kept whole, never split) and returns their ids;
    /// tokens already in the vocabulary keep their id.
    pub fn add_special_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let added: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(t.clone(), true))
            .collect();
        self.inner
            .add_special_tokens(added)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        self.fingerprint.push_str(&format!("\nadded:{tokens:?}"));
        tokens
            .iter()
            .map(|t| {
                self.token_id(t)
                    .ok_or_else(|| Error::Tokenizer(format!("could not add the token `{t}`")))
            })
            .collect()
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (chat template, EOS) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::io::write_atomic(&dir.join("tokenizer.json"), self.to_json().as_bytes())?;
        crate::io::write_json(
            &dir.join("tokenizer_config.json"),
            &json!({
                "chat_template": self.chat_template(),
                "eos_token": self.eos,
                "bos_token": self.bos,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": false,
            }),
        )
    }

    /// The tokenizer as a `tokenizer.json` document.
    pub fn to_json(&self) -> String {
        self.inner
            .to_string(false)
            .expect("a loaded tokenizer serialises")
    }

    /// The bytes each token id stands for in generated text, `None` for special tokens
    /// (EOS, chat markers) and ids without a token. Byte-level BPE tokens are mapped back
    /// through GPT-2's byte alphabet; SentencePiece tokens turn `▁` into a space and
    /// `<0xNN>` into the byte. Constrained decoding walks these.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let doc: Value = serde_json::from_str(&self.to_json()).unwrap_or(Value::Null);
        let byte_level = doc["decoder"].to_string().contains("\"ByteLevel\"");
        let special: std::collections::HashSet<u32> = doc["added_tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|t| t["special"].as_bool().unwrap_or(false))
                    .filter_map(|t| t["id"].as_u64().map(|i| i as u32))
                    .collect()
            })
            .unwrap_or_default();
        let inverse: std::collections::HashMap<char, u8> = byte_alphabet()
            .into_iter()
            .enumerate()
            .map(|(b, c)| (c, b as u8))
            .collect();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if special.contains(&id) {
                    return None;
                }
                let tok = self.inner.id_to_token(id)?;
                if byte_level {
                    let mut out = Vec::with_capacity(tok.len());
                    for c in tok.chars() {
                        match inverse.get(&c) {
                            Some(b) => out.push(*b),
                            None => out.extend(c.to_string().as_bytes()),
                        }
                    }
                    return Some(out);
                }
                if tok.len() == 6 && tok.starts_with("<0x") && tok.ends_with('>') {
                    if let Ok(b) = u8::from_str_radix(&tok[3..5], 16) {
                        return Some(vec![b]);
                    }
                }
                Some(tok.replace('\u{2581}', " ").into_bytes())
            })
            .collect()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text are recognised,
    /// no BOS/EOS is added (chat templates write their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-sequence token id (`eos_token` of the config).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_deref().and_then(|t| self.token_id(t))
    }

    /// Renders messages with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(
                "the model has no chat template (tokenizer_config.json `chat_template`); set `chat_template` in the stage, or `chat_template: none` for plain prompt + response text".into(),
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::Tokenizer(format!("chat template does not parse: {e}")))?;
        let tmpl = env.get_template("chat").expect("just added");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Tokenizer(format!("chat template failed: {e}")))
    }
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100….
fn byte_alphabet() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut out = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        if printable.contains(&b) {
            out[b as usize] = char::from_u32(b).expect("valid");
        } else {
            out[b as usize] = char::from_u32(256 + extra).expect("valid");
            extra += 1;
        }
    }
    printable.clear();
    out
}

/// A `tokenizer.json` document for a byte-level BPE with the named pre-tokenizer.
fn byte_level_bpe_json(
    tokens: &[String],
    merges: &[String],
    special: &[(u32, String)],
    pre: &str,
) -> std::result::Result<Value, String> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]})
    };
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "" | "default" | "gpt2" => byte_level,
        "llama-bpe" | "llama3" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "qwen2" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        other => {
            return Err(format!(
            "GGUF pre-tokenizer `{other}` is not supported; put a tokenizer.json beside the model"
        ))
        }
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added = added_tokens(special);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}

/// Special tokens as `tokenizers` added tokens (never split, not normalized).
fn added_tokens(special: &[(u32, String)]) -> Vec<Value> {
    special
        .iter()
        .map(|(id, content)| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect()
}

/// The `tokenizers` JSON of a SentencePiece BPE model given as GGUF metadata
/// (`tokenizer.ggml.model = llama`: Gemma, Phi-3, Llama 2): tokens, scores and token
/// types. llama.cpp (and SentencePiece) repeatedly merge the adjacent pair whose
/// concatenation is the highest-scoring token; a BPE whose merge list is every split of
/// every token, ranked by that token's score, merges the same pairs in the same order
/// (this is how `transformers` converts SentencePiece models too). Spaces become `▁`,
/// with one prefixed to each text segment when `add_space_prefix` is set (llama.cpp
/// prefixes after each special token too, as a per-segment normalizer does); characters
/// outside the vocabulary fall back to the `<0xXX>` byte tokens.
fn sentencepiece_bpe_json(
    tokens: &[String],
    special: &[(u32, String)],
    scores: &[f32],
    types: &[i32],
    add_space_prefix: bool,
    unk: Option<&str>,
) -> Value {
    // Types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    let ty = |i: usize| types.get(i).copied().unwrap_or(1);
    let mut vocab = serde_json::Map::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
        if matches!(ty(i), 1 | 4 | 6) {
            index.entry(t.as_str()).or_insert(i);
        }
    }
    let mut order: Vec<usize> = (0..tokens.len()).filter(|&i| ty(i) == 1).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (
            scores.get(a).copied().unwrap_or(0.0),
            scores.get(b).copied().unwrap_or(0.0),
        );
        sb.total_cmp(&sa).then(a.cmp(&b))
    });
    let mut merges: Vec<Value> = Vec::new();
    for &i in &order {
        let t = tokens[i].as_str();
        let mut splits: Vec<(usize, usize, &str, &str)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(k, _)| {
                let (l, r) = t.split_at(k);
                Some((*index.get(l)?, *index.get(r)?, l, r))
            })
            .collect();
        splits.sort();
        merges.extend(splits.into_iter().map(|(_, _, l, r)| json!([l, r])));
    }
    let mut normalizers = vec![];
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(special),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_and_keeps_special_tokens() {
        let t = TextTokenizer::bytes_chatml();
        assert_eq!(t.vocab_size(), 259);
        let ids = t.encode("<|im_start|>user\nhé 12<|im_end|>").unwrap();
        assert_eq!(ids[0], 257);
        assert_eq!(*ids.last().unwrap(), 258);
        assert_eq!(ids.len(), 2 + "user\nhé 12".len());
        assert_eq!(t.decode(&ids, true).unwrap(), "user\nhé 12");
        assert_eq!(t.eos_id(), Some(258));
    }

    #[test]
    fn added_special_tokens_get_new_ids_and_stay_whole() {
        let mut t = TextTokenizer::bytes_chatml();
        let ids = t
            .add_special_tokens(&["<cite>".into(), "<|im_end|>".into()])
            .unwrap();
        assert_eq!(ids, vec![259, 258]);
        assert_eq!(t.encode("a<cite>b").unwrap(), vec![97, 259, 98]);
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let back = TextTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(back.encode("a<cite>b").unwrap(), vec![97, 259, 98]);
        assert_eq!(back.eos_id(), Some(258));
    }

    #[test]
    fn chat_template_renders_and_missing_template_is_explained() {
        let mut t = TextTokenizer::bytes_chatml();
        let msgs = vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        assert_eq!(
            t.apply_chat_template(&msgs, true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        t.set_chat_template(Some("{{ messages[0].content.strip().upper() }}".into()));
        let msgs = vec![Message {
            role: "user".into(),
            content: " py ".into(),
        }];
        assert_eq!(t.apply_chat_template(&msgs, false).unwrap(), "PY");
        t.set_chat_template(None);
        let err = t.apply_chat_template(&msgs, true).unwrap_err().to_string();
        assert!(err.contains("no chat template"), "{err}");
    }
}
