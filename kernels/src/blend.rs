//! Tile blend: accumulates a super-resolution (or VAE) tile into an output strip with the tiling
//! planner's separable raised-cosine weights.
//!
//! `strip[sr + r, sc + j, c] += tile[c, tr + r, tc + j] * wx[j] * wy[r]`
//!
//! The strip is interleaved `[rows, width, channels]` (what the PNG writer streams), the tile
//! planar `[channels, rows, cols]` (what the network produces). [`blend_tile_slice`] is the CPU
//! reference, used directly by `kiln_core::tiling::StripAssembler`; [`blend_tile`] is the same as a
//! candle in-place op on tensors, with a CUDA kernel (kernels/cuda/blend.cu) under `cuda`.

use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};

/// Which part of a tile goes where in the strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlendRegion {
    /// First strip row and column written.
    pub strip_row: usize,
    pub strip_col: usize,
    /// First tile row and column read.
    pub tile_row: usize,
    pub tile_col: usize,
    /// Size of the blended region.
    pub rows: usize,
    pub cols: usize,
}

/// Shapes of the two buffers a [`BlendRegion`] refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlendShapes {
    strip_rows: usize,
    strip_width: usize,
    channels: usize,
    tile_rows: usize,
    tile_cols: usize,
}

fn check(region: &BlendRegion, s: &BlendShapes, weights: usize) -> Result<()> {
    let fits =
        |start: usize, len: usize, total: usize| start.checked_add(len).is_some_and(|end| end <= total);
    if !fits(region.strip_row, region.rows, s.strip_rows)
        || !fits(region.strip_col, region.cols, s.strip_width)
    {
        candle_core::bail!(
            "kiln-blend-tile: region {region:?} outside the {}x{} strip",
            s.strip_rows,
            s.strip_width
        );
    }
    if !fits(region.tile_row, region.rows, s.tile_rows) || !fits(region.tile_col, region.cols, s.tile_cols) {
        candle_core::bail!(
            "kiln-blend-tile: region {region:?} outside the {}x{} tile (halo too small?)",
            s.tile_rows,
            s.tile_cols
        );
    }
    if weights != region.rows + region.cols {
        candle_core::bail!(
            "kiln-blend-tile: {weights} weights for {} rows + {} cols",
            region.rows,
            region.cols
        );
    }
    Ok(())
}

/// CPU reference. `strip`: `[strip.len() / (strip_width * channels), strip_width, channels]`;
/// `tile`: `[channels, tile_rows, tile_cols]`; `wy`/`wx`: one weight per region row/column.
/// Rows whose weight is 0 are skipped (so a NaN outside a tile's share cannot leak in).
#[allow(clippy::too_many_arguments)]
pub fn blend_tile_slice(
    strip: &mut [f32],
    strip_width: usize,
    channels: usize,
    tile: &[f32],
    tile_rows: usize,
    tile_cols: usize,
    region: BlendRegion,
    wy: &[f32],
    wx: &[f32],
) -> Result<()> {
    let row_len = strip_width * channels;
    if row_len == 0 || strip.len() % row_len != 0 || tile.len() != channels * tile_rows * tile_cols {
        candle_core::bail!(
            "kiln-blend-tile: strip of {} values for width {strip_width} x {channels}, tile of {} for {channels}x{tile_rows}x{tile_cols}",
            strip.len(),
            tile.len()
        );
    }
    let shapes =
        BlendShapes { strip_rows: strip.len() / row_len, strip_width, channels, tile_rows, tile_cols };
    check(&region, &shapes, wy.len() + wx.len())?;
    if wy.len() != region.rows {
        candle_core::bail!("kiln-blend-tile: {} row weights for {} rows", wy.len(), region.rows);
    }
    let plane = tile_rows * tile_cols;
    for (r, &w_row) in wy.iter().enumerate() {
        if w_row == 0.0 {
            continue;
        }
        let dst = &mut strip[(region.strip_row + r) * row_len..][..row_len];
        let src_row = (region.tile_row + r) * tile_cols + region.tile_col;
        for c in 0..channels {
            let src = &tile[c * plane + src_row..][..region.cols];
            for (i, (&v, &w)) in src.iter().zip(wx).enumerate() {
                dst[(region.strip_col + i) * channels + c] += v * w * w_row;
            }
        }
    }
    Ok(())
}

/// The in-place op: self = strip, then tile and weights (`[wy | wx]`).
#[derive(Debug, Clone, Copy)]
struct BlendTile {
    region: BlendRegion,
}

