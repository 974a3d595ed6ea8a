//! The preference family: from a tuned model to preference data and a reward
//! model. [`prefs_generate`] samples candidates (memoised per generation),
//! [`prefs_judge`] scores them with a judge through the oracle layer and keeps
//! min-margin pairs, [`reward_train`] trains a reward head with Bradley–Terry and
//! anti-gaming penalties. Preference optimisation stages (DPO) belong here too.

pub mod prefs_generate;
pub mod prefs_judge;
pub mod reward_train;
