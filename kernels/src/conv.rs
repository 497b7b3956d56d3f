//! 2-D convolution with a fast CPU path.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::cpu::{f32_values, gemm_f32};
use crate::host::{HostF32, LayerValues};
use crate::norm::InputNorm;
use crate::winograd::{conv_winograd_streamed, Act, Epilogue, WinogradWeights};

/// Upper bound on the column matrix built per band (floats): large enough for an efficient
/// gemm, small enough to stay in cache and bound memory at 4K/8K sizes.
const COL_BUDGET: usize = 1 << 21;

/// Convolution of an NCHW input by an OIHW weight (groups = 1, dilation = 1): kiln's im2col
/// kernel on the CPU (f32), cuDNN with kept plans on CUDA (f32/f16/bf16, the `cudnn` feature).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dOp {
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl CustomOp2 for Conv2dOp {
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
        let x = f32_values("kiln-conv2d", "input", xs, xl)?;
        let w = f32_values("kiln-conv2d", "weight", ws, wl)?;
        let geometry = Geometry::new(xl.shape().dims4()?, wl.shape().dims4()?, self.stride, self.padding)?;
        let mut out = vec![0f32; geometry.out_len()];
        im2col_gemm(x, w, &geometry, &mut out, false, 1.0);
        Ok((CpuStorage::F32(out), Shape::from_dims(&geometry.out_dims())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(xl.shape().dims4()?, wl.shape().dims4()?, self.stride, self.padding)?;
        let shape = crate::cuda::cudnn::ConvShape {
            input: [g.b, g.c, g.h, g.w],
            weight: [g.o, g.c, g.kh, g.kw],
            output: g.out_dims(),
            stride: g.s,
            padding: g.p,
        };
        let out = crate::cuda::cudnn::forward((xs, xl), (ws, wl), shape)?;
        Ok((out, Shape::from_dims(&g.out_dims())))
    }
}

/// Shapes of one convolution (groups = 1, dilation = 1).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(
        (b, c, h, w): (usize, usize, usize, usize),
        (o, wc, kh, kw): (usize, usize, usize, usize),
        s: usize,
        p: usize,
    ) -> Result<Self> {
        if wc != c {
            candle_core::bail!("kiln-conv2d: input has {c} channels, weight expects {wc}");
        }
        if h + 2 * p < kh || w + 2 * p < kw || s == 0 {
            candle_core::bail!("kiln-conv2d: input {h}x{w} too small for kernel {kh}x{kw}");
        }
        let oh = (h + 2 * p - kh) / s + 1;
        let ow = (w + 2 * p - kw) / s + 1;
        Ok(Self { b, c, h, w, o, kh, kw, s, p, oh, ow })
    }

    fn out_len(&self) -> usize {
        self.b * self.o * self.oh * self.ow
    }

    fn out_dims(&self) -> [usize; 4] {
        [self.b, self.o, self.oh, self.ow]
    }
}

/// `out = out + beta * conv(x, w)` when `accumulate`, else `out = beta * conv(x, w)`, by im2col
/// over bands of output rows and one gemm per band.
fn im2col_gemm(x: &[f32], w: &[f32], g: &Geometry, out: &mut [f32], accumulate: bool, beta: f32) {
    let Geometry { b, c, h, w: wd, o, kh, kw, s, p, oh, ow } = *g;
    let k = c * kh * kw;
    let rows_per_band = (COL_BUDGET / (k * ow).max(1)).clamp(1, oh);
    let mut col = vec![0f32; k * rows_per_band * ow];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
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
            // out[o, y0*ow .. y0*ow + n] (+)= beta * W[o, k] @ col[k, n]; rows of out are oh*ow apart.
            #[allow(unsafe_code)]
            // SAFETY: dims and strides describe in-bounds regions: W is [o, k] row-major,
            // col is [k, n] row-major, and dst row i spans i*oh*ow .. i*oh*ow + n within ob
            // because y0 + rows <= oh.
            unsafe {
                gemm_f32(
                    (o, n, k),
                    dst.as_mut_ptr(),
                    oh * ow,
                    accumulate,
                    w.as_ptr(),
                    k,
                    col.as_ptr(),
                    (n, 1),
                    beta,
                    parallelism,
                );
            }
            y0 += rows;
        }
    }
}

