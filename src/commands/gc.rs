//! `pipe gc`: keep what the newest N runs and every named run reference; delete the rest.

use std::collections::BTreeSet;
use std::path::Path;

use crate::cli::GcArgs;

use super::UsageError;

pub fn run(args: &GcArgs, cache: &Path) -> anyhow::Result<u8> {
    let store = super::open_existing(cache)?;
    let Some(_lock) = store.run_lock(true)? else {
        return Err(UsageError(
            "a `pipe run` is using this store; run `pipe gc` when it has finished".into(),
        )
        .into());
    };
    let runs = store.runs()?;
    let cut = runs.len().saturating_sub(args.keep_last);
    let (mut kept_runs, mut dropped_runs) = (Vec::new(), Vec::new());
    for (i, r) in runs.iter().enumerate() {
        if i >= cut || r.name.is_some() || r.status == "running" {
            kept_runs.push(r);
        } else {
            dropped_runs.push(r);
        }
    }
    let live_keys: BTreeSet<String> = kept_runs
        .iter()
        .flat_map(|r| r.stages.values().filter_map(|s| s.key.clone()))
        .collect();
    let mut live_objects = BTreeSet::new();
    let mut dead_records = Vec::new();
    for key in store.record_keys()? {
        let rec = store.record(&key).ok().flatten();
        if live_keys.contains(&key) {
            if let Some(rec) = rec {
                live_objects.extend(rec.outputs.values().map(|a| a.digest.clone()));
                live_objects.extend(rec.log.clone());
            }
        } else {
            dead_records.push(key);
        }
    }
    let dead_objects: Vec<String> = store
        .object_digests()?
        .into_iter()
        .filter(|d| !live_objects.contains(d))
        .collect();
    let dead_checkpoints: Vec<String> = if args.checkpoints {
        store.checkpoint_keys()
    } else {
        Vec::new()
    };
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    let mut bytes = 0u64;
    if !args.dry_run {
        for r in &dropped_runs {
            store.remove_run(&r.id)?;
        }
        for k in &dead_records {
            store.remove_record(k)?;
        }
        for d in &dead_objects {
            bytes += store.remove_object(d)?;
        }
        for k in &dead_checkpoints {
            store.remove_checkpoint(k);
        }
        if args.memo {
            let memo = store.memo_root();
            if memo.exists() {
                std::fs::remove_dir_all(&memo)?;
            }
        }
        // Refs to records that are gone would only confuse `pipe status`.
        for (pipeline, stage, key) in store.refs()? {
            if store.record(&key).ok().flatten().is_none() {
                let _ =
                    std::fs::remove_file(store.root().join("refs").join(&pipeline).join(&stage));
            }
        }
    } else {
        for d in &dead_objects {
            bytes += crate::digest::hash_path(&store.object_path(d), None)
                .map(|i| i.bytes)
                .unwrap_or(0);
        }
    }
    println!(
        "{verb} {} runs, {} stage records, {} objects ({:.1} MiB), {} checkpoints; kept {} runs",
        dropped_runs.len(),
        dead_records.len(),
        dead_objects.len(),
        bytes as f64 / (1024.0 * 1024.0),
        dead_checkpoints.len(),
        kept_runs.len()
    );
    if args.memo {
        println!(
            "{verb} the memo directories ({})",
            store.memo_root().display()
        );
    }
    Ok(crate::exit::OK)
}
