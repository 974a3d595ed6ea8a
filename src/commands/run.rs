//! `pipe run FILE`: execute, record the run, print the end-of-run table.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pipe_stages::{CancelToken, Registry};

use crate::cli::RunArgs;
use crate::executor::{self, RunOptions};
use crate::plan::{Plan, Selection};
use crate::store::{hostname, RunRecord, RunStage, StageStatus, Store};

use super::{secs, short, UsageError};

pub fn run(args: &RunArgs, cache: &Path, registry: &Registry, verbose: u8) -> anyhow::Result<u8> {
    let started = Instant::now();
    let pipeline = Arc::new(super::load(&args.pipeline, registry)?);
    let mut plan = Plan::new(&pipeline)?;
    let selection = Selection {
        only: args.select.only.clone(),
        from: args.select.from.clone(),
        until: args.select.until.clone(),
    };
    plan.select(&pipeline, &selection)?;
    let capacity = capacity(&args.resources)?;
    for a in &args.accept {
        if !pipeline
            .stages
            .iter()
            .any(|s| &s.name == a || s.name.split('@').next() == Some(a.as_str()))
        {
            return Err(
                UsageError(format!("`--accept {a}`: the pipeline has no stage `{a}`")).into(),
            );
        }
    }
    let store = Store::open(cache)?;
    let _store_lock = store.run_lock(false)?;
    store.sweep_tmp()?;

    let mut record = RunRecord {
        id: run_id(),
        name: args.name.clone(),
        pipeline: pipeline.name.clone(),
        file: args.pipeline.file.display().to_string(),
        file_digest: pipeline.digest.clone(),
        profile: pipeline.profile.clone(),
        params: pipeline.params.clone(),
        overrides: args
            .pipeline
            .param_files
            .iter()
            .map(|p| format!("-p {}", p.display()))
            .chain(args.pipeline.sets.iter().map(|s| format!("--set {s}")))
            .collect(),
        stages: pipeline
            .stages
            .iter()
            .enumerate()
            .filter(|(i, _)| plan.needed()[*i])
            .map(|(_, s)| {
                (
                    s.name.clone(),
                    RunStage {
                        key: None,
                        status: StageStatus::Pending,
                        seconds: 0.0,
                        message: None,
                        kind: s.kind.clone(),
                        after: s.upstream().into_iter().map(str::to_owned).collect(),
                    },
                )
            })
            .collect(),
        started: executor::now_rfc3339(),
        finished: None,
        status: "running".into(),
        git_commit: executor::git_commit(&pipeline.workdir),
        host: hostname(),
        pid: std::process::id(),
    };
    let tracking =
        crate::tracking::with_flags(pipeline.tracking.clone(), &args.track).map_err(UsageError)?;
    let tracker = crate::tracking::Tracker::start(&tracking, &record)?;
    if let (Some(t), Some(uri)) = (&tracker, &tracking.mlflow) {
        eprintln!(
            "tracking in MLflow at {} (parent run {})",
            crate::tracking::shown_uri(uri),
            t.parent_id()
        );
    }
    store.write_run(&record)?;

    let cancel = CancelToken::new();
    let options = RunOptions {
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        capacity,
        cancel: cancel.clone(),
        progress: !args.no_progress,
        echo_logs: verbose > 0,
        accept: args.accept.clone(),
        tracker: tracker.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = {
        let record = &mut record;
        let store2 = store.clone();
        runtime.block_on(executor::execute(
            pipeline.clone(),
            &plan,
            store.clone(),
            registry.clone(),
            options,
            move |name, r| {
                let line = record.stages.entry(name.to_owned()).or_insert(RunStage {
                    key: None,
                    status: StageStatus::Pending,
                    seconds: 0.0,
                    message: None,
                    kind: String::new(),
                    after: Vec::new(),
                });
                line.key = r.key.clone();
                line.status = r.status;
                line.seconds = r.seconds;
                line.message = r.message.clone();
                if r.status != StageStatus::Cached {
                    // Keep the on-disk run record current when real work finished.
                    let _ = store2.write_run(record);
                }
            },
        ))
    };
    drop(runtime);

    let count = |st: StageStatus| results.iter().flatten().filter(|r| r.status == st).count();
    let (ran, cached, failed, cancelled) = (
        count(StageStatus::Ran),
        count(StageStatus::Cached),
        count(StageStatus::Failed),
        count(StageStatus::Cancelled),
    );
    let interrupted = cancel.is_cancelled() || cancelled > 0;
    record.status = if interrupted {
        "interrupted"
    } else if failed > 0 || count(StageStatus::Skipped) > 0 {
        "failed"
    } else {
        "ok"
    }
    .into();
    record.finished = Some(executor::now_rfc3339());
    store.write_run(&record)?;
    if let Some(t) = &tracker {
        t.finish(&record.status);
    }

    // End-of-run table, in pipeline order.
    let width = pipeline
        .stages
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:<width$}  {:<9} {:>8}  key", "stage", "status", "time");
    for (i, spec) in pipeline.stages.iter().enumerate() {
        let Some(r) = &results[i] else { continue };
        let gate = r
            .gate
            .as_ref()
            .map(|g| format!("  gate {}", g.decision.as_str()))
            .unwrap_or_default();
        println!(
            "{:<width$}  {:<9} {:>8}  {}{gate}",
            spec.name,
            r.status.as_str(),
            secs(r.seconds),
            r.key.as_deref().map(short).unwrap_or("-")
        );
    }
    let mut gate_msgs: Vec<&str> = Vec::new();
    for r in results.iter().flatten() {
        if let Some(m) = r.message.as_deref() {
            if r.status == StageStatus::Skipped && m.starts_with("gate ") && !gate_msgs.contains(&m)
            {
                gate_msgs.push(m);
            }
        }
    }
    for m in &gate_msgs {
        eprintln!("stopped: {m}");
    }
    for (i, spec) in pipeline.stages.iter().enumerate() {
        if let Some(r) = &results[i] {
            if matches!(r.status, StageStatus::Failed) {
                eprintln!(
                    "error: stage `{}` failed: {}",
                    spec.name,
                    r.message.as_deref().unwrap_or("")
                );
            }
        }
    }
    let name = record
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    println!(
        "run {}{name} {}: {ran} ran, {cached} cached, {failed} failed in {}",
        record.id,
        record.status,
        secs(started.elapsed().as_secs_f64())
    );
    if interrupted {
        let mut cmd = format!("pipe run {}", args.pipeline.file.display());
        if let Some(p) = &args.pipeline.profile {
            cmd.push_str(&format!(" --profile {p}"));
        }
        eprintln!("interrupted: finished stages are stored and checkpoints kept; run `{cmd}` (same options) to resume");
        return Ok(crate::exit::INTERRUPTED);
    }
    Ok(if record.status == "ok" {
        crate::exit::OK
    } else {
        crate::exit::FAILED
    })
}

