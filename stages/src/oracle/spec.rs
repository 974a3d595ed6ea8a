//! [`OracleSpec`]: the `oracle:` block a stage's params carry (backend, model,
//! template, system prompt, `returns`, decoding, parse retries, prices, and each
//! backend's own knobs), its workspace deps, and the part of it that enters a stage's
//! fingerprint ([`stage_key`]): execution-only knobs and `max_cost_usd` stay out, so
//! changing them resumes instead of restarting.

use std::collections::BTreeMap;

use pipe_train::generate::Sampling;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// Decode under the reply's JSON schema (built from `returns`), so every reply parses:
    /// on by default for local models; for `openai`, `true` sends `response_format:
    /// json_schema` (for endpoints that support it, `pipe serve` and vLLM do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constrained: Option<bool>,
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
    /// local: keep the model's projections as `nf4` or `int8` (answers differ from the
    /// dense model's, so this is part of the key when set).
    #[serde(default, skip_serializing_if = "is_dense")]
    pub quantize: crate::model::BaseQuant,
    /// local, nf4: quantize the block absmaxes too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub double_quant: bool,
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

fn is_dense(q: &crate::model::BaseQuant) -> bool {
    *q == crate::model::BaseQuant::None
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
                crate::model::model_dep(&spec.model).map_err(|e| err("model", e.message))?;
                crate::model::check_quantize(&spec.model, spec.quantize)
                    .map_err(|e| err("quantize", e.message))?;
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
            crate::oracle::reply::FieldType::parse(ty)
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
            if let Ok(Some(m)) = crate::model::model_dep(&self.model) {
                d.push(m);
            }
        }
        d
    }

    /// Whether replies are decoded under their schema (see `constrained`).
    pub fn constrained(&self) -> bool {
        self.constrained
            .unwrap_or(self.backend == BackendKind::Local)
    }

    /// The part of the spec that determines the replies (for stage fingerprints).
    pub fn key_value(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("serialisable");
        if let Some(o) = v.as_object_mut() {
            // The effective setting: a local oracle's default changed its replies.
            o.insert("constrained".into(), Value::Bool(self.constrained()));
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
                logprobs: None,
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
