//! 3x3 stride-1 padding-1 convolution by Winograd F(4x4, 3x3) on the CPU (f32).
//!
//! Lavin & Gray 2015: 6x6 input tiles are transformed once per feature map (`B^T d B`,
//! [`WinoInput`]), the 36 transformed planes are multiplied by the pre-transformed weights
//! (`G g G^T`, [`WinogradWeights`]) with one gemm per plane written straight into a reused
//! band buffer, and the output transform (`A^T m A`) is fused with bias, activation, scale and an
//! optional scaled residual ([`Epilogue`]), so each output is written once. That is 4x fewer
//! multiplications than direct convolution. An input may come in several channel parts (RRDB's
//! dense blocks never concatenate their features: each part's transform is reused by every later
//! conv of the block and the gemms accumulate over parts). A single-part input can instead be
//! transformed band by band just before each band's gemms ([`conv_winograd_streamed`]: the whole
//! map's transform, 2.25x the map, is never held), optionally read through an [`InputNorm`].
//!
//! The reference is candle's `conv2d` with padding 1 (tests compare the two); [`conv3x3_winograd`]
//! is the plain convolution as a candle `CustomOp2`, [`winograd_forward`] the tensor-level entry
//! with the epilogue, and [`layer::Conv3x3`] the SR nets' layer built on it.

mod layer;
#[cfg(test)]
mod tests;

pub use layer::Conv3x3;

use crate::cpu::{f32_values, gemm_f32};
use crate::norm::InputNorm;
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::Cell;
use std::mem::MaybeUninit;

/// Activation applied after the bias.
#[derive(Debug, Clone, PartialEq)]
pub enum Act {
    None,
    /// `max(v, slope * v)` (ReLU is slope 0).
    Leaky(f32),
    /// Per-output-channel slopes (PReLU).
    Prelu(Vec<f32>),
}

impl Act {
    /// Multiplier for negative values on `channel` (1 = identity).
    fn slope(&self, channel: usize) -> f32 {
        match self {
            Act::None => 1.0,
            Act::Leaky(s) => *s,
            Act::Prelu(s) => s.get(channel).copied().unwrap_or(1.0),
        }
    }

    /// The activation with candle ops (any device; the reference of the fused epilogue).
    pub fn apply(&self, y: &Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(y.clone()),
            Act::Leaky(s) => y.maximum(&(y * f64::from(*s))?),
            Act::Prelu(s) => {
                let w = Tensor::from_slice(s, (1, s.len(), 1, 1), y.device())?.to_dtype(y.dtype())?;
                y.relu()? + y.minimum(0f32)?.broadcast_mul(&w)?
            }
        }
    }
}

fn tiles(n: usize) -> usize {
    n.div_ceil(4)
}

/// 3x3 weights transformed for Winograd: per input part, `[36, cout, part_channels]`.
#[derive(Debug, Clone)]
pub struct WinogradWeights {
    cout: usize,
    parts: Vec<(usize, Vec<f32>)>,
}

