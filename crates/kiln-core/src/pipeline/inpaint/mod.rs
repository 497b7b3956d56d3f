//! Inpainting with any Stable Diffusion-family model, and with dedicated 9-channel inpainting
//! models, leaving every pixel outside the (feathered) mask bit-identical to the input.
//!
//! The job: feather the mask, choose the region to process (the whole image, or only the
//! mask's bounding box plus padding, expanded to the model's aspect and processed at its native
//! size), sample it ([`sample`]), then composite the result into the original
//! ([`crate::image::mask::composite`]).

pub mod replay;
mod sample;

pub use sample::UNetKind;

use crate::error::{Error, Result};
use crate::image::mask::{composite, Mask, Rect};
use crate::pipeline::generate::{NoProgress, Progress, StageTimings, MAX_GENERATE_SIDE, MAX_STEPS};
use crate::pipeline::model::LoadedModel;
use crate::pipeline::text::encode_prompts;
use crate::pipeline::vae_tiling::VaeTiling;
use crate::schedule::SchedulerKind;
use candle_core::Tensor;
use image::{Rgb32FImage, RgbImage};
use sample::{sample_canvas, Canvas, Sampling};
use std::time::Instant;

/// Default padding around the mask's bounding box in only-masked mode, in pixels.
pub const DEFAULT_PADDING: u32 = 32;
/// Only-masked mode turns on by itself when the padded crop covers at most this share of an
/// image larger than the model's native size.
pub const AUTO_ONLY_MASKED_MAX_SHARE: f64 = 0.5;

/// How the known region is blended during sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blend {
    /// Soft masks stay soft; the latent mask is the max over each latent cell grown by
    /// `inflate` latent pixels; the mask is feathered by `mask_blur`.
    #[default]
    Kiln,
    /// diffusers' StableDiffusionInpaintPipeline: mask binarized at 0.5, latent mask by
    /// nearest-neighbour downsampling (for parity).
    Diffusers,
}

impl std::str::FromStr for Blend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kiln" => Ok(Self::Kiln),
            "diffusers" => Ok(Self::Diffusers),
            _ => Err(Error::arg("blend", format!("`{s}`: expected kiln or diffusers"))),
        }
    }
}

/// Which part of the image is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Region {
    /// Only-masked when the mask is small relative to an image larger than the native size.
    #[default]
    Auto,
    /// The whole image (padded to the VAE factor).
    Whole,
    /// The mask's bounding box plus padding, at the model's native size.
    OnlyMasked,
}

/// An inpainting job.
#[derive(Debug, Clone)]
pub struct InpaintRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub image: RgbImage,
    /// Same size as `image`; 1 = repaint.
    pub mask: Mask,
    pub steps: usize,
    pub guidance: f64,
    /// FLUX's true classifier-free guidance (diffusers' `true_cfg_scale`): with a negative
    /// prompt and a scale > 1, a negative pass per step, as in generate.
    pub true_cfg: Option<f64>,
    /// None = the folder's own scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// One image per seed.
    pub seeds: Vec<u64>,
    /// Unit-normal starting noise [1, C, h, w] at the processing size ([`InpaintPlan`]).
    pub init_latents: Option<Tensor>,
    /// In (0, 1]; 1 starts from pure noise inside the mask.
    pub strength: f64,
    /// Gaussian feathering of the mask, in pixels (standard deviation).
    pub mask_blur: f64,
    pub blend: Blend,
    pub region: Region,
    /// Pixels around the mask's bounding box in only-masked mode.
    pub padding: u32,
    /// Re-impose the known latents at every step: None = on for 4-channel UNets, off for
    /// dedicated inpainting UNets (which see the known image through their extra channels).
    pub reimpose: Option<bool>,
    /// Also re-impose the clean known latents on the solver's x0 estimate at every step (DDIM,
    /// Euler, Euler a, DPM++ 2M, LCM's denoised, PNDM's eps-implied x0). None = on whenever
    /// `reimpose` is, with
    /// `Blend::Kiln` (`Blend::Diffusers` reproduces diffusers, which does not).
    pub reimpose_denoised: Option<bool>,
    /// Latent pixels the kiln latent mask grows by.
    pub inflate: u32,
    /// The only-masked processing size (its pixel count and the crop's aspect); None = the
    /// model's native size. A tier's width × height sets it.
    pub native_size: Option<(u32, u32)>,
    /// Untiled or tiled VAE decode/encode (`--vae-tiling`, `--vae-tile`).
    pub vae_tiling: VaeTiling,
}

