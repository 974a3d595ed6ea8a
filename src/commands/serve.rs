//! `pipe serve MODEL`: an OpenAI-compatible chat completions server on a local
//! model, so what a pipeline trained can be used (and the `openai` oracle
//! backend tested) over real HTTP.
//!
//! One thread owns the model and decodes with continuous batching: requests queue
//! to it and join the running batch between decoding steps (up to `--max-batch`
//! sequences), each with its own settings, seed and schema, and leave as they finish.
//! Their prompts are prefilled together without padding, and a prompt that starts
//! like a recent one (a shared system prompt or rubric) reuses that start's keys and
//! values (`--prefix-cache-mb`).
//!
//! A request with an `Idempotency-Key` header is generated once: a repeat (a client
//! that crashed while its request was in flight and asks again on resume) waits for
//! or reuses the first one's completion, which is produced even if the first client
//! has gone. The last 10,000 keys are kept.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pipe_stages::model::chat::{ChatModel, ChatRequest, Completion, Finish, Message, Sampling};
use serde_json::{json, Value};

use crate::cli::ServeArgs;

struct Job {
    request: ChatRequest,
    reply: tokio::sync::oneshot::Sender<Result<Completion, String>>,
    /// Streamed requests: the reply's text as it is generated; closed by the client
    /// going away, which ends the sequence.
    stream: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

type Shared = tokio::sync::watch::Receiver<Option<Result<Completion, String>>>;

struct AppState {
    name: String,
    /// Required bearer token, when `--api-key` is set.
    api_key: Option<String>,
    /// Each token id's text and bytes, for `logprobs`.
    tokens: Vec<(String, Vec<u8>)>,
    queue: mpsc::Sender<Job>,
    served: AtomicU64,
    /// Idempotency key → its completion (pending or done), oldest keys first out.
    idempotent: std::sync::Mutex<(HashMap<String, Shared>, VecDeque<String>)>,
}

const IDEMPOTENT_KEYS: usize = 10_000;

pub fn run(args: &ServeArgs) -> anyhow::Result<u8> {
    let workdir = std::env::current_dir()?;
    eprintln!("loading {} ...", args.model);
    let opts = pipe_stages::model::LoadOptions {
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        decode_int8: !args.no_quantize,
        ..Default::default()
    };
    let model = ChatModel::load(&args.model, &workdir, args.adapter.as_deref(), &opts)
        .map_err(super::UsageError)?;
    model.set_prefix_cache(args.prefix_cache_mb << 20);
    let tokens: Vec<(String, Vec<u8>)> = (0..model.vocab_size() as u32)
        .map(|id| model.token_text(id))
        .collect();
    let (tx, rx) = mpsc::channel::<Job>();
    let max_batch = args.max_batch.max(1);
    std::thread::Builder::new()
        .name("pipe-serve-model".into())
        .spawn(move || worker(model, rx, max_batch))?;
    let state = Arc::new(AppState {
        name: args.name.clone().unwrap_or_else(|| args.model.clone()),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        tokens,
        queue: tx,
        served: AtomicU64::new(0),
        idempotent: Default::default(),
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
        // One line on stdout, for scripts and tests that start the server on port 0.
        println!("listening on http://{}/v1", listener.local_addr()?);
        use std::io::Write as _;
        std::io::stdout().flush()?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })?;
    Ok(crate::exit::OK)
}

/// Decodes queued requests until the server goes away, with continuous batching: the
/// requests waiting when a step ends join the running batch (up to `max_batch`
/// sequences), and each leaves as soon as it is done.
fn worker(model: ChatModel, rx: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch = model.batch();
    // Tag → the job waiting for it.
    let mut live: HashMap<usize, Job> = HashMap::new();
    let mut tags = 0usize;
    loop {
        let mut incoming: Vec<Job> = Vec::new();
        if batch.is_idle() {
            match rx.recv() {
                Ok(j) => incoming.push(j),
                Err(_) => return,
            }
            // Whatever arrives within a moment joins the same prefill.
            while incoming.len() < max_batch {
                match rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(j) => incoming.push(j),
                    Err(_) => break,
                }
            }
        } else {
            while live.len() + incoming.len() < max_batch {
                match rx.try_recv() {
                    Ok(j) => incoming.push(j),
                    Err(_) => break,
                }
            }
        }
        let mut joining = Vec::with_capacity(incoming.len());
        for mut j in incoming {
            // A request that cannot fit the context is answered at once.
            if let Err(e) = model.check_fits(&j.request) {
                let _ = j.reply.send(Err(format!("{TOO_LONG}{e}")));
                continue;
            }
            let tag = tags;
            tags += 1;
            let stream = j.stream.is_some();
            joining.push((tag, j.request.clone(), stream));
            j.request = ChatRequest::default();
            live.insert(tag, j);
        }
        if !joining.is_empty() {
            for (tag, r) in batch.join(joining) {
                if let Err(e) = r {
                    if let Some(j) = live.remove(&tag) {
                        let _ = j.reply.send(Err(e));
                    }
                }
            }
        }
        let mut on_text = |tag: usize, delta: &str| -> bool {
            match live.get(&tag).and_then(|j| j.stream.as_ref()) {
                Some(tx) => {
                    !tx.is_closed() && (delta.is_empty() || tx.send(delta.to_string()).is_ok())
                }
                None => true,
            }
        };
        match batch.step(&mut on_text) {
            Ok(done) => {
                for (tag, c) in done {
                    if let Some(j) = live.remove(&tag) {
                        let _ = j.reply.send(Ok(c));
                    }
                }
            }
            Err(e) => {
                // The batch is lost: every request in it is answered with the error.
                for (_, j) in live.drain() {
                    let _ = j.reply.send(Err(e.clone()));
                }
                drop(batch);
                batch = model.batch();
            }
        }
    }
}

