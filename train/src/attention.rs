//! Tiled attention with recomputation (flash-style), the algorithm of the GPU kernel.
//!
//! `softmax(mask + cap(scale · q kᵀ)) v` for grouped-query heads, computed one query row
//! at a time against tiles of keys with a running maximum and sum (online softmax), so
//! the `[heads, queries, keys]` probabilities never exist: memory is O(T) per head instead
//! of O(T²). The backward recomputes each tile's probabilities from `q`, `k` and the row's
//! log-sum-exp (`P = exp(S − lse)`), then `dV += Pᵀ dO`, `dS = P ∘ (dO vᵀ − rowsum(dO ∘ O))`
//! (times the soft-cap's derivative), `dQ += dS k · scale`, `dK += dSᵀ q · scale`. This is
//! FlashAttention-2's recurrence; here it runs on the CPU in f32 and is the numerical twin
//! the CUDA kernel is checked against. [`ChunkedAttention`] is the same recurrence at the
//! granularity of query chunks on the device's matmul (cuBLAS): the GPU trains with it,
//! and the tiled kernel serves few-row calls (decoding). The mask is the decoder's additive `[b, q, t]` mask
//! (padding, causality, sliding windows), shared by the heads.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Keys per tile.
pub const KEY_TILE: usize = 64;

/// Attention over `q: [b, heads, s, d]`, `k, v: [b, kv_heads, t, d]` (contiguous f32).
#[derive(Debug, Clone)]
pub struct TiledAttention {
    /// Additive mask `[b, s, t]` (0 or a large negative value).
    pub mask: Arc<Vec<f32>>,
    /// The same mask already on the GPU (any shape with `b · s · t` contiguous f32
    /// values), so one upload serves every layer; without it the GPU path uploads `mask`.
    pub device_mask: Option<Tensor>,
    /// Factor on `q kᵀ`.
    pub scale: f32,
    /// Gemma 2's soft-capping `cap · tanh(x / cap)` of the scaled scores.
    pub softcap: Option<f32>,
}

struct Dims {
    b: usize,
    h: usize,
    kvh: usize,
    s: usize,
    t: usize,
    d: usize,
}