impl WinogradWeights {
    /// `weight`: `[cout, cin, 3, 3]` (any device/dtype; read as f32). `splits` lists the channel
    /// counts of the parts the input will come in (their sum is `cin`).
    pub fn new(weight: &Tensor, splits: &[usize]) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("kiln-winograd: kernel {kh}x{kw}, not 3x3");
        }
        // Each step is a no-op for a contiguous CPU f32 weight, which is then read in place
        // (a conv that transforms per call would otherwise copy its weight on every call).
        let w = weight.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let values = crate::cpu::cpu_slice("kiln-winograd", &storage, layout)?;
        let values = values.get(..cout * cin * 9).ok_or_else(|| {
            candle_core::Error::Msg(format!("kiln-winograd: weight storage shorter than {cout}x{cin}x3x3"))
        })?;
        Self::from_slice(values, cout, cin, splits)
    }

    /// As [`WinogradWeights::new`] from OIHW data.
    pub fn from_slice(w: &[f32], cout: usize, cin: usize, splits: &[usize]) -> Result<Self> {
        if splits.iter().sum::<usize>() != cin || splits.contains(&0) || w.len() != cout * cin * 9 {
            candle_core::bail!(
                "kiln-winograd: weight of {} values for {cout}x{cin}x3x3 split as {splits:?}",
                w.len()
            );
        }
        let mut parts = Vec::with_capacity(splits.len());
        let mut start = 0;
        for &n in splits {
            let mut u = vec![0f32; 36 * cout * n];
            // Row o of every plane, gathered per output channel so each task reads its kernels
            // once, in order, and writes 36 sequential rows.
            let mut rows: Vec<Vec<&mut [f32]>> = (0..cout).map(|_| Vec::with_capacity(36)).collect();
            for plane in u.chunks_mut(cout * n) {
                for (o, row) in plane.chunks_mut(n).enumerate() {
                    rows[o].push(row);
                }
            }
            rows.into_par_iter().enumerate().for_each(|(o, mut planes)| {
                // Separable `G g G^T`, vectorised over the part's input channels.
                let mut taps = vec![0f32; 9 * n];
                for (i, g) in w[(o * cin + start) * 9..][..9 * n].chunks_exact(9).enumerate() {
                    for (tap, &v) in g.iter().enumerate() {
                        taps[tap * n + i] = v;
                    }
                }
                let tap = |k: usize| &taps[k * n..(k + 1) * n];
                let mut rows_g = vec![0f32; 18 * n];
                for (r, gr) in G.iter().enumerate() {
                    for l in 0..3 {
                        let (a, b, c) = (tap(l), tap(3 + l), tap(6 + l));
                        let dst = &mut rows_g[(r * 3 + l) * n..(r * 3 + l + 1) * n];
                        for i in 0..n {
                            dst[i] = gr[0] * a[i] + gr[1] * b[i] + gr[2] * c[i];
                        }
                    }
                }
                for (xi, plane) in planes.iter_mut().enumerate() {
                    let (r, gc) = (xi / 6, &G[xi % 6]);
                    let t = |l: usize| &rows_g[(r * 3 + l) * n..(r * 3 + l + 1) * n];
                    let (a, b, c) = (t(0), t(1), t(2));
                    for i in 0..n {
                        plane[i] = gc[0] * a[i] + gc[1] * b[i] + gc[2] * c[i];
                    }
                }
            });
            parts.push((n, u));
            start += n;
        }
        Ok(Self { cout, parts })
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Input channels (all parts).
    pub fn cin(&self) -> usize {
        self.parts.iter().map(|(n, _)| n).sum()
    }

    /// Channel counts of the parts.
    pub fn splits(&self) -> Vec<usize> {
        self.parts.iter().map(|(n, _)| *n).collect()
    }
}

/// Winograd F(4x4, 3x3) weight transform matrix (`U = G g G^T`).
const G: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A feature map prepared for Winograd: `[C, 36, T]` transformed tiles (T = B * th * tw).
#[derive(Debug, Clone)]
pub struct WinoInput {
    v: Vec<f32>,
    channels: usize,
    batch: usize,
    height: usize,
    width: usize,
}

impl WinoInput {
    /// Transforms `x` (`[B, C, H, W]`, f32, CPU).
    pub fn new(x: &Tensor) -> Result<Self> {
        let x = x.contiguous()?;
        let (batch, channels, height, width) = x.dims4()?;
        let (storage, layout) = x.storage_and_layout();
        let src = crate::cpu::cpu_slice("kiln-winograd", &storage, layout)?;
        Self::from_slice(&src[..batch * channels * height * width], batch, channels, height, width)
    }