impl InpaintRequest {
    /// A request with kiln's defaults (30 steps, guidance 7.5, strength 1, blur 4 px, padding 32).
    pub fn new(prompt: impl Into<String>, image: RgbImage, mask: Mask) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            image,
            mask,
            steps: 30,
            guidance: 7.5,
            true_cfg: None,
            scheduler: None,
            seeds: vec![0],
            init_latents: None,
            strength: 1.0,
            mask_blur: 4.0,
            blend: Blend::Kiln,
            region: Region::Auto,
            padding: DEFAULT_PADDING,
            reimpose: None,
            reimpose_denoised: None,
            inflate: 1,
            native_size: None,
            vae_tiling: VaeTiling::default(),
        }
    }
}

/// Where and at what size the job samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct InpaintPlan {
    /// The part of the input that is sampled (the whole image, or the padded mask box).
    pub crop: Rect,
    /// The canvas the UNet sees (a multiple of the VAE factor).
    pub process_width: u32,
    pub process_height: u32,
    pub only_masked: bool,
    /// The native size only-masked mode sizes and shapes the crop by (the model's, or
    /// [`InpaintRequest::native_size`]).
    pub native_width: u32,
    pub native_height: u32,
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct InpaintedImage {
    pub seed: u64,
    pub image: RgbImage,
}

/// What an inpainting job produced.
#[derive(Debug, Clone)]
pub struct InpaintOutput {
    pub images: Vec<InpaintedImage>,
    pub plan: InpaintPlan,
    /// The mask the composite used (feathered, or binarized for `Blend::Diffusers`).
    pub composite_mask: Mask,
    pub unet_kind: UNetKind,
    pub scheduler: SchedulerKind,
    pub timings: StageTimings,
    pub warnings: Vec<String>,
}

/// The mask the job composites with: feathered, then binarized for diffusers' blending.
pub fn composite_mask(mask: &Mask, blur: f64, blend: Blend) -> Mask {
    let blurred = mask.blurred(blur);
    match blend {
        Blend::Kiln => blurred,
        Blend::Diffusers => blurred.binarized(),
    }
}

/// The checks that need no model: the mask fits the image, and leaves something to repaint
/// and something to keep.
pub fn check_inputs(image: &RgbImage, mask: &Mask) -> Result<()> {
    let (w, h) = image.dimensions();
    if (mask.width(), mask.height()) != (w, h) {
        return Err(Error::arg(
            "mask",
            format!(
                "the mask is {}x{} but the image is {w}x{h}; pass --resize-mask to stretch it to the image",
                mask.width(),
                mask.height()
            ),
        ));
    }
    if mask.is_empty() {
        return Err(Error::arg("mask", "the mask is empty (all black): nothing to inpaint"));
    }
    if mask.is_full() {
        return Err(Error::arg(
            "mask",
            "the mask covers the whole image: nothing would be kept; use `kiln generate` instead",
        ));
    }
    Ok(())
}

/// Checks the request before anything heavy runs; returns the composite mask.
pub fn validate(model: &LoadedModel, req: &InpaintRequest) -> Result<Mask> {
    UNetKind::of(model)?;
    check_inputs(&req.image, &req.mask)?;
    req.vae_tiling.validate()?;
    if req.steps == 0 || req.steps > MAX_STEPS {
        return Err(Error::arg("steps", format!("{} is outside 1..={MAX_STEPS}", req.steps)));
    }
    if !req.guidance.is_finite() || req.guidance < 0.0 {
        return Err(Error::arg("guidance", format!("{} must be a finite number >= 0", req.guidance)));
    }
    model.check_true_cfg(req.true_cfg)?;
    if !(req.strength > 0.0 && req.strength <= 1.0) {
        return Err(Error::arg("strength", format!("{} must be in (0, 1]", req.strength)));
    }
    if !req.mask_blur.is_finite() || req.mask_blur < 0.0 || req.mask_blur > 256.0 {
        return Err(Error::arg("mask_blur", format!("{} must be in 0..=256 px", req.mask_blur)));
    }
    if req.seeds.is_empty() {
        return Err(Error::arg("count", "at least one image is needed"));
    }
    let mask = composite_mask(&req.mask, req.mask_blur, req.blend);
    if mask.is_empty() {
        return Err(Error::arg(
            "mask",
            "nothing is left to repaint once binarized at 0.5 (--blend diffusers)",
        ));
    }
    Ok(mask)
}

