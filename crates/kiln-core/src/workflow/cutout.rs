//! The cutout step: an image (a library asset, an upload or a file) through a matting model
//! ([`crate::pipeline::cutout`]), written as an RGBA PNG (or composited onto a colour or an
//! image) and recorded as an asset of kind `cutout`, child of the input's asset when it is one,
//! with the model's hash, the options, timings and device.

use super::Workspace;
use crate::error::{Error, Result};
use crate::image::png_meta::{read_png_text, write_png_atomic, write_rgba_atomic, TextChunk};
use crate::library::assets::{AssetKind, JobTimings, NewAsset, NewJob, RecordKind};
use crate::loaders::matting::MattingStore;
use crate::pipeline::cutout::{
    cutout, fit_background, parse_color, Background, CutoutImage, CutoutOptions, CutoutStage, MattingModel,
};
use crate::pipeline::model::WeightRecord;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// PNG text keyword of the cutout step's parameters (beside the source's own `kiln` record).
pub const META_KEY: &str = "kiln.cutout";

/// What a cutout step needs, its images already resolved to files.
pub struct CutoutRequest<'a> {
    pub image: &'a Path,
    /// An imported matting model's name, or (CLI) an .onnx file; None = u2netp.
    pub model: Option<&'a str>,
    pub background: Option<&'a str>,
    pub background_image: Option<&'a Path>,
    pub fit_background: bool,
    pub refine: bool,
}

/// What a cutout step produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CutoutStepResult {
    pub job_id: i64,
    pub asset_id: i64,
    pub parent_asset_id: Option<i64>,
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    /// Share of the image the subject covers (alpha ≥ 50 %).
    pub coverage: f64,
    pub model: String,
    pub model_sha256: String,
    pub timings: JobTimings,
}

/// Cuts the subject out of `req.image` and records the result. `stage` is told each stage
/// (load, then the matting stages); returning false cancels before anything is written.
pub fn cutout_asset(
    ws: &mut Workspace,
    req: &CutoutRequest,
    stage: &mut dyn FnMut(&str) -> bool,
) -> Result<CutoutStepResult> {
    let cancelled = || Error::Cancelled;
    let image = crate::image::load_rgb(req.image)?;
    // The source's generation record and text chunks travel with the cutout (as with an
    // upscale), so its lineage keeps the prompt and seed; plain images have none.
    let source_chunks: Vec<TextChunk> = read_png_text(req.image).unwrap_or_default();
    let record = crate::pipeline::metadata::record_from_chunks(&source_chunks);
    let parent = ws.library.asset_for_file(req.image)?;
    let background = match (req.background, req.background_image) {
        (Some(c), _) => Background::Color(
            parse_color(c).ok_or_else(|| Error::arg("background", format!("`{c}` is not a colour")))?,
        ),
        (None, Some(path)) => {
            let bg = crate::image::load_rgb(path)?;
            if req.fit_background {
                Background::Image(fit_background(&bg, image.width(), image.height()))
            } else {
                Background::Image(bg)
            }
        }
        (None, None) => Background::Transparent,
    };

    if !stage("load") {
        return Err(cancelled());
    }
    let cpu0 = super::process_cpu_seconds();
    let t0 = Instant::now();
    let weights = MattingStore::open_default()?.resolve(req.model)?;
    let model = MattingModel::load(weights, &ws.options.device)?;
    let load = t0.elapsed().as_secs_f64();
    if !stage("cutout") {
        return Err(cancelled());
    }
    let opts = CutoutOptions { refine: req.refine, background };
    let out = cutout(&model, &image, &opts, &mut |_: CutoutStage| {})?;
    if !stage("write") {
        return Err(cancelled());
    }

    let stem = req.image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let path = ws.output_path("cutout", &format!("{stem}-cutout"));
    let params = serde_json::json!({
        "step": "cutout",
        "model": model.name,
        "model_sha256": model.sha256,
        "arch": model.spec.arch_name(),
        "refine": req.refine,
        "background": req.background,
        "background_image": req.background_image.map(|_| true),
        "fit_background": req.fit_background,
        "coverage": out.coverage,
        "version": crate::VERSION,
    });
    let mut chunks: Vec<TextChunk> = source_chunks.into_iter().filter(|c| c.keyword != META_KEY).collect();
    chunks.push(TextChunk::new(META_KEY, params.to_string()));
    match &out.image {
        CutoutImage::Rgba(img) => write_rgba_atomic(&path, img, &chunks)?,
        CutoutImage::Rgb(img) => write_png_atomic(&path, img, &chunks)?,
    }

    let timings = JobTimings {
        load,
        matting: out.timings.total,
        cpu_seconds: super::cpu_seconds_since(cpu0),
        peak_memory_bytes: crate::device::peak_host_memory_bytes(),
        ..Default::default()
    };
    let device = crate::device::name(&ws.options.device);
    let job = NewJob {
        kind: RecordKind::Cutout,
        tier: None,
        device,
        // The matting net always runs in f32 (its mask must match the reference's).
        dtype: "f32".into(),
        model_id: model.name.clone(),
        images: 1,
        timings: timings.clone(),
        credits: 0.0,
    };
    let (width, height) = image.dimensions();
    let asset = NewAsset {
        kind: AssetKind::Cutout,
        tier: None,
        path: path.clone(),
        parent_id: parent.as_ref().map(|a| a.id),
        width,
        height,
        seed: record.as_ref().map(|r| r.seed),
        prompt: record.as_ref().map(|r| r.prompt.clone()),
        record,
        model_hashes: vec![WeightRecord {
            component: "matting".into(),
            file: format!("{}.onnx", model.name),
            sha256: model.sha256.clone(),
        }],
        credits: 0.0,
    };
    let (job_id, ids) = ws.library.record_job_with_params(&job, &[asset], &[Some(params)])?;
    Ok(CutoutStepResult {
        job_id,
        asset_id: ids.first().copied().unwrap_or_default(),
        parent_asset_id: parent.map(|a| a.id),
        path,
        width,
        height,
        coverage: out.coverage,
        model: model.name,
        model_sha256: model.sha256,
        timings,
    })
}
