//! A misbehaving OpenAI-compatible server on loopback, for the `openai` oracle backend:
//! the test decides each reply (200 with content, an HTTP error, a slow reply, a body
//! that is not JSON) and the server counts every request it receives, per item. Started
//! with [`FakeOpenAi::idempotent`], it honours `Idempotency-Key` like `pipe serve`: a
//! repeated key is answered from the first successful reply without asking the handler
//! (the oracle) again.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server does with one request.
pub enum Reply {
    /// 200 with this assistant content.
    Content(String),
    /// An HTTP error status with a JSON error body (and `Retry-After: 0` on 429).
    Status(u16),
    /// 200 after a delay.
    Slow(Duration, String),
    /// 200 with a body that is not JSON.
    Garbage,
}

/// One request as the handler sees it.
pub struct Request {
    /// The item id: the text between `[[` and `]]` in the last message.
    pub item: String,
    /// How many requests for this item came before this one.
    pub seen: usize,
    /// The parsed body.
    pub body: serde_json::Value,
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

pub struct FakeOpenAi {
    pub url: String,
    counts: Arc<Mutex<BTreeMap<String, usize>>>,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    idempotent: bool,
    replies: Mutex<BTreeMap<String, String>>,
    http_requests: Mutex<usize>,
}

impl FakeOpenAi {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> FakeOpenAi {
        Self::with(false, handler)
    }

    /// A server that honours `Idempotency-Key`.
    pub fn idempotent(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> FakeOpenAi {
        Self::with(true, handler)
    }

    fn with(
        idempotent: bool,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> FakeOpenAi {
        let state = Arc::new(State {
            idempotent,
            ..State::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let counts: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let c2 = counts.clone();
        let s2 = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (h, c, s) = (handler.clone(), c2.clone(), s2.clone());
                std::thread::spawn(move || serve(stream, &*h, &c, &s));
            }
        });
        FakeOpenAi { url, counts, state }
    }

    /// HTTP requests received, including repeats answered from the idempotency cache.
    pub fn http_requests(&self) -> usize {
        *self.state.http_requests.lock().unwrap()
    }

    /// Requests the handler (the oracle) answered, for each item.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.counts.lock().unwrap().clone()
    }

    /// All requests received.
    pub fn total(&self) -> usize {
        self.counts().values().sum()
    }
}

fn serve(
    stream: TcpStream,
    handler: &Handler,
    counts: &Mutex<BTreeMap<String, usize>>,
    state: &State,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut len = 0usize;
        let mut key = String::new();
        let mut line = String::new();
        // Request line and headers.
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first {
                first = false;
                continue;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("idempotency-key") {
                    key = v.trim().to_string();
                }
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let last = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_string();
        let item = last
            .split_once("[[")
            .and_then(|(_, r)| r.split_once("]]"))
            .map(|(id, _)| id.to_string())
            .unwrap_or_default();
        *state.http_requests.lock().unwrap() += 1;
        let content = |text: &str| {
            serde_json::json!({
                "id": "x", "object": "chat.completion", "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            })
            .to_string()
        };
        let cached = if state.idempotent && !key.is_empty() {
            state.replies.lock().unwrap().get(&key).cloned()
        } else {
            None
        };
        let reply = match cached {
            Some(text) => Reply::Content(text),
            None => {
                let seen = {
                    let mut c = counts.lock().unwrap();
                    let e = c.entry(item.clone()).or_default();
                    *e += 1;
                    *e - 1
                };
                let reply = handler(&Request { item, seen, body });
                if let (true, Reply::Content(t) | Reply::Slow(_, t)) =
                    (state.idempotent && !key.is_empty(), &reply)
                {
                    state.replies.lock().unwrap().insert(key.clone(), t.clone());
                }
                reply
            }
        };
        let (status, extra, text) = match reply {
            Reply::Content(t) => (200, "", content(&t)),
            Reply::Slow(d, t) => {
                std::thread::sleep(d);
                (200, "", content(&t))
            }
            Reply::Status(429) => (
                429,
                "Retry-After: 0\r\n",
                r#"{"error": {"message": "slow down"}}"#.to_string(),
            ),
            Reply::Status(code) => (
                code,
                "",
                format!(r#"{{"error": {{"message": "status {code}"}}}}"#),
            ),
            Reply::Garbage => (200, "", "<html>upstream proxy error</html>".to_string()),
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: keep-alive\r\n\r\n",
            text.len()
        );
        if out
            .write_all(head.as_bytes())
            .and_then(|_| out.write_all(text.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}
