//! `pipe report`: the page of two training runs and of a failed run, checked as written and,
//! where Chromium is installed, as a headless browser renders it (DOM and screenshot).
//!
//! `.ci/run` installs Debian's `chromium` and sets `PIPE_REQUIRE_BROWSER=1`, so there a
//! missing browser fails the test instead of skipping its browser half. `PIPE_REPORT_DIR=DIR`
//! keeps the pages and screenshots there, to look at them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{qa_lines, Project};

const PIPELINE: &str = r#"
name: tiny-fact
params:
  lr: 0.01
stages:
  data:
    run: cp qa.jsonl out/train.jsonl && cp test.jsonl out/test.jsonl
    deps: [qa.jsonl, test.jsonl]
    outs: [out/train.jsonl, out/test.jsonl]
  sft:
    uses: sft
    inputs: {train: data.train, val: data.train}
    with:
      model: "tiny:llama:3"
      lora: {r: 4, alpha: 8, target_modules: all-linear}
      optimizer: {lr: "${params.lr}"}
      steps: 6
      batch_size: 2
      eval_every: 2
  gen:
    uses: generate
    inputs: {prompts: data.train, adapter: sft.adapter}
    with: {model: "tiny:llama:3", max_new_tokens: 4, batch_size: 4}
  evaluate:
    uses: evaluate
    inputs: {test: data.test, adapter: sft.adapter}
    with: {model: "tiny:llama:3", template: prompt.j2, max_new_tokens: 6, batch_size: 2}
"#;

const TEST: &str = r#"{"id": "a", "question": "Which river?", "answers": ["Vistula"], "evidence": [{"id": "c1", "title": "Vistula", "text": "The Vistula flows through Kraków."}], "support": ["c1"]}
{"id": "b", "question": "Which city?", "answers": ["Kraków"], "evidence": [{"id": "c2", "title": "Kraków", "text": "Kraków is old."}], "support": ["c2"]}
"#;

const BROKEN: &str = r#"
name: broken
stages:
  data:
    run: "echo making >&2; printf 'x\n' > out/a.txt"
    outs: [out/a.txt]
  explode:
    run: "echo 'the tokenizer file is missing' >&2; exit 3"
    deps: [out/a.txt]
  after:
    run: "true"
    needs: [explode]
"#;

