//! Runs a plan: independent stages concurrently (tokio, `--jobs`), never more of a
//! resource than the machine offers, each stage's work on a blocking thread.
//!
//! For each stage: compute its fingerprint from its params, its upstream outputs' digests
//! and its workspace deps; a complete record under that key is a cache hit. Otherwise take
//! the key's lock (so concurrent runs compute a key once: the waiter finds the record when
//! the lock frees), run the stage into a scratch directory with a durable checkpoint
//! directory, move its outputs into the store and write the record last.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pipe_stages::{CancelToken, OutputLocation, Registry, StageContext, StageError};
use tokio::task::JoinSet;

use crate::digest::{self, ArtifactInfo, StatCache};
use crate::fingerprint::Fingerprint;
use crate::pipeline::interpolate;
use crate::pipeline::{Pipeline, StageSpec};
use crate::plan::Plan;
use crate::progress::{Bars, StageReporter};
use crate::store::{hostname, KeyLock, StageRecord, StageStatus, Store};

/// Knobs of one execution.
pub struct RunOptions {
    /// Stages running at once.
    pub jobs: usize,
    /// Resource name → units the machine offers.
    pub capacity: BTreeMap<String, u32>,
    /// Set on Ctrl-C.
    pub cancel: CancelToken,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
    /// Echo stage log lines to stderr.
    pub echo_logs: bool,
    /// Gates whose REVIEW decision the run accepts (`--accept`).
    pub accept: Vec<String>,
    /// Where stage runs are tracked (MLflow), when tracking is on.
    pub tracker: Option<Arc<crate::tracking::Tracker>>,
}

/// How one stage ended in this execution.
#[derive(Debug, Clone)]
pub struct StageResult {
    /// Status.
    pub status: StageStatus,
    /// Fingerprint key, when computed.
    pub key: Option<String>,
    /// Wall seconds in this run.
    pub seconds: f64,
    /// Why it failed or was skipped.
    pub message: Option<String>,
    /// Output name → artifact, for ran and cached stages.
    pub outputs: BTreeMap<String, ArtifactInfo>,
    /// A gate stage's decision.
    pub gate: Option<pipe_stages::Gate>,
}

impl StageResult {
    fn fail(
        status: StageStatus,
        key: Option<String>,
        started: Instant,
        message: impl Into<String>,
    ) -> Self {
        StageResult {
            status,
            key,
            seconds: started.elapsed().as_secs_f64(),
            message: Some(message.into()),
            outputs: BTreeMap::new(),
            gate: None,
        }
    }

    /// True for ran and cached stages.
    pub fn ok(&self) -> bool {
        matches!(self.status, StageStatus::Ran | StageStatus::Cached)
    }

    /// Why stages downstream of this one may not run: a FAIL, or a REVIEW that the run
    /// did not accept. Names the report so a person can judge.
    pub fn gate_block(&self, stage: &str, accept: &[String], store: &Store) -> Option<String> {
        let gate = self.gate.as_ref()?;
        let accepted = accept
            .iter()
            .any(|a| a == stage || stage.split('@').next() == Some(a.as_str()));
        // `OUTPUT` or `OUTPUT/PATH/INSIDE`.
        let (output, inside) = gate.report.split_once('/').unwrap_or((&gate.report, ""));
        let report = self
            .outputs
            .get(output)
            .map(|a| {
                let p = store.object_path(&a.digest);
                if inside.is_empty() { p } else { p.join(inside) }
                    .display()
                    .to_string()
            })
            .unwrap_or_else(|| format!("output `{}`", gate.report));
        let why = if gate.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", gate.reasons.join("; "))
        };
        match gate.decision {
            pipe_stages::Decision::Pass => None,
            pipe_stages::Decision::Review if accepted => None,
            pipe_stages::Decision::Review => Some(format!(
                "gate `{stage}` decided REVIEW{why}; read {report}, then rerun with `--accept {stage}` to continue"
            )),
            pipe_stages::Decision::Fail => Some(format!(
                "gate `{stage}` decided FAIL{why}; see {report}"
            )),
        }
    }
}

