//! Frozen weights kept compact (NF4, int8) and a matmul that trains through them.
//!
//! [`packed_matmul`] computes `x · dequant(W)ᵀ`; its backward returns only the input
//! gradient `dy · dequant(W)`, so nothing is computed or kept for `W` (it is frozen:
//! QLoRA trains adapters beside it). Each call dequantizes the one matrix it needs into
//! a temporary f32 buffer and runs the f32 gemm on it, then frees it: a model whose
//! projections are packed never exists in f32 as a whole, and the f32 gemm keeps the
//! speed of the dense path. On the CPU activations are f32 (other dtypes are converted
//! around the op). On the GPU the packed bytes live in GPU memory ([`DevicePacked`]);
//! each call dequantizes the matrix with a kernel (`nf4_dequant`, `q8_dequant` in
//! `train/kernels/ops.cu`, twins of [`crate::nf4::Nf4Matrix::dequantize`] and
//! [`crate::q8::Q8Matrix::dequantize`]) into a temporary buffer of the activation dtype
//! (f32 or bf16) and runs cuBLAS on it, forward and backward.

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
    /// A copy of the matrix in GPU memory, for formats that have a GPU kernel (NF4,
    /// int8); `None` for the others.
    fn to_device(&self, _device: &candle_core::Device) -> Result<Option<Arc<dyn PackedWeight>>> {
        Ok(None)
    }
    /// The GPU-resident form, when this is one.
    fn device_packed(&self) -> Option<&DevicePacked> {
        None
    }
}

/// The parts of a packed matrix in GPU memory.
#[derive(Debug)]
pub enum DeviceParts {
    /// NF4 codes (`u8`, two per byte) and one f32 absmax per 64 values.
    Nf4 {
        /// Packed codes.
        packed: Tensor,
        /// Absmaxes.
        absmax: Tensor,
    },
    /// NF4 with double-quantized absmaxes.
    Nf4Nested {
        /// Packed codes.
        packed: Tensor,
        /// One `u8` index per block into `dmap`.
        codes: Tensor,
        /// The 256-value map.
        dmap: Tensor,
        /// One f32 per 256 blocks.
        absmax2: Tensor,
        /// Added to every dequantized absmax.
        offset: f32,
    },
    /// Int8 values (their bytes, as `u8`) and one f32 scale per 32.
    Int8 {
        /// Values.
        qs: Tensor,
        /// Scales.
        scales: Tensor,
    },
}

/// A packed matrix resident on the GPU (the host copy is dropped).
#[derive(Debug)]
pub struct DevicePacked {
    rows: usize,
    cols: usize,
    /// The parts.
    pub parts: DeviceParts,
}

fn host<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

impl DevicePacked {
    /// Uploads an NF4 matrix.
    pub fn nf4(m: &crate::nf4::Nf4Matrix, device: &candle_core::Device) -> Result<DevicePacked> {
        use crate::nf4::Absmax;
        let packed = Tensor::from_slice(&m.packed, m.packed.len(), device)?;
        let parts = match &m.absmax {
            Absmax::Plain(a) => DeviceParts::Nf4 {
                packed,
                absmax: Tensor::from_slice(a, a.len(), device)?,
            },
            Absmax::Nested(n) => DeviceParts::Nf4Nested {
                packed,
                codes: Tensor::from_slice(&n.codes, n.codes.len(), device)?,
                dmap: Tensor::from_slice(&n.code, n.code.len(), device)?,
                absmax2: Tensor::from_slice(&n.absmax, n.absmax.len(), device)?,
                offset: n.offset,
            },
        };
        Ok(DevicePacked {
            rows: m.rows,
            cols: m.cols,
            parts,
        })
    }

    /// Uploads an int8 matrix.
    pub fn int8(m: &crate::q8::Q8Matrix, device: &candle_core::Device) -> Result<DevicePacked> {
        let (qs, scales) = m.parts();
        let bytes: Vec<u8> = qs.iter().map(|&q| q as u8).collect();
        Ok(DevicePacked {
            rows: m.rows(),
            cols: m.cols(),
            parts: DeviceParts::Int8 {
                qs: Tensor::from_vec(bytes, qs.len(), device)?,
                scales: Tensor::from_slice(scales, scales.len(), device)?,
            },
        })
    }