/// Seconds since the epoch, for `created`.
fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Marks a worker error that is the request's fault (its prompt does not fit).
const TOO_LONG: &str = "context_length_exceeded: ";

/// The response for a worker's error: 400 for a request that cannot fit, else 500.
fn worker_error(e: &str) -> Response {
    match e.strip_prefix(TOO_LONG) {
        Some(msg) => (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": {"message": msg, "type": "invalid_request_error",
                                   "param": "messages", "code": "context_length_exceeded"}}),
            ),
        )
            .into_response(),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e),
    }
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

/// `None` when the request may go on; else the 401 to send.
fn unauthorized(s: &AppState, headers: &axum::http::HeaderMap) -> Option<Response> {
    let want = s.api_key.as_ref()?;
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Same length first, then every byte: the comparison does not stop at the first mismatch.
    let ok = given.is_some_and(|g| {
        g.len() == want.len()
            && g.bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    (!ok).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key (Authorization: Bearer ...)",
        )
    })
}

async fn models(State(s): State<Arc<AppState>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    Json(json!({
        "object": "list",
        "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "pipe"}],
    }))
    .into_response()
}

/// A parsed request: what to generate, how many choices, which log-probabilities.
struct Parsed {
    request: ChatRequest,
    n: usize,
    /// `stream: true`: server-sent events, and whether the last one carries the usage.
    stream: bool,
    include_usage: bool,
    /// `Some(k)`: each token's logprob and its `k` most likely alternatives.
    logprobs: Option<usize>,
}

/// Most choices one request may ask for (`n`).
const MAX_N: u64 = 8;
/// Most alternatives per token (`top_logprobs`), as OpenAI allows.
const MAX_TOP_LOGPROBS: u64 = 20;