/// Resources the machine offers: detected GPUs, overridden by `--resource NAME=N`.
fn capacity(overrides: &[String]) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut cap = BTreeMap::new();
    cap.insert("gpu".to_owned(), detect_gpus());
    for o in overrides {
        let (k, v) = o
            .split_once('=')
            .and_then(|(k, v)| {
                v.trim()
                    .parse::<u32>()
                    .ok()
                    .map(|v| (k.trim().to_owned(), v))
            })
            .ok_or_else(|| {
                UsageError(format!(
                    "`--resource {o}`: expected NAME=COUNT, e.g. `--resource gpu=2`"
                ))
            })?;
        cap.insert(k, v);
    }
    Ok(cap)
}

/// GPUs visible to this process: `CUDA_VISIBLE_DEVICES` when set, else NVIDIA device nodes.
fn detect_gpus() -> u32 {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return v
            .split(',')
            .filter(|s| !s.trim().is_empty() && s.trim() != "-1")
            .count() as u32;
    }
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia").is_some_and(|rest| {
                        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
                    })
                })
                .count() as u32
        })
        .unwrap_or(0)
}

/// `20261122-143005-1a2b`: sortable by time, unique per process.
fn run_id() -> String {
    let now = std::time::SystemTime::now();
    let stamp = humantime::format_rfc3339_seconds(now).to_string();
    let compact: String = stamp.chars().filter(|c| c.is_ascii_digit()).collect();
    let nanos = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let salt = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{}-{}-{salt:04x}", &compact[..8], &compact[8..14])
}