/// Everything the blocking stage tasks share.
pub struct Shared {
    /// The pipeline.
    pub pipeline: Arc<Pipeline>,
    /// The store.
    pub store: Store,
    /// Stage kinds.
    pub registry: Registry,
    /// Digests of workspace files.
    pub statcache: Mutex<StatCache>,
    bars: Bars,
    cancel: CancelToken,
    echo_logs: bool,
    tracker: Option<Arc<crate::tracking::Tracker>>,
}

/// Output digests produced so far, by (stage, output).
pub type Outputs = HashMap<(String, String), ArtifactInfo>;

/// The fingerprint of a stage whose upstream outputs are all known.
pub fn fingerprint(
    spec: &StageSpec,
    shared: &Shared,
    outputs: &Outputs,
) -> Result<Fingerprint, String> {
    let stage = shared
        .registry
        .get(&spec.kind)
        .ok_or_else(|| format!("unknown stage kind `{}`", spec.kind))?;
    let mut inputs = BTreeMap::new();
    for (name, r) in &spec.inputs {
        let art = outputs
            .get(&(r.stage.clone(), r.output.clone()))
            .ok_or_else(|| format!("input `{name}`: upstream `{r}` has no result"))?;
        inputs.insert(name.clone(), art.digest.clone());
    }
    let mut deps = BTreeMap::new();
    for dep in &spec.signature.deps {
        let path = shared.pipeline.workdir.join(dep);
        let mut cache = shared.statcache.lock().unwrap_or_else(|e| e.into_inner());
        let info = digest::hash_path(&path, Some(&mut cache))
            .map_err(|e| format!("dep `{dep}` cannot be read ({}): {e}", path.display()))?;
        deps.insert(dep.clone(), info.digest);
    }
    Ok(Fingerprint::new(
        &spec.kind,
        stage.version(),
        &stage.key_params(&spec.params),
        &inputs,
        &deps,
    ))
}

/// Whether the stage may compute, or may only be taken from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    Compute,
    /// Upstream of the selection, or short of resources: a cache hit, or a failure with
    /// this message.
    CacheOnly(String),
}

