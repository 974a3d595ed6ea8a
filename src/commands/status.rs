//! `pipe status FILE`: per stage, cached, or will run and why (which param, input or dep
//! changed, which upstream stage will run, or that it never ran).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use pipe_stages::Registry;
use serde_json::json;

use crate::cli::StatusArgs;
use crate::executor::{self, Outputs, Shared};
use crate::fingerprint::{explain, Change};
use crate::plan::Plan;
use crate::store::Store;

use super::short;

pub fn run(
    args: &StatusArgs,
    cache: &Path,
    registry: &Registry,
    verbose: u8,
) -> anyhow::Result<u8> {
    let pipeline = Arc::new(super::load(&args.pipeline, registry)?);
    let plan = Plan::new(&pipeline)?;
    let store = Store::open(cache)?;
    let shared = Shared::inspect(pipeline.clone(), store.clone(), registry.clone());
    let mut outputs: Outputs = HashMap::new();
    let mut will_run = vec![false; pipeline.stages.len()];
    let mut rows = Vec::new();
    for &idx in plan.order() {
        let spec = &pipeline.stages[idx];
        let previous = store
            .ref_key(&pipeline.name, &spec.name)
            .and_then(|k| store.record(&k).ok().flatten());
        let mut reasons: Vec<String> = Vec::new();
        let upstream_running: Vec<&str> = plan
            .parents(idx)
            .into_iter()
            .filter(|p| will_run[*p])
            .map(|p| pipeline.stages[p].name.as_str())
            .collect();
        let mut key = None;
        let mut cached = false;
        let mut doc = None;
        if upstream_running.is_empty() {
            match executor::fingerprint(spec, &shared, &outputs) {
                Ok(fp) => {
                    if let Some(rec) = store.complete_record(&fp.key)? {
                        cached = true;
                        let modified = executor::workspace_outs_modified(&shared, spec, &rec);
                        if !modified.is_empty() {
                            reasons.push(format!(
                                "outs modified in the workspace, will be restored: {}",
                                modified.join(", ")
                            ));
                        }
                        for (name, art) in &rec.outputs {
                            outputs.insert((spec.name.clone(), name.clone()), art.clone());
                        }
                    } else if store.record(&fp.key)?.is_some() {
                        reasons.push(
                            "its stored outputs are missing (quarantined or collected)".into(),
                        );
                    }
                    key = Some(fp.key.clone());
                    doc = Some(fp.doc);
                }
                Err(e) => reasons.push(format!("cannot fingerprint: {e}")),
            }
        } else {
            for up in &upstream_running {
                reasons.push(format!("upstream `{up}` will run"));
            }
        }
        if !cached {
            will_run[idx] = true;
            match &previous {
                None => reasons.push("never ran".into()),
                Some(prev) => {
                    let changes: Vec<Change> = match &doc {
                        Some(d) => explain(&prev.fingerprint, d),
                        // Upstream will run: say what changed in the stage itself.
                        None => explain(
                            &json!({"params": prev.fingerprint.get("params"), "kind": prev.fingerprint.get("kind"), "version": prev.fingerprint.get("version")}),
                            &json!({"params": shared.registry.get(&spec.kind).map(|s| s.key_params(&spec.params)), "kind": spec.kind, "version": shared.registry.get(&spec.kind).map(|s| s.version())}),
                        ),
                    };
                    for c in &changes {
                        reasons.push(describe(c, prev));
                    }
                }
            }
            if let Some(k) = &key {
                if store.has_checkpoint(k) {
                    reasons.push("a checkpoint exists: it will resume".into());
                }
            }
        }
        if verbose > 1 {
            if let Some(d) = &doc {
                eprintln!("{}: {}", spec.name, serde_json::to_string_pretty(d)?);
            }
        }
        rows.push((spec.name.clone(), cached, key, reasons));
    }
    shared.save_statcache();
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(name, cached, key, reasons)| json!({"stage": name, "status": if *cached { "cached" } else { "will run" }, "key": key, "reasons": reasons}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(crate::exit::OK);
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5);
    for (name, cached, key, reasons) in &rows {
        let status = if *cached { "cached" } else { "will run" };
        let key = key.as_deref().map(short).unwrap_or("-");
        match reasons.split_first() {
            None => println!("{name:<width$}  {status:<9} {key:<12}"),
            Some((first, rest)) => {
                println!("{name:<width$}  {status:<9} {key:<12}  {first}");
                for r in rest {
                    println!("{:<width$}  {:<9} {:<12}  {r}", "", "", "");
                }
            }
        }
    }
    Ok(crate::exit::OK)
}

fn describe(c: &Change, prev: &crate::store::StageRecord) -> String {
    match c.component() {
        "params" => format!("param {}", c.to_string().trim_start_matches("params.")),
        "inputs" => {
            let input = c.path.trim_start_matches("inputs.");
            match prev.upstream.get(input) {
                Some(from) => format!("input `{input}` changed (from `{from}`)"),
                None => format!("input {c}"),
            }
        }
        "deps" => format!("dep `{}` changed", c.path.trim_start_matches("deps.")),
        "version" => format!(
            "stage kind version {}",
            c.to_string().trim_start_matches("version: ")
        ),
        "kind" => format!("kind {c}"),
        _ => c.to_string(),
    }
}
