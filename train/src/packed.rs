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
    /// The matrix as an int8 [`crate::q8::Q8Matrix`], when that is how it is stored (then it also
    /// serves few-row decoding calls directly).
    fn as_q8(self: Arc<Self>) -> Option<Arc<crate::q8::Q8Matrix>> {
        None
    }
    /// `x · Wᵀ` for a few rows `x: [rows, cols]` straight from the packed storage, when
    /// the format has such a kernel (token-by-token decoding); `None` otherwise.
    fn matmul_rows(&self, _x: &[f32], _rows: usize) -> Option<Vec<f32>> {
        None
    }
}

/// `x · dequant(W)ᵀ` for `x: [m, in]`.
struct PackedMatmul {
    w: Arc<dyn PackedWeight>,
}

/// `dy · dequant(W)` for `dy: [m, out]`: the input gradient of [`PackedMatmul`].
struct PackedMatmulInputGrad {
    w: Arc<dyn PackedWeight>,
}

/// `x [m, k] · B` on the input's own storage, with `B` given as `[n, k]` (used
/// transposed) or `[k, n]`.
fn gemm(
    x: &CpuStorage,
    l: &Layout,
    b: Vec<f32>,
    n: usize,
    b_is_n_by_k: bool,
) -> candle_core::Result<(CpuStorage, Shape)> {
    if !matches!(x, CpuStorage::F32(_)) {
        candle_core::bail!("packed matmul takes f32 activations")
    }
    let (m, k) = l.shape().dims2()?;
    let lb = if b_is_n_by_k {
        Layout::contiguous((n, k)).transpose(0, 1)?
    } else {
        Layout::contiguous((k, n))
    };
    let out = x.matmul(&CpuStorage::F32(b), (1, m, n, k), l, &lb)?;
    Ok((out, Shape::from((m, n))))
}

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = (self.w.rows(), self.w.cols());
        let k = l.shape().dims2()?.1;
        if k != cols {
            candle_core::bail!(
                "{} matmul: input width {k} but weight is [{rows}, {cols}]",
                self.w.kind()
            )
        }
        gemm(s, l, self.w.dequantize(), rows, true)
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
        let (rows, cols) = (self.w.rows(), self.w.cols());
        let n = l.shape().dims2()?.1;
        if n != rows {
            candle_core::bail!(
                "{} matmul backward: gradient width {n} but weight is [{rows}, {cols}]",
                self.w.kind()
            )
        }
        gemm(s, l, self.w.dequantize(), cols, false)
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