/// Executes the needed stages of `plan`; calls `on_done` after each stage finishes.
pub async fn execute(
    pipeline: Arc<Pipeline>,
    plan: &Plan,
    store: Store,
    registry: Registry,
    options: RunOptions,
    mut on_done: impl FnMut(&str, &StageResult),
) -> Vec<Option<StageResult>> {
    let statcache = StatCache::load(&store.root().join("statcache"));
    let shared = Arc::new(Shared {
        pipeline: pipeline.clone(),
        store,
        registry,
        statcache: Mutex::new(statcache),
        bars: Bars::new(options.progress),
        cancel: options.cancel.clone(),
        echo_logs: options.echo_logs,
        tracker: options.tracker.clone(),
    });
    let n = pipeline.stages.len();
    let needed = plan.needed();
    let mut results: Vec<Option<StageResult>> = vec![None; n];
    let mut outputs: Outputs = HashMap::new();
    let mut waiting: Vec<usize> = plan
        .order()
        .iter()
        .copied()
        .filter(|&i| needed[i])
        .collect();
    let mut in_use: BTreeMap<String, u32> = BTreeMap::new();
    // Which GPUs (ordinals among the visible ones) are free: a stage holding `gpu: k`
    // gets k of them for itself, named in its context and its `CUDA_VISIBLE_DEVICES`.
    let mut free_gpus: Vec<u32> = (0..options.capacity.get("gpu").copied().unwrap_or(0)).collect();
    let mut jobs_in_use = 0usize;
    let mut running: JoinSet<(usize, bool, Vec<u32>, StageResult)> = JoinSet::new();
    let mut interrupted = false;

    loop {
        // Launch every waiting stage whose parents are done and whose resources fit.
        let mut i = 0;
        while i < waiting.len() {
            let idx = waiting[i];
            let parents = plan.parents(idx);
            if parents.iter().any(|p| results[*p].is_none()) {
                i += 1;
                continue;
            }
            let spec = &pipeline.stages[idx];
            let started = Instant::now();
            let gated = parents.iter().find_map(|p| {
                results[*p].as_ref().and_then(|r| {
                    r.gate_block(&pipeline.stages[*p].name, &options.accept, &shared.store)
                })
            });
            if let Some(why) = gated {
                let r = StageResult::fail(StageStatus::Skipped, None, started, why);
                on_done(&spec.name, &r);
                results[idx] = Some(r);
                waiting.remove(i);
                i = 0;
                continue;
            }
            if let Some(bad) = parents
                .iter()
                .find(|p| !results[**p].as_ref().is_some_and(StageResult::ok))
            {
                let up = &pipeline.stages[*bad].name;
                let r = StageResult::fail(
                    StageStatus::Skipped,
                    None,
                    started,
                    format!("upstream `{up}` did not finish"),
                );
                on_done(&spec.name, &r);
                results[idx] = Some(r);
                waiting.remove(i);
                i = 0;
                continue;
            }
            if shared.cancel.is_cancelled() {
                let r = StageResult::fail(
                    StageStatus::Cancelled,
                    None,
                    started,
                    "interrupted before it started",
                );
                on_done(&spec.name, &r);
                results[idx] = Some(r);
                waiting.remove(i);
                i = 0;
                continue;
            }
            let over = spec
                .resources
                .iter()
                .find(|(k, v)| **v > options.capacity.get(*k).copied().unwrap_or(0));
            let mode = if !plan.is_selected(idx) {
                Mode::CacheOnly(
                    "no cached result for its current fingerprint, and it cannot run here because it is outside the selection (--only/--from/--until)".into(),
                )
            } else if let Some((k, v)) = over {
                Mode::CacheOnly(format!(
                    "stage needs {k}: {v} but this machine offers {}; pass `--resource {k}={v}` if it has them, or lower `resources.{k}` (a profile can)",
                    options.capacity.get(k).copied().unwrap_or(0)
                ))
            } else {
                Mode::Compute
            };
            let fits = mode != Mode::Compute
                || (jobs_in_use < options.jobs.max(1)
                    && spec.resources.iter().all(|(k, v)| {
                        in_use.get(k).copied().unwrap_or(0) + v
                            <= options.capacity.get(k).copied().unwrap_or(0)
                    }));
            if !fits {
                i += 1;
                continue;
            }
            let mut gpus = Vec::new();
            if mode == Mode::Compute {
                jobs_in_use += 1;
                for (k, v) in &spec.resources {
                    *in_use.entry(k.clone()).or_insert(0) += v;
                }
                let k = spec.resources.get("gpu").copied().unwrap_or(0) as usize;
                gpus = free_gpus.drain(..k.min(free_gpus.len())).collect();
            }
            let mut upstream = Outputs::new();
            for r in spec.inputs.values() {
                let k = (r.stage.clone(), r.output.clone());
                if let Some(a) = outputs.get(&k) {
                    upstream.insert(k, a.clone());
                }
            }
            let shared2 = shared.clone();
            running.spawn_blocking(move || {
                let computes = mode == Mode::Compute;
                let r = process(&shared2, idx, &upstream, mode, &gpus);
                (idx, computes, gpus, r)
            });
            waiting.remove(i);
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            joined = running.join_next() => {
                let Some(joined) = joined else { break };
                let (idx, held, gpus, result) = match joined {
                    Ok(pair) => pair,
                    Err(e) => {
                        // A panic inside a stage task: fail loudly but keep the run going.
                        tracing::error!("stage task failed: {e}");
                        continue;
                    }
                };
                let spec = &pipeline.stages[idx];
                free_gpus.extend(gpus);
                free_gpus.sort_unstable();
                if held {
                    jobs_in_use = jobs_in_use.saturating_sub(1);
                    for (k, v) in &spec.resources {
                        if let Some(u) = in_use.get_mut(k) {
                            *u = u.saturating_sub(*v);
                        }
                    }
                }
                for (name, art) in &result.outputs {
                    outputs.insert((spec.name.clone(), name.clone()), art.clone());
                }
                on_done(&spec.name, &result);
                results[idx] = Some(result);
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                shared.cancel.cancel();
                shared.bars.println("interrupt: stopping running stages (checkpoints are kept); press Ctrl-C again to abort at once");
                tokio::spawn(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!("aborted");
                        std::process::exit(130);
                    }
                });
            }
        }
    }
    if let Ok(mut cache) = shared.statcache.lock() {
        if let Err(e) = cache.save() {
            tracing::warn!("could not save the stat cache: {e}");
        }
    }
    results
}