/// Chooses the region and processing size.
pub fn plan(model: &LoadedModel, req: &InpaintRequest, mask: &Mask) -> Result<InpaintPlan> {
    // The processing canvas snaps to the model's size multiple (VAE factor × latent patch).
    let f = model.size_multiple() as u32;
    let (w, h) = req.image.dimensions();
    let (native_w, native_h) = match req.native_size {
        Some((w, h)) if w >= f && h >= f => (w, h),
        Some((w, h)) => {
            return Err(Error::arg("native size", format!("{w}x{h}: each side must be at least {f} px")))
        }
        None => {
            let (w, h) = model.default_size();
            (w as u32, h as u32)
        }
    };
    let bbox = mask.bbox().ok_or_else(|| Error::arg("mask", "the mask is empty: nothing to inpaint"))?;
    let crop = crop_for(bbox, req.padding, (w, h), (native_w, native_h));
    let only_masked = match req.region {
        Region::Whole => false,
        Region::OnlyMasked => true,
        Region::Auto => {
            (w as u64 * h as u64) > native_w as u64 * native_h as u64
                && crop.area() as f64 <= AUTO_ONLY_MASKED_MAX_SHARE * (w as u64 * h as u64) as f64
        }
    };
    let (crop, pw, ph) = if only_masked {
        // Process at the native pixel count, at the crop's aspect.
        let area = native_w as f64 * native_h as f64;
        let aspect = crop.width as f64 / crop.height as f64;
        let pw = round_to((area * aspect).sqrt(), f);
        let ph = round_to((area / aspect).sqrt(), f);
        (crop, pw, ph)
    } else {
        (Rect { x: 0, y: 0, width: w, height: h }, w.div_ceil(f) * f, h.div_ceil(f) * f)
    };
    for (arg, v) in [("width", pw), ("height", ph)] {
        if v as usize > MAX_GENERATE_SIDE {
            return Err(Error::arg(
                "image",
                format!(
                    "processing {arg} {v} exceeds {MAX_GENERATE_SIDE} px; use only-masked mode with a smaller mask"
                ),
            ));
        }
    }
    Ok(InpaintPlan {
        crop,
        process_width: pw,
        process_height: ph,
        only_masked,
        native_width: native_w,
        native_height: native_h,
    })
}

fn round_to(v: f64, f: u32) -> u32 {
    ((v / f as f64).round() as u32).max(1) * f
}

/// The mask box grown by `padding`, then widened or heightened to the native aspect, kept
/// inside the image (shifted where it would cross an edge).
pub fn crop_for(bbox: Rect, padding: u32, image: (u32, u32), native: (u32, u32)) -> Rect {
    let (w, h) = image;
    let x0 = bbox.x.saturating_sub(padding) as f64;
    let y0 = bbox.y.saturating_sub(padding) as f64;
    let x1 = (bbox.x + bbox.width).saturating_add(padding).min(w) as f64;
    let y1 = (bbox.y + bbox.height).saturating_add(padding).min(h) as f64;
    let (mut cw, mut ch) = (x1 - x0, y1 - y0);
    let aspect = native.0 as f64 / native.1.max(1) as f64;
    if cw / ch < aspect {
        cw = (ch * aspect).min(w as f64);
    } else {
        ch = (cw / aspect).min(h as f64);
    }
    let place = |lo: f64, hi: f64, len: f64, limit: f64| -> f64 {
        let centre = (lo + hi) / 2.0;
        (centre - len / 2.0).clamp(0.0, (limit - len).max(0.0))
    };
    let cx = place(x0, x1, cw, w as f64).floor() as u32;
    let cy = place(y0, y1, ch, h as f64).floor() as u32;
    // Rounding must never cut the mask's box: every repainted pixel lies inside the crop.
    let x_start = cx.min(bbox.x);
    let y_start = cy.min(bbox.y);
    let x_end = (cx + cw.ceil() as u32).max(bbox.x + bbox.width).min(w);
    let y_end = (cy + ch.ceil() as u32).max(bbox.y + bbox.height).min(h);
    Rect { x: x_start, y: y_start, width: x_end - x_start, height: y_end - y_start }
}

