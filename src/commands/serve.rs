//! `pipe serve MODEL`: an OpenAI-compatible chat completions server on a local
//! model, so what a pipeline trained can be used (and the `openai` oracle
//! backend tested) over real HTTP.
//!
//! One thread owns the model; requests queue to it and the ones waiting when it
//! frees up are decoded together (up to `--max-batch`), so concurrent clients
//! share batches. Requests with different decoding settings are split into
//! separate batches by the chat model.
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
}

type Shared = tokio::sync::watch::Receiver<Option<Result<Completion, String>>>;

struct AppState {
    name: String,
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
    let (tx, rx) = mpsc::channel::<Job>();
    let max_batch = args.max_batch.max(1);
    std::thread::Builder::new()
        .name("pipe-serve-model".into())
        .spawn(move || worker(model, rx, max_batch))?;
    let state = Arc::new(AppState {
        name: args.name.clone().unwrap_or_else(|| args.model.clone()),
        queue: tx,
        served: AtomicU64::new(0),
        idempotent: Default::default(),
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
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

/// Decodes queued requests in batches until the server goes away.
fn worker(model: ChatModel, rx: mpsc::Receiver<Job>, max_batch: usize) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        // Whatever else is already waiting (or arrives within a moment) joins the batch.
        while jobs.len() < max_batch {
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let requests: Vec<ChatRequest> = jobs.iter().map(|j| j.request.clone()).collect();
        match model.complete(&requests) {
            Ok(done) => {
                for (j, c) in jobs.into_iter().zip(done) {
                    let _ = j.reply.send(Ok(c));
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "pipe"}],
    }))
    .into_response()
}

/// Reads an OpenAI chat request.
fn parse_request(body: &[u8]) -> Result<ChatRequest, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
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
            Some("json_object") => Some(json!({"type": "object"})),
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
    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("`stream: true` is not supported".into());
    }
    if v.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
        return Err("only `n: 1` is supported".into());
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
    Ok(ChatRequest {
        messages,
        sampling: Sampling {
            max_new_tokens,
            temperature,
            top_p,
            stop,
        },
        seed: v.get("seed").and_then(Value::as_u64).unwrap_or(0),
        schema: schema.map(Arc::new),
    })
}

/// Queues a request; the completion lands in the returned channel even if nobody waits.
fn submit(s: &AppState, request: ChatRequest) -> Option<Shared> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.queue.send(Job { request, reply: tx }).ok()?;
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
    let request = match parse_request(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", e),
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut rx = {
        let mut map = s.idempotent.lock().unwrap_or_else(|e| e.into_inner());
        match key.as_ref().and_then(|k| map.0.get(k).cloned()) {
            Some(rx) => rx,
            None => {
                let Some(rx) = submit(&s, request) else {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the model worker stopped",
                    );
                };
                if let Some(k) = key.clone() {
                    map.0.insert(k.clone(), rx.clone());
                    map.1.push_back(k);
                    while map.1.len() > IDEMPOTENT_KEYS {
                        if let Some(old) = map.1.pop_front() {
                            map.0.remove(&old);
                        }
                    }
                }
                rx
            }
        }
    };
    let done = match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone().expect("waited for Some"),
        Err(_) => Err("the completion was lost".into()),
    };
    let c = match done {
        Ok(c) => c,
        Err(e) => {
            // Failures are not remembered: asking again tries again.
            if let Some(k) = &key {
                s.idempotent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .0
                    .remove(k);
            }
            return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e);
        }
    };
    let n = s.served.fetch_add(1, Ordering::SeqCst) + 1;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Json(json!({
        "id": format!("chatcmpl-pipe-{n}"),
        "object": "chat.completion",
        "created": created,
        "model": s.name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": if c.finish == Finish::Length { "length" } else { "stop" },
        }],
        "usage": {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        },
    }))
    .into_response()
}
