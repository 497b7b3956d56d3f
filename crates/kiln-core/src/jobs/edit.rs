//! The edit jobs: inpaint, erase and outpaint, with the metadata a generation writes plus the
//! mask and region used; recorded as children of the input image's asset for a tier.

use super::engine::{image_path, random_seed, JobOutput};
use super::events::{EventSink, JobEvent, SinkProgress};
use super::generate::{check_out_path, job_model, numbered, output_images, read_npy, stage_seconds};
use super::spec::{EditMode, InpaintSpec, JobKind};
use crate::error::{Error, Result};
use crate::image::mask::Mask;
use crate::library::assets::{AssetKind, JobTimings, RecordKind};
use crate::pipeline::inpaint::{check_inputs, inpaint, Blend, InpaintRequest, Region, UNetKind};
use crate::pipeline::metadata::{model_record, png_chunks, FileRef, ImageRecord, InpaintRecord};
use crate::pipeline::outpaint::{extend_canvas, Extension, Prefill, DEFAULT_OVERLAP};
use crate::tiers::load::{tier_request, Overrides};
use crate::tiers::Tier;
use crate::workflow::{record_tier_job, Workspace, WrittenImage};
use std::path::PathBuf;
use std::time::Instant;

/// The eraser's prompt: ask for plain continuation of the surroundings.
pub const ERASE_PROMPT: &str = "empty background, seamless continuation of the surroundings, clean, natural";
/// The eraser's negative prompt: what removal must not put back.
pub const ERASE_NEGATIVE: &str = "object, person, animal, text, watermark, logo, frame, shadow, artifacts";
/// How far the eraser grows its mask by default.
pub const DEFAULT_GROW: u32 = 8;

fn file_ref(path: &std::path::Path) -> Result<FileRef> {
    Ok(FileRef { path: path.display().to_string(), sha256: crate::loaders::weights::sha256_file(path)? })
}

