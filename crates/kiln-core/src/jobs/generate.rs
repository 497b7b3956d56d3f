//! The generate job: txt2img / img2img from a tier (written under the project's assets/ unless
//! an `out` path is given, recorded in the library and billed) or from a model folder or hub id
//! (written to `out`, not recorded).

use super::engine::{image_path, random_seed, tier_warnings, JobOutput, OutputImage};
use super::events::{EventSink, JobEvent, SinkProgress};
use super::pool::PoolKey;
use super::spec::{GenerateSpec, JobKind};
use crate::error::{Error, Result};
use crate::library::assets::{AssetKind, JobTimings, RecordKind};
use crate::loaders::hub;
use crate::loaders::lora::LoraRequest;
use crate::pipeline::generate::generate;
use crate::pipeline::metadata::{png_chunks, FileRef, ImageRecord};
use crate::pipeline::model::{LoadedModel, ModelParts};
use crate::tiers::load::{tier_request, Overrides};
use crate::tiers::Tier;
use crate::workflow::{process_cpu_seconds, record_tier_job, Workspace, WrittenImage};
use candle_core::DType;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A model for a job: a tier's (with its drift outcome) or a folder's/hub id's.
pub(crate) struct JobModel {
    pub model: Arc<LoadedModel>,
    pub tier: Option<Tier>,
    pub load_seconds: f64,
    pub warnings: Vec<String>,
}

/// Loads (or takes warm from the pool) the model a spec names: a tier, or a folder / hub id,
/// or a single-file denoiser checkpoint on a `base` folder / hub id.
pub(crate) fn job_model(
    ws: &Workspace,
    tier: Option<&str>,
    model: Option<&str>,
    base: Option<&str>,
    revision: Option<&str>,
    images: usize,
    loras: &[LoraRequest],
) -> Result<JobModel> {
    match (tier, model) {
        (Some(name), _) => {
            let t = ws.tiers.get(name)?.clone();
            crate::tiers::load::require_diffusion(&t)?;
            // Refuse before the (expensive) model load when the budget is spent.
            let mut warnings: Vec<String> = ws.check_budget(&t, images)?.into_iter().collect();
            let warm = ws.load_tier_with(name, loras)?;
            warnings.extend(tier_warnings(&warm.tier, &warm.drift));
            warnings.extend(warm.model.load_warnings.iter().cloned());
            Ok(JobModel {
                model: warm.model,
                tier: Some(warm.tier),
                load_seconds: warm.load_seconds,
                warnings,
            })
        }
        (None, Some(spec)) => {
            let device = &ws.options.device;
            let dtype = ws.options.dtype.unwrap_or_else(|| crate::device::default_dtype(device));
            let single_file = single_file_checkpoint(spec, base)?;
            let (folder, pool_name) = match (&single_file, base) {
                (Some(file), Some(base)) => (base, format!("model:{base}|transformer:{}", file.display())),
                _ => (spec, format!("model:{spec}")),
            };
            let key = PoolKey {
                model: pool_name,
                revision: revision.map(str::to_string),
                device: crate::device::name(device),
                dtype: crate::device::dtype_name(dtype).to_string(),
                loras: crate::loaders::lora::pool_key(loras)?,
                text_encoders: ws.options.text_encoders,
            };
            let (model, load_seconds) = ws.pool.get_or_load_diffusion(&key, loras, || {
                let source = hub::resolve(folder, revision, dtype != DType::F32, ws.options.show_progress)?;
                let parts = ModelParts {
                    vae: None,
                    denoiser_file: single_file.clone(),
                    loras: loras.to_vec(),
                    text: ws.options.text_encoders,
                };
                LoadedModel::load_parts(source, parts, device, dtype)
            })?;
            let warnings = model.load_warnings.clone();
            Ok(JobModel { model, tier: None, load_seconds, warnings })
        }
        (None, None) => Err(Error::arg("tier", "name a tier (or, locally, a model)")),
    }
}

/// The single-file checkpoint `model` names when it is one (a `.safetensors` file), checked
/// against `base`: a checkpoint needs a base folder, and a base needs a checkpoint.
fn single_file_checkpoint(model: &str, base: Option<&str>) -> Result<Option<PathBuf>> {
    let path = Path::new(model);
    let is_checkpoint =
        path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    match (is_checkpoint, base) {
        (true, Some(_)) => Ok(Some(path.to_path_buf())),
        (true, None) => Err(Error::arg(
            "base",
            format!(
                "{model} is a single-file checkpoint: add --base DIR|HUB_ID, the diffusers folder or hub id \
                 (e.g. black-forest-labs/FLUX.1-dev) its text encoders, VAE, scheduler and transformer \
                 config come from"
            ),
        )),
        (false, Some(_)) if path.exists() => Err(Error::arg(
            "base",
            format!("--base goes with a single-file .safetensors checkpoint as --model; {model} is not one"),
        )),
        (false, Some(_)) => Err(Error::not_found(
            "single-file checkpoint",
            path,
            "--model FILE.safetensors --base DIR|HUB_ID",
        )),
        (false, None) => Ok(None),
    }
}

