//! Fused kernels, each with a backward, for the element-wise hot spots of a training
//! step: masked attention softmax, RMSNorm, RoPE and the gated MLP activation.
//!
//! Composed from candle primitives, softmax over `[b, h, s, t]` scores is six
//! passes forward and about fifteen backward (every broadcast op adds a
//! reduction), each allocating a fresh tensor; RMSNorm is similar. Those passes,
//! not the matmuls, dominated a LoRA step on CPU. Here each is one pass forward
//! and one backward, split over threads (rayon's pool). RMSNorm, RoPE and the gated
//! activations also run on the GPU (f32 or bf16) through the kernels of
//! `train/kernels/ops.cu` (see [`crate::kernels`]), whose CPU twins these are; the
//! masked softmax is CPU-only (the GPU uses [`crate::attention`]).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

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
                *o = flush(exp(*o - max));
            }
            let inv = 1.0 / fastmath::sum(y);
            for o in y.iter_mut() {
                *o = flush(*o * inv);
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

/// Probabilities below the smallest normal f32 become 0. Subnormal values are worth
/// nothing to attention, but every multiply-add that touches one takes the CPU's slow
/// path: left in, they made the `probs · V` matmul of a 600-token SmolLM2 prefill 100×
/// slower than the same matmul on normal numbers (258 ms instead of 2.6 ms per layer).
#[inline]
fn flush(p: f32) -> f32 {
    if p < f32::MIN_POSITIVE {
        0.0
    } else {
        p
    }
}

/// RMSNorm `x / √(mean(x²) + ε) · w` over the last axis, with a gradient for `x`
/// only (norm weights are frozen in LoRA training). `w` is f32 (Gemma's `1 + w` is
/// folded in by the caller). On the CPU `x` is f32; on the GPU f32 or bf16, where
/// `round_first` rounds the normalised value to bf16 before the weight multiplies it,
/// as transformers' Llama does (Gemma multiplies in f32 and rounds once).
pub struct RmsNorm {
    /// ε.
    pub eps: f32,
    /// Round `x / rms` to the activation dtype before multiplying by `w`.
    pub round_first: bool,
}

fn rms_dims(l: &Layout) -> (usize, usize) {
    let d = l.shape().dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / d.max(1), d)
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
        let (_, d) = rms_dims(l1);
        let x = f32_slice(s1, l1, "rms norm")?;
        let w = f32_slice(s2, l2, "rms norm weight")?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, y| {
            let xr = &x[r * d..(r + 1) * d];
            let ms = fastmath::sum_squares(xr) / d as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((o, &v), &wv) in y.iter_mut().zip(xr).zip(w) {
                *o = v * inv * wv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = gpu::rms_norm_fwd(self, (s1, l1), (s2, l2))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// The input gradient of [`RmsNorm`]: `(x, w, dy) → dx`.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
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
        let (_, d) = rms_dims(l1);
        let xs = f32_slice(s1, l1, "rms norm backward")?;
        let ws = f32_slice(s2, l2, "rms norm backward weight")?;
        let dy = f32_slice(s3, l3, "rms norm backward gradient")?;
        let eps = self.eps;
        let mut out = vec![0f32; xs.len()];
        par_rows(&mut out, d, |r, o| {
            let (xr, gr) = (&xs[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let ms = fastmath::sum_squares(xr) / d as f32;
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
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        let out = gpu::rms_norm_bwd(self.eps, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, l1.shape().clone()))
    }
}

/// HF-style (half-split) RoPE on `x: [b, h, s, d]` with per-row angles, applied as
/// `x.apply_op3(cos, sin, Rope)` with f32 `cos`/`sin` of shape `[b, s, d/2]`. The
/// rotation is orthogonal, so the backward is the same op with `−sin`.
#[derive(Clone, Copy)]
pub struct Rope {
    /// 1 forward, −1 for the inverse rotation.
    pub sign: f32,
}

impl Rope {
    /// The forward rotation.
    pub const FORWARD: Rope = Rope { sign: 1.0 };

    fn rotate(
        &self,
        x: &[f32],
        c: &[f32],
        sn: &[f32],
        dims: (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let (_, h, s, d) = dims;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, y| {
            let (bi, si) = (r / (h * s), r % s);
            let base = (bi * s + si) * half;
            let (c, sn) = (&c[base..base + half], &sn[base..base + half]);
            let xr = &x[r * d..(r + 1) * d];
            for i in 0..half {
                let (x1, x2, si_) = (xr[i], xr[i + half], self.sign * sn[i]);
                y[i] = x1 * c[i] - x2 * si_;
                y[i + half] = x2 * c[i] + x1 * si_;
            }
        });
        out
    }
}

fn rope_check(
    lx: &Layout,
    lc: &Layout,
    ls: &Layout,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (b, h, s, d) = lx.shape().dims4()?;
    let want = b * s * (d / 2);
    if d % 2 != 0 || lc.shape().elem_count() != want || ls.shape().elem_count() != want {
        candle_core::bail!(
            "rope: x {:?} needs [{b}, {s}, {}] angle tables, got {:?} and {:?}",
            lx.shape(),
            d / 2,
            lc.shape(),
            ls.shape()
        )
    }
    Ok((b, h, s, d))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let dims = rope_check(l1, l2, l3)?;
        let x = f32_slice(s1, l1, "rope")?;
        let (c, sn) = (
            f32_slice(s2, l2, "rope cos")?,
            f32_slice(s3, l3, "rope sin")?,
        );
        Ok((
            CpuStorage::F32(self.rotate(x, c, sn, dims)),
            l1.shape().clone(),
        ))
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
        let dims = rope_check(l1, l2, l3)?;
        let out = gpu::rope(self.sign, dims, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope { sign: -self.sign };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

/// The activation of a gated MLP: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GluAct {
    /// SiLU (SwiGLU: Llama, Qwen, Mistral, Phi-3).
    Silu,
    /// GELU, tanh approximation (GeGLU: Gemma).
    GeluTanh,
    /// GELU with the exact erf.
    GeluErf,
}

impl GluAct {
    /// The number the GPU kernels use for the activation.
    pub fn code(self) -> i32 {
        match self {
            GluAct::Silu => 0,
            GluAct::GeluTanh => 1,
            GluAct::GeluErf => 2,
        }
    }

    /// `(act(g), act'(g))`, as the GPU kernel computes them.
    pub fn value_and_grad(self, g: f32) -> (f32, f32) {
        match self {
            GluAct::Silu => {
                let sig = 1.0 / (1.0 + exp(-g));
                (g * sig, sig * (1.0 + g * (1.0 - sig)))
            }
            GluAct::GeluTanh => {
                const C: f32 = 0.797_884_6; // √(2/π)
                let th = (C * (g + 0.044715 * g * g * g)).tanh();
                let d = 0.5 * (1.0 + th)
                    + 0.5 * g * (1.0 - th * th) * C * (1.0 + 3.0 * 0.044715 * g * g);
                (0.5 * g * (1.0 + th), d)
            }
            GluAct::GeluErf => {
                let e = candle_core::cpu::erf::erf_f32(g * std::f32::consts::FRAC_1_SQRT_2);
                let pdf = 0.398_942_3 * (-0.5 * g * g).exp(); // φ(g)
                (0.5 * g * (1.0 + e), 0.5 * (1.0 + e) + g * pdf)
            }
        }
    }
}

/// `act(gate) · up` for the MLP, with gradients for both inputs.
pub struct Glu {
    /// The activation.
    pub act: GluAct,
}

/// The pair of a [`Glu`] and its shape checks.
fn glu_check(l1: &Layout, l2: &Layout) -> candle_core::Result<()> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("gated MLP: gate {:?} but up {:?}", l1.shape(), l2.shape())
    }
    Ok(())
}

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        "fused-glu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        glu_check(l1, l2)?;
        let g = f32_slice(s1, l1, "glu gate")?;
        let u = f32_slice(s2, l2, "glu up")?;
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, d, |r, y| {
            let (gr, ur) = (&g[r * d..(r + 1) * d], &u[r * d..(r + 1) * d]);
            // The activation chosen once per row, so the loop has no branch and
            // no derivative to compute (the forward pass of inference needs neither).
            match self.act {
                GluAct::Silu => {
                    for ((o, &gv), &uv) in y.iter_mut().zip(gr).zip(ur) {
                        *o = gv / (1.0 + exp(-gv)) * uv;
                    }
                }
                act => {
                    for ((o, &gv), &uv) in y.iter_mut().zip(gr).zip(ur) {
                        *o = act.value_and_grad(gv).0 * uv;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        glu_check(l1, l2)?;
        let out = gpu::glu_fwd(self.act.code(), (s1, l1), (s2, l2))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &GluGrad { act: self.act })?;
        Ok((
            Some(both.narrow(0, 0, n)?.reshape(gate.shape())?),
            Some(both.narrow(0, n, n)?.reshape(up.shape())?),
        ))
    }
}

/// `(gate, up, dy) → [d gate | d up]` (flat), the gradients of [`Glu`].
struct GluGrad {
    act: GluAct,
}

impl CustomOp3 for GluGrad {
    fn name(&self) -> &'static str {
        "fused-glu-grad"
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
        glu_check(l1, l2)?;
        let g = f32_slice(s1, l1, "glu backward gate")?;
        let u = f32_slice(s2, l2, "glu backward up")?;
        let dy = f32_slice(s3, l3, "glu backward gradient")?;
        let n = g.len();
        let mut both = vec![0f32; 2 * n];
        {
            use rayon::prelude::*;
            let (dg, du) = both.split_at_mut(n);
            let chunk = 4096;
            dg.par_chunks_mut(chunk)
                .zip(du.par_chunks_mut(chunk))
                .enumerate()
                .for_each(|(c, (dg, du))| {
                    for (j, (a, b)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
                        let k = c * chunk + j;
                        let (v, dv) = self.act.value_and_grad(g[k]);
                        *a = dy[k] * u[k] * dv;
                        *b = dy[k] * v;
                    }
                });
        }
        Ok((CpuStorage::F32(both), Shape::from(2 * n)))
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
        glu_check(l1, l2)?;
        let out = gpu::glu_bwd(self.act.code(), (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    //! Launches of the RMSNorm, RoPE and gated-MLP kernels of `train/kernels/ops.cu`.
    use crate::kernels::gpu::{elements, launch, rows, typed, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, DType, Layout};

    type In<'a> = (&'a CudaStorage, &'a Layout);

    /// Runs `f::<T>` for the storage's dtype (f32 or bf16).
    macro_rules! by_dtype {
        ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
            match $dtype {
                DType::F32 => $f::<f32>($($arg),*),
                DType::BF16 => $f::<half::bf16>($($arg),*),
                other => candle_core::bail!("the GPU kernels take f32 or bf16, not {other:?}"),
            }
        };
    }

    trait Elem: CudaDType + DeviceRepr + ValidAsZeroBits {}
    impl Elem for f32 {}
    impl Elem for half::bf16 {}

    pub(super) fn rms_norm_fwd(
        op: &super::RmsNorm,
        x: In,
        w: In,
    ) -> candle_core::Result<CudaStorage> {
        fn go<T: Elem>(
            op: &super::RmsNorm,
            (sx, lx): In,
            (sw, lw): In,
        ) -> candle_core::Result<CudaStorage> {
            let dev = sx.device().clone();
            let (n, d) = super::rms_dims(lx);
            let (x, w) = (
                view::<T>(sx, lx, "rms norm")?,
                view::<f32>(sw, lw, "rms norm weight")?,
            );
            let y = dev.alloc_zeros::<T>(n * d)?;
            let (dd, eps, round) = (d as i32, op.eps, op.round_first as i32);
            let name = typed("rms_norm_fwd", sx.dtype())?;
            launch!(&dev, &name, rows(n, d)?; &x, &w, &y, &dd, &eps, &round);
            Ok(CudaStorage::wrap_cuda_slice(y, dev))
        }
        by_dtype!(x.0.dtype(), go(op, x, w))
    }

    pub(super) fn rms_norm_bwd(eps: f32, x: In, w: In, dy: In) -> candle_core::Result<CudaStorage> {
        fn go<T: Elem>(
            eps: f32,
            (sx, lx): In,
            (sw, lw): In,
            (sg, lg): In,
        ) -> candle_core::Result<CudaStorage> {
            let dev = sx.device().clone();
            let (n, d) = super::rms_dims(lx);
            let x = view::<T>(sx, lx, "rms norm backward")?;
            let w = view::<f32>(sw, lw, "rms norm backward weight")?;
            let g = view::<T>(sg, lg, "rms norm backward gradient")?;
            let dx = dev.alloc_zeros::<T>(n * d)?;
            let dd = d as i32;
            let name = typed("rms_norm_bwd", sx.dtype())?;
            launch!(&dev, &name, rows(n, d)?; &x, &w, &g, &dx, &dd, &eps);
            Ok(CudaStorage::wrap_cuda_slice(dx, dev))
        }
        by_dtype!(x.0.dtype(), go(eps, x, w, dy))
    }

    pub(super) fn rope(
        sign: f32,
        dims: (usize, usize, usize, usize),
        x: In,
        cos: In,
        sin: In,
    ) -> candle_core::Result<CudaStorage> {
        fn go<T: Elem>(
            sign: f32,
            (bb, h, s, d): (usize, usize, usize, usize),
            (sx, lx): In,
            (sc, lc): In,
            (ss, ls): In,
        ) -> candle_core::Result<CudaStorage> {
            let dev = sx.device().clone();
            let x = view::<T>(sx, lx, "rope")?;
            let (c, sn) = (
                view::<f32>(sc, lc, "rope cos")?,
                view::<f32>(ss, ls, "rope sin")?,
            );
            let y = dev.alloc_zeros::<T>(bb * h * s * d)?;
            let [ib, ih, is, id] = [bb, h, s, d].map(|v| v as i32);
            let name = typed("rope", sx.dtype())?;
            launch!(&dev, &name, elements(bb * h * s * d / 2); &x, &c, &sn, &y, &ib, &ih, &is, &id, &sign);
            Ok(CudaStorage::wrap_cuda_slice(y, dev))
        }
        by_dtype!(x.0.dtype(), go(sign, dims, x, cos, sin))
    }

    pub(super) fn glu_fwd(act: i32, g: In, u: In) -> candle_core::Result<CudaStorage> {
        fn go<T: Elem>(act: i32, (sg, lg): In, (su, lu): In) -> candle_core::Result<CudaStorage> {
            let dev = sg.device().clone();
            let n = lg.shape().elem_count();
            let (g, u) = (view::<T>(sg, lg, "glu gate")?, view::<T>(su, lu, "glu up")?);
            let y = dev.alloc_zeros::<T>(n)?;
            let name = typed("glu_fwd", sg.dtype())?;
            launch!(&dev, &name, elements(n); &g, &u, &y, &n, &act);
            Ok(CudaStorage::wrap_cuda_slice(y, dev))
        }
        by_dtype!(g.0.dtype(), go(act, g, u))
    }

    pub(super) fn glu_bwd(act: i32, g: In, u: In, dy: In) -> candle_core::Result<CudaStorage> {
        fn go<T: Elem>(
            act: i32,
            (sg, lg): In,
            (su, lu): In,
            (sd, ld): In,
        ) -> candle_core::Result<CudaStorage> {
            let dev = sg.device().clone();
            let n = lg.shape().elem_count();
            let g = view::<T>(sg, lg, "glu backward gate")?;
            let u = view::<T>(su, lu, "glu backward up")?;
            let dy = view::<T>(sd, ld, "glu backward gradient")?;
            let out = dev.alloc_zeros::<T>(2 * n)?;
            let name = typed("glu_bwd", sg.dtype())?;
            launch!(&dev, &name, elements(n); &g, &u, &dy, &out, &n, &act);
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        by_dtype!(g.0.dtype(), go(act, g, u, dy))
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

    use crate::testutil::max_diff;

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
            .apply_op2(
                w.as_tensor(),
                RmsNorm {
                    eps: 1e-6,
                    round_first: false,
                },
            )
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
    fn gated_activations_match_composed_ops_with_gradients() {
        let (g, u, probe) = (
            rand(&[3, 5, 8], 1),
            rand(&[3, 5, 8], 2),
            rand(&[3, 5, 8], 3),
        );
        let (gt, ut) = (g.as_tensor(), u.as_tensor());
        for (act, composed) in [
            (GluAct::Silu, gt.silu().unwrap()),
            (GluAct::GeluTanh, gt.gelu().unwrap()),
            (GluAct::GeluErf, gt.gelu_erf().unwrap()),
        ] {
            let fused = gt.apply_op2(ut, Glu { act }).unwrap();
            let composed = (composed * ut).unwrap();
            assert!(max_diff(&fused, &composed) < 2e-6, "{act:?}");
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
                let d = max_diff(
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-5, "{act:?}: gradient Δ {d}");
            }
        }
    }

    #[test]
    fn rope_backward_is_the_inverse_rotation() {
        let x = rand(&[2, 3, 4, 8], 4);
        let probe = rand(&[2, 3, 4, 8], 5);
        let mut rng = crate::Rng::new(6);
        let angles: Vec<f32> = (0..2 * 4 * 4).map(|_| rng.normal() as f32).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let table = |v: &[f32]| Tensor::from_vec(v.to_vec(), (2, 4, 4), &Device::Cpu).unwrap();
        let y = x
            .as_tensor()
            .apply_op3(&table(&cos), &table(&sin), Rope::FORWARD)
            .unwrap();
        // Composed reference: x·cos + rotate_half(x)·sin with [b, 1, s, d] tables.
        let c = Tensor::from_vec(cos.clone(), (2, 1, 4, 4), &Device::Cpu).unwrap();
        let s = Tensor::from_vec(sin.clone(), (2, 1, 4, 4), &Device::Cpu).unwrap();
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
