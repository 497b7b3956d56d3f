//! Pillow's 8-bit Lanczos resize, reproduced exactly (`Image.resize(size, Image.LANCZOS)`).
//!
//! rembg resizes the photo to the net's input and the mask back to the photo with Pillow, so a
//! mask that matches rembg's needs Pillow's arithmetic, not just "a Lanczos": the filter support
//! grows with the downscale factor, coefficients are normalised and rounded to 22-bit fixed
//! point, and the horizontal pass is rounded and clipped to 8 bits before the vertical one
//! (Pillow's `libImaging/Resample.c`).

/// Pillow's `PRECISION_BITS` (32 − 8 − 2).
const PRECISION_BITS: u32 = 22;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Per output index: first input index and fixed-point weights (`precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow truncates toward zero after adding 0.5 ("round the value").
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax).map(|x| lanczos((x as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = k
                .iter()
                .map(|&v| if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel, row-major `width × height`) to
/// `out_w × out_h` exactly as Pillow's LANCZOS does. `src.len()` must be `w * h * channels`.
pub fn resize_lanczos_u8(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let horizontal = |src: &[u8]| -> Vec<u8> {
        let cs = coeffs(width, out_w);
        let mut out = vec![0u8; out_w * height * channels];
        for y in 0..height {
            let row = &src[y * width * channels..(y + 1) * width * channels];
            for (xx, (xmin, k)) in cs.iter().enumerate() {
                for c in 0..channels {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (j, &w) in k.iter().enumerate() {
                        acc += i64::from(row[(xmin + j) * channels + c]) * i64::from(w);
                    }
                    out[(y * out_w + xx) * channels + c] = clip8(acc);
                }
            }
        }
        out
    };
    let vertical = |src: &[u8], w: usize| -> Vec<u8> {
        let cs = coeffs(height, out_h);
        let stride = w * channels;
        let mut out = vec![0u8; out_h * stride];
        for (yy, (ymin, k)) in cs.iter().enumerate() {
            for i in 0..stride {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (j, &wt) in k.iter().enumerate() {
                    acc += i64::from(src[(ymin + j) * stride + i]) * i64::from(wt);
                }
                out[yy * stride + i] = clip8(acc);
            }
        }
        out
    };
    // Pillow skips a pass whose size does not change.
    match (out_w != width, out_h != height) {
        (false, false) => src.to_vec(),
        (true, false) => horizontal(src),
        (false, true) => vertical(src, width),
        (true, true) => vertical(&horizontal(src), out_w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant_and_identity_is_a_copy() {
        let src = vec![77u8; 13 * 7 * 3];
        assert!(resize_lanczos_u8(&src, 13, 7, 3, 5, 11).iter().all(|&v| v == 77));
        let ramp: Vec<u8> = (0..20u8).collect();
        assert_eq!(resize_lanczos_u8(&ramp, 5, 4, 1, 5, 4), ramp);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 320), (320, 1000), (7, 3), (3, 7)] {
            for (_, k) in coeffs(i, o) {
                let sum: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {sum}");
            }
        }
    }
}