fn slice<'a>(st: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = st else {
        candle_core::bail!("tiled attention: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("tiled attention: {what} must be contiguous"),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl TiledAttention {
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> candle_core::Result<Dims> {
        let (b, h, s, d) = lq.shape().dims4()?;
        let (bk, kvh, t, dk) = lk.shape().dims4()?;
        if lv.shape() != lk.shape() || bk != b || dk != d || kvh == 0 || h % kvh != 0 {
            candle_core::bail!(
                "tiled attention: q {:?}, k {:?}, v {:?}",
                lq.shape(),
                lk.shape(),
                lv.shape()
            )
        }
        if self.mask.len() != b * s * t {
            candle_core::bail!(
                "tiled attention: mask has {} values, expected {}",
                self.mask.len(),
                b * s * t
            )
        }
        Ok(Dims { b, h, kvh, s, t, d })
    }

    /// Scaled (and capped) score and the derivative of that transform.
    fn score(&self, raw: f32) -> (f32, f32) {
        match self.softcap {
            Some(c) => {
                let th = (raw * self.scale / c).tanh();
                (c * th, self.scale * (1.0 - th * th))
            }
            None => (raw * self.scale, self.scale),
        }
    }

    /// Online softmax of one query row: (log-sum-exp, output row).
    fn row(&self, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], d: usize) -> (f32, Vec<f32>) {
        let t = mask.len();
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut acc = vec![0f32; d];
        let mut tile = [0f32; KEY_TILE];
        for j0 in (0..t).step_by(KEY_TILE) {
            let n = KEY_TILE.min(t - j0);
            let mut tile_max = f32::NEG_INFINITY;
            for (jj, sc) in tile[..n].iter_mut().enumerate() {
                let j = j0 + jj;
                *sc = self.score(dot(q, &k[j * d..(j + 1) * d])).0 + mask[j];
                tile_max = tile_max.max(*sc);
            }
            if tile_max == f32::NEG_INFINITY {
                continue;
            }
            let new_m = m.max(tile_max);
            let correction = (m - new_m).exp();
            l *= correction;
            for a in acc.iter_mut() {
                *a *= correction;
            }
            for (jj, &sc) in tile[..n].iter().enumerate() {
                let p = (sc - new_m).exp();
                l += p;
                let vj = &v[(j0 + jj) * d..(j0 + jj + 1) * d];
                for (a, &x) in acc.iter_mut().zip(vj) {
                    *a += p * x;
                }
            }
            m = new_m;
        }
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for a in acc.iter_mut() {
            *a *= inv;
        }
        (m + l.ln(), acc)
    }
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { b, h, kvh, s, t, d } = self.dims(lq, lk, lv)?;
        let (q, k, v) = (
            slice(sq, lq, "q")?,
            slice(sk, lk, "k")?,
            slice(sv, lv, "v")?,
        );
        let rep = h / kvh;
        let mut out = vec![0f32; b * h * s * d];
        out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
            let (bh, i) = (r / s, r % s);
            let (bi, hi) = (bh / h, bh % h);
            let kv = (bi * kvh + hi / rep) * t * d;
            let mask = &self.mask[(bi * s + i) * t..(bi * s + i + 1) * t];
            let (_, row) = self.row(
                &q[r * d..(r + 1) * d],
                &k[kv..kv + t * d],
                &v[kv..kv + t * d],
                mask,
                d,
            );
            o.copy_from_slice(&row);
        });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(lq, lk, lv)?;
        let (out, _) = gpu::forward(self, &dims, (sq, lq), (sk, lk), (sv, lv))?;
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, s, d) = q.dims4()?;
        let (_, kvh, t, _) = k.dims4()?;
        let flat = q.apply_op3_no_bwd(
            k,
            v,
            &TiledAttentionGrad {
                op: self.clone(),
                out: res.contiguous()?,
                dout: grad.contiguous()?,
            },
        )?;
        let (nq, nk) = (b * h * s * d, b * kvh * t * d);
        Ok((
            Some(flat.narrow(0, 0, nq)?.reshape((b, h, s, d))?),
            Some(flat.narrow(0, nq, nk)?.reshape((b, kvh, t, d))?),
            Some(flat.narrow(0, nq + nk, nk)?.reshape((b, kvh, t, d))?),
        ))
    }
}

/// The gradients of [`TiledAttention`] for `(q, k, v)`, given its output and the output's
/// gradient, as one flat `[dq | dk | dv]` buffer.
struct TiledAttentionGrad {
    op: TiledAttention,
    out: Tensor,
    dout: Tensor,
}

fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp3 for TiledAttentionGrad {
    fn name(&self) -> &'static str {
        "tiled-attention-grad"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { b, h, kvh, s, t, d } = self.op.dims(lq, lk, lv)?;
        let (qv, kv, vv) = (
            slice(sq, lq, "q")?,
            slice(sk, lk, "k")?,
            slice(sv, lv, "v")?,
        );
        let (ov, gv) = (host_f32(&self.out)?, host_f32(&self.dout)?);
        let rep = h / kvh;
        let group = rep * s * d;
        let (nq, nk) = (b * h * s * d, b * kvh * t * d);
        let mut flat = vec![0f32; nq + 2 * nk];
        let (dq, rest) = flat.split_at_mut(nq);
        let (dk, dv) = rest.split_at_mut(nk);
        // One task per (batch row, KV head): it owns that head's dK, dV and the dQ rows of
        // its query heads, so nothing is shared between tasks.
        dq.par_chunks_mut(group)
            .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
            .enumerate()
            .for_each(|(g, (dq_g, (dk_g, dv_g)))| {
                let bi = g / kvh;
                let (kg, vg) = (
                    &kv[g * t * d..(g + 1) * t * d],
                    &vv[g * t * d..(g + 1) * t * d],
                );
                for r in 0..rep * s {
                    let i = r % s;
                    let row = g * group + r * d;
                    let (qi, oi, doi) = (&qv[row..row + d], &ov[row..row + d], &gv[row..row + d]);
                    let mask = &self.op.mask[(bi * s + i) * t..(bi * s + i + 1) * t];
                    let (lse, _) = self.op.row(qi, kg, vg, mask, d);
                    if !lse.is_finite() {
                        continue;
                    }
                    let delta = dot(doi, oi);
                    let dqi = &mut dq_g[r * d..(r + 1) * d];
                    for j in 0..t {
                        if mask[j] == f32::NEG_INFINITY {
                            continue;
                        }
                        let kj = &kg[j * d..(j + 1) * d];
                        let vj = &vg[j * d..(j + 1) * d];
                        let (sc, dsc) = self.op.score(dot(qi, kj));
                        let p = (sc + mask[j] - lse).exp();
                        if p == 0.0 {
                            continue;
                        }
                        for (a, &x) in dv_g[j * d..(j + 1) * d].iter_mut().zip(doi) {
                            *a += p * x;
                        }
                        let ds = p * (dot(doi, vj) - delta) * dsc;
                        for (a, &x) in dqi.iter_mut().zip(kj) {
                            *a += ds * x;
                        }
                        for (a, &x) in dk_g[j * d..(j + 1) * d].iter_mut().zip(qi) {
                            *a += ds * x;
                        }
                    }
                }
            });
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.op.dims(lq, lk, lv)?;
        let flat = gpu::backward(self, &dims, (sq, lq), (sk, lk), (sv, lv))?;
        let n = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        Ok((flat, Shape::from(n)))
    }
}

