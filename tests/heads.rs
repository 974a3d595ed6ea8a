//! `head_train` and `head_eval` end to end with the real `pipe` binary on tiny models:
//! a regression head with LoRA, its evaluation gate, bad targets, and a SIGKILL in
//! the middle of training resuming to the same losses.

mod support;

use serde_json::Value;
use support::Project;

const FILTER: &str = r#"
name: toy
dimensions:
  length: {weight: 2, description: "how long the text is"}
  sevens: {weight: 1, description: "how many sevens it holds"}
gatekeepers:
  - {dimension: length, below: 2, cap: 1}
tiers:
  - {name: high, min: 6}
  - {name: mid, min: 3}
  - {name: low, min: 0}
"#;

/// Records whose two scores are functions of the text (its length in words, the count
/// of the digit 7), on the 0–10 scale.
fn records(n: usize, offset: usize) -> String {
    (0..n)
        .map(|i| {
            let k = i + offset;
            let words = 1 + k % 9;
            let text: Vec<String> = (0..words).map(|w| format!("w{}", (k * 3 + w) % 17)).collect();
            let text = text.join(" ");
            let sevens = text.matches('7').count().min(10);
            format!(
                "{{\"id\": \"r{k}\", \"text\": \"{text}\", \"oracle\": {{\"length\": {}, \"sevens\": {sevens}}}}}\n",
                words.min(10)
            )
        })
        .collect()
}

fn pipeline(steps: u64, save_every: u64) -> String {
    format!(
        r#"
name: heads
stages:
  make:
    run: cp train.jsonl val.jsonl test.jsonl data/
    deps: [train.jsonl, val.jsonl, test.jsonl]
    outs: [data/train.jsonl, data/val.jsonl, data/test.jsonl]
  head_train:
    uses: head_train
    inputs: {{train: make.train, val: make.val}}
    with:
      model: "tiny:llama:2"
      lora: {{r: 4, alpha: 8, target_modules: all-linear}}
      objective: mse
      filter: filter.yaml
      scores_field: oracle
      template: text.j2
      optimizer: {{lr: 0.01}}
      steps: {steps}
      eval_every: 5
      save_every: {save_every}
      batch_size: 4
      seed: 3
  head_eval:
    uses: head_eval
    inputs: {{model: head_train.model, test: make.test}}
    with: {{filter: filter.yaml, gate: {{}}}}
"#
    )
}

fn project(steps: u64, save_every: u64) -> Project {
    let p = Project::new();
    p.file("filter.yaml", FILTER)
        .file("text.j2", "Text: {{ text }}")
        .file("train.jsonl", &records(48, 0))
        .file("val.jsonl", &records(12, 100))
        .file("test.jsonl", &records(12, 200))
        .file("pipe.yaml", &pipeline(steps, save_every));
    p
}

fn losses(p: &Project) -> Vec<(u64, Option<f64>, Option<f64>)> {
    p.ok(&["export", "head_train.metrics", "m.jsonl"]);
    p.read("m.jsonl")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64(),
                v["eval_loss"].as_f64(),
            )
        })
        .collect()
}