    /// Transforms NCHW data.
    pub fn from_slice(
        src: &[f32],
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<Self> {
        if src.len() != batch * channels * height * width || height == 0 || width == 0 {
            candle_core::bail!(
                "kiln-winograd: {} values for a {batch}x{channels}x{height}x{width} input",
                src.len()
            );
        }
        let (th, tw) = (tiles(height), tiles(width));
        let t_total = batch * th * tw;
        let len = channels * 36 * t_total;
        // Every value is written exactly once below (36 planes x all tiles of every channel),
        // so the buffer is not zero-filled first.
        let mut v: Vec<f32> = Vec::with_capacity(len);
        v.spare_capacity_mut()[..len].par_chunks_mut(36 * t_total).enumerate().for_each(|(c, dst)| {
            let mut scratch = TransformScratch::new(width);
            for b in 0..batch {
                let plane = &src[(b * channels + c) * height * width..][..height * width];
                let rows = RowSource { plane, height, width, norm: None };
                transform_tile_rows(&rows, 0..th, dst, t_total, b * th * tw, &mut scratch);
            }
        });
        #[allow(unsafe_code)]
        // SAFETY: capacity is `len`, and the loop above initialised all `len` values: for each
        // channel, batch and tile row it writes the 36 planes' `tw` tiles (`kx` + 6 * output
        // row), which covers all `t_total` tiles of every plane.
        unsafe {
            v.set_len(len)
        };
        Ok(Self { v, channels, batch, height, width })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// `(batch, height, width)` of the feature map.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.batch, self.height, self.width)
    }
}

/// Per-thread buffers of the input transform of one feature-map row width.
struct TransformScratch {
    padded: Vec<f32>,
    phases: Vec<f32>,
    rows: Vec<f32>,
}

impl TransformScratch {
    fn new(width: usize) -> Self {
        let tw = tiles(width);
        Self { padded: vec![0f32; 4 * tw + 4], phases: vec![0f32; 4 * (tw + 1)], rows: vec![0f32; 36 * tw] }
    }
}

/// One channel plane of an input and how its values are read: as they are, or through an
/// [`InputNorm`] (item-channel `bc`) applied on the fly.
struct RowSource<'a> {
    plane: &'a [f32],
    height: usize,
    width: usize,
    norm: Option<(&'a InputNorm, usize)>,
}

/// `B^T d B` of tile rows `rows` of one channel into `dst`: 36 planes of `stride` values, tile
/// (ty, tx) at column `col0 + (ty - rows.start) * tw + tx`. Zero padding outside the plane, as
/// a padding-1 convolution of the (normalised) map sees it.
fn transform_tile_rows<T: Store>(
    src: &RowSource<'_>,
    rows: std::ops::Range<usize>,
    dst: &mut [T],
    stride: usize,
    col0: usize,
    scratch: &mut TransformScratch,
) {
    let (height, width) = (src.height, src.width);
    let tw = tiles(width);
    let TransformScratch { padded, phases: ph, rows: tmp } = scratch;
    for ty in rows.clone() {
        // Row pass: for each of the 6 input rows, B^T along x for every tile.
        for r in 0..6 {
            let y = (4 * ty + r) as isize - 1;
            let t_row = &mut tmp[r * 6 * tw..(r + 1) * 6 * tw];
            if y < 0 || y >= height as isize {
                t_row.fill(0.0);
                continue;
            }
            let row = &src.plane[y as usize * width..][..width];
            match src.norm {
                Some((norm, bc)) => norm.apply_row(bc, &mut padded[1..=width], row),
                None => padded[1..=width].copy_from_slice(row),
            }
            // The padded row split by phase (x mod 4), so tile tx reads d[j] = ph[j % 4][tx + j / 4]
            // from contiguous slices and the loops vectorise.
            for (t, quad) in padded.chunks_exact(4).enumerate() {
                for (j, &val) in quad.iter().enumerate() {
                    ph[j * (tw + 1) + t] = val;
                }
            }
            let (p0, rest) = ph.split_at(tw + 1);
            let (p1, rest) = rest.split_at(tw + 1);
            let (p2, p3) = rest.split_at(tw + 1);
            let (d0, d1, d2, d3) = (&p0[..tw], &p1[..tw], &p2[..tw], &p3[..tw]);
            let (d4, d5) = (&p0[1..=tw], &p1[1..=tw]);
            let (k0, rest) = t_row.split_at_mut(tw);
            let (k1, rest) = rest.split_at_mut(tw);
            let (k2, rest) = rest.split_at_mut(tw);
            let (k3, rest) = rest.split_at_mut(tw);
            let (k4, k5) = rest.split_at_mut(tw);
            input_rows([d0, d1, d2, d3, d4, d5], [k0, k1, k2, k3, k4, k5]);
        }
        // Column pass: B^T along y, written to the 36 planes of this channel.
        let t0 = col0 + (ty - rows.start) * tw;
        for kx in 0..6 {
            let row = |r: usize| &tmp[(r * 6 + kx) * tw..(r * 6 + kx + 1) * tw];
            let d = [row(0), row(1), row(2), row(3), row(4), row(5)];
            let mut outs = dst.chunks_mut(stride).skip(kx).step_by(6).map(|plane| &mut plane[t0..t0 + tw]);
            let (Some(o0), Some(o1), Some(o2), Some(o3), Some(o4), Some(o5)) =
                (outs.next(), outs.next(), outs.next(), outs.next(), outs.next(), outs.next())
            else {
                continue;
            };
            input_rows(d, [o0, o1, o2, o3, o4, o5]);
        }
    }
}

/// A slot a kernel writes once: plain scratch or a not yet initialised output.
trait Store {
    fn store(&mut self, v: f32);
}

impl Store for f32 {
    #[inline(always)]
    fn store(&mut self, v: f32) {
        *self = v;
    }
}

impl Store for MaybeUninit<f32> {
    #[inline(always)]
    fn store(&mut self, v: f32) {
        self.write(v);
    }
}

/// `B^T d` for many tiles at once: `d[j][t]` is input sample j of tile t.
#[inline]
fn input_rows<T: Store>(d: [&[f32]; 6], out: [&mut [T]; 6]) {
    let [o0, o1, o2, o3, o4, o5] = out;
    let n = o0.len();
    let (d0, d1, d2, d3, d4, d5) = (&d[0][..n], &d[1][..n], &d[2][..n], &d[3][..n], &d[4][..n], &d[5][..n]);
    let (o1, o2, o3, o4, o5) = (&mut o1[..n], &mut o2[..n], &mut o3[..n], &mut o4[..n], &mut o5[..n]);
    for t in 0..n {
        let (a0, a1, a2, a3, a4, a5) = (d0[t], d1[t], d2[t], d3[t], d4[t], d5[t]);
        o0[t].store(4.0 * a0 - 5.0 * a2 + a4);
        o1[t].store(-4.0 * (a1 + a2) + a3 + a4);
        o2[t].store(4.0 * (a1 - a2) - a3 + a4);
        o3[t].store(-2.0 * (a1 - a3) - a2 + a4);
        o4[t].store(2.0 * (a1 - a3) - a2 + a4);
        o5[t].store(4.0 * a1 - 5.0 * a3 + a5);
    }
}

/// `A^T m` for many tiles at once: `m[j][t]` is sample j of tile t.
#[inline]
fn output_rows(m: [&[f32]; 6], out: [&mut [f32]; 4]) {
    let [o0, o1, o2, o3] = out;
    let n = o0.len();
    let (m0, m1, m2, m3, m4, m5) = (&m[0][..n], &m[1][..n], &m[2][..n], &m[3][..n], &m[4][..n], &m[5][..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for t in 0..n {
        let (a, b, c, d, e, f) = (m0[t], m1[t], m2[t], m3[t], m4[t], m5[t]);
        o0[t] = a + b + c + d + e;
        o1[t] = b - c + 2.0 * (d - e);
        o2[t] = b + c + 4.0 * (d + e);
        o3[t] = b - c + 8.0 * (d - e) + f;
    }
}

/// What happens to each convolution output `v` of channel `o`:
/// `out = scale * act(v + bias[o]) + residual_scale * residual`.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Per output channel (`cout` values), or none.
    pub bias: Option<&'a [f32]>,
    pub act: &'a Act,
    pub scale: f32,
    /// `[B, cout, H, W]` data and its scale.
    pub residual: Option<(&'a [f32], f32)>,
}

impl Epilogue<'_> {
    /// Plain convolution output.
    pub const NONE: Epilogue<'static> = Epilogue { bias: None, act: &Act::None, scale: 1.0, residual: None };
}

/// One output plane's epilogue constants.
struct PlaneEpilogue<'a> {
    bias: f32,
    slope: f32,
    scale: f32,
    residual: Option<(&'a [f32], f32)>,
}

impl PlaneEpilogue<'_> {
    #[inline]
    fn apply(&self, src: &[f32], dst: &mut [MaybeUninit<f32>], offset: usize) {
        let (bias, slope, scale) = (self.bias, self.slope, self.scale);
        let act = |v: f32| {
            let v = v + bias;
            let neg = v * slope;
            scale * if v < 0.0 { neg } else { v }
        };
        match self.residual {
            None => dst.iter_mut().zip(src).for_each(|(d, &v)| d.store(act(v))),
            Some((r, s)) => {
                let r = &r[offset..offset + dst.len()];
                dst.iter_mut().zip(src).zip(r).for_each(|((d, &v), &rv)| d.store(act(v) + s * rv))
            }
        }
    }
}

/// Budget for one band's gemm products (`36 * cout * tiles` floats): small enough to stay in
/// the last-level cache between the gemms and the output transform.
const PRODUCT_BYTES: usize = 2 << 20;

thread_local! {
    /// The calling thread's gemm product buffer, reused across convolutions (taken during a
    /// call, so a nested call just allocates its own).
    static PRODUCTS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Fewest gemm columns (tiles) per band.
const MIN_GEMM_COLUMNS: usize = 192;

/// Winograd convolution of the channel concatenation of `parts` (all of one batch/size) into a
/// new `[B, cout, H, W]` buffer.
pub fn conv_winograd(
    weights: &WinogradWeights,
    parts: &[&WinoInput],
    epilogue: &Epilogue,
) -> Result<Vec<f32>> {
    let Some(first) = parts.first() else {
        candle_core::bail!("kiln-winograd: no input");
    };
    if parts.len() != weights.parts.len()
        || parts.iter().zip(&weights.parts).any(|(p, (n, _))| p.channels != *n || p.dims() != first.dims())
    {
        candle_core::bail!(
            "kiln-winograd: input parts {:?} do not match the weights' channel splits {:?}",
            parts.iter().map(|p| (p.channels, p.dims())).collect::<Vec<_>>(),
            weights.splits()
        );
    }
    run_bands(weights, first.dims(), Input::Transformed(parts), epilogue)
}

/// Winograd convolution of the NCHW map `src` (`(batch, height, width)`, the weights' channel
/// count), read through `norm` when given, into a new `[B, cout, H, W]` buffer. Each band of
/// tile rows is transformed just before its gemms, so the transformed input (2.25x the map for
/// the whole of it) is never held: one band's, a few megabytes. Same bits as [`conv_winograd`]
/// on the transformed (normalised) map.
pub fn conv_winograd_streamed(
    weights: &WinogradWeights,
    src: &[f32],
    (batch, height, width): (usize, usize, usize),
    norm: Option<&InputNorm>,
    epilogue: &Epilogue,
) -> Result<Vec<f32>> {
    let channels = weights.cin();
    if weights.parts.len() != 1 || src.len() != batch * channels * height * width || height == 0 || width == 0
    {
        candle_core::bail!(
            "kiln-winograd: {} values for a {batch}x{channels}x{height}x{width} input (weights split {:?})",
            src.len(),
            weights.splits()
        );
    }
    if norm.is_some_and(|n| n.len() != batch * channels) {
        candle_core::bail!("kiln-winograd: input norm for other than {batch}x{channels} channels");
    }
    run_bands(weights, (batch, height, width), Input::Raw { src, channels, norm }, epilogue)
}

/// What [`run_bands`] convolves: maps already transformed whole, or one map transformed band by
/// band.
enum Input<'a> {
    Transformed(&'a [&'a WinoInput]),
    Raw { src: &'a [f32], channels: usize, norm: Option<&'a InputNorm> },
}

