//! Oracles: an LLM asked to label records with a templated prompt and a declared
//! JSON reply, behind one interface whatever runs it (`local`: a model pipe-train
//! loads; `openai`: any OpenAI-compatible chat completions server).
//!
//! Every reply is memoised in the `oracle` memo directory under a key made of
//! the oracle's identity (backend, model identity, endpoint), the decoding
//! settings, the attempt number and the digest of the exact messages the oracle
//! sees (system prompt + rendered template). So a run killed at any moment
//! loses only the requests in flight; calibrate, validate and batch_label share
//! replies; adding rows asks only for the new rows; and changing how replies
//! are parsed re-parses the stored replies instead of asking again.
//!
//! A reply that does not parse is retried (`retries`, with `retry_temperature`
//! when decoding is greedy, since a greedy retry would repeat itself); then the
//! item is a failure with its reason. Transport errors are retried by the
//! backend and never memoised.

mod budget;
pub mod local;
pub mod memo;
pub mod openai;
pub mod reply;
mod spec;

use std::sync::Mutex;

use pipe_train::generate::Sampling;
use pipe_train::tokenizer::Message;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::contract::{CancelToken, StageContext, StageError};
use crate::model::chat::Completion;
use crate::oracle::reply::OracleTask;

pub use budget::{save_spent, spent_so_far, Budget};
pub use spec::{stage_key, BackendKind, OracleSpec, Prices};

/// One request to a backend.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The messages.
    pub messages: Vec<Message>,
    /// Decoding settings.
    pub sampling: Sampling,
    /// Sampler seed.
    pub seed: u64,
    /// Identifies this exact ask (its memo key). The openai backend sends it as an
    /// `Idempotency-Key` header, so a server that honours it (`pipe serve` does) answers a
    /// request repeated after a crash from its cache instead of generating again.
    pub key: String,
    /// The reply's JSON schema when decoding is constrained (`constrained:`).
    pub schema: Option<std::sync::Arc<Value>>,
}

/// Why a backend gave no reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AskError {
    /// The request failed for good (after the backend's own retries); the item records it.
    #[error("{0}")]
    Failed(String),
    /// The next request could exceed `max_cost_usd`; nothing more is sent.
    #[error("{0}")]
    Budget(String),
    /// The run was interrupted.
    #[error("cancelled")]
    Cancelled,
    /// The backend cannot work at all (model failed to run); the stage fails.
    #[error("{0}")]
    Fatal(String),
}

/// A backend: answers asks, calling `done` as each finishes (in any order).
pub trait Backend: Send + Sync {
    /// What identifies the answers (model identity, endpoint).
    fn identity(&self) -> String;

    /// Answers `asks`; must call `done` exactly once per ask.
    fn ask_all(
        &self,
        asks: &[Ask],
        budget: &Budget,
        cancel: &CancelToken,
        done: &(dyn Fn(usize, Result<Completion, AskError>) + Sync),
    );
}

/// An oracle ready to label: spec, task, backend and memo.
pub struct Oracle {
    /// The spec.
    pub spec: OracleSpec,
    /// Template and reply shape.
    pub task: OracleTask,
    backend: Box<dyn Backend>,
    memo: memo::Memo,
    identity: String,
    /// The reply's JSON schema when decoding is constrained.
    schema: Option<std::sync::Arc<Value>>,
}

/// How one item ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labelled {
    /// The parsed reply (declared fields only), when one parsed.
    pub label: Option<Value>,
    /// The last raw reply.
    pub raw: Option<String>,
    /// Why no reply parsed (parse failures and request errors, one per attempt).
    pub errors: Vec<String>,
    /// Attempts made (memoised or new).
    pub attempts: u32,
    /// Requests sent in this run for this item.
    pub asked: u32,
    /// Cost of the attempts (memoised ones included).
    pub cost_usd: f64,
    /// The replies were not all parse failures: a request error happened.
    pub request_failed: bool,
}

/// Counters of one labelling call.
#[derive(Debug, Clone, Default)]
pub struct LabelStats {
    /// Requests sent.
    pub asked: u64,
    /// Replies found in the memo.
    pub memo_hits: u64,
    /// Prompt and completion tokens of the new requests.
    pub prompt_tokens: u64,
    /// Completion tokens of the new requests.
    pub completion_tokens: u64,
}

impl Oracle {
    /// Builds the oracle of a stage: reads the template (relative to the workdir) and
    /// loads or connects the backend.
    pub fn open(spec: &OracleSpec, ctx: &StageContext) -> Result<Oracle, StageError> {
        let template_path = ctx.workdir.join(&spec.template);
        let template = std::fs::read_to_string(&template_path).map_err(StageError::io(format!(
            "reading the oracle template {}",
            template_path.display()
        )))?;
        Self::with_template(spec, &template, ctx)
    }

