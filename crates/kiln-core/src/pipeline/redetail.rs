//! Diffusion re-detail of a large image (after super-resolution): img2img at a low strength
//! where, at every step, the denoiser runs on overlapping latent tiles and their predictions
//! are blended into **one global prediction** before the scheduler steps (MultiDiffusion). The
//! latent stays one image, so neighbouring tiles agree at every step and no seam can form, unlike
//! a per-tile img2img (Ultimate SD Upscale) whose tiles are denoised apart and pasted.
//!
//! With one tile covering the image this is exactly the img2img pipeline (same draws, same
//! solver), which is how it is checked against diffusers.

use crate::error::{Error, Result};
use crate::image::rgb_to_tensor;
use crate::pipeline::generate::{
    decode_batch, encode_sampled, Conditioning, GeneratedImage, Progress, StageTimings,
};
use crate::pipeline::model::LoadedModel;
use crate::pipeline::text::encode_prompts;
use crate::pipeline::vae_tiling::VaeTiling;
use crate::rng::BatchRng;
use crate::schedule::SchedulerKind;
use candle_core::{DType, Tensor};
use image::RgbImage;
use std::time::Instant;

/// Default denoiser tile in latent pixels (512 image pixels for an 8× VAE: the SD 1.x/Turbo
/// native size) and the overlap between neighbouring tiles.
pub const DEFAULT_TILE: usize = 64;
pub const DEFAULT_OVERLAP: usize = 16;
/// Tiles per denoiser call (batched; bounds the activations' memory).
const TILES_PER_CALL: usize = 4;

#[derive(Debug, Clone)]
pub struct RedetailRequest {
    /// The image at its final size (sides multiples of the VAE factor), usually a
    /// super-resolution output.
    pub image: RgbImage,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    /// How far the result may depart from `image`, in (0, 1]; 0.2–0.5 adds detail and keeps
    /// the composition.
    pub strength: f64,
    pub guidance: f64,
    /// FLUX's true classifier-free guidance (diffusers' `true_cfg_scale`): with a negative
    /// prompt and a scale > 1 each tile also runs a negative pass, as in generate.
    pub true_cfg: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// Denoiser tile side and overlap, in latent pixels.
    pub tile: usize,
    pub overlap: usize,
    pub vae_tiling: VaeTiling,
}

/// What [`redetail`] produced.
#[derive(Debug)]
pub struct RedetailOutput {
    pub image: GeneratedImage,
    pub scheduler: SchedulerKind,
    pub timings: StageTimings,
    /// Latent tiles per step (rows × columns).
    pub tiles: (usize, usize),
    pub warnings: Vec<String>,
}

/// Start offsets of equal windows of `tile` covering `0..len` with at least `overlap` shared
/// between neighbours; one window of `len` when the image is no larger than a tile.
pub fn windows(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile.saturating_sub(overlap).max(1);
    let n = (len - overlap).div_ceil(stride).max(2);
    (0..n).map(|k| ((k * (len - tile)) as f64 / (n - 1) as f64).round() as usize).collect()
}

/// Blend weight of position `x` in a window of `size`: a linear ramp over `ramp` pixels at
/// both ends, never zero, so every latent pixel has weight and overlaps cross-fade.
fn ramp_weight(x: usize, size: usize, ramp: usize) -> f32 {
    let ramp = ramp.max(1);
    ((x + 1).min(size - x).min(ramp)) as f32 / ramp as f32
}

