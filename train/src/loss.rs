//! Next-token cross-entropy over labelled positions only.
//!
//! Labels follow the HF convention: `labels[t]` is the token expected at `t`,
//! `-100` means "not trained on". Only positions with a label go through
//! `lm_head`: with answer-only masks and a 49k vocabulary this skips most of the
//! largest matmul of the step.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

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
    let nll = nll_rows(model, &picked, want, LOGIT_BUDGET)?.sum_all()?;
    Ok(LossSum {
        sum: nll,
        tokens: n,
    })
}

/// Logit values the loss holds at once (128 MB of f32): rows beyond `LOGIT_BUDGET /
/// vocab` go through the output projection a chunk at a time.
pub const LOGIT_BUDGET: usize = 32 << 20;

/// Per-row `−log p(want[i] | picked[i])` for hidden states `picked: [n, hidden]`.
///
/// When the output projection is a plain frozen matrix (no LoRA, no bias, not packed,
/// no trained token columns), the `[n, vocab]` logits never exist as a whole: the
/// forward computes them `budget / vocab` rows at a time, keeps only each row's loss,
/// and the backward recomputes each chunk's logits to write its share of the hidden
/// states' gradient (`dh = (softmax − onehot) · W`). Otherwise the logits of all rows
/// are computed at once, as [`Decoder::logits`] does.
pub fn nll_rows(model: &Decoder, picked: &Tensor, want: Vec<u32>, budget: usize) -> Result<Tensor> {
    let targets = Arc::new(want);
    match model.plain_lm_head() {
        Some((w, softcap)) => {
            let rows = (budget / w.dim(0)?.max(1)).max(1);
            let op = ChunkedLmHeadLoss {
                w: w.clone(),
                targets,
                softcap,
                rows,
            };
            if picked.dim(0)? <= rows {
                // One chunk: the plain graph (its logits are what the backward needs).
                return Ok(op.logits(picked)?.apply_op1(op.ce(0, picked.dim(0)?))?);
            }
            let nll = op.forward(&picked.detach())?;
            Ok(picked.apply_op2(&nll, op)?)
        }
        None => {
            let logits = model.logits(picked)?.to_dtype(DType::F32)?.contiguous()?;
            Ok(logits.apply_op1(CrossEntropy {
                targets,
                softcap: None,
            })?)
        }
    }
}

/// The chunked loss of [`nll_rows`]: applied to `(hidden, nll)`, where `nll` is the
/// loss [`ChunkedLmHeadLoss::forward`] computed without a graph; it returns `nll` and
/// back-propagates into `hidden` chunk by chunk.
struct ChunkedLmHeadLoss {
    /// `[vocab, hidden]`, frozen.
    w: Tensor,
    targets: Arc<Vec<u32>>,
    softcap: Option<f32>,
    /// Rows per chunk.
    rows: usize,
}

impl ChunkedLmHeadLoss {
    fn logits(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        crate::linear::frozen_matmul(h, &self.w)?
            .to_dtype(DType::F32)?
            .contiguous()
    }

    fn ce(&self, start: usize, len: usize) -> CrossEntropy {
        CrossEntropy {
            targets: Arc::new(self.targets[start..start + len].to_vec()),
            softcap: self.softcap,
        }
    }

    fn chunks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..n)
            .step_by(self.rows)
            .map(move |a| (a, self.rows.min(n - a)))
    }

    /// The per-row loss, one chunk of logits at a time, recording nothing.
    fn forward(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let parts = self
            .chunks(h.dim(0)?)
            .map(|(a, len)| {
                self.logits(&h.narrow(0, a, len)?)?
                    .apply_op1_no_bwd(&self.ce(a, len))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

impl CustomOp2 for ChunkedLmHeadLoss {
    fn name(&self) -> &'static str {
        "chunked-lm-head-loss"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        nll: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let h = hidden.detach();
        let parts = self
            .chunks(h.dim(0)?)
            .map(|(a, len)| {
                let logits = self.logits(&h.narrow(0, a, len)?)?;
                let d = crate::cross_entropy::grad(
                    &logits,
                    &nll.narrow(0, a, len)?.contiguous()?,
                    &grad.narrow(0, a, len)?.contiguous()?,
                    &self.ce(a, len),
                )?;
                d.to_dtype(self.w.dtype())?.matmul(&self.w)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((
            Some(Tensor::cat(&parts, 0)?.to_dtype(hidden.dtype())?),
            None,
        ))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, Config};
    use candle_core::{Device, Var};

    #[test]
    fn chunked_lm_head_loss_equals_the_whole_logits_loss_and_gradient() {
        for arch in [Architecture::Llama, Architecture::Gemma2] {
            let cfg = Config::tiny(arch, 300);
            let w = crate::weights::Weights::random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
            let model = Decoder::new(&cfg, w).unwrap();
            assert!(model.plain_lm_head().is_some());
            let mut rng = Rng::new(5);
            let (n, h) = (11, cfg.hidden_size);
            let v: Vec<f32> = (0..n * h).map(|_| rng.normal() as f32).collect();
            let hidden = Var::from_vec(v, (n, h), &Device::Cpu).unwrap();
            let want: Vec<u32> = (0..n).map(|i| (i * 37 % 300) as u32).collect();
            let run = |budget: usize| {
                let nll = nll_rows(&model, hidden.as_tensor(), want.clone(), budget).unwrap();
                let loss = nll.sum_all().unwrap();
                let g = loss.backward().unwrap();
                (
                    nll.to_vec1::<f32>().unwrap(),
                    g.get(hidden.as_tensor()).unwrap().clone(),
                )
            };
            // One chunk (the plain graph) against chunks of 2 rows (forward without a
            // graph, the backward recomputing each chunk's logits).
            let (whole, gw) = run(usize::MAX);
            let (chunked, gc) = run(2 * 300);
            for (a, b) in whole.iter().zip(&chunked) {
                assert!((a - b).abs() < 1e-5, "{arch:?}: {a} vs {b}");
            }
            let d = crate::testutil::max_diff(&gw, &gc);
            assert!(d < 1e-6, "{arch:?}: hidden gradient differs by {d}");
        }
    }
}
