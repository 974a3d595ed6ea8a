//! Linear layers for training: a frozen base projection whose backward computes
//! only the input gradient, plus an optional LoRA pair.
//!
//! candle's matmul backward always computes the gradient of both operands, so a
//! frozen `[out, in]` weight would cost a full extra matmul and a weight-sized
//! buffer per step. [`frozen_matmul`] is a custom op that runs the same matmul
//! kernel forward and returns only `dy · W` backward.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor, Var, D};

use crate::error::Result;
use crate::packed::{packed_matmul, PackedWeight};
use crate::q8::{Q8Matrix, BLOCK};
use crate::rng::Rng;

/// `x · Wᵀ` with a gradient for `x` only; `W` is `[out, in]`, `x` is `[m, in]`.
struct FrozenMatmul;

impl FrozenMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input width {k} but weight is [{n}, {k2}]")
        }
        Ok((m, n, k))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k) = Self::dims(l1, l2)?;
        if let (CpuStorage::F32(x), CpuStorage::F32(w), Some((x0, x1)), Some((w0, w1))) =
            (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets())
        {
            if let Some(y) = row_split::matmul_t(&x[x0..x1], &w[w0..w1], m, n, k) {
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
        }
        let wt = l2.transpose(0, 1)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = Self::dims(l1, l2)?;
        let wt = l2.transpose(0, 1)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x · Wᵀ` on many rows, the rows split between threads.
///
/// candle's CPU matmul hands the whole product to `gemm` with its own parallelism,
/// which splits the columns and meets at a barrier per block: on the projections of
/// a packed prefill (1024 × 576 by 576 × 576 ... 1536) two threads reached 65–78% of
/// the machine's FMA peak while one thread alone reached 84–93% of one core's. Here
/// each thread runs `gemm` single-threaded on its own band of rows, with nothing
/// shared until the end. A row's value does not depend on its band (every row sums
/// over `k` in the same blocked order).
#[allow(unsafe_code)]
mod row_split {
    /// Rows a thread needs for the split to pay (gemm's f32 tile is 64 rows tall on
    /// AVX-512, 24–32 on AVX2; below a few tiles the per-call packing dominates).
    const MIN_ROWS_PER_THREAD: usize = 128;

    /// `x: [m, k]`, `w: [n, k]` (both row-major) → `x · wᵀ: [m, n]`, or `None` when
    /// there are too few rows for more than one band (the caller uses candle's).
    pub fn matmul_t(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Option<Vec<f32>> {
        use rayon::prelude::*;
        let threads = candle_core::utils::get_num_threads().max(1);
        let bands = threads.min(m / MIN_ROWS_PER_THREAD);
        if bands < 2 || x.len() != m * k || w.len() != n * k || n == 0 || k == 0 {
            return None;
        }
        let per = m.div_ceil(bands);
        let mut y = vec![0f32; m * n];
        y.par_chunks_mut(per * n)
            .zip(x.par_chunks(per * k))
            .for_each(|(out, xs)| {
                let rows = out.len() / n;
                debug_assert_eq!(xs.len(), rows * k);
                // SAFETY: `out` is `rows × n` and `xs` is `rows × k`, both row-major
                // and exclusively ours; `w` is `n × k` and read as its transpose
                // (`k × n`: row stride 1, column stride k). gemm reads `rows·k`,
                // `n·k` and writes `rows·n` elements within those bounds.
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        k,
                        out.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        xs.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
        Some(y)
    }
}

/// `x · Wᵀ` for a frozen `W: [out, in]` and `x: [..., in]`.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("rank ≥ 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, inner))?.contiguous()?;
    // Recorded for backward only when `x` itself depends on a variable.
    let y = x2.apply_op2(w, FrozenMatmul)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank ≥ 1") = w.dim(0)?;
    y.reshape(out_dims)
}

/// A LoRA pair: `scale · B(A(dropout(x)))` with `A: [r, in]`, `B: [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down projection, `[r, in]`.
    pub a: Var,
    /// Up projection, `[out, r]`.
    pub b: Var,
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the LoRA input during training.
    pub dropout: f64,
}

/// How a frozen base model's projections are stored while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseQuant {
    /// Dense, in the model dtype.
    #[default]
    None,
    /// Int8 blocks of 32 with an f32 scale each (the Q8_0 scheme, see [`crate::q8`]).
    /// Like bitsandbytes' LLM.int8 it halves bf16 weight memory; unlike it, there is
    /// no outlier decomposition and activations stay f32: the matmul runs on the
    /// dequantized weight, so int8 costs accuracy only through the weight rounding
    /// (≤ half a step of each block's scale).
    Int8,
    /// NF4 as bitsandbytes stores it (QLoRA; see [`crate::nf4`]).
    Nf4,
    /// A GGUF file's projections stay in the file's own blocks (Q4_0, Q4_1, Q4_K,
    /// Q8_0; see [`crate::ggml`]) instead of being dequantized.
    Keep,
}