/// The shared body of [`conv_winograd`] and [`conv_winograd_streamed`]: per band of tile rows,
/// one gemm per transformed plane into the product buffer, then the output transform with the
/// epilogue.
fn run_bands(
    weights: &WinogradWeights,
    (batch, height, width): (usize, usize, usize),
    input: Input<'_>,
    epilogue: &Epilogue,
) -> Result<Vec<f32>> {
    let cout = weights.cout;
    let plane = height * width;
    if epilogue.bias.is_some_and(|b| b.len() != cout) {
        candle_core::bail!("kiln-winograd: bias of the wrong length ({cout} channels)");
    }
    if epilogue.residual.is_some_and(|(r, _)| r.len() != batch * cout * plane) {
        candle_core::bail!("kiln-winograd: residual shape differs from the output");
    }
    let (th, tw) = (tiles(height), tiles(width));
    let t_total = batch * th * tw;
    // Bands of whole tile rows; the product buffer is allocated once and every gemm overwrites
    // (first part) or accumulates into (later parts) its plane, so nothing is zeroed or copied.
    // At least MIN_GEMM_COLUMNS tiles per band keeps the gemms efficient for wide layers.
    let band = (PRODUCT_BYTES / (36 * cout * tw * 4)).max(MIN_GEMM_COLUMNS.div_ceil(tw)).clamp(1, th);
    let mut products = PRODUCTS.take();
    if products.len() < 36 * cout * band * tw {
        products = vec![0f32; 36 * cout * band * tw];
    }
    // A streamed input's transformed band: `[C, 36, tiles of the band]`, overwritten per band.
    let mut band_input: Vec<f32> = match input {
        Input::Raw { channels, .. } => vec![0f32; channels * 36 * band * tw],
        Input::Transformed(_) => Vec::new(),
    };
    let len = batch * cout * plane;
    // The epilogue writes every output value exactly once: no zero-fill.
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let out_uninit = &mut out.spare_capacity_mut()[..len];
    for b in 0..batch {
        let out_b = &mut out_uninit[b * cout * plane..][..cout * plane];
        for ty0 in (0..th).step_by(band) {
            let ty1 = (ty0 + band).min(th);
            let (t0, n) = (b * th * tw + ty0 * tw, (ty1 - ty0) * tw);
            // Per weight part: its transformed values, the distance between two of its planes
            // (36 planes make one channel) and where the band starts in a plane.
            let rhs_parts: Vec<(&[f32], usize, usize)> = match &input {
                Input::Transformed(parts) => parts.iter().map(|p| (&p.v[..], t_total, t0)).collect(),
                Input::Raw { src, channels, norm } => {
                    let (channels, norm) = (*channels, *norm);
                    let band_values = &mut band_input[..channels * 36 * n];
                    band_values.par_chunks_mut(36 * n).enumerate().for_each_init(
                        || TransformScratch::new(width),
                        |scratch, (c, dst)| {
                            let bc = b * channels + c;
                            let rows = RowSource {
                                plane: &src[bc * plane..][..plane],
                                height,
                                width,
                                norm: norm.map(|n| (n, bc)),
                            };
                            transform_tile_rows(&rows, ty0..ty1, dst, n, 0, scratch);
                        },
                    );
                    vec![(&band_input[..channels * 36 * n], n, 0)]
                }
            };
            let products = &mut products[..36 * cout * n];
            products.par_chunks_mut(cout * n).enumerate().for_each(|(xi, dst)| {
                for (pi, ((values, stride, start), (c, u))) in
                    rhs_parts.iter().zip(&weights.parts).enumerate()
                {
                    let lhs = &u[xi * cout * c..][..cout * c];
                    let rhs = &values[xi * stride + start..];
                    #[allow(unsafe_code)]
                    // SAFETY: dst is [cout, n] row-major (cout * n values); lhs is [cout, c]
                    // row-major; rhs element (ci, t) is rhs[ci * 36 * stride + t] with ci < c
                    // and t < n, the last one at offset (c - 1) * 36 * stride + n - 1, inside
                    // `values` (c channels of 36 planes of `stride`) since
                    // xi * stride + start + n <= 36 * stride.
                    unsafe {
                        gemm_f32(
                            (cout, n, *c),
                            dst.as_mut_ptr(),
                            n,
                            pi > 0,
                            lhs.as_ptr(),
                            *c,
                            rhs.as_ptr(),
                            (36 * stride, 1),
                            1.0,
                            gemm::Parallelism::None,
                        );
                    }
                }
            });
            let products = &*products;
            out_b.par_chunks_mut(plane).enumerate().for_each_init(
                || (vec![0f32; 24 * tw], vec![0f32; 16 * tw], vec![0f32; 4 * tw]),
                |(q, r, line), (o, dst)| {
                    let plane_epilogue = PlaneEpilogue {
                        bias: epilogue.bias.map_or(0.0, |bias| bias[o]),
                        slope: epilogue.act.slope(o),
                        scale: epilogue.scale,
                        residual: epilogue.residual.map(|(r, s)| (&r[(b * cout + o) * plane..][..plane], s)),
                    };
                    for ty in ty0..ty1 {
                        let local = (ty - ty0) * tw;
                        let m = |xi: usize| &products[(xi * cout + o) * n + local..][..tw];
                        // A^T along x (6 rows -> 4 phases each), then along y (4 x 4 phases).
                        for ky in 0..6 {
                            let mut qs = q[ky * 4 * tw..(ky + 1) * 4 * tw].chunks_mut(tw);
                            if let (Some(q0), Some(q1), Some(q2), Some(q3)) =
                                (qs.next(), qs.next(), qs.next(), qs.next())
                            {
                                let k = ky * 6;
                                output_rows(
                                    [m(k), m(k + 1), m(k + 2), m(k + 3), m(k + 4), m(k + 5)],
                                    [q0, q1, q2, q3],
                                );
                            }
                        }
                        for ox in 0..4 {
                            let qrow = |ky: usize| &q[(ky * 4 + ox) * tw..(ky * 4 + ox + 1) * tw];
                            let mut rs = r.chunks_mut(tw).skip(ox).step_by(4);
                            if let (Some(r0), Some(r1), Some(r2), Some(r3)) =
                                (rs.next(), rs.next(), rs.next(), rs.next())
                            {
                                output_rows(
                                    [qrow(0), qrow(1), qrow(2), qrow(3), qrow(4), qrow(5)],
                                    [r0, r1, r2, r3],
                                );
                            }
                        }
                        for oy in 0..4 {
                            let y = 4 * ty + oy;
                            if y >= height {
                                break;
                            }
                            for ox in 0..4 {
                                for (tx, &v) in
                                    r[(oy * 4 + ox) * tw..(oy * 4 + ox + 1) * tw].iter().enumerate()
                                {
                                    line[4 * tx + ox] = v;
                                }
                            }
                            plane_epilogue.apply(
                                &line[..width],
                                &mut dst[y * width..(y + 1) * width],
                                y * width,
                            );
                        }
                    }
                },
            );
        }
    }
    PRODUCTS.set(products);
    #[allow(unsafe_code)]
    // SAFETY: capacity is `len`; for every batch, band and output channel the epilogue wrote
    // rows 4 * ty .. 4 * ty + 3 (below `height`) of all tile rows ty < th, i.e. every row, each
    // in full (`line[..width]` into a `width`-long row).
    unsafe {
        out.set_len(len)
    };
    Ok(out)
}

