//! Frozen weights kept compact (NF4, int8) and a matmul that trains through them.
//!
//! [`packed_matmul`] computes `x · dequant(W)ᵀ`; its backward returns only the input
//! gradient `dy · dequant(W)`, so nothing is computed or kept for `W` (it is frozen:
//! QLoRA trains adapters beside it). Each call dequantizes the one matrix it needs into
//! a temporary f32 buffer and runs the f32 gemm on it, then frees it: a model whose
//! projections are packed never exists in f32 as a whole, and the f32 gemm keeps the
//! speed of the dense path. Activations are f32 (other dtypes are converted around the
//! op); the op runs on the CPU.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::Result;

/// A frozen `[rows, cols]` matrix in a compact form.
pub trait PackedWeight: Send + Sync + std::fmt::Debug {
    /// Output features.
    fn rows(&self) -> usize;
    /// Input features.
    fn cols(&self) -> usize;
    /// The matrix in f32, row-major.
    fn dequantize(&self) -> Vec<f32>;
    /// Bytes held.
    fn bytes(&self) -> usize;
    /// `nf4`, `int8`.
    fn kind(&self) -> &'static str;
}

/// `x · dequant(W)ᵀ` for `x: [m, in]`.
struct PackedMatmul {
    w: Arc<dyn PackedWeight>,
}

/// `dy · dequant(W)` for `dy: [m, out]`: the input gradient of [`PackedMatmul`].
struct PackedMatmulInputGrad {
    w: Arc<dyn PackedWeight>,
}

fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("packed matmul takes f32 activations")
    };
    let (m, k) = l.shape().dims2()?;
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("packed matmul needs a contiguous input")
    };
    Ok((&data[start..end], m, k))
}

/// `a [m, k] · B` with `B` given as `[n, k]` (used transposed) or `[k, n]`.
fn gemm(
    a: &[f32],
    m: usize,
    k: usize,
    b: Vec<f32>,
    n: usize,
    b_is_n_by_k: bool,
) -> candle_core::Result<CpuStorage> {
    let sa = CpuStorage::F32(a.to_vec());
    let sb = CpuStorage::F32(b);
    let lb = if b_is_n_by_k {
        Layout::contiguous((n, k)).transpose(0, 1)?
    } else {
        Layout::contiguous((k, n))
    };
    sa.matmul(&sb, (1, m, n, k), &Layout::contiguous((m, k)), &lb)
}

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, m, k) = f32_rows(s, l)?;
        let (rows, cols) = (self.w.rows(), self.w.cols());
        if k != cols {
            candle_core::bail!(
                "{} matmul: input width {k} but weight is [{rows}, {cols}]",
                self.w.kind()
            )
        }
        let out = gemm(x, m, k, self.w.dequantize(), rows, true)?;
        Ok((out, Shape::from((m, rows))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&PackedMatmulInputGrad {
            w: self.w.clone(),
        })?))
    }
}

impl CustomOp1 for PackedMatmulInputGrad {
    fn name(&self) -> &'static str {
        "packed-matmul-input-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dy, m, n) = f32_rows(s, l)?;
        let (rows, cols) = (self.w.rows(), self.w.cols());
        if n != rows {
            candle_core::bail!(
                "{} matmul backward: gradient width {n} but weight is [{rows}, {cols}]",
                self.w.kind()
            )
        }
        let out = gemm(dy, m, n, self.w.dequantize(), cols, false)?;
        Ok((out, Shape::from((m, cols))))
    }
}

/// `x · dequant(W)ᵀ` for `x: [..., in]`; the gradient flows to `x` only.
pub fn packed_matmul(x: &Tensor, w: &Arc<dyn PackedWeight>) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("rank ≥ 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x
        .to_dtype(DType::F32)?
        .reshape((rows, inner))?
        .contiguous()?;
    let y = x2.apply_op1(PackedMatmul { w: w.clone() })?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank ≥ 1") = w.rows();
    Ok(y.reshape(out_dims)?.to_dtype(dtype)?)
}
