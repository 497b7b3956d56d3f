//! `kiln replay`: regenerates an asset from the parameters stored with it (library record or
//! the PNG's `kiln` chunk) and checks the result against the original, pixel for pixel. On the
//! same backend, dtype and weights the result is bit-exact.

use super::{job_and_assets, resolve_input, AssetRef, Workspace, WrittenImage};
use crate::error::{Error, Result};
use crate::image::mask::Mask;
use crate::library::assets::{AssetKind, JobTimings, RecordKind};
use crate::loaders::hub::{self, ModelSource};
use crate::pipeline::generate::{generate, GenerateRequest, Progress};
use crate::pipeline::inpaint::inpaint;
use crate::pipeline::inpaint::replay::{is_inpaint_record, request_from_record, RecordedInputs};
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
    /// `--vae-tiling` / `--vae-tile` (a tiled decode differs from an untiled one in the last bits).
    pub vae_tiling: crate::pipeline::vae_tiling::VaeTiling,
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
            Some(crate::loaders::npy::read(&p)?)
        }
        None => None,
    };
    // Inpaint, outpaint and erase outputs replay through the inpainting pipeline, with the
    // recorded mask (outpainting rebuilds its mask from the recorded extension).
    let inpaint_mask = match record.inpaint.as_ref().and_then(|ip| ip.mask.as_ref()) {
        Some(f) if is_inpaint_record(&record) => Some(Mask::load(&locate(ws, f, "mask")?)?),
        _ => None,
    };

    // An upscaled asset replays as its generation followed by the recorded upscale step, a
    // re-detailed one as its parent's chain followed by the re-detail step; their models load
    // first, so a missing SR model or tier fails before the generation.
    // A graded asset replays as its source's chain followed by the recorded grade.
    let (grade_params, chain_id) = grade_step(ws, input.asset_id)?;
    let (upscale_step, redetail_params) = recorded_steps(ws, chain_id)?;
    let upscale_params = upscale_step.as_ref().map(|(p, _)| p.clone());
    if grade_params.is_none() && has_chunk(&input.path, crate::image::lut::META_KEY)? {
        return Err(Error::arg(
            "replay",
            format!(
                "{} is a graded image the library does not know; replay the image it was graded from, \
                 then grade that",
                input.path.display()
            ),
        ));
    }
    if upscale_params.is_none() && has_chunk(&input.path, crate::pipeline::upscale::META_KEY)? {
        return Err(Error::arg(
            "replay",
            format!(
                "{} is an upscaled image the library does not know; replay the image it was made from \
                 (its generation record), then upscale that",
                input.path.display()
            ),
        ));
    }
    let mut upscaler = match &upscale_step {
        Some((p, holder)) => Some(load_recorded_upscaler(ws, p, Some(*holder), &mut warnings)?),
        None => None,
    };
    let mut redetailer = match &redetail_params {
        Some(p) => {
            let tier = p["tier"]
                .as_str()
                .ok_or_else(|| Error::arg("replay", "the re-detail record names no tier"))?;
            // The step's LoRAs: the tier's own (as the tier defines them now, drift-checked), then
            // the job's, found again by their recorded hashes.
            // (A record without `loras` merged none, or predates their recording.)
            let recorded_loras: Option<Vec<crate::loaders::lora::LoraRecord>> = match p.get("loras") {
                Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                    Error::arg("replay", format!("the re-detail record's LoRAs cannot be read: {e}"))
                })?),
                None => None,
            };
            let own = ws.tiers.get(tier)?.loras.len();
            let job_loras =
                recorded_loras.iter().flatten().skip(own).map(|l| l.request()).collect::<Result<Vec<_>>>()?;
            let warm = ws.load_tier_with(tier, &job_loras)?;
            warnings.extend(crate::jobs::engine::tier_warnings(&warm.tier, &warm.drift));
            let recorded = match input.asset_id {
                Some(id) => ws.library.asset(id)?.model_hashes,
                None => Vec::new(),
            };
            let locked = drift::LockedTier { model: warm.tier.model.clone(), vae: None, files: recorded };
            let mut diffs = drift::differences(&locked, &warm.tier, &warm.model.weights);
            let merged = |l: &[crate::loaders::lora::LoraRecord]| -> Vec<(String, f64)> {
                l.iter().map(|l| (l.sha256.clone(), l.weight)).collect()
            };
            let now = merged(warm.model.loras.as_slice());
            if let Some(recorded) = recorded_loras.map(|r| merged(r.as_slice())).filter(|r| *r != now) {
                diffs.push(format!("LoRAs: recorded {recorded:?}, now {now:?} (sha256, weight)"));
            }
            if !diffs.is_empty() {
                let msg = format!(
                    "re-detail model differs from the one the image was made with:\n  {}",
                    diffs.join("\n  ")
                );
                if !ws.options.accept_drift {
                    return Err(Error::config(
                        &warm.tier.defined_in,
                        format!("{msg}\nrerun with --accept-drift to replay anyway"),
                    ));
                }
                warnings.push(msg);
            }
            Some((warm, redetail_request(p)?))
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

    let (rgb, scheduler, stage_timings) = if is_inpaint_record(&record) {
        let image = init_image.ok_or_else(|| {
            Error::arg(
                "replay",
                format!("the `{}` record of {} names no input image", record.mode, input.path.display()),
            )
        })?;
        let inputs = RecordedInputs { image, mask: inpaint_mask, init_latents };
        let mut request = request_from_record(&record, inputs)?;
        request.vae_tiling = req.vae_tiling;
        let output = inpaint(&model, &request, progress)?;
        let first = output
            .images
            .into_iter()
            .next()
            .ok_or_else(|| Error::Unsupported("inpainting returned no image".into()))?;
        (first.image, output.scheduler, output.timings)
    } else {
        let request = GenerateRequest {
            prompt: record.prompt.clone(),
            negative_prompt: record.negative_prompt.clone(),
            width: record.width,
            height: record.height,
            steps: record.steps,
            guidance: record.guidance,
            true_cfg: record.true_cfg,
            offload_text_encoders: false,
            scheduler: Some(record.scheduler.parse()?),
            seeds: vec![record.seed],
            init_latents,
            init_image,
            strength: record.strength.unwrap_or(1.0),
            max_batch: 1,
            vae_tiling: req.vae_tiling,
            max_sequence_length: record.max_sequence_length,
        };
        let output = generate(&model, &request, progress)?;
        let image =
            output.images.first().ok_or_else(|| Error::Unsupported("generation returned no image".into()))?;
        let mut rgb = crate::image::unit_to_rgb8(&image.pixels)?;
        // A graded image (a preset's grade) is graded again with the recorded LUT.
        if let Some(g) = &record.grade {
            rgb = crate::jobs::preset::regrade(&locate(ws, &g.lut, "grade LUT")?, g, &rgb)?;
        }
        (rgb, output.scheduler, output.timings)
    };
    // The replay carries the original's record (same parameters), so its metadata is the same too.
    let path = match &req.out {
        Some(p) => p.clone(),
        None => ws.output_path("replays", &format!("replay-s{}", record.seed)),
    };
    let chunks = png_chunks(&record, scheduler, &model);
    let mut upscale_seconds = 0.0;
    let mut redetail_timings = JobTimings::default();
    let rgb = if upscaler.is_none() && redetailer.is_none() && grade_params.is_none() {
        crate::image::png_meta::write_png_atomic(&path, &rgb, &chunks)?;
        rgb
    } else {
        // The regenerated base goes beside the output and each recorded step runs on the last
        // one's file; the intermediate files are removed.
        let mut current = ws.output_path("replays", &format!("replay-base-s{}", record.seed));
        crate::image::png_meta::write_png_atomic(&current, &rgb, &chunks)?;
        let mut temps = vec![current.clone()];
        let steps = (|| -> Result<()> {
            if let (Some(up), Some(p)) = (upscaler.as_mut(), &upscale_params) {
                let out = match (&redetailer, &grade_params) {
                    (None, None) => path.clone(),
                    _ => ws.output_path("replays", &format!("replay-up-s{}", record.seed)),
                };
                temps.push(out.clone());
                let t0 = Instant::now();
                let upscaled = replay_upscale(up, p, &current, &out);
                upscale_seconds = t0.elapsed().as_secs_f64() + std::mem::take(&mut up.load_seconds);
                upscaled?;
                current = out;
            }
            if let Some((warm, request)) = redetailer.as_mut() {
                let out = match &grade_params {
                    None => path.clone(),
                    Some(_) => ws.output_path("replays", &format!("replay-rd-s{}", record.seed)),
                };
                temps.push(out.clone());
                let report = crate::pipeline::redetail::redetail_png(
                    &warm.model,
                    &current,
                    &out,
                    request.clone(),
                    progress,
                )?;
                redetail_timings.load = std::mem::take(&mut warm.load_seconds);
                redetail_timings.steps = vec![report.seconds];
                current = out;
            }
            if let Some(g) = &grade_params {
                replay_grade(ws, g, &current, &path)?;
            }
            Ok(())
        })();
        for t in temps.iter().filter(|t| **t != path) {
            let _ = std::fs::remove_file(t);
        }
        steps?;
        crate::image::load_rgb(&path)?
    };

    let max_abs_diff = if rgb.dimensions() == original.dimensions() {
        rgb.as_raw().iter().zip(original.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0)
    } else {
        255
    };
    let psnr = crate::image::compare::psnr(&rgb, &original).unwrap_or(0.0);
    let mut timings = JobTimings::from_stages(load_seconds, &stage_timings);
    timings.upscale = upscale_seconds;
    // The re-detail step's load and denoising count with the generation's.
    timings.load += redetail_timings.load;
    timings.steps.extend(&redetail_timings.steps);
    let redetail_seconds = redetail_timings.device_seconds();
    timings.cpu_seconds = match (cpu0, super::process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let written = [WrittenImage { path: path.clone(), seed: record.seed, rgb, record }];
    let (mut job, mut assets) = job_and_assets(
        RecordKind::Replay,
        AssetKind::Replay,
        tier.as_ref(),
        &model,
        timings.clone(),
        &written,
        input.asset_id,
    );
    if upscaler.is_some() || redetailer.is_some() {
        // Each part at its own tier's price: the generation at the generating tier's, the
        // upscale step (with its load) at the upscale tier's, the re-detail at its tier's.
        let own = timings.device_seconds() - upscale_seconds - redetail_seconds;
        let generation = tier.as_ref().map(|t| t.price.cost(1, own)).unwrap_or(0.0);
        let upscale = upscaler.as_ref().map(|up| up.tier.price.cost(1, upscale_seconds)).unwrap_or(0.0);
        let redetail =
            redetailer.as_ref().map(|(w, _)| w.tier.price.cost(1, redetail_seconds)).unwrap_or(0.0);
        job.credits = generation + upscale + redetail;
        for a in &mut assets {
            a.credits = job.credits;
        }
    }
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

/// The non-generation steps recorded on an asset: its upscale step (with the asset that
/// holds it, whose model hashes are the upscaler's), and its re-detail step (whose parent holds
/// the upscale step it ran on, when there was one).
type RecordedSteps = (Option<(serde_json::Value, i64)>, Option<serde_json::Value>);

fn recorded_steps(ws: &Workspace, asset_id: Option<i64>) -> Result<RecordedSteps> {
    let Some(id) = asset_id else { return Ok((None, None)) };
    let asset = ws.library.asset(id)?;
    let step = |p: &Option<serde_json::Value>, name: &str| p.as_ref().filter(|p| p["step"] == name).cloned();
    if let Some(up) = step(&asset.params, "upscale") {
        return Ok((Some((up, id)), None));
    }
    let Some(redetail) = step(&asset.params, "redetail") else { return Ok((None, None)) };
    let upscale = match asset.parent_id {
        Some(parent) => step(&ws.library.asset(parent)?.params, "upscale").map(|p| (p, parent)),
        None => None,
    };
    Ok((upscale, Some(redetail)))
}

/// The re-detail request a recorded step ran (its image is read from the replayed chain).
fn redetail_request(p: &serde_json::Value) -> Result<crate::pipeline::redetail::RedetailRequest> {
    let missing = |field: &str| {
        Error::arg(
            "replay",
            format!("the re-detail record has no `{field}` (recorded by an older kiln); re-detail the upscale again instead"),
        )
    };
    let num = |field: &str| p[field].as_f64().ok_or_else(|| missing(field));
    let count = |field: &str| p[field].as_u64().map(|v| v as usize).ok_or_else(|| missing(field));
    Ok(crate::pipeline::redetail::RedetailRequest {
        image: image::RgbImage::new(0, 0),
        prompt: p["prompt"].as_str().ok_or_else(|| missing("prompt"))?.to_string(),
        negative_prompt: p["negative_prompt"].as_str().map(str::to_string),
        steps: count("steps")?,
        strength: num("strength")?,
        guidance: num("guidance")?,
        true_cfg: p["true_cfg"].as_f64(),
        scheduler: Some(p["scheduler"].as_str().ok_or_else(|| missing("scheduler"))?.parse()?),
        seed: p["seed"].as_u64().ok_or_else(|| missing("seed"))?,
        tile: count("tile")?,
        overlap: count("overlap")?,
        vae_tiling: Default::default(),
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
    let loras = record.loras.iter().map(|l| l.request()).collect::<Result<Vec<_>>>()?;
    // A single-file transformer is found at its recorded path when its content still matches.
    let denoiser_file =
        record.single_file.as_ref().map(|f| locate(ws, f, "single-file checkpoint")).transpose()?;
    // The embeddings depend on where the text encoders ran (f32 on the CPU, or the model's dtype).
    let text = record.text_encoders.unwrap_or_default();
    let parts = crate::pipeline::model::ModelParts { vae, denoiser_file, loras, text };
    LoadedModel::load_parts(source, parts, &ws.options.device, dtype)
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

/// Whether a PNG carries a step record (the upscaler's or the grade's) under `key`.
fn has_chunk(path: &Path, key: &str) -> Result<bool> {
    let chunks = crate::image::png_meta::read_png_text(path)?;
    Ok(chunks.iter().any(|c| c.keyword == key))
}

/// The grade step recorded on an asset (`kiln grade asset:ID`), and the asset whose chain
/// comes before it: its source. Otherwise no step, and the asset itself.
fn grade_step(ws: &Workspace, asset_id: Option<i64>) -> Result<(Option<serde_json::Value>, Option<i64>)> {
    let Some(id) = asset_id else { return Ok((None, None)) };
    let asset = ws.library.asset(id)?;
    match asset.params.filter(|p| p["step"] == "grade") {
        Some(p) => Ok((Some(p), asset.parent_id)),
        None => Ok((None, Some(id))),
    }
}

/// Grades `input` into `output` as the recorded grade step did: the same LUT (found by its
/// recorded path or library hash, refused if its content changed), strength and interpolation.
fn replay_grade(ws: &Workspace, g: &serde_json::Value, input: &Path, output: &Path) -> Result<()> {
    let missing = |field: &str| Error::arg("replay", format!("the grade record has no `{field}`"));
    let recorded = FileRef {
        path: g["lut"].as_str().ok_or_else(|| missing("lut"))?.to_string(),
        sha256: g["lut_sha256"].as_str().ok_or_else(|| missing("lut_sha256"))?.to_string(),
    };
    let lut_path = locate(ws, &recorded, "grade LUT")?;
    let lut = crate::image::lut::Lut3d::read(&lut_path)?;
    let interp: crate::image::lut::Interpolation =
        g["interpolation"].as_str().ok_or_else(|| missing("interpolation"))?.parse()?;
    let strength = g["strength"].as_f64().ok_or_else(|| missing("strength"))? as f32;
    crate::image::lut::grade_file(&lut, &lut_path, input, output, interp, strength)?;
    Ok(())
}

/// Loads the upscale tier an asset's upscale step names and checks its weights against the
/// ones recorded with the asset (drift is refused unless `--accept-drift`).
fn load_recorded_upscaler(
    ws: &Workspace,
    params: &serde_json::Value,
    asset_id: Option<i64>,
    warnings: &mut Vec<String>,
) -> Result<super::upscale::WarmUpscaler> {
    let tier = params["tier"].as_str().unwrap_or("upscale");
    let warm = ws.load_upscale_tier(tier)?;
    let recorded = match asset_id {
        Some(id) => ws.library.asset(id)?.model_hashes,
        None => Vec::new(),
    };
    let locked = drift::LockedTier { model: warm.tier.model.clone(), vae: None, files: recorded };
    let diffs = drift::differences(&locked, &warm.tier, &warm.weights);
    if !diffs.is_empty() {
        let msg =
            format!("upscale model differs from the one the image was made with:\n  {}", diffs.join("\n  "));
        if !ws.options.accept_drift {
            return Err(Error::config(
                &warm.tier.defined_in,
                format!("{msg}\nrerun with --accept-drift to replay anyway"),
            ));
        }
        warnings.push(msg);
    }
    Ok(warm)
}

/// Re-runs a recorded upscale step on `base` into `out`, with the recorded output size and
/// tiling (the tile decides RRDBNet's feathered seams, so it must match to be bit-exact).
fn replay_upscale(
    up: &super::upscale::WarmUpscaler,
    params: &serde_json::Value,
    base: &Path,
    out: &Path,
) -> Result<()> {
    use crate::pipeline::upscale::{Target, UpscaleOptions};
    let num = |k: &str| params[k].as_u64().map(|v| v as usize);
    let size = |i: usize| params["output_size"][i].as_u64().map(|v| v as usize);
    let (Some(width), Some(height)) = (size(0), size(1)) else {
        return Err(Error::arg("replay", "the asset's upscale record has no output_size"));
    };
    let options = UpscaleOptions {
        target: Some(Target::Fit { width, height }),
        tile: num("tile"),
        halo: num("halo"),
        feather: num("feather"),
        ..Default::default()
    };
    up.upscaler.upscale_file(base, out, &options, &mut |_, _| {})?;
    Ok(())
}