/// Grid and block sizes of the GPU kernels: one warp per query row, `WARPS_PER_BLOCK`
/// rows per block. Each lane keeps `d / 32` values of its row in registers, so the head
/// size is at most 256 (every model pipe knows has 64–256).
pub fn launch_shape(rows: usize, head_dim: usize) -> Result<(u32, u32), String> {
    const WARPS_PER_BLOCK: usize = 4;
    if head_dim == 0 || head_dim > 256 {
        return Err(format!(
            "tiled attention on the GPU takes head sizes 1..=256, not {head_dim}"
        ));
    }
    let grid = rows.div_ceil(WARPS_PER_BLOCK).max(1);
    if grid > u32::MAX as usize {
        return Err(format!("{rows} query rows exceed one launch"));
    }
    Ok((grid as u32, (WARPS_PER_BLOCK * 32) as u32))
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launches are FFI calls
mod gpu {
    //! Launches of `train/kernels/attention.cu` (PTX compiled by build.rs with nvcc).
    use super::{launch_shape, Dims, TiledAttention, TiledAttentionGrad};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, CudaStorage, Layout, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "pipe_tiled_attention";

    fn view<'a>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, f32>> {
        let slice = s.as_cuda_slice::<f32>()?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(slice.slice(a..b)),
            None => candle_core::bail!("tiled attention: inputs must be contiguous"),
        }
    }

    fn config(d: &Dims) -> candle_core::Result<LaunchConfig> {
        let (grid, block) = launch_shape(d.b * d.h * d.s, d.d).map_err(candle_core::Error::msg)?;
        Ok(LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    fn ints(d: &Dims) -> [i32; 6] {
        [d.b, d.h, d.kvh, d.s, d.t, d.d].map(|x| x as i32)
    }

    fn cap(op: &TiledAttention) -> f32 {
        op.softcap.unwrap_or(0.0)
    }

    /// Output and per-row log-sum-exp.
    pub(super) fn forward(
        op: &TiledAttention,
        d: &Dims,
        (sq, lq): (&CudaStorage, &Layout),
        (sk, lk): (&CudaStorage, &Layout),
        (sv, lv): (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, CudaSlice<f32>)> {
        let dev: &CudaDevice = sq.device();
        let (q, k, v) = (view(sq, lq)?, view(sk, lk)?, view(sv, lv)?);
        let uploaded;
        let resident = op.device_mask.as_ref().map(|t| t.storage_and_layout());
        let mask = match &resident {
            Some((st, l)) => view(on_gpu(st)?, l)?,
            None => {
                uploaded = dev.clone_htod(op.mask.as_slice())?;
                uploaded.slice(..)
            }
        };
        if mask.len() != d.b * d.s * d.t {
            candle_core::bail!(
                "tiled attention: the GPU mask has {} values, expected {}",
                mask.len(),
                d.b * d.s * d.t
            )
        }
        let rows = d.b * d.h * d.s;
        let out = dev.alloc_zeros::<f32>(rows * d.d)?;
        let lse = dev.alloc_zeros::<f32>(rows)?;
        let func = dev.get_or_load_custom_func("tiled_attention_fwd", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&mask);
        b.arg(&out);
        b.arg(&lse);
        let n = ints(d);
        for x in &n {
            b.arg(x);
        }
        let (scale, cap) = (op.scale, cap(op));
        b.arg(&scale);
        b.arg(&cap);
        // SAFETY: argument types and count match the kernel's signature.
        unsafe { b.launch(config(d)?) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), lse))
    }

    /// The storage of a tensor that must be on the GPU.
    fn on_gpu(st: &Storage) -> candle_core::Result<&CudaStorage> {
        match st {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("tiled attention: output and gradient must be on the GPU"),
        }
    }

    /// `[dq | dk | dv]`, zeroed then accumulated by the kernel.
    pub(super) fn backward(
        g: &TiledAttentionGrad,
        d: &Dims,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dev: &CudaDevice = q.0.device();
        // The log-sum-exp of each row, recomputed (the forward kept only its output).
        let (_, lse) = forward(&g.op, d, q, k, v)?;
        let (qv, kv, vv) = (view(q.0, q.1)?, view(k.0, k.1)?, view(v.0, v.1)?);
        let (o_st, o_l) = g.out.storage_and_layout();
        let (d_st, d_l) = g.dout.storage_and_layout();
        let (o, dout) = (view(on_gpu(&o_st)?, o_l)?, view(on_gpu(&d_st)?, d_l)?);
        let uploaded;
        let resident = g.op.device_mask.as_ref().map(|t| t.storage_and_layout());
        let mask = match &resident {
            Some((st, l)) => view(on_gpu(st)?, l)?,
            None => {
                uploaded = dev.clone_htod(g.op.mask.as_slice())?;
                uploaded.slice(..)
            }
        };
        let (nq, nk) = (qv.len(), kv.len());
        let mut flat = dev.alloc_zeros::<f32>(nq + 2 * nk)?;
        {
            let (mut dq, mut rest) = flat.split_at_mut(nq);
            let (mut dk, mut dv) = rest.split_at_mut(nk);
            let func = dev.get_or_load_custom_func("tiled_attention_bwd", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&qv);
            b.arg(&kv);
            b.arg(&vv);
            b.arg(&mask);
            b.arg(&o);
            b.arg(&dout);
            b.arg(&lse);
            b.arg(&mut dq);
            b.arg(&mut dk);
            b.arg(&mut dv);
            let n = ints(d);
            for x in &n {
                b.arg(x);
            }
            let (scale, cap) = (g.op.scale, cap(&g.op));
            b.arg(&scale);
            b.arg(&cap);
            // SAFETY: argument types and count match the kernel's signature.
            unsafe { b.launch(config(d)?) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(flat, dev.clone()))
    }
}

/// Score values one chunk of [`chunked_attention`] holds at once (64 MB in f32).
pub const CHUNK_BUDGET: usize = 16 << 20;

/// Attention by query chunks on the device's matmul (cuBLAS on the GPU): the same
/// `softmax(mask + cap(scale · q kᵀ)) v` as [`TiledAttention`], computed `chunk` query
/// rows at a time with batched matmuls, a fused softmax and element-wise ops, so the
/// scores of only one chunk exist (`[b, heads, chunk, t]`, at most [`CHUNK_BUDGET`]
/// values). The backward recomputes each chunk's probabilities and writes
/// `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ − rowsum(P ∘ dO Vᵀ))` (times the soft-cap's
/// derivative and the scale), `dQ = dS K`, `dK += dSᵀ Q` — FlashAttention's recurrence at
/// the granularity of a chunk instead of a tile in registers. Matmuls run in the input
/// dtype (bf16 on the GPU), scores, softmax and the K/V gradient sums in f32.
/// Grouped-query heads are never copied: the `rep` query heads of a KV head are one
/// `rep · chunk`-row matmul against it. This is what the GPU trains with; the tiled
/// kernel serves few-row calls (decoding).
#[derive(Debug, Clone)]
pub struct ChunkedAttention {
    /// Additive mask `[b, 1, s, t]` (f32), on the inputs' device.
    pub mask: Tensor,
    /// Factor on `q kᵀ`.
    pub scale: f32,
    /// Gemma 2's soft-capping of the scaled scores.
    pub softcap: Option<f32>,
    /// Query rows per chunk (0: from [`CHUNK_BUDGET`]).
    pub chunk: usize,
}

/// One chunk's probabilities `[b, kvh, rep, c, t]` (f32) and, with a soft-cap, the
/// `tanh` values its derivative needs.
struct ChunkProbs {
    p: Tensor,
    tanh: Option<Tensor>,
}

impl ChunkedAttention {
    fn rows(&self, b: usize, h: usize, s: usize, t: usize) -> usize {
        let c = if self.chunk > 0 {
            self.chunk
        } else {
            CHUNK_BUDGET / (b * h * t).max(1)
        };
        c.clamp(1, s.max(1))
    }

    /// `qc: [b, kvh, rep·c, d]` against `k: [b, kvh, t, d]`.
    fn probs(
        &self,
        qc: &Tensor,
        k: &Tensor,
        mask: &Tensor,
        rep: usize,
    ) -> candle_core::Result<ChunkProbs> {
        let (b, kvh, rc, _) = qc.dims4()?;
        let t = k.dim(2)?;
        let c = rc / rep;
        let raw = qc
            .matmul(&k.t()?)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((b, kvh, rep, c, t))?;
        let (z, tanh) = match self.softcap {
            Some(cap) => {
                let th = raw.affine((self.scale / cap) as f64, 0.0)?.tanh()?;
                (th.affine(cap as f64, 0.0)?, Some(th))
            }
            None => (raw.affine(self.scale as f64, 0.0)?, None),
        };
        let z = z.broadcast_add(mask)?;
        Ok(ChunkProbs {
            p: candle_nn::ops::softmax_last_dim(&z)?,
            tanh,
        })
    }

    /// The chunks: (first row, rows, `[b, kvh, rep·c, d]` queries, `[b, 1, 1, c, t]` mask).
    fn chunk_inputs(
        &self,
        q: &Tensor,
        kvh: usize,
    ) -> candle_core::Result<Vec<(usize, usize, Tensor, Tensor)>> {
        let (b, h, s, d) = q.dims4()?;
        let t = self.mask.dim(3)?;
        let rep = h / kvh;
        let q5 = q.reshape((b, kvh, rep, s, d))?;
        let rows = self.rows(b, h, s, t);
        (0..s)
            .step_by(rows)
            .map(|a| {
                let c = rows.min(s - a);
                let qc = q5
                    .narrow(3, a, c)?
                    .contiguous()?
                    .reshape((b, kvh, rep * c, d))?;
                let m = self.mask.narrow(2, a, c)?.reshape((b, 1, 1, c, t))?;
                Ok((a, c, qc, m))
            })
            .collect()
    }

    /// The output, recording nothing.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (b, h, s, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let rep = h / kvh;
        let mut parts = Vec::new();
        for (_, c, qc, m) in self.chunk_inputs(q, kvh)? {
            let pr = self.probs(&qc, k, &m, rep)?;
            let p =
                pr.p.to_dtype(v.dtype())?
                    .reshape((b, kvh, rep * c, k.dim(2)?))?;
            parts.push(p.matmul(v)?.reshape((b, kvh, rep, c, d))?);
        }
        Tensor::cat(&parts, 3)?.reshape((b, h, s, d))
    }

    /// `(dq, dk, dv)` for the output gradient `dout`.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        use candle_core::DType;
        let (b, h, s, d) = q.dims4()?;
        let (kvh, t) = (k.dim(1)?, k.dim(2)?);
        let rep = h / kvh;
        let dt = q.dtype();
        let do5 = dout.reshape((b, kvh, rep, s, d))?;
        let mut dk = Tensor::zeros((b, kvh, t, d), DType::F32, q.device())?;
        let mut dv = dk.clone();
        let mut dqs = Vec::new();
        for (a, c, qc, m) in self.chunk_inputs(q, kvh)? {
            let pr = self.probs(&qc, k, &m, rep)?;
            let doc = do5
                .narrow(3, a, c)?
                .contiguous()?
                .reshape((b, kvh, rep * c, d))?;
            let p_dt = pr.p.to_dtype(dt)?.reshape((b, kvh, rep * c, t))?;
            dv = (dv + p_dt.t()?.matmul(&doc)?.to_dtype(DType::F32)?)?;
            let dp = doc
                .matmul(&v.t()?)?
                .to_dtype(DType::F32)?
                .reshape((b, kvh, rep, c, t))?;
            let rowdot = (&dp * &pr.p)?.sum_keepdim(4)?;
            let dz = (&pr.p * dp.broadcast_sub(&rowdot)?)?;
            let ds = match &pr.tanh {
                Some(th) => (dz * (1.0 - th.sqr()?)?)?.affine(self.scale as f64, 0.0)?,
                None => dz.affine(self.scale as f64, 0.0)?,
            };
            let ds = ds.to_dtype(dt)?.reshape((b, kvh, rep * c, t))?;
            dqs.push(ds.matmul(k)?.reshape((b, kvh, rep, c, d))?);
            dk = (dk + ds.t()?.matmul(&qc)?.to_dtype(DType::F32)?)?;
        }
        let dq = Tensor::cat(&dqs, 3)?.reshape((b, h, s, d))?;
        Ok((dq, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
    }
}

/// Attaches [`ChunkedAttention`]'s backward to its output (computed beforehand without
/// a graph): applied to `(q, k, v)` it returns `out`.
struct ChunkedAttentionNode {
    op: ChunkedAttention,
    out: Tensor,
}

fn copy_out(out: &Tensor) -> candle_core::Result<candle_core::Storage> {
    use candle_core::backend::BackendStorage;
    let (st, l) = out.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(c) => Ok(candle_core::Storage::Cpu(c.try_clone(l)?)),
        #[cfg(feature = "cuda")]
        candle_core::Storage::Cuda(c) => Ok(candle_core::Storage::Cuda(c.try_clone(l)?)),
        #[allow(unreachable_patterns)]
        _ => candle_core::bail!("chunked attention: unsupported device"),
    }
}

