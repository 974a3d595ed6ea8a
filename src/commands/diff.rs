//! `pipe diff [A B]`: what differs between two runs, stage by stage: same or changed key,
//! which params changed (old → new) or that only upstream changed, metric deltas, and for
//! JSONL outputs the records added, removed and changed (by an id field), with examples.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::cli::DiffArgs;
use crate::digest::ArtifactKind;
use crate::fingerprint::{canonical_json, explain};
use crate::store::{RunRecord, StageRecord, Store};

use super::{short, UsageError};

#[derive(Debug, Serialize)]
struct Report {
    a: RunRef,
    b: RunRef,
    params: Vec<String>,
    stages: Vec<StageDiff>,
}

#[derive(Debug, Serialize)]
struct RunRef {
    id: String,
    name: Option<String>,
    profile: Option<String>,
}

#[derive(Debug, Serialize)]
struct StageDiff {
    stage: String,
    /// same, changed, added, removed
    status: &'static str,
    key_a: Option<String>,
    key_b: Option<String>,
    /// Changes of the stage's own params, kind version or deps.
    changes: Vec<String>,
    /// Upstream stages whose outputs changed this stage's inputs.
    upstream: Vec<String>,
    metrics: Vec<MetricDelta>,
    outputs: Vec<OutputDiff>,
}

#[derive(Debug, Serialize)]
struct MetricDelta {
    name: String,
    a: Option<Value>,
    b: Option<Value>,
    delta: Option<f64>,
}

#[derive(Debug, Serialize)]
struct OutputDiff {
    output: String,
    digest_a: String,
    digest_b: String,
    records: Option<RecordDiff>,
    files: Option<RecordDiff>,
}

#[derive(Debug, Default, Serialize)]
struct RecordDiff {
    added: usize,
    removed: usize,
    changed: usize,
    unchanged: usize,
    examples: Vec<String>,
}

pub fn run(args: &DiffArgs, cache: &Path) -> anyhow::Result<u8> {
    let store = super::open_existing(cache)?;
    let runs = store.runs()?;
    let (a, b) = pick(&runs, args)?;
    let report = compare(&store, a, b, args);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(crate::exit::OK)
}

fn pick<'r>(
    runs: &'r [RunRecord],
    args: &DiffArgs,
) -> anyhow::Result<(&'r RunRecord, &'r RunRecord)> {
    let before = |b: &RunRecord| -> anyhow::Result<&'r RunRecord> {
        runs.iter()
            .rev()
            .find(|r| r.pipeline == b.pipeline && r.started <= b.started && r.id != b.id)
            .ok_or_else(|| {
                UsageError(format!(
                    "run `{}` has no earlier run of `{}` to compare with",
                    b.id, b.pipeline
                ))
                .into()
            })
    };
    match (&args.a, &args.b) {
        (Some(x), Some(y)) => Ok((super::find_run(runs, x)?, super::find_run(runs, y)?)),
        (Some(x), None) => {
            let b = super::find_run(runs, x)?;
            Ok((before(b)?, b))
        }
        _ => match runs {
            [.., a, b] => Ok((a, b)),
            _ => Err(UsageError(
                "`pipe diff` needs two runs in the store (see `pipe runs`)".into(),
            )
            .into()),
        },
    }
}

fn compare(store: &Store, a: &RunRecord, b: &RunRecord, args: &DiffArgs) -> Report {
    let params = explain(&a.params, &b.params)
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut names: Vec<&String> = b.stages.keys().collect();
    names.extend(a.stages.keys().filter(|k| !b.stages.contains_key(*k)));
    let mut stages = Vec::new();
    for name in names {
        let ka = a.stages.get(name).and_then(|s| s.key.clone());
        let kb = b.stages.get(name).and_then(|s| s.key.clone());
        let mut d = StageDiff {
            stage: name.clone(),
            status: "same",
            key_a: ka.clone(),
            key_b: kb.clone(),
            changes: Vec::new(),
            upstream: Vec::new(),
            metrics: Vec::new(),
            outputs: Vec::new(),
        };
        match (&ka, &kb) {
            (None, None) => d.status = "same",
            (None, Some(_)) => d.status = "added",
            (Some(_), None) => d.status = "removed",
            (Some(x), Some(y)) if x == y => d.status = "same",
            (Some(x), Some(y)) => {
                d.status = "changed";
                let (ra, rb) = (
                    store.record(x).ok().flatten(),
                    store.record(y).ok().flatten(),
                );
                match (&ra, &rb) {
                    (Some(ra), Some(rb)) => fill(store, &mut d, ra, rb, args),
                    _ => d.changes.push(
                        "a stage record is no longer in the store (collected by `pipe gc`?)".into(),
                    ),
                }
            }
        }
        stages.push(d);
    }
    Report {
        a: RunRef {
            id: a.id.clone(),
            name: a.name.clone(),
            profile: a.profile.clone(),
        },
        b: RunRef {
            id: b.id.clone(),
            name: b.name.clone(),
            profile: b.profile.clone(),
        },
        params,
        stages,
    }
}

