//! Outpainting: the canvas grows, the new area is pre-filled (edge replication or noise matched
//! to the image's border), and a soft mask covers the new area and reaches a little into the
//! original so the seam is repainted too. The job then runs as inpainting at strength 1.

use crate::error::{Error, Result};
use crate::image::mask::{Mask, Rect};
use crate::rng::TorchGenerator;
use image::RgbImage;

/// Default reach of the mask into the original image, in pixels.
pub const DEFAULT_OVERLAP: u32 = 16;

/// Pixels added on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Extension {
    pub left: u32,
    pub right: u32,
    pub top: u32,
    pub bottom: u32,
}

impl Extension {
    /// True when nothing is added.
    pub fn is_zero(&self) -> bool {
        self.left == 0 && self.right == 0 && self.top == 0 && self.bottom == 0
    }

    /// The extension that brings a `width`×`height` image to the aspect `aw:ah` by growing the
    /// short side evenly on both ends (never cropping).
    pub fn to_aspect(width: u32, height: u32, aw: u32, ah: u32) -> Result<Self> {
        if aw == 0 || ah == 0 {
            return Err(Error::arg("to", format!("{aw}:{ah} is not an aspect ratio")));
        }
        let (w, h) = (width as u64, height as u64);
        let (aw, ah) = (aw as u64, ah as u64);
        if w * ah == h * aw {
            return Err(Error::arg("to", format!("the image is already {aw}:{ah}; nothing to extend")));
        }
        if w * ah < h * aw {
            // Too narrow: widen to ceil(h * aw / ah).
            let grow = (h * aw).div_ceil(ah) - w;
            let grow = u32::try_from(grow).map_err(|_| Error::arg("to", "the canvas would be too large"))?;
            Ok(Self { left: grow / 2, right: grow - grow / 2, top: 0, bottom: 0 })
        } else {
            let grow = (w * ah).div_ceil(aw) - h;
            let grow = u32::try_from(grow).map_err(|_| Error::arg("to", "the canvas would be too large"))?;
            Ok(Self { left: 0, right: 0, top: grow / 2, bottom: grow - grow / 2 })
        }
    }

    /// Parses `W:H` (or `WxH`) for `--to`, e.g. `16:9`.
    pub fn parse_aspect(s: &str) -> Result<(u32, u32)> {
        let bad = || Error::arg("to", format!("`{s}`: expected an aspect ratio such as 16:9"));
        let (a, b) = s.split_once(':').or_else(|| s.split_once('x')).ok_or_else(bad)?;
        let a: u32 = a.trim().parse().map_err(|_| bad())?;
        let b: u32 = b.trim().parse().map_err(|_| bad())?;
        if a == 0 || b == 0 {
            return Err(bad());
        }
        Ok((a, b))
    }
}

/// How the new area is filled before sampling (what the VAE encodes there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefill {
    /// Each new pixel copies the nearest original pixel.
    #[default]
    Edge,
    /// Gaussian noise with the mean and spread of the original's border band, per channel.
    Noise,
}

impl std::str::FromStr for Prefill {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "edge" => Ok(Self::Edge),
            "noise" => Ok(Self::Noise),
            _ => Err(Error::arg("fill", format!("`{s}`: expected edge or noise"))),
        }
    }
}

/// The grown canvas, its mask, and where the original sits in it.
#[derive(Debug, Clone)]
pub struct OutpaintCanvas {
    pub image: RgbImage,
    pub mask: Mask,
    pub original: Rect,
}

