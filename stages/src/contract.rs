//! The `Stage` trait and what a stage receives while it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::params::ParamError;

/// One kind of work a pipeline can `use:`. Implementations are stateless: everything a run
/// needs arrives through [`Stage::declare`] and [`StageContext`].
pub trait Stage: Send + Sync {
    /// The name written after `uses:` in a pipeline.
    fn kind(&self) -> &'static str;

    /// Bumped whenever the stage's output for the same params and inputs changes; part of
    /// every fingerprint, so a bump invalidates all cached results of this kind.
    fn version(&self) -> u32;

    /// One line for `pipe check` listings and error help.
    fn summary(&self) -> &'static str;

    /// Validates the resolved `with:` block and says which inputs the stage takes, which
    /// workspace files it reads and which outputs it writes. Called by `pipe check`, so it
    /// must be cheap and must not touch the inputs.
    fn declare(&self, params: &Value) -> Result<Signature, ParamError>;

    /// The part of the params that determines the outputs, which is what the fingerprint
    /// covers. Params that only change how the work is done (a parser, a progress
    /// interval) can be dropped here so that changing them does not invalidate results.
    fn key_params(&self, params: &Value) -> Value {
        params.clone()
    }

    /// Does the work. Outputs go under [`StageContext::out_dir`] at the paths declared by
    /// [`Signature::outputs`]; long loops should poll [`StageContext::cancel`] and keep
    /// resumable state in [`StageContext::checkpoint_dir`].
    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError>;
}

/// What a stage consumes and produces for one set of params.
#[derive(Debug, Clone, Default)]
pub struct Signature {
    /// Named inputs: artifacts of upstream stages.
    pub inputs: Vec<InputDecl>,
    /// When true, any input name is accepted (shell stages pass them as env variables).
    pub any_inputs: bool,
    /// Workspace paths (relative to the pipeline's workdir) whose content is part of the
    /// fingerprint.
    pub deps: Vec<String>,
    /// Named outputs.
    pub outputs: Vec<OutputDecl>,
}

/// One named input of a stage.
#[derive(Debug, Clone)]
pub struct InputDecl {
    /// Name used in `inputs:`.
    pub name: String,
    /// Whether the pipeline must bind it.
    pub required: bool,
}

impl InputDecl {
    /// A required input.
    pub fn required(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            required: true,
        }
    }

    /// An optional input.
    pub fn optional(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            required: false,
        }
    }
}

/// One named output of a stage.
#[derive(Debug, Clone)]
pub struct OutputDecl {
    /// Name other stages use to refer to it (`stage.name`).
    pub name: String,
    /// Where the stage writes it.
    pub location: OutputLocation,
}

/// Where an output is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputLocation {
    /// A file or directory at this relative path under the stage's output directory; the
    /// engine moves it into the store.
    Staged(String),
    /// A file or directory at this path relative to the workdir (DVC-style `outs:`); the
    /// engine copies it into the store and restores it there on a cache hit.
    Workspace(String),
}

impl OutputDecl {
    /// An output written under the stage's output directory.
    pub fn staged(name: &str, path: &str) -> Self {
        Self {
            name: name.to_owned(),
            location: OutputLocation::Staged(path.to_owned()),
        }
    }
}

/// What a successful run reports besides its outputs.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Scalar or small structured metrics, kept in the stage record and compared by `pipe diff`.
    pub metrics: BTreeMap<String, Value>,
    /// Set by gate stages (calibrate, validate): whether downstream stages may run. The
    /// result is stored whatever the decision, so a rerun does not repeat the work.
    pub gate: Option<Gate>,
}

/// A gate stage's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Decision {
    /// Downstream stages run.
    Pass,
    /// Downstream stages wait for a person: they run only when the run names the gate
    /// with `--accept`.
    Review,
    /// Downstream stages never run on this result.
    Fail,
}

impl Decision {
    /// `PASS`, `REVIEW`, `FAIL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Pass => "PASS",
            Decision::Review => "REVIEW",
            Decision::Fail => "FAIL",
        }
    }
}

