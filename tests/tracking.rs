//! Tracking against the real tools: an MLflow server started on loopback by the test
//! (`pip install mlflow`), read back through its REST API, and TensorBoard event files read
//! back with the `tensorboard` package's own reader (`scripts/reference/read_tfevents.py`).
//!
//! `PIPE_MLFLOW` names the `mlflow` executable (else PATH), `PIPE_PYTHON` a Python with
//! `tensorboard` (else the `python` beside `mlflow`). `.ci/run` installs both and sets
//! `PIPE_REQUIRE_INTEROP=1`, so there their absence fails the test instead of skipping it.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{qa_lines, Project};

const PIPELINE: &str = r#"
name: tracked
params:
  lr: 0.01
  oracle: {api_key: sk-test-DO-NOT-LOG, api_key_env: OPENAI_API_KEY}
tracking: {mlflow: "URL", experiment: tiny-tracking}
stages:
  data:
    run: cp qa.jsonl out/train.jsonl
    deps: [qa.jsonl]
    outs: [out/train.jsonl]
  sft:
    uses: sft
    inputs: {train: data.train, val: data.train}
    with:
      model: "tiny:llama:3"
      lora: {r: 4, alpha: 8, target_modules: all-linear}
      optimizer: {lr: "${params.lr}"}
      steps: 5
      batch_size: 2
      eval_every: 2
      tensorboard: true
"#;

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn required() -> bool {
    std::env::var_os("PIPE_REQUIRE_INTEROP").is_some()
}

