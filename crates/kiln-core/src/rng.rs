//! Seeded noise that reproduces `torch.randn(..., generator=torch.Generator("cpu").manual_seed(s))`.
//!
//! torch's CPU generator is MT19937 seeded with the low 32 bits of the seed. `torch.randn(n)` in
//! float32 takes one of two paths (aten/src/ATen/native/cpu/DistributionTemplates.h):
//! - n < 16: one double-precision Box-Muller per pair of values, from two 53-bit uniforms
//!   (`random64`), the second value of each pair cached *in the generator* and handed out by the
//!   next draw — also by the next `randn` call;
//! - n >= 16: n float uniforms from 24-bit draws, then Box-Muller in place over blocks of 16
//!   (element j pairs with j + 8); when n is not a multiple of 16, 16 fresh uniforms overwrite the
//!   last 16 slots and that block is transformed again.
//!
//! On x86-64, torch runs the n >= 16 transform with its AVX2 kernel (also on AVX-512 hosts: it
//! registers no AVX-512 normal kernel), whose log/sin/cos are the cephes polynomials of
//! `avx_mathfun.h`, compiled by GCC with multiply-adds contracted into FMAs. The scalar versions
//! below repeat those operations, so the draws are bit-equal to x86-64 torch. torch builds
//! without that kernel (e.g. aarch64) use libm instead and differ by about an ulp.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

const STATE_N: usize = 624;
const STATE_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// torch's CPU `Generator` (MT19937 + the Box-Muller normal sampler and its cached sample).
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    state: [u32; STATE_N],
    /// Index of the next state word to temper (STATE_N = regenerate first).
    next: usize,
    /// The second value of the last double Box-Muller pair (torch's `next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator").field("seed", &self.seed).finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`: torch keeps only the low 32 bits.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; STATE_N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..STATE_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { seed, state, next: STATE_N, cached_normal: None }
    }

    /// The seed this generator was created with (all 64 bits, as given).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn regenerate(&mut self) {
        let twist = |u: u32, v: u32| -> u32 {
            let mixed = (u & UPPER_MASK) | (v & LOWER_MASK);
            (mixed >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 }
        };
        for j in 0..STATE_N {
            let m = (j + STATE_M) % STATE_N;
            let next = self.state[(j + 1) % STATE_N];
            self.state[j] = self.state[m] ^ twist(self.state[j], next);
        }
        self.next = 0;
    }

    /// One tempered 32-bit MT19937 output (torch's `random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= STATE_N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// torch's `random64()`: two 32-bit draws, the first one high.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// A float uniform in [0, 1) from the low 24 bits of one draw.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A double uniform in [0, 1) from the low 53 bits of `random64()`.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// torch's `normal_distribution<double>`: returns the cached sample if there is one.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// `torch.randn(n, generator=self, dtype=torch.float32)`; successive calls continue the stream.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if n % 16 != 0 {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// The values of `torch.randn(n, generator=self, dtype=torch.float16)` (or bfloat16) before
    /// the final cast. torch's half-precision path transforms 16 fresh uniforms per block and
    /// does not draw the uniforms a ragged tail would have used in float32, so when `n % 16 != 0`
    /// the tail block and the rest of the stream differ from [`Self::randn`].
    pub fn randn_half_path(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return self.randn(n);
        }
        let mut data = vec![0f32; n];
        let fill = |gen: &mut Self, block: &mut [f32]| {
            for v in block.iter_mut() {
                *v = gen.uniform_f32();
            }
            box_muller_16(block);
        };
        for block in data.chunks_exact_mut(16) {
            fill(self, block);
        }
        if n % 16 != 0 {
            fill(self, &mut data[n - 16..]);
        }
        data
    }
}

/// Box-Muller over 16 uniforms in place, pairing j with j + 8 (torch's AVX2 `NormalFill16`).
fn box_muller_16(data: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2*pi rounded to float.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * cephes_log(u1)).sqrt();
        let (sin, cos) = cephes_sincos(two_pi * u2);
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// `log256_ps` of avx_mathfun.h for one lane, for x in (0, 1] (the only inputs Box-Muller gives
/// it), with GCC's FMA contractions.
fn cephes_log(x: f32) -> f32 {
    const P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_84e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    const Q1: f32 = -2.121_944_4e-4;
    const Q2: f32 = 0.693_359_4;
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.max(f32::MIN_POSITIVE).to_bits();
    let exponent = ((bits >> 23) & 0x1ff) as i32 - 0x7f;
    // mantissa in [0.5, 1)
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0x3f00_0000);
    let mut e = exponent as f32 + 1.0;
    let tmp = if m < SQRT_HALF {
        e -= 1.0;
        m
    } else {
        0.0
    };
    m = (m - 1.0) + tmp;
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * Q1);
    y -= z * 0.5;
    (m + y) + e * Q2
}

