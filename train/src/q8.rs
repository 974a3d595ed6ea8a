//! Int8 weight copies for decoding, and the matmul that reads them.
//!
//! Decoding multiplies a few rows (one per sequence in the batch) by every
//! projection. In f32 that reads 4 bytes per weight and, through `gemm`, packs the
//! weight matrix on every call; candle's quantized matmul on x86 takes one
//! output column at a time and converts an f16 scale per block. Here a weight
//! `[n, k]` is stored once as int8 values with one f32 scale per 32 inputs (the
//! Q8_0 scheme of GGML, with the scale kept in f32), the few input rows are
//! quantized the same way per call, and an AVX2 kernel computes a tile of up to
//! 4 rows × 4 columns per pass over the weights, so each weight byte is read
//! once per call whatever the batch. The work is split over candle's CPU thread
//! pool. Other CPUs take the portable loop, which computes the same sums.

#![allow(unsafe_code)]

/// Inputs per quantization block.
pub const BLOCK: usize = 32;

/// Quantizes `x` (a multiple of [`BLOCK`] long) into int8 values and one scale
/// per block: `x ≈ scale · q`, `q` in −127..=127, rounded to nearest.
fn quantize_into(x: &[f32], qs: &mut [i8], scales: &mut [f32]) {
    for ((xb, qb), d) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i8;
        }
        *d = scale;
    }
}

/// A `[n, k]` matrix stored as int8 blocks with f32 scales.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// `[n, k]` int8 values.
    qs: Vec<i8>,
    /// `[n, k / BLOCK]` scales.
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Quantizes a row-major `[n, k]` f32 matrix; `k` must be a multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Q8Matrix {
        assert!(
            k.is_multiple_of(BLOCK) && w.len() == n * k,
            "Q8Matrix: [{n}, {k}] from {} values",
            w.len()
        );
        let mut qs = vec![0i8; n * k];
        let mut scales = vec![0f32; n * k / BLOCK];
        quantize_into(w, &mut qs, &mut scales);
        Q8Matrix { n, k, qs, scales }
    }

    /// The int8 values and the scales.
    pub(crate) fn parts(&self) -> (&[i8], &[f32]) {
        (&self.qs, &self.scales)
    }

    /// A matrix from its parts (as [`Q8Matrix::parts`] returns them).
    pub(crate) fn from_parts(n: usize, k: usize, qs: Vec<i8>, scales: Vec<f32>) -> Q8Matrix {
        assert_eq!(qs.len(), n * k, "int8 values");
        assert_eq!(scales.len(), n * k / BLOCK, "int8 scales");
        Q8Matrix { n, k, qs, scales }
    }

    /// Output width `n`.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width `k`.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The dequantized matrix, row-major `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(BLOCK)
            .zip(&self.scales)
            .flat_map(|(q, d)| q.iter().map(move |&v| v as f32 * d))
            .collect()
    }

    /// `x · Wᵀ` for `m` rows of `x` (row-major `[m, k]`): row-major `[m, n]`.
    /// The rows are quantized per block like the weights.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "Q8Matrix::matmul: x is not [{m}, {k}]");
        let mut xq = vec![0i8; m * k];
        let mut xd = vec![0f32; m * k / BLOCK];
        quantize_into(x, &mut xq, &mut xd);
        let mut out = vec![0f32; m * n];
        let lhs = Lhs {
            qs: &xq,
            scales: &xd,
            m,
        };
        // Work items are groups of COLS output columns; each computes all rows.
        let groups = n.div_ceil(COLS);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            let cols = range.start * COLS..(range.end * COLS).min(n);
            // SAFETY: work items cover disjoint column ranges, and every write
            // below is to (row, column) with row < m and column in `cols`.
            unsafe { self.tile_columns(&lhs, cols, out_ptr) }
        };
        if groups * m * k < PARALLEL_MIN_MACS {
            run(0..groups);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(groups, run);
        }
        out
    }

    /// Computes every row of `out` for the columns in `cols`.
    ///
    /// # Safety
    /// `out` points to an `[lhs.m, self.n]` buffer; no other thread writes the
    /// columns in `cols` meanwhile.
    unsafe fn tile_columns(&self, lhs: &Lhs, cols: std::ops::Range<usize>, out: SendPtr) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA; the caller's contract covers `out`.
            unsafe { avx2::tile_columns(self, lhs, cols, out.0) };
            return;
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.tile_columns_portable(lhs, cols, out.0) }
    }

    /// The reference loop: the same integer sums and scale products as the
    /// SIMD kernel.
    unsafe fn tile_columns_portable(&self, lhs: &Lhs, cols: std::ops::Range<usize>, out: *mut f32) {
        let kb = self.k / BLOCK;
        for c in cols {
            let w = &self.qs[c * self.k..(c + 1) * self.k];
            let wd = &self.scales[c * kb..(c + 1) * kb];
            for r in 0..lhs.m {
                let x = &lhs.qs[r * self.k..(r + 1) * self.k];
                let xd = &lhs.scales[r * kb..(r + 1) * kb];
                let mut acc = 0f32;
                for b in 0..kb {
                    let s: i32 = w[b * BLOCK..(b + 1) * BLOCK]
                        .iter()
                        .zip(&x[b * BLOCK..(b + 1) * BLOCK])
                        .map(|(&a, &b)| a as i32 * b as i32)
                        .sum();
                    acc += s as f32 * (wd[b] * xd[b]);
                }
                // SAFETY: r < m and c < n, and the caller owns column c.
                unsafe { *out.add(r * self.n + c) = acc };
            }
        }
    }
}