    /// The host form again (to dequantize on the CPU: merging, export).
    fn to_host(&self) -> Result<Arc<dyn PackedWeight>> {
        use crate::nf4::{Absmax, Nested, Nf4Matrix};
        Ok(match &self.parts {
            DeviceParts::Nf4 { packed, absmax } => Arc::new(Nf4Matrix {
                rows: self.rows,
                cols: self.cols,
                packed: host(packed)?,
                absmax: Absmax::Plain(host(absmax)?),
            }),
            DeviceParts::Nf4Nested {
                packed,
                codes,
                dmap,
                absmax2,
                offset,
            } => Arc::new(Nf4Matrix {
                rows: self.rows,
                cols: self.cols,
                packed: host(packed)?,
                absmax: Absmax::Nested(Nested {
                    codes: host(codes)?,
                    offset: *offset,
                    absmax: host(absmax2)?,
                    code: host(dmap)?,
                }),
            }),
            DeviceParts::Int8 { qs, scales } => {
                let qs: Vec<i8> = host::<u8>(qs)?.into_iter().map(|b| b as i8).collect();
                Arc::new(crate::q8::Q8Matrix::from_parts(
                    self.rows,
                    self.cols,
                    qs,
                    host(scales)?,
                ))
            }
        })
    }
}

impl PackedWeight for DevicePacked {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize(&self) -> Vec<f32> {
        self.to_host()
            .map(|h| h.dequantize())
            .expect("copying a packed weight back from the GPU")
    }

    fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.parts {
            DeviceParts::Nf4 { packed, absmax } => b(packed) + b(absmax),
            DeviceParts::Nf4Nested {
                packed,
                codes,
                dmap,
                absmax2,
                ..
            } => b(packed) + b(codes) + b(dmap) + b(absmax2),
            DeviceParts::Int8 { qs, scales } => b(qs) + b(scales),
        }
    }

    fn kind(&self) -> &'static str {
        match self.parts {
            DeviceParts::Int8 { .. } => "int8",
            _ => "nf4",
        }
    }

    fn device_packed(&self) -> Option<&DevicePacked> {
        Some(self)
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

/// `(m, width)` of a packed matmul's `[m, width]` input, checked against the weight: the
/// width is `cols` forward, `rows` for the gradient of the backward.
fn input_dims(w: &dyn PackedWeight, l: &Layout, grad: bool) -> candle_core::Result<(usize, usize)> {
    let (rows, cols) = (w.rows(), w.cols());
    let (m, k) = l.shape().dims2()?;
    let (want, what) = if grad {
        (rows, "matmul backward: gradient")
    } else {
        (cols, "matmul: input")
    };
    if k != want {
        candle_core::bail!(
            "{} {what} width {k} but weight is [{rows}, {cols}]",
            w.kind()
        )
    }
    Ok((m, k))
}

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        input_dims(self.w.as_ref(), l, false)?;
        gemm(s, l, self.w.dequantize(), self.w.rows(), true)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = (self.w.rows(), self.w.cols());
        let (m, k) = input_dims(self.w.as_ref(), l, false)?;
        let w = gpu::dequantize(device_parts(&self.w)?, s)?;
        let lw = Layout::contiguous((rows, cols)).transpose(0, 1)?;
        Ok((
            s.matmul(&w, (1, m, rows, k), l, &lw)?,
            Shape::from((m, rows)),
        ))
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
        input_dims(self.w.as_ref(), l, true)?;
        gemm(s, l, self.w.dequantize(), self.w.cols(), false)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = (self.w.rows(), self.w.cols());
        let (m, _) = input_dims(self.w.as_ref(), l, true)?;
        let w = gpu::dequantize(device_parts(&self.w)?, s)?;
        let lw = Layout::contiguous((rows, cols));
        Ok((
            s.matmul(&w, (1, m, cols, rows), l, &lw)?,
            Shape::from((m, cols)),
        ))
    }
}

#[cfg(feature = "cuda")]
fn device_parts(w: &Arc<dyn PackedWeight>) -> candle_core::Result<&DevicePacked> {
    w.device_packed().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "a {} weight in host memory met GPU activations (it was not moved to the GPU)",
            w.kind()
        ))
    })
}

