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

pub mod local;
pub mod memo;
pub mod metrics;
pub mod openai;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pipe_train::generate::Sampling;
use pipe_train::tokenizer::Message;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::chat::Completion;
use crate::contract::{CancelToken, StageContext, StageError};
use crate::oracle_task::OracleTask;
use crate::params::ParamError;

/// Which backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A model loaded in-process by pipe-train (GGUF decodes quantised).
    Local,
    /// An OpenAI-compatible `/chat/completions` endpoint.
    Openai,
}

/// Prices per million tokens, for cost accounting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// USD per million prompt tokens.
    #[serde(default)]
    pub input_per_mtok: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    pub output_per_mtok: f64,
}

impl Prices {
    /// Cost of one request.
    pub fn cost(&self, prompt_tokens: usize, completion_tokens: usize) -> f64 {
        (prompt_tokens as f64 * self.input_per_mtok
            + completion_tokens as f64 * self.output_per_mtok)
            / 1e6
    }
}

/// The `oracle:` block of calibrate, validate and batch_label.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OracleSpec {
    /// `local` or `openai`.
    pub backend: BackendKind,
    /// local: a model spec (`gguf:…`, `hf:…`, a folder, `tiny:…`); openai: the model name.
    pub model: String,
    /// Prompt template file (minijinja; the record's fields are its variables).
    pub template: String,
    /// Optional system message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Start of the oracle's reply, written for it (e.g. `{"answer": "`): sent as a final
    /// assistant message that the model continues (prefill; `pipe serve`, vLLM and local
    /// models honour it) and put back in front of the reply before parsing. Small models
    /// that drift into prose stay in JSON this way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_prefix: Option<String>,
    /// Appended to the reply before parsing: with `reply_prefix: '{"score": '`, `stop:
    /// ["}", "\n"]` and `reply_suffix: "}"`, a small model only has to write the number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_suffix: Option<String>,
    /// Declared reply fields: `name: string | number | bool | list[string] | enum[A,B]`.
    pub returns: BTreeMap<String, String>,
    /// Tokens the oracle may generate per reply.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus mass.
    #[serde(default = "one")]
    pub top_p: f64,
    /// Sampling seed (attempt k uses seed + k).
    #[serde(default)]
    pub seed: u64,
    /// Stop strings.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Extra attempts after a reply that does not parse.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Temperature of retry attempts when `temperature` is 0.
    #[serde(default = "default_retry_temperature")]
    pub retry_temperature: f64,
    /// Prices for the cost metrics and `max_cost_usd`.
    #[serde(default)]
    pub prices: Prices,
    /// local: `auto|cpu|cuda|cuda:N`.
    #[serde(default = "auto")]
    pub device: String,
    /// local: `auto|f32|bf16|f16`.
    #[serde(default = "auto")]
    pub dtype: String,
    /// local: prompts decoded together.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// openai: endpoint root, e.g. `http://127.0.0.1:8000/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// openai: name of the environment variable holding the API key (none: no key sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// openai: seconds before a request is abandoned (and retried).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// openai: attempts after a 429, a 5xx, a timeout or an unreadable response.
    #[serde(default = "default_http_retries")]
    pub max_retries: u32,
    /// openai: first backoff in seconds (doubles per retry, jittered ±50%).
    #[serde(default = "default_backoff")]
    pub backoff_s: f64,
    /// openai: requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_max_new() -> usize {
    256
}
fn one() -> f64 {
    1.0
}
fn default_retries() -> u32 {
    2
}
fn default_retry_temperature() -> f64 {
    0.7
}
fn auto() -> String {
    "auto".into()
}
fn default_batch() -> usize {
    8
}
fn default_timeout() -> f64 {
    60.0
}
fn default_http_retries() -> u32 {
    5
}
fn default_backoff() -> f64 {
    1.0
}
fn default_concurrency() -> usize {
    4
}

/// Keys of [`OracleSpec`] that only change how the work is done, not what the oracle
/// answers: left out of fingerprints.
const EXECUTION_ONLY: &[&str] = &[
    "device",
    "dtype",
    "batch_size",
    "api_key_env",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "concurrency",
];