/// `sincos256_ps` of avx_mathfun.h for one lane, x >= 0, with GCC's FMA contractions: (sin, cos).
fn cephes_sincos(x: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.273_239_5;
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_5e-4;
    const DP3: f32 = -3.774_895e-8;
    const SIN_P: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1];
    const COS_P: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];
    let sign_negative = x < 0.0;
    let mut x = x.abs();
    // j = (trunc(x * 4/pi) + 1) & ~1: the octant, rounded up to even.
    let j = ((x * FOUR_OVER_PI) as i32 + 1) & !1;
    let y = j as f32;
    let swap_sin = j & 4 != 0;
    let use_sin_poly = j & 2 == 0;
    let negate_cos = !(j - 2) & 4 != 0;
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let z = x * x;
    let mut yc = COS_P[0].mul_add(z, COS_P[1]);
    yc = yc.mul_add(z, COS_P[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = SIN_P[0].mul_add(z, SIN_P[1]);
    ys = ys.mul_add(z, SIN_P[2]);
    ys *= z;
    ys = ys.mul_add(x, x);
    let (mut sin, mut cos) = if use_sin_poly { (ys, yc) } else { (yc, ys) };
    if sign_negative != swap_sin {
        sin = -sin;
    }
    if negate_cos {
        cos = -cos;
    }
    (sin, cos)
}

/// One torch generator per batch item, as diffusers does when given a list of generators
/// (kiln's `--count N` uses seeds S..S+N-1).
#[derive(Debug, Clone)]
pub struct BatchRng {
    gens: Vec<TorchGenerator>,
}

impl BatchRng {
    /// One generator per seed, in batch order.
    pub fn new(seeds: &[u64]) -> Self {
        Self { gens: seeds.iter().map(|&s| TorchGenerator::new(s)).collect() }
    }

    /// The seeds, in batch order.
    pub fn seeds(&self) -> Vec<u64> {
        self.gens.iter().map(TorchGenerator::seed).collect()
    }

    /// Batch size.
    pub fn len(&self) -> usize {
        self.gens.len()
    }

    /// True when there are no generators.
    pub fn is_empty(&self) -> bool {
        self.gens.is_empty()
    }

    /// Unit-normal noise of shape `[B, ...item_shape]`, item b drawn from generator b as
    /// `torch.randn(item_shape, generator=g_b, dtype=dtype)` on the CPU (diffusers' list-of-
    /// generators `randn_tensor`), then moved to `device`. Draws are made in float32 and cast;
    /// for f16/bf16 the draw order follows torch's half-precision path, which differs from
    /// float32 only when the item size is not a multiple of 16.
    pub fn randn(&mut self, item_shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        if self.gens.is_empty() {
            return Err(Error::arg("seeds", "no seeds given: the batch needs at least one generator"));
        }
        let item_len: usize = item_shape.iter().product();
        let mut values = Vec::with_capacity(item_len * self.gens.len());
        let half_path = matches!(dtype, DType::F16 | DType::BF16);
        for gen in &mut self.gens {
            values.extend(if half_path { gen.randn_half_path(item_len) } else { gen.randn(item_len) });
        }
        let mut shape = Vec::with_capacity(item_shape.len() + 1);
        shape.push(self.gens.len());
        shape.extend_from_slice(item_shape);
        let noise = Tensor::from_vec(values, shape, &Device::Cpu)?;
        Ok(noise.to_dtype(dtype)?.to_device(device)?)
    }

    /// Noise shaped, placed and typed like `t`, whose dim 0 must be the batch size.
    pub fn randn_like(&mut self, t: &Tensor) -> Result<Tensor> {
        let dims = t.dims();
        match dims.first() {
            Some(&b) if b == self.gens.len() => self.randn(&dims[1..], t.device(), t.dtype()),
            _ => Err(Error::ShapeMismatch {
                name: "noise batch (one generator per item)".into(),
                expected: vec![self.gens.len()],
                found: dims.to_vec(),
            }),
        }
    }
}