/// Whether a conv of these shapes runs Winograd on the CPU with its weights transformed per
/// call: 3x3, stride 1, padding 1, on feature maps large enough that the weight transform is
/// paid back (`cpu_kernels_bench` has the measurements).
pub fn prefers_winograd(
    kernel: (usize, usize),
    stride: usize,
    padding: usize,
    height: usize,
    width: usize,
) -> bool {
    kernel == (3, 3) && stride == 1 && padding == 1 && height * width >= WINOGRAD_MIN_PIXELS
}

/// Smallest feature map (pixels) on which Winograd with a per-call weight transform beats
/// im2col: at 64x64 on 512 channels it takes 0.52x im2col's time, at 32x32 1.08x
/// (`cpu_kernels_bench`, 2026-11-22).
const WINOGRAD_MIN_PIXELS: usize = 64 * 64;

/// With its transformed weights kept by the layer, Winograd wins from 32x32 on.
const WINOGRAD_CACHED_MIN_PIXELS: usize = 32 * 32;

/// Largest transformed weight set a [`Conv2d`] keeps from its first call (4x the 3x3 weights):
/// keeping every layer's would cost 4x the model's conv weights in memory, so only the narrower
/// layers keep theirs at once (e.g. SD's 320-channel UNet convs, the VAE's 128/256-channel ones).
const WINOGRAD_CACHE_BYTES: usize = 16 << 20;

/// Largest transformed weight set a [`Conv2d`] keeps from its second call on: up to 512 -> 512
/// channels (all of the SD VAE's convs). Kept weights make such a conv 3.1x faster than im2col
/// at 32x32 and 1.7x faster than a per-call transform at 64x64, but the SD VAE decoder's take
/// 0.7 GB of fresh memory, which a process decoding one image only pays for (page faults cost
/// more than the transform saves there); a process that decodes again gains.
const WINOGRAD_REUSE_CACHE_BYTES: usize = 40 << 20;

thread_local! {
    /// Whether [`Conv2d`] layers called on this thread may keep their transformed weights.
    static KEEP_TRANSFORMS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with no [`Conv2d`] called on this thread keeping its Winograd-transformed weights
/// (each call transforms its own). For work that is memory-bound rather than transform-bound: a
/// tiled VAE decode calls each layer once per tile on tiles large enough that a transform is
/// noise, and the SD/SDXL decoder's kept transforms would add 0.7 GB to a run meant to stay small.
/// Only speed can change, never a result.
pub fn without_kept_transforms<T>(f: impl FnOnce() -> T) -> T {
    let before = KEEP_TRANSFORMS.with(|k| k.replace(false));
    let out = f();
    KEEP_TRANSFORMS.with(|k| k.set(before));
    out
}

fn is_cpu_f32(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32
}

/// Whether a conv of `x` by `weight` runs as [`Conv2dOp`] on cuDNN with kept plans: with the
/// `cudnn` feature, both on CUDA in one of f32/f16/bf16 (unless `KILN_CUDA_CONV=candle`).
pub fn uses_cudnn(x: &Tensor, weight: &Tensor) -> bool {
    #[cfg(feature = "cudnn")]
    {
        x.device().is_cuda()
            && x.dtype() == weight.dtype()
            && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && crate::cuda::cudnn::enabled()
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = (x, weight);
        false
    }
}

/// `x.conv2d(weight)` with kiln's CPU kernels for f32 on CPU (Winograd where
/// [`prefers_winograd`], im2col otherwise), cuDNN with kept plans where [`uses_cudnn`], candle's
/// conv elsewhere.
pub fn conv2d_forward(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    if is_cpu_f32(x, weight) && prefers_winograd((kh, kw), stride, padding, h, w) {
        crate::winograd::conv3x3_winograd(x, weight)
    } else {
        conv2d_forward_im2col(x, weight, stride, padding)
    }
}

/// As [`conv2d_forward`], always by im2col on CPU f32.
pub fn conv2d_forward_im2col(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if is_cpu_f32(x, weight) || uses_cudnn(x, weight) {
        x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &Conv2dOp { stride, padding })
    } else {
        x.conv2d(weight, padding, stride, 1, 1)
    }
}

