//! `pipe show STAGE`: a stage's last record.

use std::path::Path;

use serde_json::json;

use crate::cli::ShowArgs;

pub fn run(args: &ShowArgs, cache: &Path) -> anyhow::Result<u8> {
    let store = super::open_existing(cache)?;
    let rec = super::find_stage(&store, &args.stage, args.pipeline.as_deref())?;
    if args.json {
        let outputs: serde_json::Map<String, serde_json::Value> = rec
            .outputs
            .iter()
            .map(|(k, a)| (k.clone(), json!({"digest": a.digest, "kind": a.kind, "bytes": a.bytes, "files": a.files, "path": store.object_path(&a.digest)})))
            .collect();
        let out = json!({
            "stage": rec.stage, "pipeline": rec.pipeline, "kind": rec.kind, "key": rec.key,
            "started": rec.started, "seconds": rec.seconds, "host": rec.host,
            "fingerprint": rec.fingerprint, "upstream": rec.upstream, "outputs": outputs, "metrics": rec.metrics,
            "log": rec.log.as_ref().map(|d| store.object_path(d)),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(crate::exit::OK);
    }
    println!(
        "stage     {} ({}) in pipeline `{}`",
        rec.stage, rec.kind, rec.pipeline
    );
    println!("key       {}", rec.key);
    println!(
        "computed  {} on {} in {}",
        rec.started,
        rec.host,
        super::secs(rec.seconds)
    );
    println!(
        "params    {}",
        serde_json::to_string(&rec.fingerprint["params"])?
    );
    for (name, from) in &rec.upstream {
        let digest = rec.fingerprint["inputs"][name].as_str().unwrap_or("");
        println!("input     {name} ← {from} ({})", super::short(digest));
    }
    if let Some(deps) = rec.fingerprint["deps"].as_object() {
        for (path, d) in deps {
            println!(
                "dep       {path} ({})",
                super::short(d.as_str().unwrap_or(""))
            );
        }
    }
    for (name, a) in &rec.outputs {
        println!(
            "output    {name}: {} ({:?}, {} bytes, {} files)",
            store.object_path(&a.digest).display(),
            a.kind,
            a.bytes,
            a.files
        );
    }
    for (name, v) in &rec.metrics {
        println!("metric    {name} = {v}");
    }
    if let Some(d) = &rec.log {
        println!("log       {}", store.object_path(d).display());
    }
    Ok(crate::exit::OK)
}