/// One stage, start to end, on a blocking thread.
fn process(
    shared: &Shared,
    idx: usize,
    upstream: &Outputs,
    mode: Mode,
    gpus: &[u32],
) -> StageResult {
    let started = Instant::now();
    let spec = &shared.pipeline.stages[idx];
    let pipeline = &shared.pipeline;
    let fp = match fingerprint(spec, shared, upstream) {
        Ok(fp) => fp,
        Err(e) => return StageResult::fail(StageStatus::Failed, None, started, e),
    };
    let key = fp.key.clone();
    let hit = |rec: StageRecord| -> StageResult {
        if let Err(e) = restore_workspace_outs(shared, spec, &rec) {
            return StageResult::fail(StageStatus::Failed, Some(rec.key.clone()), started, e);
        }
        let _ = shared.store.set_ref(&pipeline.name, &spec.name, &rec.key);
        if let Some(t) = &shared.tracker {
            t.cached(&spec.name, &spec.params, &rec, &shared.store);
        }
        StageResult {
            status: StageStatus::Cached,
            key: Some(rec.key),
            seconds: started.elapsed().as_secs_f64(),
            message: None,
            outputs: rec.outputs,
            gate: rec.gate,
        }
    };
    match shared.store.complete_record(&key) {
        Ok(Some(rec)) => return hit(rec),
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}; recomputing"),
    }
    if let Mode::CacheOnly(message) = mode {
        return StageResult::fail(StageStatus::Failed, Some(key), started, message);
    }
    let lock_path = shared.store.lock_path(&key);
    let _lock = match KeyLock::acquire(&lock_path, &mut |holder| {
        shared.bars.println(&format!(
            "waiting for `{}` ({}) computed by {holder}",
            spec.name,
            &key[..12]
        ));
    }) {
        Ok(l) => l,
        Err(e) => {
            return StageResult::fail(
                StageStatus::Failed,
                Some(key),
                started,
                format!("cannot lock {}: {e}", lock_path.display()),
            )
        }
    };
    // Another run may have finished it while we waited.
    if let Ok(Some(rec)) = shared.store.complete_record(&key) {
        return hit(rec);
    }
    let track = shared
        .tracker
        .as_ref()
        .and_then(|t| t.stage(&spec.name, &spec.kind, &key, &spec.params));
    let result = compute(shared, spec, &fp, upstream, started, gpus, track.clone());
    if let Some(track) = &track {
        let (status, rec) = match &result {
            Ok(_) => (StageStatus::Ran, shared.store.record(&key).ok().flatten()),
            Err(StageError::Cancelled) => (StageStatus::Cancelled, None),
            Err(_) => (StageStatus::Failed, None),
        };
        track.finish(status, rec.as_ref(), &shared.store);
    }
    match result {
        Ok((outputs, gate)) => StageResult {
            status: StageStatus::Ran,
            key: Some(key),
            seconds: started.elapsed().as_secs_f64(),
            message: None,
            outputs,
            gate,
        },
        Err(StageError::Cancelled) => StageResult::fail(
            StageStatus::Cancelled,
            Some(key),
            started,
            "interrupted; its checkpoint is kept",
        ),
        Err(e) => StageResult::fail(StageStatus::Failed, Some(key), started, e.to_string()),
    }
}

