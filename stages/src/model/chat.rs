//! A loaded model answering chat requests: what the `local` oracle backend and
//! `pipe serve` run on. Requests are rendered with the model's chat template and
//! decoded together with continuous batching ([`ChatBatch`], on
//! [`pipe_train::generate::Decoding`]): their prompts are prefilled in one packed call
//! without padding, a prompt that starts like a recent one (an oracle's rubric, a system
//! prompt) runs only the rest, and each request keeps its own settings, seed and
//! schema. Decoding uses the Q8_0 copies of the weights on CPU. A request
//! with a JSON schema is decoded under it ([`pipe_train::constrain`]); the compiled
//! grammars are kept per model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use pipe_train::constrain::{Grammar, Schema, Vocab};
use pipe_train::generate::{Decoding, PrefixCache, Sequence};
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
    /// Keys and values of recent prompts, reused by requests that start the same way.
    prefixes: Mutex<PrefixCache>,
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
        let eos = loaded.eos_ids();
        Ok(ChatModel {
            loaded,
            eos,
            vocab: OnceLock::new(),
            grammars: Mutex::new(HashMap::new()),
            prefixes: Mutex::new(PrefixCache::default()),
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
        let mut batch = self.batch();
        let stream = on_text.is_some();
        let mut noop = |_: usize, _: &str| true;
        let cb: OnText = match on_text.as_mut() {
            Some(f) => *f,
            None => &mut noop,
        };
        let joined = requests
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, r)| (i, r, stream))
            .collect();
        for (_, r) in batch.join(joined) {
            r?;
        }
        let mut out: Vec<Option<Completion>> = vec![None; requests.len()];
        while !batch.is_idle() {
            for (tag, c) in batch.step(cb)? {
                out[tag] = Some(c);
            }
        }
        Ok(out
            .into_iter()
            .map(|c| c.expect("every request answered"))
            .collect())
    }

    /// A running batch on this model: requests join it and leave it between decoding
    /// steps (continuous batching, what `pipe serve` runs). Prompt starts cached by
    /// earlier batches are reused.
    pub fn batch(&self) -> ChatBatch<'_> {
        let prefixes =
            std::mem::take(&mut *self.prefixes.lock().unwrap_or_else(|p| p.into_inner()));
        ChatBatch {
            model: self,
            run: Decoding::new(
                &self.loaded.model,
                &self.loaded.tokenizer,
                self.eos.clone(),
                prefixes,
            ),
            seqs: HashMap::new(),
        }
    }

    /// Bytes of prompt keys and values kept for reuse by later requests (256 MiB unless
    /// set; 0 keeps none).
    pub fn set_prefix_cache(&self, bytes: usize) {
        *self.prefixes.lock().unwrap_or_else(|p| p.into_inner()) = PrefixCache::new(bytes);
    }

    /// Prompt tokens reused from cached starts, and prompt tokens run, so far.
    pub fn prefix_stats(&self) -> (u64, u64) {
        let p = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        (p.reused, p.computed)
    }

    /// The prompt token ids of `r`, and its constraint (grammar and start state).
    fn prepare(&self, r: &ChatRequest) -> Result<(Vec<u32>, Option<Constraint>), String> {
        let prompt = match &r.prompt {
            Some(p) => self
                .loaded
                .tokenizer
                .encode(p)
                .map_err(|e| format!("tokenizing: {e}"))?,
            None => self.encode(&r.messages)?,
        };
        let constraint = match &r.schema {
            None => None,
            Some(schema) => {
                let g = self.grammar(schema)?;
                let start = self.grammar_start(&g, &r.messages)?;
                Some((g, start))
            }
        };
        Ok((prompt, constraint))
    }
}

/// A grammar and the state a reply starts in.
type Constraint = (Arc<Grammar>, u32);

/// A request decoding in a [`ChatBatch`].
struct Live {
    tag: usize,
    prompt_tokens: usize,
    /// Characters a stop string could still claim at the end of the text.
    hold: usize,
    ids: Vec<u32>,
    /// Bytes of the text already handed to `on_text`.
    sent: usize,
    /// Whether its text is wanted as it is generated.
    stream: bool,
    /// Its first token came from the prefill and was not handed over yet.
    fresh: bool,
}

/// Requests decoding together on one [`ChatModel`], each with its own settings, seed and
/// schema; they join between steps and leave as they finish. See [`ChatModel::batch`].
pub struct ChatBatch<'m> {
    model: &'m ChatModel,
    run: Decoding<'m>,
    /// Sequence id → the request's state.
    seqs: HashMap<usize, Live>,
}

