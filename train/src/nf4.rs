//! NF4 (4-bit NormalFloat) weights exactly as bitsandbytes stores them, and the
//! frozen linear that trains through them (QLoRA).
//!
//! Layout (bitsandbytes `quantize_4bit(quant_type="nf4")`): the weight is read
//! row-major as one flat vector, cut into blocks of [`BLOCK`] (64) values, each with
//! one f32 absmax; every value becomes the index of the nearest of the 16 NF4 code
//! values after dividing by its block's absmax, and two indices share a byte, the
//! first in the high nibble. With double quantization the absmaxes are themselves
//! quantized: their mean is subtracted (`offset`) and the rest is stored as 8-bit
//! indices into bitsandbytes' signed dynamic map, in blocks of [`NESTED_BLOCK`] (256)
//! with an f32 absmax each. Quantizing here gives byte-identical codes and absmaxes to
//! bitsandbytes on CPU (checked against a committed fixture,
//! `scripts/reference/make_nf4_fixtures.py`), so a checkpoint bitsandbytes saved loads
//! as it is, and one pipe writes loads in bitsandbytes.
//!
//! Training goes through [`crate::packed::packed_matmul`]: `x · dequant(W)ᵀ` with a
//! backward that returns only `dy · dequant(W)`. Hand-written because no crate reads
//! bitsandbytes' layout or gives candle a differentiable 4-bit matmul.

use crate::error::{Error, Result};

/// Values per absmax block.
pub const BLOCK: usize = 64;
/// Absmaxes per nested block (double quantization).
pub const NESTED_BLOCK: usize = 256;

