//! Background removal: an image + a loaded matting model → a foreground mask, the RGBA cutout
//! or the subject composited onto a colour or another image.
//!
//! Without `refine`, the mask is rembg's own: the photo resized to the net's square input with
//! Pillow's Lanczos ([`crate::image::pil_resize`]), divided by its maximum, ImageNet-normalised;
//! the net's fused output min-max normalised, truncated to 8 bits and resized back to the photo
//! with Pillow's Lanczos. `refine` then runs a guided filter at full resolution, guided by the
//! photo, so edges follow the photo's edges (hair, soft contours) instead of the 320-px mask's.
//!
//! Pure compute: no files, no printing. [`cutout`] is what a job kind wraps.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
pub use image::{GrayImage, Rgb, RgbImage, RgbaImage};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::image::pil_resize::resize_lanczos_u8;
use crate::loaders::matting::MattingWeights;
use crate::models::matting::{MattingNet, MattingSpec, Preprocess};

/// Below this share of foreground (alpha ≥ 50 %) the result is reported as "no subject found".
pub const EMPTY_COVERAGE: f64 = 0.001;
/// rembg stretches the net's output to 0..255 whatever its range, so a net that sees no subject
/// anywhere still yields a "mask"; below this top probability kiln reports no subject instead.
pub const MIN_SUBJECT_PROB: f32 = 0.02;

/// A matting model with its weights on a device, kept warm across images.
#[derive(Debug, Clone)]
pub struct MattingModel {
    pub name: String,
    pub sha256: String,
    pub spec: MattingSpec,
    net: MattingNet,
    device: Device,
}

impl MattingModel {
    /// Builds the net on `device` (f32: the net is small and the mask must match rembg's).
    pub fn load(weights: MattingWeights, device: &Device) -> Result<Self> {
        let net = MattingNet::new(&weights.spec, &weights.convs, device)?;
        Ok(Self {
            name: weights.name,
            sha256: weights.sha256,
            spec: weights.spec,
            net,
            device: device.clone(),
        })
    }

    /// The net's input for an image: `[1, 3, S, S]` f32 (rembg's `normalize`).
    pub fn input_tensor(&self, image: &RgbImage) -> Result<Tensor> {
        let p = self.spec.preprocess();
        let s = p.size as usize;
        let small =
            resize_lanczos_u8(image.as_raw(), image.width() as usize, image.height() as usize, 3, s, s);
        Ok(normalize(&small, s, &p, &self.device)?)
    }

    /// The net's fused output `[S, S]` in [0, 1] for an input from [`Self::input_tensor`].
    pub fn predict(&self, input: &Tensor) -> Result<Vec<f32>> {
        let y = self.net.forward(input)?;
        Ok(y.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// rembg's mask for an image: the prediction min-max normalised, truncated to 8 bits and
    /// resized to the image with Pillow's Lanczos.
    pub fn raw_mask(&self, image: &RgbImage) -> Result<GrayImage> {
        let pred = self.predict(&self.input_tensor(image)?)?;
        let s = self.spec.preprocess().size;
        mask_from_prediction(&pred, s, image.width(), image.height())
    }
}

/// rembg's input normalisation on Pillow-resized 8-bit RGB (`s × s`): divide by the maximum
/// value, subtract the mean, divide by the std — in f64 as numpy does, then to f32.
fn normalize(small: &[u8], s: usize, p: &Preprocess, device: &Device) -> candle_core::Result<Tensor> {
    // An all-black image has maximum 0: rembg divides by zero (NaN); kiln keeps it black.
    let max = f64::from(small.iter().copied().max().unwrap_or(0).max(1));
    let mut data = vec![0f32; 3 * s * s];
    for (i, px) in small.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * s * s + i] = ((f64::from(px[c]) / max - p.mean[c]) / p.std[c]) as f32;
        }
    }
    Tensor::from_vec(data, (1, 3, s, s), device)
}