/// A conv layer with candle_nn's weights layout (`weight` [O, I, KH, KW], optional `bias`).
/// On CPU f32 the bias (and, through [`Conv2d::forward_add`], a residual and a scale) is fused
/// into the convolution's output pass.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: ConvWeight,
    bias: Option<Tensor>,
    /// The bias as f32 values when the layer lives on the CPU in f32.
    bias_values: Option<Vec<f32>>,
    /// Winograd-transformed weights, kept when small enough (see [`WINOGRAD_CACHE_BYTES`]).
    winograd: Arc<OnceLock<WinogradWeights>>,
    /// CPU f32 forward calls so far (shared by clones, like the kept weights).
    calls: Arc<AtomicUsize>,
    stride: usize,
    padding: usize,
}

/// A conv layer's OIHW weight: a tensor, or f32 host values (a mapped file's range).
#[derive(Debug, Clone)]
enum ConvWeight {
    Tensor(Tensor),
    Host { values: HostF32, dims: [usize; 4] },
}

impl ConvWeight {
    fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        match self {
            Self::Tensor(t) => t.dims4(),
            Self::Host { dims: [o, i, h, w], .. } => Ok((*o, *i, *h, *w)),
        }
    }

    /// The weight as a tensor (host values are copied: only the non-CPU-f32 paths ask).
    fn tensor(&self) -> Result<Tensor> {
        match self {
            Self::Tensor(t) => Ok(t.clone()),
            Self::Host { values, dims } => {
                Tensor::from_slice(values.values(), dims.as_slice(), &candle_core::Device::Cpu)
            }
        }
    }
}

impl Conv2d {
    /// Builds from tensors; `groups` and `dilation` other than 1 are not supported.
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Result<Self> {
        if cfg.groups != 1 || cfg.dilation != 1 {
            candle_core::bail!("kiln Conv2d supports groups = 1 and dilation = 1 only");
        }
        let mut sources = vec![&weight];
        sources.extend(bias.as_ref());
        let kind = format!("conv2d/{}/{}", cfg.stride, cfg.padding);
        // A layer from the memo shares its kept Winograd transforms with the model it came from.
        crate::reuse::derive(&kind, &sources, || {
            let bias_values = match &bias {
                Some(b) if b.device().is_cpu() && b.dtype() == DType::F32 => Some(b.to_vec1::<f32>()?),
                _ => None,
            };
            let layer = Self {
                weight: ConvWeight::Tensor(weight.clone()),
                bias: bias.clone(),
                bias_values,
                winograd: Arc::new(OnceLock::new()),
                calls: Arc::new(AtomicUsize::new(0)),
                stride: cfg.stride,
                padding: cfg.padding,
            };
            Ok((layer, Vec::new()))
        })
    }

    /// A CPU f32 layer computing from `weight` (OIHW values of `dims`) without copying it.
    pub fn from_host(
        weight: HostF32,
        dims: [usize; 4],
        bias: Option<Vec<f32>>,
        cfg: Conv2dConfig,
    ) -> Result<Self> {
        if cfg.groups != 1 || cfg.dilation != 1 {
            candle_core::bail!("kiln Conv2d supports groups = 1 and dilation = 1 only");
        }
        if weight.len() != dims.iter().product::<usize>() || bias.as_ref().is_some_and(|b| b.len() != dims[0])
        {
            candle_core::bail!(
                "conv from host values: {} weight and {:?} bias values for {dims:?}",
                weight.len(),
                bias.as_ref().map(Vec::len)
            );
        }
        let bias_tensor = match &bias {
            Some(b) => Some(Tensor::from_slice(b, b.len(), &candle_core::Device::Cpu)?),
            None => None,
        };
        Ok(Self {
            weight: ConvWeight::Host { values: weight, dims },
            bias: bias_tensor,
            bias_values: bias,
            winograd: Arc::new(OnceLock::new()),
            calls: Arc::new(AtomicUsize::new(0)),
            stride: cfg.stride,
            padding: cfg.padding,
        })
    }