#[cfg(feature = "cuda")]
mod gpu {
    //! Dequantization of [`DevicePacked`] weights into a temporary GPU buffer.
    use super::{DevicePacked, DeviceParts};
    use crate::kernels::gpu::{elements, launch, typed, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, DType, Storage};

    /// The storage of a tensor that lives on the GPU.
    fn on_gpu<'a>(st: &'a Storage, what: &str) -> candle_core::Result<&'a CudaStorage> {
        match st {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("packed weight: {what} is not on the GPU"),
        }
    }

    /// The whole matrix, dequantized into the dtype of `like` (f32 or bf16).
    pub(super) fn dequantize(
        w: &DevicePacked,
        like: &CudaStorage,
    ) -> candle_core::Result<CudaStorage> {
        match like.dtype() {
            DType::F32 => run::<f32>(w, like),
            DType::BF16 => run::<half::bf16>(w, like),
            other => {
                candle_core::bail!("packed matmul on the GPU takes f32 or bf16, not {other:?}")
            }
        }
    }

    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        w: &DevicePacked,
        like: &CudaStorage,
    ) -> candle_core::Result<CudaStorage> {
        let dev = like.device().clone();
        let n = w.rows * w.cols;
        let out: CudaSlice<T> = dev.alloc_zeros::<T>(n)?;
        let cfg = elements(n);
        // Absent pointer arguments (the kernel tests them for null).
        let null = 0u64;
        match &w.parts {
            DeviceParts::Nf4 { packed, absmax } => {
                let (ps, pl) = packed.storage_and_layout();
                let (a_s, al) = absmax.storage_and_layout();
                let p = view::<u8>(on_gpu(&ps, "codes")?, pl, "nf4 codes")?;
                let a = view::<f32>(on_gpu(&a_s, "absmax")?, al, "nf4 absmax")?;
                let offset = 0f32;
                let name = typed("nf4_dequant", like.dtype())?;
                launch!(&dev, &name, cfg; &p, &a, &null, &null, &null, &offset, &out, &n);
            }
            DeviceParts::Nf4Nested {
                packed,
                codes,
                dmap,
                absmax2,
                offset,
            } => {
                let (ps, pl) = packed.storage_and_layout();
                let (cs, cl) = codes.storage_and_layout();
                let (ds, dl) = dmap.storage_and_layout();
                let (a2s, a2l) = absmax2.storage_and_layout();
                let p = view::<u8>(on_gpu(&ps, "codes")?, pl, "nf4 codes")?;
                let c = view::<u8>(on_gpu(&cs, "absmax codes")?, cl, "nf4 absmax codes")?;
                let d = view::<f32>(on_gpu(&ds, "map")?, dl, "nf4 map")?;
                let a2 = view::<f32>(on_gpu(&a2s, "absmax")?, a2l, "nf4 nested absmax")?;
                let name = typed("nf4_dequant", like.dtype())?;
                launch!(&dev, &name, cfg; &p, &null, &c, &d, &a2, offset, &out, &n);
            }
            DeviceParts::Int8 { qs, scales } => {
                let (qst, ql) = qs.storage_and_layout();
                let (sst, sl) = scales.storage_and_layout();
                let q = view::<u8>(on_gpu(&qst, "values")?, ql, "int8 values")?;
                let sc = view::<f32>(on_gpu(&sst, "scales")?, sl, "int8 scales")?;
                let name = typed("q8_dequant", like.dtype())?;
                launch!(&dev, &name, cfg; &q, &sc, &out, &n);
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// `x · dequant(W)ᵀ` for `x: [..., in]`; the gradient flows to `x` only.
pub fn packed_matmul(x: &Tensor, w: &Arc<dyn PackedWeight>) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("rank ≥ 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    // The GPU kernels dequantize into f32 or bf16; the CPU path computes in f32.
    let compute = if x.device().is_cuda() && dtype == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    let x2 = x.to_dtype(compute)?.reshape((rows, inner))?.contiguous()?;
    let y = x2.apply_op1(PackedMatmul { w: w.clone() })?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank ≥ 1") = w.rows();
    Ok(y.reshape(out_dims)?.to_dtype(dtype)?)
}