/// Below this many multiply-adds a call runs on the calling thread: waking the
/// pool costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 15;

/// Output columns per work item (a multiple of the kernel's column tile).
const COLS: usize = 16;

/// The quantized input rows.
struct Lhs<'a> {
    qs: &'a [i8],
    scales: &'a [f32],
    m: usize,
}

/// The output pointer, shared by the pool's threads (each writes its own columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: see `Q8Matrix::matmul`: threads write disjoint elements.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Lhs, Q8Matrix, BLOCK};
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `R` rows × `C` columns starting at row `r0`, column `c0`.
    ///
    /// # Safety
    /// AVX2 and FMA present; `r0 + R ≤ lhs.m`, `c0 + C ≤ w.n`; `out` is `[m, n]`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // index loops over const-sized register tiles
    unsafe fn tile<const R: usize, const C: usize>(
        w: &Q8Matrix,
        lhs: &Lhs,
        r0: usize,
        c0: usize,
        out: *mut f32,
    ) {
        let (k, kb) = (w.k, w.k / BLOCK);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let wq = w.qs.as_ptr().add(c0 * k);
        let wd = w.scales.as_ptr().add(c0 * kb);
        let xq = lhs.qs.as_ptr().add(r0 * k);
        let xd = lhs.scales.as_ptr().add(r0 * kb);
        for b in 0..kb {
            let mut wv = [_mm256_setzero_si256(); C];
            let mut wabs = [_mm256_setzero_si256(); C];
            let mut ws = [_mm256_setzero_ps(); C];
            for c in 0..C {
                wv[c] = _mm256_loadu_si256(wq.add(c * k + b * BLOCK) as *const __m256i);
                wabs[c] = _mm256_sign_epi8(wv[c], wv[c]);
                ws[c] = _mm256_set1_ps(*wd.add(c * kb + b));
            }
            for r in 0..R {
                let xv = _mm256_loadu_si256(xq.add(r * k + b * BLOCK) as *const __m256i);
                let xs = _mm256_set1_ps(*xd.add(r * kb + b));
                for c in 0..C {
                    // |w| · (x with w's sign) = w · x, as u8 × i8 pairs summed to i16,
                    // then pairs of i16 summed to i32 (no overflow: |q| ≤ 127).
                    let p16 = _mm256_maddubs_epi16(wabs[c], _mm256_sign_epi8(xv, wv[c]));
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                    acc[r][c] = _mm256_fmadd_ps(p, _mm256_mul_ps(xs, ws[c]), acc[r][c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                *out.add((r0 + r) * w.n + c0 + c) = hsum(*a);
            }
        }
    }

    /// Every row for the columns in `cols`, in tiles of 4 rows × 2 columns (or
    /// 1 row × 4 columns when there is a single row).
    ///
    /// # Safety
    /// AVX2 and FMA present; `out` is `[lhs.m, w.n]` and `cols` is within `0..w.n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_columns(
        w: &Q8Matrix,
        lhs: &Lhs,
        cols: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        let mut c = cols.start;
        if lhs.m == 1 {
            while c + 4 <= cols.end {
                tile::<1, 4>(w, lhs, 0, c, out);
                c += 4;
            }
            while c < cols.end {
                tile::<1, 1>(w, lhs, 0, c, out);
                c += 1;
            }
            return;
        }
        while c + 2 <= cols.end {
            let mut r = 0;
            while r + 4 <= lhs.m {
                tile::<4, 2>(w, lhs, r, c, out);
                r += 4;
            }
            while r < lhs.m {
                tile::<1, 2>(w, lhs, r, c, out);
                r += 1;
            }
            c += 2;
        }
        if c < cols.end {
            for r in 0..lhs.m {
                tile::<1, 1>(w, lhs, r, c, out);
            }
        }
    }
}

impl crate::packed::PackedWeight for Q8Matrix {
    fn rows(&self) -> usize {
        self.n
    }

    fn cols(&self) -> usize {
        self.k
    }

    fn dequantize(&self) -> Vec<f32> {
        Q8Matrix::dequantize(self)
    }

    fn bytes(&self) -> usize {
        self.qs.len() + 4 * self.scales.len()
    }

    fn kind(&self) -> &'static str {
        "int8"
    }

    fn as_q8(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<Q8Matrix>> {
        Some(self)
    }

    fn to_device(
        &self,
        device: &candle_core::Device,
    ) -> crate::Result<Option<std::sync::Arc<dyn crate::packed::PackedWeight>>> {
        Ok(Some(std::sync::Arc::new(
            crate::packed::DevicePacked::int8(self, device)?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The quantized product against the f32 one, and the SIMD kernel against
    /// the portable loop (same integer sums: equal up to summation order).
    #[test]
    fn matches_f32_and_the_portable_loop_for_every_tile_shape() {
        let mut rng = Rng::new(11);
        for &(m, n, k) in &[
            (1, 37, 64),
            (3, 5, 96),
            (8, 130, 576),
            (6, 17, 32),
            (1, 3, 32),
        ] {
            let w = random(n * k, &mut rng);
            let x = random(m * k, &mut rng);
            let q = Q8Matrix::quantize(&w, n, k);
            let got = q.matmul(&x, m);
            let mut exact = vec![0f32; m * n];
            for r in 0..m {
                for c in 0..n {
                    exact[r * n + c] = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                }
            }
            let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = got
                .iter()
                .zip(&exact)
                .fold(0f32, |a, (g, e)| a.max((g - e).abs()));
            assert!(
                err / scale < 2e-2,
                "[{m},{n},{k}] relative error {}",
                err / scale
            );

            let mut xq = vec![0i8; m * k];
            let mut xd = vec![0f32; m * k / BLOCK];
            quantize_into(&x, &mut xq, &mut xd);
            let lhs = Lhs {
                qs: &xq,
                scales: &xd,
                m,
            };
            let mut portable = vec![0f32; m * n];
            // SAFETY: one thread, the whole output.
            unsafe { q.tile_columns_portable(&lhs, 0..n, portable.as_mut_ptr()) };
            for (g, p) in got.iter().zip(&portable) {
                assert!((g - p).abs() <= 1e-4 * scale, "{g} vs {p}");
            }
        }
    }

    #[test]
    fn dequantize_is_within_half_a_step_of_the_input() {
        let mut rng = Rng::new(5);
        let w = random(4 * 64, &mut rng);
        let q = Q8Matrix::quantize(&w, 4, 64);
        for (blk, (orig, back)) in w
            .chunks(BLOCK)
            .zip(q.dequantize().chunks(BLOCK))
            .enumerate()
        {
            let step = q.scales[blk];
            for (a, b) in orig.iter().zip(back) {
                assert!((a - b).abs() <= 0.5 * step + 1e-6);
            }
        }
    }
}
