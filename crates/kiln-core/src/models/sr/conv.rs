//! 3x3 stride-1 padding-1 convolution for the SR nets.
//!
//! On the CPU this is Winograd F(4x4, 3x3) (Lavin & Gray 2015): 6x6 input tiles are
//! transformed once per feature map (`B^T d B`), the 36 transformed planes are multiplied by
//! the pre-transformed weights (`G g G^T`) with candle's batched GEMM, and the output transform
//! (`A^T m A`) is fused with bias, activation and an optional scaled residual. That is 4x fewer
//! multiplications than direct convolution, the concatenations of RRDB's dense blocks are
//! never materialised (each part's transform is reused by every later conv of the block), and
//! each output is written once. Other devices use candle's `conv2d`.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Activation applied after bias.
#[derive(Debug, Clone)]
pub enum Act {
    None,
    Leaky(f32),
    /// Per-output-channel slopes.
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
}

/// A feature map prepared for Winograd: `[C, 36, T]` transformed tiles (T = B * th * tw).
pub struct WinoInput {
    v: Tensor,
    channels: usize,
    batch: usize,
    height: usize,
    width: usize,
}

fn cpu_slice<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[layout.start_offset()..]),
        _ => Err(Error::Unsupported("Winograd path needs a CPU tensor".into())),
    }
}

fn tiles(n: usize) -> usize {
    n.div_ceil(4)
}

impl WinoInput {
    /// Transforms `x` (`[B, C, H, W]`, f32, CPU).
    pub fn new(x: &Tensor) -> Result<Self> {
        let x = x.contiguous()?;
        let (batch, channels, height, width) = x.dims4()?;
        let (th, tw) = (tiles(height), tiles(width));
        let t_total = batch * th * tw;
        let (storage, layout) = x.storage_and_layout();
        let src = cpu_slice(&storage, layout)?;
        let mut v = vec![0f32; channels * 36 * t_total];
        v.par_chunks_mut(36 * t_total).enumerate().for_each(|(c, dst)| {
            // The padded row split by phase (x mod 4), so tile tx reads d[j] = ph[j % 4][tx + j / 4]
            // from contiguous slices and the loops vectorise.
            let mut padded = vec![0f32; 4 * tw + 4];
            let mut ph = vec![0f32; 4 * (tw + 1)];
            let mut tmp = vec![0f32; 36 * tw];
            for b in 0..batch {
                let plane = &src[(b * channels + c) * height * width..][..height * width];
                for ty in 0..th {
                    // Row pass: for each of the 6 input rows, B^T along x for every tile.
                    for r in 0..6 {
                        let y = (4 * ty + r) as isize - 1;
                        let t_row = &mut tmp[r * 6 * tw..(r + 1) * 6 * tw];
                        if y < 0 || y >= height as isize {
                            t_row.fill(0.0);
                            continue;
                        }
                        padded[1..=width].copy_from_slice(&plane[y as usize * width..][..width]);
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
                    let t0 = b * th * tw + ty * tw;
                    for kx in 0..6 {
                        let row = |r: usize| &tmp[(r * 6 + kx) * tw..(r * 6 + kx + 1) * tw];
                        let d = [row(0), row(1), row(2), row(3), row(4), row(5)];
                        let mut outs =
                            dst.chunks_mut(t_total).skip(kx).step_by(6).map(|plane| &mut plane[t0..t0 + tw]);
                        let (Some(o0), Some(o1), Some(o2), Some(o3), Some(o4), Some(o5)) =
                            (outs.next(), outs.next(), outs.next(), outs.next(), outs.next(), outs.next())
                        else {
                            continue;
                        };
                        input_rows(d, [o0, o1, o2, o3, o4, o5]);
                    }
                }
            }
        });
        drop(storage);
        let v = Tensor::from_vec(v, (channels, 36, t_total), &Device::Cpu)?;
        Ok(Self { v, channels, batch, height, width })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }
}

/// Largest GEMM product per part held at once.
const PRODUCT_BYTES: usize = 8 << 20;

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

/// Bias, activation slope and optional scaled residual for one output plane.
struct Epilogue<'a> {
    bias: f32,
    slope: f32,
    residual: Option<(&'a [f32], f32)>,
}

impl Epilogue<'_> {
    #[inline]
    fn apply(&self, src: &[f32], dst: &mut [f32], offset: usize) {
        let (bias, slope) = (self.bias, self.slope);
        let act = |v: f32| {
            let v = v + bias;
            let neg = v * slope;
            if v < 0.0 {
                neg
            } else {
                v
            }
        };
        match self.residual {
            None => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = act(v)),
            Some((r, s)) => {
                let r = &r[offset..offset + dst.len()];
                dst.iter_mut().zip(src).zip(r).for_each(|((d, &v), &rv)| *d = s * act(v) + rv)
            }
        }
    }
}

