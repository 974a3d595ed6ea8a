//! Factuality stages end to end with the real `pipe` binary on tiny models.

mod support;

use serde_json::Value;
use support::Project;

#[test]
fn evaluate_scores_a_model_and_writes_its_report() {
    let p = Project::new();
    p.file(
        "test.jsonl",
        r#"{"id": "a", "question": "Which river?", "answers": ["Vistula"], "evidence": [{"id": "c1", "title": "Vistula", "text": "The Vistula flows through Kraków."}], "support": ["c1"]}
{"id": "b", "question": "Which city?", "answers": ["Kraków"], "evidence": [{"id": "c2", "title": "Kraków", "text": "Kraków is old."}], "support": ["c2"]}
{"id": "c", "question": "Which year?", "answers": ["1364"], "evidence": [{"id": "c3", "title": "Oder", "text": "The Oder is a river."}], "support": []}
"#,
    );
    p.file(
        "prompt.j2",
        "{% for c in evidence %}[{{ c.id }}] {{ c.text }}\n{% endfor %}Q: {{ question }}\n",
    );
    p.file(
        "pipe.yaml",
        r#"
name: fact
stages:
  make:
    run: cp test.jsonl data/test.jsonl
    deps: [test.jsonl]
    outs: [data/test.jsonl]
  evaluate:
    uses: evaluate
    inputs: {test: make.test}
    with: {model: "tiny:llama:1", template: prompt.j2, max_new_tokens: 6, batch_size: 2}
"#,
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    p.ok(&["export", "evaluate.report", "report"]);
    let report: Value = serde_json::from_str(&p.read("report/report.json")).unwrap();
    // A random tiny model never writes the answer JSON: every output is a parse failure.
    assert_eq!(report["items"], 3);
    assert_eq!(report["models"]["base"]["parse_failure_rate"], 1.0);
    assert_eq!(report["models"]["base"]["em"], 0.0);
    let png = std::fs::read(p.join("report/reliability.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(p.read("report/reliability.svg").contains("Reliability"));
    keep_figures(&p, "report", &["reliability.png"]);
    assert!(p.read("report/report.md").contains("parse_failure_rate"));
    let out = p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(out.status_of("evaluate").as_deref(), Some("cached"));
}

/// A metric line of `pipe show`.
fn metric<T: std::str::FromStr>(out: &str, name: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    out.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("metric")?.trim();
            let (k, v) = rest.split_once(" = ")?;
            (k.trim() == name).then(|| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no metric {name} in\n{out}"))
}

/// Finished generations in the memo (not the temp files a kill can leave mid-write).
fn memo_files(p: &Project) -> u64 {
    let Ok(dirs) = std::fs::read_dir(p.join("cache/memo/generations")) else {
        return 0;
    };
    let mut n = 0;
    for sub in dirs.flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.ends_with(".json") && !name.starts_with('.') {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn prefs_generate_resumes_after_sigkill_without_repeating_a_generation() {
    let p = Project::new();
    let n = 150;
    let lines: String = (0..n)
        .map(|i| format!("{{\"id\": \"p{i}\", \"question\": \"question number {i}?\"}}\n"))
        .collect();
    p.file("prompts.jsonl", &lines);
    p.file("prompt.j2", "Q: {{ question }}\n");
    p.file(
        "pipe.yaml",
        r#"
name: prefs
stages:
  make:
    run: cp prompts.jsonl data/prompts.jsonl
    deps: [prompts.jsonl]
    outs: [data/prompts.jsonl]
  prefs_generate:
    uses: prefs_generate
    inputs: {prompts: make.prompts}
    with: {model: "tiny:llama:1", template: prompt.j2, models: [base], per_model: 3, max_new_tokens: 24, batch_size: 4, seed: 5}
"#,
    );
    p.ok(&["run", "pipe.yaml", "--no-progress", "--only", "make"]);
    let total = (n * 3) as u64;
    let mut rng = support::Lcg(11);
    let mut kills = 0;
    let mut last = 0;
    while kills < 10 {
        let mut child = p.spawn(&["run", "pipe.yaml", "--no-progress"]);
        std::thread::sleep(std::time::Duration::from_millis(
            150 + (rng.next_f64() * 250.0) as u64,
        ));
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished after {kills} kills; make the work longer"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let now = memo_files(&p);
        assert!(now >= last);
        last = now;
    }
    assert!(
        last > 0 && last < total,
        "{last} of {total} generations done before the last run"
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    let show = p.ok(&["show", "prefs_generate"]).stdout;
    // Counted: the last run generated exactly what no killed run had finished, and reused
    // every finished generation.
    assert_eq!(metric::<u64>(&show, "reused"), last);
    assert_eq!(metric::<u64>(&show, "generated"), total - last);
    assert_eq!(memo_files(&p), total);
    p.ok(&["export", "prefs_generate.candidates", "c.jsonl"]);
    let rows: Vec<Value> = p
        .read("c.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), n);
    assert!(rows
        .iter()
        .all(|r| r["candidates"].as_array().unwrap().len() == 3));
    eprintln!("{kills} kills: {last} of {total} generations finished before the final run, which generated {} and reused {last}", total - last);
}

#[test]
fn reward_train_trains_a_head_and_reports_ranking_metrics() {
    let p = Project::new();
    let mut rows = String::new();
    for i in 0..24 {
        let rec = format!(
            r#"{{"id": "q{i}", "question": "Where is place {i}?", "evidence": [{{"id": "c{i}", "text": "Place {i} is in Town{i}."}}, {{"id": "d{i}", "text": "Unrelated text {i}."}}], "support": ["c{i}"]}}"#
        );
        let good = format!(
            r#"{{\"answer\": \"Town{i}\", \"citations\": [\"c{i}\"], \"confidence\": 0.9}}"#
        );
        let bad = format!(
            r#"{{\"answer\": \"Nowhere\", \"citations\": [\"d{i}\", \"x{i}\"], \"confidence\": 0.9}}"#
        );
        rows.push_str(&format!(
            "{{\"id\": \"q{i}\", \"record\": {rec}, \"chosen\": \"{good}\", \"rejected\": \"{bad}\", \"margin\": 0.5}}\n"
        ));
    }
    p.file("pairs.jsonl", &rows);
    p.file(
        "prompt.j2",
        "{% for c in evidence %}[{{ c.id }}] {{ c.text }}\n{% endfor %}Q: {{ question }}",
    );
    p.file(
        "pipe.yaml",
        r#"
name: rm
stages:
  make:
    run: cp pairs.jsonl data/pairs.jsonl
    deps: [pairs.jsonl]
    outs: [data/pairs.jsonl]
  reward_train:
    uses: reward_train
    inputs: {pairs: make.pairs}
    with:
      model: "tiny:llama:1"
      template: prompt.j2
      epochs: 4
      batch_size: 4
      eval_every: 5
      eval_fraction: 0.25
      lr: 0.01
      penalties: {invalid_citation: 0.2, over_citation: 0.15, length: 0.05, span: 0.25, confidence: 0.1}
"#,
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    let show = p.ok(&["show", "reward_train"]).stdout;
    let m = |k: &str| metric::<f64>(&show, k);
    assert_eq!(m("train_pairs"), 18.0);
    assert_eq!(m("eval_pairs"), 6.0);
    assert_eq!(m("adversarial_pairs"), 18.0);
    // The penalties alone separate these pairs (the rejected answers cite an unknown
    // chunk and no support), so the penalised reward ranks every held-out pair.
    assert_eq!(m("eval_accuracy"), 1.0);
    assert_eq!(m("eval_roc_auc"), 1.0);
    let auc = m("adversarial_accuracy");
    assert!((0.0..=1.0).contains(&auc));
    p.ok(&["export", "reward_train.head", "head"]);
    let bytes = std::fs::read(p.join("head/score.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header["score.weight"]["shape"][0], 1);
    assert!(p.read("head/reward_config.json").contains("penalties"));
    p.ok(&["export", "reward_train.figures", "figures"]);
    for f in ["margins.png", "loss_curve.png"] {
        assert_eq!(
            &std::fs::read(p.join(&format!("figures/{f}"))).unwrap()[1..4],
            b"PNG"
        );
    }
    assert!(p
        .read("figures/margins.svg")
        .contains("Held-out reward margins (6 pairs"));
    keep_figures(&p, "figures", &["margins.png", "loss_curve.png"]);
}

#[test]
fn reward_train_with_lora_tunes_the_base_and_saves_a_seq_cls_model() {
    let p = Project::new();
    let mut rows = String::new();
    for i in 0..16 {
        let rec = format!(
            r#"{{"id": "q{i}", "question": "Where is place {i}?", "evidence": [{{"id": "c{i}", "text": "Place {i} is in Town{i}."}}], "support": ["c{i}"]}}"#
        );
        let good = format!(
            r#"{{\"answer\": \"Town{i}\", \"citations\": [\"c{i}\"], \"confidence\": 0.9}}"#
        );
        let bad = format!(
            r#"{{\"answer\": \"Nowhere\", \"citations\": [\"c{i}\"], \"confidence\": 0.9}}"#
        );
        rows.push_str(&format!(
            "{{\"id\": \"q{i}\", \"record\": {rec}, \"chosen\": \"{good}\", \"rejected\": \"{bad}\"}}\n"
        ));
    }
    p.file("pairs.jsonl", &rows);
    p.file("prompt.j2", "Q: {{ question }}");
    p.file(
        "pipe.yaml",
        r#"
name: rm
stages:
  make:
    run: cp pairs.jsonl data/pairs.jsonl
    deps: [pairs.jsonl]
    outs: [data/pairs.jsonl]
  reward_train:
    uses: reward_train
    inputs: {pairs: make.pairs}
    with:
      model: "tiny:llama:1"
      template: prompt.j2
      lora: {r: 4, alpha: 8, target_modules: all-linear}
      epochs: 3
      batch_size: 4
      eval_every: 3
      eval_fraction: 0.25
      lr: 0.01
"#,
    );
    p.ok(&["run", "pipe.yaml", "--no-progress"]);
    let show: Value =
        serde_json::from_str(&p.ok(&["show", "reward_train", "--json"]).stdout).unwrap();
    let m = &show["metrics"];
    assert_eq!(m["lora"], true);
    assert_eq!(m["train_pairs"], 12);
    assert_eq!(m["eval_pairs"], 4);
    let auc = m["eval_roc_auc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&auc), "{m}");
    p.ok(&["export", "reward_train.head", "head"]);
    let cfg: Value = serde_json::from_str(&p.read("head/adapter_config.json")).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    assert!(p.read("head/head_config.json").contains("pairwise"));
}

/// `PIPE_FIGURE_DIR=DIR` copies a test's figures there, to look at them.
fn keep_figures(p: &Project, dir: &str, files: &[&str]) {
    if let Some(out) = std::env::var_os("PIPE_FIGURE_DIR") {
        let out = std::path::PathBuf::from(out);
        std::fs::create_dir_all(&out).unwrap();
        for f in files {
            std::fs::copy(p.join(&format!("{dir}/{f}")), out.join(f)).unwrap();
        }
    }
}