/// The net's output `[s, s]` → rembg's 8-bit mask at `width × height`.
pub fn mask_from_prediction(pred: &[f32], s: u32, width: u32, height: u32) -> Result<GrayImage> {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in pred {
        if !v.is_finite() {
            return Err(Error::Unsupported("the matting net produced non-finite values".into()));
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let range = hi - lo;
    // A constant prediction has no foreground to normalise (rembg would divide by zero).
    let small: Vec<u8> = if range > 0.0 {
        pred.iter().map(|&v| (((v - lo) / range) * 255.0) as u8).collect()
    } else {
        vec![0; pred.len()]
    };
    let full = resize_lanczos_u8(&small, s as usize, s as usize, 1, width as usize, height as usize);
    GrayImage::from_raw(width, height, full).ok_or_else(|| Error::Unsupported("mask buffer size".into()))
}

/// What the cut-out subject is placed on.
#[derive(Debug, Clone, Default)]
pub enum Background {
    /// Transparent (RGBA output).
    #[default]
    Transparent,
    Color(Rgb<u8>),
    /// Same size as the input (the caller resizes or refuses).
    Image(RgbImage),
}

/// Options of one cutout.
#[derive(Debug, Clone, Default)]
pub struct CutoutOptions {
    pub refine: bool,
    pub background: Background,
}

/// Stages reported to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CutoutStage {
    Preprocess,
    Net,
    Mask,
    Refine,
    Composite,
}

/// Seconds per stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CutoutTimings {
    pub preprocess: f64,
    pub net: f64,
    pub mask: f64,
    pub refine: f64,
    pub composite: f64,
    pub total: f64,
}

/// The output pixels.
#[derive(Debug, Clone)]
pub enum CutoutImage {
    Rgba(RgbaImage),
    Rgb(RgbImage),
}

/// What a cutout produced.
#[derive(Debug, Clone)]
pub struct CutoutOutput {
    pub image: CutoutImage,
    /// The alpha used (refined when asked): white = subject.
    pub mask: GrayImage,
    /// rembg's mask (before refinement).
    pub raw_mask: GrayImage,
    /// Share of pixels with alpha ≥ 50 %.
    pub coverage: f64,
    pub timings: CutoutTimings,
}

/// Removes the background of `image`. Errors if the background image has another size or the
/// mask finds no subject (coverage under [`EMPTY_COVERAGE`]).
pub fn cutout(
    model: &MattingModel,
    image: &RgbImage,
    opts: &CutoutOptions,
    progress: &mut dyn FnMut(CutoutStage),
) -> Result<CutoutOutput> {
    let start = Instant::now();
    let (w, h) = image.dimensions();
    crate::image::check_size(w, h).map_err(|m| Error::arg("input image", m))?;
    if let Background::Image(bg) = &opts.background {
        if bg.dimensions() != (w, h) {
            return Err(Error::arg(
                "--background",
                format!(
                    "image is {}x{}, the input is {w}x{h}; resize it first or pass --fit-background",
                    bg.width(),
                    bg.height()
                ),
            ));
        }
    }
    let mut t = CutoutTimings::default();
    progress(CutoutStage::Preprocess);
    let t0 = Instant::now();
    let input = model.input_tensor(image)?;
    t.preprocess = t0.elapsed().as_secs_f64();
    progress(CutoutStage::Net);
    let t0 = Instant::now();
    let pred = model.predict(&input)?;
    t.net = t0.elapsed().as_secs_f64();
    let top = pred.iter().copied().fold(0f32, f32::max);
    if top < MIN_SUBJECT_PROB {
        return Err(Error::Unsupported(format!(
            "no subject found: the model's highest foreground probability is {top:.4}; nothing written"
        )));
    }
    progress(CutoutStage::Mask);
    let t0 = Instant::now();
    let raw_mask = mask_from_prediction(&pred, model.spec.preprocess().size, w, h)?;
    t.mask = t0.elapsed().as_secs_f64();
    let mask = if opts.refine {
        progress(CutoutStage::Refine);
        let t0 = Instant::now();
        let m = crate::image::guided::refine_mask(image, &raw_mask)?;
        t.refine = t0.elapsed().as_secs_f64();
        m
    } else {
        raw_mask.clone()
    };
    let coverage = mask.as_raw().iter().filter(|&&a| a >= 128).count() as f64 / (w as f64 * h as f64);
    if coverage < EMPTY_COVERAGE {
        return Err(Error::Unsupported(format!(
            "no subject found: the mask is background everywhere ({:.3} % foreground); nothing written",
            coverage * 100.0
        )));
    }
    progress(CutoutStage::Composite);
    let t0 = Instant::now();
    let out = composite(image, &mask, &opts.background);
    t.composite = t0.elapsed().as_secs_f64();
    t.total = start.elapsed().as_secs_f64();
    Ok(CutoutOutput { image: out, mask, raw_mask, coverage, timings: t })
}