/// The 16 NF4 code values (bitsandbytes `get_4bit_type("nf4")`), as f32 bit patterns.
const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`), the code
/// book of the nested absmaxes, as f32 bit patterns.
const DYNAMIC_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The NF4 code values.
pub fn nf4_code() -> [f32; 16] {
    NF4_BITS.map(f32::from_bits)
}

/// The signed dynamic map used for nested absmaxes.
pub fn dynamic_map() -> Vec<f32> {
    DYNAMIC_BITS.iter().map(|&b| f32::from_bits(b)).collect()
}

/// Quantized absmaxes (double quantization).
#[derive(Debug, Clone, PartialEq)]
pub struct Nested {
    /// One 8-bit index into `code` per absmax.
    pub codes: Vec<u8>,
    /// The mean that was subtracted before quantizing.
    pub offset: f32,
    /// One f32 absmax per [`NESTED_BLOCK`] absmaxes.
    pub absmax: Vec<f32>,
    /// The code book (256 values; bitsandbytes' dynamic map).
    pub code: Vec<f32>,
}

/// The per-block scales of an NF4 matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double-quantized.
    Nested(Nested),
}

/// A frozen `[rows, cols]` matrix in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Matrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Two 4-bit indices per byte, the first in the high nibble; `ceil(rows·cols / 2)` bytes.
    pub packed: Vec<u8>,
    /// Block scales.
    pub absmax: Absmax,
}

impl Nf4Matrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix as bitsandbytes does on CPU
    /// (`quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, double_quant: bool) -> Nf4Matrix {
        assert_eq!(w.len(), rows * cols, "weight size");
        let code = nf4_code();
        // Bucket boundaries: midpoints of consecutive code values, computed in f32.
        let mut mids = [0f32; 15];
        for (i, m) in mids.iter_mut().enumerate() {
            *m = (code[i] + code[i + 1]) / 2.0;
        }
        // torch.bucketize (right=False): the number of boundaries strictly below x.
        let bucket = |x: f32| mids.iter().filter(|&&m| m < x).count() as u8;
        let n = w.len();
        let full = n - n % BLOCK;
        let mut absmax = Vec::with_capacity(n.div_ceil(BLOCK));
        let mut idx = Vec::with_capacity(n + 1);
        for block in w[..full].chunks(BLOCK) {
            let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(am);
            // Full blocks multiply by the reciprocal, the tail divides: as bitsandbytes.
            let inv = 1.0f32 / am.max(1e-38);
            idx.extend(block.iter().map(|&v| bucket((v * inv).clamp(-1.0, 1.0))));
        }
        if full < n {
            let tail = &w[full..];
            let am = tail.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(am);
            let den = am.max(1e-38);
            idx.extend(tail.iter().map(|&v| bucket((v / den).clamp(-1.0, 1.0))));
        }
        if idx.len() % 2 == 1 {
            idx.push(bucket(0.0));
        }
        let packed = idx.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant {
            Absmax::Nested(nest(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Nf4Matrix {
            rows,
            cols,
            packed,
            absmax,
        }
    }

    /// The f32 absmax of every block (nested ones dequantized as bitsandbytes does:
    /// `code[q] · nested_absmax + offset`).
    pub fn block_scales(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested(n) => n
                .codes
                .iter()
                .enumerate()
                .map(|(i, &q)| n.code[q as usize] * n.absmax[i / NESTED_BLOCK] + n.offset)
                .collect(),
        }
    }

    /// Writes the dequantized matrix (row-major) into `out`.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let n = self.rows * self.cols;
        assert_eq!(out.len(), n, "output size");
        let code = nf4_code();
        let scales = self.block_scales();
        for (i, o) in out.iter_mut().enumerate() {
            let byte = self.packed[i / 2];
            let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            *o = code[q as usize] * scales[i / BLOCK];
        }
    }

    /// The dequantized matrix, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_into(&mut out);
        out
    }

    /// Checks that the parts have the sizes `rows × cols` needs (for loaded checkpoints).
    pub fn validate(&self) -> Result<()> {
        let n = self.rows * self.cols;
        let blocks = n.div_ceil(BLOCK);
        let bad = |m: String| {
            Err(Error::Invalid(format!(
                "NF4 weight [{}, {}]: {m}",
                self.rows, self.cols
            )))
        };
        if self.packed.len() != n.div_ceil(2) {
            return bad(format!(
                "{} packed bytes, expected {}",
                self.packed.len(),
                n.div_ceil(2)
            ));
        }
        match &self.absmax {
            Absmax::Plain(a) if a.len() != blocks => {
                bad(format!("{} absmaxes, expected {blocks}", a.len()))
            }
            Absmax::Nested(nst) if nst.codes.len() != blocks => bad(format!(
                "{} nested absmax codes, expected {blocks}",
                nst.codes.len()
            )),
            Absmax::Nested(nst) if nst.absmax.len() != blocks.div_ceil(NESTED_BLOCK) => {
                bad(format!(
                    "{} nested absmaxes, expected {}",
                    nst.absmax.len(),
                    blocks.div_ceil(NESTED_BLOCK)
                ))
            }
            Absmax::Nested(nst) if nst.code.len() != 256 => bad(format!(
                "a nested code book of {} values, expected 256",
                nst.code.len()
            )),
            _ => Ok(()),
        }
    }

    /// Bytes held (codes and scales), for memory accounting.
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Nested(n) => n.codes.len() + 4 * n.absmax.len() + 4 * n.code.len() + 4,
            }
    }
}

/// Double quantization of block absmaxes (bitsandbytes: `offset = absmax.mean()`, then
/// `quantize_blockwise(absmax - offset, blocksize=256)` with the dynamic map).
fn nest(absmax: &[f32]) -> Nested {
    let offset = mean_f32(absmax);
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = dynamic_map();
    let (codes, nested) = quantize_blockwise(&centred, &code, NESTED_BLOCK);
    Nested {
        codes,
        offset,
        absmax: nested,
        code,
    }
}

/// The f32 mean as torch computes it (`absmax.mean()`): torch's CPU sum of a
/// contiguous f32 vector, emulated in its order, divided by the count in f32.
///
/// torch sums 8-lane vectors with four interleaved accumulators and a four-level
/// cascade (chunks of at least 16), adds the scalar tail, then the eight lanes in
/// order. That is exact for sums torch runs on one thread (up to 32,768 blocks, i.e.
/// matrices of up to 2M values); above that torch splits the sum across its threads,
/// so its offset can differ from this one in the last bits. Loading a bitsandbytes
/// checkpoint uses the stored offset, so loading is exact whatever the size.
pub fn mean_f32(v: &[f32]) -> f32 {
    torch_sum_f32(v) / v.len() as f32
}