pub fn redetail(
    model: &LoadedModel,
    req: &RedetailRequest,
    progress: &mut dyn Progress,
) -> Result<RedetailOutput> {
    let f = model.vae.scale_factor();
    let (width, height) = (req.image.width() as usize, req.image.height() as usize);
    if width % f != 0 || height % f != 0 || width == 0 || height == 0 {
        return Err(Error::arg("size", format!("{width}x{height} is not a multiple of the VAE factor {f}")));
    }
    if !(req.strength > 0.0 && req.strength <= 1.0) {
        return Err(Error::arg("strength", format!("{} must be in (0, 1]", req.strength)));
    }
    if req.tile < 8 || req.overlap >= req.tile {
        return Err(Error::arg(
            "tile",
            format!("tile {} with overlap {}: need tile >= 8 and overlap < tile", req.tile, req.overlap),
        ));
    }
    let kind = match req.scheduler {
        Some(k) => k,
        None => model.default_scheduler()?,
    };
    // Transformer families pack latents in patches (FLUX, Z-Image: 2×2) inside the denoiser:
    // each tile is a whole number of patches at a patch-aligned place, and gets the positions of
    // an image of its own size, as one tile over the image gets img2img's.
    let patch = model.denoiser.patch_size();
    if req.tile % patch != 0 || req.overlap % patch != 0 {
        return Err(Error::arg(
            "tile",
            format!(
                "tile {} and overlap {} latent pixels must be multiples of {}'s {patch}-pixel patches",
                req.tile, req.overlap, model.spec.name
            ),
        ));
    }
    model.check_true_cfg(req.true_cfg)?;
    let true_cfg = model.true_cfg_scale(req.true_cfg, req.negative_prompt.as_deref());
    let cfg = model.classifier_free(req.guidance) || true_cfg.is_some();
    let mut timings = StageTimings::default();
    let start = Instant::now();

    progress.stage("text_encode");
    let t0 = Instant::now();
    let prompts = encode_prompts(model, &req.prompt, req.negative_prompt.as_deref(), cfg)?;
    timings.text_encode = t0.elapsed().as_secs_f64();

    let (lh, lw) = (height / f, width / f);
    let patch_windows = |len: usize| -> Vec<usize> {
        windows(len / patch, req.tile / patch, req.overlap / patch).into_iter().map(|p| p * patch).collect()
    };
    let (rows, cols) = (patch_windows(lh), patch_windows(lw));
    let (th, tw) = (lh.min(req.tile), lw.min(req.tile));
    // Per-pixel blend weights of one window, and their sum over the whole latent.
    let window_weights: Vec<f32> = (0..th)
        .flat_map(|y| (0..tw).map(move |x| ramp_weight(y, th, req.overlap) * ramp_weight(x, tw, req.overlap)))
        .collect();
    let mut total = vec![0f32; lh * lw];
    for &y0 in &rows {
        for &x0 in &cols {
            for y in 0..th {
                for x in 0..tw {
                    total[(y0 + y) * lw + x0 + x] += window_weights[y * tw + x];
                }
            }
        }
    }
    let device = &model.device;
    let window_w = Tensor::from_vec(window_weights, (1, 1, th, tw), device)?.to_dtype(DType::F32)?;
    let inv_total =
        Tensor::from_vec(total.iter().map(|w| 1.0 / w).collect::<Vec<f32>>(), (1, 1, lh, lw), device)?;

    let mut rng = BatchRng::new(&[req.seed]);
    let mut scheduler = model.build_scheduler(kind, req.steps, lh, lw)?;
    let timesteps = scheduler.timesteps().to_vec();
    let first = model.spec.strength_start(req.steps, req.strength);
    if first >= timesteps.len() {
        return Err(Error::arg("strength", format!("{} leaves no denoising steps", req.strength)));
    }
    // diffusers' img2img order of draws: the VAE latent sample, then the noise.
    progress.stage("vae_encode");
    let image = rgb_to_tensor(&req.image, device, model.dtype)?;
    let encoded = encode_sampled(model, &image, &req.vae_tiling, &mut rng, &mut timings, progress)?;
    let noise = rng.randn(&encoded.dims()[1..], device, model.dtype)?;
    let mut latents = scheduler.add_noise(&encoded, &noise, first)?;

    let single = rows.len() == 1 && cols.len() == 1;
    let origins: Vec<(usize, usize)> = rows.iter().flat_map(|&y| cols.iter().map(move |&x| (y, x))).collect();
    // Conditioning per call size (full calls of TILES_PER_CALL tiles, and the last, smaller one).
    let mut conds: std::collections::BTreeMap<usize, Conditioning> = Default::default();
    for chunk in origins.chunks(TILES_PER_CALL) {
        if let std::collections::btree_map::Entry::Vacant(slot) = conds.entry(chunk.len()) {
            slot.insert(Conditioning::new(
                model,
                &prompts,
                chunk.len(),
                (cfg, true_cfg),
                req.guidance,
                tw * f,
                th * f,
            )?);
        }
    }
    // SDXL's size conditioning per tile: each tile is a crop of the whole image at its place
    // (original size = the image, crop top-left = the tile's origin, target size = the tile),
    // as SDXL saw crops in training; one tile over the whole image is diffusers' img2img.
    let tile_ids = |chunk: &[(usize, usize)]| -> Result<Option<Tensor>> {
        let rows: Vec<[f32; 6]> =
            chunk.iter().map(|&(y, x)| tile_size_ids((lh, lw), (y, x), (th, tw), f)).collect();
        crate::pipeline::generate::size_ids(model, &rows, cfg)
    };
    let chunk_ids: Vec<Option<Tensor>> =
        origins.chunks(TILES_PER_CALL).map(tile_ids).collect::<Result<_>>()?;
    progress.stage("denoise");
    let total_steps = timesteps.len() - first;
    for (done, i) in (first..timesteps.len()).enumerate() {
        let t0 = Instant::now();
        let pred = if single {
            conds[&1].predict(model, scheduler.as_ref(), &latents, i, None)?
        } else {
            // Every tile's prediction, weighted, summed into the global latent, normalised.
            let mut acc = Tensor::zeros((1, latents.dim(1)?, lh, lw), DType::F32, device)?;
            for (chunk, ids) in origins.chunks(TILES_PER_CALL).zip(&chunk_ids) {
                let crops: Vec<Tensor> = chunk
                    .iter()
                    .map(|&(y, x)| Ok(latents.narrow(2, y, th)?.narrow(3, x, tw)?))
                    .collect::<Result<_>>()?;
                let preds = conds[&chunk.len()].predict_with_ids(
                    model,
                    scheduler.as_ref(),
                    &Tensor::cat(&crops, 0)?,
                    i,
                    None,
                    ids.as_ref(),
                )?;
                for (k, &(y, x)) in chunk.iter().enumerate() {
                    let p = preds.narrow(0, k, 1)?;
                    let weighted = p.to_dtype(DType::F32)?.broadcast_mul(&window_w)?;
                    let padded =
                        weighted.pad_with_zeros(2, y, lh - y - th)?.pad_with_zeros(3, x, lw - x - tw)?;
                    acc = (acc + padded)?;
                }
            }
            acc.broadcast_mul(&inv_total)?.to_dtype(model.dtype)?
        };
        latents = scheduler.step(&pred, i, &latents, &mut rng)?;
        let secs = t0.elapsed().as_secs_f64();
        timings.steps.push(secs);
        progress.step(done + 1, total_steps, secs);
        if progress.wants_preview(done + 1, total_steps) {
            progress.preview(done + 1, &latents);
        }
        if progress.cancelled() {
            return Err(Error::Cancelled);
        }
    }
    progress.stage("vae_decode");
    let image =
        decode_batch(model, &latents, &[req.seed], &req.vae_tiling, &mut timings, progress)?.remove(0);
    timings.total = start.elapsed().as_secs_f64();
    let mut warnings = model.guidance_warnings(req.guidance, req.true_cfg, req.negative_prompt.as_deref());
    warnings.extend(prompts.warnings);
    warnings.extend(crate::pipeline::generate::vae_fallback_warning(&image));
    Ok(RedetailOutput { image, scheduler: kind, timings, tiles: (rows.len(), cols.len()), warnings })
}