fn compute(
    shared: &Shared,
    spec: &StageSpec,
    fp: &Fingerprint,
    upstream: &Outputs,
    started: Instant,
    gpus: &[u32],
    track: Option<Arc<crate::tracking::StageTrack>>,
) -> Result<(BTreeMap<String, ArtifactInfo>, Option<pipe_stages::Gate>), StageError> {
    let store = &shared.store;
    let pipeline = &shared.pipeline;
    let stage = shared
        .registry
        .get(&spec.kind)
        .expect("validated at load")
        .clone();
    let key = &fp.key;
    let store_err = |e: crate::store::StoreError| StageError::Failed(e.to_string());
    let tmp = store.tmp_dir(key).map_err(store_err)?;
    let checkpoint_dir = store.checkpoint_dir(key).map_err(store_err)?;
    let resumed = store.has_checkpoint(key);
    let mut inputs = BTreeMap::new();
    for (name, r) in &spec.inputs {
        let art = &upstream[&(r.stage.clone(), r.output.clone())];
        inputs.insert(name.clone(), store.object_path(&art.digest));
    }
    // `${stages.X.outputs.Y}` inside params become the artifacts' paths.
    let paths: HashMap<String, String> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.display().to_string()))
        .collect();
    let params = interpolate::substitute(&spec.params, &|expr| paths.get(expr).cloned());
    let log_path = tmp.path().join("log");
    let reporter = Arc::new(
        StageReporter::new(
            &spec.name,
            &log_path,
            shared.bars.stage(&spec.name),
            shared.echo_logs,
        )
        .map_err(StageError::io("creating the stage log"))?
        .with_track(track),
    );
    shared.bars.println(&format!(
        "running `{}` ({}){}",
        spec.name,
        &key[..12],
        if resumed {
            ", resuming from its checkpoint"
        } else {
            ""
        }
    ));
    let ctx = StageContext {
        stage: spec.name.clone(),
        params: params.clone(),
        inputs,
        out_dir: tmp.out(),
        checkpoint_dir,
        workdir: pipeline.workdir.clone(),
        memo_root: store.memo_root(),
        cancel: shared.cancel.clone(),
        reporter: reporter.clone(),
        gpus: gpus.to_vec(),
    };
    let started_at = now_rfc3339();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.run(&ctx)))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(StageError::Failed(format!("stage panicked: {msg}")))
        });
    reporter.finish();
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            if !matches!(e, StageError::Cancelled) {
                let log = std::fs::read(&log_path).unwrap_or_default();
                let saved = store.save_failed_log(key, &log);
                let tail: Vec<&str> = std::str::from_utf8(&log)
                    .unwrap_or("")
                    .lines()
                    .rev()
                    .take(15)
                    .collect();
                let mut msg = e.to_string();
                if !tail.is_empty() {
                    msg.push_str("\n    log tail:");
                    for line in tail.iter().rev() {
                        msg.push_str("\n    | ");
                        msg.push_str(line);
                    }
                }
                msg.push_str(&format!("\n    full log: {}", saved.display()));
                return Err(StageError::Failed(msg));
            }
            return Err(e);
        }
    };
    // Outputs into the store, then the log, then the record: a crash anywhere before the
    // record leaves only unreferenced objects.
    let mut outputs = BTreeMap::new();
    for decl in &spec.signature.outputs {
        let art = match &decl.location {
            OutputLocation::Staged(rel) => {
                let path = tmp.out().join(rel);
                if !path.exists() {
                    return Err(StageError::Failed(format!(
                        "stage finished without writing its output `{}` ({rel})",
                        decl.name
                    )));
                }
                store.put_move(&path).map_err(store_err)?
            }
            OutputLocation::Workspace(rel) => {
                let path = pipeline.workdir.join(rel);
                if !path.exists() {
                    return Err(StageError::Failed(format!(
                        "stage finished without writing its out `{rel}`"
                    )));
                }
                store.put_copy(&path, tmp.path()).map_err(store_err)?
            }
        };
        outputs.insert(decl.name.clone(), art);
    }
    let log = std::fs::read(&log_path).unwrap_or_default();
    let log_art = store.put_bytes(&log, tmp.path()).map_err(store_err)?;
    let record = StageRecord {
        key: key.clone(),
        stage: spec.name.clone(),
        pipeline: pipeline.name.clone(),
        kind: spec.kind.clone(),
        upstream: spec
            .inputs
            .iter()
            .map(|(k, r)| (k.clone(), r.to_string()))
            .collect(),
        fingerprint: fp.doc.clone(),
        outputs: outputs.clone(),
        metrics: outcome.metrics,
        gate: outcome.gate.clone(),
        log: Some(log_art.digest),
        started: started_at,
        seconds: started.elapsed().as_secs_f64(),
        host: hostname(),
    };
    store.write_record(&record).map_err(store_err)?;
    let _ = store.set_ref(&pipeline.name, &spec.name, key);
    store.remove_checkpoint(key);
    Ok((outputs, outcome.gate))
}

