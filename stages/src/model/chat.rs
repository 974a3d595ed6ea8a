//! A loaded model answering chat requests: what the `local` oracle backend and
//! `pipe serve` run on. Requests are rendered with the model's chat template,
//! batched with left padding (requests with different decoding settings go in
//! separate batches) and decoded with the Q8_0 copies of the weights on CPU. A request
//! with a JSON schema is decoded under it ([`pipe_train::constrain`]); the compiled
//! grammars are kept per model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use pipe_train::constrain::{Grammar, Schema, Vocab};
use pipe_train::generate::generate_observed;
pub use pipe_train::generate::{Finish, Sampling, TokenLogprob};
use pipe_train::loader::Loaded;
pub use pipe_train::tokenizer::Message;
use pipe_train::Rng;
use serde_json::Value;

/// Called with (request index, new text) while replies stream; `false` ends the request.
pub type OnText<'a> = &'a mut dyn FnMut(usize, &str) -> bool;

/// Whether constrained decoding takes `schema` (the error says what it cannot).
pub fn check_schema(schema: &Value) -> Result<(), String> {
    Schema::from_json_schema(schema).map(|_| ())
}

/// One chat completion request.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Decoding settings.
    pub sampling: Sampling,
    /// Seed of this request's sampler (ignored when greedy).
    pub seed: u64,
    /// Keep the reply inside this JSON schema (constrained decoding), when given.
    pub schema: Option<Arc<Value>>,
    /// A raw prompt continued as it is, without the chat template (the legacy
    /// completions API); `messages` is then ignored.
    pub prompt: Option<String>,
}

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The assistant's text.
    pub text: String,
    /// Why generation ended.
    pub finish: Finish,
    /// Tokens in the rendered prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Per generated token, when the sampling asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
}

/// A model ready to answer chats.
pub struct ChatModel {
    loaded: Loaded,
    eos: Vec<u32>,
    /// The vocabulary's token bytes, built on the first constrained request.
    vocab: OnceLock<Arc<Vocab>>,
    /// Compiled schemas (canonical JSON text → grammar), kept for the model's life.
    grammars: Mutex<HashMap<String, Arc<Grammar>>>,
    /// The name it was loaded by (`gguf:models/x.gguf`).
    pub name: String,
}

impl ChatModel {
    /// Loads `spec` (a pipe-train model spec, relative paths against `workdir`) with an
    /// optional PEFT adapter, as `opts` says (device, dtype, a packed base, int8 decoding).
    pub fn load(
        spec: &str,
        workdir: &Path,
        adapter: Option<&Path>,
        opts: &crate::model::LoadOptions,
    ) -> Result<ChatModel, String> {
        let (device, dtype) =
            crate::model::device(&opts.device, &opts.dtype).map_err(|e| e.to_string())?;
        let resolved = crate::model::resolve_model(spec, workdir);
        let mut loaded =
            pipe_train::loader::load_with(&resolved, dtype, &device, opts.base, opts.double_quant)
                .map_err(|e| format!("loading `{spec}`: {e}"))?;
        loaded.name = spec.to_string();
        if opts.base != crate::model::BaseQuant::None {
            loaded.identity =
                crate::model::identity_with_base(&loaded.identity, opts.base, opts.double_quant);
        }
        if let Some(dir) = adapter {
            pipe_train::lora::load(&mut loaded.model, dir)
                .map_err(|e| format!("loading the adapter {}: {e}", dir.display()))?;
        }
        if opts.decode_int8 {
            loaded
                .model
                .quantize_for_decoding()
                .map_err(|e| format!("quantizing for decoding: {e}"))?;
        }
        if loaded.tokenizer.chat_template().is_none() {
            return Err(format!(
                "`{spec}` has no chat template; a chat model needs one (tokenizer_config.json or GGUF metadata)"
            ));
        }
        let mut eos = loaded.config.eos_ids();
        eos.extend(loaded.tokenizer.eos_id());
        eos.sort();
        eos.dedup();
        Ok(ChatModel {
            loaded,
            eos,
            vocab: OnceLock::new(),
            grammars: Mutex::new(HashMap::new()),
            name: spec.to_string(),
        })
    }