/// SDXL size ids of the latent tile at `origin` (`tile` latent pixels) in a `full`-sized latent,
/// in image pixels (`f` per latent pixel): `[original h, w, crop top, left, target h, w]`.
pub fn tile_size_ids(
    full: (usize, usize),
    origin: (usize, usize),
    tile: (usize, usize),
    f: usize,
) -> [f32; 6] {
    let px = |v: usize| (v * f) as f32;
    [px(full.0), px(full.1), px(origin.0), px(origin.1), px(tile.0), px(tile.1)]
}

/// PNG text key of the re-detail record (a JSON object) in the output file.
pub const META_KEY: &str = "kiln.redetail";

/// What [`redetail_png`] did, for reports and the output's metadata.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RedetailReport {
    pub input: std::path::PathBuf,
    pub output: std::path::PathBuf,
    pub size: [usize; 2],
    pub model: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub guidance: f64,
    /// FLUX's true-CFG scale when the request set one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub true_cfg: Option<f64>,
    pub strength: f64,
    pub steps: usize,
    pub scheduler: String,
    pub seed: u64,
    /// The LoRAs merged into the model (a tier's own first, then the job's), as replay needs them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<crate::loaders::lora::LoraRecord>,
    /// Latent tiles per step (rows, columns), tile side and overlap in latent pixels.
    pub tiles: [usize; 2],
    pub tile: usize,
    pub overlap: usize,
    pub seconds: f64,
    /// Stage seconds: text encode, VAE encode, each denoising step (all tiles), VAE decode.
    pub text_encode_seconds: f64,
    pub vae_encode_seconds: f64,
    pub step_seconds: Vec<f64>,
    pub vae_decode_seconds: f64,
}