/// `B^T d` for many tiles at once: `d[j][t]` is input sample j of tile t.
#[inline]
fn input_rows(d: [&[f32]; 6], out: [&mut [f32]; 6]) {
    let [o0, o1, o2, o3, o4, o5] = out;
    let n = o0.len();
    let (d0, d1, d2, d3, d4, d5) = (&d[0][..n], &d[1][..n], &d[2][..n], &d[3][..n], &d[4][..n], &d[5][..n]);
    let (o1, o2, o3, o4, o5) = (&mut o1[..n], &mut o2[..n], &mut o3[..n], &mut o4[..n], &mut o5[..n]);
    for t in 0..n {
        let (a0, a1, a2, a3, a4, a5) = (d0[t], d1[t], d2[t], d3[t], d4[t], d5[t]);
        o0[t] = 4.0 * a0 - 5.0 * a2 + a4;
        o1[t] = -4.0 * (a1 + a2) + a3 + a4;
        o2[t] = 4.0 * (a1 - a2) - a3 + a4;
        o3[t] = -2.0 * (a1 - a3) - a2 + a4;
        o4[t] = 2.0 * (a1 - a3) - a2 + a4;
        o5[t] = 4.0 * a1 - 5.0 * a3 + a5;
    }
}

/// Weight transform `G g G^T` of one 3x3 kernel (in f64 for accuracy).
fn transform_kernel(g: &[f32]) -> [f32; 36] {
    const G: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mut tmp = [[0f64; 3]; 6];
    for i in 0..6 {
        for j in 0..3 {
            tmp[i][j] = (0..3).map(|k| G[i][k] * f64::from(g[k * 3 + j])).sum();
        }
    }
    let mut out = [0f32; 36];
    for i in 0..6 {
        for j in 0..6 {
            out[i * 6 + j] = (0..3).map(|k| tmp[i][k] * G[j][k]).sum::<f64>() as f32;
        }
    }
    out
}

/// A 3x3 convolution layer with its CPU Winograd weights.
pub struct Conv3x3 {
    /// Kept for the generic path only (the Winograd path holds `parts` instead).
    weight: Option<Tensor>,
    bias: Tensor,
    cin: usize,
    cout: usize,
    /// Per input part: transformed weights `[36, cout, part_channels]`.
    parts: Vec<(usize, Tensor)>,
    bias_values: Vec<f32>,
}