/// Refuses an output path that is not a plain file or a new name (a device, a folder), or that
/// is a recorded asset of the project (its record would then describe another image).
pub(crate) fn check_out_path(library: &crate::library::Library, path: &Path) -> Result<()> {
    crate::files::guard_target(path)?;
    if path.is_file() {
        if let Some(asset) = library.asset_for_file(path)? {
            return Err(Error::arg(
                "out",
                format!("{} is asset {} of the library; write to a new file", path.display(), asset.id),
            ));
        }
    }
    Ok(())
}

/// `out` for image `index` of `count`: PATH, or PATH-0.png, PATH-1.png, ... for several.
pub(crate) fn numbered(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "kiln".into());
    out.with_file_name(format!("{stem}-{index}.png"))
}

fn file_ref(path: &Path) -> Result<FileRef> {
    Ok(FileRef { path: path.display().to_string(), sha256: crate::loaders::weights::sha256_file(path)? })
}

/// Reads unit-normal starting noise (.npy) as f32.
pub(crate) fn read_npy(path: &Path) -> Result<candle_core::Tensor> {
    if !path.is_file() {
        return Err(Error::not_found("init_latents", path, "pass an .npy file"));
    }
    crate::loaders::npy::read(path)
}

/// The `seconds` object of an image job's result: load, each stage, the pipeline's own total
/// under `job_key`, and the whole job since `start`.
pub(crate) fn stage_seconds(
    load: f64,
    t: &crate::pipeline::generate::StageTimings,
    job_key: &str,
    start: Instant,
) -> serde_json::Value {
    let mut seconds = serde_json::json!({
        "load": load,
        "text_encode": t.text_encode,
        "vae_encode": t.vae_encode,
        "steps": t.steps,
        "vae_decode": t.vae_decode,
        "total": start.elapsed().as_secs_f64(),
    });
    seconds[job_key] = serde_json::json!(t.total);
    seconds
}

/// The job result's images: each written file with its asset id when the job was recorded.
pub(crate) fn output_images(
    written: &[WrittenImage],
    recorded: Option<&crate::workflow::RecordedJob>,
    role: &str,
) -> Vec<OutputImage> {
    written
        .iter()
        .enumerate()
        .map(|(i, w)| OutputImage {
            asset_id: recorded.and_then(|r| r.asset_ids.get(i).copied()),
            path: w.path.clone(),
            seed: Some(w.seed),
            role: role.to_string(),
        })
        .collect()
}