/// Workspace outs of a `run:` stage whose content differs from the record (or are gone).
fn stale_workspace_outs<'r>(
    shared: &Shared,
    spec: &StageSpec,
    rec: &'r StageRecord,
) -> Vec<(String, &'r ArtifactInfo)> {
    let mut stale = Vec::new();
    for decl in &spec.signature.outputs {
        let OutputLocation::Workspace(rel) = &decl.location else {
            continue;
        };
        let Some(art) = rec.outputs.get(&decl.name) else {
            continue;
        };
        let path = shared.pipeline.workdir.join(rel);
        let mut cache = shared.statcache.lock().unwrap_or_else(|e| e.into_inner());
        let same = path.exists()
            && digest::hash_path(&path, Some(&mut cache)).is_ok_and(|i| i.digest == art.digest);
        if !same {
            stale.push((rel.clone(), art));
        }
    }
    stale
}

/// After a cache hit, makes a `run:` stage's workspace outs match the stored ones.
fn restore_workspace_outs(
    shared: &Shared,
    spec: &StageSpec,
    rec: &StageRecord,
) -> Result<(), String> {
    for (rel, art) in stale_workspace_outs(shared, spec, rec) {
        let path = shared.pipeline.workdir.join(&rel);
        shared
            .store
            .export(art, &path)
            .map_err(|e| format!("restoring out `{rel}`: {e}"))?;
    }
    Ok(())
}

/// Workspace outs that differ from the record (for `pipe status`).
pub fn workspace_outs_modified(
    shared: &Shared,
    spec: &StageSpec,
    rec: &StageRecord,
) -> Vec<String> {
    stale_workspace_outs(shared, spec, rec)
        .into_iter()
        .map(|(rel, _)| rel)
        .collect()
}

impl Shared {
    /// Shared state for commands that inspect without running (status).
    pub fn inspect(pipeline: Arc<Pipeline>, store: Store, registry: Registry) -> Self {
        let statcache = StatCache::load(&store.root().join("statcache"));
        Shared {
            pipeline,
            store,
            registry,
            statcache: Mutex::new(statcache),
            bars: Bars::new(false),
            cancel: CancelToken::new(),
            echo_logs: false,
            tracker: None,
        }
    }

    /// Saves the stat cache.
    pub fn save_statcache(&self) {
        if let Ok(mut c) = self.statcache.lock() {
            let _ = c.save();
        }
    }
}

/// The current time as RFC 3339 (UTC, milliseconds, so records sort by time).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Commit of the git repository containing `dir`, read from `.git` without running git.
pub fn git_commit(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let git = dir
        .ancestors()
        .map(|a| a.join(".git"))
        .find(|g| g.exists())?;
    let git: PathBuf = if git.is_file() {
        // A worktree: `gitdir: PATH`.
        let text = std::fs::read_to_string(&git).ok()?;
        PathBuf::from(text.trim().strip_prefix("gitdir: ")?)
    } else {
        git
    };
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref: ") else {
        return Some(head.to_owned());
    };
    let common = std::fs::read_to_string(git.join("commondir"))
        .ok()
        .map(|c| git.join(c.trim()))
        .unwrap_or(git.clone());
    for base in [&git, &common] {
        if let Ok(s) = std::fs::read_to_string(base.join(reference)) {
            return Some(s.trim().to_owned());
        }
        if let Ok(packed) = std::fs::read_to_string(base.join("packed-refs")) {
            for line in packed.lines() {
                if let Some((sha, name)) = line.split_once(' ') {
                    if name == reference {
                        return Some(sha.to_owned());
                    }
                }
            }
        }
    }
    None
}
