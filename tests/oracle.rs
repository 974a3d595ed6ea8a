//! Oracle stages end to end: the real `pipe` binary against loopback servers (a
//! scripted, misbehaving OpenAI-compatible server that counts requests per item, and
//! `pipe serve` on a tiny model), and against a local model.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::fake_openai::{FakeOpenAi, Reply};
use support::{Lcg, Project};

fn corpus(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"id\": \"r{i}\", \"source\": \"{}\", \"question\": \"question {i}?\", \"answers\": [\"ans {i}\"], \"support\": [\"c{i}\"]}}\n",
                if i % 2 == 0 { "even" } else { "odd" }
            )
        })
        .collect()
}

fn good(item: &str) -> String {
    let i = item.trim_start_matches('r');
    format!("Sure. {{\"answer\": \"ans {i}\", \"citations\": [\"c{i}\"]}}")
}

/// A project with `src.jsonl` (n records), the prompt template and a pipeline whose
/// `label` stage (batch_label) uses `oracle` (a YAML flow mapping body).
fn project(n: usize, oracle: &str, stages_extra: &str) -> Project {
    let p = Project::new();
    p.file("src.jsonl", &corpus(n));
    p.file(
        "prompts/answer.j2",
        "Answer with JSON {\"answer\", \"citations\"}. Q [[{{ id }}]]: {{ question }}\n",
    );
    p.file(
        "pipe.yaml",
        &format!(
            r#"
name: lab
params:
  oracle: {{template: prompts/answer.j2, returns: {{answer: string, citations: "list[string]"}}, {oracle}}}
stages:
  make:
    run: cp src.jsonl data/corpus.jsonl
    deps: [src.jsonl]
    outs: [data/corpus.jsonl]
{stages_extra}
"#
        ),
    );
    p
}

const LABEL: &str = r#"
  label:
    uses: batch_label
    inputs: {corpus: make.corpus}
    with: {oracle: "${params.oracle}", batch_size: 4}
"#;

fn openai(url: &str, extra: &str) -> String {
    let mut o = format!(
        "backend: openai, model: fake, base_url: \"{url}\", backoff_s: 0.01, max_retries: 2{extra}"
    );
    for (k, v) in [("concurrency", "2"), ("timeout_s", "0.5")] {
        if !extra.contains(k) {
            o.push_str(&format!(", {k}: {v}"));
        }
    }
    o
}

