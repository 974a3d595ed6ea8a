//! The evaluation family: stages that score a model's outputs on held-out data.
//! [`evaluate`] runs the tuned and the base model on the test split and reports
//! task metrics per model and as deltas. What one output must look like and how it
//! is checked is a task ([`crate::task`]); the numbers are [`crate::metrics`]. A new
//! workflow adds its evaluator to [`crate::task`] and, where it needs a stage of its
//! own (a head evaluated on a test set, say), a file here.

pub mod dot_check;
pub mod evaluate;
