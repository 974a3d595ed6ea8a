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
