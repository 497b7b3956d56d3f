//! `kiln replay`: regenerates an asset from the parameters stored with it (library record or
//! the PNG's `kiln` chunk) and checks the result against the original, pixel for pixel. On the
//! same backend, dtype and weights the result is bit-exact.

use super::{job_and_assets, resolve_input, AssetRef, Workspace, WrittenImage};
use crate::error::{Error, Result};
use crate::library::assets::JobTimings;
use crate::loaders::hub::{self, ModelSource};
use crate::pipeline::generate::{generate, GenerateRequest, Progress};
use crate::pipeline::metadata::{png_chunks, FileRef, ImageRecord};
use crate::pipeline::model::LoadedModel;
use crate::tiers::drift;
use crate::tiers::Tier;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub source: AssetRef,
    /// Where to write the regenerated PNG (default: assets/replays/).
    pub out: Option<PathBuf>,
}

/// What a replay produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayResult {
    pub job_id: i64,
    pub asset_id: i64,
    pub original: PathBuf,
    pub path: PathBuf,
    /// Every pixel equal to the original's.
    pub bit_exact: bool,
    pub max_abs_diff: u8,
    pub psnr: f64,
    pub timings: JobTimings,
    pub warnings: Vec<String>,
}

/// Regenerates the asset and compares it with the original.
pub fn replay(ws: &mut Workspace, req: &ReplayRequest, progress: &mut dyn Progress) -> Result<ReplayResult> {
    let input = resolve_input(&ws.library, &ws.project.root, &req.source, "replay")?;
    let original = crate::image::load_rgb(&input.path)?;
    let record = input.record.clone();
    let mut warnings = Vec::new();
    let tier = record.tier.as_deref().and_then(|t| ws.tiers.get(t).ok()).cloned();
    if let Some(t) = &tier {
        warnings.extend(ws.check_budget(t, 1)?);
    }
    let device_name = crate::device::name(&ws.options.device);
    if device_name != record.device {
        warnings.push(format!(
            "recorded on {}, replaying on {device_name}: expect close, not bit-exact, pixels",
            record.device
        ));
    }
    // Cheap inputs first, so a missing init image fails before the model load.
    let init_image = match &record.init_image {
        Some(f) => Some(crate::image::load_rgb(&locate(ws, f, "init image")?)?),
        None => None,
    };
    let init_latents = match &record.init_latents {
        Some(f) => {
            let p = locate(ws, f, "init latents")?;
            Some(candle_core::Tensor::read_npy(&p)?.to_dtype(candle_core::DType::F32)?)
        }
        None => None,
    };

    let cpu0 = super::process_cpu_seconds();
    let t0 = Instant::now();
    let model = load_recorded_model(ws, &record)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let locked =
        drift::LockedTier { model: record.model.id.clone(), vae: None, files: record.model.files.clone() };
    let probe = Tier { model: record.model.id.clone(), ..Tier::untiered() };
    let diffs = drift::differences(&locked, &probe, &model.weights);
    if !diffs.is_empty() {
        let msg = format!("weights differ from the ones the image was made with:\n  {}", diffs.join("\n  "));
        if !ws.options.accept_drift {
            return Err(Error::config(
                &input.path,
                format!("{msg}\nrerun with --accept-drift to replay anyway"),
            ));
        }
        warnings.push(msg);
    }
    if model.scheduler_config_json != record.scheduler_config {
        warnings.push("the model folder's scheduler config differs from the recorded one".into());
    }

    let request = GenerateRequest {
        prompt: record.prompt.clone(),
        negative_prompt: record.negative_prompt.clone(),
        width: record.width,
        height: record.height,
        steps: record.steps,
        guidance: record.guidance,
        scheduler: Some(record.scheduler.parse()?),
        seeds: vec![record.seed],
        init_latents,
        init_image,
        strength: record.strength.unwrap_or(1.0),
        max_batch: 1,
    };
    let output = generate(&model, &request, progress)?;
    let image =
        output.images.first().ok_or_else(|| Error::Unsupported("generation returned no image".into()))?;
    let rgb = crate::image::unit_to_rgb8(&image.pixels)?;
    // The replay carries the original's record (same parameters), so its metadata is the same too.
    let path = match &req.out {
        Some(p) => p.clone(),
        None => ws.output_path("replays", &format!("replay-s{}", record.seed)),
    };
    crate::image::png_meta::write_png_atomic(&path, &rgb, &png_chunks(&record, output.scheduler, &model))?;

    let max_abs_diff = if rgb.dimensions() == original.dimensions() {
        rgb.as_raw().iter().zip(original.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0)
    } else {
        255
    };
    let psnr = crate::image::compare::psnr(&rgb, &original).unwrap_or(0.0);
    let mut timings = JobTimings::from_stages(load_seconds, &output.timings);
    timings.cpu_seconds = match (cpu0, super::process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let written = [WrittenImage { path: path.clone(), seed: record.seed, rgb, record }];
    let (job, assets) =
        job_and_assets("replay", "replay", tier.as_ref(), &model, timings.clone(), &written, input.asset_id);
    let (job_id, ids) = ws.library.record_job(&job, &assets)?;
    Ok(ReplayResult {
        job_id,
        asset_id: ids.first().copied().unwrap_or_default(),
        original: input.path,
        path,
        bit_exact: max_abs_diff == 0,
        max_abs_diff,
        psnr,
        timings,
        warnings,
    })
}

/// Loads the model (and VAE) a record names, in its dtype, on the workspace's device.
fn load_recorded_model(ws: &Workspace, record: &ImageRecord) -> Result<LoadedModel> {
    let dtype = crate::device::parse_dtype(&record.dtype)?;
    let fp16 = dtype != candle_core::DType::F32;
    let show = ws.options.show_progress;
    let source = hub::resolve(&record.model.id, record.model.revision.as_deref(), fp16, show)?;
    let vae: Option<ModelSource> = match &record.vae {
        Some(v) => Some(hub::resolve_vae(&v.id, v.revision.as_deref(), fp16, show)?),
        None => None,
    };
    LoadedModel::load_with_vae(source, vae, &ws.options.device, dtype)
}

/// Finds an input file a record names: at its recorded path when the content still matches,
/// else any library asset with the same sha256.
fn locate(ws: &Workspace, file: &FileRef, what: &str) -> Result<PathBuf> {
    let path = Path::new(&file.path);
    if path.is_file() && crate::loaders::weights::sha256_file(path)? == file.sha256 {
        return Ok(path.to_path_buf());
    }
    if let Some(asset) = ws.library.asset_by_sha256(&file.sha256)? {
        let p = ws.project.root.join(&asset.path);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::not_found(
        format!("recorded {what} (sha256 {})", file.sha256),
        path,
        "the replay needs the exact input file; restore it or its library asset",
    ))
}