impl CustomOp3 for ChunkedAttentionNode {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match copy_out(&self.out)? {
            candle_core::Storage::Cpu(c) => Ok((c, self.out.shape().clone())),
            _ => candle_core::bail!("chunked attention: output and inputs on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match copy_out(&self.out)? {
            candle_core::Storage::Cuda(c) => Ok((c, self.out.shape().clone())),
            _ => candle_core::bail!("chunked attention: output and inputs on different devices"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) =
            self.op
                .backward(&q.detach(), &k.detach(), &v.detach(), &grad.detach())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`ChunkedAttention`] of `q: [b, heads, s, d]` over `k, v: [b, kv_heads, t, d]`,
/// differentiable in `q`, `k`, `v`.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    op: ChunkedAttention,
) -> crate::error::Result<Tensor> {
    let (b, h, s, _) = q.dims4()?;
    let (bk, kvh, t, _) = k.dims4()?;
    if bk != b || kvh == 0 || h % kvh != 0 || op.mask.dims() != [b, 1, s, t] {
        return Err(crate::Error::Invalid(format!(
            "chunked attention: q {:?}, k {:?}, mask {:?}",
            q.shape(),
            k.shape(),
            op.mask.shape()
        )));
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = op.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    Ok(q.apply_op3(&k, &v, ChunkedAttentionNode { op, out })?)
}

/// Attention of `q: [b, heads, s, d]` over `k, v: [b, kv_heads, t, d]` without the
/// `[heads, s, t]` probabilities (see the module doc); differentiable in `q`, `k`, `v`.
pub fn tiled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    op: TiledAttention,
) -> crate::error::Result<Tensor> {
    let c = |x: &Tensor| x.to_dtype(candle_core::DType::F32)?.contiguous();
    Ok(c(q)?.apply_op3(&c(k)?, &c(v)?, op)?.to_dtype(q.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Var {
        let mut r = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Causal mask with left padding on row 1 and an optional window.
    fn mask(b: usize, s: usize, window: Option<usize>) -> Vec<f32> {
        let mut m = vec![0f32; b * s * s];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..s {
                    let pad = bi == 1 && j < 3;
                    let outside = j > i || window.is_some_and(|w| i - j >= w);
                    if pad || outside {
                        m[(bi * s + i) * s + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        m
    }

    /// The same attention in composed candle ops (probabilities materialised).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, op: &TiledAttention) -> Tensor {
        let (b, h, s, _) = q.dims4().unwrap();
        let (_, kvh, t, d) = k.dims4().unwrap();
        let rep = h / kvh;
        let expand = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((b, kvh, rep, t, d))
                .unwrap()
                .reshape((b, h, t, d))
                .unwrap()
        };
        let (k, v) = (expand(k), expand(v));
        let raw = q.matmul(&k.t().unwrap()).unwrap();
        let sc = match op.softcap {
            Some(c) => raw
                .affine((op.scale / c) as f64, 0.0)
                .unwrap()
                .tanh()
                .unwrap()
                .affine(c as f64, 0.0)
                .unwrap(),
            None => raw.affine(op.scale as f64, 0.0).unwrap(),
        };
        // Large negative instead of -inf keeps the composed softmax finite.
        let m: Vec<f32> = op.mask.iter().map(|&x| x.max(-1e30)).collect();
        let m = Tensor::from_vec(m, (b, 1, s, t), &Device::Cpu).unwrap();
        let p = candle_nn::ops::softmax(&sc.broadcast_add(&m).unwrap(), D::Minus1).unwrap();
        // Rows that see no key at all (left padding) are zero in the tiled op.
        let seen: Vec<f32> = op
            .mask
            .chunks(t)
            .map(|r| f32::from(r.iter().any(|x| x.is_finite())))
            .collect();
        let seen = Tensor::from_vec(seen, (b, 1, s, 1), &Device::Cpu).unwrap();
        p.matmul(&v).unwrap().broadcast_mul(&seen).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let m = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        m(&(a - b).unwrap()) / m(b)
    }

    #[test]
    fn matches_composed_attention_and_its_gradients() {
        // 70 keys: two tiles, the second partial; 4 query heads on 2 KV heads.
        let (b, h, kvh, s, d) = (2, 4, 2, 70, 8);
        for (window, softcap) in [(None, None), (Some(9), None), (None, Some(2.0))] {
            let op = TiledAttention {
                mask: Arc::new(mask(b, s, window)),
                device_mask: None,
                scale: 0.35,
                softcap,
            };
            let (q, k, v) = (
                rand(&[b, h, s, d], 1),
                rand(&[b, kvh, s, d], 2),
                rand(&[b, kvh, s, d], 3),
            );
            let w = rand(&[b, h, s, d], 4);
            let tiled = tiled_attention(&q, &k, &v, op.clone()).unwrap();
            let reference = composed(&q, &k, &v, &op);
            let fwd = max_rel(&tiled, &reference);
            assert!(fwd < 1e-5, "{window:?} {softcap:?}: forward Δ {fwd}");
            let loss = |o: &Tensor| (o * w.as_tensor()).unwrap().sum_all().unwrap();
            let (gt, gr) = (
                loss(&tiled).backward().unwrap(),
                loss(&reference).backward().unwrap(),
            );
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, r) = (gt.get(var).unwrap(), gr.get(var).unwrap());
                let e = max_rel(a, r);
                assert!(e < 1e-4, "{window:?} {softcap:?}: d{name} Δ {e}");
            }
        }
    }

    #[test]
    fn chunked_attention_matches_composed_attention_and_its_gradients() {
        // 70 queries in chunks of 16 (the last one 6 rows); 4 query heads on 2 KV heads.
        let (b, h, kvh, s, d) = (2, 4, 2, 70, 8);
        for (window, softcap) in [(None, None), (Some(9), None), (None, Some(2.0))] {
            // The decoder's finite mask (-1e30), which the composed reference reads too.
            let values: Vec<f32> = mask(b, s, window).iter().map(|&x| x.max(-1e30)).collect();
            let reference_op = TiledAttention {
                mask: Arc::new(values.clone()),
                device_mask: None,
                scale: 0.35,
                softcap,
            };
            let op = ChunkedAttention {
                mask: Tensor::from_vec(values, (b, 1, s, s), &Device::Cpu).unwrap(),
                scale: 0.35,
                softcap,
                chunk: 16,
            };
            let (q, k, v) = (
                rand(&[b, h, s, d], 1),
                rand(&[b, kvh, s, d], 2),
                rand(&[b, kvh, s, d], 3),
            );
            let w = rand(&[b, h, s, d], 4);
            let chunked = chunked_attention(&q, &k, &v, op).unwrap();
            // Rows that see no key (left padding) average every value under a finite
            // mask, in both; they carry no loss in training, so compare the others.
            let seen: Vec<f32> = reference_op
                .mask
                .chunks(s)
                .map(|r| f32::from(r.iter().any(|&x| x > -1e29)))
                .collect();
            let seen = Tensor::from_vec(seen, (b, 1, s, 1), &Device::Cpu).unwrap();
            let chunked_seen = chunked.broadcast_mul(&seen).unwrap();
            let reference = composed(&q, &k, &v, &reference_op)
                .broadcast_mul(&seen)
                .unwrap();
            let fwd = max_rel(&chunked_seen, &reference);
            assert!(fwd < 1e-5, "{window:?} {softcap:?}: forward Δ {fwd}");
            let loss = |o: &Tensor| (o * w.as_tensor()).unwrap().sum_all().unwrap();
            let (gc, gr) = (
                loss(&chunked_seen).backward().unwrap(),
                loss(&reference).backward().unwrap(),
            );
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, r) = (gc.get(var).unwrap(), gr.get(var).unwrap());
                let e = max_rel(a, r);
                assert!(e < 1e-4, "{window:?} {softcap:?}: d{name} Δ {e}");
            }
        }
    }

    #[test]
    fn chunks_follow_the_budget() {
        let op = |chunk| ChunkedAttention {
            mask: Tensor::zeros((1, 1, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
            scale: 1.0,
            softcap: None,
            chunk,
        };
        // Qwen2.5-7B at seq 2048, batch 1: 28 heads × 2048 keys per query row.
        let rows = op(0).rows(1, 28, 2048, 2048);
        assert_eq!(rows, CHUNK_BUDGET / (28 * 2048));
        assert!(rows * 28 * 2048 <= CHUNK_BUDGET);
        assert_eq!(op(0).rows(1, 2, 10, 10), 10, "small inputs are one chunk");
        assert_eq!(op(5).rows(4, 14, 2048, 2048), 5);
        assert_eq!(op(0).rows(64, 64, 8, 1 << 20), 1, "at least one row");
    }

    #[test]
    fn gpu_launch_covers_every_row_with_one_warp() {
        for (rows, d) in [(1, 64), (4, 128), (5, 256), (12 * 4096, 128)] {
            let (grid, block) = launch_shape(rows, d).unwrap();
            let warps = grid as usize * block as usize / 32;
            assert!(
                warps >= rows && warps < rows + 4,
                "{rows} rows: {warps} warps"
            );
            assert_eq!(block % 32, 0);
        }
        assert!(launch_shape(8, 288).unwrap_err().contains("288"));
        assert!(launch_shape(8, 0).is_err());
    }

    #[test]
    fn fully_masked_rows_give_zero_output_and_gradient() {
        let (b, h, s, d) = (2, 2, 5, 4);
        // Batch row 1 pads its first 3 keys; with causality its first 3 queries see nothing.
        let op = TiledAttention {
            mask: Arc::new(mask(b, s, None)),
            device_mask: None,
            scale: 0.5,
            softcap: None,
        };
        let (q, k, v) = (
            rand(&[b, h, s, d], 5),
            rand(&[b, h, s, d], 6),
            rand(&[b, h, s, d], 7),
        );
        let o = tiled_attention(&q, &k, &v, op).unwrap();
        let row = o.get(1).unwrap().get(0).unwrap().get(0).unwrap();
        assert_eq!(
            row.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let g = o.sum_all().unwrap().backward().unwrap();
        let dq = g
            .get(&q)
            .unwrap()
            .get(1)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap();
        assert_eq!(
            dq.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
