//! Metrics: pure functions from outputs and gold to numbers, shared by every family
//! that scores something (the oracle gates, `evaluate`, the preference and reward
//! stages, and the task evaluators in [`crate::task`]). They know nothing of stages
//! or files, and each is tested on hand-computed cases.

pub mod agreement;
pub mod calibration;
pub mod ranking;
pub mod regression;
