//! Fused cross-entropy: per-row log-sum-exp and the target's log-probability in one
//! pass, and a backward that writes `softmax − onehot` directly, on the CPU and (kernels
//! `cross_entropy_fwd`/`_bwd` of `train/kernels/ops.cu`, whose CPU twin this is) on the
//! GPU. Gemma 2's final soft-capping `cap · tanh(x / cap)` is applied inside.
//!
//! The composed version (`log_softmax` then `gather`) materialises five
//! `[tokens, vocab]` tensors forward and as many backward; with SmolLM2's 49k
//! vocabulary and 1024 tokens each is 200 MB. This op keeps one (the gradient), and
//! [`crate::loss`] feeds it the logits a chunk of rows at a time.
//! Rows are split over rayon's pool.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use crate::fastmath;
use crate::fused::par_rows;

/// `nll[i] = logsumexp(z[i]) − z[i, target[i]]` for f32 `[n, vocab]` logits `x`, with
/// `z = x` or, with a soft-cap, `z = cap · tanh(x / cap)`.
pub struct CrossEntropy {
    /// Target token per row.
    pub targets: Arc<Vec<u32>>,
    /// Final-logit soft-capping.
    pub softcap: Option<f32>,
}

fn cap_fn(softcap: Option<f32>) -> impl Fn(f32) -> f32 + Sync {
    move |x| match softcap {
        Some(c) => c * (x / c).tanh(),
        None => x,
    }
}

fn logits_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("fused cross-entropy needs contiguous logits")
    };
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("fused cross-entropy needs f32 logits")
    };
    Ok(&data[start..end])
}