fn fill(store: &Store, d: &mut StageDiff, ra: &StageRecord, rb: &StageRecord, args: &DiffArgs) {
    for c in explain(&ra.fingerprint, &rb.fingerprint) {
        if c.component() == "inputs" {
            let input = c.path.trim_start_matches("inputs.");
            let from = rb
                .upstream
                .get(input)
                .or_else(|| ra.upstream.get(input))
                .cloned()
                .unwrap_or_else(|| input.to_owned());
            let stage = from
                .rsplit_once('.')
                .map(|(s, _)| s.to_owned())
                .unwrap_or(from);
            if !d.upstream.contains(&stage) {
                d.upstream.push(stage);
            }
        } else {
            d.changes.push(c.to_string());
        }
    }
    let (ma, mb) = (flat_metrics(&ra.metrics), flat_metrics(&rb.metrics));
    let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    for k in keys {
        let (x, y) = (ma.get(k), mb.get(k));
        if x == y {
            continue;
        }
        let delta = match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
            (Some(p), Some(q)) => Some(q - p),
            _ => None,
        };
        d.metrics.push(MetricDelta {
            name: k.clone(),
            a: x.cloned(),
            b: y.cloned(),
            delta,
        });
    }
    for (name, oa) in &ra.outputs {
        let Some(ob) = rb.outputs.get(name) else {
            continue;
        };
        if oa.digest == ob.digest {
            continue;
        }
        let (pa, pb) = (store.object_path(&oa.digest), store.object_path(&ob.digest));
        let mut od = OutputDiff {
            output: name.clone(),
            digest_a: oa.digest.clone(),
            digest_b: ob.digest.clone(),
            records: None,
            files: None,
        };
        match (oa.kind, ob.kind) {
            (ArtifactKind::File, ArtifactKind::File) => {
                od.records = jsonl_diff(&pa, &pb, &args.id_field, args.examples)
            }
            (ArtifactKind::Dir, ArtifactKind::Dir) => {
                od.files = Some(dir_diff(&pa, &pb, args.examples))
            }
            _ => {}
        }
        d.outputs.push(od);
    }
}

/// Records of two JSONL files matched by `id_field` (by whole content when absent);
/// `None` when either file is not JSONL.
fn jsonl_diff(a: &Path, b: &Path, id_field: &str, examples: usize) -> Option<RecordDiff> {
    let load = |p: &Path| -> Option<BTreeMap<String, Value>> {
        let mut out = BTreeMap::new();
        for line in BufReader::new(File::open(p).ok()?).lines() {
            let line = line.ok()?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).ok()?;
            if !v.is_object() {
                return None;
            }
            let id = match v.get(id_field) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => canonical_json(&v),
            };
            out.insert(id, v);
        }
        Some(out)
    };
    let (ma, mb) = (load(a)?, load(b)?);
    let mut d = RecordDiff::default();
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for (id, vb) in &mb {
        match ma.get(id) {
            None => added.push(format!("+ {}", clip(id))),
            Some(va) if va != vb => {
                let fields: Vec<String> = explain(va, vb)
                    .iter()
                    .map(|c| c.path.split('.').next().unwrap_or("").to_owned())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let detail = explain(va, vb)
                    .first()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default();
                changed.push(format!(
                    "~ {}: {}{}",
                    clip(id),
                    fields.join(", "),
                    clip(&detail)
                ));
            }
            Some(_) => d.unchanged += 1,
        }
    }
    for id in ma.keys() {
        if !mb.contains_key(id) {
            removed.push(format!("- {}", clip(id)));
        }
    }
    d.added = added.len();
    d.removed = removed.len();
    d.changed = changed.len();
    for list in [added, removed, changed] {
        d.examples.extend(list.into_iter().take(examples));
    }
    Some(d)
}

