//! `pipe serve` driven by the official `openai` Python client
//! (`scripts/reference/openai_client_check.py`): chat, `n`, logprobs (compared with pipe's
//! own log-softmax of the same prompt), `response_format` json_schema and json_object,
//! legacy completions, and the 400s of invalid requests in OpenAI's error shape.
//!
//! `PIPE_PYTHON` names a Python with `openai` installed; `.ci/run` installs it and sets
//! `PIPE_REQUIRE_INTEROP=1`, so there a missing client fails the test instead of skipping.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::Project;

fn python_with_openai() -> Option<PathBuf> {
    let python = std::env::var_os("PIPE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    let ok = Command::new(&python)
        .args(["-c", "import openai"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(python)
}

#[test]
fn the_official_openai_client_gets_what_it_asks_for() {
    let Some(python) = python_with_openai() else {
        assert!(
            std::env::var_os("PIPE_REQUIRE_INTEROP").is_none(),
            "PIPE_REQUIRE_INTEROP is set but PIPE_PYTHON has no `openai` package"
        );
        eprintln!("no Python with `openai`: this test did not run (pip install openai)");
        return;
    };
    let p = Project::new();
    let (mut child, url) = p.serve(&["tiny:llama:3", "--max-batch", "4"]);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference/openai_client_check.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&url)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "openai_client_check.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(r["model"], "tiny:llama:3");
    let usage = r["chat"]["usage"].as_array().unwrap();
    assert!(usage[0].as_u64().unwrap() > 0);
    assert_eq!(
        usage[0].as_u64().unwrap() + usage[1].as_u64().unwrap(),
        usage[2].as_u64().unwrap()
    );
    assert_eq!(r["n2_index"], serde_json::json!([0, 1]));
    assert_eq!(r["n2"].as_array().unwrap().len(), 2);

    // Logprobs: three tokens, two alternatives each, the first token's values equal to
    // the log-softmax pipe computes itself for the same prompt.
    let lp = r["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 3);
    let opts = pipe_stages::model::LoadOptions {
        device: "auto".into(),
        dtype: "auto".into(),
        decode_int8: true,
        ..Default::default()
    };
    let model =
        pipe_stages::model::chat::ChatModel::load("tiny:llama:3", p.path(), None, &opts).unwrap();
    let messages = [pipe_stages::model::chat::Message {
        role: "user".into(),
        content: "Say something.".into(),
    }];
    let own = model.next_logprobs(&messages).unwrap();
    let first = &lp[0];
    let (best, best_lp) =
        own.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        );
    let (_, bytes) = model.token_text(best as u32);
    let served_bytes: Vec<u8> = first["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(served_bytes, bytes, "greedy picks pipe's argmax");
    let served = first["logprob"].as_f64().unwrap();
    assert!(
        (served - best_lp as f64).abs() < 1e-4,
        "{served} vs {best_lp}"
    );
    for alt in first["top"].as_array().unwrap() {
        let alt_bytes: Vec<u8> = alt[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        let id = (0..model.vocab_size() as u32)
            .find(|&t| model.token_text(t).1 == alt_bytes)
            .unwrap();
        let v = alt[1].as_f64().unwrap();
        assert!(
            (v - own[id as usize] as f64).abs() < 1e-4,
            "{v} vs {}",
            own[id as usize]
        );
    }
    assert_eq!(first["top"].as_array().unwrap().len(), 2);

    // Structured output.
    let v: Value = serde_json::from_str(r["json_schema"].as_str().unwrap()).unwrap();
    assert!(
        ["yes", "no"].contains(&v["verdict"].as_str().unwrap()),
        "{v}"
    );
    assert!((1..=5).contains(&v["score"].as_i64().unwrap()), "{v}");
    if r["json_object"]["finish"] == "stop" {
        let o: Value = serde_json::from_str(r["json_object"]["text"].as_str().unwrap()).unwrap();
        assert!(o.is_object());
    } else {
        // Cut by max_tokens: still the start of an object.
        assert!(r["json_object"]["text"].as_str().unwrap().starts_with('{'));
    }

    // Streaming.
    let st = &r["stream"];
    assert_eq!(st["joined"], st["plain"], "{st}");
    assert!(st["pieces"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(st["finish"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["usage"], serde_json::json!([12]), "{st}");
    assert_eq!(st["last_has_no_choices"], true);
    // The abandoned 470-token stream did not hold the next request behind it.
    let after = &r["after_disconnect"];
    assert!(
        after["seconds"].as_f64().unwrap() < after["full_seconds"].as_f64().unwrap() / 3.0,
        "{after}"
    );

    assert_eq!(r["legacy"]["object"], "text_completion");
    assert_eq!(r["legacy"]["usage"], 5);

    // Each invalid request: 400 with {"error": {"message", "type", "param", "code"}}.
    for (name, e) in r["errors"].as_object().unwrap() {
        assert_eq!(e["status"], 400, "{name}: {e}");
        let body = if e["body"].get("error").is_some() {
            &e["body"]["error"]
        } else {
            &e["body"]
        };
        for k in ["message", "type", "param", "code"] {
            assert!(body.get(k).is_some(), "{name}: no `{k}` in {body}");
        }
        assert_eq!(body["type"], "invalid_request_error", "{name}");
    }
}

#[test]
fn an_api_key_is_required_when_set_and_never_printed() {
    let p = Project::new();
    let mut cmd = p.command(&["serve", "tiny:llama:3", "--port", "0"]);
    cmd.env("PIPE_SERVE_API_KEY", "sk-serve-SECRET")
        .stderr(Stdio::piped());
    let (mut child, url) = support::start_serve(cmd);
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#;
    let call = |key: Option<&str>| {
        let mut r =
            ureq::post(&format!("{url}/chat/completions")).set("Content-Type", "application/json");
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        match r.send_string(body) {
            Ok(resp) => (resp.status(), resp.into_string().unwrap()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let (code, text) = call(None);
    assert_eq!(code, 401, "{text}");
    assert!(
        text.contains("\"type\":\"invalid_request_error\""),
        "{text}"
    );
    assert_eq!(call(Some("sk-serve-WRONG")).0, 401);
    assert_eq!(call(Some("sk-serve-SECRET")).0, 200);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let printed = url + &String::from_utf8_lossy(&out.stderr);
    assert!(!printed.contains("SECRET"), "{printed}");
    let help = p.ok(&["serve", "--help"]).stdout;
    assert!(!help.contains("SECRET"));
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_huge_prompt_is_refused_and_64_concurrent_clients_are_all_answered() {
    let p = Project::new();
    let (mut child, url) = p.serve(&["tiny:llama:3", "--max-batch", "16"]);
    let post = |body: String| -> (u16, String) {
        match ureq::post(&format!("{url}/chat/completions"))
            .set("Content-Type", "application/json")
            .send_string(&body)
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let warm = post(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}"#.into());
    assert_eq!(warm.0, 200, "{}", warm.1);
    let before = peak_kib(child.id());
    // 100,000 byte tokens (the tiny model's context is 512) with 64 small requests.
    let huge = serde_json::json!({"messages": [{"role": "user", "content": "x".repeat(100_000)}], "max_tokens": 4});
    std::thread::scope(|scope| {
        let big = scope.spawn(|| post(huge.to_string()));
        let small: Vec<_> = (0..64)
            .map(|i| {
                let post = &post;
                scope.spawn(move || {
                    post(format!(r#"{{"messages": [{{"role": "user", "content": "client {i}"}}], "max_tokens": 8, "temperature": 0.5, "seed": {i}}}"#))
                })
            })
            .collect();
        let (code, text) = big.join().unwrap();
        assert_eq!(code, 400, "{text}");
        assert!(
            text.contains("context_length_exceeded") && text.contains("context is 512 tokens"),
            "{text}"
        );
        for h in small {
            let (code, text) = h.join().unwrap();
            assert_eq!(code, 200, "{text}");
        }
    });
    let after = peak_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    // The refused prompt never reached the model: the peak grew by less than 64 MiB.
    assert!(
        after < before + 64 * 1024,
        "peak RSS {before} KiB -> {after} KiB"
    );
    eprintln!(
        "serve peak RSS: {before} KiB before, {after} KiB after 64 clients and a 100k-token prompt"
    );
}
