//! The language-model family: stages that fine-tune or run a causal LM. [`sft`]
//! trains a LoRA adapter, [`generate`] completes prompts with a model (and adapter),
//! [`merge`] folds an adapter into its base as a full HF folder; [`eval_tasks`] are
//! the task metrics `sft` measures on generations while it trains. Model loading and
//! chat are the shared [`crate::model`] part; the training itself is pipe-train's.

pub mod eval_tasks;
pub mod generate;
pub mod merge;
pub mod sft;
pub mod tag_confidence;