    /// The values a CPU f32 layer computes from: the OIHW weight and the bias.
    /// `None` for a layer on another device or in another dtype.
    pub fn cpu_values(&self) -> Result<Option<LayerValues>> {
        let (o, i, h, w) = self.weight.dims4()?;
        let values = match &self.weight {
            ConvWeight::Tensor(t) if t.device().is_cpu() && t.dtype() == DType::F32 => {
                t.flatten_all()?.to_vec1::<f32>()?
            }
            ConvWeight::Tensor(_) => return Ok(None),
            ConvWeight::Host { values, .. } => values.values().to_vec(),
        };
        if self.bias.is_some() && self.bias_values.is_none() {
            return Ok(None);
        }
        Ok(Some(LayerValues { weight: values, dims: vec![o, i, h, w], bias: self.bias_values.clone() }))
    }

    /// What [`Conv2d::cpu_values`] would give, without copying: the weight's dims and whether
    /// there is a bias.
    pub fn cpu_shape(&self) -> Option<(Vec<usize>, bool)> {
        let cpu = match &self.weight {
            ConvWeight::Tensor(t) => t.device().is_cpu() && t.dtype() == DType::F32,
            ConvWeight::Host { .. } => true,
        };
        if !cpu || (self.bias.is_some() && self.bias_values.is_none()) {
            return None;
        }
        let (o, i, h, w) = self.weight.dims4().ok()?;
        Some((vec![o, i, h, w], self.bias.is_some()))
    }