/// Tensor-level Winograd convolution with the fused epilogue (CPU f32):
/// `scale * act(conv(cat(parts)) + bias) + residual_scale * residual`.
pub fn winograd_forward(
    weights: &WinogradWeights,
    parts: &[&WinoInput],
    bias: Option<&[f32]>,
    act: &Act,
    scale: f32,
    residual: Option<(&Tensor, f32)>,
) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        candle_core::bail!("kiln-winograd: no input");
    };
    let (batch, height, width) = first.dims();
    let residual = match residual {
        Some((r, s)) => {
            if r.dims() != [batch, weights.cout, height, width] {
                candle_core::bail!(
                    "kiln-winograd: residual {:?} differs from the output {:?}",
                    r.dims(),
                    [batch, weights.cout, height, width]
                );
            }
            Some((r.contiguous()?, s))
        }
        None => None,
    };
    let guard = residual.as_ref().map(|(r, s)| (r.storage_and_layout(), *s));
    let residual_data = match &guard {
        Some(((storage, layout), s)) => Some((
            &crate::cpu::cpu_slice("kiln-winograd", storage, layout)?
                [..batch * weights.cout * height * width],
            *s,
        )),
        None => None,
    };
    let out = conv_winograd(weights, parts, &Epilogue { bias, act, scale, residual: residual_data })?;
    drop(guard);
    Tensor::from_vec(out, (batch, weights.cout, height, width), &Device::Cpu)
}

