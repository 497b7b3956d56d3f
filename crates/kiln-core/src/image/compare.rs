//! How close two images are: PSNR and SSIM (as scikit-image computes them), used by promote to
//! report how much of the draft's composition survives in the final.

use crate::error::{Error, Result};
use image::RgbImage;

/// SSIM window side (scikit-image's default `win_size=7`).
pub const SSIM_WINDOW: usize = 7;

fn same_size(a: &RgbImage, b: &RgbImage) -> Result<()> {
    if a.dimensions() != b.dimensions() {
        return Err(Error::arg(
            "images",
            format!("sizes differ: {:?} vs {:?}", a.dimensions(), b.dimensions()),
        ));
    }
    Ok(())
}

/// Peak signal-to-noise ratio in dB over all RGB samples (infinite for identical images).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    let n = a.as_raw().len().max(1) as f64;
    let mse: f64 =
        a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / n;
    Ok(if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() })
}

/// Mean structural similarity, matching `skimage.metrics.structural_similarity(a, b,
/// channel_axis=2, data_range=255)`: 7×7 uniform windows, sample covariance, K1 = 0.01,
/// K2 = 0.03, averaged over windows lying wholly inside the image and over the channels.
pub fn ssim(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    let (w, h) = (a.width() as usize, a.height() as usize);
    if w < SSIM_WINDOW || h < SSIM_WINDOW {
        return Err(Error::arg("images", format!("{w}x{h} is smaller than the {SSIM_WINDOW}px SSIM window")));
    }
    let np = (SSIM_WINDOW * SSIM_WINDOW) as f64;
    let cov_norm = np / (np - 1.0);
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0;
    for c in 0..3 {
        let x: Vec<f64> = a.pixels().map(|p| p[c] as f64).collect();
        let y: Vec<f64> = b.pixels().map(|p| p[c] as f64).collect();
        let sx = Integral::new(&x, w, h, |v, _| v);
        let sy = Integral::new(&y, w, h, |v, _| v);
        let sxx = Integral::new(&x, w, h, |v, _| v * v);
        let syy = Integral::new(&y, w, h, |v, _| v * v);
        let sxy = Integral::new(&x, w, h, |v, i| v * y[i]);
        let mut sum = 0.0;
        let mut count = 0usize;
        for top in 0..=h - SSIM_WINDOW {
            for left in 0..=w - SSIM_WINDOW {
                let m = |s: &Integral| s.window(left, top, SSIM_WINDOW) / np;
                let (ux, uy) = (m(&sx), m(&sy));
                let vx = cov_norm * (m(&sxx) - ux * ux);
                let vy = cov_norm * (m(&syy) - uy * uy);
                let vxy = cov_norm * (m(&sxy) - ux * uy);
                let num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2);
                let den = (ux * ux + uy * uy + c1) * (vx + vy + c2);
                sum += num / den;
                count += 1;
            }
        }
        total += sum / count as f64;
    }
    Ok(total / 3.0)
}

/// A summed-area table of f(value, index).
struct Integral {
    sums: Vec<f64>,
    stride: usize,
}

impl Integral {
    fn new(values: &[f64], w: usize, h: usize, f: impl Fn(f64, usize) -> f64) -> Self {
        let stride = w + 1;
        let mut sums = vec![0.0; stride * (h + 1)];
        for yy in 0..h {
            let mut row = 0.0;
            for xx in 0..w {
                let i = yy * w + xx;
                row += f(values[i], i);
                sums[(yy + 1) * stride + xx + 1] = sums[yy * stride + xx + 1] + row;
            }
        }
        Self { sums, stride }
    }

    fn window(&self, left: usize, top: usize, size: usize) -> f64 {
        let at = |x: usize, y: usize| self.sums[y * self.stride + x];
        at(left + size, top + size) - at(left, top + size) - at(left + size, top) + at(left, top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two images of the reference: skimage 0.25 gives SSIM 0.793015027963269 and PSNR
    /// 15.024239838237792 dB for them (see the formulas; computed with channel_axis=2, data_range=255).
    fn pair() -> (RgbImage, RgbImage) {
        let (w, h) = (31u32, 23u32);
        let a = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 7 + y * 3) % 256) as u8,
                ((x * x + y * 5) % 256) as u8,
                ((x * y * 11) % 256) as u8,
            ])
        });
        let b = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 7 + y * 3 + (x % 3) * 9) % 256) as u8,
                ((x * x + y * 5 + 20) % 256) as u8,
                ((x * y * 11 + y) % 256) as u8,
            ])
        });
        (a, b)
    }

    #[test]
    fn matches_scikit_image() -> Result<()> {
        let (a, b) = pair();
        assert!((ssim(&a, &b)? - 0.793015027963269).abs() < 1e-9, "{}", ssim(&a, &b)?);
        assert!((psnr(&a, &b)? - 15.024239838237792).abs() < 1e-9);
        assert!((ssim(&a, &a)? - 1.0).abs() < 1e-12);
        assert_eq!(psnr(&a, &a)?, f64::INFINITY);
        assert!(ssim(&a, &RgbImage::new(3, 3)).is_err());
        Ok(())
    }
}
