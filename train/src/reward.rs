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

use crate::model::{Decoder, KeyMask};

/// The final hidden state at the last token of each sequence, for a frozen base
/// (no autograd graph), computed in right-padded batches of `batch`.
pub fn last_hidden(model: &Decoder, seqs: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch.max(1)) {
        let longest = chunk.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(chunk.len() * longest);
        let mut valid = Vec::with_capacity(chunk.len() * longest);
        for s in chunk {
            ids.extend(s);
            ids.extend(std::iter::repeat_n(0u32, longest - s.len()));
            valid.extend(std::iter::repeat_n(true, s.len()));
            valid.extend(std::iter::repeat_n(false, longest - s.len()));
        }
        let keys = KeyMask {
            batch: chunk.len(),
            keys: longest,
            valid,
        };
        let t = Tensor::from_vec(ids, (chunk.len(), longest), model.device())?;
        let h = model.hidden(&t, &keys, None, None)?.detach();
        for (r, s) in chunk.iter().enumerate() {
            let last = s.len().max(1) - 1;
            out.push(h.get(r)?.get(last)?.to_dtype(DType::F32)?.to_vec1()?);
        }
    }
    Ok(out)
}

/// Settings of [`train_head`].
#[derive(Debug, Clone)]
pub struct HeadSettings {
    /// Peak learning rate (constant after a linear warmup of 10% of the steps).
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Passes over the pairs.
    pub epochs: usize,
    /// Pairs per step.
    pub batch_size: usize,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: u64,
    /// Reward centering coefficient.
    pub center: f64,
    /// Data-order seed.
    pub seed: u64,
}

/// One training pair: hidden features of the chosen and rejected answers and the
/// margin the loss subtracts (pair margin plus the penalty difference).
#[derive(Debug, Clone)]
pub struct FeaturePair {
    /// Chosen answer's last hidden state.
    pub chosen: Vec<f32>,
    /// Rejected answer's last hidden state.
    pub rejected: Vec<f32>,
    /// Margin in the Bradley–Terry loss.
    pub margin: f32,
}

/// The best head's weights and the loss of every step.
pub type TrainedHead = (Vec<f32>, Vec<(u64, f64)>);

/// Trains a scalar head `score.weight [1, hidden]` (zero-initialised, so every reward
/// starts at 0) with the Bradley–Terry loss on frozen features. `eval(step, w)` scores
/// the head (higher is better) every `eval_every` steps and at the end; the best head
/// is returned with the per-step losses.
pub fn train_head(
    pairs: &[FeaturePair],
    s: &HeadSettings,
    mut eval: impl FnMut(u64, &[f32]) -> f64,
) -> Result<TrainedHead> {
    use crate::optim::{AdamW, AdamWConfig};
    let device = candle_core::Device::Cpu;
    let hidden = pairs.first().map(|p| p.chosen.len()).unwrap_or(0);
    let w = candle_core::Var::zeros((hidden, 1), DType::F32, &device)?;
    let mut opt = AdamW::new(
        vec![("score.weight".into(), w.clone())],
        AdamWConfig {
            lr: s.lr,
            weight_decay: s.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let steps_per_epoch = pairs.len().div_ceil(s.batch_size.max(1));
    let total = (steps_per_epoch * s.epochs) as u64;
    let warmup = (total / 10).max(1);
    let mut rng = crate::rng::Rng::new(s.seed);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut losses = Vec::new();
    let head =
        |w: &candle_core::Var| -> Result<Vec<f32>> { Ok(w.as_tensor().flatten_all()?.to_vec1()?) };
    let mut best = (eval(0, &head(&w)?), head(&w)?);
    let mut step = 0u64;
    for _ in 0..s.epochs {
        rng.shuffle(&mut order);
        for chunk in order.chunks(s.batch_size.max(1)) {
            let n = chunk.len();
            let flat = |f: &dyn Fn(&FeaturePair) -> &Vec<f32>| -> Vec<f32> {
                chunk
                    .iter()
                    .flat_map(|&i| f(&pairs[i]).iter().copied())
                    .collect()
            };
            let c = Tensor::from_vec(flat(&|p| &p.chosen), (n, hidden), &device)?;
            let r = Tensor::from_vec(flat(&|p| &p.rejected), (n, hidden), &device)?;
            let m = Tensor::from_vec(
                chunk.iter().map(|&i| pairs[i].margin).collect::<Vec<_>>(),
                n,
                &device,
            )?;
            let rc = c.matmul(w.as_tensor())?.squeeze(1)?;
            let rr = r.matmul(w.as_tensor())?.squeeze(1)?;
            let loss = bradley_terry(&rc, &rr, Some(&m), s.center)?;
            let grads = loss.backward()?;
            let g = match grads.get(w.as_tensor()) {
                Some(g) => g.clone(),
                None => w.as_tensor().zeros_like()?,
            };
            step += 1;
            let lr = s.lr * (step as f64 / warmup as f64).min(1.0);
            let grads: std::collections::HashMap<String, Tensor> =
                [("score.weight".to_string(), g)].into();
            opt.step(&grads, lr)?;
            losses.push((step, loss.to_dtype(DType::F64)?.to_scalar::<f64>()?));
            if step.is_multiple_of(s.eval_every.max(1)) || step == total {
                let h = head(&w)?;
                let score = eval(step, &h);
                if score > best.0 {
                    best = (score, h);
                }
            }
        }
    }
    Ok((best.1, losses))
}
