//! txt2img and img2img with diffusers' semantics: same latents, same order of random draws, same
//! timesteps, so a seed reproduces diffusers' image.

use crate::error::{Error, Result};
use crate::image::{decoded_to_unit, rgb_to_tensor};
use crate::models::denoiser::DenoiserCond;
use crate::pipeline::model::LoadedModel;
use crate::pipeline::text::{encode_prompts_with, EncodedPrompts};
use crate::pipeline::vae_tiling::VaeTiling;
use crate::rng::BatchRng;
use crate::schedule::{Scheduler, SchedulerKind};
use candle_core::{DType, Tensor};
use image::RgbImage;
use std::time::Instant;

/// Largest width/height kiln generates at (latent area grows quadratically; refuse early).
pub const MAX_GENERATE_SIDE: usize = 4096;
/// Largest step count accepted.
pub const MAX_STEPS: usize = 1000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// FLUX's optional true classifier-free guidance (diffusers' `true_cfg_scale`): with a
    /// negative prompt and a value > 1 the transformer also runs on the negative prompt and
    /// the prediction is `neg + s·(pos − neg)`; `guidance` stays the distilled guidance.
    /// Only guidance-distilled families take it.
    pub true_cfg: Option<f64>,
    /// Release the text encoders once the prompts are encoded, so they are not resident while
    /// the denoiser runs; the next job that encodes loads them again ([`crate::pipeline::text_encoders`]).
    pub offload_text_encoders: bool,
    /// None = the folder's own scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// One seed per image; image i uses its own generator seeded with seeds[i].
    pub seeds: Vec<u64>,
    /// Unit-normal starting noise [1 or N, C, H/f, W/f], scaled by the scheduler's initial sigma.
    pub init_latents: Option<Tensor>,
    /// img2img: the init image (resized to width×height) and the strength in (0, 1].
    pub init_image: Option<RgbImage>,
    pub strength: f64,
    /// Images per UNet batch (memory bound); at least 1.
    pub max_batch: usize,
    /// Untiled or tiled VAE decode/encode (`--vae-tiling`, `--vae-tile`).
    pub vae_tiling: VaeTiling,
    /// `--max-sequence-length`: the long-context text encoder's token budget (None = the
    /// family's default; only families with such an encoder accept it).
    pub max_sequence_length: Option<usize>,
}

/// Seconds per stage.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StageTimings {
    pub text_encode: f64,
    pub vae_encode: f64,
    pub steps: Vec<f64>,
    pub vae_decode: f64,
    pub total: f64,
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub seed: u64,
    /// [H, W, 3] float in [0, 1] on the CPU (diffusers' `output_type="np"`).
    pub pixels: Tensor,
    /// Set when the model's f16 VAE overflowed and the image was decoded again in this dtype.
    pub vae_fallback: Option<DType>,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub images: Vec<GeneratedImage>,
    pub scheduler: SchedulerKind,
    pub timings: StageTimings,
    pub warnings: Vec<String>,
}

/// Receives progress events (the CLI draws a bar; the job layer streams them) and can stop
/// the work: [`Progress::cancelled`] is asked after every step, so a job stops within one step.
pub trait Progress {
    /// `done` of `total` denoising steps finished; the last one took `seconds`.
    fn step(&mut self, done: usize, total: usize, seconds: f64);

    /// A stage ("text_encode", "vae_encode", "denoise", "vae_decode") starts.
    fn stage(&mut self, _stage: &str) {}

    /// The next steps belong to images `first..first + count` of the request.
    fn batch(&mut self, _first: usize, _count: usize) {}

    /// Whether the job must stop now (checked after every step). Default: never.
    fn cancelled(&mut self) -> bool {
        false
    }

    /// Whether the sink wants the latents after step `done` (for a preview). Default: no, so
    /// nothing is copied off the device.
    fn wants_preview(&mut self, _done: usize, _total: usize) -> bool {
        false
    }

    /// The latents `[B, C, h, w]` after step `done`, when [`Progress::wants_preview`] said yes.
    fn preview(&mut self, _done: usize, _latents: &Tensor) {}
}

/// A no-op progress sink.
pub struct NoProgress;
impl Progress for NoProgress {
    fn step(&mut self, _: usize, _: usize, _: f64) {}
}