// The index loops mirror torch's, so the order of additions can be read against it.
#[allow(clippy::needless_range_loop)]
fn torch_sum_f32(v: &[f32]) -> f32 {
    const LANES: usize = 8;
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    type Lanes = [f32; LANES];
    let add = |a: &mut Lanes, b: &Lanes| a.iter_mut().zip(b).for_each(|(x, y)| *x += *y);
    let vectors = v.len() / LANES;
    let load = |i: usize| -> Lanes { v[i * LANES..(i + 1) * LANES].try_into().expect("8 lanes") };
    // row_sum over `vectors` vectors: ILP interleaved rows, each a multi-level cascade.
    let rows = vectors / ILP;
    let ceil_log2 = |n: usize| {
        if n <= 1 {
            0
        } else {
            (usize::BITS - (n - 1).leading_zeros()) as usize
        }
    };
    let level_power = 4.max(ceil_log2(rows) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; LANES]; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k], &load(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; LANES];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for k in 0..ILP {
            add(&mut acc[0][k], &load(i * ILP + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut partial = acc[0];
    for r in rows * ILP..vectors {
        let x = load(r);
        add(&mut partial[0], &x);
    }
    for k in 1..ILP {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    let mut total = 0f32;
    for &x in &v[vectors * LANES..] {
        total += x;
    }
    for &lane in &partial[0] {
        total += lane;
    }
    total
}

/// bitsandbytes' CPU 8-bit blockwise quantization: per block the absmax, then each
/// value times `1/absmax` is mapped through a 65,536-entry table of nearest code
/// indices (the table makes ties and rounding what they are there).
fn quantize_blockwise(a: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    const LUT: usize = 65_536;
    let mut mids = [0f32; 255];
    for (i, m) in mids.iter_mut().enumerate() {
        *m = 0.5 * (code[i] + code[i + 1]);
    }
    let mut lut = vec![0u8; LUT];
    let mut c = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT - 1) as f32;
        while c < 255 && mids[c] < val {
            c += 1;
        }
        *slot = c as u8;
    }
    let index = |v: f32| -> usize {
        let v = v.clamp(-1.0, 1.0);
        ((v + 1.0) * 0.5 * (LUT - 1) as f32 + 0.5) as u16 as usize
    };
    let mut out = Vec::with_capacity(a.len());
    let mut absmax = Vec::with_capacity(a.len().div_ceil(blocksize));
    for block in a.chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            out.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0f32 / am;
        out.extend(block.iter().map(|&v| lut[index(v * inv)]));
    }
    (out, absmax)
}

impl crate::packed::PackedWeight for Nf4Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize(&self) -> Vec<f32> {
        Nf4Matrix::dequantize(self)
    }

    fn bytes(&self) -> usize {
        Nf4Matrix::bytes(self)
    }

    fn kind(&self) -> &'static str {
        "nf4"
    }

    fn to_device(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<std::sync::Arc<dyn crate::packed::PackedWeight>>> {
        Ok(Some(std::sync::Arc::new(crate::packed::DevicePacked::nf4(
            self, device,
        )?)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::packed::{packed_matmul, PackedWeight};
    use crate::rng::Rng;
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn code_books_are_sorted_and_span_minus_one_to_one() {
        let c = nf4_code();
        assert!(c.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((c[0], c[7], c[15]), (-1.0, 0.0, 1.0));
        let d = dynamic_map();
        assert!(d.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(d[255], 1.0);
    }

    #[test]
    fn gradient_through_nf4_equals_f32_on_the_dequantized_weight() {
        let mut rng = Rng::new(9);
        let (out, inp, m) = (24, 70, 5);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32 * 0.05).collect();
        let q: Arc<dyn PackedWeight> = Arc::new(Nf4Matrix::quantize(&w, out, inp, true));
        let deq = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
        let xv: Vec<f32> = (0..m * inp).map(|_| rng.normal() as f32).collect();
        let x = Var::from_vec(xv, (m, inp), &Device::Cpu).unwrap();
        let y = packed_matmul(x.as_tensor(), &q).unwrap();
        let want = x.as_tensor().matmul(&deq.t().unwrap()).unwrap();
        let d = (&y - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "forward differs by {d}");
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let loss2 = want.sqr().unwrap().sum_all().unwrap();
        let g2 = loss2
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let scale = g2
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = (&g - &g2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            scale > 0.0 && d / scale < 1e-5,
            "gradient differs by {} relative",
            d / scale
        );
    }
}
