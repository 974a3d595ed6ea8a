//! One module per subcommand; [`dispatch`] picks it.

use std::path::Path;

use anyhow::Context as _;
use pipe_stages::Registry;

use crate::cli::{Cli, Command, PipelineArgs};
use crate::pipeline::{LoadOptions, Pipeline};
use crate::store::{RunRecord, Store};

mod check;
mod dag;
mod diff;
mod export;
mod gc;
mod report;
mod run;
mod runs;
mod serve;
mod show;
mod status;
mod verify;

/// A command-line mistake (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let registry = pipe_stages::builtin();
    let cache = cli.cache.as_path();
    match &cli.command {
        Command::Run(args) => run::run(args, cache, &registry, cli.verbose),
        Command::Check(args) => check::run(args, &registry),
        Command::Status(args) => status::run(args, cache, &registry, cli.verbose),
        Command::Dag(args) => dag::run(args, &registry),
        Command::Show(args) => show::run(args, cache),
        Command::Runs(args) => runs::run(args, cache),
        Command::Diff(args) => diff::run(args, cache),
        Command::Report(args) => report::run(args, cache),
        Command::Export(args) => export::run(args, cache),
        Command::Verify(args) => verify::run(args, cache),
        Command::Gc(args) => gc::run(args, cache),
        Command::Serve(args) => serve::run(args),
    }
}

fn load(args: &PipelineArgs, registry: &Registry) -> anyhow::Result<Pipeline> {
    let options = LoadOptions {
        profile: args.profile.clone(),
        param_files: args.param_files.clone(),
        sets: args.sets.clone(),
    };
    Ok(Pipeline::load(&args.file, &options, registry)?)
}

fn open_existing(cache: &Path) -> anyhow::Result<Store> {
    Store::open_existing(cache).ok_or_else(|| {
        UsageError(format!(
            "no store at `{}`; run a pipeline first, or pass `--cache DIR` / set `PIPE_CACHE`",
            cache.display()
        ))
        .into()
    })
}

/// Finds a run by id, id prefix or name (the newest run of that name).
fn find_run<'r>(runs: &'r [RunRecord], wanted: &str) -> anyhow::Result<&'r RunRecord> {
    if let Some(r) = runs
        .iter()
        .rev()
        .find(|r| r.id == wanted || r.name.as_deref() == Some(wanted))
    {
        return Ok(r);
    }
    let matches: Vec<&RunRecord> = runs.iter().filter(|r| r.id.starts_with(wanted)).collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => {
            let names: Vec<&str> = runs.iter().filter_map(|r| r.name.as_deref()).collect();
            let help = pipe_stages::suggest(wanted, names)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            Err(UsageError(format!(
                "no run with id or name `{wanted}` (see `pipe runs`){help}"
            ))
            .into())
        }
        many => Err(UsageError(format!(
            "`{wanted}` matches {} runs; give more of the id",
            many.len()
        ))
        .into()),
    }
}

/// Finds the record of `stage`'s last completion, in `pipeline` or (when unique) any pipeline.
fn find_stage(
    store: &Store,
    stage: &str,
    pipeline: Option<&str>,
) -> anyhow::Result<crate::store::StageRecord> {
    let refs = store.refs()?;
    let candidates: Vec<&(String, String, String)> = refs
        .iter()
        .filter(|(p, s, _)| s == stage && pipeline.is_none_or(|want| want == p))
        .collect();
    let chosen = match candidates.as_slice() {
        [one] => *one,
        [] => {
            let names: Vec<&str> = refs.iter().map(|(_, s, _)| s.as_str()).collect();
            let help = pipe_stages::suggest(stage, names)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(UsageError(format!("stage `{stage}` has no stored result{help}")).into());
        }
        many => {
            // The one of the most recent run wins.
            let runs = store.runs()?;
            let latest = runs.iter().rev().find_map(|r| {
                many.iter()
                    .find(|(p, _, _)| *p == r.pipeline && r.stages.contains_key(stage))
            });
            match latest {
                Some(c) => *c,
                None => {
                    let pipes: Vec<&str> = many.iter().map(|(p, _, _)| p.as_str()).collect();
                    return Err(UsageError(format!(
                        "stage `{stage}` exists in pipelines {}; pass `--pipeline`",
                        pipes.join(", ")
                    ))
                    .into());
                }
            }
        }
    };
    store.record(&chosen.2)?.with_context(|| {
        format!(
            "the record of `{stage}` ({}) is gone; rerun the pipeline",
            &chosen.2[..12]
        )
    })
}

fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// Seconds as a short human duration.
fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}
