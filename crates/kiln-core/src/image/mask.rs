//! Inpainting masks: loading (grayscale, or the alpha channel of an RGBA image), feathering,
//! the latent-resolution masks the samplers use, crops, and the exact composite that leaves
//! every pixel outside the mask bit-identical to the input.
//!
//! Values are floats in [0, 1], 1 = repaint (diffusers' convention: white = repaint). Soft
//! values are kept soft everywhere except in [`Mask::binarized`] (diffusers' own processing).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use image::{Rgb32FImage, RgbImage};
use std::path::Path;

/// A rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// Pixel count.
    pub fn area(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// A per-pixel repaint weight in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    width: u32,
    height: u32,
    values: Vec<f32>,
}

impl Mask {
    /// A mask from row-major values (clamped to [0, 1]; NaN counts as 0).
    pub fn new(width: u32, height: u32, values: Vec<f32>) -> Result<Self> {
        if values.len() as u64 != width as u64 * height as u64 {
            return Err(Error::arg("mask", format!("{} values for a {width}x{height} mask", values.len())));
        }
        let values = values.into_iter().map(|v| if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) }).collect();
        Ok(Self { width, height, values })
    }

    /// A mask whose value at (x, y) is `f(x, y)`.
    pub fn from_fn(width: u32, height: u32, f: impl Fn(u32, u32) -> f32) -> Self {
        let mut values = Vec::with_capacity(width as usize * height as usize);
        for y in 0..height {
            for x in 0..width {
                let v = f(x, y);
                values.push(if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) });
            }
        }
        Self { width, height, values }
    }

    /// Reads a mask file. An image with an alpha channel that is not fully opaque gives
    /// `1 - alpha` (transparent = repaint, as image editors, OpenAI's edit API and ComfyUI do);
    /// otherwise the luminance is the mask (white = repaint).
    pub fn load(path: &Path) -> Result<Self> {
        let img = super::load_dynamic(path)?;
        let (width, height) = (img.width(), img.height());
        if img.color().has_alpha() {
            let rgba = img.to_rgba8();
            if rgba.pixels().any(|p| p.0[3] < 255) {
                // (255 - a) / 255, not 1 - a / 255: the same floats as the equivalent grayscale mask.
                let values = rgba.pixels().map(|p| (255 - p.0[3]) as f32 / 255.0).collect();
                return Self::new(width, height, values);
            }
        }
        let luma = img.to_luma8();
        Self::new(width, height, luma.as_raw().iter().map(|&v| v as f32 / 255.0).collect())
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Row-major values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The value at (x, y); 0 outside the mask.
    pub fn get(&self, x: u32, y: u32) -> f32 {
        if x < self.width && y < self.height {
            self.values[y as usize * self.width as usize + x as usize]
        } else {
            0.0
        }
    }

    /// True when no pixel is to be repainted.
    pub fn is_empty(&self) -> bool {
        self.values.iter().all(|&v| v == 0.0)
    }

    /// True when every pixel is mostly repainted (nothing of the image would be kept).
    pub fn is_full(&self) -> bool {
        self.values.iter().all(|&v| v >= 0.5)
    }

    /// Mean repaint weight.
    pub fn coverage(&self) -> f64 {
        if self.values.is_empty() {
            return 0.0;
        }
        self.values.iter().map(|&v| v as f64).sum::<f64>() / self.values.len() as f64
    }

    /// The smallest rectangle holding every pixel with a non-zero value.
    pub fn bbox(&self) -> Option<Rect> {
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
        for y in 0..self.height {
            let row = &self.values[y as usize * self.width as usize..(y as usize + 1) * self.width as usize];
            if let (Some(first), Some(last)) =
                (row.iter().position(|&v| v > 0.0), row.iter().rposition(|&v| v > 0.0))
            {
                x0 = x0.min(first as u32);
                x1 = x1.max(last as u32);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        (x0 != u32::MAX).then(|| Rect { x: x0, y: y0, width: x1 - x0 + 1, height: y1 - y0 + 1 })
    }

    /// diffusers' mask processing: values >= 0.5 become 1, the rest 0.
    pub fn binarized(&self) -> Self {
        let values = self.values.iter().map(|&v| if v >= 0.5 { 1.0 } else { 0.0 }).collect();
        Self { width: self.width, height: self.height, values }
    }

    /// Gaussian feathering with standard deviation `sigma` px (A1111's `mask_blur`), the kernel
    /// cut at 3 sigma so the mask stays exactly 0 farther out; edges clamp.
    pub fn blurred(&self, sigma: f64) -> Self {
        if sigma.is_nan() || sigma <= 0.0 || self.values.is_empty() {
            return self.clone();
        }
        let Some(bbox) = self.bbox() else { return self.clone() };
        // Only the mask's box plus the kernel radius can change: blur that window (a small spot
        // on a 4K canvas costs a spot's work). Past the window everything is 0, as clamped
        // reads at the window's edge see.
        let radius = (3.0 * sigma).ceil().min(u32::MAX as f64) as u32;
        let x0 = bbox.x.saturating_sub(radius);
        let y0 = bbox.y.saturating_sub(radius);
        let x1 = (bbox.x + bbox.width).saturating_add(radius).min(self.width);
        let y1 = (bbox.y + bbox.height).saturating_add(radius).min(self.height);
        let window = Rect { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
        let Ok(part) = self.crop(window) else { return self.clone() };
        let part = part.blurred_whole(sigma);
        let mut out = Self { width: self.width, height: self.height, values: vec![0f32; self.values.len()] };
        for y in 0..window.height as usize {
            let src = &part.values[y * window.width as usize..(y + 1) * window.width as usize];
            let start = (window.y as usize + y) * self.width as usize + window.x as usize;
            out.values[start..start + window.width as usize].copy_from_slice(src);
        }
        out
    }

    fn blurred_whole(&self, sigma: f64) -> Self {
        let radius = (3.0 * sigma).ceil() as usize;
        let mut kernel: Vec<f64> = (0..=2 * radius)
            .map(|k| (-((k as f64 - radius as f64).powi(2)) / (2.0 * sigma * sigma)).exp())
            .collect();
        let total: f64 = kernel.iter().sum();
        kernel.iter_mut().for_each(|k| *k /= total);
        let (w, h) = (self.width as usize, self.height as usize);
        let pass = |src: &[f32], len: usize, stride: usize, lines: usize, line_stride: usize| -> Vec<f32> {
            let mut out = vec![0f32; src.len()];
            for line in 0..lines {
                let base = line * line_stride;
                for i in 0..len {
                    let mut acc = 0f64;
                    for (k, weight) in kernel.iter().enumerate() {
                        let j = (i + k).saturating_sub(radius).min(len - 1);
                        acc += weight * src[base + j * stride] as f64;
                    }
                    out[base + i * stride] = acc as f32;
                }
            }
            out
        };
        let horizontal = pass(&self.values, w, 1, h, w);
        let values = pass(&horizontal, h, w, w, 1);
        // Summation leaves ~1e-8 residues where every tap is 0 or 1; snap them so "exactly 0"
        // (kept bit-exact) and "exactly 1" (fully repainted) survive feathering.
        let values = values
            .into_iter()
            .map(|v| {
                if v < 1e-6 {
                    0.0
                } else if v > 1.0 - 1e-6 {
                    1.0
                } else {
                    v
                }
            })
            .collect();
        Self { width: self.width, height: self.height, values }
    }

    /// The mask grown by `px` pixels in every direction (a square max filter), so a repaint
    /// region also covers an object's fringe and shadow (the eraser's default).
    pub fn dilated(&self, px: u32) -> Self {
        if px == 0 || self.values.is_empty() {
            return self.clone();
        }
        let (w, h) = (self.width as usize, self.height as usize);
        let r = px as usize;
        let pass = |src: &[f32], len: usize, stride: usize, lines: usize, line_stride: usize| -> Vec<f32> {
            let mut out = vec![0f32; src.len()];
            for line in 0..lines {
                let base = line * line_stride;
                for i in 0..len {
                    let lo = i.saturating_sub(r);
                    let hi = (i + r).min(len - 1);
                    out[base + i * stride] = (lo..=hi).map(|j| src[base + j * stride]).fold(0f32, f32::max);
                }
            }
            out
        };
        let horizontal = pass(&self.values, w, 1, h, w);
        Self { width: self.width, height: self.height, values: pass(&horizontal, h, w, w, 1) }
    }

    /// The part of the mask inside `rect` (which must lie within the mask).
    pub fn crop(&self, rect: Rect) -> Result<Self> {
        if rect.x as u64 + rect.width as u64 > self.width as u64
            || rect.y as u64 + rect.height as u64 > self.height as u64
        {
            return Err(Error::arg(
                "crop",
                format!("{rect:?} lies outside the {}x{} mask", self.width, self.height),
            ));
        }
        Ok(Self::from_fn(rect.width, rect.height, |x, y| self.get(rect.x + x, rect.y + y)))
    }

    /// Bilinear resize (for `--resize-mask`).
    pub fn resized(&self, width: u32, height: u32) -> Result<Self> {
        if width == self.width && height == self.height {
            return Ok(self.clone());
        }
        let buf = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(
            self.width,
            self.height,
            self.values.clone(),
        )
        .ok_or_else(|| Error::Unsupported("mask buffer size mismatch".into()))?;
        let out = image::imageops::resize(&buf, width, height, image::imageops::FilterType::Triangle);
        Self::new(width, height, out.into_raw())
    }

    /// The mask grown to `width`×`height` (anchored top-left), new pixels 0.
    pub fn padded_to(&self, width: u32, height: u32) -> Self {
        Self::from_fn(width.max(self.width), height.max(self.height), |x, y| self.get(x, y))
    }

    /// [1, 1, H, W] tensor.
    pub fn to_tensor(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let t = Tensor::from_vec(
            self.values.clone(),
            (1, 1, self.height as usize, self.width as usize),
            &Device::Cpu,
        )?;
        Ok(t.to_device(device)?.to_dtype(dtype)?)
    }

    /// kiln's latent mask: the maximum over each `factor`×`factor` cell (a latent touched by any
    /// repainted pixel is repainted), then grown by `inflate` latent pixels (a max filter), so
    /// the VAE's receptive field does not drag known content across the edge. Soft values stay
    /// soft. Returns [1, 1, ceil(H/f), ceil(W/f)].
    pub fn latent_max_pool(
        &self,
        factor: u32,
        inflate: u32,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let (lw, lh) = self.latent_dims(factor)?;
        let mut pooled = vec![0f32; lw * lh];
        for y in 0..self.height as usize {
            let ly = y / factor as usize;
            for x in 0..self.width as usize {
                let v = self.values[y * self.width as usize + x];
                let cell = &mut pooled[ly * lw + x / factor as usize];
                *cell = cell.max(v);
            }
        }
        let r = inflate as usize;
        let mut grown = pooled.clone();
        if r > 0 {
            for ly in 0..lh {
                for lx in 0..lw {
                    let mut m = 0f32;
                    for yy in ly.saturating_sub(r)..=(ly + r).min(lh - 1) {
                        for xx in lx.saturating_sub(r)..=(lx + r).min(lw - 1) {
                            m = m.max(pooled[yy * lw + xx]);
                        }
                    }
                    grown[ly * lw + lx] = m;
                }
            }
        }
        let t = Tensor::from_vec(grown, (1, 1, lh, lw), &Device::Cpu)?;
        Ok(t.to_device(device)?.to_dtype(dtype)?)
    }

    /// diffusers' latent mask: `F.interpolate(mask, size=(H/f, W/f))` (mode "nearest"), which
    /// takes the top-left pixel of each cell. Returns [1, 1, H/f, W/f].
    pub fn latent_nearest(&self, factor: u32, device: &Device, dtype: DType) -> Result<Tensor> {
        let (lw, lh) = (self.width / factor.max(1), self.height / factor.max(1));
        if lw == 0 || lh == 0 {
            return Err(Error::arg(
                "mask",
                format!("{}x{} is smaller than one latent cell", self.width, self.height),
            ));
        }
        let values: Vec<f32> = (0..lh)
            .flat_map(|ly| (0..lw).map(move |lx| (lx, ly)))
            .map(|(lx, ly)| self.get(lx * factor, ly * factor))
            .collect();
        let t = Tensor::from_vec(values, (1, 1, lh as usize, lw as usize), &Device::Cpu)?;
        Ok(t.to_device(device)?.to_dtype(dtype)?)
    }

    fn latent_dims(&self, factor: u32) -> Result<(usize, usize)> {
        if factor == 0 || self.width == 0 || self.height == 0 {
            return Err(Error::arg(
                "mask",
                format!("{}x{} mask with factor {factor}", self.width, self.height),
            ));
        }
        Ok((self.width.div_ceil(factor) as usize, self.height.div_ceil(factor) as usize))
    }
}

/// The exact composite: `original * (1 - m) + generated * m`, rounded to 8 bits, and the
/// original's bytes themselves wherever `m == 0` (so those pixels are bit-identical).
pub fn composite(original: &RgbImage, generated: &Rgb32FImage, mask: &Mask) -> Result<RgbImage> {
    let dims = original.dimensions();
    if generated.dimensions() != dims || (mask.width(), mask.height()) != dims {
        return Err(Error::arg(
            "composite",
            format!(
                "image {}x{}, generated {}x{}, mask {}x{} differ",
                dims.0,
                dims.1,
                generated.width(),
                generated.height(),
                mask.width(),
                mask.height()
            ),
        ));
    }
    let mut out = original.clone();
    for (i, (px, gen)) in out.pixels_mut().zip(generated.pixels()).enumerate() {
        let m = mask.values[i];
        if m == 0.0 {
            continue;
        }
        for c in 0..3 {
            let orig = px.0[c] as f32 / 255.0;
            let v = orig * (1.0 - m) + gen.0[c].clamp(0.0, 1.0) * m;
            px.0[c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbox_blur_and_pools() -> Result<()> {
        let m = Mask::from_fn(
            32,
            24,
            |x, y| if (10..14).contains(&x) && (5..7).contains(&y) { 1.0 } else { 0.0 },
        );
        assert_eq!(m.bbox(), Some(Rect { x: 10, y: 5, width: 4, height: 2 }));
        assert!(!m.is_empty() && !m.is_full());
        let b = m.blurred(2.0);
        // Cut at 3 sigma = 6 px: exactly zero beyond, soft inside.
        assert_eq!(b.bbox(), Some(Rect { x: 4, y: 0, width: 16, height: 13 }));
        assert!(b.values().iter().any(|&v| v > 0.0 && v < 1.0));
        assert_eq!(b, m.blurred_whole(2.0), "windowed blur = whole-image blur");
        // Max-pool: the cell (1..2, 0) holds the pixels 8..16 × 0..8; inflation adds a ring.
        let pooled = m.latent_max_pool(8, 0, &Device::Cpu, DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(pooled, vec![0., 1., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.]);
        let grown = m.latent_max_pool(8, 1, &Device::Cpu, DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(grown, vec![1., 1., 1., 0., 1., 1., 1., 0., 0., 0., 0., 0.]);
        // diffusers' nearest takes pixel (8i, 8j): the spot at x 10..14 is missed.
        let nearest = m.latent_nearest(8, &Device::Cpu, DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(nearest.iter().all(|&v| v == 0.0));
        assert_eq!(m.dilated(2).bbox(), Some(Rect { x: 8, y: 3, width: 8, height: 6 }));
        Ok(())
    }

    #[test]
    fn composite_keeps_unmasked_bytes() -> Result<()> {
        let orig = RgbImage::from_fn(4, 1, |x, _| image::Rgb([x as u8 * 60 + 1, 7, 200]));
        let gen = Rgb32FImage::from_fn(4, 1, |_, _| image::Rgb([0.5, 0.5, 0.5]));
        let mask = Mask::new(4, 1, vec![0.0, 1.0, 0.5, 1e-7])?;
        let out = composite(&orig, &gen, &mask)?;
        assert_eq!(out.get_pixel(0, 0), orig.get_pixel(0, 0));
        assert_eq!(out.get_pixel(1, 0).0, [128, 128, 128]);
        assert_eq!(out.get_pixel(2, 0).0, [(121.0f32 / 255.0 * 0.5 * 255.0 + 63.75).round() as u8, 67, 164]);
        assert_eq!(out.get_pixel(3, 0), orig.get_pixel(3, 0));
        Ok(())
    }
}
