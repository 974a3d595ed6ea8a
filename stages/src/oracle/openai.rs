//! The `openai` backend: `POST {base_url}/chat/completions` on any
//! OpenAI-compatible server (OpenAI, vLLM, llama.cpp's server, `pipe serve`).
//!
//! `concurrency` requests in flight; a 429, a 5xx, a timeout, a dropped
//! connection or a response that is not the expected JSON is retried up to
//! `max_retries` times after a jittered exponential backoff (or the server's
//! `Retry-After`, capped at a minute); other 4xx fail the item at once. Token
//! usage comes from the response (estimated from lengths when absent) and is
//! priced by `prices`; before each request its worst-case cost is reserved
//! against `max_cost_usd`, so the limit is never crossed. Each request carries an
//! `Idempotency-Key` (the reply's memo key): a server that honours it answers a request
//! repeated after a crash (the reply was in flight when pipe died) from its cache.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pipe_train::generate::Finish;
use serde_json::{json, Value};

use super::{Ask, AskError, Backend, Budget, OracleSpec};
use crate::contract::{CancelToken, StageError};
use crate::model::chat::Completion;

/// A chat completions endpoint.
pub struct OpenAiBackend {
    agent: ureq::Agent,
    url: String,
    model: String,
    key: Option<String>,
    max_retries: u32,
    backoff_s: f64,
    concurrency: usize,
}

impl OpenAiBackend {
    /// A client for the spec's endpoint; reads the API key from its env variable.
    pub fn new(spec: &OracleSpec) -> Result<OpenAiBackend, StageError> {
        let base = spec
            .base_url
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches('/');
        let key = match &spec.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                StageError::Failed(format!(
                    "oracle.api_key_env names `{var}`, which is not set in the environment"
                ))
            })?),
            None => None,
        };
        Ok(OpenAiBackend {
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs_f64(spec.timeout_s))
                .max_idle_connections_per_host(spec.concurrency.max(1))
                .build(),
            url: format!("{base}/chat/completions"),
            model: spec.model.clone(),
            key,
            max_retries: spec.max_retries,
            backoff_s: spec.backoff_s,
            concurrency: spec.concurrency.max(1),
        })
    }

    fn body(&self, ask: &Ask) -> String {
        let mut b = json!({
            "model": self.model,
            "messages": ask.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "max_tokens": ask.sampling.max_new_tokens,
            "temperature": ask.sampling.temperature,
            "top_p": ask.sampling.top_p,
            "seed": ask.seed,
        });
        if !ask.sampling.stop.is_empty() {
            b["stop"] = json!(ask.sampling.stop);
        }
        if let Some(schema) = &ask.schema {
            b["response_format"] = json!({"type": "json_schema",
                "json_schema": {"name": "reply", "schema": **schema, "strict": true}});
        }
        b.to_string()
    }

    /// One request with its retries.
    fn ask_one(
        &self,
        ask: &Ask,
        jitter: &mut pipe_train::Rng,
        cancel: &CancelToken,
    ) -> Result<Completion, AskError> {
        let body = self.body(ask);
        let mut last = String::new();
        for attempt in 0..=self.max_retries {
            if cancel.is_cancelled() {
                return Err(AskError::Cancelled);
            }
            let mut req = self
                .agent
                .post(&self.url)
                .set("Content-Type", "application/json")
                .set("Idempotency-Key", &ask.key);
            if let Some(k) = &self.key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let (retryable, wait) = match req.send_string(&body) {
                Ok(resp) => match resp.into_string() {
                    Ok(text) => match parse_completion(&text, ask) {
                        Ok(c) => return Ok(c),
                        Err(e) => {
                            last = e;
                            (true, None)
                        }
                    },
                    Err(e) => {
                        last = format!("reading the response: {e}");
                        (true, None)
                    }
                },
                Err(ureq::Error::Status(code, resp)) => {
                    let retry_after = resp
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .map(|s| s.clamp(0.0, 60.0));
                    let text = resp.into_string().unwrap_or_default();
                    last = format!("HTTP {code}: {}", excerpt(&text));
                    (code == 429 || code >= 500, retry_after)
                }
                Err(ureq::Error::Transport(t)) => {
                    last = format!("transport: {t}");
                    (true, None)
                }
            };
            if !retryable {
                break;
            }
            if attempt < self.max_retries {
                let wait = wait.unwrap_or_else(|| {
                    self.backoff_s * 2f64.powi(attempt as i32) * (0.5 + jitter.uniform())
                });
                // Sleep in slices so Ctrl-C is honoured.
                let until = std::time::Instant::now() + Duration::from_secs_f64(wait);
                while std::time::Instant::now() < until {
                    if cancel.is_cancelled() {
                        return Err(AskError::Cancelled);
                    }
                    std::thread::sleep(
                        Duration::from_millis(20).min(until - std::time::Instant::now()),
                    );
                }
            }
        }
        Err(AskError::Failed(format!(
            "{} after {} attempt(s): {last}",
            self.url,
            self.max_retries + 1
        )))
    }
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Reads `choices[0].message.content` and `usage` from a response body.
fn parse_completion(text: &str, ask: &Ask) -> Result<Completion, String> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| format!("the response is not JSON ({e}): {}", excerpt(text)))?;
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| format!("the response has no `choices[0]`: {}", excerpt(text)))?;
    let content = choice
        .pointer("/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "the response has no `choices[0].message.content`: {}",
                excerpt(text)
            )
        })?;
    let finish = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => Finish::Length,
        Some("stop") if !ask.sampling.stop.is_empty() => Finish::Stop,
        _ => Finish::Eos,
    };
    let usage = |k: &str| v.pointer(&format!("/usage/{k}")).and_then(Value::as_u64);
    let prompt_bytes: usize = ask.messages.iter().map(|m| m.content.len()).sum();
    Ok(Completion {
        text: content.to_string(),
        finish,
        prompt_tokens: usage("prompt_tokens")
            .map(|n| n as usize)
            .unwrap_or(prompt_bytes.div_ceil(4)),
        completion_tokens: usage("completion_tokens")
            .map(|n| n as usize)
            .unwrap_or(content.len().div_ceil(4)),
        logprobs: Vec::new(),
    })
}

