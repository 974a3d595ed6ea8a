//! Integration tests: the real `pipe` binary on temporary projects.

mod support;

use std::collections::BTreeMap;
use std::thread::sleep;
use std::time::{Duration, Instant};

use support::{qa_lines, Lcg, Project};

/// A four-stage pipeline: `make` → `split` → `count@train|val|test`, plus an independent `other`.
const CHAIN: &str = r#"
name: chain
params:
  seed: 7
  n: 60
stages:
  make:
    run: >-
      awk 'BEGIN { for (i = 0; i < ${params.n}; i++) printf "{\"id\": %d, \"question\": \"q %d\", \"source\": \"%s\"}\n", i, i, (i % 2 ? "a" : "b") }' > data/all.jsonl
    outs: [data/all.jsonl]
  split:
    uses: split
    inputs: {records: make.all}
    with:
      ratios: {train: 0.8, val: 0.1, test: 0.1}
      stratify: source
      seed: ${params.seed}
  count:
    foreach: [train, val, test]
    inputs:
      part: split.${item}
    run: wc -l < "$PIPE_INPUT_PART" > data/count_${item}.txt
    outs: ["data/count_${item}.txt"]
  other:
    run: echo independent > data/other.txt
    outs: [data/other.txt]
"#;

#[test]
fn rerun_hits_the_cache_for_every_stage() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    let first = p.ok(&["run", "p.yaml"]);
    for stage in [
        "make",
        "split",
        "count@train",
        "count@val",
        "count@test",
        "other",
    ] {
        assert_eq!(
            first.status_of(stage).as_deref(),
            Some("ran"),
            "{}",
            first.stdout
        );
    }
    let second = p.ok(&["run", "p.yaml"]);
    for stage in [
        "make",
        "split",
        "count@train",
        "count@val",
        "count@test",
        "other",
    ] {
        assert_eq!(
            second.status_of(stage).as_deref(),
            Some("cached"),
            "{}",
            second.stdout
        );
    }
    assert!(
        second.stdout.contains("0 ran, 6 cached, 0 failed"),
        "{}",
        second.stdout
    );
    assert_eq!(p.read("data/count_train.txt").trim(), "48");
}

#[test]
fn one_param_change_reruns_exactly_the_stage_and_its_descendants() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml"]);
    let status = p.ok(&["status", "p.yaml", "--set", "split.with.seed=8"]);
    let line = |stage: &str| {
        status
            .stdout
            .lines()
            .find(|l| l.starts_with(stage))
            .unwrap_or("")
            .to_owned()
    };
    assert!(line("make ").contains("cached"), "{}", status.stdout);
    assert!(
        line("split ").contains("will run") && line("split ").contains("param with.seed: 7 → 8")
            || line("split ").contains("param seed: 7 → 8"),
        "{}",
        status.stdout
    );
    assert!(
        line("count@train").contains("upstream `split` will run"),
        "{}",
        status.stdout
    );
    assert!(line("other").contains("cached"), "{}", status.stdout);

    let run = p.ok(&["run", "p.yaml", "--set", "split.with.seed=8"]);
    let statuses: BTreeMap<&str, String> = [
        "make",
        "split",
        "count@train",
        "count@val",
        "count@test",
        "other",
    ]
    .iter()
    .map(|s| (*s, run.status_of(s).unwrap()))
    .collect();
    assert_eq!(statuses["make"], "cached");
    assert_eq!(statuses["other"], "cached");
    assert_eq!(statuses["split"], "ran");
    // Counts may come out equal (stratified quotas), in which case their keys are unchanged
    // only if their input digests are; a new seed moves records, so the inputs change.
    for s in ["count@train", "count@val", "count@test"] {
        assert_eq!(statuses[s], "ran", "{}", run.stdout);
    }
}

#[test]
fn pipeline_param_change_is_named_by_status() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml"]);
    let status = p.ok(&["status", "p.yaml", "--set", "seed=9"]);
    let split = status
        .stdout
        .lines()
        .find(|l| l.starts_with("split"))
        .unwrap();
    assert!(
        split.contains("will run") && split.contains("param seed: 7 → 9"),
        "{}",
        status.stdout
    );
    let make = status
        .stdout
        .lines()
        .find(|l| l.starts_with("make"))
        .unwrap();
    assert!(make.contains("cached"), "{}", status.stdout);
}

#[test]
fn key_order_comments_and_whitespace_do_not_change_keys() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml"]);
    let reordered = r#"
# Same pipeline, keys in another order, comments and flow style.
stages:
  other: {outs: [data/other.txt], run: echo independent > data/other.txt}
  count:
    outs: ["data/count_${item}.txt"]      # per split
    run: wc -l < "$PIPE_INPUT_PART" > data/count_${item}.txt
    inputs:
      part: split.${item}
    foreach: [train, val, test]
  split:
    with:
      seed: ${params.seed}
      stratify:   source
      ratios:
        val: 0.1
        test: 0.1
        train: 0.8
    inputs: {records: make.all}
    uses: split
  make:
    outs: [data/all.jsonl]
    run: >-
      awk 'BEGIN { for (i = 0; i < ${params.n}; i++) printf "{\"id\": %d, \"question\": \"q %d\", \"source\": \"%s\"}\n", i, i, (i % 2 ? "a" : "b") }' > data/all.jsonl
params: {n: 60, seed: 7}
name: chain
"#;
    p.file("p.yaml", reordered);
    let again = p.ok(&["run", "p.yaml"]);
    assert!(again.stdout.contains("0 ran, 6 cached"), "{}", again.stdout);
}

#[test]
fn deleted_workspace_out_is_restored_from_the_store() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml"]);
    std::fs::remove_file(p.join("data/other.txt")).unwrap();
    let status = p.ok(&["status", "p.yaml"]);
    assert!(
        status
            .stdout
            .contains("outs modified in the workspace, will be restored: data/other.txt"),
        "{}",
        status.stdout
    );
    let run = p.ok(&["run", "p.yaml"]);
    assert_eq!(run.status_of("other").as_deref(), Some("cached"));
    assert_eq!(p.read("data/other.txt"), "independent\n");
}

#[test]
fn deps_are_fingerprinted() {
    let p = Project::new();
    p.file("in.txt", "one\n").file(
        "p.yaml",
        "stages:\n  copy:\n    run: cat in.txt > out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n",
    );
    p.ok(&["run", "p.yaml"]);
    p.file("in.txt", "two\n");
    let status = p.ok(&["status", "p.yaml"]);
    assert!(
        status.stdout.contains("dep `in.txt` changed"),
        "{}",
        status.stdout
    );
    let run = p.ok(&["run", "p.yaml"]);
    assert_eq!(run.status_of("copy").as_deref(), Some("ran"));
    assert_eq!(p.read("out.txt"), "two\n");
}

#[test]
fn independent_stages_run_concurrently_and_gpu_stages_never_overlap() {
    let p = Project::new();
    // `a` and `b` each wait until the other has started: only concurrency lets them finish.
    // `g1` and `g2` each hold a directory lock while they run: overlap would fail one.
    p.file(
        "p.yaml",
        r#"
stages:
  a:
    run: touch a.started; for i in $(seq 100); do [ -e b.started ] && break; sleep 0.05; done; [ -e b.started ] && echo a > a.txt
    outs: [a.txt]
  b:
    run: touch b.started; for i in $(seq 100); do [ -e a.started ] && break; sleep 0.05; done; [ -e a.started ] && echo b > b.txt
    outs: [b.txt]
  g1:
    resources: {gpu: 1}
    run: mkdir gpu.lock && sleep 0.3 && rmdir gpu.lock && echo 1 > g1.txt
    outs: [g1.txt]
  g2:
    resources: {gpu: 1}
    run: mkdir gpu.lock && sleep 0.3 && rmdir gpu.lock && echo 2 > g2.txt
    outs: [g2.txt]
"#,
    );
    p.ok(&["run", "p.yaml", "--jobs", "4", "--resource", "gpu=1"]);
    assert_eq!(p.read("a.txt"), "a\n");
    assert_eq!(p.read("g1.txt"), "1\n");
    assert_eq!(p.read("g2.txt"), "2\n");
}

#[test]
fn stages_holding_a_gpu_each_get_their_own() {
    let p = Project::new();
    // Both run at once (each waits for the other to start) on a 2-GPU machine: each must
    // see a different GPU; a stage holding both sees both.
    p.file(
        "p.yaml",
        r#"
stages:
  g1:
    resources: {gpu: 1}
    run: touch g1.started; for i in $(seq 100); do [ -e g2.started ] && break; sleep 0.05; done; [ -e g2.started ] && echo "$CUDA_VISIBLE_DEVICES" > g1.txt
    outs: [g1.txt]
  g2:
    resources: {gpu: 1}
    run: touch g2.started; for i in $(seq 100); do [ -e g1.started ] && break; sleep 0.05; done; [ -e g1.started ] && echo "$CUDA_VISIBLE_DEVICES" > g2.txt
    outs: [g2.txt]
  both:
    resources: {gpu: 2}
    deps: [g1.txt, g2.txt]
    run: echo "$CUDA_VISIBLE_DEVICES" > both.txt
    outs: [both.txt]
"#,
    );
    p.ok(&["run", "p.yaml", "--jobs", "4", "--resource", "gpu=2"]);
    let mut got = [p.read("g1.txt"), p.read("g2.txt")];
    got.sort();
    assert_eq!(got, ["0\n", "1\n"]);
    assert_eq!(p.read("both.txt"), "0,1\n");
}