impl GenerateRequest {
    /// txt2img of one image from `seed` with the model's own scheduler and every other option
    /// at its default (change fields with struct update syntax).
    pub fn txt2img(
        prompt: &str,
        (width, height): (usize, usize),
        steps: usize,
        guidance: f64,
        seed: u64,
    ) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: None,
            width,
            height,
            steps,
            guidance,
            true_cfg: None,
            offload_text_encoders: false,
            scheduler: None,
            seeds: vec![seed],
            init_latents: None,
            init_image: None,
            strength: 1.0,
            max_batch: 1,
            vae_tiling: VaeTiling::default(),
            max_sequence_length: None,
        }
    }

    /// Checks the request against the model before anything is allocated.
    pub fn validate(&self, model: &LoadedModel) -> Result<()> {
        let f = model.vae.scale_factor();
        let multiple = model.size_multiple();
        for (arg, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % multiple != 0 {
                let what = if multiple == f {
                    format!("the VAE factor {f}")
                } else {
                    format!("{multiple} (the VAE factor {f} times the {} latent patch)", model.spec.name)
                };
                return Err(Error::arg(arg, format!("{v} is not a positive multiple of {what}")));
            }
            if v > MAX_GENERATE_SIDE {
                return Err(Error::arg(
                    arg,
                    format!("{v} exceeds the {MAX_GENERATE_SIDE} px limit; upscale instead"),
                ));
            }
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(Error::arg("steps", format!("{} is outside 1..={MAX_STEPS}", self.steps)));
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Err(Error::arg("guidance", format!("{} must be a finite number >= 0", self.guidance)));
        }
        model.check_true_cfg(self.true_cfg)?;
        if self.seeds.is_empty() {
            return Err(Error::arg("count", "at least one image is needed"));
        }
        self.vae_tiling.validate()?;
        if self.init_image.is_some() && !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::arg("strength", format!("{} must be in (0, 1]", self.strength)));
        }
        if let Some(lat) = &self.init_latents {
            let expected = [model.vae.latent_channels(), self.height / f, self.width / f];
            let dims = lat.dims();
            let n_ok = dims.first().is_some_and(|&n| n == 1 || n == self.seeds.len());
            if dims.len() != 4 || !n_ok || dims[1..] != expected {
                return Err(Error::arg(
                    "init_latents",
                    format!(
                        "shape {dims:?}, expected [1, {}, {}, {}] (or a batch of {}) for {}x{}",
                        expected[0],
                        expected[1],
                        expected[2],
                        self.seeds.len(),
                        self.width,
                        self.height
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Runs txt2img (or img2img when `init_image` is set).
pub fn generate(
    model: &LoadedModel,
    req: &GenerateRequest,
    progress: &mut dyn Progress,
) -> Result<GenerateOutput> {
    req.validate(model)?;
    let start = Instant::now();
    let kind = match req.scheduler {
        Some(k) => k,
        None => model.default_scheduler()?,
    };
    let true_cfg = model.true_cfg_scale(req.true_cfg, req.negative_prompt.as_deref());
    let cfg = model.classifier_free(req.guidance) || true_cfg.is_some();
    let mut timings = StageTimings::default();

    if progress.cancelled() {
        return Err(Error::Cancelled);
    }
    progress.stage("text_encode");
    let t0 = Instant::now();
    let prompts = encode_prompts_with(
        model,
        &req.prompt,
        req.negative_prompt.as_deref(),
        cfg,
        req.max_sequence_length,
    )?;
    if req.offload_text_encoders {
        model.text.release();
    }
    timings.text_encode = t0.elapsed().as_secs_f64();

    let init_image = match &req.init_image {
        Some(img) => {
            let img = crate::image::resize_rgb(img, req.width as u32, req.height as u32);
            Some(rgb_to_tensor(&img, &model.device, model.dtype)?)
        }
        None => None,
    };

    let mut images = Vec::with_capacity(req.seeds.len());
    let max_batch = req.max_batch.max(1);
    let mut first = 0;
    for seeds in req.seeds.chunks(max_batch) {
        progress.batch(first, seeds.len());
        let latents_in = match &req.init_latents {
            Some(l) if l.dim(0)? > 1 => Some(l.narrow(0, first, seeds.len())?),
            Some(l) => Some(l.repeat((seeds.len(), 1, 1, 1))?),
            None => None,
        };
        let batch = run_batch(
            model,
            req,
            kind,
            &prompts,
            cfg,
            seeds,
            latents_in,
            init_image.as_ref(),
            &mut timings,
            progress,
        )?;
        images.extend(batch);
        first += seeds.len();
    }
    timings.total = start.elapsed().as_secs_f64();
    let mut warnings = model.guidance_warnings(req.guidance, req.true_cfg, req.negative_prompt.as_deref());
    warnings.extend(prompts.warnings);
    warnings.extend(images.iter().filter_map(vae_fallback_warning));
    Ok(GenerateOutput { images, scheduler: kind, timings, warnings })
}

#[allow(clippy::too_many_arguments)]
fn run_batch(
    model: &LoadedModel,
    req: &GenerateRequest,
    kind: SchedulerKind,
    prompts: &EncodedPrompts,
    cfg: bool,
    seeds: &[u64],
    init_latents: Option<Tensor>,
    init_image: Option<&Tensor>,
    timings: &mut StageTimings,
    progress: &mut dyn Progress,
) -> Result<Vec<GeneratedImage>> {
    let device = &model.device;
    let dtype = model.dtype;
    let b = seeds.len();
    let f = model.vae.scale_factor();
    let latent_shape = [model.vae.latent_channels(), req.height / f, req.width / f];
    let mut rng = BatchRng::new(seeds);
    let mut scheduler = model.build_scheduler(kind, req.steps, latent_shape[1], latent_shape[2])?;
    let timesteps = scheduler.timesteps().to_vec();

    // diffusers' order of draws: img2img samples the VAE latent distribution, then the noise.
    let (latents, first_step) = match init_image {
        Some(image) => {
            let encoded = encode_sampled(model, image, &req.vae_tiling, &mut rng, timings, progress)?;
            let start = model.spec.strength_start(req.steps, req.strength);
            if start >= timesteps.len() {
                return Err(Error::arg("strength", format!("{} leaves no denoising steps", req.strength)));
            }
            let noise = match init_latents {
                Some(l) => l.to_device(device)?.to_dtype(dtype)?,
                None => rng.randn(&latent_shape, device, dtype)?,
            };
            (scheduler.add_noise(&encoded, &noise, start)?, start)
        }
        None => {
            let noise = match init_latents {
                Some(l) => l.to_device(device)?.to_dtype(dtype)?,
                None => rng.randn(&latent_shape, device, dtype)?,
            };
            ((noise * scheduler.init_noise_sigma())?, 0)
        }
    };

    let true_cfg = model.true_cfg_scale(req.true_cfg, req.negative_prompt.as_deref());
    let conditioning =
        Conditioning::new(model, prompts, b, (cfg, true_cfg), req.guidance, req.width, req.height)?;
    progress.stage("denoise");
    let latents = denoise(
        model,
        scheduler.as_mut(),
        &conditioning,
        latents,
        first_step,
        &mut rng,
        &mut PlainLoop,
        timings,
        progress,
    )?;
    progress.stage("vae_decode");
    decode_batch(model, &latents, seeds, &req.vae_tiling, timings, progress)
}

/// Everything the denoiser is conditioned on besides the sample, for one batch of `b` images.
pub(crate) struct Conditioning {
    hidden: Tensor,
    pooled: Option<Tensor>,
    time_ids: Option<Tensor>,
    /// The guidance the denoiser embeds itself (LCM's w-embedding, FLUX.1-dev's guidance).
    embedded_guidance: Option<Tensor>,
    /// Real tokens per row when the negative and positive sequences differ in length (Z-Image
    /// keeps each prompt's own length); the shorter rows are zero-padded past theirs.
    token_lens: Option<Vec<usize>>,
    cfg: bool,
    guidance: f64,
    batch: usize,
}

impl Conditioning {
    /// Text embeddings (negatives first under CFG), SDXL size ids for a `width`×`height` output
    /// and the embedded guidance (LCM, FLUX.1-dev), as diffusers builds them. `cfg` is (whether
    /// a negative pass runs, FLUX's true-CFG scale when that is why).
    pub(crate) fn new(
        model: &LoadedModel,
        prompts: &EncodedPrompts,
        b: usize,
        cfg: (bool, Option<f64>),
        guidance: f64,
        width: usize,
        height: usize,
    ) -> Result<Self> {
        let device = &model.device;
        let (cfg, true_cfg) = cfg;
        let (hidden, pooled, token_lens) = batch_conditioning(prompts, b, cfg)?;
        // (original size, crop top-left, target size): diffusers' defaults for txt2img/img2img.
        let (h, w) = (height as f32, width as f32);
        let time_ids = size_ids(model, &vec![[h, w, 0.0, 0.0, h, w]; b], cfg)?;
        // Under true CFG both passes embed the same distilled guidance (FluxPipeline).
        let rows = if cfg { 2 * b } else { b };
        let embedded_guidance = model.denoiser.guidance_input(guidance, rows, device)?;
        // The scale of `neg + s·(pos − neg)`: FLUX's true-CFG scale, else the family's
        // guidance (Z-Image: g + 1).
        let guidance = true_cfg.unwrap_or_else(|| model.spec.cfg_scale(guidance));
        Ok(Self { hidden, pooled, time_ids, embedded_guidance, token_lens, cfg, guidance, batch: b })
    }
}

/// SDXL's size conditioning for a batch, one `[original h, w, crop top, left, target h, w]` row
/// per image (repeated for the negatives under CFG); None for families without it.
pub(crate) fn size_ids(model: &LoadedModel, rows: &[[f32; 6]], cfg: bool) -> Result<Option<Tensor>> {
    if !model.spec.size_conditioning {
        return Ok(None);
    }
    let copies = if cfg { 2 } else { 1 };
    let data: Vec<f32> = (0..copies).flat_map(|_| rows.iter().flatten().copied()).collect();
    Ok(Some(Tensor::from_vec(data, (copies * rows.len(), 6), &model.device)?.to_dtype(model.dtype)?))
}

impl Conditioning {
    /// The guided noise prediction for `latents` ([batch, C, h, w]) at step `i`: the
    /// scheduler's input scaling, the denoiser (on negatives and positives together under CFG,
    /// with `extra` channels appended), and the guidance combination.
    pub(crate) fn predict(
        &self,
        model: &LoadedModel,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        i: usize,
        extra: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.predict_with_ids(model, scheduler, latents, i, extra, None)
    }

    /// [`Conditioning::predict`] with other size ids than the batch's own (re-detail tiles,
    /// each a crop of a larger image: see [`size_ids`]).
    pub(crate) fn predict_with_ids(
        &self,
        model: &LoadedModel,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        i: usize,
        extra: Option<&Tensor>,
        time_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = self.batch;
        let model_in = if self.cfg { Tensor::cat(&[latents, latents], 0)? } else { latents.clone() };
        let mut model_in = scheduler.scale_model_input(&model_in, i)?;
        if let Some(extra) = extra {
            model_in = Tensor::cat(&[&model_in, extra], 1)?;
        }
        let denoiser_cond = DenoiserCond {
            tokens: &self.hidden,
            pooled: self.pooled.as_ref(),
            time_ids: time_ids.or(self.time_ids.as_ref()),
            guidance: self.embedded_guidance.as_ref(),
            token_lens: self.token_lens.as_deref(),
        };
        let t = crate::schedule::at(scheduler.timesteps(), i, "timesteps")?;
        let pred = model.denoiser.predict(&model_in, t, &denoiser_cond)?;
        Ok(if self.cfg {
            let uncond = pred.narrow(0, 0, b)?;
            let text = pred.narrow(0, b, b)?;
            (&uncond + ((text - &uncond)? * self.guidance)?)?
        } else {
            pred
        })
    }
}

/// What a pipeline adds to the plain denoising loop (inpainting's extra UNet channels and
/// re-imposed known latents).
pub(crate) trait LoopHooks {
    /// Channels appended to the scaled UNet input (already doubled for CFG), as 9-channel
    /// inpainting UNets take the mask and the masked image's latents.
    fn extra_input(&self) -> Option<&Tensor> {
        None
    }
    /// Called after the solver step at absolute index `i`; returns the latents to carry on with.
    fn after_step(&mut self, _scheduler: &dyn Scheduler, _i: usize, latents: Tensor) -> Result<Tensor> {
        Ok(latents)
    }
    /// Whether [`LoopHooks::denoised`] should be handed to the solver at all (plain loops keep
    /// calling `Scheduler::step`).
    fn transforms_denoised(&self) -> bool {
        false
    }
    /// Transforms the solver's clean-sample estimate at step `i` (float32, the sample's shape).
    fn denoised(&mut self, _i: usize, x0: Tensor) -> Result<Tensor> {
        Ok(x0)
    }
}

/// txt2img/img2img: no hooks.
pub(crate) struct PlainLoop;
impl LoopHooks for PlainLoop {}

/// diffusers' denoising loop from `first_step` to the end of the schedule.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise(
    model: &LoadedModel,
    scheduler: &mut dyn Scheduler,
    cond: &Conditioning,
    mut latents: Tensor,
    first_step: usize,
    rng: &mut BatchRng,
    hooks: &mut dyn LoopHooks,
    timings: &mut StageTimings,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len().saturating_sub(first_step);
    for (done, i) in (first_step..timesteps.len()).enumerate() {
        let t0 = Instant::now();
        let pred = cond.predict(model, scheduler, &latents, i, hooks.extra_input())?;
        latents = if hooks.transforms_denoised() {
            scheduler.step_with_denoised(&pred, i, &latents, rng, &mut |x0| hooks.denoised(i, x0))?
        } else {
            scheduler.step(&pred, i, &latents, rng)?
        };
        latents = hooks.after_step(scheduler, i, latents)?;
        let secs = t0.elapsed().as_secs_f64();
        timings.steps.push(secs);
        progress.step(done + 1, total, secs);
        if progress.wants_preview(done + 1, total) {
            progress.preview(done + 1, &latents);
        }
        if progress.cancelled() {
            return Err(Error::Cancelled);
        }
    }
    Ok(latents)
}

/// VAE-encodes `image` ([1, 3, H, W] in [-1, 1]) and samples the latent distribution with one
/// draw per batch item (diffusers' `retrieve_latents(..., sample_mode="sample")`), scaled and
/// shifted for the UNet: [B, C, H/f, W/f].
pub(crate) fn encode_sampled(
    model: &LoadedModel,
    image: &Tensor,
    tiling: &VaeTiling,
    rng: &mut BatchRng,
    timings: &mut StageTimings,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let t0 = Instant::now();
    let b = rng.len();
    let vae_cfg = model.vae.config();
    let dist = tiling.encode(&model.vae, image, &mut || progress.cancelled())?;
    let latent_shape = dist.mean.dims()[1..].to_vec();
    let dist_noise = rng.randn(&latent_shape, &model.device, model.dtype)?;
    let mean = dist.mean.repeat((b, 1, 1, 1))?;
    let std = dist.std.repeat((b, 1, 1, 1))?;
    let encoded = (mean + (std * dist_noise)?)?;
    let encoded = ((encoded - vae_cfg.shift_factor.unwrap_or(0.0))? * vae_cfg.scaling_factor)?;
    timings.vae_encode += t0.elapsed().as_secs_f64();
    Ok(encoded)
}

/// Decodes final latents one image at a time into [H, W, 3] images in [0, 1].
///
/// An f16 VAE can overflow (SD/SDXL's decoders do at large activations) and return NaN/inf, a
/// black image: such an image is decoded again from the same latents in an overflow-safe dtype
/// ([`LoadedModel::vae_upcast`]) and marked in [`GeneratedImage::vae_fallback`]. Non-finite output
/// that no fallback can fix is an error, never a silent black image.
pub fn decode_batch(
    model: &LoadedModel,
    latents: &Tensor,
    seeds: &[u64],
    tiling: &VaeTiling,
    timings: &mut StageTimings,
    progress: &mut dyn Progress,
) -> Result<Vec<GeneratedImage>> {
    let vae_cfg = model.vae.config();
    let scaling = vae_cfg.scaling_factor;
    let shift = vae_cfg.shift_factor.unwrap_or(0.0);
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(seeds.len());
    for (k, seed) in seeds.iter().enumerate() {
        // One image at a time: the decoder's activations dominate memory at large sizes.
        let latent = latents.narrow(0, k, 1)?;
        let unscale = |l: &Tensor| -> Result<Tensor> { Ok(((l / scaling)? + shift)?) };
        let mut decoded = tiling.decode(&model.vae, &unscale(&latent)?, &mut || progress.cancelled())?;
        let mut vae_fallback = None;
        if !is_finite(&decoded)? && model.vae.dtype() == DType::F16 {
            // Upcast before unscaling, so the wider dtype sees the latents as the sampler left them.
            let vae = model.vae_upcast()?;
            decoded = tiling
                .decode(vae, &unscale(&latent.to_dtype(vae.dtype())?)?, &mut || progress.cancelled())?;
            vae_fallback = Some(vae.dtype());
        }
        if !is_finite(&decoded)? {
            let hint = match decoded.dtype() {
                DType::F32 => "the model's weights or the starting latents hold NaN/inf; check the model files and --init-latents",
                _ => "retry with --dtype f32",
            };
            return Err(Error::Unsupported(format!(
                "the decoded image contains NaN/inf in {}; {hint}",
                crate::device::dtype_name(decoded.dtype())
            )));
        }
        let unit = decoded_to_unit(&decoded)?.squeeze(0)?;
        out.push(GeneratedImage { seed: *seed, pixels: unit, vae_fallback });
    }
    timings.vae_decode += t0.elapsed().as_secs_f64();
    Ok(out)
}

/// The warning for an image whose VAE decode fell back to a wider dtype.
pub fn vae_fallback_warning(image: &GeneratedImage) -> Option<String> {
    image.vae_fallback.map(|dtype| {
        format!(
            "seed {}: the f16 VAE decode overflowed (NaN/inf); decoded again in {}",
            image.seed,
            crate::device::dtype_name(dtype)
        )
    })
}

/// The denoiser's token sequences (and SDXL text_embeds) for a batch of `b`, negatives first;
/// with the real lengths per row when the negative and positive sequences differ in length.
type BatchConditioning = (Tensor, Option<Tensor>, Option<Vec<usize>>);

fn batch_conditioning(prompts: &EncodedPrompts, b: usize, cfg: bool) -> Result<BatchConditioning> {
    let pos = &prompts.positive;
    let rep = |t: &Tensor| -> Result<Tensor> {
        let mut dims = vec![b];
        dims.extend(std::iter::repeat_n(1, t.rank() - 1));
        Ok(t.repeat(dims.as_slice())?)
    };
    match (&prompts.negative, cfg) {
        (Some(neg), true) => {
            let (n_neg, n_pos) = (neg.hidden.dim(1)?, pos.hidden.dim(1)?);
            let (hidden, lens) = if n_neg == n_pos {
                (Tensor::cat(&[rep(&neg.hidden)?, rep(&pos.hidden)?], 0)?, None)
            } else {
                let n = n_neg.max(n_pos);
                let lens = [vec![n_neg; b], vec![n_pos; b]].concat();
                let hidden = Tensor::cat(
                    &[rep(&pad_tokens(&neg.hidden, n)?)?, rep(&pad_tokens(&pos.hidden, n)?)?],
                    0,
                )?;
                (hidden, Some(lens))
            };
            let pooled = match (&neg.pooled, &pos.pooled) {
                (Some(n), Some(p)) => Some(Tensor::cat(&[rep(n)?, rep(p)?], 0)?),
                _ => None,
            };
            Ok((hidden, pooled, lens))
        }
        _ => Ok((rep(&pos.hidden)?, pos.pooled.as_ref().map(rep).transpose()?, None)),
    }
}

/// `[1, L, D]` tokens zero-padded to `n`.
fn pad_tokens(hidden: &Tensor, n: usize) -> Result<Tensor> {
    let (b, l, d) = hidden.dims3()?;
    if l == n {
        return Ok(hidden.clone());
    }
    let zeros = Tensor::zeros((b, n - l, d), hidden.dtype(), hidden.device())?;
    Ok(Tensor::cat(&[hidden, &zeros], 1)?)
}

/// Whether every value is finite (an f16 overflow leaves inf, and NaN after the next op).
fn is_finite(image: &Tensor) -> Result<bool> {
    // inf - inf = NaN and NaN propagates: one reduction in f32 answers for every element.
    let sum = image.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(sum.is_finite())
}
