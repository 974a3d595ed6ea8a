//! Next-token cross-entropy over labelled positions only.
//!
//! Labels follow the HF convention: `labels[t]` is the token expected at `t`,
//! `-100` means "not trained on". Only positions with a label go through
//! `lm_head`: with answer-only masks and a 49k vocabulary this skips most of the
//! largest matmul of the step.

use candle_core::{DType, Tensor, D};

use crate::cross_entropy::CrossEntropy;
use crate::error::Result;
use crate::model::{Decoder, KeyMask};
use crate::rng::Rng;

/// Label value that excludes a position from the loss.
pub const IGNORE: i64 = -100;

/// Summed next-token loss and the number of predicted tokens.
pub struct LossSum {
    /// Σ −log p(label), a scalar tensor (f32) that can be back-propagated.
    pub sum: Tensor,
    /// Tokens that contributed.
    pub tokens: usize,
}

/// The (row·s + t, label[t+1]) pairs that carry a loss.
pub fn targets(labels: &[Vec<i64>]) -> (Vec<u32>, Vec<u32>) {
    let mut at = Vec::new();
    let mut want = Vec::new();
    for (b, row) in labels.iter().enumerate() {
        let s = row.len();
        for t in 0..s.saturating_sub(1) {
            if row[t + 1] != IGNORE {
                at.push((b * s + t) as u32);
                want.push(row[t + 1] as u32);
            }
        }
    }
    (at, want)
}

/// Summed cross-entropy of the model on `ids` (`[b, s]`) against `labels`.
pub fn causal_lm_loss(
    model: &Decoder,
    ids: &Tensor,
    keys: &KeyMask,
    labels: &[Vec<i64>],
    dropout: Option<&mut Rng>,
) -> Result<LossSum> {
    let (b, s) = ids.dims2()?;
    let (at, want) = targets(labels);
    let device = model.device();
    if at.is_empty() {
        return Ok(LossSum {
            sum: Tensor::zeros((), DType::F32, device)?,
            tokens: 0,
        });
    }
    let hidden = model.hidden(ids, keys, None, dropout)?;
    let hidden = hidden.reshape((b * s, hidden.dim(D::Minus1)?))?;
    let n = at.len();
    let picked = hidden.index_select(&Tensor::from_vec(at, n, device)?, 0)?;
    let logits = model.logits(&picked)?.to_dtype(DType::F32)?;
    let nll = if device.is_cpu() {
        logits
            .contiguous()?
            .apply_op1(CrossEntropy { targets: want })?
            .sum_all()?
    } else {
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let want = Tensor::from_vec(want, (n, 1), device)?;
        logp.gather(&want, 1)?.sum_all()?.neg()?
    };
    Ok(LossSum {
        sum: nll,
        tokens: n,
    })
}