/// Places the subject: straight (not premultiplied) alpha for transparent output, else
/// `fg·a + bg·(1 − a)` rounded.
pub fn composite(image: &RgbImage, mask: &GrayImage, background: &Background) -> CutoutImage {
    let (w, h) = image.dimensions();
    let blend = |fg: u8, bg: u8, a: u8| -> u8 {
        let (fg, bg, a) = (u32::from(fg), u32::from(bg), u32::from(a));
        ((fg * a + bg * (255 - a) + 127) / 255) as u8
    };
    match background {
        Background::Transparent => CutoutImage::Rgba(RgbaImage::from_fn(w, h, |x, y| {
            let p = image.get_pixel(x, y).0;
            image::Rgba([p[0], p[1], p[2], mask.get_pixel(x, y).0[0]])
        })),
        Background::Color(c) => CutoutImage::Rgb(RgbImage::from_fn(w, h, |x, y| {
            let (p, a) = (image.get_pixel(x, y).0, mask.get_pixel(x, y).0[0]);
            Rgb([blend(p[0], c.0[0], a), blend(p[1], c.0[1], a), blend(p[2], c.0[2], a)])
        })),
        Background::Image(bg) => CutoutImage::Rgb(RgbImage::from_fn(w, h, |x, y| {
            let (p, b, a) = (image.get_pixel(x, y).0, bg.get_pixel(x, y).0, mask.get_pixel(x, y).0[0]);
            Rgb([blend(p[0], b[0], a), blend(p[1], b[1], a), blend(p[2], b[2], a)])
        })),
    }
}

/// Parses a background colour: `#rrggbb`, `rrggbb`, `#rgb` or a few names.
pub fn parse_color(s: &str) -> Option<Rgb<u8>> {
    let named = match s.to_ascii_lowercase().as_str() {
        "white" => Some([255, 255, 255]),
        "black" => Some([0, 0, 0]),
        "gray" | "grey" => Some([128, 128, 128]),
        "red" => Some([255, 0, 0]),
        "green" => Some([0, 255, 0]),
        "blue" => Some([0, 0, 255]),
        _ => None,
    };
    if let Some(c) = named {
        return Some(Rgb(c));
    }
    let hex = s.strip_prefix('#').unwrap_or(s);
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let v: Vec<u8> = match hex.len() {
        6 => (0..3).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect(),
        3 => (0..3).filter_map(|i| u8::from_str_radix(&hex[i..i + 1], 16).ok().map(|d| d * 17)).collect(),
        _ => return None,
    };
    (v.len() == 3).then(|| Rgb([v[0], v[1], v[2]]))
}

/// Scales `bg` to cover `width × height` (keeping its aspect, Lanczos) and centre-crops it.
pub fn fit_background(bg: &RgbImage, width: u32, height: u32) -> RgbImage {
    if bg.dimensions() == (width, height) {
        return bg.clone();
    }
    let scale = (f64::from(width) / f64::from(bg.width())).max(f64::from(height) / f64::from(bg.height()));
    let sw = ((f64::from(bg.width()) * scale).ceil() as u32).max(width);
    let sh = ((f64::from(bg.height()) * scale).ceil() as u32).max(height);
    let scaled = crate::image::resize_rgb(bg, sw, sh);
    image::imageops::crop_imm(&scaled, (sw - width) / 2, (sh - height) / 2, width, height).to_image()
}
