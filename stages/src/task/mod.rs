//! Tasks: what a workflow's model must produce and how one output is checked, shared
//! by the families that generate, judge, reward or evaluate it. [`factuality`] is the
//! evidence-grounded answer format (JSON answer, citations, confidence, or a refusal)
//! that `evaluate`, `prefs_judge` and `reward_train` all check. A new workflow's
//! output format and its per-output evaluator (a confidence-token parser, a DOT
//! validator, a FinQA program executor) get a file here, so `evaluate`, `sft`'s
//! evaluation during training and the preference stages can all use it.

pub mod choice;
pub mod confidence;
pub mod dot;
pub mod factuality;
pub mod filter;