impl BaseQuant {
    /// Reads `none`, `int8`, `nf4`, `keep`.
    pub fn parse(s: &str) -> std::result::Result<BaseQuant, String> {
        match s {
            "none" => Ok(BaseQuant::None),
            "int8" => Ok(BaseQuant::Int8),
            "nf4" => Ok(BaseQuant::Nf4),
            "keep" => Ok(BaseQuant::Keep),
            other => Err(format!(
                "quantize `{other}` is not one of none, int8, nf4, keep"
            )),
        }
    }
}

/// A packed weight where the activations will be: on a GPU its GPU-resident copy (the
/// host bytes are dropped); formats without a GPU kernel are refused there.
fn on_device(
    p: Arc<dyn PackedWeight>,
    device: &candle_core::Device,
) -> Result<Arc<dyn PackedWeight>> {
    if device.is_cpu() || p.device_packed().is_some() {
        return Ok(p);
    }
    match p.to_device(device)? {
        Some(d) => Ok(d),
        None => Err(crate::Error::Invalid(format!(
            "a {} base has no GPU kernel; on {device:?} use quantize: nf4, int8 or none",
            p.kind()
        ))),
    }
}

/// A projection: frozen weight, optional frozen bias, optional LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`; empty (`[0, 0]`) when the weight is kept in `packed` instead.
    pub weight: Tensor,
    /// The frozen weight in a compact form (NF4, int8), when the base is quantized.
    pub packed: Option<Arc<dyn PackedWeight>>,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// Trainable low-rank update.
    pub lora: Option<LoraPair>,
    /// An int8 copy of `weight` for decoding (see [`Linear::quantize`]).
    pub quantized: Option<Arc<Q8Matrix>>,
}

/// Calls with at most this many rows use the int8 copy; more rows (prefill,
/// training) use the f32 weight, where the gemm kernels are compute-bound and
/// faster than the int8 dot products.
pub const QUANTIZED_MAX_ROWS: usize = 16;

impl Linear {
    /// A frozen projection without LoRA.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight,
            bias,
            lora: None,
            packed: None,
            quantized: None,
        }
    }

    /// A frozen projection whose weight is already packed (a quantized checkpoint).
    pub fn from_packed(
        packed: Arc<dyn PackedWeight>,
        bias: Option<Tensor>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Linear> {
        Ok(Linear {
            weight: Tensor::zeros((0, 0), dtype, device)?,
            bias,
            lora: None,
            packed: Some(on_device(packed, device)?),
            quantized: None,
        })
    }

    /// Replaces the dense weight by a packed copy (NF4 or int8), freeing the dense one.
    /// Widths that int8 blocks cannot split stay dense; so does everything under
    /// [`BaseQuant::Keep`], which only keeps blocks a GGUF file already has.
    pub fn pack(&mut self, how: BaseQuant, double_quant: bool) -> Result<()> {
        if matches!(how, BaseQuant::None | BaseQuant::Keep) || self.packed.is_some() {
            return Ok(());
        }
        let (inp, out) = self.in_out();
        if how == BaseQuant::Int8 && inp % BLOCK != 0 {
            return Ok(());
        }
        let w = self
            .weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let packed: Arc<dyn PackedWeight> = match how {
            BaseQuant::Nf4 => Arc::new(crate::nf4::Nf4Matrix::quantize(&w, out, inp, double_quant)),
            _ => Arc::new(Q8Matrix::quantize(&w, out, inp)),
        };
        let device = self.weight.device().clone();
        self.weight = Tensor::zeros((0, 0), self.weight.dtype(), &device)?;
        self.packed = Some(on_device(packed, &device)?);
        Ok(())
    }

    /// The frozen weight as a dense tensor in `dtype` (dequantized when packed).
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match &self.packed {
            None => Ok(self.weight.to_dtype(dtype)?),
            Some(p) => {
                Ok(
                    Tensor::from_vec(p.dequantize(), (p.rows(), p.cols()), self.weight.device())?
                        .to_dtype(dtype)?,
                )
            }
        }
    }

    /// Adds an int8 copy of the weight used for few-row calls (token-by-token
    /// decoding reads every weight per token: int8 is about a quarter of the bytes
    /// of f32; see [`crate::q8`]). Widths that are not a multiple of the block size
    /// stay f32; so do weights on a GPU.
    pub fn quantize(&mut self) -> Result<()> {
        let (inp, out) = self.in_out();
        if let Some(p) = &self.packed {
            // An int8 base already is the decoding copy; an NF4 one has none.
            self.quantized = p.clone().as_q8();
            return Ok(());
        }
        if !self.weight.device().is_cpu() || inp % BLOCK != 0 {
            return Ok(());
        }
        // Read the f32 weight in place (a copy of `lm_head` would add 100+ MB to the
        // peak on SmolLM2).
        let w = self.weight.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let q = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
                Q8Matrix::quantize(&cpu.as_slice::<f32>()?[start..end], out, inp)
            }
            _ => Q8Matrix::quantize(&w.flatten_all()?.to_vec1::<f32>()?, out, inp),
        };
        self.quantized = Some(Arc::new(q));
        Ok(())
    }

    /// Input and output widths.
    pub fn in_out(&self) -> (usize, usize) {
        if let Some(p) = &self.packed {
            return (p.cols(), p.rows());
        }
        let (o, i) = self.weight.dims2().expect("linear weight is 2-d");
        (i, o)
    }

    /// Applies the projection; `dropout` draws the LoRA dropout mask when training.
    pub fn forward(&self, x: &Tensor, dropout: Option<&mut Rng>) -> Result<Tensor> {
        self.apply(x, dropout, false)
    }

    /// Applies the projection without recording anything for backward (LoRA
    /// weights are read as constants): for generation.
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, None, true)
    }

    /// [`Linear::forward_inference`] on the float (or packed) weight whatever the row
    /// count: a prompt's prefill, so that its result does not depend on how many
    /// tokens run in the call (a cached start leaves a few; the int8 copy would take them).
    pub fn forward_prefill(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_rows(x, None, true, false)
    }

    fn apply(&self, x: &Tensor, dropout: Option<&mut Rng>, constant: bool) -> Result<Tensor> {
        self.apply_rows(x, dropout, constant, true)
    }

    fn apply_rows(
        &self,
        x: &Tensor,
        dropout: Option<&mut Rng>,
        constant: bool,
        by_rows: bool,
    ) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        let few = by_rows && rows <= QUANTIZED_MAX_ROWS && x.dtype() == DType::F32 && !x.track_op();
        let shaped = |v: Vec<f32>, n: usize| -> Result<Tensor> {
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank ≥ 1") = n;
            Ok(Tensor::from_vec(v, dims, x.device())?)
        };
        let mut y = match (&self.quantized, &self.packed) {
            (Some(q), _) if few => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                shaped(q.matmul(&xs, rows), q.rows())?
            }
            (_, Some(p)) => {
                let direct = if few && p.device_packed().is_none() {
                    p.matmul_rows(&x.flatten_all()?.to_vec1::<f32>()?, rows)
                } else {
                    None
                };
                match direct {
                    Some(v) => shaped(v, p.rows())?,
                    None => packed_matmul(x, p)?,
                }
            }
            _ => frozen_matmul(x, &self.weight)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let h = match dropout {
                Some(rng) if l.dropout > 0.0 => dropout_with(x, l.dropout, rng)?,
                _ => x.clone(),
            };
            let (mut a, mut b) = (l.a.as_tensor().clone(), l.b.as_tensor().clone());
            if constant {
                (a, b) = (a.detach(), b.detach());
            }
            let a = a.to_dtype(x.dtype())?;
            let b = b.to_dtype(x.dtype())?;
            let d = h.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
            y = (y + (d * l.scale)?)?;
        }
        Ok(y)
    }

    /// The weight with the LoRA update folded in (`W + scale · B A`).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let dtype = self.weight.dtype();
        Ok(match &self.lora {
            None => self.dense_weight(dtype)?,
            Some(l) => {
                let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                (self.dense_weight(DType::F32)? + delta)?.to_dtype(dtype)?
            }
        })
    }
}