impl ChatBatch<'_> {
    /// Requests decoding now.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Whether nothing is decoding and every finished request was handed out.
    pub fn is_idle(&self) -> bool {
        self.run.is_idle()
    }

    /// Adds requests (each with the caller's tag), prefilled together; a request that
    /// cannot start (an untokenizable prompt, a schema that does not compile) is answered
    /// here with its error and does not join. The flag asks for the text as it is
    /// generated ([`ChatBatch::step`]'s `on_text`).
    pub fn join(
        &mut self,
        requests: Vec<(usize, ChatRequest, bool)>,
    ) -> Vec<(usize, Result<(), String>)> {
        let mut answers = Vec::with_capacity(requests.len());
        let mut seqs = Vec::new();
        let mut lives = Vec::new();
        for (tag, r, stream) in requests {
            match self.model.prepare(&r) {
                Err(e) => answers.push((tag, Err(e))),
                Ok((prompt, constraint)) => {
                    let hold = r
                        .sampling
                        .stop
                        .iter()
                        .map(|s| s.chars().count())
                        .max()
                        .unwrap_or(1)
                        .saturating_sub(1);
                    lives.push(Live {
                        tag,
                        prompt_tokens: prompt.len(),
                        hold,
                        ids: Vec::new(),
                        sent: 0,
                        stream,
                        fresh: false,
                    });
                    seqs.push(Sequence {
                        prompt,
                        sampling: r.sampling,
                        rng: Rng::new(r.seed),
                        constraint,
                    });
                }
            }
        }
        let tags: Vec<usize> = lives.iter().map(|l| l.tag).collect();
        // The first tokens come from the prefill; their text waits for the next step's
        // callback, which hands over everything not yet sent.
        let mut firsts: Vec<(usize, u32)> = Vec::new();
        match self.run.add(seqs, &mut |id, t| {
            firsts.push((id, t));
            true
        }) {
            Ok(ids) => {
                for (id, live) in ids.into_iter().zip(lives) {
                    self.seqs.insert(id, live);
                }
                for (id, t) in firsts {
                    if let Some(l) = self.seqs.get_mut(&id) {
                        l.ids.push(t);
                        l.fresh = true;
                    }
                }
                answers.extend(tags.into_iter().map(|t| (t, Ok(()))));
            }
            Err(e) => {
                let e = format!("generating: {e}");
                answers.extend(tags.into_iter().map(|t| (t, Err(e.clone()))));
            }
        }
        answers
    }

    /// One decoding step; returns the requests that finished (by tag). `on_text(tag,
    /// delta)` hears each new piece of text; `false` ends that request there.
    pub fn step(&mut self, on_text: OnText) -> Result<Vec<(usize, Completion)>, String> {
        let tokenizer = &self.model.loaded.tokenizer;
        let seqs = &mut self.seqs;
        let mut pending_firsts: Vec<usize> = seqs
            .iter()
            .filter(|(_, l)| l.fresh)
            .map(|(&id, _)| id)
            .collect();
        pending_firsts.sort();
        let mut deliver = |l: &mut Live| -> bool {
            l.fresh = false;
            if !l.stream {
                return true;
            }
            let text = tokenizer.decode(&l.ids, true).unwrap_or_default();
            // Whole characters only, minus what a stop string could still claim.
            let text = text.trim_end_matches('\u{FFFD}');
            let keep = text.chars().count().saturating_sub(l.hold);
            let end = text.char_indices().nth(keep).map_or(text.len(), |(b, _)| b);
            if end > l.sent && text.is_char_boundary(l.sent) {
                let delta = &text[l.sent..end];
                l.sent = end;
                return on_text(l.tag, delta);
            }
            on_text(l.tag, "")
        };
        let mut stopped: Vec<usize> = Vec::new();
        for id in pending_firsts {
            if let Some(l) = seqs.get_mut(&id) {
                if !deliver(l) {
                    stopped.push(id);
                }
            }
        }
        for id in stopped {
            self.run
                .cancel(id)
                .map_err(|e| format!("generating: {e}"))?;
        }
        let seqs = &mut self.seqs;
        let finished = self
            .run
            .step(&mut |id, t| match seqs.get_mut(&id) {
                Some(l) => {
                    l.ids.push(t);
                    deliver(l)
                }
                None => true,
            })
            .map_err(|e| format!("generating: {e}"))?;
        let mut out = Vec::with_capacity(finished.len());
        for (id, g, _) in finished {
            let Some(l) = self.seqs.remove(&id) else {
                continue;
            };
            // The rest: what was held back, cut at a stop string.
            if l.stream && g.text.len() > l.sent && g.text.is_char_boundary(l.sent) {
                on_text(l.tag, &g.text[l.sent..]);
            }
            out.push((
                l.tag,
                Completion {
                    completion_tokens: g.ids.len(),
                    prompt_tokens: l.prompt_tokens,
                    text: g.text,
                    finish: g.finish,
                    logprobs: g.logprobs,
                },
            ));
        }
        Ok(out)
    }
}

impl Drop for ChatBatch<'_> {
    /// Hands the cached prompt starts back to the model for later batches.
    fn drop(&mut self) {
        let prefixes = std::mem::take(&mut self.run.prefixes);
        *self
            .model
            .prefixes
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = prefixes;
    }
}