/// Reads an OpenAI chat request.
fn parse_request(body: &[u8]) -> Result<Parsed, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("the body must be a JSON object".into());
    }
    let msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` must be a list of {role, content}")?;
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or(format!("messages[{i}].role must be a string"))?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text parts, concatenated.
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => return Err(format!("messages[{i}].content must be a string")),
        };
        messages.push(Message {
            role: role.into(),
            content,
        });
    }
    if messages.is_empty() {
        return Err("`messages` must hold at least one message".into());
    }
    for (i, m) in messages.iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(format!(
                "messages[{i}].role `{}` is not one of system, developer, user, assistant, tool",
                m.role
            ));
        }
    }
    let schema = match v.get("response_format") {
        None | Some(Value::Null) => None,
        Some(rf) => match rf.get("type").and_then(Value::as_str) {
            Some("text") => None,
            // llama.cpp's servers take a schema beside `json_object`; so does this one.
            Some("json_object") => match rf.get("schema") {
                None | Some(Value::Null) => Some(json!({"type": "object"})),
                Some(schema) => {
                    pipe_stages::model::chat::check_schema(schema)
                        .map_err(|e| format!("response_format.schema: {e}"))?;
                    Some(schema.clone())
                }
            },
            Some("json_schema") => {
                let schema = rf
                    .pointer("/json_schema/schema")
                    .ok_or("response_format.json_schema.schema is missing")?;
                pipe_stages::model::chat::check_schema(schema)
                    .map_err(|e| format!("response_format.json_schema.schema: {e}"))?;
                Some(schema.clone())
            }
            _ => {
                return Err("response_format.type must be text, json_object or json_schema".into())
            }
        },
    };
    let mut parsed = sampling_of(&v)?;
    parsed.request.messages = messages;
    parsed.request.schema = schema.map(Arc::new);
    Ok(parsed)
}

/// The decoding fields shared by chat and legacy completions.
fn sampling_of(v: &Value) -> Result<Parsed, String> {
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("`stream` must be a boolean".into()),
    };
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let n = match v.get("n") {
        None | Some(Value::Null) => 1,
        Some(x) => match x.as_u64() {
            Some(n) if (1..=MAX_N).contains(&n) => n as usize,
            _ => return Err(format!("`n` must be an integer from 1 to {MAX_N}")),
        },
    };
    let logprobs = match v.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(match v.get("top_logprobs") {
            None | Some(Value::Null) => 0,
            Some(x) => match x.as_u64() {
                Some(k) if k <= MAX_TOP_LOGPROBS => k as usize,
                _ => {
                    return Err(format!(
                        "`top_logprobs` must be an integer from 0 to {MAX_TOP_LOGPROBS}"
                    ))
                }
            },
        }),
        // The legacy completions API: `logprobs: k`.
        Some(Value::Number(k)) if k.as_u64().is_some_and(|k| k <= 5) => {
            Some(k.as_u64().unwrap_or(0) as usize)
        }
        Some(_) => return Err("`logprobs` must be a boolean".into()),
    };
    for k in ["max_tokens", "max_completion_tokens", "seed"] {
        if v.get(k)
            .is_some_and(|x| !x.is_null() && x.as_u64().is_none())
        {
            return Err(format!("`{k}` must be a non-negative integer"));
        }
    }
    for k in ["temperature", "top_p"] {
        if v.get(k)
            .is_some_and(|x| !x.is_null() && x.as_f64().is_none())
        {
            return Err(format!("`{k}` must be a number"));
        }
    }
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let max_new_tokens = v
        .get("max_completion_tokens")
        .or_else(|| v.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(256) as usize;
    let temperature = num("temperature").unwrap_or(1.0);
    let top_p = num("top_p").unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) || !(0.0..=1.0).contains(&top_p) {
        return Err("temperature must be in [0, 2] and top_p in [0, 1]".into());
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(_) => return Err("`stop` must be a string or a list of strings".into()),
    };
    Ok(Parsed {
        request: ChatRequest {
            sampling: Sampling {
                max_new_tokens,
                temperature,
                top_p,
                stop,
                logprobs,
            },
            seed: v.get("seed").and_then(Value::as_u64).unwrap_or(0),
            ..ChatRequest::default()
        },
        n,
        stream,
        include_usage,
        logprobs,
    })
}

/// Reads a legacy completions request (`prompt` instead of `messages`).
fn parse_completion(body: &[u8]) -> Result<Parsed, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("the body must be a JSON object".into());
    }
    let prompt = match v.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => return Err("`prompt` must be a string (one prompt per request)".into()),
    };
    let mut parsed = sampling_of(&v)?;
    parsed.request.prompt = Some(prompt);
    Ok(parsed)
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Queues a request; the completion lands in the returned channel even if nobody waits.
fn submit(s: &AppState, request: ChatRequest) -> Option<Shared> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.queue
        .send(Job {
            request,
            reply: tx,
            stream: None,
        })
        .ok()?;
    let (wtx, wrx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let r = rx
            .await
            .unwrap_or_else(|_| Err("the model worker dropped the request".into()));
        let _ = wtx.send(Some(r));
    });
    Some(wrx)
}

async fn chat(
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    answer(&s, &headers, &body, true).await
}

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    answer(&s, &headers, &body, false).await
}

/// A chat (`chat`) or legacy completions request, from the key check to the response.
async fn answer(
    s: &Arc<AppState>,
    headers: &axum::http::HeaderMap,
    body: &[u8],
    chat: bool,
) -> Response {
    if let Some(r) = unauthorized(s, headers) {
        return r;
    }
    let parsed = if chat {
        parse_request(body)
    } else {
        parse_completion(body)
    };
    match parsed {
        Ok(p) => respond(s, headers, p, chat).await,
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_request_error", e),
    }
}

/// Waits for one queued completion.
async fn wait(mut rx: Shared) -> Result<Completion, String> {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone().expect("waited for Some"),
        Err(_) => Err("the completion was lost".into()),
    }
}

/// Queues a request, through the idempotency cache when it has a key.
fn submit_keyed(s: &AppState, request: ChatRequest, key: Option<&String>) -> Option<Shared> {
    let mut map = s.idempotent.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rx) = key.and_then(|k| map.0.get(k).cloned()) {
        return Some(rx);
    }
    let rx = submit(s, request)?;
    if let Some(k) = key {
        map.0.insert(k.clone(), rx.clone());
        map.1.push_back(k.clone());
        while map.1.len() > IDEMPOTENT_KEYS {
            if let Some(old) = map.1.pop_front() {
                map.0.remove(&old);
            }
        }
    }
    Some(rx)
}

/// `logprobs` of one choice, in the chat format (`content: [...]`) or the legacy one.
fn logprobs_json(s: &AppState, c: &Completion, chat: bool) -> Value {
    let tok = |id: u32| s.tokens.get(id as usize).cloned().unwrap_or_default();
    if chat {
        let content: Vec<Value> = c
            .logprobs
            .iter()
            .map(|l| {
                let (text, bytes) = tok(l.token);
                let top: Vec<Value> = l
                    .top
                    .iter()
                    .map(|(t, lp)| {
                        let (tt, tb) = tok(*t);
                        json!({"token": tt, "logprob": lp, "bytes": tb})
                    })
                    .collect();
                json!({"token": text, "logprob": l.logprob, "bytes": bytes, "top_logprobs": top})
            })
            .collect();
        json!({"content": content})
    } else {
        let tokens: Vec<String> = c.logprobs.iter().map(|l| tok(l.token).0).collect();
        let lps: Vec<f32> = c.logprobs.iter().map(|l| l.logprob).collect();
        let top: Vec<Value> = c
            .logprobs
            .iter()
            .map(|l| {
                let m: serde_json::Map<String, Value> =
                    l.top.iter().map(|(t, lp)| (tok(*t).0, json!(lp))).collect();
                Value::Object(m)
            })
            .collect();
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": top})
    }
}

/// A streamed answer: server-sent events of `chat.completion.chunk` (or `text_completion`)
/// objects as the text is generated, a last chunk per choice with its finish reason, the
/// usage when `stream_options.include_usage` asks, then `[DONE]`. A client that goes
/// away ends its sequences at the next token.
fn stream_response(s: &Arc<AppState>, p: Parsed, chat: bool) -> Response {
    use axum::response::sse::{Event, Sse};
    let n_served = s.served.fetch_add(1, Ordering::SeqCst) + 1;
    let id = format!("{}-pipe-{n_served}", if chat { "chatcmpl" } else { "cmpl" });
    let created = unix_seconds();
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let (events, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let chunk = {
        let (id, model, include_usage) = (id.clone(), s.name.clone(), p.include_usage);
        move |choices: Value| {
            let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        }
    };
    let mut finals = Vec::new();
    for i in 0..p.n {
        let mut r = p.request.clone();
        r.seed = r.seed.wrapping_add(i as u64);
        let (text_tx, mut text_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        if s.queue
            .send(Job {
                request: r,
                reply: reply_tx,
                stream: Some(text_tx),
            })
            .is_err()
        {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model worker stopped",
            );
        }
        let (events, chunk) = (events.clone(), chunk.clone());
        finals.push(tokio::spawn(async move {
            let first = if chat {
                json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])
            } else {
                json!([{"index": i, "text": "", "logprobs": null, "finish_reason": null}])
            };
            if events.send(chunk(first)).is_err() {
                return None;
            }
            while let Some(piece) = text_rx.recv().await {
                let c = if chat {
                    json!([{"index": i, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}])
                } else {
                    json!([{"index": i, "text": piece, "logprobs": null, "finish_reason": null}])
                };
                if events.send(chunk(c)).is_err() {
                    // The client went away: dropping `text_rx` ends the sequence.
                    return None;
                }
            }
            let done = match reply_rx.await.ok()? {
                Ok(c) => c,
                Err(e) => {
                    // Mid-stream errors travel as an `error` event, as OpenAI sends them.
                    let msg = e.strip_prefix(TOO_LONG).unwrap_or(&e).to_string();
                    let _ = events.send(json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}}));
                    return None;
                }
            };
            let finish = if done.finish == Finish::Length { "length" } else { "stop" };
            let last = if chat {
                json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}])
            } else {
                json!([{"index": i, "text": "", "logprobs": null, "finish_reason": finish}])
            };
            let _ = events.send(chunk(last));
            Some(done)
        }));
    }
    let include_usage = p.include_usage;
    let (id2, model2) = (id, s.name.clone());
    tokio::spawn(async move {
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        for f in finals {
            if let Ok(Some(c)) = f.await {
                prompt_tokens = c.prompt_tokens;
                completion_tokens += c.completion_tokens;
            }
        }
        if include_usage {
            let _ = events.send(json!({"id": id2, "object": object, "created": created, "model": model2,
                "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}}));
        }
        let _ = events.send(Value::String("[DONE]".into()));
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let data = match &v {
            Value::String(s) if s == "[DONE]" => s.clone(),
            other => other.to_string(),
        };
        Some((
            Ok::<_, std::convert::Infallible>(Event::default().data(data)),
            rx,
        ))
    });
    Sse::new(stream).into_response()
}

async fn respond(
    s: &Arc<AppState>,
    headers: &axum::http::HeaderMap,
    p: Parsed,
    chat: bool,
) -> Response {
    if p.stream {
        return stream_response(s, p, chat);
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Choice i samples with seed + i; one Idempotency-Key names the whole request.
    let mut waits = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let mut r = p.request.clone();
        r.seed = r.seed.wrapping_add(i as u64);
        let k = key.as_ref().map(|k| {
            if i == 0 {
                k.clone()
            } else {
                format!("{k}#{i}")
            }
        });
        match submit_keyed(s, r, k.as_ref()) {
            Some(rx) => waits.push(wait(rx)),
            None => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the model worker stopped",
                )
            }
        }
    }
    let mut done = Vec::with_capacity(p.n);
    for w in waits {
        match w.await {
            Ok(c) => done.push(c),
            Err(e) => {
                // Failures are not remembered: asking again tries again.
                if let Some(k) = &key {
                    let mut map = s.idempotent.lock().unwrap_or_else(|e| e.into_inner());
                    map.0.remove(k);
                    for i in 1..p.n {
                        map.0.remove(&format!("{k}#{i}"));
                    }
                }
                return worker_error(&e);
            }
        }
    }
    let n = s.served.fetch_add(1, Ordering::SeqCst) + 1;
    let created = unix_seconds();
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = if c.finish == Finish::Length {
                "length"
            } else {
                "stop"
            };
            let lp = p
                .logprobs
                .map(|_| logprobs_json(s, c, chat))
                .unwrap_or(Value::Null);
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": c.text},
                       "logprobs": lp, "finish_reason": finish})
            } else {
                json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": finish})
            }
        })
        .collect();
    let prompt_tokens = done.first().map_or(0, |c| c.prompt_tokens);
    let completion_tokens: usize = done.iter().map(|c| c.completion_tokens).sum();
    Json(json!({
        "id": format!("{}-pipe-{n}", if chat { "chatcmpl" } else { "cmpl" }),
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": s.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}