/// Inverted dropout with a mask from our own seeded generator.
pub fn dropout_with(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.uniform() < p { 0.0 } else { keep as f32 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

/// RMSNorm with a backward (candle's fused kernel records none): the fused kernel
/// ([`crate::fused::RmsNorm`]) for f32 on the CPU and for f32 or bf16 on the GPU
/// (normalised value rounded to the dtype before the weight multiplies it, as
/// transformers does), composed ops in f32 elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let fused = (x.device().is_cpu() && dtype == DType::F32)
        || (x.device().is_cuda() && matches!(dtype, DType::F32 | DType::BF16));
    if fused {
        let op = crate::fused::RmsNorm {
            eps: eps as f32,
            round_first: dtype != DType::F32,
        };
        return Ok(x
            .contiguous()?
            .apply_op2(&weight.to_dtype(DType::F32)?, op)?);
    }
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// Embedding lookup; `weight` is `[vocab, hidden]`.
pub fn embed(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let e = candle_nn::Embedding::new(weight.clone(), weight.dim(1)?);
    Ok(e.forward(&ids.reshape(b * s)?)?
        .reshape((b, s, weight.dim(1)?))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantized_copy_serves_few_rows_and_stays_close_to_f32() {
        let mut rng = Rng::new(3);
        let w: Vec<f32> = (0..48 * 64).map(|_| rng.normal() as f32).collect();
        let x: Vec<f32> = (0..2 * 64).map(|_| rng.normal() as f32).collect();
        let w = Tensor::from_vec(w, (48, 64), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(x, (1, 2, 64), &Device::Cpu).unwrap();
        let mut lin = Linear::new(w, None);
        let exact = lin.forward_inference(&x).unwrap();
        lin.quantize().unwrap();
        assert!(lin.quantized.is_some());
        let q = lin.forward_inference(&x).unwrap();
        let err = (&q - &exact)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = exact
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            err > 0.0 && err / scale < 2e-2,
            "relative error {}",
            err / scale
        );
        // Many rows go through the f32 weight: exact again.
        let big = x.repeat((1, 10, 1)).unwrap();
        let many = lin.forward_inference(&big).unwrap();
        let again = frozen_matmul(&big, &lin.weight).unwrap();
        assert_eq!(
            many.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
