//! pipe-stages: the contract between pipe's engine and the work a stage does, plus the
//! built-in stage kinds.
//!
//! The engine (crate `pipe`) builds a [`Registry`] of [`Stage`]s once and never names a
//! concrete kind. A stage sees only what [`StageContext`] hands it: its typed parameters,
//! input paths, an output directory, a durable checkpoint directory, a cancel token and a
//! reporter for progress and log lines. It never sees the DAG or the store. Heavy ML work
//! is delegated to `pipe-train`.
//!
//! The crate has three layers, and dependencies point down only:
//! - **The contract**: [`Stage`] and what it receives (`contract`), typed params with
//!   "did you mean" (`params`), the [`Registry`], atomic writes ([`fsio`]), and the `run:`
//!   form ([`command`]), the one kind the engine knows by name.
//! - **Shared parts**, which hold no stage kind: [`records`] (JSONL record files),
//!   [`prompt`] (templates rendered per record), [`model`] (loading a model, chat),
//!   [`oracle`] (the oracle layer: spec, backends, memo, budget), [`metrics`] (pure
//!   scores), [`task`] (output formats and their checkers), [`figure`] (charts) and
//!   [`scalars`] (step scalars of training stages, TensorBoard event files).
//! - **Families** of stage kinds, each depending on the contract and the shared parts,
//!   never on another family: [`data`] (readers, `build_data`, `split`), [`label`]
//!   (`calibrate`, `validate`, `batch_label`), [`lm`] (`sft`, `generate`, `merge`),
//!   [`eval`] (`evaluate`) and [`prefs`] (`prefs_generate`, `prefs_judge`,
//!   `reward_train`) and [`heads`] (`head_train`, `head_eval`: sequence heads). A kind
//!   lives in `FAMILY/KIND.rs` and is registered in [`builtin`].
#![warn(missing_docs)]

pub mod command;
mod contract;
pub mod fsio;
mod params;
mod registry;

pub mod figure;
pub mod metrics;
pub mod model;
pub mod oracle;
pub mod prompt;
pub mod records;
pub mod scalars;
pub mod task;

pub mod data;
pub mod eval;
pub mod heads;
pub mod label;
pub mod lm;
pub mod prefs;

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
    registry.register(data::split::SplitStage);
    registry.register(data::build_data::BuildDataStage);
    registry.register(data::dot_pairs::DotPairsStage);
    registry.register(lm::sft::SftStage);
    registry.register(lm::tag_confidence::TagConfidenceStage);
    registry.register(lm::generate::GenerateStage);
    registry.register(lm::merge::MergeStage);
    registry.register(label::calibrate::CalibrateStage);
    registry.register(label::validate::ValidateStage);
    registry.register(label::batch_label::BatchLabelStage);
    registry.register(eval::evaluate::EvaluateStage);
    registry.register(eval::dot_check::DotCheckStage);
    registry.register(prefs::prefs_generate::PrefsGenerateStage);
    registry.register(prefs::prefs_judge::PrefsJudgeStage);
    registry.register(prefs::reward_train::RewardTrainStage);
    registry.register(heads::head_train::HeadTrainStage);
    registry.register(heads::head_eval::HeadEvalStage);
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