    /// The stride and padding the layer was built with.
    pub fn config(&self) -> (usize, usize) {
        (self.stride, self.padding)
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(conv(x) + bias + residual) * scale` in one output pass on CPU f32 (diffusers'
    /// `(shortcut + hidden) / output_scale_factor`); composed candle ops elsewhere.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, scale: f64) -> Result<Tensor> {
        self.forward_fused(x, Some(residual), scale)
    }

    /// `conv(norm(x)) + bias [+ residual]` where `norm` (a GroupNorm with its statistics, and
    /// SiLU) is applied as the convolution reads `x`: on the CPU Winograd path the normalised map
    /// is never written out (half a gigabyte per layer at a 4096² VAE decode's widest); elsewhere
    /// it is materialised first. The same bits either way.
    pub fn forward_normed(&self, x: &Tensor, norm: &InputNorm, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(y) = self.forward_fused_with(x, residual, 1.0, Some(norm))? {
            return Ok(y);
        }
        self.forward_fused(&norm.apply(x)?, residual, 1.0)
    }

    fn forward_fused(&self, x: &Tensor, residual: Option<&Tensor>, scale: f64) -> Result<Tensor> {
        match self.forward_fused_with(x, residual, scale, None)? {
            Some(y) => Ok(y),
            None => candle_core::bail!("kiln-conv2d: no path for this input"),
        }
    }

    /// [`Self::forward_fused`] with an optional input norm. With a norm, only the CPU Winograd
    /// path takes it; every other path returns None (the caller materialises the norm).
    fn forward_fused_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        scale: f64,
        norm: Option<&InputNorm>,
    ) -> Result<Option<Tensor>> {
        let bias_ready = self.bias.is_none() || self.bias_values.is_some();
        let residual_ready = residual.is_none_or(|r| r.device().is_cpu() && r.dtype() == DType::F32);
        let weight_ready = match &self.weight {
            ConvWeight::Tensor(w) => is_cpu_f32(x, w),
            ConvWeight::Host { .. } => x.device().is_cpu() && x.dtype() == DType::F32,
        };
        if !(weight_ready && bias_ready && residual_ready) {
            if norm.is_some() {
                return Ok(None);
            }
            let weight = self.weight.tensor()?.to_dtype(x.dtype())?;
            let y = if uses_cudnn(x, &weight) {
                x.contiguous()?.apply_op2_no_bwd(
                    &weight.contiguous()?,
                    &Conv2dOp { stride: self.stride, padding: self.padding },
                )?
            } else {
                x.conv2d(&weight, self.padding, self.stride, 1, 1)?
            };
            let y = match &self.bias {
                Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
                None => y,
            };
            let y = match residual {
                Some(r) => (y + r)?,
                None => y,
            };
            return Ok(Some(if scale == 1.0 { y } else { y.affine(scale, 0.0)? }));
        }
        let x = x.contiguous()?;
        let weight = match &self.weight {
            ConvWeight::Tensor(w) => Some(w.contiguous()?),
            ConvWeight::Host { .. } => None,
        };
        let geometry = Geometry::new(x.dims4()?, self.weight.dims4()?, self.stride, self.padding)?;
        let residual = match residual {
            Some(r) if r.dims() != geometry.out_dims() => candle_core::bail!(
                "kiln-conv2d: residual {:?} differs from the output {:?}",
                r.dims(),
                geometry.out_dims()
            ),
            Some(r) => Some(r.contiguous()?),
            None => None,
        };
        let bias = self.bias_values.as_deref();
        let scale = scale as f32;
        let kernel = (geometry.kh, geometry.kw);
        // The path (Winograd or im2col, and so the output's bits) depends on the shapes only;
        // whether the transformed weights are kept only changes the speed, never the result.
        let transformed_bytes = 36 * 4 * geometry.o * geometry.c;
        let keepable = transformed_bytes <= WINOGRAD_REUSE_CACHE_BYTES;
        let reused = self.calls.fetch_add(1, Ordering::Relaxed) > 0;
        let keep = KEEP_TRANSFORMS.with(|k| k.get())
            && (transformed_bytes <= WINOGRAD_CACHE_BYTES || (keepable && reused));
        let cached_path = keepable
            && prefers_winograd(kernel, self.stride, self.padding, WINOGRAD_MIN_PIXELS, 1)
            && geometry.h * geometry.w >= WINOGRAD_CACHED_MIN_PIXELS;
        let winograd =
            cached_path || prefers_winograd(kernel, self.stride, self.padding, geometry.h, geometry.w);
        if norm.is_some() && !winograd {
            return Ok(None);
        }
        if winograd {
            let per_call;
            let weights = if keep || self.winograd.get().is_some() {
                if self.winograd.get().is_none() {
                    // A race only transforms twice; the first value set is kept.
                    let _ = self.winograd.set(self.winograd_weights(weight.as_ref(), geometry.c)?);
                }
                match self.winograd.get() {
                    Some(w) => w,
                    None => candle_core::bail!("kiln-conv2d: Winograd weights not kept"),
                }
            } else {
                per_call = self.winograd_weights(weight.as_ref(), geometry.c)?;
                &per_call
            };
            // Streamed: each band of the input is transformed just before its gemms (the whole
            // map's transform is 2.25x the map).
            let guard = residual.as_ref().map(|r| r.storage_and_layout());
            let residual_data = match &guard {
                Some((storage, layout)) => Some((
                    &crate::cpu::cpu_slice("kiln-conv2d", storage, layout)?[..geometry.out_len()],
                    scale,
                )),
                None => None,
            };
            let (xs, xl) = x.storage_and_layout();
            let input = &crate::cpu::cpu_slice("kiln-conv2d", &xs, xl)?
                [..geometry.b * geometry.c * geometry.h * geometry.w];
            let epilogue = Epilogue { bias, act: &Act::None, scale, residual: residual_data };
            let out = conv_winograd_streamed(
                weights,
                input,
                (geometry.b, geometry.h, geometry.w),
                norm,
                &epilogue,
            )?;
            drop((xs, guard));
            return Ok(Some(Tensor::from_vec(out, geometry.out_dims().to_vec(), &candle_core::Device::Cpu)?));
        }
        // im2col: the output starts as scale * (bias + residual) and the gemm adds scale * conv.
        let plane = geometry.oh * geometry.ow;
        let mut out = vec![0f32; geometry.out_len()];
        let guard = residual.as_ref().map(|r| r.storage_and_layout());
        let residual_data = match &guard {
            Some((storage, layout)) => {
                Some(&crate::cpu::cpu_slice("kiln-conv2d", storage, layout)?[..geometry.out_len()])
            }
            None => None,
        };
        let initialised = bias.is_some() || residual_data.is_some();
        if initialised {
            out.par_chunks_mut(plane).enumerate().for_each(|(i, dst)| {
                let b = bias.map_or(0.0, |b| b[i % geometry.o]);
                match residual_data {
                    Some(r) => {
                        for (d, &rv) in dst.iter_mut().zip(&r[i * plane..(i + 1) * plane]) {
                            *d = scale * (rv + b);
                        }
                    }
                    None => dst.fill(scale * b),
                }
            });
        }
        drop(guard);
        let (xs, xl) = x.storage_and_layout();
        let xd = crate::cpu::cpu_slice("kiln-conv2d", &xs, xl)?;
        match (&weight, &self.weight) {
            (Some(w), _) => {
                let (ws, wl) = w.storage_and_layout();
                im2col_gemm(
                    xd,
                    crate::cpu::cpu_slice("kiln-conv2d", &ws, wl)?,
                    &geometry,
                    &mut out,
                    initialised,
                    scale,
                );
            }
            (None, ConvWeight::Host { values, .. }) => {
                im2col_gemm(xd, values.values(), &geometry, &mut out, initialised, scale)
            }
            (None, ConvWeight::Tensor(_)) => candle_core::bail!("kiln-conv2d: weight not contiguous"),
        }
        drop(xs);
        Ok(Some(Tensor::from_vec(out, geometry.out_dims().to_vec(), &candle_core::Device::Cpu)?))
    }

    /// The Winograd transforms of the weight (`contiguous`: the tensor weight made contiguous).
    fn winograd_weights(&self, contiguous: Option<&Tensor>, cin: usize) -> Result<WinogradWeights> {
        match (&self.weight, contiguous) {
            (ConvWeight::Host { values, dims }, _) => {
                WinogradWeights::from_slice(values.values(), dims[0], cin, &[cin])
            }
            (ConvWeight::Tensor(_), Some(w)) => WinogradWeights::new(w, &[cin]),
            (ConvWeight::Tensor(w), None) => WinogradWeights::new(w, &[cin]),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, 1.0)
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
    use crate::test_util::{max_abs_diff, rand_unit};

    /// A layer rebuilt from its own host values computes the same bits as the layer it came
    /// from, on the im2col path, the Winograd path (per call and kept) and with a residual.
    #[test]
    fn host_values_layer_equals_tensor_layer_bit_for_bit() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        for &(ci, co, k, s, p, hw) in
            &[(8, 12, 3, 1, 1, 70), (8, 12, 3, 1, 1, 9), (6, 5, 3, 2, 1, 17), (4, 7, 1, 1, 0, 12)]
        {
            let wt = Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, co, &dev)?;
            let cfg = Conv2dConfig { padding: p, stride: s, ..Default::default() };
            let layer = Conv2d::new(wt, Some(bias), cfg)?;
            let Some(v) = layer.cpu_values()? else { panic!("a CPU f32 layer has values") };
            let dims = [v.dims[0], v.dims[1], v.dims[2], v.dims[3]];
            let host = Conv2d::from_host(v.weight.into(), dims, v.bias, cfg)?;
            let x = Tensor::randn(0f32, 1.0, (1, ci, hw, hw), &dev)?;
            for _ in 0..2 {
                assert_eq!(
                    max_abs_diff(&host.forward(&x)?, &layer.forward(&x)?)?,
                    0.0,
                    "{ci}->{co} k{k} at {hw}"
                );
            }
            let want = layer.forward(&x)?;
            let residual = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
            let (a, b) = (host.forward_add(&x, &residual, 0.5)?, layer.forward_add(&x, &residual, 0.5)?);
            assert_eq!(max_abs_diff(&a, &b)?, 0.0);
        }
        Ok(())
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
            let x = rand_unit(&[b, ci, h, w], i as u64)?;
            let wt = rand_unit(&[co, ci, k, k], 100 + i as u64)?;
            let ours = conv2d_forward(&x, &wt, s, p)?;
            let reference = x.conv2d(&wt, p, s, 1, 1)?;
            assert_eq!(ours.dims(), reference.dims(), "case {i}");
            let diff = max_abs_diff(&ours, &reference)?;
            assert!(diff < 1e-4, "case {i}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn band_budget_splits_rows() -> Result<()> {
        // Large enough that one band cannot hold all output rows.
        let x = rand_unit(&[1, 32, 200, 300], 7)?;
        let wt = rand_unit(&[16, 32, 3, 3], 8)?;
        let ours = conv2d_forward_im2col(&x, &wt, 1, 1)?;
        let reference = x.conv2d(&wt, 1, 1, 1, 1)?;
        let diff = max_abs_diff(&ours, &reference)?;
        assert!(diff < 1e-4, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn layer_fuses_bias_and_residual() -> Result<()> {
        // (batch, cin, h, w, cout, kernel, stride, padding): im2col (small, 1x1, strided) and
        // Winograd (3x3 stride 1 on >= 64x64) paths.
        let cases = [
            (1, 5, 9, 11, 7, 3, 1, 1),
            (2, 6, 10, 9, 3, 1, 1, 0),
            (1, 4, 13, 12, 6, 3, 2, 0),
            (2, 7, 65, 70, 9, 3, 1, 1),
            (1, 33, 64, 64, 17, 3, 1, 1),
        ];
        for (i, &(b, ci, h, w, co, k, s, p)) in cases.iter().enumerate() {
            let x = rand_unit(&[b, ci, h, w], 10 + i as u64)?;
            let wt = (rand_unit(&[co, ci, k, k], 20 + i as u64)? * 0.3)?;
            let bias = rand_unit(&[co], 30 + i as u64)?;
            let cfg = Conv2dConfig { padding: p, stride: s, ..Default::default() };
            let layer = Conv2d::new(wt.clone(), Some(bias.clone()), cfg)?;
            let reference = x.conv2d(&wt, p, s, 1, 1)?.broadcast_add(&bias.reshape((1, co, 1, 1))?)?;
            let scale = (reference.abs()?.max_all()?.to_scalar::<f32>()?).max(1.0);
            let diff = max_abs_diff(&layer.forward(&x)?, &reference)?;
            assert!(diff < 1e-5 * scale, "case {i} forward: max diff {diff}");
            let residual = rand_unit(reference.dims(), 40 + i as u64)?;
            let want = ((&reference + &residual)? * 0.5)?;
            let got = layer.forward_add(&x, &residual, 0.5)?;
            let diff = max_abs_diff(&got, &want)?;
            assert!(diff < 1e-5 * scale, "case {i} forward_add: max diff {diff}");
            // Without bias.
            let plain = Conv2d::new(wt.clone(), None, cfg)?;
            let diff = ((plain.forward(&x)?
                + bias.reshape((1, co, 1, 1))?.broadcast_as(reference.dims())?)?
                - &reference)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5 * scale, "case {i} no bias: max diff {diff}");
        }
        let layer = Conv2d::new(
            rand_unit(&[4, 3, 3, 3], 1)?,
            None,
            Conv2dConfig { padding: 1, ..Default::default() },
        )?;
        assert!(layer
            .forward_add(&rand_unit(&[1, 3, 8, 8], 2)?, &rand_unit(&[1, 4, 8, 7], 3)?, 1.0)
            .is_err());
        Ok(())
    }
}

#[cfg(test)]
mod kept_weights {
    use super::*;
    use crate::test_util::max_abs_diff;

    /// A layer whose transformed weights are only kept from its second call on gives the same
    /// bits on every call (a replay in a fresh process must match an image made later in a
    /// long-running one), and matches candle.
    #[test]
    fn first_and_later_calls_agree_bit_for_bit() -> Result<()> {
        let c = 352; // 36 * 4 * 352^2 bytes = 17.8 MB: above the keep-at-once limit
        assert!(36 * 4 * c * c > WINOGRAD_CACHE_BYTES && 36 * 4 * c * c <= WINOGRAD_REUSE_CACHE_BYTES);
        let x = crate::test_util::rand(&[1, c, 32, 32], 1, 1.0)?;
        let wt = crate::test_util::rand(&[c, c, 3, 3], 2, 0.05)?;
        let layer = Conv2d::new(wt.clone(), None, Conv2dConfig { padding: 1, ..Default::default() })?;
        let first = layer.forward(&x)?;
        assert!(layer.winograd.get().is_none(), "kept on the first call");
        let second = layer.forward(&x)?;
        assert!(layer.winograd.get().is_some(), "not kept on the second call");
        let third = layer.forward(&x)?;
        for later in [&second, &third] {
            let diff = max_abs_diff(&first, later)?;
            assert_eq!(diff, 0.0);
        }
        let reference = x.conv2d(&wt, 1, 1, 1, 1)?;
        let diff = max_abs_diff(&first, &reference)?;
        assert!(diff < 1e-3, "max diff {diff}");
        Ok(())
    }

    /// Inside `without_kept_transforms` no layer keeps its transform, however often it is called
    /// or however small it is, and the bits are those of a layer that keeps them.
    #[test]
    fn a_scope_without_kept_transforms_keeps_none_and_changes_no_bit() -> Result<()> {
        let c = 32; // small enough to keep at once outside the scope
        let x = crate::test_util::rand(&[1, c, 32, 32], 3, 1.0)?;
        let wt = crate::test_util::rand(&[c, c, 3, 3], 4, 0.05)?;
        let config = Conv2dConfig { padding: 1, ..Default::default() };
        let scoped = Conv2d::new(wt.clone(), None, config)?;
        let outs = without_kept_transforms(|| -> Result<Vec<Tensor>> {
            (0..3).map(|_| scoped.forward(&x)).collect()
        })?;
        assert!(scoped.winograd.get().is_none(), "kept inside the scope");
        let keeping = Conv2d::new(wt, None, config)?;
        let kept = keeping.forward(&x)?;
        assert!(keeping.winograd.get().is_some(), "the scope leaked out of it");
        for out in &outs {
            assert_eq!(max_abs_diff(out, &kept)?, 0.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod batch_invariance {
    use super::*;
    use crate::test_util::{max_abs_diff, rand_unit};

    /// Both paths (im2col, Winograd with kept or per-call weights) give each batch item the
    /// bits it gets alone.
    #[test]
    fn batched_equals_single_bit_for_bit() -> Result<()> {
        for &(ci, h, w, co, k, s, p) in &[
            (4, 8, 8, 32, 3, 1, 1),
            (32, 16, 16, 32, 3, 1, 1),
            (32, 32, 32, 32, 3, 1, 1),
            (32, 64, 64, 3, 3, 1, 1),
            (16, 96, 90, 8, 3, 1, 1),
            (32, 32, 32, 32, 3, 2, 0),
            (32, 32, 32, 32, 1, 1, 0),
        ] {
            let x = rand_unit(&[4, ci, h, w], 1)?;
            let wt = rand_unit(&[co, ci, k, k], 2)?;
            let bias = rand_unit(&[co], 3)?;
            let layer =
                Conv2d::new(wt, Some(bias), Conv2dConfig { padding: p, stride: s, ..Default::default() })?;
            let all = layer.forward(&x)?;
            for i in 0..4 {
                let one = layer.forward(&x.narrow(0, i, 1)?)?;
                let diff = max_abs_diff(&one, &all.narrow(0, i, 1)?)?;
                assert_eq!(diff, 0.0, "{ci} {h}x{w} -> {co} k{k} s{s}: item {i}");
            }
        }
        Ok(())
    }
}
