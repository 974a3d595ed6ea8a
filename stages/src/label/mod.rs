//! The labelling family: stages that put an oracle to work on data, and the gates
//! that measure it first. [`calibrate`] and [`validate`] sample, label, compare with
//! gold and decide PASS / REVIEW / FAIL (shared machinery in `gate`, the report in
//! `report`); [`batch_label`] labels a whole corpus. The oracle itself (spec,
//! backends, memo, budget) is the shared [`crate::oracle`] layer.

pub mod batch_label;
pub mod calibrate;
mod gate;
mod report;
pub mod score_gate;
pub mod validate;
