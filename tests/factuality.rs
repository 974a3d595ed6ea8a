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
    assert!(p.read("report/report.md").contains("parse_failure_rate"));
    let out = p.ok(&["run", "pipe.yaml", "--no-progress"]);
    assert_eq!(out.status_of("evaluate").as_deref(), Some("cached"));
}

fn metric(out: &str, name: &str) -> u64 {
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
    assert_eq!(metric(&show, "reused"), last);
    assert_eq!(metric(&show, "generated"), total - last);
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
