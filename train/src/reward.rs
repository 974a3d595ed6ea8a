//! Reward-model losses: the Bradley–Terry pairwise loss with an optional margin per
//! pair and optional reward centering (TRL's `center_rewards_coefficient`):
//!
//! `loss = mean(−log σ(r_c − r_r − m)) + c · mean((r_c + r_r)²)`
//!
//! built from differentiable candle ops. −log σ(x) = log(1 + e^−x) is evaluated in f64
//! (finite for x > −709, far beyond any reward gap) so that its gradient is exact
//! everywhere, ties included: at x = 0 it is −½, which is what a zero-initialised head
//! sees on its first step.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// −log σ(x), element-wise, computed in f64 and returned in `x`'s dtype.
pub fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let x64 = x.to_dtype(DType::F64)?;
    let y = (x64.neg()?.exp()? + 1.0)?.log()?;
    Ok(y.to_dtype(x.dtype())?)
}

/// The Bradley–Terry loss of chosen vs rejected rewards (`[n]` each), with per-pair
/// `margin` (`[n]`) and centering coefficient `center` (0 to disable).
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center: f64,
) -> Result<Tensor> {
    let mut diff = (chosen - rejected)?;
    if let Some(m) = margin {
        diff = (diff - m)?;
    }
    let mut loss = neg_log_sigmoid(&diff)?.mean_all()?;
    if center != 0.0 {
        let c = (chosen + rejected)?.sqr()?.mean_all()?;
        loss = (loss + (c * center)?)?;
    }
    Ok(loss)
}