/// Runs an edit job.
pub fn run(ws: &mut Workspace, s: &InpaintSpec, sink: &mut dyn EventSink) -> Result<JobOutput> {
    let start = Instant::now();
    // `<lora:…>` tags leave the prompt the text encoders see and join the spec's LoRAs.
    let (prompt, lora_args) = s.lora_args()?;
    let loras = crate::loaders::lora::resolve_all(&lora_args)?;
    let s = &InpaintSpec { prompt, ..s.clone() };
    let count = s.count.unwrap_or(1);
    let seed = s.seed.unwrap_or_else(random_seed);
    let scheduler = s.scheduler.as_deref().map(str::parse).transpose()?;
    let blend: Blend = s.blend.as_deref().unwrap_or("kiln").parse()?;
    let region = match s.region.as_deref().unwrap_or("auto") {
        "auto" => Region::Auto,
        "whole" => Region::Whole,
        "only-masked" | "only_masked" => Region::OnlyMasked,
        other => return Err(Error::arg("region", format!("`{other}`: expected auto, whole or only-masked"))),
    };
    let reimpose = match s.reimpose.as_deref().unwrap_or("auto") {
        "auto" => None,
        "on" => Some(true),
        "off" => Some(false),
        other => return Err(Error::arg("reimpose", format!("`{other}`: expected auto, on or off"))),
    };
    if let Some(out) = &s.out {
        for i in 0..s.count.unwrap_or(1) {
            check_out_path(&ws.library, &numbered(out, i, s.count.unwrap_or(1)))?;
        }
    }

    // Inputs first (cheap), so bad ones fail before the model load.
    let image_file = image_path(ws, &s.image, "image")?;
    // Decoded once at full depth: the edit runs on 8-bit RGB, the written file keeps the
    // source's bit depth and alpha wherever the edit left pixels unchanged.
    let source_full = crate::image::load_dynamic(&image_file)?;
    let source = source_full.to_rgb8();
    let mask_file = s.mask.as_ref().map(|m| image_path(ws, m, "mask")).transpose()?;
    let read_mask = |path: &std::path::Path| -> Result<Mask> {
        let mut mask = Mask::load(path)?;
        if s.resize_mask {
            mask = mask.resized(source.width(), source.height())?;
        }
        check_inputs(&source, &mask).map_err(|e| Error::arg("mask", format!("{}: {e}", path.display())))?;
        Ok(mask)
    };
    let mut extend = None;
    let (image, mask, prompt, negative, strength, mask_blur, grow) = match s.mode {
        EditMode::Inpaint => {
            let path = mask_file.as_deref().ok_or_else(|| Error::arg("mask", "inpainting needs a mask"))?;
            (
                source.clone(),
                read_mask(path)?,
                s.prompt.clone(),
                s.negative.clone(),
                s.strength.unwrap_or(1.0),
                s.mask_blur,
                None,
            )
        }
        EditMode::Erase => {
            let path = mask_file.as_deref().ok_or_else(|| Error::arg("mask", "erasing needs a mask"))?;
            let grow = s.grow.unwrap_or(DEFAULT_GROW);
            let grown = read_mask(path)?.dilated(grow);
            if grown.is_full() {
                return Err(Error::arg(
                    "grow",
                    format!(
                        "the mask grown by {grow} px covers the whole image {}x{}; use a smaller grow",
                        source.width(),
                        source.height()
                    ),
                ));
            }
            let prompt = if s.prompt.is_empty() { ERASE_PROMPT.to_string() } else { s.prompt.clone() };
            let negative = Some(s.negative.clone().unwrap_or_else(|| ERASE_NEGATIVE.to_string()));
            (source.clone(), grown, prompt, negative, 1.0, s.mask_blur, Some(grow))
        }
        EditMode::Outpaint => {
            let e =
                s.extend.as_ref().ok_or_else(|| Error::arg("extend", "outpainting needs an extension"))?;
            let ext = match &e.to {
                Some(aspect) => {
                    let (aw, ah) = Extension::parse_aspect(aspect)?;
                    Extension::to_aspect(source.width(), source.height(), aw, ah)?
                }
                None => Extension { left: e.left, right: e.right, top: e.top, bottom: e.bottom },
            };
            let fill: Prefill = e.fill.as_deref().unwrap_or("edge").parse()?;
            let overlap = e.overlap.unwrap_or(DEFAULT_OVERLAP);
            let canvas = extend_canvas(&source, ext, fill, overlap, seed)?;
            extend = Some((ext, fill, overlap));
            // The ramp into the original is the feathering.
            (canvas.image, canvas.mask, s.prompt.clone(), s.negative.clone(), 1.0, Some(0.0), None)
        }
    };
    check_inputs(&image, &mask)?;
    let init_latents = s.init_latents.as_deref().map(read_npy).transpose()?;

    sink.emit(JobEvent::Stage { stage: "load".into() });
    let jm = job_model(ws, s.tier.as_deref(), s.model.as_deref(), None, None, count, &loras)?;
    let model = &jm.model;
    let mut warnings = jm.warnings.clone();
    let seeds: Vec<u64> = (0..count as u64).map(|i| seed.wrapping_add(i)).collect();
    // The tier's defaults (or, untiered, the model's) under the spec's values.
    let overrides = Overrides {
        steps: s.steps,
        guidance: s.guidance,
        scheduler,
        negative_prompt: negative,
        ..Overrides::default()
    };
    let fallback = Tier::untiered();
    let defaults =
        tier_request(jm.tier.as_ref().unwrap_or(&fallback), model, &prompt, seeds.clone(), &overrides)?;
    let mut request = InpaintRequest::new(prompt, image.clone(), mask);
    request.negative_prompt = defaults.negative_prompt;
    request.steps = defaults.steps;
    request.guidance = defaults.guidance;
    request.true_cfg = s.true_cfg;
    request.scheduler = defaults.scheduler;
    if jm.tier.is_some() {
        request.native_size = Some((defaults.width as u32, defaults.height as u32));
    }
    request.seeds = seeds.clone();
    request.init_latents = init_latents;
    request.strength = strength;
    request.mask_blur = mask_blur.unwrap_or(match blend {
        Blend::Kiln => 4.0,
        Blend::Diffusers => 0.0,
    });
    request.blend = blend;
    request.region = region;
    request.padding = s.padding.unwrap_or(crate::pipeline::inpaint::DEFAULT_PADDING);
    request.reimpose = reimpose;
    request.vae_tiling = super::spec::vae_tiling(s.vae_tiling.as_deref(), s.vae_tile)?;

    let output = inpaint(model, &request, &mut SinkProgress::new(sink))?;
    warnings.extend(output.warnings.iter().cloned());
    if sink.cancelled() {
        return Err(Error::Cancelled);
    }

    sink.emit(JobEvent::Stage { stage: "write".into() });
    let mode = match s.mode {
        EditMode::Inpaint => "inpaint",
        EditMode::Erase => "erase",
        EditMode::Outpaint => "outpaint",
    };
    let timings = JobTimings::from_stages(jm.load_seconds, &output.timings);
    let credits = jm.tier.as_ref().map(|t| t.price.cost(output.images.len(), timings.device_seconds()));
    let image_ref = file_ref(&image_file)?;
    let mask_ref: Option<FileRef> = mask_file.as_deref().map(file_ref).transpose()?;
    let init_latents_ref = s.init_latents.as_deref().map(file_ref).transpose()?;
    let plan = output.plan;
    let inpaint_record = InpaintRecord {
        mask: mask_ref,
        mask_blur: request.mask_blur,
        blend: match request.blend {
            Blend::Kiln => "kiln",
            Blend::Diffusers => "diffusers",
        }
        .to_string(),
        padding: request.padding,
        only_masked: plan.only_masked,
        crop: [plan.crop.x, plan.crop.y, plan.crop.width, plan.crop.height],
        process_width: plan.process_width,
        process_height: plan.process_height,
        extend: extend.map(|(e, _, _)| [e.left, e.right, e.top, e.bottom]),
        fill: extend.map(|(_, f, _)| match f {
            Prefill::Edge => "edge".to_string(),
            Prefill::Noise => "noise".to_string(),
        }),
        overlap: extend.map(|(_, _, o)| o),
        grow,
        reimpose: request.reimpose,
        native: Some([plan.native_width, plan.native_height]),
    };
    let mut outputs = Vec::new();
    let mut written = Vec::new();
    for (i, img) in output.images.iter().enumerate() {
        let path = match (&s.out, &jm.tier) {
            (Some(out), _) => numbered(out, i, count),
            (None, Some(t)) => ws.output_path("edits", &format!("{mode}-{}-s{}", t.name, img.seed)),
            (None, None) => PathBuf::from(format!("kiln-{mode}-{}.png", img.seed)),
        };
        let record = ImageRecord {
            kiln_version: crate::VERSION.to_string(),
            mode: mode.to_string(),
            model: model_record(&model.source, model.weights.clone()),
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            width: img.image.width() as usize,
            height: img.image.height() as usize,
            steps: request.steps,
            guidance: request.guidance,
            true_cfg: request.true_cfg,
            scheduler: output.scheduler.name().to_string(),
            scheduler_class: model.scheduler_class.clone(),
            scheduler_config: model.scheduler_config_json.clone(),
            seed: img.seed,
            batch_index: i,
            init_latents: init_latents_ref.clone(),
            init_image: Some(image_ref.clone()),
            strength: Some(request.strength),
            dtype: crate::device::dtype_name(model.dtype).to_string(),
            device: crate::device::name(&model.device),
            single_file: None,
            vae: None,
            tier: jm.tier.as_ref().map(|t| t.name.clone()),
            inpaint: Some(inpaint_record.clone()),
            max_sequence_length: None,
            text_encoders: crate::pipeline::metadata::text_placement_record(model),
            // The preset shaped the prompt; its grade is not applied to an edit, whose
            // untouched pixels stay exactly as they were.
            preset: ws.preset.as_ref().map(|p| p.record.clone()),
            grade: None,
            loras: model.loras.clone(),
        };
        let offset = extend.map_or((0, 0), |(e, _, _)| (e.left, e.top));
        crate::image::png_meta::write_dynamic_png_atomic(
            &path,
            &crate::image::depth::restore_depth(&source_full, &img.image, offset),
            &png_chunks(&record, output.scheduler, model),
        )?;
        outputs.push(serde_json::json!({ "path": path, "seed": img.seed }));
        let path = std::path::absolute(&path).unwrap_or(path);
        written.push(WrittenImage { path, seed: img.seed, rgb: img.image.clone(), record });
    }
    let recorded = match &jm.tier {
        Some(tier) => {
            sink.emit(JobEvent::Stage { stage: "record".into() });
            let (record_kind, asset_kind) = match s.mode {
                EditMode::Inpaint => (RecordKind::Inpaint, AssetKind::Inpaint),
                EditMode::Erase => (RecordKind::Erase, AssetKind::Erase),
                EditMode::Outpaint => (RecordKind::Outpaint, AssetKind::Outpaint),
            };
            Some(record_tier_job(
                &mut ws.library,
                record_kind,
                asset_kind,
                tier,
                model,
                timings.clone(),
                &written,
                Some(&image_ref),
            )?)
        }
        None => None,
    };
    let images = output_images(&written, recorded.as_ref(), mode);
    let t = &output.timings;
    let detail = serde_json::json!({
        "outputs": outputs,
        "seeds": seeds,
        "mode": mode,
        "scheduler": output.scheduler.name(),
        "unet": match output.unet_kind {
            UNetKind::Plain => "plain",
            UNetKind::Inpaint => "inpaint",
        },
        "plan": plan,
        "seconds": stage_seconds(jm.load_seconds, t, "inpaint", start),
        "peak_memory_bytes": crate::device::peak_host_memory_bytes(),
        "device": crate::device::name(&model.device),
        "dtype": crate::device::dtype_name(model.dtype),
        "tier": jm.tier.as_ref().map(|t| t.name.clone()),
        "credits": credits,
        "library": recorded,
        "warnings": warnings,
    });
    Ok(JobOutput {
        kind: JobKind::Inpaint,
        library_job_id: recorded.as_ref().map(|r| r.job_id),
        images,
        device_seconds: timings.device_seconds(),
        timings,
        credits: credits.unwrap_or(0.0),
        warnings,
        detail,
    })
}