/// A decision with what a person needs to judge it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gate {
    /// The decision.
    pub decision: Decision,
    /// The human-readable report: an output name, or `OUTPUT/PATH` inside a directory output.
    pub report: String,
    /// Why, one line per threshold that was missed (empty on PASS).
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// Why a stage did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The run was cancelled (Ctrl-C); checkpoints are kept.
    #[error("cancelled")]
    Cancelled,
    /// The parameters were rejected at run time.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// The work itself failed.
    #[error("{0}")]
    Failed(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the stage was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl StageError {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StageError {
        let context = context.into();
        move |source| StageError::Io { context, source }
    }
}

/// A cheap, clonable cancellation flag shared between the engine and a running stage.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Receives progress and log lines from a running stage. The engine draws progress bars
/// and saves log lines in the stage record.
pub trait Reporter: Send + Sync {
    /// `done` of `total` units (or of an unknown total) finished.
    fn progress(&self, done: u64, total: Option<u64>, message: &str);
    /// One line for the stage log.
    fn log(&self, line: &str);
    /// Scalars of one training step (`loss`, `eval_loss`, `lr`…), as they happen, for
    /// trackers (MLflow). The stage's `metrics` output stays the record of them.
    fn scalars(&self, _step: u64, _values: &[(&str, f64)]) {}
}

/// Everything a stage sees while it runs.
pub struct StageContext {
    /// The stage's name in the pipeline (`train@small` for expanded stages).
    pub stage: String,
    /// The resolved `with:` block, with input references already replaced by paths.
    pub params: Value,
    /// Input name → read-only path of the artifact (file or directory).
    pub inputs: BTreeMap<String, PathBuf>,
    /// Empty directory for the outputs; the engine moves them into the store afterwards.
    pub out_dir: PathBuf,
    /// Durable directory tied to the stage's fingerprint: survives crashes and Ctrl-C, and
    /// is removed once the stage's result is stored.
    pub checkpoint_dir: PathBuf,
    /// Directory that relative workspace paths are resolved against.
    pub workdir: PathBuf,
    /// Durable root shared by every run and fingerprint, for memoising expensive per-item
    /// work (oracle replies, generations); see [`StageContext::memo_dir`].
    pub memo_root: PathBuf,
    /// Set when the run is interrupted.
    pub cancel: CancelToken,
    /// Progress and log sink.
    pub reporter: Arc<dyn Reporter>,
    /// The GPUs the engine gave this stage (ordinals among the process's visible GPUs),
    /// as many as its `resources: {gpu: N}`; empty when it holds none. Model stages run
    /// `device: cuda` (and `auto`) on the first; command stages see them as
    /// `CUDA_VISIBLE_DEVICES`.
    pub gpus: Vec<u32>,
}

/// `device` for a stage given `gpus` (see [`StageContext::device_for`]).
fn device_on(device: &str, gpus: &[u32]) -> String {
    // `auto` means the CPU in a build without CUDA, GPUs or not.
    let gpu = device == "cuda" || (device == "auto" && cfg!(feature = "cuda"));
    match gpus.first() {
        Some(g) if gpu => format!("cuda:{g}"),
        _ => device.to_string(),
    }
}

impl StageContext {
    /// The device a model stage runs on for its `device` param: `cuda` (and `auto` in a
    /// CUDA build) become the first GPU the engine gave the stage (so stages holding `gpu: 1` each get their
    /// own); an explicit `cuda:N` or `cpu` is kept. pipe-train trains on one GPU: a stage
    /// given several uses the first.
    pub fn device_for(&self, device: &str) -> String {
        device_on(device, &self.gpus)
    }

    /// `CUDA_VISIBLE_DEVICES` for a subprocess holding this stage's GPUs: their ids in
    /// this process's own `CUDA_VISIBLE_DEVICES` when it has one, else the ordinals.
    pub fn cuda_visible_devices(&self) -> Option<String> {
        if self.gpus.is_empty() {
            return None;
        }
        let parent: Option<Vec<String>> = std::env::var("CUDA_VISIBLE_DEVICES").ok().map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        });
        let ids: Vec<String> = self
            .gpus
            .iter()
            .map(|&g| match &parent {
                Some(p) if (g as usize) < p.len() => p[g as usize].clone(),
                _ => g.to_string(),
            })
            .collect();
        Some(ids.join(","))
    }

    /// Path of an input, or a clear error naming it when it is not bound.
    pub fn input(&self, name: &str) -> Result<&Path, StageError> {
        self.inputs.get(name).map(PathBuf::as_path).ok_or_else(|| {
            StageError::Failed(format!(
                "input `{name}` is not bound for stage `{}`",
                self.stage
            ))
        })
    }

    /// A durable directory shared by all stages that use `namespace`, across runs and
    /// fingerprints. What a stage puts there must be keyed by everything that determines
    /// it; the engine never invalidates it (`pipe gc --memo` clears it).
    pub fn memo_dir(&self, namespace: &str) -> PathBuf {
        self.memo_root.join(namespace)
    }

    /// Returns `Err(Cancelled)` once the run has been interrupted.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Reports progress.
    pub fn progress(&self, done: u64, total: Option<u64>, message: &str) {
        self.reporter.progress(done, total, message);
    }

    /// Writes one line to the stage log.
    pub fn log(&self, line: &str) {
        self.reporter.log(line);
    }

    /// Reports one step's scalars to whatever tracks the run (see [`Reporter::scalars`]).
    pub fn scalars(&self, step: u64, values: &[(&str, f64)]) {
        self.reporter.scalars(step, values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_stages_run_on_the_gpu_the_engine_gave_them() {
        assert_eq!(device_on("cuda", &[1]), "cuda:1");
        let auto = if cfg!(feature = "cuda") {
            "cuda:2"
        } else {
            "auto"
        };
        assert_eq!(device_on("auto", &[2, 3]), auto);
        assert_eq!(device_on("cuda", &[]), "cuda");
        assert_eq!(
            device_on("cuda:0", &[1]),
            "cuda:0",
            "an explicit GPU is kept"
        );
        assert_eq!(device_on("cpu", &[1]), "cpu");
    }
}