impl CrossEntropy {
    fn check(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let (n, v) = l.shape().dims2()?;
        if self.targets.len() != n {
            candle_core::bail!("cross-entropy: {n} rows but {} targets", self.targets.len())
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {t} outside a vocabulary of {v}")
        }
        Ok((n, v))
    }
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
        let (n, v) = self.check(layout)?;
        let data = logits_slice(storage, layout)?;
        let cap = cap_fn(self.softcap);
        let mut out = vec![0f32; n];
        par_rows(&mut out, 1, |r, o| {
            let row = &data[r * v..(r + 1) * v];
            let target = cap(row[self.targets[r] as usize]);
            o[0] = if self.softcap.is_some() {
                let z: Vec<f32> = row.iter().map(|&x| cap(x)).collect();
                let max = fastmath::max(&z);
                max + fastmath::sum_exp(&z, max).ln() - target
            } else {
                let max = fastmath::max(row);
                max + fastmath::sum_exp(row, max).ln() - target
            };
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = self.check(layout)?;
        let out = gpu::forward(self, n, v, (storage, layout))?;
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = CrossEntropyGrad {
            targets: self.targets.clone(),
            softcap: self.softcap,
        };
        let g = grad.contiguous()?;
        Ok(Some(arg.apply_op3_no_bwd(res, &g, &op)?))
    }
}

/// `g · ∂nll/∂logits` for the loss `nll = logits.apply_op1(op)` and its gradient `g`.
pub(crate) fn grad(
    logits: &Tensor,
    nll: &Tensor,
    g: &Tensor,
    op: &CrossEntropy,
) -> candle_core::Result<Tensor> {
    logits.apply_op3_no_bwd(
        nll,
        g,
        &CrossEntropyGrad {
            targets: op.targets.clone(),
            softcap: op.softcap,
        },
    )
}

/// `(logits, nll, g) → g · ∂nll/∂logits`, the gradient of [`CrossEntropy`]. The row's
/// log-sum-exp comes back from the forward's result without another pass:
/// `lse = nll + z[target]`.
struct CrossEntropyGrad {
    targets: Arc<Vec<u32>>,
    softcap: Option<f32>,
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let data = logits_slice(s1, l1)?;
        let (nll, g) = (logits_slice(s2, l2)?, logits_slice(s3, l3)?);
        let cap = cap_fn(self.softcap);
        let mut out = vec![0f32; n * v];
        par_rows(&mut out, v, |r, orow| {
            let row = &data[r * v..(r + 1) * v];
            let t = self.targets[r] as usize;
            let lse = nll[r] + cap(row[t]);
            match self.softcap {
                None => {
                    for (o, &x) in orow.iter_mut().zip(row) {
                        *o = fastmath::exp(x - lse) * g[r];
                    }
                    orow[t] -= g[r];
                }
                Some(c) => {
                    for (j, (o, &x)) in orow.iter_mut().zip(row).enumerate() {
                        let th = (x / c).tanh();
                        let dz = fastmath::exp(c * th - lse) - if j == t { 1.0 } else { 0.0 };
                        *o = g[r] * dz * (1.0 - th * th);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let out = gpu::backward(self, n, v, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from((n, v))))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use crate::kernels::gpu::{launch, rows, view};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Layout};

    type In<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn forward(
        op: &super::CrossEntropy,
        n: usize,
        v: usize,
        (s, l): In,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device().clone();
        let x = view::<f32>(s, l, "cross-entropy logits")?;
        let targets = dev.clone_htod(op.targets.as_slice())?;
        let nll = dev.alloc_zeros::<f32>(n)?;
        let (vv, cap) = (v as i32, op.softcap.unwrap_or(0.0));
        launch!(&dev, "cross_entropy_fwd", rows(n, v)?; &x, &targets, &nll, &vv, &cap);
        Ok(CudaStorage::wrap_cuda_slice(nll, dev))
    }

    pub(super) fn backward(
        op: &super::CrossEntropyGrad,
        n: usize,
        v: usize,
        (s1, l1): In,
        (s2, l2): In,
        (s3, l3): In,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s1.device().clone();
        let x = view::<f32>(s1, l1, "cross-entropy logits")?;
        let nll = view::<f32>(s2, l2, "cross-entropy loss")?;
        let g = view::<f32>(s3, l3, "cross-entropy gradient")?;
        let targets = dev.clone_htod(op.targets.as_slice())?;
        let dx = dev.alloc_zeros::<f32>(n * v)?;
        let (vv, cap) = (v as i32, op.softcap.unwrap_or(0.0));
        launch!(&dev, "cross_entropy_bwd", rows(n, v)?; &x, &targets, &nll, &g, &dx, &vv, &cap);
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn soft_capped_loss_and_gradient_match_composed_ops() {
        let mut rng = crate::Rng::new(9);
        let vals: Vec<f32> = (0..4 * 29).map(|_| (rng.normal() * 20.0) as f32).collect();
        let targets = vec![3u32, 0, 28, 11];
        let x = Var::from_vec(vals, (4, 29), &Device::Cpu).unwrap();
        let cap = 15.0f32;
        let fused = x
            .as_tensor()
            .apply_op1(CrossEntropy {
                targets: Arc::new(targets.clone()),
                softcap: Some(cap),
            })
            .unwrap();
        let z = x
            .as_tensor()
            .affine(1.0 / cap as f64, 0.0)
            .unwrap()
            .tanh()
            .unwrap()
            .affine(cap as f64, 0.0)
            .unwrap();
        let lp = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
        let t = Tensor::from_vec(targets, (4, 1), &Device::Cpu).unwrap();
        let composed = lp.gather(&t, 1).unwrap().squeeze(1).unwrap().neg().unwrap();
        let probe = Tensor::new(&[0.5f32, -1.0, 2.0, 1.5], &Device::Cpu).unwrap();
        let d = (&fused - &composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        let ga = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = crate::testutil::max_diff(
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "gradient differs by {d}");
    }

    #[test]
    fn matches_the_composed_loss_and_gradient() {
        let mut rng = crate::Rng::new(4);
        let vals: Vec<f32> = (0..5 * 37).map(|_| (rng.normal() * 3.0) as f32).collect();
        let targets: Vec<u32> = vec![0, 36, 5, 17, 5];
        let x = Var::from_vec(vals, (5, 37), &Device::Cpu).unwrap();
        let fused = x
            .as_tensor()
            .apply_op1(CrossEntropy {
                targets: Arc::new(targets.clone()),
                softcap: None,
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
