//! Fused cross-entropy for the CPU: per-row log-sum-exp and the target's
//! log-probability in one pass, and a backward that writes `softmax − onehot`
//! directly.
//!
//! The composed version (`log_softmax` then `gather`) materialises five
//! `[tokens, vocab]` tensors forward and as many backward; with SmolLM2's 49k
//! vocabulary and 1024 tokens each is 200 MB. This op keeps one (the gradient).
//! Rows are split over rayon's pool.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::fastmath;
use crate::fused::{par_rows, with_data};

/// `nll[i] = logsumexp(logits[i]) − logits[i, target[i]]` for f32 `[n, vocab]` logits.
pub struct CrossEntropy {
    /// Target token per row.
    pub targets: Vec<u32>,
}

fn row_lse(row: &[f32]) -> f32 {
    let max = fastmath::max(row);
    max + fastmath::sum_exp(row, max).ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused cross-entropy needs contiguous logits")
        };
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused cross-entropy needs f32 logits")
        };
        let data = &data[start..end];
        let mut out = vec![0f32; n];
        par_rows(&mut out, 1, |r, o| {
            let row = &data[r * v..(r + 1) * v];
            o[0] = row_lse(row) - row[self.targets[r] as usize];
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        // The forward's log-sum-exp, recovered without another pass: lse = nll + x[target].
        let nll: Vec<f32> = res.to_vec1()?;
        let g: Vec<f32> = grad.to_vec1()?;
        let out = with_data(arg, |data| {
            let mut out = vec![0f32; n * v];
            par_rows(&mut out, v, |r, orow| {
                let row = &data[r * v..(r + 1) * v];
                let lse = nll[r] + row[self.targets[r] as usize];
                for (o, &x) in orow.iter_mut().zip(row) {
                    *o = fastmath::exp(x - lse) * g[r];
                }
                orow[self.targets[r] as usize] -= g[r];
            });
            out
        })?;
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_the_composed_loss_and_gradient() {
        let mut rng = crate::Rng::new(4);
        let vals: Vec<f32> = (0..5 * 37).map(|_| (rng.normal() * 3.0) as f32).collect();
        let targets: Vec<u32> = vec![0, 36, 5, 17, 5];
        let x = Var::from_vec(vals, (5, 37), &Device::Cpu).unwrap();
        let fused = x
            .as_tensor()
            .apply_op1(CrossEntropy {
                targets: targets.clone(),
            })
            .unwrap()
            .sum_all()
            .unwrap();
        let lp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap();
        let t = Tensor::from_vec(targets, (5, 1), &Device::Cpu).unwrap();
        let composed = lp.gather(&t, 1).unwrap().sum_all().unwrap().neg().unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        let ga = fused
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let gb = composed
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let d = (ga - gb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "gradient differs by {d}");
    }
}
