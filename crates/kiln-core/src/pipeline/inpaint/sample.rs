//! Masked sampling on one processing canvas (a multiple of the VAE factor): diffusers'
//! StableDiffusionInpaintPipeline for 9-channel UNets, and re-imposition of the known latents
//! for ordinary 4-channel ones.

use super::Blend;
use crate::error::{Error, Result};
use crate::image::mask::Mask;
use crate::image::rgb_to_tensor;
use crate::pipeline::generate::{
    decode_batch, denoise, encode_sampled, Conditioning, LoopHooks, Progress, StageTimings,
};
use crate::pipeline::model::LoadedModel;
use crate::pipeline::text::EncodedPrompts;
use crate::pipeline::vae_tiling::VaeTiling;
use crate::rng::BatchRng;
use crate::schedule::{Scheduler, SchedulerKind};
use candle_core::Tensor;
use image::RgbImage;

/// How the UNet takes the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNetKind {
    /// Ordinary text-to-image UNet (in_channels = latent channels): masked sampling only.
    Plain,
    /// Dedicated inpainting UNet: latents + mask + masked-image latents (2C + 1 channels).
    Inpaint,
}

impl UNetKind {
    /// Classifies the model's UNet, or says why it cannot inpaint.
    pub fn of(model: &LoadedModel) -> Result<Self> {
        let c = model.vae.latent_channels();
        match model.denoiser.in_channels() {
            n if n == c => Ok(Self::Plain),
            n if n == 2 * c + 1 => Ok(Self::Inpaint),
            n => Err(Error::Unsupported(format!(
                "a UNet with {n} input channels: inpainting needs {c} (any model) or {} (a dedicated \
                 inpainting model)",
                2 * c + 1
            ))),
        }
    }
}

/// One canvas to sample.
pub(crate) struct Canvas<'a> {
    pub image: &'a RgbImage,
    /// Repaint weights at the canvas size (already feathered or binarized per `blend`).
    pub mask: &'a Mask,
    pub blend: Blend,
    /// Re-impose the known latents after each step.
    pub reimpose: bool,
    /// Re-impose the clean known latents on the solver's x0 estimate too.
    pub reimpose_denoised: bool,
    /// Latent pixels the kiln latent mask grows by.
    pub inflate: u32,
}

/// Sampler settings shared by every seed.
pub(crate) struct Sampling<'a> {
    pub kind: SchedulerKind,
    pub steps: usize,
    pub strength: f64,
    pub guidance: f64,
    pub cfg: bool,
    /// FLUX's true-CFG scale when a negative pass runs for it.
    pub true_cfg: Option<f64>,
    pub prompts: &'a EncodedPrompts,
    pub vae_tiling: VaeTiling,
}

/// Re-imposes `known` (noised to the next step's level) wherever the latent mask is below 1.
struct Reimpose {
    known: Tensor,
    noise: Tensor,
    /// [1, 1, h, w] repaint weights; the region it leaves (1 - m) gets the known latents.
    mask: Tensor,
    keep: Tensor,
    extra: Option<Tensor>,
    enabled: bool,
    /// (known, keep, mask) in float32 for the x0 estimate; None = leave the solver's alone.
    denoised: Option<(Tensor, Tensor, Tensor)>,
}

impl LoopHooks for Reimpose {
    fn extra_input(&self) -> Option<&Tensor> {
        self.extra.as_ref()
    }

    fn after_step(&mut self, scheduler: &dyn Scheduler, i: usize, latents: Tensor) -> Result<Tensor> {
        if !self.enabled {
            return Ok(latents);
        }
        // diffusers: the known latents noised to the *next* timestep, clean after the last one.
        let known = if i + 1 < scheduler.timesteps().len() {
            scheduler.add_noise(&self.known, &self.noise, i + 1)?
        } else {
            self.known.clone()
        };
        let kept = known.broadcast_mul(&self.keep)?;
        Ok((kept + latents.broadcast_mul(&self.mask)?)?)
    }

    fn transforms_denoised(&self) -> bool {
        self.denoised.is_some()
    }

    /// The x0 estimate's known region is the clean known latents themselves: a soft mask's
    /// partly-kept latents then step towards the original rather than towards the model's guess.
    fn denoised(&mut self, _i: usize, x0: Tensor) -> Result<Tensor> {
        match &self.denoised {
            Some((known, keep, mask)) => Ok((known.broadcast_mul(keep)? + x0.broadcast_mul(mask)?)?),
            None => Ok(x0),
        }
    }
}