#[test]
fn a_stage_asking_for_more_than_the_machine_has_fails_clearly() {
    let p = Project::new();
    p.file(
        "p.yaml",
        "stages:\n  big:\n    resources: {gpu: 2}\n    run: echo x > x.txt\n    outs: [x.txt]\n",
    );
    let out = p.pipe(&["run", "p.yaml", "--resource", "gpu=1"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("stage needs gpu: 2 but this machine offers 1"),
        "{}",
        out.stderr
    );
}

#[test]
fn only_from_until_select_parts() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    let out = p.ok(&["run", "p.yaml", "--until", "split"]);
    assert_eq!(out.status_of("make").as_deref(), Some("ran"));
    assert_eq!(out.status_of("split").as_deref(), Some("ran"));
    assert_eq!(out.status_of("count@train"), None);
    assert_eq!(out.status_of("other"), None);
    let out = p.ok(&["run", "p.yaml", "--from", "split", "--only", "count"]);
    assert_eq!(out.status_of("count@val").as_deref(), Some("ran"));
    assert_eq!(out.status_of("make").as_deref(), Some("cached"));
    // A selected stage whose upstream has no result cannot borrow it.
    let q = Project::new();
    q.file("p.yaml", CHAIN);
    let out = q.pipe(&["run", "p.yaml", "--only", "split"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("stage `make` failed: no cached result for its current fingerprint"),
        "{}",
        out.stderr
    );
}

#[test]
fn two_concurrent_runs_both_succeed_and_compute_each_stage_once() {
    let p = Project::new();
    p.file(
        "p.yaml",
        r#"
stages:
  one:
    run: echo one >> computed.log; sleep 0.4; echo 1 > one.txt
    outs: [one.txt]
  two:
    inputs: {x: one.one}
    run: echo two >> computed.log; sleep 0.4; cat "$PIPE_INPUT_X" > two.txt; echo 2 >> two.txt
    outs: [two.txt]
  three:
    uses: split
    inputs: {records: four.data}
    with: {ratios: {a: 0.5, b: 0.5}}
  four:
    run: >-
      echo four >> computed.log; sleep 0.2; printf '{"id": 1}\n{"id": 2}\n' > data.jsonl
    outs: [data.jsonl]
"#,
    );
    // Both start cold, at once.
    let c1 = p
        .command(&["run", "p.yaml", "--no-progress"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let c2 = p
        .command(&["run", "p.yaml", "--no-progress"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    assert!(o1.status.success() && o2.status.success());
    let log = p.read("computed.log");
    let mut lines: Vec<&str> = log.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        ["four", "one", "two"],
        "each stage computed exactly once"
    );
}

#[test]
fn concurrent_cold_runs_share_work() {
    let p = Project::new();
    p.file(
        "p.yaml",
        "stages:\n  slow:\n    run: echo slow >> computed.log; sleep 0.5; echo done > out.txt\n    outs: [out.txt]\n",
    );
    let c1 = p
        .command(&["run", "p.yaml", "--no-progress"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let c2 = p
        .command(&["run", "p.yaml", "--no-progress"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stdout)
    );
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stdout)
    );
    assert_eq!(p.read("computed.log"), "slow\n");
    let outs = [
        String::from_utf8_lossy(&o1.stdout).into_owned(),
        String::from_utf8_lossy(&o2.stdout).into_owned(),
    ];
    assert_eq!(
        outs.iter().filter(|o| o.contains("1 ran")).count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        outs.iter().filter(|o| o.contains("1 cached")).count(),
        1,
        "{outs:?}"
    );
}

/// A stage that does ten steps, keeping its progress in `$PIPE_CHECKPOINT_DIR`, and logs
/// every step it executes to `trace.log` (outside the store).
const CHECKPOINTED: &str = r#"
stages:
  steps:
    run: >-
      c="$PIPE_CHECKPOINT_DIR";
      i=$(cat "$c/step" 2>/dev/null || echo 0);
      while [ "$i" -lt 10 ]; do
        sleep 0.15;
        echo "step $i" >> trace.log;
        echo "$i" >> "$c/partial";
        i=$((i + 1));
        echo "$i" > "$c/step.tmp" && mv "$c/step.tmp" "$c/step";
      done;
      cp "$c/partial" result.txt
    outs: [result.txt]
"#;

#[test]
fn a_checkpointed_stage_resumes_after_kill_9() {
    let p = Project::new();
    p.file("p.yaml", CHECKPOINTED);
    let mut child = p.spawn(&["run", "p.yaml", "--no-progress"]);
    // Wait until some steps are done, then kill -9.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(p.join("trace.log"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 4
    {
        assert!(Instant::now() < deadline, "the stage never progressed");
        sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = p.read("trace.log").lines().count();
    assert!(before < 10, "killed too late: {before} steps");
    let run = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("resuming from its checkpoint"),
        "{}",
        run.stderr
    );
    let trace = p.read("trace.log");
    let executed_after = trace.lines().count() - before;
    assert!(
        executed_after <= 10 - before + 1,
        "resumed run redid finished steps:\n{trace}"
    );
    // The same output as an uninterrupted run.
    let expected: String = (0..10).map(|i| format!("{i}\n")).collect();
    assert_eq!(p.read("result.txt"), expected);
    assert_eq!(p.ok(&["verify"]).code, 0);
}

#[test]
fn twenty_kill_9s_at_random_moments_converge_to_the_uninterrupted_outputs() {
    let pipeline = format!(
        "{}\n{}",
        CHAIN.replace("    outs: [data/other.txt]", "    outs: [data/other.txt]\n  slow:\n    inputs: {train: split.train}\n    run: sleep 0.3; sort -r \"$PIPE_INPUT_TRAIN\" > data/sorted.jsonl\n    outs: [data/sorted.jsonl]"),
        CHECKPOINTED.replace("stages:\n", "").replace("cp \"$c/partial\" result.txt", "cp \"$c/partial\" result.txt; sleep 0.1")
    );
    // Reference: one uninterrupted run.
    let reference = Project::new();
    reference.file("p.yaml", &pipeline);
    let t0 = Instant::now();
    reference.ok(&["run", "p.yaml", "--no-progress"]);
    let full = t0.elapsed().as_secs_f64();

    let p = Project::new();
    p.file("p.yaml", &pipeline);
    let mut rng = Lcg(0x5eed);
    for _ in 0..20 {
        let mut child = p.spawn(&["run", "p.yaml", "--no-progress"]);
        sleep(Duration::from_secs_f64(rng.next_f64() * full * 0.6));
        let _ = child.kill();
        child.wait().unwrap();
    }
    p.ok(&["run", "p.yaml", "--no-progress"]);
    for f in [
        "data/all.jsonl",
        "data/count_train.txt",
        "data/count_val.txt",
        "data/count_test.txt",
        "data/other.txt",
        "data/sorted.jsonl",
        "result.txt",
    ] {
        assert_eq!(
            p.read(f),
            reference.read(f),
            "{f} differs after the kill loop"
        );
    }
    for out in ["split.train", "split.val", "split.test"] {
        let (a, b) = (
            p.join(&format!("{out}.exported")),
            reference.join(&format!("{out}.exported")),
        );
        p.ok(&["export", out, a.to_str().unwrap()]);
        reference.ok(&["export", out, b.to_str().unwrap()]);
        assert_eq!(
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            "{out} differs"
        );
    }
    let verify = p.ok(&["verify"]);
    assert!(
        verify.stdout.contains("store is clean"),
        "{}",
        verify.stdout
    );
    let again = p.ok(&["run", "p.yaml", "--no-progress"]);
    assert!(again.stdout.contains(" 0 ran,"), "{}", again.stdout);
}

#[test]
fn verify_quarantines_corrupt_objects_and_the_next_run_recomputes() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml"]);
    let show = p.ok(&["show", "split", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let path = v["outputs"]["train"]["path"].as_str().unwrap().to_owned();
    let full = p.join(&path);
    let mut perms = std::fs::metadata(&full).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&full, perms).unwrap();
    std::fs::write(&full, "tampered\n").unwrap();
    let out = p.pipe(&["verify"]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("1 corrupt"), "{}", out.stdout);
    assert!(
        out.stdout.contains("`split`") && out.stdout.contains("lacks outputs train"),
        "{}",
        out.stdout
    );
    let run = p.ok(&["run", "p.yaml"]);
    assert_eq!(run.status_of("split").as_deref(), Some("ran"));
    assert_eq!(
        run.status_of("count@train").as_deref(),
        Some("cached"),
        "same bytes, same key downstream"
    );
    assert!(p.ok(&["verify"]).stdout.contains("store is clean"));
}

#[test]
fn diff_names_param_changes_upstream_changes_metrics_and_records() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "--name", "base"]);
    p.ok(&[
        "run",
        "p.yaml",
        "--set",
        "split.with.seed=11",
        "--name",
        "seed11",
    ]);
    let out = p.ok(&["diff", "base", "seed11"]);
    assert!(
        out.stdout.contains("split        changed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("with.seed: 7 → 11") || out.stdout.contains("params.seed: 7 → 11"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("because upstream changed: split"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("make         same"), "{}", out.stdout);
    assert!(
        out.stdout.contains("output train: records"),
        "{}",
        out.stdout
    );
    // The same as JSON, and with one argument (compared with the run before it).
    let json = p.ok(&["diff", "seed11", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let split = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "split")
        .unwrap();
    assert_eq!(split["status"], "changed");
    let train = split["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["output"] == "train")
        .unwrap();
    let r = &train["records"];
    assert_eq!(
        r["added"], r["removed"],
        "a reseed moves records between splits: {r}"
    );
    assert!(r["added"].as_u64().unwrap() > 0);
}

#[test]
fn gc_keeps_named_runs_and_drops_the_rest() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "--name", "keep"]);
    p.ok(&["run", "p.yaml", "--set", "seed=1"]);
    p.ok(&["run", "p.yaml", "--set", "seed=2"]);
    let out = p.ok(&["gc", "--keep-last", "1"]);
    assert!(out.stdout.contains("deleted 1 runs"), "{}", out.stdout);
    // The named run's results are still cached; seed=1's split is gone.
    assert!(p.ok(&["run", "p.yaml"]).stdout.contains("0 ran"));
    let again = p.ok(&["run", "p.yaml", "--set", "seed=1"]);
    assert_eq!(again.status_of("split").as_deref(), Some("ran"));
    assert!(p.ok(&["verify"]).stdout.contains("store is clean"));
}

#[test]
fn runs_show_export_and_dag_formats() {
    let p = Project::new();
    p.file("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "--name", "first"]);
    let runs = p.ok(&["runs"]);
    assert!(
        runs.stdout.contains("first") && runs.stdout.contains("chain"),
        "{}",
        runs.stdout
    );
    let show = p.ok(&["show", "split"]);
    assert!(
        show.stdout.contains("metric    count.train = 48"),
        "{}",
        show.stdout
    );
    p.ok(&["export", "split.val", "val.jsonl"]);
    assert_eq!(p.read("val.jsonl").lines().count(), 6);
    let dot = p.ok(&["dag", "p.yaml", "--format", "dot"]);
    assert!(
        dot.stdout.contains("\"split\" -> \"count@train\";"),
        "{}",
        dot.stdout
    );
    let mermaid = p.ok(&["dag", "p.yaml", "--format", "mermaid"]);
    assert!(
        mermaid.stdout.contains("flowchart LR"),
        "{}",
        mermaid.stdout
    );
    let text = p.ok(&["dag", "p.yaml"]);
    assert!(
        text.stdout.contains("  split [split]  ← make"),
        "{}",
        text.stdout
    );
    let e = p.pipe(&["export", "split.trian", "x"]);
    assert_eq!(e.code, 2);
    assert!(
        e.stderr.contains("did you mean `split.train`?"),
        "{}",
        e.stderr
    );
}

#[test]
fn every_pipeline_in_the_repo_passes_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let p = Project::new();
            let out = p.pipe(&["check", path.to_str().unwrap()]);
            assert_eq!(out.code, 0, "{}: {}", path.display(), out.stderr);
            n += 1;
            // And with each of its profiles (the GPU recipes must stay valid too).
            let doc: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            if let Some(profiles) = doc.get("profiles").and_then(|v| v.as_mapping()) {
                for name in profiles.keys().filter_map(|k| k.as_str()) {
                    let out = p.pipe(&["check", path.to_str().unwrap(), "--profile", name]);
                    assert_eq!(
                        out.code,
                        0,
                        "{} --profile {name}: {}",
                        path.display(),
                        out.stderr
                    );
                }
            }
        }
    }
    assert!(n >= 1);
}

