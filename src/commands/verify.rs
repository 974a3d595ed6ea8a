//! `pipe verify`: rehash every object; quarantine corrupt ones so the next run recomputes
//! the stages that produced them; report records whose objects are missing.

use std::path::Path;

use serde_json::json;

use crate::cli::VerifyArgs;
use crate::digest;

pub fn run(args: &VerifyArgs, cache: &Path) -> anyhow::Result<u8> {
    let store = super::open_existing(cache)?;
    let swept = store.sweep_tmp()?;
    let digests = store.object_digests()?;
    let mut corrupt = Vec::new();
    for d in &digests {
        let path = store.object_path(d);
        let ok = digest::hash_path(&path, None)
            .map(|info| &info.digest == d)
            .unwrap_or(false);
        if !ok {
            let moved = store.quarantine(d)?;
            corrupt.push((d.clone(), moved));
        }
    }
    let mut incomplete = Vec::new();
    let mut bad_records = Vec::new();
    for key in store.record_keys()? {
        match store.record(&key) {
            Ok(Some(rec)) => {
                let missing: Vec<String> = rec
                    .outputs
                    .iter()
                    .filter(|(_, a)| !store.object_path(&a.digest).exists())
                    .map(|(n, _)| n.clone())
                    .collect();
                if !missing.is_empty() {
                    incomplete.push((rec.stage.clone(), key.clone(), missing));
                }
            }
            Ok(None) => {}
            Err(e) => {
                bad_records.push((key.clone(), e.to_string()));
                store.remove_record(&key)?;
            }
        }
    }
    let clean = corrupt.is_empty() && bad_records.is_empty();
    if args.json {
        let out = json!({
            "objects": digests.len(),
            "corrupt": corrupt.iter().map(|(d, p)| json!({"digest": d, "quarantined": p})).collect::<Vec<_>>(),
            "records_missing_objects": incomplete.iter().map(|(s, k, m)| json!({"stage": s, "key": k, "missing": m})).collect::<Vec<_>>(),
            "bad_records": bad_records.iter().map(|(k, e)| json!({"key": k, "error": e})).collect::<Vec<_>>(),
            "stale_tmp_removed": swept,
            "clean": clean,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "checked {} objects: {} corrupt",
            digests.len(),
            corrupt.len()
        );
        for (d, p) in &corrupt {
            println!(
                "  corrupt {} → quarantined at {}",
                super::short(d),
                p.display()
            );
        }
        for (k, e) in &bad_records {
            println!("  unreadable record {} removed: {e}", super::short(k));
        }
        for (stage, key, missing) in &incomplete {
            println!(
                "  `{stage}` ({}) lacks outputs {}: it will be recomputed",
                super::short(key),
                missing.join(", ")
            );
        }
        if swept > 0 {
            println!("removed {swept} scratch directories of dead processes");
        }
        println!(
            "{}",
            if clean {
                "store is clean"
            } else {
                "store had problems; rerun the pipeline to recompute what was quarantined"
            }
        );
    }
    Ok(if clean {
        crate::exit::OK
    } else {
        crate::exit::FAILED
    })
}