/// Builds the canvas and mask: 1 over the new area, ramping linearly down to 0 across
/// `overlap` pixels of the original along each extended side (exactly 0 beyond).
pub fn extend_canvas(
    image: &RgbImage,
    ext: Extension,
    prefill: Prefill,
    overlap: u32,
    seed: u64,
) -> Result<OutpaintCanvas> {
    if ext.is_zero() {
        return Err(Error::arg(
            "--left/--right/--top/--bottom",
            "nothing to extend: give at least one side or --to",
        ));
    }
    let (w, h) = image.dimensions();
    let too_big = || Error::arg("extension", "the canvas would exceed kiln's size limit");
    let cw = w.checked_add(ext.left).and_then(|v| v.checked_add(ext.right)).ok_or_else(too_big)?;
    let ch = h.checked_add(ext.top).and_then(|v| v.checked_add(ext.bottom)).ok_or_else(too_big)?;
    crate::image::check_size(cw, ch).map_err(|msg| Error::arg("extension", msg))?;
    let original = Rect { x: ext.left, y: ext.top, width: w, height: h };
    let inside = |x: u32, y: u32| x >= ext.left && x < ext.left + w && y >= ext.top && y < ext.top + h;
    let nearest = |x: u32, y: u32| {
        let ox = x.saturating_sub(ext.left).min(w - 1);
        let oy = y.saturating_sub(ext.top).min(h - 1);
        *image.get_pixel(ox, oy)
    };
    let mut canvas = RgbImage::from_fn(cw, ch, nearest);
    if prefill == Prefill::Noise {
        let (mean, std) = border_stats(image, ext, overlap.max(8));
        let mut gen = TorchGenerator::new(seed);
        let new_pixels = (cw as u64 * ch as u64 - w as u64 * h as u64) as usize;
        let noise = gen.randn(new_pixels * 3);
        let mut k = 0;
        for (x, y, px) in canvas.enumerate_pixels_mut() {
            if !inside(x, y) {
                for c in 0..3 {
                    let v = mean[c] + std[c] * noise.get(k).copied().unwrap_or(0.0);
                    px.0[c] = v.round().clamp(0.0, 255.0) as u8;
                    k += 1;
                }
            }
        }
    }
    let ramp = |d: u32| -> f32 {
        if d >= overlap {
            0.0
        } else {
            1.0 - (d + 1) as f32 / (overlap + 1) as f32
        }
    };
    let mask = Mask::from_fn(cw, ch, |x, y| {
        if !inside(x, y) {
            return 1.0;
        }
        let (ox, oy) = (x - ext.left, y - ext.top);
        let mut m = 0f32;
        if ext.left > 0 {
            m = m.max(ramp(ox));
        }
        if ext.right > 0 {
            m = m.max(ramp(w - 1 - ox));
        }
        if ext.top > 0 {
            m = m.max(ramp(oy));
        }
        if ext.bottom > 0 {
            m = m.max(ramp(h - 1 - oy));
        }
        m
    });
    Ok(OutpaintCanvas { image: canvas, mask, original })
}

/// Per-channel mean and standard deviation (0..255) of the original's bands along the extended sides.
fn border_stats(image: &RgbImage, ext: Extension, band: u32) -> ([f32; 3], [f32; 3]) {
    let (w, h) = image.dimensions();
    let mut sum = [0f64; 3];
    let mut sq = [0f64; 3];
    let mut n = 0f64;
    for (x, y, px) in image.enumerate_pixels() {
        let near = (ext.left > 0 && x < band)
            || (ext.right > 0 && x + band >= w)
            || (ext.top > 0 && y < band)
            || (ext.bottom > 0 && y + band >= h);
        if near {
            for c in 0..3 {
                let v = px.0[c] as f64;
                sum[c] += v;
                sq[c] += v * v;
            }
            n += 1.0;
        }
    }
    let n = n.max(1.0);
    let mut mean = [0f32; 3];
    let mut std = [0f32; 3];
    for c in 0..3 {
        let m = sum[c] / n;
        mean[c] = m as f32;
        std[c] = (sq[c] / n - m * m).max(0.0).sqrt() as f32;
    }
    (mean, std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_and_canvas() -> Result<()> {
        assert_eq!(
            Extension::to_aspect(100, 100, 16, 9)?,
            Extension { left: 39, right: 39, top: 0, bottom: 0 }
        );
        assert_eq!(
            Extension::to_aspect(160, 50, 16, 9)?,
            Extension { left: 0, right: 0, top: 20, bottom: 20 }
        );
        assert!(Extension::to_aspect(160, 90, 16, 9).is_err());
        assert_eq!(Extension::parse_aspect("16:9")?, (16, 9));
        assert!(Extension::parse_aspect("16:0").is_err());

        let img = RgbImage::from_fn(10, 6, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 5]));
        let ext = Extension { left: 3, right: 0, top: 0, bottom: 2 };
        let c = extend_canvas(&img, ext, Prefill::Edge, 4, 0)?;
        assert_eq!(c.image.dimensions(), (13, 8));
        assert_eq!(c.original, Rect { x: 3, y: 0, width: 10, height: 6 });
        // Edge replication: the new left column copies the first original column.
        assert_eq!(c.image.get_pixel(0, 2), img.get_pixel(0, 2));
        assert_eq!(c.image.get_pixel(5, 7), img.get_pixel(2, 5));
        // Mask: 1 in the new area, a ramp of 4 px into the original, 0 beyond.
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert_eq!(c.mask.get(1, 1), 1.0);
        assert!(close(c.mask.get(3, 0), 0.8));
        assert!(close(c.mask.get(6, 0), 0.2));
        assert_eq!(c.mask.get(7, 0), 0.0);
        assert!(close(c.mask.get(12, 5), 0.8));
        let noisy = extend_canvas(&img, ext, Prefill::Noise, 4, 1)?;
        assert_eq!(noisy.image.get_pixel(4, 1), c.image.get_pixel(4, 1));
        assert_ne!(noisy.image.get_pixel(0, 0), c.image.get_pixel(0, 0));
        Ok(())
    }
}