impl Backend for OpenAiBackend {
    fn identity(&self) -> String {
        format!("openai:{}#{}", self.url, self.model)
    }

    fn ask_all(
        &self,
        asks: &[Ask],
        budget: &Budget,
        cancel: &CancelToken,
        done: &(dyn Fn(usize, Result<Completion, AskError>) + Sync),
    ) {
        let next = AtomicUsize::new(0);
        let stopped = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for w in 0..self.concurrency.min(asks.len()) {
                let (next, stopped) = (&next, &stopped);
                s.spawn(move || {
                    let seed = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0);
                    let mut jitter = pipe_train::Rng::new(seed).fork(w as u64);
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= asks.len() {
                            break;
                        }
                        if cancel.is_cancelled() {
                            done(i, Err(AskError::Cancelled));
                            continue;
                        }
                        if stopped.load(Ordering::SeqCst) {
                            done(
                                i,
                                Err(AskError::Budget(
                                    "budget reached earlier in this batch".into(),
                                )),
                            );
                            continue;
                        }
                        let reserve = budget.worst_case(&asks[i]);
                        if let Err(e) = budget.reserve(reserve) {
                            stopped.store(true, Ordering::SeqCst);
                            done(i, Err(e));
                            continue;
                        }
                        let r = self.ask_one(&asks[i], &mut jitter, cancel);
                        let actual = match &r {
                            Ok(c) => budget.prices().cost(c.prompt_tokens, c.completion_tokens),
                            Err(_) => 0.0,
                        };
                        budget.settle(reserve, actual);
                        done(i, r);
                    }
                });
            }
        });
    }
}