#[test]
fn a_regression_head_trains_evaluates_and_gates() {
    let p = project(30, 0);
    let out = p.pipe(&["run", "pipe.yaml", "--no-progress"]);
    // The gate decides; a tiny random model rarely deploys, and REVIEW or FAIL holds
    // nothing downstream here (head_eval is last). Either way the results are stored.
    assert!(out.code == 0 || out.code == 1, "{}", out.stderr);
    let show: Value =
        serde_json::from_str(&p.ok(&["show", "head_train", "--json"]).stdout).unwrap();
    let m = &show["metrics"];
    assert_eq!(m["train_units"], 48);
    assert!(
        m["val_mae"].as_f64().unwrap() < m["initial_val_mae"].as_f64().unwrap(),
        "{m}"
    );
    p.ok(&["export", "head_train.history", "h.json"]);
    let h: Value = serde_json::from_str(&p.read("h.json")).unwrap();
    let evals = h["evaluations"].as_array().unwrap();
    assert_eq!(evals.len(), 7, "steps 0, 5, …, 30");
    assert!(
        evals[1]["val_mae.length"].as_f64().is_some() && evals[1]["train_loss"].as_f64().is_some()
    );
    p.ok(&["export", "head_train.figures", "fig"]);
    for f in [
        "loss_curves.png",
        "overall_metrics.png",
        "per_dimension_mae.png",
    ] {
        let png = std::fs::read(p.join(&format!("fig/{f}"))).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{f}");
    }
    p.ok(&["export", "head_train.model", "model"]);
    let cfg: Value = serde_json::from_str(&p.read("model/adapter_config.json")).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let hc: Value = serde_json::from_str(&p.read("model/head_config.json")).unwrap();
    assert_eq!(hc["outputs"], serde_json::json!(["length", "sevens"]));
    assert_eq!(hc["standardize"].as_array().unwrap().len(), 2);
    let ev: Value = serde_json::from_str(&p.ok(&["show", "head_eval", "--json"]).stdout).unwrap();
    let em = &ev["metrics"];
    assert_eq!(em["test_units"], 12);
    assert!(em["test_mae"].as_f64().unwrap().is_finite());
    assert!(em["test_spearman.length"].as_f64().is_some(), "{em}");
    let decision = em["decision"].as_str().unwrap();
    assert!(["DEPLOY", "REVIEW", "FAIL"].contains(&decision));
    assert!(em["tier_accuracy"].as_f64().is_some());
    p.ok(&["export", "head_eval.report", "report.md"]);
    let report = p.read("report.md");
    assert!(
        report.contains(&format!("Decision: **{decision}**")),
        "{report}"
    );
    assert!(
        report.contains("| length |") && report.contains("Worst"),
        "{report}"
    );
    p.ok(&["export", "head_eval.predictions", "pred.jsonl"]);
    assert_eq!(p.read("pred.jsonl").lines().count(), 12);
    // Nothing recomputes on a second run.
    let again = p.pipe(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(again.status_of("head_train").as_deref(), Some("cached"));
}

#[test]
fn a_target_that_is_not_a_number_names_its_line_and_field() {
    let p = project(4, 0);
    let mut train = records(6, 0);
    train.push_str(
        "{\"id\": \"bad\", \"text\": \"x\", \"oracle\": {\"length\": \"long\", \"sevens\": 0}}\n",
    );
    p.file("train.jsonl", &train);
    let out = p.pipe(&["run", "pipe.yaml", "--no-progress"]);
    let err = &out.stderr;
    assert_ne!(out.code, 0);
    assert!(
        err.contains("train (")
            && err.contains("):7: ")
            && err.contains("`oracle.length`: expected a number"),
        "{err}"
    );
}

fn has_checkpoint(dir: &std::path::Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let p = e.path();
        (p.file_name().is_some_and(|n| n == "LATEST")) || (p.is_dir() && has_checkpoint(&p))
    })
}

#[test]
fn head_train_killed_mid_run_resumes_to_the_same_losses() {
    let steps = 40;
    let full = project(steps, 4);
    full.ok(&[
        "run",
        "pipe.yaml",
        "--no-progress",
        "--only",
        "make,head_train",
    ]);
    let want = losses(&full);
    assert_eq!(want.len() as u64, steps + 1);
    let p = project(steps, 4);
    p.ok(&["run", "pipe.yaml", "--no-progress", "--only", "make"]);
    let mut child = p.spawn(&["run", "pipe.yaml", "--no-progress", "--only", "head_train"]);
    let started = std::time::Instant::now();
    while !has_checkpoint(&p.join(".pipe")) && !has_checkpoint(&p.join("cache")) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "head_train finished before a checkpoint was seen"
        );
        assert!(
            started.elapsed().as_secs() < 300,
            "no checkpoint after 300 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let killed_early = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        killed_early,
        "head_train finished before the kill; make it longer"
    );
    p.ok(&["run", "pipe.yaml", "--no-progress", "--only", "head_train"]);
    let got = losses(&p);
    assert_eq!(got, want);
    let show: Value =
        serde_json::from_str(&p.ok(&["show", "head_train", "--json"]).stdout).unwrap();
    let from = show["metrics"]["resumed_from"].as_u64().unwrap();
    assert!(
        from > 0 && from.is_multiple_of(4) && from < steps,
        "resumed from {from}"
    );
    eprintln!(
        "killed and resumed from step {from} of {steps}: the same {} losses",
        got.len()
    );
}
