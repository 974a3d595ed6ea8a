//! Fused CPU kernels, each with a backward, for the two element-wise hot spots of
//! a training step: masked attention softmax and RMSNorm.
//!
//! Composed from candle primitives, softmax over `[b, h, s, t]` scores is six
//! passes forward and about fifteen backward (every broadcast op adds a
//! reduction), each allocating a fresh tensor; RMSNorm is similar. Those passes,
//! not the matmuls, dominated a LoRA step on CPU. Here each is one pass forward
//! and one backward, split over threads. Other devices and dtypes use the
//! composed ops (see [`crate::model`]). Work is split over rayon's pool.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

use crate::fastmath::{self, exp};

/// Runs `f(row_index, row)` over the rows of `out` (each `width` long) on
/// rayon's pool, the one candle's own CPU kernels use, so the two never compete
/// for cores.
pub(crate) fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    let width = width.max(1);
    let rows = out.len() / width;
    let per = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, row) in chunk.chunks_mut(width).enumerate() {
                f(c * per + j, row);
            }
        });
}

/// The f32 data of a contiguous CPU tensor, handed to `f`.
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
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

/// `softmax(scale · scores + mask)` over the last axis of `[b, h, r, t]` scores;
/// `mask` is `[b, queries, t]`, shared by the heads. Row `i` of a head is query
/// `i % queries`, so grouped-query layouts (`r = rep · queries`) work too.
pub struct MaskedSoftmax {
    /// Additive mask, `[b, queries, t]`.
    pub mask: Arc<Vec<f32>>,
    /// Factor on the scores.
    pub scale: f32,
    /// Queries per batch row.
    pub queries: usize,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, q, t) = l.shape().dims4()?;
        let x = f32_slice(s, l, "masked softmax")?;
        let nq = self.queries;
        if self.mask.len() != b * nq * t || q % nq != 0 {
            candle_core::bail!(
                "masked softmax: mask has {} values, expected {}",
                self.mask.len(),
                b * nq * t
            )
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, t, |r, y| {
            let (bi, qi) = (r / (h * q), r % nq);
            let m = &self.mask[(bi * nq + qi) * t..(bi * nq + qi + 1) * t];
            let xr = &x[r * t..(r + 1) * t];
            for ((o, &v), &mv) in y.iter_mut().zip(xr).zip(m) {
                *o = v * self.scale + mv;
            }
            let max = fastmath::max(y);
            for o in y.iter_mut() {
                *o = exp(*o - max);
            }
            let inv = 1.0 / fastmath::sum(y);
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

/// HF-style (half-split) RoPE on `[b, h, s, d]` with per-row angles:
/// `cos`/`sin` are `[b, s, d/2]`. The rotation is orthogonal, so the backward is
/// the same rotation with `−sin`.
#[derive(Clone)]
pub struct Rope {
    /// Cosines, `[b, s, d/2]`.
    pub cos: Arc<Vec<f32>>,
    /// Sines, `[b, s, d/2]`.
    pub sin: Arc<Vec<f32>>,
}

impl Rope {
    fn rotate(&self, x: &[f32], dims: (usize, usize, usize, usize), sign: f32) -> Vec<f32> {
        let (_, h, s, d) = dims;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, y| {
            let (bi, si) = (r / (h * s), r % s);
            let base = (bi * s + si) * half;
            let (c, sn) = (&self.cos[base..base + half], &self.sin[base..base + half]);
            let xr = &x[r * d..(r + 1) * d];
            for i in 0..half {
                let (x1, x2, si_) = (xr[i], xr[i + half], sign * sn[i]);
                y[i] = x1 * c[i] - x2 * si_;
                y[i + half] = x2 * c[i] + x1 * si_;
            }
        });
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let x = f32_slice(s, l, "rope")?;
        Ok((
            CpuStorage::F32(self.rotate(x, dims, 1.0)),
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = grad.dims4()?;
        let out = with_data(grad, |g| self.rotate(g, dims, -1.0))?;
        Ok(Some(Tensor::from_vec(out, grad.shape(), grad.device())?))
    }
}

/// SwiGLU `silu(gate) · up` for the MLP, with gradients for both inputs.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "swiglu gate")?;
        let u = f32_slice(s2, l2, "swiglu up")?;
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, d, |r, y| {
            for (i, o) in y.iter_mut().enumerate() {
                let gv = g[r * d + i];
                *o = gv / (1.0 + exp(-gv)) * u[r * d + i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = gate.dim(candle_core::D::Minus1)?;
        let n = gate.elem_count();
        let (dg, du) = with_data(gate, |g| {
            with_data(up, |u| {
                with_data(grad, |dy| {
                    // Interleave both gradients in one buffer so one parallel pass writes them.
                    let mut both = vec![0f32; 2 * n];
                    par_rows(&mut both, 2 * d, |r, o| {
                        for i in 0..d {
                            let k = r * d + i;
                            let sig = 1.0 / (1.0 + exp(-g[k]));
                            let silu = g[k] * sig;
                            o[i] = dy[k] * u[k] * sig * (1.0 + g[k] * (1.0 - sig));
                            o[d + i] = dy[k] * silu;
                        }
                    });
                    let mut dg = Vec::with_capacity(n);
                    let mut du = Vec::with_capacity(n);
                    for row in both.chunks(2 * d) {
                        dg.extend_from_slice(&row[..d]);
                        du.extend_from_slice(&row[d..]);
                    }
                    (dg, du)
                })
            })
        })???;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
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
                queries: 4,
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

    #[test]
    fn swiglu_matches_composed_ops_with_gradients() {
        let (g, u, probe) = (
            rand(&[3, 5, 8], 1),
            rand(&[3, 5, 8], 2),
            rand(&[3, 5, 8], 3),
        );
        let fused = g.as_tensor().apply_op2(u.as_tensor(), SwiGlu).unwrap();
        let composed = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
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
        for v in [&g, &u] {
            assert!(
                max_diff(
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap()
                ) < 1e-5
            );
        }
    }

    #[test]
    fn rope_backward_is_the_inverse_rotation() {
        let x = rand(&[2, 3, 4, 8], 4);
        let probe = rand(&[2, 3, 4, 8], 5);
        let mut rng = crate::Rng::new(6);
        let angles: Vec<f32> = (0..2 * 4 * 4).map(|_| rng.normal() as f32).collect();
        let op = || Rope {
            cos: Arc::new(angles.iter().map(|a| a.cos()).collect()),
            sin: Arc::new(angles.iter().map(|a| a.sin()).collect()),
        };
        let y = x.as_tensor().apply_op1(op()).unwrap();
        // Composed reference: x·cos + rotate_half(x)·sin with [b, 1, s, d] tables.
        let c = Tensor::from_vec(op().cos.to_vec(), (2, 1, 4, 4), &Device::Cpu).unwrap();
        let s = Tensor::from_vec(op().sin.to_vec(), (2, 1, 4, 4), &Device::Cpu).unwrap();
        let c = Tensor::cat(&[&c, &c], 3).unwrap();
        let s = Tensor::cat(&[&s, &s], 3).unwrap();
        let xt = x.as_tensor();
        let rot = Tensor::cat(
            &[
                &xt.narrow(3, 4, 4).unwrap().neg().unwrap(),
                &xt.narrow(3, 0, 4).unwrap(),
            ],
            3,
        )
        .unwrap();
        let want = (xt.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-6);
        let ga = (y * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (want * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(ga.get(xt).unwrap(), gb.get(xt).unwrap()) < 1e-5);
    }
}