    /// Tokens of `r`'s prompt, or why it cannot be answered: the prompt plus the tokens
    /// it may generate must fit the model's context (`max_position_embeddings`).
    pub fn check_fits(&self, r: &ChatRequest) -> Result<usize, String> {
        let tokens = match &r.prompt {
            Some(p) => self
                .loaded
                .tokenizer
                .encode(p)
                .map_err(|e| format!("tokenizing: {e}"))?
                .len(),
            None => self.encode(&r.messages)?.len(),
        };
        let ctx = self.loaded.config.max_position_embeddings;
        if tokens + r.sampling.max_new_tokens > ctx {
            return Err(format!(
                "this model's context is {ctx} tokens; the prompt has {tokens} and up to {} may be generated",
                r.sampling.max_new_tokens
            ));
        }
        Ok(tokens)
    }

    /// Token ids the model knows.
    pub fn vocab_size(&self) -> usize {
        self.loaded.tokenizer.vocab_size()
    }

    /// The text and exact bytes of one token (special tokens by their name).
    pub fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let text = self
            .loaded
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_default();
        let bytes = self
            .vocab
            .get_or_init(|| Arc::new(Vocab::new(self.loaded.tokenizer.token_bytes())))
            .token(id)
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| text.as_bytes().to_vec());
        (text, bytes)
    }

    /// Log-probabilities of every token after `messages` rendered for generation (the
    /// first reply token's distribution), for checks against a server's `logprobs`.
    pub fn next_logprobs(&self, messages: &[Message]) -> Result<Vec<f32>, String> {
        let ids = self.encode(messages)?;
        pipe_train::generate::next_token_logprobs(&self.loaded.model, &ids)
            .map_err(|e| e.to_string())
    }

    /// sha256 of the model's config, weights and tokenizer.
    pub fn identity(&self) -> &str {
        &self.loaded.identity
    }

    /// Tokens of the rendered prompt of `messages` (with the generation prompt).
    pub fn prompt_tokens(&self, messages: &[Message]) -> Result<usize, String> {
        self.encode(messages).map(|ids| ids.len())
    }

    /// The token ids of a conversation rendered for generation. A final assistant
    /// message is a prefill: the reply continues it.
    fn encode(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        let (msgs, prefill) = match messages.split_last() {
            Some((last, rest)) if last.role == "assistant" => (rest, last.content.as_str()),
            _ => (messages, ""),
        };
        let mut text = self
            .loaded
            .tokenizer
            .apply_chat_template(msgs, true)
            .map_err(|e| format!("rendering the chat template: {e}"))?;
        text.push_str(prefill);
        self.loaded
            .tokenizer
            .encode(&text)
            .map_err(|e| format!("tokenizing: {e}"))
    }

    /// The grammar of `schema` over this model's vocabulary (compiled once).
    pub fn grammar(&self, schema: &Value) -> Result<Arc<Grammar>, String> {
        let key = schema.to_string();
        let mut cache = self.grammars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = cache.get(&key) {
            return Ok(g.clone());
        }
        let parsed = Schema::from_json_schema(schema)?;
        let vocab = self
            .vocab
            .get_or_init(|| Arc::new(Vocab::new(self.loaded.tokenizer.token_bytes())))
            .clone();
        let g = Arc::new(Grammar::new(&parsed, vocab));
        cache.insert(key, g.clone());
        Ok(g)
    }

    /// Where the grammar stands after the prefilled start of the reply (a final assistant
    /// message), or an error when that start cannot begin a valid reply.
    fn grammar_start(&self, g: &Grammar, messages: &[Message]) -> Result<u32, String> {
        let prefill = match messages.last() {
            Some(m) if m.role == "assistant" => m.content.as_str(),
            _ => "",
        };
        g.start_after(prefill.as_bytes()).ok_or_else(|| {
            format!("the reply's prefilled start `{prefill}` cannot begin a reply of the required JSON shape")
        })
    }

    /// Answers a batch of requests, in order.
    pub fn complete(&self, requests: &[ChatRequest]) -> Result<Vec<Completion>, String> {
        self.complete_streaming(requests, None)
    }

    /// [`ChatModel::complete`], calling `on_text(request, delta)` with each new piece of a
    /// reply's text as it is generated (whole characters only, and held back while it
    /// could still turn out to be the start of a stop string); `false` ends that request
    /// there (its client went away). The deltas of a request add up to its final text.
    pub fn complete_streaming(
        &self,
        requests: &[ChatRequest],
        mut on_text: Option<OnText>,
    ) -> Result<Vec<Completion>, String> {
        let prompts = requests
            .iter()
            .map(|r| match &r.prompt {
                Some(p) => self
                    .loaded
                    .tokenizer
                    .encode(p)
                    .map_err(|e| format!("tokenizing: {e}")),
                None => self.encode(&r.messages),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut out: Vec<Option<Completion>> = vec![None; requests.len()];
        // Requests decode together when they share sampling, schema and prefilled start.
        type Group<'r> = (&'r Sampling, Option<(Arc<Grammar>, u32)>, Vec<usize>);
        let mut groups: Vec<Group> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let constraint = match &r.schema {
                None => None,
                Some(schema) => {
                    let g = self.grammar(schema)?;
                    let start = self.grammar_start(&g, &r.messages)?;
                    Some((g, start))
                }
            };
            let same = |c: &Option<(Arc<Grammar>, u32)>| match (c, &constraint) {
                (None, None) => true,
                (Some((a, x)), Some((b, y))) => Arc::ptr_eq(a, b) && x == y,
                _ => false,
            };
            match groups
                .iter_mut()
                .find(|(s, c, _)| **s == r.sampling && same(c))
            {
                Some((_, _, v)) => v.push(i),
                None => groups.push((&r.sampling, constraint, vec![i])),
            }
        }
        for (sampling, constraint, idx) in groups {
            let batch: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].clone()).collect();
            let mut rngs: Vec<Rng> = idx.iter().map(|&i| Rng::new(requests[i].seed)).collect();
            let tokenizer = &self.loaded.tokenizer;
            let hold = sampling
                .stop
                .iter()
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(1)
                .saturating_sub(1);
            let mut ids: Vec<Vec<u32>> = vec![Vec::new(); idx.len()];
            let mut sent: Vec<usize> = vec![0; idx.len()];
            let mut observe = |row: usize, t: u32| -> bool {
                let Some(cb) = on_text.as_mut() else {
                    return true;
                };
                ids[row].push(t);
                let text = tokenizer.decode(&ids[row], true).unwrap_or_default();
                // Whole characters only, minus what a stop string could still claim.
                let text = text.trim_end_matches('\u{FFFD}');
                let keep = text.chars().count().saturating_sub(hold);
                let end = text.char_indices().nth(keep).map_or(text.len(), |(b, _)| b);
                if end > sent[row] && text.is_char_boundary(sent[row]) {
                    let delta = &text[sent[row]..end];
                    sent[row] = end;
                    return cb(idx[row], delta);
                }
                cb(idx[row], "")
            };
            let gens = generate_observed(
                &self.loaded.model,
                tokenizer,
                &batch,
                sampling,
                &self.eos,
                &mut rngs,
                constraint.clone(),
                Some(&mut observe),
            )
            .map_err(|e| format!("generating: {e}"))?;
            if let Some(cb) = on_text.as_mut() {
                for (row, g) in gens.iter().enumerate() {
                    // The rest: what was held back, cut at a stop string.
                    if g.text.len() > sent[row] && g.text.is_char_boundary(sent[row]) {
                        cb(idx[row], &g.text[sent[row]..]);
                    }
                }
            }
            for (g, &i) in gens.into_iter().zip(&idx) {
                out[i] = Some(Completion {
                    completion_tokens: g.ids.len(),
                    prompt_tokens: prompts[i].len(),
                    text: g.text,
                    finish: g.finish,
                    logprobs: g.logprobs,
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|c| c.expect("every request answered"))
            .collect())
    }
}