fn jsonl(p: &Project, stage: &str, output: &str) -> Vec<Value> {
    let out = p.ok(&["export", &format!("{stage}.{output}"), "out.jsonl"]);
    let _ = out;
    p.read("out.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = v
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn openai_backend_retries_429_5xx_timeouts_and_garbage_then_records_failures() {
    let server = FakeOpenAi::start(|r| match (r.item.as_str(), r.seen) {
        ("r0", 0 | 1) => Reply::Status(429),
        ("r1", 0) => Reply::Status(503),
        ("r2", 0) => Reply::Garbage,
        ("r3", 0) => Reply::Slow(Duration::from_millis(1500), good("r3")),
        ("r4", _) => Reply::Status(500),
        ("r5", _) => Reply::Content("I believe the answer is ans 5.".into()),
        ("r6", _) => Reply::Status(400),
        (item, _) => Reply::Content(good(item)),
    });
    let p = project(10, &openai(&server.url, ""), LABEL);
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    let labels = jsonl(&p, "label", "labels");
    let failures = jsonl(&p, "label", "failures");
    assert_eq!(ids(&labels), ["r0", "r1", "r2", "r3", "r7", "r8", "r9"]);
    assert_eq!(ids(&failures), ["r4", "r5", "r6"]);
    let r0 = labels.iter().find(|r| r["id"] == "r0").unwrap();
    assert_eq!(r0["label"]["answer"], "ans 0");
    assert_eq!(r0["label"]["citations"][0], "c0");
    let why = |id: &str| {
        failures.iter().find(|r| r["id"] == id).unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(why("r4").contains("HTTP 500"), "{}", why("r4"));
    assert!(why("r5").contains("no JSON object"), "{}", why("r5"));
    assert!(why("r6").contains("HTTP 400"), "{}", why("r6"));
    let c = server.counts();
    // 429 twice then OK; 503 then OK; garbage then OK; timeout then OK; 500 three times
    // (max_retries 2); an unparsable reply asked 3 times (retries 2); 400 is not retried.
    let expect: BTreeMap<String, usize> = [
        ("r0", 3),
        ("r1", 2),
        ("r2", 2),
        ("r3", 2),
        ("r4", 3),
        ("r5", 3),
        ("r6", 1),
        ("r7", 1),
        ("r8", 1),
        ("r9", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(c, expect);

    // A rerun is cached: no request at all.
    let total = server.total();
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(server.total(), total);

    // A new parser (citations no longer required) reruns the stage from the memoised
    // replies: only r4 and r6, whose requests failed, are asked again.
    let src = p.read("pipe.yaml").replace(
        r#"returns: {answer: string, citations: "list[string]"}"#,
        "returns: {answer: string}",
    );
    p.file("pipe.yaml", &src);
    let out = p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(out.status_of("label").as_deref(), Some("ran"));
    let after = server.counts();
    assert_eq!(after["r4"], 6);
    assert_eq!(after["r6"], 2);
    for id in ["r0", "r1", "r2", "r3", "r5", "r7", "r8", "r9"] {
        assert_eq!(after[id], expect[id], "{id} was asked again");
    }
}

#[test]
fn max_cost_stops_before_the_request_that_could_exceed_it_and_resumes() {
    let server = FakeOpenAi::start(|r| Reply::Content(good(&r.item)));
    // Each reply bills 100 + 20 tokens at $1000/Mtok = $0.12; the worst case reserved
    // before a request is (prompt bytes/3 + 8 + max_new_tokens 16) tokens ≈ $0.06.
    let oracle = openai(
        &server.url,
        ", concurrency: 1, max_new_tokens: 16, prices: {input_per_mtok: 1000, output_per_mtok: 1000}",
    );
    let label = LABEL.replace("batch_size: 4}", "batch_size: 4, max_cost_usd: 0.5}");
    let p = project(8, &oracle, &label);
    let out = p.pipe(&["run", "pipe.yaml", "--no-progress"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("stopped before exceeding the budget"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("raise `max_cost_usd`"),
        "{}",
        out.stderr
    );
    let asked = server.total();
    assert!((1..=4).contains(&asked), "{asked} requests");
    assert!(
        asked as f64 * 0.12 <= 0.5 + 1e-9,
        "spent more than max_cost_usd"
    );

    // A bigger budget resumes (max_cost_usd is not part of the fingerprint): every item
    // asked exactly once overall.
    p.file(
        "pipe.yaml",
        &p.read("pipe.yaml")
            .replace("max_cost_usd: 0.5", "max_cost_usd: 5"),
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(server.total(), 8);
    assert!(server.counts().values().all(|&n| n == 1));
    assert_eq!(jsonl(&p, "label", "labels").len(), 8);
}

#[test]
fn adding_rows_asks_only_for_the_new_rows() {
    let server = FakeOpenAi::start(|r| Reply::Content(good(&r.item)));
    let p = project(10, &openai(&server.url, ""), LABEL);
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(server.total(), 10);
    p.file("src.jsonl", &corpus(15));
    let out = p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(out.status_of("label").as_deref(), Some("ran"));
    assert_eq!(server.total(), 15);
    assert!(server.counts().values().all(|&n| n == 1));
    assert_eq!(jsonl(&p, "label", "labels").len(), 15);
}

const GATES: &str = r#"
  calibrate:
    uses: calibrate
    inputs: {corpus: make.corpus}
    with:
      oracle: "${params.oracle}"
      compare: {answer: {field: answer, gold: answers}, citations: {field: citations, gold: support}}
      sample: {by: source, per_stratum: 5, seed: 1}
      pass_if: {answer_f1: ">= 0.9", parse_failure_rate: "<= 0.1"}
      review_if: {answer_f1: ">= REVIEW_AT"}
  validate:
    uses: validate
    inputs: {corpus: make.corpus, calibration: calibrate.report}
    with: {sample: {by: source, per_stratum: 5, seed: 2}, tolerance: 0.5}
  label:
    uses: batch_label
    needs: [validate]
    inputs: {corpus: make.corpus}
    with: {oracle: "${params.oracle}", batch_size: 8}
"#;

#[test]
fn a_review_gate_stops_downstream_until_accepted_and_a_fail_never_passes() {
    // Every third request (0, 3, 6, ...) is answered wrongly: 4 of the 10 calibration
    // items (answer F1 0.6), 3 of the 10 validation items (F1 0.7).
    let n = std::sync::atomic::AtomicUsize::new(0);
    let server = FakeOpenAi::start(move |r| {
        if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .is_multiple_of(3)
        {
            Reply::Content("{\"answer\": \"no idea\", \"citations\": []}".into())
        } else {
            Reply::Content(good(&r.item))
        }
    });
    let p = project(
        30,
        &openai(&server.url, ""),
        &GATES.replace("REVIEW_AT", "0.5"),
    );
    let out = p.pipe(&["run", "pipe.yaml", "--no-progress"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stdout.contains("gate REVIEW"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.status_of("validate").as_deref(), Some("skipped"));
    assert_eq!(out.status_of("label").as_deref(), Some("skipped"));
    assert!(
        out.stderr.contains("gate `calibrate` decided REVIEW"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--accept calibrate"), "{}", out.stderr);
    assert!(out.stderr.contains("report.md"), "{}", out.stderr);
    assert_eq!(server.total(), 10, "the calibration sample only");
    p.ok(&["export", "calibrate.report", "cal"]);
    let report: Value = serde_json::from_str(&p.read("cal/report.json")).unwrap();
    assert_eq!(report["decision"], "REVIEW");
    assert!((report["metrics"]["answer_f1"].as_f64().unwrap() - 0.6).abs() < 1e-9);
    assert!((report["metrics"]["citation_recall"].as_f64().unwrap() - 0.6).abs() < 1e-9);
    assert_eq!(report["metrics"]["parse_failure_rate"], 0.0);
    let md = p.read("cal/report.md");
    assert!(
        md.contains("REVIEW") && md.contains("Worst disagreements") && md.contains("no idea"),
        "{md}"
    );
    // `pipe report` of that run shows the decision, why, and links the gate's report.
    p.ok(&["report", "-o", "page"]);
    let html = p.read("page/index.html");
    let at = html
        .find("<section id=\"gates\">")
        .expect("no gates section");
    let gates = &html[at..at + html[at..].find("</section>").unwrap()];
    let row = gates
        .split("<tr ")
        .find(|r| r.contains("data-stage=\"calibrate\""))
        .expect("no calibrate gate row");
    assert!(row.contains("class=\"gate review\">REVIEW<"), "{row}");
    assert!(
        row.contains("answer_f1"),
        "the reason names the metric: {row}"
    );
    let href = row
        .split("href=\"")
        .nth(1)
        .map(|h| &h[..h.find('"').unwrap()]);
    let href = href.expect("the gate's report is linked");
    assert!(href.ends_with("report.md"), "{href}");
    assert!(p
        .read(&format!("page/{href}"))
        .contains("Worst disagreements"));

    // Accepting the calibration lets validate run; its REVIEW (same F1 band) stops
    // labelling until it is accepted too.
    let out = p.pipe(&["run", "pipe.yaml", "--no-progress", "--accept", "calibrate"]);
    assert_eq!(out.status_of("calibrate").as_deref(), Some("cached"));
    assert_eq!(
        out.status_of("validate").as_deref(),
        Some("ran"),
        "{}",
        out.stdout
    );
    assert_eq!(out.status_of("label").as_deref(), Some("skipped"));
    p.ok(&["export", "validate.report", "val"]);
    let val: Value = serde_json::from_str(&p.read("val/report.json")).unwrap();
    let cal_ids: Vec<&Value> = report["sample_ids"].as_array().unwrap().iter().collect();
    for id in val["sample_ids"].as_array().unwrap() {
        assert!(
            !cal_ids.contains(&id),
            "validate re-used calibration item {id}"
        );
    }
    assert!((val["metrics"]["answer_f1"].as_f64().unwrap() - 0.7).abs() < 1e-9);
    assert!((val["drift"]["answer_f1"].as_f64().unwrap() - 0.1).abs() < 1e-9);
    assert_eq!(server.total(), 20);
    let out = p.ok(&[
        "run",
        "pipe.yaml",
        "--no-progress",
        "--accept",
        "calibrate,validate",
    ]);
    assert_eq!(out.status_of("label").as_deref(), Some("ran"));
    // The 20 sampled items were answered already: labelling asks for the other 10.
    assert_eq!(server.total(), 30);
    assert!(server.counts().values().all(|&n| n == 1));

    // With a stricter review bar the same replies FAIL, and --accept does not release it.
    p.file(
        "pipe.yaml",
        &p.read("pipe.yaml").replace("\">= 0.5\"", "\">= 0.8\""),
    );
    let out = p.pipe(&[
        "run",
        "pipe.yaml",
        "--no-progress",
        "--accept",
        "calibrate,validate",
    ]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("gate `calibrate` decided FAIL"),
        "{}",
        out.stderr
    );
    assert_eq!(out.status_of("label").as_deref(), Some("skipped"));
    assert_eq!(
        server.total(),
        30,
        "a new threshold re-decides without asking again"
    );
}

#[test]
fn batch_label_killed_with_sigkill_labels_every_item_exactly_once() {
    // The server honours Idempotency-Key (as `pipe serve` does), so a request that was in
    // flight when pipe died is answered again without asking the oracle again.
    let server = FakeOpenAi::idempotent(|r| Reply::Slow(Duration::from_millis(30), good(&r.item)));
    let n = 400;
    let p = project(
        n,
        &openai(&server.url, ", concurrency: 4, timeout_s: 5"),
        LABEL,
    );
    p.ok(&["run", "pipe.yaml", "--no-progress", "--only", "make"]);
    let mut rng = Lcg(7);
    let mut kills = 0;
    let mut finished = false;
    while kills < 12 {
        let mut child = p.spawn(&["run", "pipe.yaml", "--no-progress"]);
        std::thread::sleep(Duration::from_millis(60 + (rng.next_f64() * 300.0) as u64));
        if child.try_wait().unwrap().is_some() {
            finished = true;
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        kills >= 10,
        "the run finished after {kills} kills; slow the server down"
    );
    assert!(!finished);
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    let labels = jsonl(&p, "label", "labels");
    let expect: Vec<String> = {
        let mut v: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&labels), expect, "every item exactly once");
    let counts = server.counts();
    assert_eq!(counts.len(), n, "every item asked");
    assert!(counts.values().all(|&c| c == 1), "an item was asked twice");
    assert_eq!(server.total(), n, "oracle requests");
    // A reply is memoised before the item counts as done, so only requests in flight at a
    // kill (at most `concurrency` = 4 per kill) reach the server again.
    let http = server.http_requests();
    eprintln!("{kills} kills: {n} items, {} oracle requests, {http} HTTP requests ({} repeats of requests in flight at a kill, answered by key)", server.total(), http - n);
    assert!(
        http - n <= kills * 4,
        "{http} HTTP requests after {kills} kills"
    );
}

/// Starts `pipe serve ARGS --port 0` and returns it with its `/v1` URL.

#[test]
fn openai_backend_against_pipe_serve_on_loopback() {
    let p = Project::new();
    let (mut serve, url) = p.serve(&["tiny:llama:3", "--max-batch", "4"]);
    let p2 = project(6, &format!("backend: openai, model: tiny, base_url: \"{url}\", max_new_tokens: 12, retries: 1, concurrency: 3"), LABEL);
    let out = p2.ok(&["run", "pipe.yaml", "--no-progress", "-v"]);
    let _ = serve.kill();
    let _ = serve.wait();
    // A random tiny model does not answer in JSON: every item is a recorded failure
    // carrying the text the server generated.
    let failures = jsonl(&p2, "label", "failures");
    let labels = jsonl(&p2, "label", "labels");
    assert_eq!(failures.len() + labels.len(), 6, "{}", out.stderr);
    for f in &failures {
        assert!(f["raw"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
        assert_eq!(f["attempts"], 2);
    }
}

#[test]
fn local_oracle_calibrate_fail_stops_downstream() {
    let p = project(
        8,
        "backend: local, model: \"tiny:llama:1\", max_new_tokens: 8, retries: 0, batch_size: 4",
        &GATES.replace("REVIEW_AT", "0.5"),
    );
    let out = p.pipe(&["run", "pipe.yaml", "--no-progress", "--accept", "calibrate"]);
    assert_ne!(out.code, 0);
    assert!(out.stdout.contains("gate FAIL"), "{}", out.stdout);
    assert!(
        out.stderr.contains("gate `calibrate` decided FAIL"),
        "{}",
        out.stderr
    );
    assert_eq!(out.status_of("validate").as_deref(), Some("skipped"));
    assert_eq!(out.status_of("label").as_deref(), Some("skipped"));
    p.ok(&["export", "calibrate.report", "cal"]);
    let report: Value = serde_json::from_str(&p.read("cal/report.json")).unwrap();
    assert_eq!(report["metrics"]["parse_failure_rate"], 1.0);
    assert_eq!(report["requests"], 8);
}

/// POST over a raw socket; returns the body.
fn post(url: &str, path: &str, body: &str, key: Option<&str>) -> String {
    use std::io::{Read, Write};
    let host = url.trim_start_matches("http://").split('/').next().unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    let key = key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    write!(s, "POST /v1{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn pipe_serve_answers_a_repeated_idempotency_key_from_its_cache() {
    let p = Project::new();
    let (mut serve, url) = p.serve(&["tiny:llama:5"]);
    let req = |seed: u64| {
        format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": "hello"}}], "max_tokens": 16, "temperature": 1.0, "seed": {seed}}}"#
        )
    };
    let text = |body: String| -> String {
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Sampling with different seeds differs...
    let a = text(post(&url, "/chat/completions", &req(1), None));
    let b = text(post(&url, "/chat/completions", &req(2), None));
    assert_ne!(a, b, "seeds 1 and 2 sampled the same 16 tokens");
    // ...but a repeated key gets the first answer, whatever the request says.
    let k1 = text(post(&url, "/chat/completions", &req(1), Some("k")));
    let k2 = text(post(&url, "/chat/completions", &req(2), Some("k")));
    assert_eq!(k1, a);
    assert_eq!(k2, a);
    let bad = post(&url, "/chat/completions", r#"{"messages": "hi"}"#, None);
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(bad.contains("invalid_request_error"), "{bad}");
}

#[test]
fn a_request_joins_a_running_batch_and_finishes_while_a_long_stream_goes_on() {
    use std::io::{BufRead, BufReader, Write};
    let p = Project::new();
    let (mut serve, url) = p.serve(&["tiny:llama:5"]);
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // A long streamed reply...
    let body = r#"{"model": "m", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 420, "temperature": 1.0, "seed": 13, "stream": true}"#;
    let mut s = std::net::TcpStream::connect(&host).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut chunks = 0usize;
    let mut line = String::new();
    while chunks < 3 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        chunks += line.starts_with("data: {") as usize;
    }
    // ...is decoding when a short request comes: it joins the batch and is answered
    // while the long one still runs (before, it waited for the whole batch to end).
    let short = post(
        &url,
        "/chat/completions",
        r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#,
        None,
    );
    let v: Value = serde_json::from_str(&short).unwrap_or_else(|e| panic!("{e}: {short}"));
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    // What the long stream has sent so far does not include its end.
    s.set_nonblocking(true).unwrap();
    let mut sent_so_far = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => sent_so_far.push_str(&line),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        !sent_so_far.contains("[DONE]"),
        "the long reply had already ended"
    );
    s.set_nonblocking(false).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let whole = sent_so_far + &rest;
    let finish = whole
        .lines()
        .filter_map(|l| l.strip_prefix("data: {"))
        .map(|c| serde_json::from_str::<Value>(&format!("{{{c}")).unwrap())
        .map(|c| c["choices"][0]["finish_reason"].clone())
        .find(|f| !f.is_null())
        .unwrap_or(Value::Null);
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(
        finish, "length",
        "the long reply ended early: the test needs it running"
    );
    assert!(whole.contains("[DONE]"));
}

#[test]
fn prefs_judge_keeps_margin_pairs_and_drops_position_biased_ones() {
    // Pointwise: the score follows the candidate's text. Pairwise: the better answer
    // wins, except for p2 where the judge always picks the first position.
    let server = FakeOpenAi::start(|r| {
        let text = r.body["messages"].as_array().unwrap().last().unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string();
        if let Some(rest) = text.split_once("A: ") {
            let a_good = rest.1.starts_with("good");
            let winner = if r.item == "pair-p2" || a_good {
                "A"
            } else {
                "B"
            };
            return Reply::Content(format!("{{\"winner\": \"{winner}\"}}"));
        }
        let cand = text.rsplit("answer: ").next().unwrap().trim();
        let score = match cand {
            "good" => 0.9,
            "bad" => 0.1,
            "ok" => 0.5,
            _ => 0.45,
        };
        Reply::Content(format!(
            "{{\"score\": {score}, \"why\": \"because {cand}\"}}"
        ))
    });
    let p = Project::new();
    let row = |id: &str, a: &str, b: &str| {
        format!("{{\"id\": \"{id}\", \"record\": {{\"id\": \"{id}\", \"question\": \"q {id}\"}}, \"candidates\": [{{\"model\": \"tuned\", \"sample\": 0, \"text\": \"{a}\"}}, {{\"model\": \"base\", \"sample\": 0, \"text\": \"{b}\"}}]}}\n")
    };
    p.file(
        "cands.jsonl",
        &format!(
            "{}{}{}",
            row("p0", "bad", "good"),
            row("p1", "ok", "meh"),
            row("p2", "good", "bad")
        ),
    );
    p.file(
        "judge.j2",
        "Rate [[{{ id }}]] {{ question }} answer: {{ candidate }}",
    );
    p.file(
        "pair.j2",
        "Which is better for [[pair-{{ id }}]]? A: {{ answer_a }} B: {{ answer_b }}",
    );
    p.file(
        "pipe.yaml",
        &format!(
            r#"
name: judge
stages:
  make:
    run: cp cands.jsonl data/cands.jsonl
    deps: [cands.jsonl]
    outs: [data/cands.jsonl]
  prefs_judge:
    uses: prefs_judge
    inputs: {{candidates: make.cands}}
    with:
      judge: {{{}, template: judge.j2, returns: {{score: number, why: string}}}}
      rationale_field: why
      min_margin: 0.12
      both_orders: true
      pair_template: pair.j2
"#,
            openai(&server.url, "")
        ),
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    let pairs = jsonl(&p, "prefs_judge", "pairs");
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    assert_eq!(pairs[0]["id"], "p0");
    assert_eq!(pairs[0]["chosen"], "good");
    assert_eq!(pairs[0]["rejected"], "bad");
    assert_eq!(pairs[0]["chosen_model"], "base");
    assert!((pairs[0]["margin"].as_f64().unwrap() - 0.8).abs() < 1e-9);
    assert_eq!(pairs[0]["chosen_rationale"], "because good");
    p.ok(&["export", "prefs_judge.stats", "stats.json"]);
    let stats: Value = serde_json::from_str(&p.read("stats.json")).unwrap();
    assert_eq!(stats["pairs_kept"], 1);
    assert_eq!(stats["below_min_margin"], 1);
    assert_eq!(stats["position_bias"]["dropped_inconsistent"], 1);
    assert_eq!(stats["position_bias"]["first_position_win_rate"], 0.75);
    // 6 pointwise + 4 pairwise judgements; a rerun with a higher margin asks nothing.
    assert_eq!(server.total(), 10);
    p.file(
        "pipe.yaml",
        &p.read("pipe.yaml")
            .replace("min_margin: 0.12", "min_margin: 0.9"),
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(jsonl(&p, "prefs_judge", "pairs").len(), 0);
    assert_eq!(server.total(), 10);
}

/// A pipeline labelling `n` records with an oracle replying `{ok, score, verdict}`.
fn shaped(n: usize, oracle: &str) -> Project {
    let p = Project::new();
    p.file("src.jsonl", &corpus(n));
    p.file("prompts/judge.j2", "Judge: {{ question }}\n");
    p.file(
        "pipe.yaml",
        &format!(
            r#"
name: shaped
params:
  oracle: {{template: prompts/judge.j2, returns: {{verdict: "enum[yes,no,unsure]", score: number, ok: bool}}, {oracle}}}
stages:
  make:
    run: cp src.jsonl data/corpus.jsonl
    deps: [src.jsonl]
    outs: [data/corpus.jsonl]
{LABEL}
"#
        ),
    );
    p
}

fn check_shaped(labels: &[Value]) {
    for l in labels {
        let label = &l["label"];
        assert!(
            ["yes", "no", "unsure"].contains(&label["verdict"].as_str().unwrap()),
            "{l}"
        );
        assert!(label["score"].is_number(), "{l}");
        assert!(label["ok"].is_boolean(), "{l}");
    }
}

#[test]
fn constrained_decoding_makes_every_local_reply_parse_and_serve_enforces_json_schema() {
    // A random tiny model never writes JSON by itself; under the reply's schema (the
    // default for local oracles) every reply parses, first attempt.
    let free = shaped(12, "backend: local, model: \"tiny:llama:2\", max_new_tokens: 48, retries: 0, batch_size: 6, constrained: false");
    free.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(jsonl(&free, "label", "failures").len(), 12);
    let p = shaped(
        12,
        "backend: local, model: \"tiny:llama:2\", max_new_tokens: 48, retries: 0, batch_size: 6",
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert!(jsonl(&p, "label", "failures").is_empty());
    let labels = jsonl(&p, "label", "labels");
    assert_eq!(labels.len(), 12);
    check_shaped(&labels);

    // A prefix no reply of the shape starts with is refused before any request.
    let bad = shaped(
        2,
        "backend: local, model: \"tiny:llama:2\", reply_prefix: '{\"answer\": \"', retries: 0",
    );
    let out = bad.pipe(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("cannot begin a reply of the declared shape"),
        "{}",
        out.stderr
    );

    // The openai backend with `constrained: true` sends response_format json_schema, and
    // pipe serve enforces it.
    let server = Project::new();
    let (mut serve, url) = server.serve(&["tiny:llama:2", "--max-batch", "4"]);
    let remote = shaped(6, &format!("backend: openai, model: tiny, base_url: \"{url}\", max_new_tokens: 48, retries: 0, concurrency: 3, constrained: true"));
    remote.ok(&["run", "pipe.yaml", "--no-progress"]);
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(jsonl(&remote, "label", "failures").is_empty());
    let labels = jsonl(&remote, "label", "labels");
    assert_eq!(labels.len(), 6);
    check_shaped(&labels);
}

#[test]
fn calibrate_judges_a_rubric_oracle_by_its_decision_matrix() {
    // 10 on-topic, 10 off-topic and 4 edge-case articles; the scripted oracle scores
    // on-topic high, off-topic low except one (10% false positives: REVIEW), and first
    // answers r0 with a score out of range, which is retried.
    let corpus: String = (0..24)
        .map(|i| {
            let stratum = match i {
                0..=9 => "on",
                10..=19 => "off",
                _ => "edge",
            };
            format!("{{\"id\": \"r{i}\", \"kind\": \"{stratum}\", \"text\": \"article {i}\"}}\n")
        })
        .collect();
    let server = FakeOpenAi::start(|r| {
        let i: usize = r.item.trim_start_matches('r').parse().unwrap();
        let (a, b) = match i {
            0 if r.seen == 0 => (11, 8),
            0..=9 => (8, 7),
            10 => (9, 9),
            11..=19 => (1, 2),
            _ => (5, 4),
        };
        Reply::Content(format!(
            "{{\"content_type\": \"news\", \"agency\": {a}, \"benefit\": {b}, \"reasoning\": \"because\"}}"
        ))
    });
    let p = Project::new();
    p.file("src.jsonl", &corpus);
    p.file("score.j2", "Score [[{{ id }}]]: {{ text }}\n");
    p.file(
        "filter.yaml",
        "name: toy\ndimensions:\n  agency: {weight: 1}\n  benefit: {weight: 1}\ntiers:\n  - {name: high, min: 5}\n  - {name: low, min: 0}\n",
    );
    p.file(
        "pipe.yaml",
        &format!(
            r#"
name: rubric
stages:
  make:
    run: cp src.jsonl data/corpus.jsonl
    deps: [src.jsonl]
    outs: [data/corpus.jsonl]
  calibrate:
    uses: calibrate
    inputs: {{corpus: make.corpus}}
    with:
      oracle: {{template: score.j2, returns: {{content_type: string, agency: "int[0,10]", benefit: "int[0,10]", reasoning: string}}, {}}}
      compare: {{filter: {{file: filter.yaml, on_topic: [on], off_topic: [off]}}}}
      sample: {{by: kind, per_stratum: 10, seed: 1}}
  label:
    uses: batch_label
    inputs: {{corpus: make.corpus}}
    with:
      oracle: {{template: score.j2, returns: {{content_type: string, agency: "int[0,10]", benefit: "int[0,10]", reasoning: string}}, {}}}
      filter: filter.yaml
"#,
            openai(&server.url, ""),
            openai(&server.url, "")
        ),
    );
    let out = p.pipe(&["run", "pipe.yaml", "--no-progress"]);
    assert!(out.code == 0 || out.code == 1, "{}", out.stderr);
    let show: Value = serde_json::from_str(&p.ok(&["show", "calibrate", "--json"]).stdout).unwrap();
    let m = &show["metrics"];
    assert_eq!(m["false_positive_rate"], 0.1, "{m} {}", out.stderr);
    assert_eq!(m["strong_false_positive_rate"], 0.1);
    assert_eq!(m["false_negative_rate"], 0.0);
    assert!(m["mean_dimension_variance"].as_f64().unwrap() > 1.0);
    assert_eq!(
        m["failure_rate"], 0.0,
        "r0's out-of-range reply was retried"
    );
    assert_eq!(server.counts()["r0"], 2);
    assert_eq!(m["decision"], "REVIEW", "{show}");
    p.ok(&["export", "calibrate.report", "report"]);
    let md = p.read("report/report.md");
    assert!(md.contains("false positives 10.0% ≥ 10.0%"), "{md}");
    // batch_label with the filter adds each record's overall score and tier.
    let labels = jsonl(&p, "label", "labels");
    assert_eq!(labels.len(), 24);
    let r10 = labels.iter().find(|r| r["id"] == "r10").unwrap();
    assert_eq!(
        (r10["overall"].as_f64(), r10["tier"].as_str()),
        (Some(9.0), Some("high"))
    );
    let r12 = labels.iter().find(|r| r["id"] == "r12").unwrap();
    assert_eq!(
        (r12["overall"].as_f64(), r12["tier"].as_str()),
        (Some(1.5), Some("low"))
    );
    let show: Value = serde_json::from_str(&p.ok(&["show", "label", "--json"]).stdout).unwrap();
    assert_eq!(
        show["metrics"]["tiers"],
        serde_json::json!({"high": 11, "low": 13})
    );
}
