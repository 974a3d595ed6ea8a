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
    if targets(labels).0.is_empty() {
        return Ok(LossSum {
            sum: Tensor::zeros((), DType::F32, model.device())?,
            tokens: 0,
        });
    }
    let hidden = model.hidden(ids, keys, None, dropout)?;
    loss_from_hidden(model, &hidden, labels)
}

/// [`causal_lm_loss`] from final hidden states `[b, s, hidden]`.
pub fn loss_from_hidden(model: &Decoder, hidden: &Tensor, labels: &[Vec<i64>]) -> Result<LossSum> {
    let (b, s, _) = hidden.dims3()?;
    let (at, want) = targets(labels);
    let device = model.device();
    if at.is_empty() {
        return Ok(LossSum {
            sum: Tensor::zeros((), DType::F32, device)?,
            tokens: 0,
        });
    }
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

/// One micro-batch: `scale · Σ loss` (as f64), the tokens it covers, and its gradient
/// for each of `vars`. With `checkpoint`, activations are recomputed layer by layer in
/// the backward pass ([`Decoder::checkpointed_grads`]) instead of kept.
pub fn loss_and_grads(
    model: &Decoder,
    batch: &crate::data::Batch,
    dropout: Option<&mut Rng>,
    scale: f64,
    vars: &[&candle_core::Var],
    checkpoint: bool,
) -> Result<(f64, usize, Vec<Option<Tensor>>)> {
    let (ids, keys, labels) = (&batch.ids, &batch.keys, batch.labels.as_slice());
    let tokens = targets(labels).0.len();
    if tokens == 0 {
        return Ok((0.0, 0, vec![None; vars.len()]));
    }
    let (value, grads) = if checkpoint {
        let head = |h: &Tensor| -> Result<Tensor> {
            Ok((loss_from_hidden(model, h, labels)?.sum * scale)?)
        };
        model.checkpointed_grads(ids, keys, dropout, vars, &head)?
    } else {
        let scaled = (causal_lm_loss(model, ids, keys, labels, dropout)?.sum * scale)?;
        let g = scaled.backward()?;
        let grads = vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
        (scaled, grads)
    };
    let value = value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((value, tokens, grads))
}
