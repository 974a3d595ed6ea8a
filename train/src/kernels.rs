//! Launch logic of the GPU kernels in `train/kernels/ops.cu` (RMSNorm, RoPE, gated MLP
//! activations, cross-entropy, NF4 and int8 dequantization) and the helpers the ops use
//! to call them.
//!
//! The kernels are CUDA C compiled to PTX by `build.rs` (nvcc, `--features cuda`) and
//! loaded by the driver on first use. Each has a CPU twin that computes the same thing
//! the same way ([`crate::fused`], [`crate::cross_entropy`], [`crate::nf4`],
//! [`crate::q8`]) and is tested against composed candle ops; the grid and block sizes
//! are chosen here, on the host, and tested on the CPU.

/// Threads per block of the element-wise kernels (grid-stride loops).
pub const ELEMENT_BLOCK: u32 = 256;
/// Most blocks an element-wise launch uses; the loop strides over the rest.
pub const MAX_ELEMENT_GRID: usize = 1 << 16;

/// `(grid, block)` for a row-wise kernel: one block per row, a warp multiple of threads
/// up to 1024 (fewer for narrow rows, so no warp idles on a 64-wide row).
pub fn row_launch(rows: usize, width: usize) -> Result<(u32, u32), String> {
    if rows > i32::MAX as usize {
        return Err(format!("{rows} rows exceed one launch"));
    }
    let block = width.clamp(1, 1024).next_multiple_of(32).min(1024);
    Ok((rows.max(1) as u32, block as u32))
}

/// `(grid, block)` for an element-wise kernel over `n` elements.
pub fn element_launch(n: usize) -> (u32, u32) {
    let blocks = n
        .div_ceil(ELEMENT_BLOCK as usize)
        .clamp(1, MAX_ELEMENT_GRID);
    (blocks as u32, ELEMENT_BLOCK)
}

/// The elements each thread of an element-wise launch handles at most.
pub fn elements_per_thread(n: usize) -> usize {
    let (grid, block) = element_launch(n);
    n.div_ceil(grid as usize * block as usize)
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launches are FFI calls
pub(crate) mod gpu {
    //! Loading `ops.ptx` and launch configurations.
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
    use candle_core::cuda_backend::{CudaDType, CudaFunc};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
    const MODULE: &str = "pipe_ops";

    /// Launches kernel `$name` of `ops.ptx` on `$dev` with `$cfg`, pushing each argument
    /// (named values: the launch borrows them) in the kernel's parameter order.
    macro_rules! launch {
        ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
            use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
            use candle_core::cuda_backend::WrapErr as _;
            let f = $crate::kernels::gpu::func($dev, $name)?;
            let mut b = f.builder();
            $( b.arg($arg); )*
            // SAFETY: the call sites pass the kernel's parameters, in order, with the
            // types its CUDA signature declares.
            #[allow(unsafe_code)]
            let launched = unsafe { b.launch($cfg) };
            launched.w()?;
        }};
    }
    pub(crate) use launch;

    /// The kernel `name` (loaded once per device).
    pub(crate) fn func(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunc> {
        dev.get_or_load_custom_func(name, MODULE, PTX)
    }

    /// `name_f32` or `name_bf16` for the activation dtype.
    pub(crate) fn typed(name: &str, dtype: DType) -> candle_core::Result<String> {
        match dtype {
            DType::F32 => Ok(format!("{name}_f32")),
            DType::BF16 => Ok(format!("{name}_bf16")),
            other => candle_core::bail!("{name}: the GPU kernel takes f32 or bf16, not {other:?}"),
        }
    }

    /// The contiguous part of a storage a layout covers.
    pub(crate) fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let slice = s.as_cuda_slice::<T>()?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(slice.slice(a..b)),
            None => candle_core::bail!("{what}: the GPU kernel needs contiguous input"),
        }
    }

    pub(crate) fn rows(rows: usize, width: usize) -> candle_core::Result<LaunchConfig> {
        let (grid, block) = super::row_launch(rows, width).map_err(candle_core::Error::msg)?;
        Ok(LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    pub(crate) fn elements(n: usize) -> LaunchConfig {
        let (grid, block) = super::element_launch(n);
        LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_launches_give_each_row_a_block_of_whole_warps() {
        for (rows, width, want) in [
            (1, 1, 32),
            (7, 64, 64),
            (3, 100, 128),
            (2, 896, 896),
            (2, 3584, 1024),
            (4096, 151_936, 1024),
        ] {
            let (grid, block) = row_launch(rows, width).unwrap();
            assert_eq!(grid as usize, rows);
            assert_eq!(block, want, "{rows}×{width}");
            assert_eq!(block % 32, 0);
        }
        assert_eq!(
            row_launch(0, 8).unwrap().0,
            1,
            "an empty launch is still valid"
        );
        assert!(row_launch(1 << 31, 8).is_err());
    }

    #[test]
    fn element_launches_cover_every_element() {
        for n in [1, 255, 256, 257, 1 << 20, 7 * 4096 * 18_944] {
            let (grid, block) = element_launch(n);
            assert!(grid as usize <= MAX_ELEMENT_GRID);
            let per = elements_per_thread(n);
            assert!(grid as usize * block as usize * per >= n, "{n}");
            assert!(
                grid as usize * block as usize * (per - 1) < n,
                "{n}: idle stride"
            );
        }
    }

    #[test]
    fn the_kernels_nf4_table_is_bitsandbytes_code() {
        // The CUDA source's constant table must be the code the CPU side dequantizes with.
        let src = include_str!("../kernels/ops.cu");
        let start = src.find("NF4[16] = {").expect("NF4 table") + "NF4[16] = {".len();
        let body = &src[start..start + src[start..].find('}').unwrap()];
        let values: Vec<f32> = body
            .split(',')
            .map(|v| v.trim().trim_end_matches('f').parse().unwrap())
            .collect();
        assert_eq!(values, crate::nf4::nf4_code().to_vec());
    }
}
