//! `pipe runs`: run history, newest last.

use std::path::Path;

use crate::cli::RunsArgs;
use crate::store::StageStatus;

pub fn run(args: &RunsArgs, cache: &Path) -> anyhow::Result<u8> {
    let store = super::open_existing(cache)?;
    let runs = store.runs()?;
    let shown = &runs[runs.len().saturating_sub(args.limit)..];
    if args.json {
        println!("{}", serde_json::to_string_pretty(shown)?);
        return Ok(crate::exit::OK);
    }
    println!(
        "{:<21} {:<14} {:<12} {:<20} {:<11} {:>4} {:>6} {:>6}  profile",
        "id", "name", "pipeline", "started", "status", "ran", "cached", "failed"
    );
    for r in shown {
        let count = |s: StageStatus| r.stages.values().filter(|x| x.status == s).count();
        println!(
            "{:<21} {:<14} {:<12} {:<20} {:<11} {:>4} {:>6} {:>6}  {}",
            r.id,
            r.name.as_deref().unwrap_or("-"),
            r.pipeline,
            r.started,
            r.status,
            count(StageStatus::Ran),
            count(StageStatus::Cached),
            count(StageStatus::Failed),
            r.profile.as_deref().unwrap_or("-")
        );
    }
    Ok(crate::exit::OK)
}