// ---- bad input: each error names its place, pinned to the exact text ----

fn check_error(yaml: &str, args: &[&str]) -> String {
    let p = Project::new();
    p.file("p.yaml", yaml);
    let mut all = vec!["check", "p.yaml"];
    all.extend_from_slice(args);
    let out = p.pipe(&all);
    assert_eq!(
        out.code, 2,
        "expected a validation error\nstdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    out.stderr
}

const SPLIT_OK: &str = "stages:\n  make:\n    run: echo '{}' > a.jsonl\n    outs: [a.jsonl]\n  split:\n    uses: split\n    inputs: {records: make.a}\n    with: {ratios: {train: 0.5, test: 0.5}}\n";

#[test]
fn error_unknown_top_level_key() {
    assert_eq!(
        check_error("name: x\nstagez: {}\n", &[]),
        "error: p.yaml:2:1: unknown key `stagez` at the top level; expected one of `name`, `description`, `workdir`, `params`, `profiles`, `stages`, `tracking`\n  help: did you mean `stages`?\nerror: p.yaml:1:1: missing `stages:`; a pipeline needs at least one stage\n"
    );
}

#[test]
fn error_unknown_stage_key() {
    assert_eq!(
        check_error("stages:\n  a:\n    use: split\n", &[]),
        "error: p.yaml:3:5: unknown key `use` in stage `a`; expected one of `uses`, `run`, `with`, `inputs`, `deps`, `outs`, `env`, `needs`, `resources`, `foreach`, `matrix`, `desc`\n  help: did you mean `uses`?\n"
    );
}

#[test]
fn error_unknown_stage_kind() {
    assert_eq!(
        check_error("stages:\n  a:\n    uses: splt\n", &[]),
        "error: p.yaml:3:11: unknown stage kind `splt`; built-in kinds are `batch_label`, `build_data`, `calibrate`, `dot_check`, `dot_pairs`, `evaluate`, `generate`, `head_eval`, `head_train`, `merge`, `prefs_generate`, `prefs_judge`, `reward_train`, `sft`, `split`, `tag_confidence`, `validate`\n  help: did you mean `split`?\n"
    );
}

#[test]
fn error_dangling_output_reference() {
    let yaml = SPLIT_OK.to_owned()
        + "  use:\n    run: cat $PIPE_INPUT_X > b\n    inputs: {x: split.trian}\n    outs: [b]\n";
    assert_eq!(
        check_error(&yaml, &[]),
        "error: p.yaml:11:17: stage `use` refers to `split.trian`, but `split` has outputs `test`, `train`\n  help: did you mean `split.train`?\n"
    );
}

#[test]
fn error_reference_to_missing_stage() {
    let yaml = SPLIT_OK.to_owned()
        + "  use:\n    run: cat ${stages.splt.outputs.train} > b\n    outs: [b]\n";
    assert_eq!(
        check_error(&yaml, &[]),
        "error: p.yaml:10:10: `${stages.splt.outputs.train}`: no stage named `splt`\n  help: did you mean `split`?\n"
    );
}

#[test]
fn error_undefined_param() {
    let yaml =
        "params:\n  seed: 1\nstages:\n  a:\n    run: echo ${params.sed} > a\n    outs: [a]\n";
    assert_eq!(
        check_error(yaml, &[]),
        "error: p.yaml:5:10: undefined `params.sed`: `params` has `seed`\n  help: did you mean `seed`?\n"
    );
}

#[test]
fn error_unknown_field_in_typed_params() {
    let yaml = SPLIT_OK.replace("with: {ratios:", "with: {seeed: 3, ratios:");
    assert_eq!(
        check_error(&yaml, &[]),
        "error: p.yaml:8:12: stage `split` (split): unknown field `seeed`, expected one of `ratios`, `stratify`, `seed`, `id_field`, `text_field`\n  help: did you mean `seed`?\n"
    );
}

#[test]
fn error_bad_value_in_typed_params() {
    let yaml = SPLIT_OK.replace("train: 0.5", "train: 0.7");
    assert_eq!(
        check_error(&yaml, &[]),
        "error: p.yaml:8:20: stage `split` (split), field `ratios`: fractions must sum to 1, they sum to 1.2\n"
    );
}

#[test]
fn error_missing_required_input() {
    let yaml = "stages:\n  split:\n    uses: split\n    with: {ratios: {a: 1.0}}\n";
    assert_eq!(
        check_error(yaml, &[]),
        "error: p.yaml:2:3: stage `split` (split) needs input `records`; add `inputs: {records: STAGE.OUTPUT}`\n"
    );
}

#[test]
fn error_cycle_is_printed() {
    let yaml = "stages:\n  a:\n    run: cat $PIPE_INPUT_X > a\n    inputs: {x: c.c}\n    outs: [a]\n  b:\n    run: cat $PIPE_INPUT_X > b\n    inputs: {x: a.a}\n    outs: [b]\n  c:\n    run: cat $PIPE_INPUT_X > c\n    inputs: {x: b.b}\n    outs: [c]\n";
    assert_eq!(
        check_error(yaml, &[]),
        "error: p.yaml:2:3: stages form a cycle: a → b → c → a\n  help: a stage cannot depend, directly or through others, on its own outputs\n"
    );
}

#[test]
fn error_yaml_syntax() {
    assert_eq!(
        check_error("stages:\n  a: [1, 2\n", &[]),
        "error: p.yaml:3:1: invalid YAML: did not find expected ',' or ']'\n"
    );
}

#[test]
fn error_unknown_set_param() {
    assert_eq!(
        check_error("params: {seed: 1}\nstages:\n  a: {run: echo > a, outs: [a]}\n", &["--set", "sede=2"]),
        "error: --set sede=2: `sede` is neither a declared param nor a stage; params here are `seed`\n  help: did you mean `seed`?\n"
    );
}

#[test]
fn error_unknown_profile_and_selection() {
    let yaml =
        "profiles: {cpu: {params: {}}}\nparams: {}\nstages:\n  a: {run: echo > a, outs: [a]}\n";
    assert_eq!(
        check_error(yaml, &["--profile", "cpuu"]),
        "error: --profile cpuu: unknown profile `cpuu`; the pipeline defines `cpu`\n  help: did you mean `cpu`?\n"
    );
    let p = Project::new();
    p.file("p.yaml", yaml);
    let out = p.pipe(&["run", "p.yaml", "--only", "b"]);
    assert_eq!(out.code, 2);
    assert_eq!(out.stderr, "error: --only b: no stage named `b` in `p`\n");
}

#[test]
fn error_run_and_uses_fields_mixed() {
    assert_eq!(
        check_error("stages:\n  a:\n    run: echo > a\n    with: {x: 1}\n    outs: [a]\n", &[]),
        "error: p.yaml:4:11: `with` belongs to `uses:` stages; a `run:` stage takes `deps`, `outs` and `env`\n"
    );
}

#[test]
fn profiles_params_files_and_matrix() {
    let p = Project::new();
    p.file(
        "p.yaml",
        r#"
params: {n: 3, tag: base}
profiles:
  small:
    params: {n: 1}
    stages:
      grid.matrix: {x: [1, 2]}
stages:
  grid:
    matrix: {x: [1, 2, 3], y: [a]}
    run: echo ${item.x}${item.y}-${params.n}-${params.tag} > out_${item.x}${item.y}.txt
    outs: ["out_${item.x}${item.y}.txt"]
"#,
    )
    .file("override.yaml", "tag: custom\n");
    let out = p.ok(&["run", "p.yaml", "--profile", "small", "-p", "override.yaml"]);
    assert_eq!(
        out.status_of("grid@1-a").as_deref(),
        Some("ran"),
        "{}",
        out.stdout
    );
    assert_eq!(out.status_of("grid@3-a"), None, "{}", out.stdout);
    assert_eq!(p.read("out_2a.txt"), "2a-1-custom\n");
    let bad = p.pipe(&["check", "p.yaml", "-p", "missing.yaml"]);
    assert_eq!(bad.code, 2);
    p.file("bad.yaml", "tga: x\n");
    let bad = p.pipe(&["check", "p.yaml", "-p", "bad.yaml"]);
    assert_eq!(bad.stderr, "error: bad.yaml:1:1: unknown param `tga`; the pipeline declares `n`, `tag`\n  help: did you mean `tag`?\n");
}

#[test]
fn a_failing_stage_keeps_finished_work_and_skips_its_descendants() {
    let p = Project::new();
    p.file(
        "p.yaml",
        "stages:\n  good:\n    run: echo ok > good.txt\n    outs: [good.txt]\n  bad:\n    run: echo 'about to fail'; exit 3\n    outs: [bad.txt]\n  after:\n    inputs: {x: bad.bad}\n    run: cat $PIPE_INPUT_X > after.txt\n    outs: [after.txt]\n",
    );
    let out = p.pipe(&["run", "p.yaml"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.status_of("good").as_deref(), Some("ran"));
    assert_eq!(out.status_of("bad").as_deref(), Some("failed"));
    assert_eq!(out.status_of("after").as_deref(), Some("skipped"));
    assert!(
        out.stderr.contains("command exited with exit status: 3"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("| about to fail"), "{}", out.stderr);
    let again = p.pipe(&["run", "p.yaml"]);
    assert_eq!(again.status_of("good").as_deref(), Some("cached"));
}

#[test]
fn a_dep_on_another_stages_out_orders_the_stages() {
    let p = Project::new();
    p.file(
        "p.yaml",
        "stages:\n  second:\n    run: cat first.txt first.txt > second.txt\n    deps: [first.txt]\n    outs: [second.txt]\n  first:\n    run: echo one > first.txt\n    outs: [first.txt]\n",
    );
    p.ok(&["run", "p.yaml"]);
    assert_eq!(p.read("second.txt"), "one\none\n");
    let dag = p.ok(&["dag", "p.yaml"]);
    assert!(
        dag.stdout.contains("second [command]  ← first"),
        "{}",
        dag.stdout
    );
    // Changing the producer reruns the consumer through its dep digest.
    let run = p.ok(&["run", "p.yaml", "--set", "first.run=echo two > first.txt"]);
    assert_eq!(run.status_of("second").as_deref(), Some("ran"));
    assert_eq!(p.read("second.txt"), "two\ntwo\n");
}

#[test]
fn ctrl_c_stops_cleanly_keeps_the_checkpoint_and_says_how_to_resume() {
    let p = Project::new();
    p.file("p.yaml", CHECKPOINTED);
    let child = p
        .command(&["run", "p.yaml", "--no-progress"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(p.join("trace.log"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(Instant::now() < deadline, "the stage never progressed");
        sleep(Duration::from_millis(20));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("run `pipe run p.yaml` (same options) to resume"),
        "{stderr}"
    );
    let done = p.read("trace.log").lines().count();
    assert!(done < 10);
    let run = p.ok(&["run", "p.yaml", "--no-progress"]);
    assert!(
        run.stderr.contains("resuming from its checkpoint"),
        "{}",
        run.stderr
    );
    let expected: String = (0..10).map(|i| format!("{i}\n")).collect();
    assert_eq!(p.read("result.txt"), expected);
    let runs = p.ok(&["runs"]);
    assert!(runs.stdout.contains("interrupted"), "{}", runs.stdout);
}

const TINY_SFT: &str = r#"
name: tiny-sft
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
      lora: {r: 4, alpha: 8, dropout: 0.1, target_modules: all-linear}
      optimizer: {lr: 0.01}
      schedule: {warmup_steps: 1, decay: cosine}
      steps: 6
      batch_size: 2
      eval_every: 3
      save_every: 2
  gen:
    uses: generate
    inputs: {prompts: data.train, adapter: sft.adapter}
    with: {model: "tiny:llama:3", max_new_tokens: 5, batch_size: 3, temperature: 0.7, top_p: 0.9, seed: 4}
  merge:
    uses: merge
    inputs: {adapter: sft.adapter}
    with: {model: "tiny:llama:3"}
"#;

#[test]
fn sft_writes_a_peft_adapter_and_generate_uses_it() {
    let p = Project::new();
    p.file("p.yaml", TINY_SFT).file("qa.jsonl", &qa_lines(7));
    let run = p.ok(&["run", "p.yaml", "--no-progress"]);
    assert_eq!(
        run.status_of("sft").as_deref(),
        Some("ran"),
        "{}",
        run.stdout
    );
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
    let adapter = p.join(show["outputs"]["adapter"]["path"].as_str().unwrap());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let st = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let text = String::from_utf8_lossy(&st[..4096.min(st.len())]).to_string();
    assert!(text.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let metrics = p.join(show["outputs"]["metrics"]["path"].as_str().unwrap());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[2]["eval_loss"].is_f64() && lines[5]["eval_loss"].is_f64());
    let png = std::fs::read(p.join(show["outputs"]["curve"]["path"].as_str().unwrap())).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let m = &show["metrics"];
    assert!(
        m["best_eval_loss"].as_f64().unwrap() < m["initial_eval_loss"].as_f64().unwrap(),
        "{m}"
    );

    let gen: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "gen", "--json"]).stdout).unwrap();
    let out =
        std::fs::read_to_string(p.join(gen["outputs"]["generations"]["path"].as_str().unwrap()))
            .unwrap();
    let recs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 7);
    assert!(recs
        .iter()
        .all(|r| r["generation"].is_string() && r["new_tokens"].as_u64().unwrap() <= 5));
    assert_eq!(recs[3]["prompt"], "3+1=");

    let merged: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "merge", "--json"]).stdout).unwrap();
    let dir = p.join(merged["outputs"]["model"]["path"].as_str().unwrap());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).is_file(), "merged model lacks {f}");
    }
    assert_eq!(merged["metrics"]["merged_tensors"], 14);

    let again = p.ok(&["run", "p.yaml", "--no-progress"]);
    assert_eq!(again.status_of("sft").as_deref(), Some("cached"));
    assert_eq!(again.status_of("gen").as_deref(), Some("cached"));
}

