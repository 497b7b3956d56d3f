//! Guided filter (He, Sun, Tang 2010) for mask refinement: the output is locally a linear
//! function of the guide image, so a mask upsampled from a low resolution takes the photo's
//! edges (hair, soft contours) at full resolution. Box sums are running sums, O(1) per pixel
//! whatever the radius.

use image::{GrayImage, RgbImage};

use crate::error::{Error, Result};

/// Regularisation: larger = smoother mask, smaller = follows the photo's edges more closely.
pub const DEFAULT_EPS: f32 = 1e-3;

/// Box mean over a (2r+1)² window, clipped at the borders (divides by the in-image count).
fn box_mean(src: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        let mut acc = 0f64;
        // Window [x - r, x + r]: add the entering element, drop the leaving one.
        for v in row.iter().take(r.min(w)) {
            acc += f64::from(*v);
        }
        for x in 0..w {
            if x + r < w {
                acc += f64::from(row[x + r]);
            }
            if x > r {
                acc -= f64::from(row[x - r - 1]);
            }
            let n = (x + r).min(w - 1) + 1 - x.saturating_sub(r);
            tmp[y * w + x] = (acc / n as f64) as f32;
        }
    }
    let mut out = vec![0f32; w * h];
    let mut acc = vec![0f64; w];
    for row in tmp.chunks_exact(w).take(r.min(h)) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += f64::from(*v);
        }
    }
    for y in 0..h {
        if y + r < h {
            for (a, v) in acc.iter_mut().zip(&tmp[(y + r) * w..(y + r + 1) * w]) {
                *a += f64::from(*v);
            }
        }
        if y > r {
            for (a, v) in acc.iter_mut().zip(&tmp[(y - r - 1) * w..(y - r) * w]) {
                *a -= f64::from(*v);
            }
        }
        let n = ((y + r).min(h - 1) + 1 - y.saturating_sub(r)) as f64;
        for (o, a) in out[y * w..(y + 1) * w].iter_mut().zip(&acc) {
            *o = (a / n) as f32;
        }
    }
    out
}

/// Guided filter of `p` by the grey guide `i` (both `w × h`, values in [0, 1]).
pub fn guided_filter(i: &[f32], p: &[f32], w: usize, h: usize, r: usize, eps: f32) -> Vec<f32> {
    let mean_i = box_mean(i, w, h, r);
    let mean_p = box_mean(p, w, h, r);
    let ii: Vec<f32> = i.iter().map(|v| v * v).collect();
    let ip: Vec<f32> = i.iter().zip(p).map(|(a, b)| a * b).collect();
    let corr_i = box_mean(&ii, w, h, r);
    let corr_ip = box_mean(&ip, w, h, r);
    let mut a = vec![0f32; w * h];
    let mut b = vec![0f32; w * h];
    for k in 0..w * h {
        let var = corr_i[k] - mean_i[k] * mean_i[k];
        let cov = corr_ip[k] - mean_i[k] * mean_p[k];
        a[k] = cov / (var + eps);
        b[k] = mean_p[k] - a[k] * mean_i[k];
    }
    let mean_a = box_mean(&a, w, h, r);
    let mean_b = box_mean(&b, w, h, r);
    (0..w * h).map(|k| mean_a[k] * i[k] + mean_b[k]).collect()
}

/// Filter radius for an image: about two pixels of the net's 320-px grid, at full resolution.
pub fn radius_for(width: u32, height: u32) -> usize {
    ((f64::from(width.max(height)) / 320.0 * 2.0).round() as usize).max(2)
}

/// Refines an 8-bit mask against its photo (same size) with a guided filter.
pub fn refine_mask(image: &RgbImage, mask: &GrayImage) -> Result<GrayImage> {
    let (w, h) = image.dimensions();
    if mask.dimensions() != (w, h) {
        return Err(Error::arg("mask", format!("{:?} differs from the image's {w}x{h}", mask.dimensions())));
    }
    let guide: Vec<f32> = image
        .pixels()
        .map(|p| (0.299 * f32::from(p.0[0]) + 0.587 * f32::from(p.0[1]) + 0.114 * f32::from(p.0[2])) / 255.0)
        .collect();
    let p: Vec<f32> = mask.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    let q = guided_filter(&guide, &p, w as usize, h as usize, radius_for(w, h), DEFAULT_EPS);
    let px = q.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    GrayImage::from_raw(w, h, px).ok_or_else(|| Error::Unsupported("mask buffer size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_mean_matches_brute_force() {
        let (w, h, r) = (7, 5, 2);
        let src: Vec<f32> = (0..w * h).map(|k| ((k * 37) % 11) as f32).collect();
        let fast = box_mean(&src, w, h, r);
        for y in 0..h {
            for x in 0..w {
                let (mut s, mut n) = (0f32, 0f32);
                for yy in y.saturating_sub(r)..=(y + r).min(h - 1) {
                    for xx in x.saturating_sub(r)..=(x + r).min(w - 1) {
                        s += src[yy * w + xx];
                        n += 1.0;
                    }
                }
                assert!((fast[y * w + x] - s / n).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn a_mask_equal_to_its_guide_is_kept() {
        let (w, h) = (16, 9);
        let i: Vec<f32> = (0..w * h).map(|k| if k % w < 8 { 0.9 } else { 0.1 }).collect();
        let q = guided_filter(&i, &i, w, h, 2, 1e-6);
        assert!(q.iter().zip(&i).all(|(a, b)| (a - b).abs() < 1e-2));
    }
}