/// Plain 3x3 stride-1 padding-1 convolution (`[B, C, H, W]` by `[O, C, 3, 3]`, CPU f32) with the
/// weights transformed on every call; reference: candle's `conv2d(w, 1, 1, 1, 1)`.
#[derive(Debug, Clone, Copy)]
pub struct Winograd3x3;

impl CustomOp2 for Winograd3x3 {
    fn name(&self) -> &'static str {
        "kiln-winograd3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_values("kiln-winograd3x3", "input", xs, xl)?;
        let w = f32_values("kiln-winograd3x3", "weight", ws, wl)?;
        let (b, c, h, wd) = xl.shape().dims4()?;
        let (o, wc, kh, kw) = wl.shape().dims4()?;
        if wc != c || (kh, kw) != (3, 3) {
            candle_core::bail!("kiln-winograd3x3: weight {o}x{wc}x{kh}x{kw} for {c} input channels");
        }
        let weights = WinogradWeights::from_slice(w, o, c, &[c])?;
        let input = WinoInput::from_slice(x, b, c, h, wd)?;
        let out = conv_winograd(&weights, &[&input], &Epilogue::NONE)?;
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, o, h, wd])))
    }
}

/// `x.conv2d(w, padding 1, stride 1)` by Winograd on CPU f32, candle's conv elsewhere.
pub fn conv3x3_winograd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Winograd3x3)
    } else {
        x.conv2d(w, 1, 1, 1, 1)
    }
}