/// An `mlflow server` in its own process group, stopped (group and all) on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        // `--` before the group: procps-ng 4.0's kill reads `kill -TERM -PID` as a
        // signal to every process (-1).
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{pid}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pid}")])
            .status();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_mlflow(mlflow: &Path, dir: &Path) -> Server {
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let log = std::fs::File::create(dir.join("mlflow.log")).unwrap();
    let child = Command::new(mlflow)
        .args(["server", "--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--backend-store-uri")
        .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
        .arg("--artifacts-destination")
        .arg(dir.join("artifacts"))
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start mlflow server");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(r) = ureq::get(&format!("{}/health", server.url)).call() {
            if r.status() == 200 {
                return server;
            }
        }
        assert!(
            Instant::now() < deadline,
            "mlflow server did not answer in 180 s:\n{}",
            std::fs::read_to_string(dir.join("mlflow.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn api(url: &str, path: &str, body: Option<Value>) -> Value {
    let full = format!("{url}/api/2.0/mlflow/{path}");
    let r = match body {
        Some(b) => ureq::post(&full)
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => ureq::get(&full).call(),
    };
    let text = r
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_string()
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tag<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .and_then(|t| t["value"].as_str())
}

fn param<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["params"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .and_then(|t| t["value"].as_str())
}

/// `metrics.jsonl` of the stored sft result, as tag → [(step, value)].
fn jsonl_scalars(p: &Project) -> BTreeMap<String, Vec<(u64, f64)>> {
    let show: Value = serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
    let path = p.join(show["outputs"]["metrics"]["path"].as_str().unwrap());
    let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        for (k, x) in v.as_object().unwrap() {
            if k != "step" {
                out.entry(k.clone())
                    .or_default()
                    .push((step, x.as_f64().unwrap()));
            }
        }
    }
    out
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-30)
}

#[test]
fn mlflow_lists_every_stage_run_with_params_and_step_metrics_and_tensorboard_reads_the_events() {
    let mlflow = std::env::var_os("PIPE_MLFLOW")
        .map(PathBuf::from)
        .or_else(|| on_path("mlflow"));
    let Some(mlflow) = mlflow else {
        assert!(
            !required(),
            "PIPE_REQUIRE_INTEROP is set but no mlflow (PIPE_MLFLOW or PATH)"
        );
        eprintln!("no mlflow on PATH: this test did not run (pip install mlflow tensorboard)");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let server = start_mlflow(&mlflow, scratch.path());
    let p = Project::new();
    p.file("p.yaml", &PIPELINE.replace("URL", &server.url))
        .file("qa.jsonl", &qa_lines(8));
    let run = p.ok(&["run", "p.yaml", "--no-progress", "--name", "first"]);
    assert!(
        run.stderr.contains("tracking in MLflow at"),
        "{}",
        run.stderr
    );
    // The second run finds both stages cached; `--track` names another experiment.
    p.ok(&[
        "run",
        "p.yaml",
        "--no-progress",
        "--track",
        &format!("mlflow={}", server.url),
        "--track",
        "experiment=tiny-again",
    ]);

    let url = &server.url;
    let exp = api(
        url,
        "experiments/get-by-name?experiment_name=tiny-tracking",
        None,
    );
    let exp_id = exp["experiment"]["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let runs = api(
        url,
        "runs/search",
        Some(json!({"experiment_ids": [exp_id], "max_results": 100})),
    );
    assert!(
        !runs.to_string().contains("sk-test-DO-NOT-LOG"),
        "a secret reached MLflow"
    );
    let runs = runs["runs"].as_array().unwrap();
    let parent = runs
        .iter()
        .find(|r| tag(r, "mlflow.parentRunId").is_none())
        .expect("a parent run");
    assert_eq!(parent["info"]["run_name"], "first");
    assert_eq!(parent["info"]["status"], "FINISHED");
    assert_eq!(param(parent, "lr"), Some("0.01"));
    assert_eq!(param(parent, "oracle.api_key"), Some("***"));
    assert_eq!(param(parent, "oracle.api_key_env"), Some("OPENAI_API_KEY"));
    let parent_id = parent["info"]["run_id"].as_str().unwrap();
    let children: BTreeMap<&str, &Value> = runs
        .iter()
        .filter(|r| tag(r, "mlflow.parentRunId") == Some(parent_id))
        .map(|r| (r["info"]["run_name"].as_str().unwrap(), r))
        .collect();
    assert_eq!(
        children.keys().copied().collect::<Vec<_>>(),
        ["data", "sft"]
    );
    let sft = children["sft"];
    assert_eq!(sft["info"]["status"], "FINISHED");
    assert_eq!(tag(sft, "pipe.status"), Some("ran"));
    assert_eq!(param(sft, "optimizer.lr"), Some("0.01"));
    assert_eq!(param(sft, "steps"), Some("5"));
    assert_eq!(param(sft, "tensorboard"), Some("true"));

    // Step metrics equal metrics.jsonl, step by step.
    let want = jsonl_scalars(&p);
    assert!(want.contains_key("loss") && want.contains_key("eval_loss"));
    let sft_id = sft["info"]["run_id"].as_str().unwrap();
    let check_history = |run_id: &str, what: &str| {
        for (key, points) in &want {
            let h = api(
                url,
                &format!("metrics/get-history?run_id={run_id}&metric_key={key}"),
                None,
            );
            let mut got: Vec<(u64, f64)> = h["metrics"]
                .as_array()
                .unwrap_or_else(|| panic!("{what}: no history of {key}: {h}"))
                .iter()
                .map(|m| (m["step"].as_u64().unwrap(), m["value"].as_f64().unwrap()))
                .collect();
            got.sort_by_key(|x| x.0);
            assert_eq!(
                got.len(),
                points.len(),
                "{what}: {key}: {got:?} vs {points:?}"
            );
            for ((gs, gv), (ws, wv)) in got.iter().zip(points) {
                assert_eq!(gs, ws, "{what}: {key} steps");
                assert!(
                    close(*gv, *wv, 1e-12),
                    "{what}: {key} at {ws}: {gv} vs {wv}"
                );
            }
        }
    };
    check_history(sft_id, "ran sft");
    // The final metrics are there too; a final value named like a curve is `_final`.
    let final_loss = api(
        url,
        &format!("metrics/get-history?run_id={sft_id}&metric_key=final_train_loss"),
        None,
    );
    assert_eq!(final_loss["metrics"].as_array().unwrap().len(), 1);
    let tps = api(
        url,
        &format!("metrics/get-history?run_id={sft_id}&metric_key=tokens_per_s_final"),
        None,
    );
    assert_eq!(tps["metrics"].as_array().unwrap().len(), 1);
    // Its figures are artifacts.
    let arts = api(url, &format!("artifacts/list?run_id={sft_id}"), None);
    let files: Vec<&str> = arts["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"curve.png") && files.contains(&"curve_svg.svg"),
        "{files:?}"
    );

    // The cached run, in the other experiment, replays the same step metrics.
    let exp2 = api(
        url,
        "experiments/get-by-name?experiment_name=tiny-again",
        None,
    );
    let runs2 = api(
        url,
        "runs/search",
        Some(json!({"experiment_ids": [exp2["experiment"]["experiment_id"]], "max_results": 100})),
    );
    let cached_sft = runs2["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["info"]["run_name"] == "sft")
        .expect("the cached sft has a run");
    assert_eq!(tag(cached_sft, "pipe.status"), Some("cached"));
    check_history(cached_sft["info"]["run_id"].as_str().unwrap(), "cached sft");

    // TensorBoard's reader sees the same scalars in the tensorboard output.
    let python = std::env::var_os("PIPE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| mlflow.with_file_name("python"));
    let show: Value = serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
    let tb = p.join(show["outputs"]["tensorboard"]["path"].as_str().unwrap());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference/read_tfevents.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&tb)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "read_tfevents.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        read.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "tags"
    );
    for (key, points) in &want {
        let got = &read[key];
        assert_eq!(got.len(), points.len(), "tensorboard {key}");
        for ((gs, gv), (ws, wv)) in got.iter().zip(points) {
            assert_eq!(gs, ws);
            // Event files hold float32 scalars.
            assert!(
                close(*gv, *wv, 1e-6),
                "tensorboard {key} at {ws}: {gv} vs {wv}"
            );
        }
    }
    drop(server);
}

#[test]
fn tracking_needs_a_reachable_server_and_a_valid_block() {
    let p = Project::new();
    let port = free_port();
    p.file(
        "p.yaml",
        &format!(
            "name: t\ntracking: {{mlflow: \"http://127.0.0.1:{port}\"}}\nstages:\n  a:\n    run: \"true\"\n"
        ),
    );
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("cannot reach the MLflow server at http://127.0.0.1"),
        "{}",
        out.stderr
    );
    p.file(
        "bad.yaml",
        "name: t\ntracking: {mlflw: \"http://x\"}\nstages:\n  a:\n    run: \"true\"\n",
    );
    let out = p.pipe(&["check", "bad.yaml"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("bad.yaml:2:")
            && out.stderr.contains("unknown key `mlflw` in `tracking:`")
            && out.stderr.contains("did you mean `mlflow`?"),
        "{}",
        out.stderr
    );
    let out = p.pipe(&["run", "p.yaml", "--track", "wandb=x"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("expected `mlflow=URI`"),
        "{}",
        out.stderr
    );
}