/// Runs a generate job.
pub fn run(ws: &mut Workspace, s: &GenerateSpec, sink: &mut dyn EventSink) -> Result<JobOutput> {
    let start = Instant::now();
    let count = s.count.unwrap_or(1);
    let scheduler = s.scheduler.as_deref().map(str::parse).transpose()?;
    if let Some(out) = &s.out {
        for i in 0..count {
            check_out_path(&ws.library, &numbered(out, i, count))?;
        }
    }
    // Read the cheap inputs before the expensive model load, so bad input fails fast.
    let init_path = s.init_image.as_ref().map(|r| image_path(ws, r, "init_image")).transpose()?;
    let init_image = init_path.as_deref().map(crate::image::load_rgb).transpose()?;
    let init_latents = s.init_latents.as_deref().map(read_npy).transpose()?;
    // `<lora:…>` tags leave the prompt the text encoders see and join the spec's LoRAs.
    let (prompt, lora_args) = s.lora_args()?;
    let loras = crate::loaders::lora::resolve_all(&lora_args)?;

    sink.emit(JobEvent::Stage { stage: "load".into() });
    let cpu0 = process_cpu_seconds();
    let jm = job_model(
        ws,
        s.tier.as_deref(),
        s.model.as_deref(),
        s.base.as_deref(),
        s.revision.as_deref(),
        count,
        &loras,
    )?;
    let model = &jm.model;
    let mut warnings = jm.warnings.clone();

    let first_seed = s.seed.unwrap_or_else(random_seed);
    let seeds: Vec<u64> = (0..count as u64).map(|i| first_seed.wrapping_add(i)).collect();
    let overrides = Overrides {
        width: s.width,
        height: s.height,
        steps: s.steps,
        guidance: s.guidance,
        scheduler,
        negative_prompt: s.negative.clone(),
        max_batch: Some(s.batch.unwrap_or(count.min(4))),
        vae_tiling: super::spec::vae_tiling(s.vae_tiling.as_deref(), s.vae_tile)?,
    };
    let fallback = Tier::untiered();
    let mut request =
        tier_request(jm.tier.as_ref().unwrap_or(&fallback), model, &prompt, seeds.clone(), &overrides)?;
    request.max_sequence_length = s.max_sequence_length;
    request.true_cfg = s.true_cfg;
    request.offload_text_encoders = s.offload_text_encoders.unwrap_or(false);
    if let Some(img) = init_image {
        // img2img without a tier defaults to the init image's size, rounded down to the model's
        // size multiple (the VAE factor, times the latent patch for FLUX).
        if jm.tier.is_none() {
            let f = model.size_multiple();
            request.width = s.width.unwrap_or((img.width() as usize / f) * f);
            request.height = s.height.unwrap_or((img.height() as usize / f) * f);
        }
        request.init_image = Some(img);
        request.strength = s.strength.unwrap_or(0.8);
    }
    request.init_latents = init_latents;
    request.validate(model)?;

    let output = generate(model, &request, &mut SinkProgress::new(sink))?;
    warnings.extend(output.warnings.iter().cloned());
    if sink.cancelled() {
        return Err(Error::Cancelled);
    }

    sink.emit(JobEvent::Stage { stage: "write".into() });
    let init_latents_ref = s.init_latents.as_deref().map(file_ref).transpose()?;
    let init_image_ref = init_path.as_deref().map(file_ref).transpose()?;
    let tier_name = jm.tier.as_ref().map(|t| t.name.clone());
    let mut written = Vec::new();
    let mut outputs = Vec::new();
    for (i, image) in output.images.iter().enumerate() {
        let path = match (&s.out, &jm.tier) {
            (Some(out), _) => numbered(out, i, count),
            (None, Some(t)) => {
                let folder = if t.is_draft() { "drafts" } else { "finals" };
                ws.output_path(folder, &format!("{}-s{}", t.name, image.seed))
            }
            (None, None) => PathBuf::from(format!("kiln-{}.png", image.seed)),
        };
        let mut record = ImageRecord {
            tier: tier_name.clone(),
            ..ImageRecord::build(
                model,
                &request,
                output.scheduler,
                image.seed,
                i,
                init_latents_ref.clone(),
                init_image_ref.clone(),
            )
        };
        let mut rgb = crate::image::unit_to_rgb8(&image.pixels)?;
        if let Some(p) = &ws.preset {
            rgb = p.finish(&mut record, rgb)?;
        }
        crate::image::png_meta::write_png_atomic(&path, &rgb, &png_chunks(&record, output.scheduler, model))?;
        outputs.push(serde_json::json!({
            "path": path,
            "seed": image.seed,
            // the dtype the image was decoded in again after its f16 VAE decode overflowed
            "vae_fallback": image.vae_fallback.map(crate::device::dtype_name),
        }));
        // Absolute the way the project root is, so the library stores it relative to the root.
        let path = std::path::absolute(&path).unwrap_or(path);
        written.push(WrittenImage { path, seed: image.seed, rgb, record });
    }
    let mut timings = JobTimings::from_stages(jm.load_seconds, &output.timings);
    timings.cpu_seconds = match (cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let credits = jm.tier.as_ref().map(|t| t.price.cost(written.len(), timings.device_seconds()));
    // A tier's images are assets of the project (a draft or a final by the tier's lane),
    // children of the init image's asset when it is one.
    let recorded = match &jm.tier {
        Some(tier) => {
            sink.emit(JobEvent::Stage { stage: "record".into() });
            Some(record_tier_job(
                &mut ws.library,
                RecordKind::Generate,
                AssetKind::of_tier(tier),
                tier,
                model,
                timings.clone(),
                &written,
                init_image_ref.as_ref(),
            )?)
        }
        None => None,
    };
    let role = match &jm.tier {
        Some(t) if t.is_draft() => "draft",
        Some(_) => "final",
        None => "image",
    };
    let images = output_images(&written, recorded.as_ref(), role);
    let t = &output.timings;
    let detail = serde_json::json!({
        "outputs": outputs,
        "seeds": seeds,
        "scheduler": output.scheduler.name(),
        "seconds": stage_seconds(jm.load_seconds, t, "generate", start),
        "peak_memory_bytes": crate::device::peak_host_memory_bytes(),
        "device": crate::device::name(&model.device),
        "dtype": crate::device::dtype_name(model.dtype),
        "tier": tier_name,
        "credits": credits,
        "library": recorded,
        "warnings": warnings,
    });
    Ok(JobOutput {
        kind: JobKind::Generate,
        library_job_id: recorded.as_ref().map(|r| r.job_id),
        images,
        device_seconds: timings.device_seconds(),
        timings,
        credits: credits.unwrap_or(0.0),
        warnings,
        detail,
    })
}