impl OracleSpec {
    /// Parses and checks an `oracle:` block; `at` is its path in the `with:` block.
    pub fn from_value(v: &Value, at: &str) -> Result<OracleSpec, ParamError> {
        let spec: OracleSpec = crate::params::parse_params(v).map_err(|mut e| {
            e.path.insert(0, at.to_string());
            e
        })?;
        let err = |field: &str, msg: String| ParamError::new(&[at, field], msg);
        match spec.backend {
            BackendKind::Local => {
                crate::ml::model_dep(&spec.model).map_err(|e| err("model", e.message))?;
                if spec.batch_size == 0 {
                    return Err(err("batch_size", "expected at least 1".into()));
                }
            }
            BackendKind::Openai => {
                let url = spec.base_url.as_deref().unwrap_or("");
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(err(
                        "base_url",
                        format!("the openai backend needs `base_url` (http://HOST:PORT/v1), found `{url}`"),
                    ));
                }
                if spec.concurrency == 0 {
                    return Err(err("concurrency", "expected at least 1".into()));
                }
                if spec.timeout_s <= 0.0 {
                    return Err(err(
                        "timeout_s",
                        "expected a positive number of seconds".into(),
                    ));
                }
            }
        }
        for (name, ty) in &spec.returns {
            crate::oracle_task::FieldType::parse(ty)
                .map_err(|e| ParamError::new(&[at, "returns", name], e))?;
        }
        if spec.returns.is_empty() {
            return Err(err("returns", "declare at least one reply field".into()));
        }
        if !(0.0..=1.0).contains(&spec.top_p) || spec.temperature < 0.0 {
            return Err(err(
                "temperature",
                "expected temperature ≥ 0 and top_p in [0, 1]".into(),
            ));
        }
        Ok(spec)
    }

    /// Workspace files the oracle reads (template, model file): fingerprint deps.
    pub fn deps(&self) -> Vec<String> {
        let mut d = vec![self.template.clone()];
        if self.backend == BackendKind::Local {
            if let Ok(Some(m)) = crate::ml::model_dep(&self.model) {
                d.push(m);
            }
        }
        d
    }

    /// The part of the spec that determines the replies (for stage fingerprints).
    pub fn key_value(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("serialisable");
        if let Some(o) = v.as_object_mut() {
            for k in EXECUTION_ONLY {
                o.remove(*k);
            }
            if self.backend == BackendKind::Local {
                if let Ok(pipe_train::loader::ModelSpec::Hub(_)) =
                    pipe_train::loader::ModelSpec::parse(&self.model)
                {
                    if let Ok(id) = pipe_train::loader::identity(&self.model) {
                        o.insert("model_identity".into(), Value::String(id));
                    }
                }
            }
        }
        v
    }

    /// Decoding settings of attempt `k` (0 is the first ask).
    pub fn sampling(&self, attempt: u32) -> (Sampling, u64) {
        let temperature = if attempt > 0 && self.temperature == 0.0 {
            self.retry_temperature
        } else {
            self.temperature
        };
        (
            Sampling {
                max_new_tokens: self.max_new_tokens,
                temperature,
                top_p: self.top_p,
                stop: self.stop.clone(),
            },
            self.seed.wrapping_add(attempt as u64),
        )
    }
}

/// The fingerprinted params of a stage whose oracle block is `oracle_field`: the block
/// reduced to [`OracleSpec::key_value`], and `max_cost_usd` left out (raising a budget
/// must resume, not restart).
pub fn stage_key(params: &Value, oracle_field: &str) -> Value {
    let mut v = params.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("max_cost_usd");
        if let Some(spec) = o
            .get(oracle_field)
            .and_then(|s| OracleSpec::from_value(s, oracle_field).ok())
        {
            o.insert(oracle_field.into(), spec.key_value());
        }
    }
    v
}

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

/// Spending so far and the hard limit; shared by concurrent requests. A request
/// reserves its worst-case cost before it is sent.
#[derive(Debug)]
pub struct Budget {
    limit: Option<f64>,
    prices: Prices,
    state: Mutex<(f64, f64)>,
}

impl Budget {
    /// A budget with `spent` already used.
    pub fn new(limit: Option<f64>, prices: Prices, spent: f64) -> Budget {
        Budget {
            limit,
            prices,
            state: Mutex::new((spent, 0.0)),
        }
    }

    /// Worst-case cost of an ask: prompt tokens estimated at one per 3 bytes (generous
    /// for BPE tokenisers) plus every allowed new token.
    pub fn worst_case(&self, ask: &Ask) -> f64 {
        let bytes: usize = ask.messages.iter().map(|m| m.content.len() + 8).sum();
        self.prices
            .cost(bytes.div_ceil(3) + 8, ask.sampling.max_new_tokens)
    }

    /// Reserves `amount`, or says why not.
    pub fn reserve(&self, amount: f64) -> Result<(), AskError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limit) = self.limit {
            if s.0 + s.1 + amount > limit {
                return Err(AskError::Budget(format!(
                    "max_cost_usd {limit} reached: ${:.4} spent, ${:.4} in flight, the next request could cost ${amount:.4}",
                    s.0, s.1
                )));
            }
        }
        s.1 += amount;
        Ok(())
    }

    /// Releases a reservation and books the actual cost.
    pub fn settle(&self, reserved: f64, actual: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = (s.1 - reserved).max(0.0);
        s.0 += actual;
    }

    /// Money spent so far.
    pub fn spent(&self) -> f64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The prices.
    pub fn prices(&self) -> &Prices {
        &self.prices
    }
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
        let backend: Box<dyn Backend> = match spec.backend {
            BackendKind::Local => {
                ctx.progress(0, None, "loading the oracle model");
                Box::new(local::LocalBackend::load(spec, &ctx.workdir)?)
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

/// Reads and writes the money already spent by a stage's fingerprint (kept in its
/// checkpoint dir, so `max_cost_usd` covers interrupted attempts too).
pub fn spent_so_far(checkpoint_dir: &Path) -> f64 {
    std::fs::read_to_string(spent_path(checkpoint_dir))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Saves the money spent.
pub fn save_spent(checkpoint_dir: &Path, spent: f64) -> Result<(), StageError> {
    std::fs::create_dir_all(checkpoint_dir)
        .map_err(StageError::io("creating the checkpoint dir"))?;
    crate::fsio::write_atomic(&spent_path(checkpoint_dir), format!("{spent}\n").as_bytes())
        .map_err(StageError::io("saving the money spent"))
}

fn spent_path(dir: &Path) -> PathBuf {
    dir.join("oracle_spent_usd")
}