/// The attribute values of `attr` on elements of the page.
fn attrs(html: &str, attr: &str) -> Vec<String> {
    let pat = format!("{attr}=\"");
    html.match_indices(&pat)
        .map(|(i, _)| {
            let rest = &html[i + pat.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

fn browser() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PIPE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// The DOM after Chromium loaded `page` from `file://`, and a screenshot of it as `shot`.
fn render(chrome: &Path, page: &Path, shot: &Path, scratch: &Path) -> String {
    let url = format!("file://{}", page.display());
    let common = |cmd: &mut Command| {
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", scratch.display()))
        .env("HOME", scratch);
    };
    let mut dump = Command::new(chrome);
    common(&mut dump);
    let out = dump
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut snap = Command::new(chrome);
    common(&mut snap);
    let st = snap
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1400,2600")
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(
        st.status.success(),
        "chromium --screenshot failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fraction of pixels in a PNG that are not white, and its size.
fn ink(path: &Path) -> (u32, u32, f64) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[1..4], b"PNG", "{} is not a PNG", path.display());
    // Width and height sit in the IHDR chunk; counting ink needs decoding, done on the
    // raw IDAT size instead: a blank page compresses to almost nothing.
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h, bytes.len() as f64 / (w as f64 * h as f64))
}

fn keep(p: &Project, files: &[(&str, &str)]) {
    if let Some(out) = std::env::var_os("PIPE_REPORT_DIR") {
        let out = PathBuf::from(out);
        std::fs::create_dir_all(&out).unwrap();
        for (from, to) in files {
            let src = p.join(from);
            if src.exists() {
                std::fs::copy(src, out.join(to)).unwrap();
            }
        }
    }
}

#[test]
fn a_report_compares_two_runs_and_shows_a_failed_one() {
    let p = Project::new();
    p.file("p.yaml", PIPELINE)
        .file("qa.jsonl", &qa_lines(8))
        .file("test.jsonl", TEST)
        .file(
            "prompt.j2",
            "{% for c in evidence %}[{{ c.id }}] {{ c.text }}\n{% endfor %}Q: {{ question }}\n",
        );
    p.ok(&["run", "p.yaml", "--no-progress", "--name", "base"]);
    p.ok(&[
        "run",
        "p.yaml",
        "--no-progress",
        "--name",
        "hotter",
        "--set",
        "lr=0.05",
    ]);
    let out = p.ok(&["report", "base", "hotter", "-o", "rep"]);
    assert!(out.stdout.contains("2 runs, 4 stages"), "{}", out.stdout);
    let html = p.read("rep/index.html");
    let runs: serde_json::Value = serde_json::from_str(&p.ok(&["runs", "--json"]).stdout).unwrap();
    let ids: Vec<String> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();

    // As written: both runs, every stage of each in the DAG and the table, the lr that
    // differs, the metric deltas, one overlaid curve per sft metric with both runs.
    let checks = |dom: &str, what: &str| {
        for id in &ids {
            assert!(
                attrs(dom, "data-run").iter().any(|r| r == id),
                "{what}: run {id} missing"
            );
        }
        let stages = attrs(dom, "data-stage");
        for s in ["data", "sft", "gen", "evaluate"] {
            // Two DAG nodes and one table row per stage at least.
            assert!(
                stages.iter().filter(|x| *x == s).count() >= 3,
                "{what}: stage {s} not in both DAGs and the table"
            );
        }
        // sft waits for data, gen and evaluate for data and sft: five edges per DAG.
        assert_eq!(dom.matches("class=\"edge\"").count(), 10, "{what}: edges");
        // evaluate's metrics are in the table with a row per metric.
        let at = dom
            .find("<table class=\"metrics\" data-stage=\"evaluate\"")
            .expect("evaluate metrics");
        let table = &dom[at..at + dom[at..].find("</table>").unwrap()];
        assert!(
            table.contains("data-metric=\"tuned.em\""),
            "{what}: {table}"
        );
        assert!(
            dom.contains("data-param=\"lr\" class=\"differs\""),
            "{what}: lr"
        );
        assert!(
            dom.contains("data-differ=\"1\""),
            "{what}: one param differs"
        );
        let deltas = attrs(dom, "data-delta");
        assert!(!deltas.is_empty(), "{what}: no metric deltas");
        assert!(
            deltas
                .iter()
                .any(|d| d.parse::<f64>().unwrap().abs() > 1e-9),
            "{what}: every delta is zero although lr differs: {deltas:?}"
        );
        let curves = attrs(dom, "data-curve");
        for c in ["sft/loss", "sft/eval_loss", "sft/lr"] {
            assert!(
                curves.iter().any(|x| x == c),
                "{what}: curve {c} in {curves:?}"
            );
        }
        for runs_of in attrs(dom, "data-runs") {
            assert_eq!(runs_of.split(' ').count(), 2, "{what}: a curve lacks a run");
        }
        // The loss curve's SVG holds a polyline per run and both names in its legend.
        let at = dom.find("data-curve=\"sft/loss\"").unwrap();
        let fig = &dom[at..at + dom[at..].find("</figure>").unwrap()];
        assert!(fig.matches("<polyline").count() >= 2, "{what}: loss lines");
        let texts: Vec<&str> = fig
            .split("</text>")
            .filter_map(|t| Some(t[t.rfind('>')? + 1..].trim()))
            .collect();
        assert!(
            texts.contains(&"base") && texts.contains(&"hotter"),
            "{what}: legend in {texts:?}"
        );
    };
    keep(&p, &[("rep/index.html", "two-runs.html")]);
    checks(&html, "written page");
    // sft's figure is copied and shown, outputs link to copies next to the page.
    assert!(html.contains("<img src=\"artifacts/"), "no figure shown");
    for href in attrs(&html, "href") {
        if let Some(rel) = href.strip_prefix("artifacts/") {
            assert!(p.join(&format!("rep/artifacts/{rel}")).exists(), "{href}");
        }
    }
    // Nothing is fetched from a network when the page is viewed.
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));

    // A failed run: its page says which stage failed, why, with the log's last lines.
    p.file("broken.yaml", BROKEN);
    let failed = p.pipe(&["run", "broken.yaml", "--no-progress", "--name", "broken"]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    p.ok(&["report", "broken", "-o", "rep-failed"]);
    let bad = p.read("rep-failed/index.html");
    let failure = bad
        .find("class=\"failure\"")
        .map(|i| &bad[i..i + bad[i..].find("</div>").unwrap()])
        .expect("no failure block");
    assert!(failure.contains("data-stage=\"explode\""), "{failure}");
    assert!(
        failure.contains("the tokenizer file is missing"),
        "{failure}"
    );
    assert!(bad.contains("class=\"status failed\""));
    assert!(bad.contains("<g class=\"node failed\" data-stage=\"explode\""));
    assert!(bad.contains("<g class=\"node skipped\" data-stage=\"after\""));

    keep(
        &p,
        &[
            ("rep/index.html", "two-runs.html"),
            ("rep-failed/index.html", "failed.html"),
        ],
    );
    let Some(chrome) = browser() else {
        assert!(
            std::env::var_os("PIPE_REQUIRE_BROWSER").is_none(),
            "PIPE_REQUIRE_BROWSER is set but no chromium is on PATH (or PIPE_CHROMIUM)"
        );
        eprintln!("no chromium on PATH: the browser half of this test did not run");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let dom = render(
        &chrome,
        &p.join("rep/index.html"),
        &p.join("rep/shot.png"),
        scratch.path(),
    );
    checks(&dom, "Chromium's DOM");
    let (w, h, density) = ink(&p.join("rep/shot.png"));
    assert_eq!((w, h), (1400, 2600));
    assert!(
        density > 0.01,
        "the screenshot looks blank ({density} bytes/px)"
    );
    let dom_bad = render(
        &chrome,
        &p.join("rep-failed/index.html"),
        &p.join("rep-failed/shot.png"),
        scratch.path(),
    );
    assert!(dom_bad.contains("the tokenizer file is missing"));
    assert!(dom_bad.contains("class=\"node failed\""));
    keep(
        &p,
        &[
            ("rep/shot.png", "two-runs.png"),
            ("rep-failed/shot.png", "failed.png"),
        ],
    );
}
