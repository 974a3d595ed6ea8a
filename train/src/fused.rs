//! Fused CPU kernels, each with a backward, for the two element-wise hot spots of
//! a training step: masked attention softmax and RMSNorm.
//!
//! Composed from candle primitives, softmax over `[b, h, s, t]` scores is six
//! passes forward and about fifteen backward (every broadcast op adds a
//! reduction), each allocating a fresh tensor; RMSNorm is similar. Those passes,
//! not the matmuls, dominated a LoRA step on CPU. Here each is one pass forward
//! and one backward, split over threads. Other devices and dtypes use the
//! composed ops (see [`crate::model`]).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

/// Runs `f(row_index, row)` over `rows` equal rows of `out`, on all cores.
pub(crate) fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows.max(1));
    let per = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (c, chunk) in out.chunks_mut(per * width).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (j, row) in chunk.chunks_mut(width).enumerate() {
                    f(c * per + j, row);
                }
            });
        }
    });
}

/// The f32 data of a contiguous CPU tensor, handed to `f`.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("fused kernels need f32 tensors on the CPU")
    };
    let (start, end) = layout.contiguous_offsets().expect("contiguous");
    Ok(f(&data[start..end]))
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: needs f32")
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: needs contiguous input")
    };
    Ok(&data[start..end])
}

/// `softmax(scale · scores + mask)` over the last axis of `[b, h, s, t]` scores;
/// `mask` is `[b, s, t]`, shared by the heads.
pub struct MaskedSoftmax {
    /// Additive mask, `[b, s, t]`.
    pub mask: Arc<Vec<f32>>,
    /// Factor on the scores.
    pub scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, q, t) = l.shape().dims4()?;
        let x = f32_slice(s, l, "masked softmax")?;
        if self.mask.len() != b * q * t {
            candle_core::bail!(
                "masked softmax: mask has {} values, expected {}",
                self.mask.len(),
                b * q * t
            )
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, t, |r, y| {
            let (bi, qi) = (r / (h * q), r % q);
            let m = &self.mask[(bi * q + qi) * t..(bi * q + qi + 1) * t];
            let xr = &x[r * t..(r + 1) * t];
            let mut max = f32::NEG_INFINITY;
            for ((o, &v), &mv) in y.iter_mut().zip(xr).zip(m) {
                *o = v * self.scale + mv;
                max = max.max(*o);
            }
            let mut sum = 0f32;
            for o in y.iter_mut() {
                *o = (*o - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            for o in y.iter_mut() {
                *o *= inv;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let t = res.dim(3)?;
        let scale = self.scale;
        let out = with_data(res, |y| {
            with_data(grad, |dy| {
                let mut out = vec![0f32; y.len()];
                par_rows(&mut out, t, |r, o| {
                    let (yr, gr) = (&y[r * t..(r + 1) * t], &dy[r * t..(r + 1) * t]);
                    let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                    for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                        *o = scale * yv * (gv - dot);
                    }
                });
                out
            })
        })??;
        Ok(Some(Tensor::from_vec(out, res.shape(), res.device())?))
    }
}

/// RMSNorm `x / √(mean(x²) + ε) · w` over the last axis, with a gradient for `x`
/// only (norm weights are frozen in LoRA training).
pub struct RmsNorm {
    /// ε.
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let x = f32_slice(s1, l1, "rms norm")?;
        let w = f32_slice(s2, l2, "rms norm weight")?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, y| {
            let xr = &x[r * d..(r + 1) * d];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((o, &v), &wv) in y.iter_mut().zip(xr).zip(w) {
                *o = v * inv * wv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let eps = self.eps;
        let out = with_data(x, |xs| {
            with_data(w, |ws| {
                with_data(grad, |dy| {
                    let mut out = vec![0f32; xs.len()];
                    par_rows(&mut out, d, |r, o| {
                        let (xr, gr) = (&xs[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                        let inv = 1.0 / (ms + eps).sqrt();
                        let dot: f32 = xr
                            .iter()
                            .zip(gr)
                            .zip(ws)
                            .map(|((a, g), wv)| a * g * wv)
                            .sum();
                        let k = inv * inv * inv * dot / d as f32;
                        for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(ws) {
                            *o = inv * wv * gv - xv * k;
                        }
                    });
                    out
                })
            })
        })???;
        Ok((Some(Tensor::from_vec(out, x.shape(), x.device())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Var {
        let mut rng = crate::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn masked_softmax_matches_composed_ops_with_gradient() {
        let x = rand(&[2, 3, 4, 5], 1);
        let mut mask = vec![0f32; 2 * 4 * 5];
        for (i, m) in mask.iter_mut().enumerate() {
            if i % 3 == 0 {
                *m = -1e30;
            }
        }
        let probe = rand(&[2, 3, 4, 5], 2);
        let fused = x
            .as_tensor()
            .apply_op1(MaskedSoftmax {
                mask: Arc::new(mask.clone()),
                scale: 0.5,
            })
            .unwrap();
        let m = Tensor::from_vec(mask, (2, 1, 4, 5), &Device::Cpu).unwrap();
        let composed = candle_nn::ops::softmax(
            &(x.as_tensor() * 0.5).unwrap().broadcast_add(&m).unwrap(),
            D::Minus1,
        )
        .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
        let ga = (fused * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (composed * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            max_diff(
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap()
            ) < 1e-5
        );
    }

    #[test]
    fn rms_norm_matches_composed_ops_with_gradient() {
        let x = rand(&[3, 7, 16], 3);
        let w = rand(&[16], 4);
        let probe = rand(&[3, 7, 16], 5);
        let fused = x
            .as_tensor()
            .apply_op2(w.as_tensor(), RmsNorm { eps: 1e-6 })
            .unwrap();
        let var = x
            .as_tensor()
            .sqr()
            .unwrap()
            .mean_keepdim(D::Minus1)
            .unwrap();
        let composed = x
            .as_tensor()
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-5);
        let ga = (fused * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (composed * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            max_diff(
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap()
            ) < 1e-5
        );
        assert!(ga.get(w.as_tensor()).is_none(), "norm weights are frozen");
    }
}