#[test]
fn sft_params_are_checked_with_their_field_path() {
    let p = Project::new();
    p.file("p.yaml", &TINY_SFT.replace("lora: {r: 4,", "lora: {r: 0,"))
        .file("qa.jsonl", &qa_lines(3));
    let out = p.pipe(&["check", "p.yaml"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("lora.r must be at least 1"),
        "{}",
        out.stderr
    );
    p.file("p.yaml", &TINY_SFT.replace("steps: 6", "stepz: 6"));
    let out = p.pipe(&["check", "p.yaml"]);
    assert!(
        out.stderr.contains("stepz") && out.stderr.contains("steps"),
        "{}",
        out.stderr
    );
    // An unknown storage for the base, and `keep` on a model that is not a GGUF file.
    p.file(
        "p.yaml",
        &TINY_SFT.replace("steps: 6", "steps: 6\n      quantize: nf5"),
    );
    let out = p.pipe(&["check", "p.yaml"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("sft")
            && out.stderr.contains("quantize")
            && out.stderr.contains("nf5")
            && out.stderr.contains("keep"),
        "{}",
        out.stderr
    );
    p.file(
        "p.yaml",
        &TINY_SFT.replace("steps: 6", "steps: 6\n      quantize: keep"),
    );
    let out = p.pipe(&["check", "p.yaml"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("sft")
            && out.stderr.contains("with.quantize")
            && out.stderr.contains("not a .gguf file"),
        "{}",
        out.stderr
    );
}

/// Runs a repo pipeline with its `smoke` profile and checks that all four stages ran;
/// returns the project and the `sft` record.
fn run_smoke(file: &str) -> (Project, serde_json::Value) {
    let pipeline = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let p = Project::new();
    let out = p.ok(&[
        "run",
        pipeline.to_str().unwrap(),
        "--profile",
        "smoke",
        "--no-progress",
    ]);
    for stage in ["data", "split", "sft", "answer"] {
        assert_eq!(
            out.status_of(stage).as_deref(),
            Some("ran"),
            "{}",
            out.stdout
        );
    }
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
    assert_eq!(show["metrics"]["steps"], 4);
    (p, show)
}

#[test]
fn smollm2_pipeline_runs_end_to_end_with_the_smoke_profile() {
    let (_, show) = run_smoke("pipelines/smollm2_sft.yaml");
    assert_eq!(show["metrics"]["train_examples"], 32);
}

#[test]
fn qlora_pipeline_runs_end_to_end_on_an_nf4_base_with_the_smoke_profile() {
    let (p, show) = run_smoke("pipelines/smollm2_qlora.yaml");
    let pipeline =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/smollm2_qlora.yaml");
    let log = std::fs::read_to_string(p.join(show["log"].as_str().unwrap())).unwrap();
    assert!(
        log.contains("packed as Nf4 (double quantization)"),
        "the sft log says how the base is stored:\n{log}"
    );
    // The same pipeline on a dense base is a different computation: another key.
    let dense = p.ok(&[
        "status",
        pipeline.to_str().unwrap(),
        "--profile",
        "smoke",
        "--set",
        "quantize=none",
    ]);
    assert!(
        dense.stdout.lines().any(|l| l.starts_with("sft")
            && l.contains("will run")
            && l.contains("param quantize: \"nf4\" → \"none\"")),
        "status names the changed param:\n{}",
        dense.stdout
    );
}

#[test]
fn generate_resumes_after_the_last_complete_batch_in_its_checkpoint() {
    let p = Project::new();
    p.file(
        "p.yaml",
        "stages:\n  data:\n    run: cp qa.jsonl out/train.jsonl\n    deps: [qa.jsonl]\n    outs: [out/train.jsonl]\n  gen:\n    uses: generate\n    inputs: {prompts: data.train}\n    with: {model: \"tiny:llama:3\", max_new_tokens: 3, batch_size: 2}\n",
    )
    .file("qa.jsonl", &qa_lines(7));
    p.ok(&["run", "p.yaml", "--only", "data", "--no-progress"]);
    let status: serde_json::Value =
        serde_json::from_str(&p.ok(&["status", "p.yaml", "--json"]).stdout).unwrap();
    let key = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "gen")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // What an interrupted run leaves: two finished records and a torn third line.
    let done = "{\"prompt\":\"0+1=\",\"generation\":\"FROM-CHECKPOINT\"}\n{\"prompt\":\"1+1=\",\"generation\":\"FROM-CHECKPOINT\"}\n{\"prompt\":\"2+";
    p.file(
        &format!("cache/checkpoints/{key}/generations.partial.jsonl"),
        done,
    );
    p.ok(&["run", "p.yaml", "--no-progress"]);
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "gen", "--json"]).stdout).unwrap();
    assert_eq!(show["metrics"]["resumed_after"], 2);
    let out =
        std::fs::read_to_string(p.join(show["outputs"]["generations"]["path"].as_str().unwrap()))
            .unwrap();
    let recs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 7);
    assert_eq!(recs[1]["generation"], "FROM-CHECKPOINT");
    assert_eq!(recs[2]["prompt"], "2+1=");
    assert_ne!(recs[2]["generation"], "FROM-CHECKPOINT");
    assert!(
        !p.join(&format!("cache/checkpoints/{key}")).exists(),
        "checkpoint removed after the record"
    );
}

