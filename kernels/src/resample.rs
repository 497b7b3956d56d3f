//! Resampling of NCHW feature maps: bilinear resize (PyTorch `align_corners=False`) and 2×2
//! max-pooling with ceil mode. On CPU (f32) each plane is a task of its own (rayon), where
//! candle's ops run every plane on one thread; elsewhere (and as the reference) candle's ops.
//! The CPU kernels compute exactly what candle's do, so results are bit-identical.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::f32_values;

/// Bilinear resize of `[B, C, H, W]` to `[B, C, height, width]`, `align_corners = false`
/// (ONNX `pytorch_half_pixel`), as `Tensor::upsample_bilinear2d(height, width, false)`.
pub fn upsample_bilinear(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (height, width) {
        return Ok(x.clone());
    }
    if !is_cpu_f32(x) {
        return x.upsample_bilinear2d(height, width, false);
    }
    x.contiguous()?.apply_op1_no_bwd(&Bilinear { height, width })
}

/// 2×2 max-pool with stride 2 and ceil mode (an odd last row or column is a window of its own),
/// as padding odd sides by repeating their edge and `max_pool2d(2)`.
pub fn max_pool2x2_ceil(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        let (_, _, h, w) = x.dims4()?;
        let mut x = x.clone();
        if h % 2 == 1 {
            x = x.pad_with_same(2, 0, 1)?;
        }
        if w % 2 == 1 {
            x = x.pad_with_same(3, 0, 1)?;
        }
        return x.max_pool2d(2);
    }
    x.contiguous()?.apply_op1_no_bwd(&MaxPoolCeil)
}

fn is_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Source rows (or columns) and the weight of the second for each output row: candle's (and
/// PyTorch's) `scale · (i + 0.5) − 0.5`, clamped at 0, in f64.
fn taps(size_in: usize, size_out: usize) -> Vec<(usize, usize, f64)> {
    let scale = size_in as f64 / size_out as f64;
    (0..size_out)
        .map(|i| {
            let src = (scale * (i as f64 + 0.5) - 0.5).max(0.0);
            let i0 = src.floor() as usize;
            let i1 = (i0 + 1).min(size_in - 1);
            (i0, i1, (src - i0 as f64).clamp(0.0, 1.0))
        })
        .collect()
}

struct Bilinear {
    height: usize,
    width: usize,
}

impl CustomOp1 for Bilinear {
    fn name(&self) -> &'static str {
        "kiln-upsample-bilinear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_values("kiln-upsample-bilinear", "input", storage, layout)?;
        let (b, c, h, w) = layout.shape().dims4()?;
        if h == 0 || w == 0 || self.height == 0 || self.width == 0 {
            candle_core::bail!("kiln-upsample-bilinear: empty map {h}x{w} -> {}x{}", self.height, self.width);
        }
        let (rows, cols) = (taps(h, self.height), taps(w, self.width));
        let plane_out = self.height * self.width;
        let mut dst = vec![0f32; b * c * plane_out];
        dst.par_chunks_mut(plane_out).zip(src.par_chunks(h * w)).for_each(|(out, plane)| {
            for (orow, &(h0, h1, wh)) in out.chunks_mut(self.width).zip(&rows) {
                let (top, bottom) = (&plane[h0 * w..(h0 + 1) * w], &plane[h1 * w..(h1 + 1) * w]);
                for (o, &(w0, w1, ww)) in orow.iter_mut().zip(&cols) {
                    let t = f64::from(top[w0]) * (1.0 - ww) + f64::from(top[w1]) * ww;
                    let u = f64::from(bottom[w0]) * (1.0 - ww) + f64::from(bottom[w1]) * ww;
                    *o = (t * (1.0 - wh) + u * wh) as f32;
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from_dims(&[b, c, self.height, self.width])))
    }
}

struct MaxPoolCeil;

impl CustomOp1 for MaxPoolCeil {
    fn name(&self) -> &'static str {
        "kiln-max-pool-2x2-ceil"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_values("kiln-max-pool-2x2-ceil", "input", storage, layout)?;
        let (b, c, h, w) = layout.shape().dims4()?;
        if h == 0 || w == 0 {
            candle_core::bail!("kiln-max-pool-2x2-ceil: empty map {h}x{w}");
        }
        let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
        let mut dst = vec![0f32; b * c * oh * ow];
        dst.par_chunks_mut(oh * ow).zip(src.par_chunks(h * w)).for_each(|(out, plane)| {
            for (y, orow) in out.chunks_mut(ow).enumerate() {
                let r0 = &plane[2 * y * w..(2 * y + 1) * w];
                let r1 = &plane[(2 * y + 1).min(h - 1) * w..((2 * y + 1).min(h - 1) + 1) * w];
                for (x, o) in orow.iter_mut().enumerate() {
                    let (x0, x1) = (2 * x, (2 * x + 1).min(w - 1));
                    // candle's order: the window's first element, replaced by any larger one.
                    let mut m = r0[x0];
                    for v in [r0[x1], r1[x0], r1[x1]] {
                        if m < v {
                            m = v;
                        }
                    }
                    *o = m;
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from_dims(&[b, c, oh, ow])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn bilinear_is_candles_bit_for_bit() {
        for (i, &(h, w, oh, ow)) in
            [(5, 7, 10, 14), (10, 10, 20, 20), (3, 4, 11, 5), (20, 13, 40, 26), (9, 9, 4, 3)]
                .iter()
                .enumerate()
        {
            let x = random(&[2, 3, h, w], i as u64);
            let want = x.upsample_bilinear2d(oh, ow, false).unwrap_or_else(|e| panic!("{e}"));
            let got = upsample_bilinear(&x, oh, ow).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.dims(), want.dims());
            assert_eq!(bits(&got), bits(&want), "{h}x{w} -> {oh}x{ow}");
        }
    }

    #[test]
    fn ceil_max_pool_is_padded_max_pool_bit_for_bit() {
        for (i, &(h, w)) in [(4, 6), (5, 7), (1, 1), (1, 4), (9, 2), (11, 11)].iter().enumerate() {
            let x = random(&[2, 3, h, w], 100 + i as u64);
            let mut padded = x.clone();
            if h % 2 == 1 {
                padded = padded.pad_with_same(2, 0, 1).unwrap_or_else(|e| panic!("{e}"));
            }
            if w % 2 == 1 {
                padded = padded.pad_with_same(3, 0, 1).unwrap_or_else(|e| panic!("{e}"));
            }
            let want = padded.max_pool2d(2).unwrap_or_else(|e| panic!("{e}"));
            let got = max_pool2x2_ceil(&x).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.dims(), want.dims());
            assert_eq!(bits(&got), bits(&want), "{h}x{w}");
        }
    }
}