/// Re-details the image at `input` (usually a super-resolution output) and writes `output`
/// atomically, keeping the input's text chunks (its upscale record) and adding [`META_KEY`].
/// A side that is not a multiple of the VAE factor is trimmed to one (at most 7 pixels).
/// An empty `req.prompt` takes the prompt in the input's kiln record, if it has one.
pub fn redetail_png(
    model: &LoadedModel,
    input: &std::path::Path,
    output: &std::path::Path,
    mut req: RedetailRequest,
    progress: &mut dyn Progress,
) -> Result<RedetailReport> {
    use crate::image::png_meta::{read_png_text, write_png_atomic, TextChunk};
    crate::files::guard_target(output)?;
    let image = crate::image::load_rgb(input)?;
    let f = model.vae.scale_factor() as u32;
    let (w, h) = (image.width() / f * f, image.height() / f * f);
    if w == 0 || h == 0 {
        return Err(Error::arg("image", format!("{} is smaller than {f} px", input.display())));
    }
    req.image = image::imageops::crop_imm(&image, 0, 0, w, h).to_image();
    let chunks = read_png_text(input).unwrap_or_default();
    if req.prompt.is_empty() {
        let recorded = chunks
            .iter()
            .find(|c| c.keyword == "kiln")
            .and_then(|c| serde_json::from_str::<crate::pipeline::metadata::ImageRecord>(&c.text).ok());
        if let Some(r) = recorded {
            req.prompt = r.prompt;
        }
    }
    let start = Instant::now();
    let out = redetail(model, &req, progress)?;
    let rgb = crate::image::unit_to_rgb8(&out.image.pixels)?;
    let report = RedetailReport {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        size: [w as usize, h as usize],
        model: model.source.dir().display().to_string(),
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        guidance: req.guidance,
        true_cfg: req.true_cfg,
        strength: req.strength,
        steps: req.steps,
        scheduler: out.scheduler.name().to_string(),
        seed: req.seed,
        loras: model.loras.clone(),
        tiles: [out.tiles.0, out.tiles.1],
        tile: req.tile,
        overlap: req.overlap,
        seconds: start.elapsed().as_secs_f64(),
        text_encode_seconds: out.timings.text_encode,
        vae_encode_seconds: out.timings.vae_encode,
        step_seconds: out.timings.steps.clone(),
        vae_decode_seconds: out.timings.vae_decode,
    };
    let mut chunks: Vec<TextChunk> = chunks.into_iter().filter(|c| c.keyword != META_KEY).collect();
    chunks.push(TextChunk::new(META_KEY, serde_json::to_string(&report).unwrap_or_default()));
    write_png_atomic(output, &rgb, &chunks)?;
    Ok(report)
}
