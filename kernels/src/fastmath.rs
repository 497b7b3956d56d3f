//! Branch-free `exp` and exact-GELU approximations that the compiler vectorises (libm's scalar
//! `expf`/`erff` cost several ns per element and dominate softmax/GELU on CPU).

// The published coefficients are kept as printed, beyond f32 precision.
#![allow(clippy::excessive_precision)]

/// `e^x` for f32 (Cephes' `expf` polynomial, ~1 ulp). Inputs below -87 give ~1e-38 instead of 0,
/// above 88 saturate; callers pass finite, max-subtracted values.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer with plain adds
    // (`floor` is a libm call without SSE4.1 and would stop the loops vectorising).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 127], so the biased exponent is a normal one.
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `erfc(z)` for `z >= 0` (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
#[inline(always)]
fn erfc_nonneg(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(-z * z + poly)
}

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, written as `0.5 x erfc(-x / sqrt 2)` so that
/// large negative inputs keep their relative precision.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let u = x * std::f32::consts::FRAC_1_SQRT_2;
    let e = erfc_nonneg(u.abs());
    let erfc_neg_u = if u >= 0.0 { 2.0 - e } else { e };
    0.5 * x * erfc_neg_u
}

#[inline(always)]
fn exp_shifted_sum_generic(row: &mut [f32], max: f32) -> f32 {
    // Lane-wise partial sums so the loop vectorises.
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk.iter_mut()) {
            *v = exp(*v - max);
            *a += *v;
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    sum + acc.iter().sum::<f32>()
}

#[inline(always)]
fn max_generic(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[inline(always)]
fn gelu_erf_generic(xs: &mut [f32]) {
    xs.iter_mut().for_each(|v| *v = gelu_erf(*v));
}

#[inline(always)]
fn geglu_generic(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
    for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
        *o = h * gelu_erf(g);
    }
}

#[inline(always)]
fn affine_generic(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = v * scale + shift;
    }
}

#[inline(always)]
fn affine_silu_generic(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        let y = v * scale + shift;
        *d = y / (1.0 + exp(-y));
    }
}

#[inline(always)]
fn sum_f64_generic(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v as f64;
        }
    }
    chunks.remainder().iter().map(|&v| v as f64).sum::<f64>() + acc.iter().sum::<f64>()
}

#[inline(always)]
fn centered_square_sum_f64_generic(xs: &[f32], mean: f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = xs.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            let d = v as f64 - mean;
            *a += d * d;
        }
    }
    chunks.remainder().iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() + acc.iter().sum::<f64>()
}

/// Defines `$name`, which runs `$generic` compiled for AVX-512 or AVX2+FMA when the CPU has them
/// (the crate itself is built for baseline x86-64, i.e. 4-wide SSE2).
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        #[inline]
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                // `unsafe fn` keeps the MSRV (1.85): safe target_feature functions need 1.86.
                #[allow(unsafe_code)]
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                #[allow(unsafe_code)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[allow(unsafe_code)]
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    #[allow(unsafe_code)]
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

dispatch!(
    /// In place `row[i] = exp(row[i] - max)`, returning the sum.
    exp_shifted_sum, exp_shifted_sum_generic, (row: &mut [f32], max: f32) -> f32
);
dispatch!(
    /// Largest element (`-inf` for an empty slice).
    max, max_generic, (row: &[f32]) -> f32
);
dispatch!(
    /// In place exact GELU.
    gelu_erf_inplace, gelu_erf_generic, (xs: &mut [f32]) -> ()
);
dispatch!(
    /// `out = hidden * gelu(gate)`, element-wise (diffusers' GEGLU).
    geglu, geglu_generic, (out: &mut [f32], hidden: &[f32], gate: &[f32]) -> ()
);

dispatch!(
    /// `dst = src * scale + shift`, element-wise.
    affine, affine_generic, (dst: &mut [f32], src: &[f32], scale: f32, shift: f32) -> ()
);
dispatch!(
    /// `dst = silu(src * scale + shift)`, element-wise.
    affine_silu, affine_silu_generic, (dst: &mut [f32], src: &[f32], scale: f32, shift: f32) -> ()
);
dispatch!(
    /// Sum in f64 (8 lane-wise partial sums).
    sum_f64, sum_f64_generic, (xs: &[f32]) -> f64
);
dispatch!(
    /// `sum((x - mean)^2)` in f64 (8 lane-wise partial sums).
    centered_square_sum_f64, centered_square_sum_f64_generic, (xs: &[f32], mean: f64) -> f64
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in -8690..=8790 {
            let x = i as f32 * 0.01 + 0.003;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_matches_erf_definition() {
        // Reference in f64 via the same erfc identity evaluated with libm's exp at high precision
        // is not available in std; compare against a high-order series of erf instead.
        fn erf64(x: f64) -> f64 {
            // Maclaurin series, accurate for |x| <= 3 with enough terms.
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while n < 200.0 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let mut worst = 0f64;
        for i in -400..=400 {
            let x = i as f64 * 0.01;
            let reference = 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            let got = gelu_erf(x as f32) as f64;
            worst = worst.max((got - reference).abs() / (1e-6 + reference.abs()).max(1e-3));
        }
        assert!(worst < 1e-5, "worst error {worst}");
    }

    #[test]
    fn softmax_helpers() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let m = max(&row);
        let expected_max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(m, expected_max);
        let expected: f32 = row.iter().map(|v| (v - m).exp()).sum();
        let sum = exp_shifted_sum(&mut row, m);
        assert!((sum - expected).abs() < 1e-5 * expected);
    }
}