impl BlendTile {
    fn shapes(&self, strip: &Layout, tile: &Layout) -> Result<BlendShapes> {
        let (strip_rows, strip_width, channels) = strip.shape().dims3()?;
        let (tile_channels, tile_rows, tile_cols) = tile.shape().dims3()?;
        if tile_channels != channels {
            candle_core::bail!("kiln-blend-tile: tile has {tile_channels} channels, strip {channels}");
        }
        Ok(BlendShapes { strip_rows, strip_width, channels, tile_rows, tile_cols })
    }
}

fn contiguous(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("kiln-blend-tile: {what} must be contiguous")))
}

impl InplaceOp3 for BlendTile {
    fn name(&self) -> &'static str {
        "kiln-blend-tile"
    }

    fn cpu_fwd(
        &self,
        ss: &mut CpuStorage,
        sl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(strip), CpuStorage::F32(tile), CpuStorage::F32(weights)) = (ss, ts, ws) else {
            candle_core::bail!("kiln-blend-tile: strip, tile and weights must be f32");
        };
        let s = self.shapes(sl, tl)?;
        let ((s0, s1), (t0, t1), (w0, w1)) =
            (contiguous(sl, "strip")?, contiguous(tl, "tile")?, contiguous(wl, "weights")?);
        let weights = &weights[w0..w1];
        check(&self.region, &s, weights.len())?;
        let (wy, wx) = weights.split_at(self.region.rows);
        blend_tile_slice(
            &mut strip[s0..s1],
            s.strip_width,
            s.channels,
            &tile[t0..t1],
            s.tile_rows,
            s.tile_cols,
            self.region,
            wy,
            wx,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ss: &mut candle_core::CudaStorage,
        sl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<()> {
        cuda::blend(self.region, self.shapes(sl, tl)?, (ss, sl), (ts, tl), (ws, wl))
    }
}