#[test]
fn build_data_reads_every_format_with_rejects_and_clean_negatives() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pipeline = root.join("pipelines/data.yaml");
    let p = Project::new();
    p.ok(&["run", pipeline.to_str().unwrap(), "--no-progress"]);
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "build_data", "--json"]).stdout).unwrap();
    let m = &show["metrics"];
    assert_eq!(
        (m["records"].as_u64(), m["rejects"].as_u64()),
        (Some(9), Some(4)),
        "{m}"
    );
    let rejects =
        std::fs::read_to_string(p.join(show["outputs"]["rejects"]["path"].as_str().unwrap()))
            .unwrap();
    let at: Vec<String> = rejects
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["at"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        at,
        [
            "examples/data/raw/hotpot_dev_distractor.json:10",
            "examples/data/raw/fever_dev.jsonl:4",
            "examples/data/raw/NQ-open.dev.jsonl:3",
            "examples/data/raw/popQA.tsv:4"
        ]
    );
    let records =
        std::fs::read_to_string(p.join(show["outputs"]["records"]["path"].as_str().unwrap()))
            .unwrap();
    let mut negatives = 0;
    for line in records.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        if r["source"] == "fever" {
            continue;
        }
        let answers: Vec<String> = r["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| pipe_stages::data::split::normalize(a.as_str().unwrap()))
            .collect();
        for n in r["negatives"].as_array().unwrap() {
            let chunk = r["evidence"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["id"] == *n)
                .unwrap();
            let text = format!(
                " {} {} ",
                pipe_stages::data::split::normalize(chunk["title"].as_str().unwrap()),
                pipe_stages::data::split::normalize(chunk["text"].as_str().unwrap())
            );
            for a in &answers {
                assert!(
                    !text.contains(&format!(" {a} ")),
                    "negative {n} contains `{a}`"
                );
            }
            negatives += 1;
        }
    }
    assert!(negatives >= 10, "{negatives}");
    // NQ-Open has no evidence of its own: retrieval supplies a supporting passage.
    let nq: serde_json::Value =
        serde_json::from_str(records.lines().find(|l| l.contains("goldberg")).unwrap()).unwrap();
    assert_eq!(nq["support"], serde_json::json!(["w3"]));
}

#[test]
fn parquet_sources_and_records_read_like_their_jsonl() {
    // Fixtures from scripts/reference/make_parquet_fixtures.py (pyarrow): the bundled
    // NQ-Open dev file as snappy Parquet, and records with list and struct columns as
    // zstd Parquet in two row groups next to their JSONL.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fx = root.join("tests/fixtures/parquet");
    let p = Project::new();
    for f in ["nq_open.parquet", "generic.parquet", "generic.jsonl"] {
        std::fs::copy(fx.join(f), p.join(f)).unwrap();
    }
    std::fs::copy(
        root.join("examples/data/raw/NQ-open.dev.jsonl"),
        p.join("nq.jsonl"),
    )
    .unwrap();
    let stage = |name: &str, source: &str| {
        format!("  {name}:\n    uses: build_data\n    with:\n      sources: [{source}]\n      max_reject_rate: 0.5\n")
    };
    let generic = |path: &str| {
        format!("{{format: jsonl, name: g, path: {path}, fields: {{id: qid, question: q, answers: golds}}}}")
    };
    p.file(
        "p.yaml",
        &format!(
            "stages:\n{}{}{}{}  split:\n    uses: split\n    inputs: {{records: data.data}}\n    with: {{ratios: {{train: 0.5, val: 0.5}}}}\n  data:\n    run: cp generic.parquet data.parquet\n    deps: [generic.parquet]\n    outs: [data.parquet]\n",
            stage("nq_jsonl", "{format: nq_open, path: nq.jsonl}"),
            stage("nq_parquet", "{format: nq_open, path: nq_open.parquet}"),
            stage("g_jsonl", &generic("generic.jsonl")),
            stage("g_parquet", &generic("generic.parquet")),
        ),
    );
    p.ok(&["run", "p.yaml", "--no-progress"]);
    let output = |stage: &str, out: &str| {
        let show: serde_json::Value =
            serde_json::from_str(&p.ok(&["show", stage, "--json"]).stdout).unwrap();
        std::fs::read_to_string(p.join(show["outputs"][out]["path"].as_str().unwrap())).unwrap()
    };
    let nq = output("nq_jsonl", "records");
    assert_eq!(nq.lines().count(), 2, "{nq}");
    assert_eq!(output("nq_parquet", "records"), nq);
    // The same record is rejected for the same reason (a null cell is a missing field).
    let reason = |r: &str| -> Vec<String> {
        r.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"].to_string())
            .collect()
    };
    assert_eq!(
        reason(&output("nq_parquet", "rejects")),
        reason(&output("nq_jsonl", "rejects"))
    );
    assert_eq!(output("g_parquet", "records"), output("g_jsonl", "records"));
    // Stages that take records read Parquet too: struct and list columns come through.
    let split = output("split", "train") + &output("split", "val");
    let rows: Vec<serde_json::Value> = split
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let g0 = rows.iter().find(|r| r["qid"] == "g0").unwrap();
    assert_eq!(g0["meta"]["n_answers"], 3);
    assert_eq!(g0["golds"][1], "J. S. Bach");
}

/// Puts `file` into a fake Hugging Face hub cache as `rel` in dataset `id` at `revision`.
fn cache_dataset(
    hub: &std::path::Path,
    id: &str,
    revision: &str,
    commit: &str,
    rel: &str,
    file: &std::path::Path,
) {
    let base = hub.join(format!("datasets--{}", id.replace('/', "--")));
    let refs = base.join("refs").join(revision);
    std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
    std::fs::write(refs, commit).unwrap();
    let dest = base.join("snapshots").join(commit).join(rel);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(file, dest).unwrap();
}