/// Samples one seed on `canvas`; returns [H, W, 3] floats in [0, 1] (before the composite).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sample_canvas(
    model: &LoadedModel,
    unet_kind: UNetKind,
    canvas: &Canvas,
    sampling: &Sampling,
    seed: u64,
    init_latents: Option<&Tensor>,
    timings: &mut StageTimings,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let device = &model.device;
    let dtype = model.dtype;
    let f = model.vae.scale_factor();
    let multiple = model.size_multiple();
    let (width, height) = (canvas.image.width() as usize, canvas.image.height() as usize);
    if width % multiple != 0
        || height % multiple != 0
        || (canvas.mask.width(), canvas.mask.height()) != canvas.image.dimensions()
    {
        return Err(Error::arg(
            "canvas",
            format!(
                "{width}x{height} image with a {}x{} mask (both must match and be multiples of {multiple})",
                canvas.mask.width(),
                canvas.mask.height()
            ),
        ));
    }
    let latent_shape = [model.vae.latent_channels(), height / f, width / f];
    let mut rng = BatchRng::new(&[seed]);
    let mut scheduler =
        model.build_scheduler(sampling.kind, sampling.steps, latent_shape[1], latent_shape[2])?;
    let start = model.spec.strength_start(sampling.steps, sampling.strength);
    if start >= scheduler.timesteps().len() {
        return Err(Error::arg("strength", format!("{} leaves no denoising steps", sampling.strength)));
    }
    let full_strength = sampling.strength >= 1.0;
    let image = rgb_to_tensor(canvas.image, device, dtype)?;

    // diffusers' order of draws: the image's latent sample (4-channel UNets, or any strength
    // below 1), the starting noise, then the masked image's latent sample.
    let needs_image_latents = unet_kind == UNetKind::Plain || !full_strength;
    let image_latents = if needs_image_latents {
        Some(encode_sampled(model, &image, &sampling.vae_tiling, &mut rng, timings, progress)?)
    } else {
        None
    };
    let noise = match init_latents {
        Some(l) => l.to_device(device)?.to_dtype(dtype)?,
        None => rng.randn(&latent_shape, device, dtype)?,
    };
    let latents = match (&image_latents, full_strength) {
        (Some(known), false) => scheduler.add_noise(known, &noise, start)?,
        _ => (&noise * scheduler.init_noise_sigma())?,
    };

    // The 9-channel UNet's conditioning, exactly as diffusers builds it: a binary mask
    // (nearest-downsampled) and the image with the repainted part set to 0 (mid-grey).
    let binary = canvas.mask.binarized();
    let masked_keep = binary.to_tensor(device, dtype)?.affine(-1.0, 1.0)?;
    let masked_image = image.broadcast_mul(&masked_keep)?;
    let extra = match unet_kind {
        UNetKind::Inpaint => {
            let masked_latents =
                encode_sampled(model, &masked_image, &sampling.vae_tiling, &mut rng, timings, progress)?;
            let mask_latent = match canvas.blend {
                Blend::Diffusers => binary.latent_nearest(f as u32, device, dtype)?,
                Blend::Kiln => binary.latent_max_pool(f as u32, 0, device, dtype)?,
            };
            let one = Tensor::cat(&[&mask_latent, &masked_latents], 1)?;
            Some(if sampling.cfg { Tensor::cat(&[&one, &one], 0)? } else { one })
        }
        UNetKind::Plain => {
            // diffusers encodes the masked image for 4-channel UNets too (and discards it):
            // draw the same noise so later draws (ancestral steps) stay aligned.
            rng.randn(&latent_shape, device, dtype)?;
            None
        }
    };

    let reimpose_mask = match canvas.blend {
        Blend::Diffusers => binary.latent_nearest(f as u32, device, dtype)?,
        Blend::Kiln => canvas.mask.latent_max_pool(f as u32, canvas.inflate, device, dtype)?,
    };
    let known = match image_latents {
        Some(k) => k,
        // A 9-channel run at full strength asked to re-impose: encode now (no draw: the mean).
        None if canvas.reimpose => {
            let dist = sampling.vae_tiling.encode(&model.vae, &image, &mut || progress.cancelled())?;
            let cfg = model.vae.config();
            ((dist.mean - cfg.shift_factor.unwrap_or(0.0))? * cfg.scaling_factor)?
        }
        None => noise.zeros_like()?,
    };
    let keep = reimpose_mask.affine(-1.0, 1.0)?;
    let f32 = candle_core::DType::F32;
    let denoised = if canvas.reimpose_denoised {
        Some((known.to_dtype(f32)?, keep.to_dtype(f32)?, reimpose_mask.to_dtype(f32)?))
    } else {
        None
    };
    let mut hooks =
        Reimpose { known, noise, keep, mask: reimpose_mask, extra, enabled: canvas.reimpose, denoised };
    let cond = Conditioning::new(
        model,
        sampling.prompts,
        1,
        (sampling.cfg, sampling.true_cfg),
        sampling.guidance,
        width,
        height,
    )?;
    let latents =
        denoise(model, scheduler.as_mut(), &cond, latents, start, &mut rng, &mut hooks, timings, progress)?;
    let mut images = decode_batch(model, &latents, &[seed], &sampling.vae_tiling, timings, progress)?;
    images.pop().map(|g| g.pixels).ok_or_else(|| Error::Unsupported("the decoder returned no image".into()))
}