    /// Like [`Oracle::open`] with the template text given (validate takes it from the
    /// calibration report).
    pub fn with_template(
        spec: &OracleSpec,
        template: &str,
        ctx: &StageContext,
    ) -> Result<Oracle, StageError> {
        let task = OracleTask::new(template, &spec.returns)
            .map_err(|e| StageError::Failed(format!("oracle template {}: {e}", spec.template)))?;
        let schema = spec
            .constrained()
            .then(|| std::sync::Arc::new(task.json_schema()));
        if let (Some(schema), Some(prefix)) = (&schema, &spec.reply_prefix) {
            let parsed = pipe_train::constrain::Schema::from_json_schema(schema)
                .map_err(|e| StageError::Failed(format!("the reply schema: {e}")))?;
            if !pipe_train::constrain::Automaton::new(&parsed).viable_prefix(prefix.as_bytes()) {
                return Err(StageError::Failed(format!(
                    "oracle reply_prefix `{prefix}` cannot begin a reply of the declared shape {schema} (constrained decoding writes keys in alphabetical order); fix the prefix or set `constrained: false`"
                )));
            }
        }
        let backend: Box<dyn Backend> = match spec.backend {
            BackendKind::Local => {
                ctx.progress(0, None, "loading the oracle model");
                Box::new(local::LocalBackend::load(spec, ctx)?)
            }
            BackendKind::Openai => Box::new(openai::OpenAiBackend::new(spec)?),
        };
        let identity = backend.identity();
        ctx.log(&format!(
            "oracle {:?} {} (identity {}), template {} ({})",
            spec.backend,
            spec.model,
            short(&identity),
            spec.template,
            short(&task.template_digest)
        ));
        Ok(Oracle {
            spec: spec.clone(),
            task,
            backend,
            memo: memo::Memo::new(ctx.memo_dir("oracle")),
            identity,
            schema,
        })
    }

    /// The oracle's identity and template digest, for reports.
    pub fn describe(&self) -> Value {
        json!({
            "backend": self.spec.backend,
            "model": self.spec.model,
            "identity": self.identity,
            "template": self.spec.template,
            "template_digest": self.task.template_digest,
        })
    }

