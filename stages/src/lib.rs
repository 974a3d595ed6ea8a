//! pipe-stages: the contract between pipe's engine and the work a stage does, plus the
//! built-in stage kinds.
//!
//! The engine (crate `pipe`) builds a [`Registry`] of [`Stage`]s once and never names a
//! concrete kind. A stage sees only what [`StageContext`] hands it: its typed parameters,
//! input paths, an output directory, a durable checkpoint directory, a cancel token and a
//! reporter for progress and log lines. It never sees the DAG or the store. Heavy ML work
//! is delegated to `pipe-train`.
#![warn(missing_docs)]

pub mod answer_schema;
pub mod batch_label;
pub mod bm25;
pub mod build_data;
pub mod calibrate;
pub mod chat;
pub mod command;
mod contract;
pub mod evaluate;
pub mod fsio;
pub mod generate;
pub mod merge;
mod ml;
pub mod oracle;
pub mod oracle_task;
mod params;
mod plot;
pub mod prefs_generate;
pub mod prefs_judge;
pub mod readers;
mod registry;
pub mod reward_train;
pub mod scoring;
pub mod sft;
pub mod split;

pub use contract::{
    CancelToken, Decision, Gate, InputDecl, Outcome, OutputDecl, OutputLocation, Reporter,
    Signature, Stage, StageContext, StageError,
};
pub use params::{parse_params, suggest, ParamError};
pub use registry::Registry;

/// The registry of every built-in stage kind, ready to hand to the engine.
pub fn builtin() -> Registry {
    let mut registry = Registry::new();
    registry.register(command::CommandStage);
    registry.register(split::SplitStage);
    registry.register(build_data::BuildDataStage);
    registry.register(sft::SftStage);
    registry.register(generate::GenerateStage);
    registry.register(merge::MergeStage);
    registry.register(calibrate::CalibrateStage);
    registry.register(calibrate::ValidateStage);
    registry.register(batch_label::BatchLabelStage);
    registry.register(evaluate::EvaluateStage);
    registry.register(prefs_generate::PrefsGenerateStage);
    registry.register(prefs_judge::PrefsJudgeStage);
    registry.register(reward_train::RewardTrainStage);
    registry
}

/// Process-wide setup the model stages benefit from (glibc keeps freed memory for
/// reuse instead of returning it to the kernel, see `pipe_train::allocator`; the
/// CPU thread count is computed once, see `pipe_train::fix_thread_count`).
/// Binaries call it first thing in `main`.
pub fn prepare_process() {
    pipe_train::allocator::keep_freed_memory();
    pipe_train::fix_thread_count();
}