impl Conv3x3 {
    /// `weight`: `[cout, cin, 3, 3]`; `bias`: `[cout]`. `splits` lists the channel counts of the
    /// inputs the layer will be given separately (their concatenation is the real input).
    pub fn new(weight: Tensor, bias: Tensor, splits: &[usize]) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) || splits.iter().sum::<usize>() != cin {
            return Err(Error::ShapeMismatch {
                name: "conv weight".into(),
                expected: vec![cout, splits.iter().sum(), 3, 3],
                found: weight.dims().to_vec(),
            });
        }
        let mut parts = Vec::new();
        if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            let mut start = 0;
            for &n in splits {
                let mut u = vec![0f32; 36 * cout * n];
                for o in 0..cout {
                    for i in 0..n {
                        let k = transform_kernel(&w[(o * cin + start + i) * 9..][..9]);
                        for (xi, &val) in k.iter().enumerate() {
                            u[(xi * cout + o) * n + i] = val;
                        }
                    }
                }
                parts.push((n, Tensor::from_vec(u, (36, cout, n), &Device::Cpu)?));
                start += n;
            }
        }
        let bias_values = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let weight = if parts.is_empty() { Some(weight) } else { None };
        Ok(Self { weight, bias, cin, cout, parts, bias_values })
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    fn winograd(&self) -> bool {
        !self.parts.is_empty()
    }

    /// Convolution of one input with fused epilogue: `out = res_scale * act(conv + b) + residual`
    /// (`res_scale` only with a residual).
    pub fn forward(&self, x: &Tensor, act: &Act, residual: Option<(&Tensor, f32)>) -> Result<Tensor> {
        if self.winograd() {
            let mut inputs = Vec::with_capacity(self.parts.len());
            let mut start = 0;
            for (n, _) in &self.parts {
                inputs.push(WinoInput::new(&x.narrow(1, start, *n)?)?);
                start += n;
            }
            let refs: Vec<&WinoInput> = inputs.iter().collect();
            return self.forward_parts(&refs, act, residual);
        }
        self.forward_generic(std::slice::from_ref(x), act, residual)
    }

    /// As [`Conv3x3::forward`] on the channel concatenation of `parts` (already transformed).
    pub fn forward_parts(
        &self,
        parts: &[&WinoInput],
        act: &Act,
        residual: Option<(&Tensor, f32)>,
    ) -> Result<Tensor> {
        if parts.len() != self.parts.len()
            || parts.iter().zip(&self.parts).any(|(p, (n, _))| p.channels != *n)
        {
            return Err(Error::arg("conv", "input parts do not match the layer's channel splits"));
        }
        let first = parts[0];
        let (batch, height, width) = (first.batch, first.height, first.width);
        let (th, tw) = (tiles(height), tiles(width));
        let cout = self.cout;
        let residual = match residual {
            Some((r, s)) => {
                if r.dims() != [batch, cout, height, width] {
                    return Err(Error::arg("conv", "residual shape differs from the output"));
                }
                Some((r.contiguous()?, s))
            }
            None => None,
        };
        let residual_guard = residual.as_ref().map(|(r, s)| (r.storage_and_layout(), *s));
        let residual_data = match &residual_guard {
            Some(((storage, layout), s)) => Some((cpu_slice(storage, layout)?, *s)),
            None => None,
        };
        let mut out = vec![0f32; batch * cout * height * width];
        // GEMMs run over bands of tile rows so each product stays small (bounded memory, and
        // the allocator reuses the blocks instead of faulting in fresh pages).
        let band = ((PRODUCT_BYTES / (36 * cout * tw * 4)).max(1)).min(th);
        for b in 0..batch {
            let out_b = &mut out[b * cout * height * width..][..cout * height * width];
            for ty0 in (0..th).step_by(band) {
                let ty1 = (ty0 + band).min(th);
                let (t0, n) = (b * th * tw + ty0 * tw, (ty1 - ty0) * tw);
                // One batched GEMM per part: [36, cout, c] @ [36, c, n] -> [36, cout, n].
                let products = parts
                    .iter()
                    .zip(&self.parts)
                    .map(|(p, (_, u))| Ok(u.matmul(&p.v.narrow(2, t0, n)?.transpose(0, 1)?)?))
                    .collect::<Result<Vec<Tensor>>>()?;
                let guards: Vec<_> = products.iter().map(|m| m.storage_and_layout()).collect();
                let slices = guards.iter().map(|(s, l)| cpu_slice(s, l)).collect::<Result<Vec<&[f32]>>>()?;
                out_b.par_chunks_mut(height * width).enumerate().for_each(|(o, dst)| {
                    let epilogue = Epilogue {
                        bias: self.bias_values[o],
                        slope: act.slope(o),
                        residual: residual_data
                            .map(|(r, s)| (&r[(b * cout + o) * height * width..][..height * width], s)),
                    };
                    let mut m = vec![0f32; 36 * tw];
                    let mut q = vec![0f32; 24 * tw];
                    let mut r = vec![0f32; 16 * tw];
                    let mut line = vec![0f32; 4 * tw];
                    for ty in ty0..ty1 {
                        let local = (ty - ty0) * tw;
                        // Sum the parts' products for this tile row.
                        for xi in 0..36 {
                            let acc = &mut m[xi * tw..(xi + 1) * tw];
                            acc.copy_from_slice(&slices[0][(xi * cout + o) * n + local..][..tw]);
                            for s in &slices[1..] {
                                for (a, v) in acc.iter_mut().zip(&s[(xi * cout + o) * n + local..][..tw]) {
                                    *a += v;
                                }
                            }
                        }
                        // A^T along x (6 rows -> 4 phases each), then along y (4 x 4 phases).
                        for ky in 0..6 {
                            let mrow = |kx: usize| &m[(ky * 6 + kx) * tw..(ky * 6 + kx + 1) * tw];
                            let mut qs = q[ky * 4 * tw..(ky + 1) * 4 * tw].chunks_mut(tw);
                            if let (Some(q0), Some(q1), Some(q2), Some(q3)) =
                                (qs.next(), qs.next(), qs.next(), qs.next())
                            {
                                output_rows(
                                    [mrow(0), mrow(1), mrow(2), mrow(3), mrow(4), mrow(5)],
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
                            epilogue.apply(&line[..width], &mut dst[y * width..(y + 1) * width], y * width);
                        }
                    }
                });
                drop(guards);
            }
        }
        drop(residual_guard);
        Ok(Tensor::from_vec(out, (batch, cout, height, width), &Device::Cpu)?)
    }

    /// candle's conv2d (any device/dtype) with the same epilogue.
    pub fn forward_generic(
        &self,
        parts: &[Tensor],
        act: &Act,
        residual: Option<(&Tensor, f32)>,
    ) -> Result<Tensor> {
        let x = if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(parts, 1)? };
        if x.dim(1)? != self.cin {
            return Err(Error::arg(
                "conv",
                format!("{} input channels, layer takes {}", x.dim(1)?, self.cin),
            ));
        }
        let weight = match &self.weight {
            Some(w) => w.clone(),
            // A Winograd layer: `forward` splits the input by parts (never comes back here).
            None => return self.forward(&x, act, residual),
        };
        let y = x.conv2d(&weight, 1, 1, 1, 1)?.broadcast_add(&self.bias.reshape((1, self.cout, 1, 1))?)?;
        let y = match act {
            Act::None => y,
            Act::Leaky(s) => y.maximum(&(&y * f64::from(*s))?)?,
            Act::Prelu(s) => {
                let w = Tensor::from_slice(s, (1, s.len(), 1, 1), y.device())?.to_dtype(y.dtype())?;
                (y.relu()? + y.minimum(0f32)?.broadcast_mul(&w)?)?
            }
        };
        Ok(match residual {
            Some((r, s)) => ((y * f64::from(s))? + r)?,
            None => y,
        })
    }

    /// Whether this layer runs the Winograd path (CPU, f32).
    pub fn is_winograd(&self) -> bool {
        self.winograd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winograd_matches_direct_convolution() {
        let dev = Device::Cpu;
        for &(b, cin, cout, h, w) in &[(1, 3, 5, 9, 7), (2, 6, 4, 8, 13), (1, 4, 3, 1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).expect("x");
            let wt = Tensor::randn(0f32, 0.3, (cout, cin, 3, 3), &dev).expect("w");
            let bias = Tensor::randn(0f32, 0.1, cout, &dev).expect("b");
            let res = Tensor::randn(0f32, 1.0, (b, cout, h, w), &dev).expect("r");
            let direct = x
                .conv2d(&wt, 1, 1, 1, 1)
                .expect("conv")
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).expect("r"))
                .expect("add");
            let want = (candle_nn::ops::leaky_relu(&direct, 0.2).expect("lrelu") * 0.5)
                .expect("s")
                .add(&res)
                .expect("res");
            // Split the input into two parts to exercise the part sums.
            let conv = Conv3x3::new(wt.clone(), bias.clone(), &[cin - cin / 2, cin / 2]).expect("conv");
            let p0 = WinoInput::new(&x.narrow(1, 0, cin - cin / 2).expect("n")).expect("p0");
            let p1 = WinoInput::new(&x.narrow(1, cin - cin / 2, cin / 2).expect("n")).expect("p1");
            let got = conv.forward_parts(&[&p0, &p1], &Act::Leaky(0.2), Some((&res, 0.5))).expect("wino");
            let d = (got - want).expect("d").abs().expect("a").flatten_all().expect("f").max(0).expect("m");
            let d = d.to_scalar::<f32>().expect("s");
            assert!(d < 1e-4, "{b}x{cin}->{cout} {h}x{w}: {d}");
        }
    }
}