    fn messages(&self, record: &Value) -> Result<Vec<Message>, String> {
        let mut m = Vec::new();
        if let Some(s) = &self.spec.system {
            m.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        m.push(Message {
            role: "user".into(),
            content: self.task.render(record)?,
        });
        if let Some(p) = &self.spec.reply_prefix {
            m.push(Message {
                role: "assistant".into(),
                content: p.clone(),
            });
        }
        Ok(m)
    }

    fn memo_key(&self, messages: &[Message], attempt: u32) -> String {
        let (s, seed) = self.spec.sampling(attempt);
        let mut h = Sha256::new();
        let doc = json!({
            "backend": self.spec.backend,
            "identity": self.identity,
            "template_digest": self.task.template_digest,
            "sampling": s,
            "seed": seed,
            "attempt": attempt,
            "messages": messages.iter().map(|m| [&m.role, &m.content]).collect::<Vec<_>>(),
        });
        let mut doc = doc;
        if let Some(schema) = &self.schema {
            // A constrained reply is another reply than a free one.
            doc["constrained"] = (**schema).clone();
        }
        h.update(doc.to_string().as_bytes());
        format!("{:x}", h.finalize())
    }

    /// Labels `records`: memoised replies first, then rounds of requests until each item
    /// parsed or used its attempts. Returns one result per record, in order; a budget
    /// stop or a cancel is an error after every finished reply has been memoised.
    pub fn label(
        &self,
        records: &[Value],
        budget: &Budget,
        cancel: &CancelToken,
        stats: &mut LabelStats,
    ) -> Result<Vec<Labelled>, AskError> {
        let mut out: Vec<Labelled> = Vec::with_capacity(records.len());
        let mut msgs: Vec<Option<Vec<Message>>> = Vec::with_capacity(records.len());
        for r in records {
            let mut l = Labelled {
                label: None,
                raw: None,
                errors: vec![],
                attempts: 0,
                asked: 0,
                cost_usd: 0.0,
                request_failed: false,
            };
            match self.messages(r) {
                Ok(m) => msgs.push(Some(m)),
                Err(e) => {
                    l.errors.push(e);
                    msgs.push(None);
                }
            }
            out.push(l);
        }
        let max_attempts = self.spec.retries + 1;
        // Items still open, with their next attempt number.
        let mut open: Vec<usize> = (0..records.len()).filter(|&i| msgs[i].is_some()).collect();
        let mut first_error: Option<AskError> = None;
        while !open.is_empty() && first_error.is_none() {
            // Consume memoised attempts.
            let mut need: Vec<usize> = Vec::new();
            for &i in &open {
                let m = msgs[i].as_ref().expect("open items have messages");
                loop {
                    let l = &mut out[i];
                    if l.label.is_some() || l.attempts >= max_attempts {
                        break;
                    }
                    match self.memo.get(&self.memo_key(m, l.attempts)) {
                        Some(rep) => {
                            stats.memo_hits += 1;
                            self.take_reply(l, rep);
                        }
                        None => {
                            need.push(i);
                            break;
                        }
                    }
                }
            }
            if need.is_empty() {
                break;
            }
            let asks: Vec<Ask> = need
                .iter()
                .map(|&i| {
                    let (sampling, seed) = self.spec.sampling(out[i].attempts);
                    let messages = msgs[i].clone().expect("open");
                    Ask {
                        key: self.memo_key(&messages, out[i].attempts),
                        messages,
                        sampling,
                        seed,
                        schema: self.schema.clone(),
                    }
                })
                .collect();
            let results: Mutex<Vec<Option<Result<Completion, AskError>>>> =
                Mutex::new(vec![None; asks.len()]);
            let memo_err: Mutex<Option<String>> = Mutex::new(None);
            self.backend.ask_all(&asks, budget, cancel, &|j, r| {
                let r = r.map(|mut c| {
                    if let Some(p) = &self.spec.reply_prefix {
                        c.text = format!("{p}{}", c.text);
                    }
                    if let Some(sfx) = &self.spec.reply_suffix {
                        c.text.push_str(sfx);
                    }
                    c
                });
                if let Ok(c) = &r {
                    // Durable before anything else learns of it.
                    let key = &asks[j].key;
                    let rep = memo::Reply {
                        text: c.text.clone(),
                        prompt_tokens: c.prompt_tokens,
                        completion_tokens: c.completion_tokens,
                        cost_usd: budget.prices().cost(c.prompt_tokens, c.completion_tokens),
                    };
                    if let Err(e) = self.memo.put(key, &rep) {
                        *memo_err.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(format!("memoising a reply: {e}"));
                    }
                }
                results.lock().unwrap_or_else(|e| e.into_inner())[j] = Some(r);
            });
            if let Some(e) = memo_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(AskError::Fatal(e));
            }
            let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
            let mut still = Vec::new();
            for (j, r) in results.into_iter().enumerate() {
                let i = need[j];
                let l = &mut out[i];
                match r {
                    Some(Ok(c)) => {
                        stats.asked += 1;
                        stats.prompt_tokens += c.prompt_tokens as u64;
                        stats.completion_tokens += c.completion_tokens as u64;
                        l.asked += 1;
                        let cost = budget.prices().cost(c.prompt_tokens, c.completion_tokens);
                        self.take_reply(
                            l,
                            memo::Reply {
                                text: c.text,
                                prompt_tokens: c.prompt_tokens,
                                completion_tokens: c.completion_tokens,
                                cost_usd: cost,
                            },
                        );
                        if l.label.is_none() && l.attempts < max_attempts {
                            still.push(i);
                        }
                    }
                    Some(Err(AskError::Failed(e))) => {
                        stats.asked += 1;
                        l.asked += 1;
                        l.errors.push(format!("request failed: {e}"));
                        l.request_failed = true;
                    }
                    Some(Err(e)) => {
                        if first_error.is_none() {
                            first_error = Some(e);
                        }
                    }
                    None => {
                        if first_error.is_none() {
                            first_error = Some(AskError::Fatal(
                                "the backend did not answer every request".into(),
                            ));
                        }
                    }
                }
            }
            open = still;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Labels `items` `chunk` at a time, saving the money spent after each chunk and
    /// reporting progress with `message(done, stats, spent)`. A budget stop, a failure or
    /// a cancel keeps every finished reply (memoised) and says how far it got.
    pub fn label_in_chunks(
        &self,
        ctx: &StageContext,
        items: &[Value],
        chunk: usize,
        budget: &Budget,
        stats: &mut LabelStats,
        message: impl Fn(usize, &LabelStats, f64) -> String,
    ) -> Result<Vec<Labelled>, StageError> {
        let total = items.len();
        let mut out = Vec::with_capacity(total);
        for part in items.chunks(chunk.max(1)) {
            let r = self.label(part, budget, &ctx.cancel, stats);
            save_spent(&ctx.checkpoint_dir, budget.spent())?;
            match r {
                Ok(l) => out.extend(l),
                Err(AskError::Cancelled) => return Err(StageError::Cancelled),
                Err(AskError::Budget(why)) => {
                    return Err(StageError::Failed(format!(
                        "stopped before exceeding the budget: {why}. {} of {total} items are answered and kept; raise `max_cost_usd` and rerun to answer the rest",
                        out.len()
                    )))
                }
                Err(e) => {
                    return Err(StageError::Failed(format!(
                        "oracle: {e}; {} of {total} items are answered and kept, a rerun asks only for the rest",
                        out.len()
                    )))
                }
            }
            ctx.progress(
                out.len() as u64,
                Some(total as u64),
                &message(out.len(), stats, budget.spent()),
            );
        }
        Ok(out)
    }

    fn take_reply(&self, l: &mut Labelled, rep: memo::Reply) {
        l.attempts += 1;
        l.cost_usd += rep.cost_usd;
        match self.task.parse(&rep.text) {
            Ok(v) => {
                l.label = Some(v);
                l.errors.clear();
            }
            Err(e) => l.errors.push(format!("attempt {}: {e}", l.attempts)),
        }
        l.raw = Some(rep.text);
    }
}

/// First 12 characters of a digest.
pub fn short(s: &str) -> &str {
    let hex = s.len() >= 12 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if hex {
        &s[..12]
    } else {
        s
    }
}
