//! 2-D convolution with a fast CPU path.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

/// Upper bound on the column matrix built per band (floats): large enough for an efficient
/// gemm, small enough to stay in cache and bound memory at 4K/8K sizes.
const COL_BUDGET: usize = 1 << 21;

/// Convolution of an NCHW input by an OIHW weight (groups = 1, dilation = 1).
#[derive(Debug, Clone, Copy)]
struct Conv2dCpu {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for Conv2dCpu {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (xs, ws) else {
            candle_core::bail!("kiln-conv2d: only f32 is supported on CPU");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("kiln-conv2d: inputs must be contiguous");
        };
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
        let (b, c, h, wd) = xl.shape().dims4()?;
        let (o, wc, kh, kw) = wl.shape().dims4()?;
        if wc != c {
            candle_core::bail!("kiln-conv2d: input has {c} channels, weight expects {wc}");
        }
        let (s, p) = (self.stride, self.padding);
        if h + 2 * p < kh || wd + 2 * p < kw || s == 0 {
            candle_core::bail!("kiln-conv2d: input {h}x{wd} too small for kernel {kh}x{kw}");
        }
        let oh = (h + 2 * p - kh) / s + 1;
        let ow = (wd + 2 * p - kw) / s + 1;
        let k = c * kh * kw;
        let mut out = vec![0f32; b * o * oh * ow];
        let rows_per_band = (COL_BUDGET / (k * ow).max(1)).clamp(1, oh);
        let mut col = vec![0f32; k * rows_per_band * ow];
        let threads = rayon::current_num_threads();
        let parallelism =
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for bi in 0..b {
            let xb = &x[bi * c * h * wd..(bi + 1) * c * h * wd];
            let ob = &mut out[bi * o * oh * ow..(bi + 1) * o * oh * ow];
            let mut y0 = 0;
            while y0 < oh {
                let rows = rows_per_band.min(oh - y0);
                let n = rows * ow;
                let col = &mut col[..k * n];
                // Row r of the column matrix is input channel c shifted by (dy, dx) = (kh, kw).
                col.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
                    let ci = r / (kh * kw);
                    let (ky, kx) = ((r / kw) % kh, r % kw);
                    let plane = &xb[ci * h * wd..(ci + 1) * h * wd];
                    for (ry, drow) in dst.chunks_mut(ow).enumerate() {
                        let iy = ((y0 + ry) * s + ky) as isize - p as isize;
                        if iy < 0 || iy >= h as isize {
                            drow.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * wd..(iy as usize + 1) * wd];
                        for (ox, d) in drow.iter_mut().enumerate() {
                            let ix = (ox * s + kx) as isize - p as isize;
                            *d = if ix >= 0 && ix < wd as isize { src[ix as usize] } else { 0.0 };
                        }
                    }
                });
                let dst = &mut ob[y0 * ow..];
                // out[o, y0*ow .. y0*ow + n] = W[o, k] @ col[k, n]; rows of out are oh*ow apart.
                #[allow(unsafe_code)]
                // SAFETY: dims and strides describe in-bounds regions: W is [o, k] row-major,
                // col is [k, n] row-major, and dst row i spans i*oh*ow .. i*oh*ow + n within ob
                // because y0 + rows <= oh.
                unsafe {
                    gemm::gemm(
                        o,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        (oh * ow) as isize,
                        false,
                        w.as_ptr(),
                        1,
                        k as isize,
                        col.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
                y0 += rows;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, o, oh, ow])))
    }
}

/// `x.conv2d(weight)` with kiln's CPU kernel for f32 on CPU, candle's conv elsewhere.
pub fn conv2d_forward(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &Conv2dCpu { stride, padding })
    } else {
        x.conv2d(weight, padding, stride, 1, 1)
    }
}

/// A conv layer with candle_nn's weights layout (`weight` [O, I, KH, KW], optional `bias`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Builds from tensors; `groups` and `dilation` other than 1 are not supported.
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Result<Self> {
        if cfg.groups != 1 || cfg.dilation != 1 {
            candle_core::bail!("kiln Conv2d supports groups = 1 and dilation = 1 only");
        }
        Ok(Self { weight, bias, stride: cfg.stride, padding: cfg.padding })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d_forward(x, &self.weight, self.stride, self.padding)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Loads `weight` and `bias` like `candle_nn::conv2d`.
pub fn conv2d(cin: usize, cout: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let weight = vb.get((cout, cin, kernel, kernel), "weight")?;
    let bias = vb.get(cout, "bias")?;
    Conv2d::new(weight, Some(bias), cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    #[test]
    fn matches_candle_reference() -> Result<()> {
        // (batch, cin, h, w, cout, kernel, stride, padding): SD VAE / UNet / SR shapes in small.
        let cases = [
            (1, 3, 17, 23, 8, 3, 1, 1),
            (2, 8, 16, 12, 5, 3, 2, 0),
            (2, 8, 16, 12, 5, 3, 2, 1),
            (1, 6, 9, 31, 4, 1, 1, 0),
            (1, 4, 7, 9, 6, 5, 1, 2),
            (1, 64, 40, 70, 32, 3, 1, 1), // several bands
        ];
        for (i, &(b, ci, h, w, co, k, s, p)) in cases.iter().enumerate() {
            let x = rand(&[b, ci, h, w], i as u64)?;
            let wt = rand(&[co, ci, k, k], 100 + i as u64)?;
            let ours = conv2d_forward(&x, &wt, s, p)?;
            let reference = x.conv2d(&wt, p, s, 1, 1)?;
            assert_eq!(ours.dims(), reference.dims(), "case {i}");
            let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "case {i}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn band_budget_splits_rows() -> Result<()> {
        // Large enough that one band cannot hold all output rows.
        let x = rand(&[1, 32, 200, 300], 7)?;
        let wt = rand(&[16, 32, 3, 3], 8)?;
        let ours = conv2d_forward(&x, &wt, 1, 1)?;
        let reference = x.conv2d(&wt, 1, 1, 1, 1)?;
        let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "max diff {diff}");
        Ok(())
    }
}