/// Blends `region` of `tile` (`[C, th, tw]`, f32) into `strip` (`[rows, width, C]`, f32, in
/// place) with weights `[wy (region.rows) | wx (region.cols)]` (f32). All on one device.
pub fn blend_tile(strip: &Tensor, tile: &Tensor, weights: &Tensor, region: BlendRegion) -> Result<()> {
    for (t, what) in [(strip, "strip"), (tile, "tile"), (weights, "weights")] {
        if t.dtype() != DType::F32 {
            candle_core::bail!("kiln-blend-tile: {what} is {:?}, expected f32", t.dtype());
        }
    }
    strip.inplace_op3(tile, weights, &BlendTile { region })
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{check, contiguous, BlendRegion, BlendShapes};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/blend.ptx"));

    pub(super) fn blend(
        region: BlendRegion,
        s: BlendShapes,
        (strip, sl): (&mut CudaStorage, &Layout),
        (tile, tl): (&CudaStorage, &Layout),
        (weights, wl): (&CudaStorage, &Layout),
    ) -> Result<()> {
        let ((s0, s1), (t0, t1), (w0, w1)) =
            (contiguous(sl, "strip")?, contiguous(tl, "tile")?, contiguous(wl, "weights")?);
        check(&region, &s, w1 - w0)?;
        let n = region.rows * region.cols * s.channels;
        if n == 0 {
            return Ok(());
        }
        let u32_of = |v: usize| -> Result<u32> {
            u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("kiln-blend-tile: {v} exceeds u32")))
        };
        let args = [
            s.strip_width,
            s.channels,
            s.tile_rows,
            s.tile_cols,
            region.strip_row,
            region.strip_col,
            region.tile_row,
            region.tile_col,
            region.rows,
            region.cols,
        ]
        .map(u32_of);
        let mut scalars = [0u32; 10];
        for (dst, v) in scalars.iter_mut().zip(args) {
            *dst = v?;
        }
        let dev = strip.device.clone();
        let func = dev.get_or_load_custom_func("kiln_blend_tile_f32", "kiln_blend", PTX)?;
        let tile_view = tile.as_cuda_slice::<f32>()?.slice(t0..t1);
        let weight_view = weights.as_cuda_slice::<f32>()?.slice(w0..w1);
        let mut strip_view = strip.as_cuda_slice_mut::<f32>()?.slice_mut(s0..s1);
        let threads = 256u32;
        let blocks = u32::try_from(n.div_ceil(threads as usize)).unwrap_or(u32::MAX).min(65_535 * 16);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let mut builder = func.builder();
        builder.arg(&mut strip_view);
        builder.arg(&tile_view);
        builder.arg(&weight_view);
        for v in &scalars {
            builder.arg(v);
        }
        // SAFETY: the kernel's arguments match kernels/cuda/blend.cu's signature (three f32
        // pointers, ten u32); `check` proved every index it forms lies inside the three views.
        #[allow(unsafe_code)]
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Independent reference: the formula, element by element.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        strip: &mut [f32],
        width: usize,
        ch: usize,
        tile: &[f32],
        th: usize,
        tw: usize,
        r: BlendRegion,
        wy: &[f32],
        wx: &[f32],
    ) {
        for y in 0..r.rows {
            for x in 0..r.cols {
                for c in 0..ch {
                    if wy[y] == 0.0 {
                        continue;
                    }
                    let v = tile[(c * th + r.tile_row + y) * tw + r.tile_col + x];
                    strip[((r.strip_row + y) * width + r.strip_col + x) * ch + c] += v * wx[x] * wy[y];
                }
            }
        }
        let _ = (th, tw);
    }

    #[test]
    fn slice_matches_the_formula() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (width, ch, strip_rows, th, tw) = (37, 3, 11, 9, 14);
        let region = BlendRegion { strip_row: 2, strip_col: 20, tile_row: 1, tile_col: 3, rows: 8, cols: 11 };
        let tile = random(ch * th * tw, &mut rng);
        let mut wy = random(region.rows, &mut rng);
        wy[4] = 0.0;
        let wx = random(region.cols, &mut rng);
        let start = random(strip_rows * width * ch, &mut rng);
        let (mut got, mut want) = (start.clone(), start);
        blend_tile_slice(&mut got, width, ch, &tile, th, tw, region, &wy, &wx).unwrap();
        naive(&mut want, width, ch, &tile, th, tw, region, &wy, &wx);
        assert_eq!(got, want);
    }

    #[test]
    fn out_of_bounds_regions_are_errors() {
        let tile = vec![0f32; 3 * 4 * 4];
        let mut strip = vec![0f32; 4 * 8 * 3];
        let ok = BlendRegion { strip_row: 0, strip_col: 4, tile_row: 0, tile_col: 0, rows: 4, cols: 4 };
        let w = [1f32; 4];
        assert!(blend_tile_slice(&mut strip, 8, 3, &tile, 4, 4, ok, &w, &w).is_ok());
        for bad in [
            BlendRegion { strip_col: 5, ..ok },
            BlendRegion { strip_row: 1, ..ok },
            BlendRegion { tile_col: 1, ..ok },
            BlendRegion { tile_row: usize::MAX, ..ok },
        ] {
            assert!(blend_tile_slice(&mut strip, 8, 3, &tile, 4, 4, bad, &w, &w).is_err(), "{bad:?}");
        }
        assert!(blend_tile_slice(&mut strip, 8, 3, &tile, 4, 4, ok, &w[..3], &w).is_err());
    }

    fn op_case(device: &Device) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (width, ch, strip_rows, th, tw) = (130, 4, 40, 36, 70);
        let region =
            BlendRegion { strip_row: 5, strip_col: 61, tile_row: 2, tile_col: 1, rows: 33, cols: 69 };
        let tile = random(ch * th * tw, &mut rng);
        let weights = random(region.rows + region.cols, &mut rng);
        let start = random(strip_rows * width * ch, &mut rng);
        let mut want = start.clone();
        let (wy, wx) = weights.split_at(region.rows);
        blend_tile_slice(&mut want, width, ch, &tile, th, tw, region, wy, wx).unwrap();
        let strip = Tensor::from_vec(start, (strip_rows, width, ch), device).unwrap();
        let tile = Tensor::from_vec(tile, (ch, th, tw), device).unwrap();
        let weights = Tensor::from_vec(weights, region.rows + region.cols, device).unwrap();
        blend_tile(&strip, &tile, &weights, region).unwrap();
        (strip.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want)
    }

    #[test]
    fn op_on_cpu_matches_the_slice_reference() {
        let (got, want) = op_case(&Device::Cpu);
        assert_eq!(got, want);
    }

    #[test]
    fn op_rejects_other_dtypes_and_mismatched_channels() {
        let strip = Tensor::zeros((4, 4, 3), DType::F32, &Device::Cpu).unwrap();
        let region = BlendRegion { strip_row: 0, strip_col: 0, tile_row: 0, tile_col: 0, rows: 2, cols: 2 };
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let tile16 = Tensor::zeros((3, 2, 2), DType::F16, &Device::Cpu).unwrap();
        assert!(blend_tile(&strip, &tile16, &w, region).is_err());
        let tile4 = Tensor::zeros((4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(blend_tile(&strip, &tile4, &w, region).is_err());
    }

    /// Runs only in a CUDA build on a GPU (benches/gpu/run.sh); not yet run.
    #[cfg(feature = "cuda")]
    #[test]
    fn op_on_cuda_matches_cpu() {
        let device = Device::new_cuda(0).unwrap();
        let (got, want) = op_case(&device);
        // The kernel rounds each product as the CPU does (__fmul_rn, no FMA): bit-equal expected.
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max <= 1e-6, "CUDA blend differs from the CPU reference by {max}");
    }
}