#[test]
fn hf_dataset_sources_read_from_the_hub_cache_like_the_official_files() {
    // The HF Parquet of HotpotQA (struct columns of lists) and of PopQA (written by
    // scripts/reference/make_parquet_fixtures.py from the bundled official files), in a hub
    // cache laid out as huggingface_hub lays it out; offline.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fx = root.join("tests/fixtures/parquet");
    let p = Project::new();
    let hub = p.join("hub");
    let c1 = "1111111111111111111111111111111111111111";
    cache_dataset(
        &hub,
        "hotpotqa/hotpot_qa",
        "main",
        c1,
        "distractor/validation-00000-of-00001.parquet",
        &fx.join("hotpot_hf.parquet"),
    );
    cache_dataset(
        &hub,
        "akariasai/PopQA",
        "refs/convert/parquet",
        c1,
        "default/test/0000.parquet",
        &fx.join("popqa_hf.parquet"),
    );
    for f in ["hotpot_dev_distractor.json", "popQA.tsv"] {
        std::fs::copy(root.join("examples/data/raw").join(f), p.join(f)).unwrap();
    }
    let stage = |name: &str, source: &str| {
        format!("  {name}:\n    uses: build_data\n    with:\n      sources: [{source}]\n      max_reject_rate: 0.5\n")
    };
    p.file(
        "p.yaml",
        &format!(
            "stages:\n{}{}{}{}",
            stage(
                "hot_file",
                "{format: hotpotqa, path: hotpot_dev_distractor.json}"
            ),
            stage(
                "hot_hf",
                "{format: hotpotqa, hf: hotpotqa/hotpot_qa, config: distractor, split: validation}"
            ),
            stage("pop_file", "{format: popqa, path: popQA.tsv}"),
            stage(
                "pop_hf",
                "{format: popqa, hf: akariasai/PopQA, split: test, revision: refs/convert/parquet}"
            ),
        ),
    );
    let run = |args: &[&str]| {
        let out = p
            .command(args)
            .env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["run", "p.yaml", "--no-progress"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let output = |stage: &str| {
        let show: serde_json::Value =
            serde_json::from_str(&p.ok(&["show", stage, "--json"]).stdout).unwrap();
        std::fs::read_to_string(p.join(show["outputs"]["records"]["path"].as_str().unwrap()))
            .unwrap()
    };
    let hot = output("hot_file");
    assert_eq!(hot.lines().count(), 2, "{hot}");
    assert_eq!(output("hot_hf"), hot);
    let pop = output("pop_file");
    assert_eq!(pop.lines().count(), 2, "{pop}");
    assert_eq!(output("pop_hf"), pop);

    // A new snapshot in the cache reruns the stage reading it, and only that one.
    let c2 = "2222222222222222222222222222222222222222";
    cache_dataset(
        &hub,
        "hotpotqa/hotpot_qa",
        "main",
        c2,
        "distractor/validation-00000-of-00001.parquet",
        &fx.join("hotpot_hf.parquet"),
    );
    let (_, status, _) = run(&["status", "p.yaml"]);
    let line = |stage: &str| {
        status
            .lines()
            .find(|l| l.starts_with(stage))
            .unwrap_or("")
            .to_string()
    };
    assert!(line("hot_hf ").contains("will run"), "{status}");
    assert!(line("pop_hf ").contains("cached"), "{status}");

    // Absent offline: one error saying how to provide it.
    p.file(
        "absent.yaml",
        &format!(
            "stages:\n{}",
            stage(
                "gone",
                "{format: hotpotqa, hf: someone/absent, config: distractor, split: validation}"
            )
        ),
    );
    let (code, _, stderr) = run(&["run", "absent.yaml", "--no-progress"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("dataset `someone/absent` (config distractor, split validation, revision main) is not in the Hugging Face cache")
            && stderr.contains("HF_HUB_OFFLINE is set")
            && stderr.contains("huggingface-cli download someone/absent --repo-type dataset"),
        "{stderr}"
    );
    // A source with both or neither of path/hf, or hf without a split, is refused at check.
    p.file(
        "bad.yaml",
        &format!(
            "stages:\n{}",
            stage("b", "{format: hotpotqa, hf: hotpotqa/hotpot_qa}")
        ),
    );
    let out = p.pipe(&["check", "bad.yaml"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("needs `split:`"), "{}", out.stderr);
}

#[test]
fn build_data_enforces_pins_and_the_reject_rate() {
    let p = Project::new();
    p.file(
        "nq.jsonl",
        "{\"question\": \"q\", \"answer\": [\"a\"]}\n{\"question\": \"broken\"}\n",
    );
    let yaml = |extra: &str| {
        format!("stages:\n  build_data:\n    uses: build_data\n    with:\n      sources: [{{format: nq_open, path: nq.jsonl{extra}}}]\n      max_reject_rate: 0.6\n")
    };
    p.file("p.yaml", &yaml(&format!(", sha256: {}", "0".repeat(64))));
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("the file changed")
            && out.stderr.contains("accept_changed_sources=true"),
        "{}",
        out.stderr
    );
    p.ok(&[
        "run",
        "p.yaml",
        "--no-progress",
        "--set",
        "build_data.with.accept_changed_sources=true",
    ]);
    p.file("p.yaml", &yaml("").replace("0.6", "0.1"));
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert!(
        out.stderr.contains("1 of 2 records rejected (50.0%)")
            && out.stderr.contains("nq.jsonl:2: missing `answer`"),
        "{}",
        out.stderr
    );
    // A TSV under a JSONL format: one clear error instead of a reject per line.
    p.file("nq.jsonl", "id\tquestion\n1\twho?\n2\twhat?\n");
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert!(
        out.stderr
            .contains("sources[0] nq.jsonl: not a `nq_open` file: none of its 3 rows is JSON"),
        "{}",
        out.stderr
    );
    // JSON rows of another dataset under `format: popqa`: one error with the reason.
    p.file(
        "nq.jsonl",
        "{\"question\": \"q\", \"answer\": [\"a\"]}\n{\"question\": \"r\", \"answer\": [\"b\"]}\n",
    );
    p.file("p.yaml", &yaml("").replace("nq_open", "popqa"));
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert!(
        out.stderr.contains(
            "sources[0] nq.jsonl: not a `popqa` file: none of its 2 rows is a `popqa` record (line 1: missing `id`)"
        ),
        "{}",
        out.stderr
    );
    p.file("p.yaml", &yaml("").replace("nq_open", "nq_opn"));
    let out = p.pipe(&["check", "p.yaml"]);
    assert!(
        out.stderr.contains("did you mean `nq_open`?"),
        "{}",
        out.stderr
    );
}

#[test]
fn dot_check_gives_each_record_a_verdict_with_the_errors_place() {
    let p = Project::new();
    let lines = [
        json_line("Sure:\n```dot\ndigraph G {\n  a -> b -> c\n}\n```"),
        json_line("The graph is digraph { a -> b; b -- c }"),
        json_line("graph { x -- y }"),
        json_line("I cannot draw that."),
    ];
    p.file("gens.jsonl", &lines.concat()).file(
        "p.yaml",
        r#"
name: dots
stages:
  data:
    run: cp gens.jsonl out/gens.jsonl
    deps: [gens.jsonl]
    outs: [out/gens.jsonl]
  check:
    uses: dot_check
    inputs: {records: data.gens}
    with: {field: text}
"#,
    );
    p.ok(&["run", "p.yaml", "--no-progress"]);
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "check", "--json"]).stdout).unwrap();
    assert_eq!(show["metrics"]["records"], 4);
    assert_eq!(show["metrics"]["valid"], 2);
    assert_eq!(show["metrics"]["no_dot"], 1);
    assert_eq!(show["metrics"]["validity_rate"], 0.5);
    let verdicts: Vec<serde_json::Value> =
        std::fs::read_to_string(p.join(show["outputs"]["verdicts"]["path"].as_str().unwrap()))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(verdicts[0]["dot_check"]["edges"], 2);
    let bad = &verdicts[1]["dot_check"];
    assert_eq!(
        (
            bad["valid"].as_bool(),
            bad["line"].as_u64(),
            bad["col"].as_u64()
        ),
        (Some(false), Some(1), Some(21))
    );
    assert!(bad["message"]
        .as_str()
        .unwrap()
        .contains("`--` in a directed graph"));
    assert_eq!(verdicts[3]["dot_check"]["found"], false);
    // A record without the field names its file and line.
    p.file("gens.jsonl", &(lines.concat() + "{\"other\": 1}\n"));
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr
            .contains(":5 (input `records`): expected a string field `text`"),
        "{}",
        out.stderr
    );
}

#[test]
fn dot_check_scores_against_references_and_compares_with_a_baseline() {
    let p = Project::new();
    let rec = |id: &str, text: &str, reference: &str| {
        serde_json::json!({"id": id, "generation": text, "reference": reference}).to_string() + "\n"
    };
    let reference = "```dot\ndigraph { a -> b -> c }\n```";
    // Tuned: 3 of 4 valid; item 1 matches the reference, item 2 has one of its two edges.
    let tuned = [
        rec("q1", "digraph { A -> B; B -> C }", reference),
        rec("q2", "digraph { a -> b; a -> c }", reference),
        rec("q3", "digraph { x -> y }", "graph { x -- y }"),
        rec("q4", "digraph { a -> }", reference),
    ];
    // Base: 1 of 4 valid.
    let base = [
        rec("q1", "no graph here", reference),
        rec("q2", "digraph { a -- b }", reference),
        rec("q3", "graph { x -- y }", "graph { x -- y }"),
        rec("q4", "digraph {", reference),
    ];
    p.file("tuned.jsonl", &tuned.concat())
        .file("base.jsonl", &base.concat())
        .file(
            "p.yaml",
            r#"
name: dots
stages:
  data:
    run: cp tuned.jsonl base.jsonl out/
    deps: [tuned.jsonl, base.jsonl]
    outs: [out/tuned.jsonl, out/base.jsonl]
  check:
    uses: dot_check
    inputs: {records: data.tuned, baseline: data.base}
    with: {field: generation, reference_field: reference}
"#,
        );
    p.ok(&["run", "p.yaml", "--no-progress"]);
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "check", "--json"]).stdout).unwrap();
    let m = &show["metrics"];
    let f = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{k}: {m}"));
    assert_eq!(f("validity_rate"), 0.75);
    assert_eq!(f("baseline_validity_rate"), 0.25);
    assert_eq!(f("validity_diff"), 0.5);
    // Pooled 4/8: variance 0.5·0.5·2/4 = 0.125; z = 0.5/√0.125.
    assert!((f("validity_z") - 0.5 / 0.125f64.sqrt()).abs() < 1e-12);
    assert!(f("validity_p") > 0.15 && f("validity_p") < 0.16, "{m}");
    assert_eq!(
        (
            f("both_valid"),
            f("only_records_valid"),
            f("only_baseline_valid")
        ),
        (1.0, 2.0, 0.0)
    );
    // Node F1: 1 (names canonicalised), 1, 1, 0 (invalid).
    assert_eq!(f("node_f1"), 0.75);
    // Edge F1: 1, 0.5 ({a→b, a→c} vs {a→b, b→c}), 1 (a directed reply to an
    // undirected reference is compared by connections: x→y is x—y), 0.
    assert_eq!(f("edge_f1"), 0.625);
    assert_eq!(f("baseline_node_f1"), 0.25);
    assert_eq!(f("baseline_edge_f1"), 0.25);
    // Items out of order are refused, naming both lines.
    p.file(
        "base.jsonl",
        &[
            base[1].clone(),
            base[0].clone(),
            base[2].clone(),
            base[3].clone(),
        ]
        .concat(),
    );
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(
            "record 1 of input `records` has id `q1` but record 1 of input `baseline` has `q2`"
        ),
        "{}",
        out.stderr
    );
}

