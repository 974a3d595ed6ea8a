//! A GGUF projection kept in the file's own quantized blocks (`quantize: keep`).
//!
//! llama.cpp's block formats are candle's ([`candle_core::quantized::k_quants`]): the
//! matrix keeps the blocks exactly as the file stores them, one row after another, and
//! [`crate::packed::packed_matmul`] dequantizes it with candle's own block decoders for
//! each forward and backward call, so training on a Q4_1 file sees the very weights
//! llama.cpp runs. Only the block types that pipe tests are kept (Q4_0, Q4_1, Q4_K,
//! Q8_0); others are refused by name rather than silently dequantized. Decoding calls
//! (a few rows, no gradient) use llama.cpp's block dot products instead.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QuantizedType};

use crate::packed::PackedWeight;

/// GGUF block types a base may stay in.
pub const KEPT_TYPES: [GgmlDType; 4] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q4K,
    GgmlDType::Q8_0,
];

/// Names of [`KEPT_TYPES`], as llama.cpp writes them.
pub fn kept_type_names() -> &'static str {
    "Q4_0, Q4_1, Q4_K, Q8_0"
}

/// A frozen `[rows, cols]` matrix in GGUF blocks.
pub struct GgmlMatrix {
    rows: usize,
    cols: usize,
    blocks: Box<dyn QuantizedType>,
}

impl std::fmt::Debug for GgmlMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgmlMatrix[{:?}; {}x{}]",
            self.blocks.dtype(),
            self.rows,
            self.cols
        )
    }
}

impl GgmlMatrix {
    /// Wraps a row-major `[rows, cols]` matrix's raw blocks of type `dtype`; when
    /// `row_order` is given, row `i` of the result is row `row_order[i]` of `data`
    /// (llama.cpp stores Llama's q/k rows permuted; whole rows move, blocks untouched).
    pub fn from_blocks(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: &[u8],
        row_order: Option<&[usize]>,
    ) -> Result<GgmlMatrix, String> {
        if !KEPT_TYPES.contains(&dtype) {
            return Err(format!(
                "{dtype:?} blocks cannot stay quantized (kept: {})",
                kept_type_names()
            ));
        }
        let bs = dtype.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(format!(
                "a [{rows}, {cols}] {dtype:?} matrix: width is not a multiple of {bs}"
            ));
        }
        let row_bytes = cols / bs * dtype.type_size();
        if data.len() != rows * row_bytes {
            return Err(format!(
                "a [{rows}, {cols}] {dtype:?} matrix needs {} bytes, got {}",
                rows * row_bytes,
                data.len()
            ));
        }
        let bytes: Cow<'_, [u8]> = match row_order {
            None => Cow::Borrowed(data),
            Some(order) => {
                let mut out = Vec::with_capacity(data.len());
                for &r in order {
                    out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                }
                Cow::Owned(out)
            }
        };
        Ok(GgmlMatrix {
            rows,
            cols,
            blocks: dtype.from_data(bytes),
        })
    }

    /// The block type.
    pub fn dtype(&self) -> GgmlDType {
        self.blocks.dtype()
    }
}

impl PackedWeight for GgmlMatrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize(&self) -> Vec<f32> {
        match self.blocks.dequantize(self.rows * self.cols) {
            Ok(candle_core::CpuStorage::F32(v)) => v,
            // Every kept type decodes to f32 (candle's `to_float`).
            other => unreachable!("GGUF blocks decode to f32, got {other:?}"),
        }
    }

    fn bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    /// llama.cpp's own dot-product kernels (candle's `k_quants::matmul`), which round the
    /// input to 8-bit blocks as llama.cpp does: what llama.cpp computes when decoding.
    fn matmul_rows(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let mut out = vec![0f32; rows * self.rows];
        self.blocks
            .matmul_t((rows, self.cols, self.rows), x, &mut out)
            .ok()?;
        Some(out)
    }

    fn kind(&self) -> &'static str {
        match self.blocks.dtype() {
            GgmlDType::Q4_0 => "q4_0",
            GgmlDType::Q4_1 => "q4_1",
            GgmlDType::Q4K => "q4_k",
            _ => "q8_0",
        }
    }
}

/// The row order that undoes llama.cpp's q/k permutation of a `[rows, _]` Llama
/// projection with `heads` heads: row `i` of the HF layout is row `order[i]` of the
/// file (the inverse of `convert_hf_to_gguf.py`'s `permute`).
pub fn unpermute_rows(rows: usize, heads: usize) -> Vec<usize> {
    let per_head = rows / heads;
    let half = per_head / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * per_head + i * 2 + j);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn weight(rows: usize, cols: usize) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(7);
        (0..rows * cols).map(|_| r.normal() as f32 * 0.1).collect()
    }

    fn dequantized(q: &QTensor) -> Vec<f32> {
        let t = q.dequantize(&Device::Cpu).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn decodes_as_candle_does_for_every_kept_type() {
        let (rows, cols) = (8, 512);
        let w = weight(rows, cols);
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for dtype in KEPT_TYPES {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let expect = dequantized(&q);
            let m = GgmlMatrix::from_blocks(dtype, rows, cols, &q.data().unwrap(), None).unwrap();
            assert_eq!(m.dequantize(), expect, "{dtype:?}");
            assert_eq!(m.bytes(), q.storage_size_in_bytes());
            assert!(m.bytes() * 3 < rows * cols * 4, "{dtype:?} is compact");
        }
    }

    #[test]
    fn row_order_moves_whole_rows() {
        let (rows, cols, heads) = (8, 64, 2);
        let t = Tensor::from_vec(weight(rows, cols), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let dense = dequantized(&q);
        let order = unpermute_rows(rows, heads);
        let m = GgmlMatrix::from_blocks(
            GgmlDType::Q8_0,
            rows,
            cols,
            &q.data().unwrap(),
            Some(&order),
        )
        .unwrap();
        let got = m.dequantize();
        for (i, &r) in order.iter().enumerate() {
            assert_eq!(
                got[i * cols..(i + 1) * cols],
                dense[r * cols..(r + 1) * cols]
            );
        }
        // Each head's rows: first the even rows of the file, then the odd ones.
        assert_eq!(order, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn refuses_types_it_does_not_keep() {
        let err = GgmlMatrix::from_blocks(GgmlDType::Q6K, 1, 256, &[0; 210], None).unwrap_err();
        assert!(err.contains("Q6K") && err.contains("Q4_K"), "{err}");
    }
}