/// Files of two directory artifacts, compared by content digest.
fn dir_diff(a: &Path, b: &Path, examples: usize) -> RecordDiff {
    fn files(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                files(root, &p, out);
            } else if let Ok(d) = crate::digest::hash_file(&p) {
                out.insert(p.strip_prefix(root).unwrap_or(&p).display().to_string(), d);
            }
        }
    }
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    files(a, a, &mut fa);
    files(b, b, &mut fb);
    let mut d = RecordDiff::default();
    let mut ex = Vec::new();
    for (name, db) in &fb {
        match fa.get(name) {
            None => {
                d.added += 1;
                ex.push(format!("+ {name}"));
            }
            Some(da) if da != db => {
                d.changed += 1;
                ex.push(format!("~ {name}"));
            }
            Some(_) => d.unchanged += 1,
        }
    }
    for name in fa.keys().filter(|n| !fb.contains_key(*n)) {
        d.removed += 1;
        ex.push(format!("- {name}"));
    }
    d.examples = ex.into_iter().take(examples * 3).collect();
    d
}

fn clip(s: &str) -> String {
    if s.chars().count() > 100 {
        format!("{}…", s.chars().take(99).collect::<String>())
    } else {
        s.to_owned()
    }
}

fn print(r: &Report) {
    let label = |x: &RunRef| match &x.name {
        Some(n) => format!("{} ({n})", x.id),
        None => x.id.clone(),
    };
    println!("diff {} → {}", label(&r.a), label(&r.b));
    if r.a.profile != r.b.profile {
        println!("profile: {:?} → {:?}", r.a.profile, r.b.profile);
    }
    for p in &r.params {
        println!("param {p}");
    }
    let width = r.stages.iter().map(|s| s.stage.len()).max().unwrap_or(5);
    let (mut same, mut changed) = (0, 0);
    for s in &r.stages {
        if s.status == "same" {
            same += 1;
        } else {
            changed += 1;
        }
        let key = match (&s.key_a, &s.key_b) {
            (Some(a), Some(b)) if a == b => short(a).to_owned(),
            (a, b) => format!(
                "{} → {}",
                a.as_deref().map(short).unwrap_or("-"),
                b.as_deref().map(short).unwrap_or("-")
            ),
        };
        println!("{:<width$}  {:<8} {key}", s.stage, s.status);
        let pad = " ".repeat(width + 2);
        for c in &s.changes {
            println!("{pad}{c}");
        }
        if !s.upstream.is_empty() && s.changes.is_empty() {
            println!("{pad}because upstream changed: {}", s.upstream.join(", "));
        } else if !s.upstream.is_empty() {
            println!("{pad}and upstream changed: {}", s.upstream.join(", "));
        }
        for m in &s.metrics {
            let show = |v: &Option<Value>| {
                v.as_ref()
                    .map(|v| match v.as_f64() {
                        Some(f) => format!("{f:.4}"),
                        None => v.to_string(),
                    })
                    .unwrap_or_else(|| "-".into())
            };
            let delta = m.delta.map(|d| format!(" ({d:+.4})")).unwrap_or_default();
            println!(
                "{pad}metric {}: {} → {}{delta}",
                m.name,
                show(&m.a),
                show(&m.b)
            );
        }
        for o in &s.outputs {
            match (&o.records, &o.files) {
                (Some(d), _) => {
                    println!(
                        "{pad}output {}: records {} added, {} removed, {} changed, {} same",
                        o.output, d.added, d.removed, d.changed, d.unchanged
                    );
                    for e in &d.examples {
                        println!("{pad}  {e}");
                    }
                }
                (None, Some(d)) => {
                    println!(
                        "{pad}output {}: files {} added, {} removed, {} changed, {} same",
                        o.output, d.added, d.removed, d.changed, d.unchanged
                    );
                    for e in &d.examples {
                        println!("{pad}  {e}");
                    }
                }
                _ => println!(
                    "{pad}output {}: {} → {}",
                    o.output,
                    short(&o.digest_a),
                    short(&o.digest_b)
                ),
            }
        }
    }
    println!("{same} stages same, {changed} changed");
}

/// A stage's metrics with nested objects spread into dotted names (`kept_accuracy:
/// {value, step}` → `kept_accuracy.value`, `kept_accuracy.step`), so each number gets
/// its own delta; lists and scalars stay as they are.
fn flat_metrics(metrics: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    walk(&format!("{prefix}.{k}"), x, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in metrics {
        walk(k, v, &mut out);
    }
    out
}