/// Runs the job.
pub fn inpaint(
    model: &LoadedModel,
    req: &InpaintRequest,
    progress: &mut dyn Progress,
) -> Result<InpaintOutput> {
    let start = Instant::now();
    let mask = validate(model, req)?;
    let unet_kind = UNetKind::of(model)?;
    let plan = plan(model, req, &mask)?;
    let kind = match req.scheduler {
        Some(k) => k,
        None => model.default_scheduler()?,
    };
    let f = model.vae.scale_factor();
    if let Some(lat) = &req.init_latents {
        let expected = [
            1,
            model.vae.latent_channels(),
            plan.process_height as usize / f,
            plan.process_width as usize / f,
        ];
        if lat.dims() != expected {
            return Err(Error::arg(
                "init_latents",
                format!(
                    "shape {:?}, expected {expected:?} for the {}x{} processing canvas",
                    lat.dims(),
                    plan.process_width,
                    plan.process_height
                ),
            ));
        }
    }
    let true_cfg = model.true_cfg_scale(req.true_cfg, req.negative_prompt.as_deref());
    let cfg = model.classifier_free(req.guidance) || true_cfg.is_some();
    let mut timings = StageTimings::default();
    let t0 = Instant::now();
    let prompts = encode_prompts(model, &req.prompt, req.negative_prompt.as_deref(), cfg)?;
    timings.text_encode = t0.elapsed().as_secs_f64();

    let (canvas_image, canvas_mask) = build_canvas(req, &mask, &plan)?;
    let reimpose = req.reimpose.unwrap_or(unet_kind == UNetKind::Plain);
    let canvas = Canvas {
        image: &canvas_image,
        mask: &canvas_mask,
        blend: req.blend,
        reimpose,
        reimpose_denoised: reimpose && req.reimpose_denoised.unwrap_or(req.blend == Blend::Kiln),
        inflate: req.inflate,
    };
    let sampling = Sampling {
        kind,
        steps: req.steps,
        strength: req.strength,
        guidance: req.guidance,
        cfg,
        true_cfg,
        prompts: &prompts,
        vae_tiling: req.vae_tiling,
    };
    let mut images = Vec::with_capacity(req.seeds.len());
    for &seed in &req.seeds {
        let pixels = sample_canvas(
            model,
            unet_kind,
            &canvas,
            &sampling,
            seed,
            req.init_latents.as_ref(),
            &mut timings,
            progress,
        )?;
        let generated = paste_back(&pixels, &plan, req.image.dimensions())?;
        let image = composite(&req.image, &generated, &mask)?;
        images.push(InpaintedImage { seed, image });
    }
    timings.total = start.elapsed().as_secs_f64();
    Ok(InpaintOutput {
        images,
        plan,
        composite_mask: mask,
        unet_kind,
        scheduler: kind,
        timings,
        warnings: model
            .guidance_warnings(req.guidance, req.true_cfg, req.negative_prompt.as_deref())
            .into_iter()
            .chain(prompts.warnings)
            .collect(),
    })
}

/// Convenience for callers without a progress sink.
pub fn inpaint_quiet(model: &LoadedModel, req: &InpaintRequest) -> Result<InpaintOutput> {
    inpaint(model, req, &mut NoProgress)
}

/// The image and mask the sampler sees: the crop resized to the processing size
/// (only-masked), or the whole image padded by edge replication to the VAE factor.
fn build_canvas(req: &InpaintRequest, mask: &Mask, plan: &InpaintPlan) -> Result<(RgbImage, Mask)> {
    let (pw, ph) = (plan.process_width, plan.process_height);
    let c = plan.crop;
    if plan.only_masked {
        let crop = image::imageops::crop_imm(&req.image, c.x, c.y, c.width, c.height).to_image();
        let image = crate::image::resize_rgb(&crop, pw, ph);
        let mask = mask.crop(c)?.resized(pw, ph)?;
        Ok((image, mask))
    } else {
        let (w, h) = req.image.dimensions();
        let image = RgbImage::from_fn(pw, ph, |x, y| *req.image.get_pixel(x.min(w - 1), y.min(h - 1)));
        Ok((image, mask.padded_to(pw, ph)))
    }
}

/// The sampled canvas ([H, W, 3] in [0, 1]) mapped back onto the input's pixel grid: resized
/// to the crop and placed there (only-masked), or cropped from the padded canvas.
fn paste_back(pixels: &Tensor, plan: &InpaintPlan, size: (u32, u32)) -> Result<Rgb32FImage> {
    let (h, w, _) = pixels.dims3()?;
    let data = pixels.flatten_all()?.to_vec1::<f32>()?;
    let canvas = Rgb32FImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::Unsupported("decoded image buffer size mismatch".into()))?;
    let c = plan.crop;
    let region = if plan.only_masked {
        image::imageops::resize(&canvas, c.width, c.height, image::imageops::FilterType::Lanczos3)
    } else {
        image::imageops::crop_imm(&canvas, 0, 0, c.width, c.height).to_image()
    };
    let mut out = Rgb32FImage::new(size.0, size.1);
    image::imageops::replace(&mut out, &region, c.x as i64, c.y as i64);
    Ok(out)
}