fn json_line(text: &str) -> String {
    serde_json::json!({ "text": text }).to_string() + "\n"
}

/// `sft` with a DOT task evaluation and `keep_best`.
const DOT_SFT: &str = r#"
name: dot-sft
stages:
  data:
    run: cp pairs.jsonl out/train.jsonl
    deps: [pairs.jsonl]
    outs: [out/train.jsonl]
  sft:
    uses: sft
    inputs: {train: data.train, val: data.train}
    with:
      model: "tiny:llama:3"
      lora: {r: 4, alpha: 8, target_modules: all-linear}
      optimizer: {lr: 0.02}
      steps: 24
      batch_size: 2
      eval_every: 4
      save_every: 4
      eval_tasks: [dot]
      eval_decoding: {max_new_tokens: 12, temperature: 0.8, seed: 3, limit: 3}
      samples: 2
      keep_best: {edge_f1: max, eval_loss: min}
"#;

fn dot_pairs() -> String {
    (0..6)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Draw step {i} then step {}", i + 1),
                "response": format!("digraph {{ s{i} -> s{} }}", i + 1),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

fn stage_key(p: &Project, file: &str, stage: &str) -> String {
    let status: serde_json::Value =
        serde_json::from_str(&p.ok(&["status", file, "--json"]).stdout).unwrap();
    status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn sft_task_evaluation_keeps_the_best_adapters_and_resumes_after_kill_9() {
    let read_outputs = |p: &Project| {
        let show: serde_json::Value =
            serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
        let file = |out: &str, name: &str| {
            std::fs::read(
                p.join(show["outputs"][out]["path"].as_str().unwrap())
                    .join(name),
            )
            .unwrap()
        };
        let adapters: Vec<Vec<u8>> = ["final", "best_edge_f1", "best_eval_loss"]
            .iter()
            .map(|o| file(o, "adapter_model.safetensors"))
            .collect();
        let metrics: Vec<serde_json::Value> =
            std::fs::read_to_string(p.join(show["outputs"]["metrics"]["path"].as_str().unwrap()))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        (show["metrics"].clone(), adapters, metrics)
    };
    // Uninterrupted.
    let a = Project::new();
    a.file("p.yaml", DOT_SFT).file("pairs.jsonl", &dot_pairs());
    a.ok(&["run", "p.yaml", "--no-progress"]);
    let (m, adapters, lines) = read_outputs(&a);
    // Task metrics at every evaluation, samples with their verdicts, the model before training.
    let evals: Vec<u64> = lines
        .iter()
        .filter(|l| l["task"].is_object())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![4, 8, 12, 16, 20, 24]);
    for l in lines.iter().filter(|l| l["task"].is_object()) {
        for k in ["validity", "node_f1", "edge_f1"] {
            let v = l["task"][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{k} {v}");
        }
        let s = l["samples"].as_array().unwrap();
        assert_eq!(s.len(), 2);
        assert!(s[0]["generation"].is_string() && s[0]["verdict"]["dot_valid"].is_boolean());
    }
    assert!(
        m["initial_validity"].is_f64() && m["final_edge_f1"].is_f64(),
        "{m}"
    );
    // The kept step is the best evaluation's (ties: the first), eval loss included.
    let best_edge = m["kept_edge_f1"]["value"].as_f64().unwrap();
    let all_edge: Vec<f64> = std::iter::once(m["initial_edge_f1"].as_f64().unwrap())
        .chain(lines.iter().filter_map(|l| l["task"]["edge_f1"].as_f64()))
        .collect();
    assert_eq!(best_edge, all_edge.iter().cloned().fold(f64::MIN, f64::max));
    assert_eq!(m["kept_eval_loss"]["step"], m["best_step"]);
    assert_eq!(m["kept_eval_loss"]["value"], m["best_eval_loss"]);

    // Killed with SIGKILL after its first checkpoint, then rerun: the same adapters,
    // the same task metrics.
    let b = Project::new();
    b.file("p.yaml", DOT_SFT).file("pairs.jsonl", &dot_pairs());
    b.ok(&["run", "p.yaml", "--only", "data", "--no-progress"]);
    let key = stage_key(&b, "p.yaml", "sft");
    let latest = b.join(&format!("cache/checkpoints/{key}/LATEST"));
    let mut child = b.spawn(&["run", "p.yaml", "--no-progress"]);
    let t = Instant::now();
    while !latest.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        sleep(Duration::from_millis(5));
    }
    let at = std::fs::read_to_string(&latest).unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished before the kill"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(at.starts_with("step-"), "{at}");
    b.ok(&["run", "p.yaml", "--no-progress"]);
    let (m2, adapters2, lines2) = read_outputs(&b);
    assert!(m2["resumed_from_step"].as_u64().unwrap() >= 4, "{m2}");
    assert_eq!(
        adapters, adapters2,
        "kept and final adapters differ after the resume"
    );
    let tasks = |ls: &[serde_json::Value]| {
        ls.iter()
            .map(|l| (l["step"].clone(), l["loss"].clone(), l["task"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(tasks(&lines), tasks(&lines2));
    for k in [
        "kept_edge_f1",
        "kept_eval_loss",
        "initial_validity",
        "final_validity",
    ] {
        assert_eq!(m[k], m2[k], "{k}");
    }
}

#[test]
fn label_token_loss_rejects_responses_without_the_token_and_counts_them() {
    let p = Project::new();
    let mut lines: String = (0..6)
        .map(|i| {
            let t = if i % 2 == 0 { "<C_READ>" } else { "<U_READ>" };
            serde_json::json!({"prompt": format!("Is {i} even?"), "response": format!("yes {t}")})
                .to_string()
                + "\n"
        })
        .collect();
    lines.push_str("{\"prompt\": \"Is 7 even?\", \"response\": \"no\"}\n");
    p.file("qa.jsonl", &lines).file(
        "p.yaml",
        r#"
name: tokens
stages:
  data:
    run: cp qa.jsonl out/train.jsonl
    deps: [qa.jsonl]
    outs: [out/train.jsonl]
  sft:
    uses: sft
    inputs: {train: data.train}
    with:
      model: "tiny:qwen2:3"
      lora: {r: 4, alpha: 8}
      steps: 2
      batch_size: 2
      new_special_tokens: ["<C_READ>", "<U_READ>"]
      loss_mask: label-token
      loss_tokens: ["<C_READ>", "<U_READ>"]
"#,
    );
    let run = p.ok(&["run", "p.yaml", "--no-progress"]);
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
    assert_eq!(show["metrics"]["rejected_examples"], 1, "{}", run.stdout);
    assert_eq!(show["metrics"]["train_examples"], 6);
    let log = std::fs::read_to_string(p.join(show["log"].as_str().unwrap())).unwrap();
    assert!(
        log.contains(": record 7: rejected: the response holds none of the label tokens"),
        "{log}"
    );
    // Without loss_tokens, label-token is a parameter error that names the field.
    p.file(
        "p.yaml",
        &p.read("p.yaml")
            .replace("      loss_tokens: [\"<C_READ>\", \"<U_READ>\"]\n", ""),
    );
    let out = p.pipe(&["check", "p.yaml"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("loss_tokens"), "{}", out.stderr);
}

#[test]
fn sft_confidence_task_reports_accuracy_calibration_and_reliability_per_evaluation() {
    let p = Project::new();
    let mut lines = String::new();
    for i in 0..6 {
        let yes = i % 2 == 0;
        let t = if i % 3 == 0 { "<C_READ>" } else { "<U_READ>" };
        lines += &(serde_json::json!({
            "prompt": format!("Passage {i}. Is it so?"), "response": format!("{} {t}", if yes { "Yes" } else { "No" }),
            "dataset": "boolq", "answer": yes,
        })
        .to_string()
            + "\n");
    }
    for i in 0..4 {
        lines += &(serde_json::json!({
            "prompt": format!("Case {i}: A. aspirin B. warfarin C. rest"), "response": "B <C_MED>",
            "dataset": "medqa", "answer_idx": "B", "options": {"A": "aspirin", "B": "warfarin", "C": "rest"},
        })
        .to_string()
            + "\n");
    }
    let yaml = r#"
name: conf
stages:
  data:
    run: cp qa.jsonl out/train.jsonl
    deps: [qa.jsonl]
    outs: [out/train.jsonl]
  sft:
    uses: sft
    inputs: {train: data.train, val: data.train}
    with:
      model: "tiny:qwen2:3"
      lora: {r: 4, alpha: 8}
      steps: 4
      batch_size: 2
      eval_every: 2
      new_special_tokens: ["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"]
      loss_mask: label-token
      loss_tokens: ["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"]
      eval_tasks: [confidence]
      eval_decoding: {max_new_tokens: 6, seed: 1}
      confidence: {calib_beta: 4, calib_p_norm: "1"}
      keep_best: {accuracy: max, calibration_error: min}
"#;
    p.file("qa.jsonl", &lines).file("p.yaml", yaml);
    p.ok(&["run", "p.yaml", "--no-progress"]);
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
    let m = &show["metrics"];
    for k in [
        "final_accuracy",
        "final_calibration_error",
        "final_boolq_accuracy",
        "final_medqa_calibration_error",
        "final_debiased_calibration_error",
        "final_routing_auc",
        "final_answer_accuracy",
        "final_token_rate",
        "initial_accuracy",
    ] {
        let v = m[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {m}"));
        assert!((0.0..=1.0).contains(&v), "{k} {v}");
    }
    // Averaged over the two datasets.
    let mean = (m["final_boolq_accuracy"].as_f64().unwrap()
        + m["final_medqa_accuracy"].as_f64().unwrap())
        / 2.0;
    assert!((m["final_accuracy"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert!(m["kept_accuracy"]["step"].is_u64() && m["kept_calibration_error"]["value"].is_f64());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(p.join(show["outputs"]["metrics"]["path"].as_str().unwrap()))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    for fig in ["task_curve", "reliability", "routing"] {
        let png = std::fs::read(p.join(show["outputs"][fig]["path"].as_str().unwrap())).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{fig}");
    }
    let rel = &lines[1]["task_details"]["reliability"];
    assert_eq!(rel["confidence_scores"].as_array().unwrap().len(), 10);
    assert_eq!(rel["correctness"].as_array().unwrap().len(), 10);
    for s in rel["confidence_scores"].as_array().unwrap() {
        let v = s.as_f64().unwrap();
        assert!(v > 0.0 && v < 1.0, "{v}");
    }
    // Another LoRA rank: `pipe diff` names the param and shows the task metrics that
    // moved with their deltas (nested ones flattened into dotted names).
    p.ok(&[
        "run",
        "p.yaml",
        "--no-progress",
        "--set",
        "sft.with.lora.r=2",
    ]);
    let diff = p.ok(&["diff", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&diff.stdout).unwrap();
    let sft = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "sft")
        .unwrap();
    let moved: Vec<&serde_json::Value> = sft["metrics"].as_array().unwrap().iter().collect();
    let delta_of = |name: &str| {
        moved.iter().find(|m| m["name"] == name).map(|m| {
            (
                m["a"].as_f64().unwrap(),
                m["b"].as_f64().unwrap(),
                m["delta"].as_f64().unwrap(),
            )
        })
    };
    let (a, b, d) = delta_of("final_calibration_error")
        .unwrap_or_else(|| panic!("no calibration error delta: {}", sft["metrics"]));
    assert_eq!(a, m["final_calibration_error"].as_f64().unwrap());
    assert!((b - a - d).abs() < 1e-12 && d != 0.0);
    for m in &moved {
        assert!(
            !m["a"].is_object() && !m["b"].is_object(),
            "not flattened: {m}"
        );
    }
    // The initial evaluation (LoRA B = 0, whatever the rank) did not move: not listed.
    assert!(
        delta_of("initial_calibration_error").is_none(),
        "{}",
        sft["metrics"]
    );
    let text = p.ok(&["diff"]).stdout;
    assert!(text.contains("lora.r: 4 → 2"), "{text}");
    assert!(text.contains("metric final_calibration_error: "), "{text}");
    // A MedQA record whose gold letter is not an option: an error naming the record.
    p.file("qa.jsonl", &lines_with_bad_gold());
    let out = p.pipe(&["run", "p.yaml", "--no-progress"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("record 2: confidence task: the gold letter `F` is not among the options"),
        "{}",
        out.stderr
    );
}

fn lines_with_bad_gold() -> String {
    [
        serde_json::json!({"prompt": "Is it?", "response": "Yes <C_READ>", "dataset": "boolq", "answer": true}),
        serde_json::json!({"prompt": "Case: A. x B. y", "response": "A <U_MED>", "dataset": "medqa",
            "answer_idx": "F", "options": {"A": "x", "B": "y"}}),
    ]
    .iter()
    .map(|v| v.to_string() + "\n")
    .collect()
}

#[test]
fn tag_confidence_tags_base_answers_and_feeds_sft_with_the_same_prompts() {
    let p = Project::new();
    let medqa: String = (0..5)
        .map(|i| {
            serde_json::json!({"question": format!("Patient {i} has a fever. Which drug?"),
                "options": {"A": "aspirin", "B": "warfarin", "C": "rest", "D": "surgery"},
                "answer": "aspirin", "answer_idx": "A", "meta_info": "step1"})
            .to_string()
                + "\n"
        })
        .chain(std::iter::once(
            r#"{"question": "Bad", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}"#
                .to_string()
                + "\n",
        ))
        .collect();
    let boolq: String = (0..5)
        .map(|i| {
            serde_json::json!({"question": format!("is {i} a number"), "passage": "Numbers are numbers.",
                "answer": i % 2 == 0, "title": "Numbers"})
            .to_string()
                + "\n"
        })
        .chain(std::iter::once(
            r#"{"question": "is it", "passage": "p", "answer": "yes"}"#.to_string() + "\n",
        ))
        .collect();
    p.file("medqa.jsonl", &medqa)
        .file("boolq.jsonl", &boolq)
        .file(
            "p.yaml",
            r#"
name: tag
stages:
  data:
    run: cp medqa.jsonl out/medqa.jsonl && cp boolq.jsonl out/boolq.jsonl
    deps: [medqa.jsonl, boolq.jsonl]
    outs: [out/medqa.jsonl, out/boolq.jsonl]
  tag:
    uses: tag_confidence
    inputs: {medqa: data.medqa, boolq: data.boolq}
    with: {model: "tiny:qwen2:3", max_new_tokens: 4, batch_size: 4, keep_cut_answers: true}
  sft:
    uses: sft
    inputs: {train: tag.tagged, val: tag.tagged}
    with:
      model: "tiny:qwen2:3"
      lora: {r: 4, alpha: 8}
      steps: 2
      batch_size: 2
      new_special_tokens: ["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"]
      loss_mask: label-token
      loss_tokens: ["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"]
      eval_tasks: [confidence]
      eval_decoding: {max_new_tokens: 4}
      confidence: {calib_beta: 5}
"#,
        );
    p.ok(&["run", "p.yaml", "--no-progress"]);
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "tag", "--json"]).stdout).unwrap();
    let m = &show["metrics"];
    assert_eq!(m["rejects"], 2);
    assert_eq!(m["medqa_questions"], 5);
    assert_eq!(m["boolq_questions"], 5);
    // By default an answer the token budget cut is dropped and counted: every question
    // is either tagged or counted as cut (a 1-token budget cuts every answer that
    // does not end at once).
    let cut_run = p.ok(&[
        "run",
        "p.yaml",
        "--no-progress",
        "--until",
        "tag",
        "--set",
        "tag.with.keep_cut_answers=false",
        "--set",
        "tag.with.max_new_tokens=1",
    ]);
    assert!(cut_run.stdout.contains("ran"), "{}", cut_run.stdout);
    let cut_show: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "tag", "--json"]).stdout).unwrap();
    let cm = &cut_show["metrics"];
    let cut = cm["medqa_cut_answers_dropped"].as_u64().unwrap()
        + cm["boolq_cut_answers_dropped"].as_u64().unwrap();
    let kept =
        std::fs::read_to_string(p.join(cut_show["outputs"]["tagged"]["path"].as_str().unwrap()))
            .unwrap()
            .lines()
            .count() as u64;
    assert!(cut > 0, "{cm}");
    assert_eq!(cut + kept, 10, "{cm}");
    let tagged: Vec<serde_json::Value> =
        std::fs::read_to_string(p.join(show["outputs"]["tagged"]["path"].as_str().unwrap()))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(tagged.len(), 10);
    for t in &tagged {
        let r = t["tagged_response"].as_str().unwrap();
        let right = t["correct"].as_bool().unwrap();
        let want = match (t["dataset"].as_str().unwrap(), right) {
            ("boolq", true) => "<C_READ>",
            ("boolq", false) => "<U_READ>",
            (_, true) => "<C_MED>",
            (_, false) => "<U_MED>",
        };
        assert!(r.ends_with(want), "{t}");
        // The prompt keeps the options / the passage.
        let prompt = t["prompt"].as_str().unwrap();
        assert!(
            prompt.contains("A. aspirin") || prompt.contains("Numbers: Numbers are numbers."),
            "{prompt}"
        );
    }
    let rejects =
        std::fs::read_to_string(p.join(show["outputs"]["rejects"]["path"].as_str().unwrap()))
            .unwrap();
    let rejects: Vec<serde_json::Value> = rejects
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rejects[0]["input"], "medqa");
    assert!(rejects[0]["at"].as_str().unwrap().ends_with(":6"));
    assert!(rejects[0]["reason"]
        .as_str()
        .unwrap()
        .contains("`E` is not among the options"));
    assert_eq!(rejects[1]["input"], "boolq");
    assert!(rejects[1]["reason"]
        .as_str()
        .unwrap()
        .contains("must be a boolean"));
    let sft: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "sft", "--json"]).stdout).unwrap();
    assert_eq!(sft["metrics"]["train_examples"], 10);
    assert!(
        sft["metrics"]["final_accuracy"].is_f64(),
        "{}",
        sft["metrics"]
    );
}
