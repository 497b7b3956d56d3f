//! The upscale stage of the workflow: an asset (a promoted final, usually) run through the
//! `upscale` tier's super-resolution model and recorded as its own asset, child of the input,
//! with its parameters, model hash, timings, device and cost (ledger stage `upscale`).

use super::{resolve_input, AssetRef, Workspace};
use crate::error::{Error, Result};
use crate::jobs::pool::Pooled;
use crate::library::assets::{AssetKind, JobTimings, NewAsset, NewJob, RecordKind};
use crate::pipeline::model::WeightRecord;
use crate::pipeline::upscale::{Target, UpscaleOptions, Upscaler};
use crate::tiers::drift::{self, DriftOutcome};
use crate::tiers::load::{load_upscale_tier_model, tier_dtype};
use crate::tiers::Tier;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// An upscale tier's model, loaded once.
pub struct WarmUpscaler {
    pub tier: Tier,
    pub upscaler: Arc<Upscaler>,
    /// The model's weight files (store blob or file), as locked in kiln.lock.
    pub weights: Vec<WeightRecord>,
    /// Seconds the load took; billed to the first job that uses it, then 0.
    pub load_seconds: f64,
    pub drift: DriftOutcome,
    pub dtype: candle_core::DType,
}

impl Workspace {
    /// Loads an upscale tier's model and checks it against the project's drift lock.
    pub fn load_upscale_tier(&self, name: &str) -> Result<WarmUpscaler> {
        let tier = self.tiers.get(name)?.clone();
        crate::tiers::load::require_upscale(&tier)?;
        let dtype = tier_dtype(&tier, &self.options.device, self.options.dtype)?;
        let key = self.tier_key(&tier, dtype);
        let (pooled, load_seconds) = self.pool.get_or_load(&key, None, || {
            let (up, weights) = load_upscale_tier_model(&tier, &self.options.device, dtype)?;
            let bytes = weights_bytes(&up);
            Ok((Pooled::Upscaler(Arc::new(up), weights), bytes))
        })?;
        let Pooled::Upscaler(upscaler, weights) = pooled else {
            return Err(Error::Unsupported(format!("tier `{name}` is loaded as another kind of model")));
        };
        let drift =
            drift::check_files(&self.project.lock_path(), &tier, &weights, self.options.accept_drift)?;
        Ok(WarmUpscaler { tier, upscaler, weights, load_seconds, drift, dtype })
    }
}

/// The image an upscale reads, with its generation record when it has one.
struct Input {
    path: PathBuf,
    record: Option<crate::pipeline::metadata::ImageRecord>,
    asset_id: Option<i64>,
}

/// Bytes an upscaler is counted as in the model pool: Real-ESRGAN x4plus, the largest
/// shipped, is 67 MB in f32; the others are smaller.
fn weights_bytes(_: &Upscaler) -> u64 {
    70_000_000
}

/// Parses `--upscale`: `4k`, `8k`, `WxH`, or a scale factor (`2`, `4`, `1.5`).
pub fn parse_target(s: &str) -> Result<Target> {
    match s.trim().parse::<f64>() {
        Ok(scale) if scale.is_finite() && scale > 0.0 && scale <= 64.0 => Ok(Target::Scale(scale)),
        Ok(_) => Err(Error::arg("upscale", format!("`{s}`: a scale must be in (0, 64]"))),
        Err(_) => Target::parse_to(s).map_err(|_| {
            Error::arg("upscale", format!("`{s}`: expected 4k, 8k, WIDTHxHEIGHT or a scale such as 4"))
        }),
    }
}

/// What an upscale step produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpscaleStepResult {
    pub job_id: i64,
    pub asset_id: i64,
    pub parent_asset_id: Option<i64>,
    pub path: PathBuf,
    pub input_size: [usize; 2],
    pub output_size: [usize; 2],
    pub model: String,
    pub model_sha256: Option<String>,
    pub timings: JobTimings,
    pub credits: f64,
    pub warnings: Vec<String>,
}

/// Upscales a library asset, a kiln PNG or (for clients that send plain images) any image file
/// with the warm upscale tier and records the result, child of the input's asset when it is one.
/// `progress` gets (tiles done, total) after every tile row; returning false cancels.
pub fn upscale_asset(
    ws: &mut Workspace,
    warm: &mut WarmUpscaler,
    input: &AssetRef,
    target: Option<Target>,
    tile: Option<usize>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<UpscaleStepResult> {
    // A plain image (no kiln record) upscales too; its result simply has no generation record.
    let resolved = match (resolve_input(&ws.library, &ws.project.root, input, "upscale"), input) {
        (Ok(r), _) => Input { path: r.path, record: Some(r.record), asset_id: r.asset_id },
        (Err(Error::Image { .. }), AssetRef::File(path)) if path.is_file() => {
            Input { path: path.clone(), record: None, asset_id: None }
        }
        (Err(e), _) => return Err(e),
    };
    let warnings: Vec<String> = ws.check_budget(&warm.tier, 1)?.into_iter().collect();
    let cpu0 = super::process_cpu_seconds();
    let stem = resolved.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let out = ws.output_path("upscaled", &format!("{stem}-up"));
    if let Some(dir) = out.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let options = UpscaleOptions { target, tile, ..Default::default() };
    let t0 = Instant::now();
    // Written atomically (temp file + rename) by the streamed PNG writer, before it is recorded.
    let report = warm.upscaler.upscale_file_until(&resolved.path, &out, &options, progress)?;
    let upscale_seconds = t0.elapsed().as_secs_f64();

    let timings = JobTimings {
        load: std::mem::take(&mut warm.load_seconds),
        upscale: upscale_seconds,
        cpu_seconds: super::cpu_seconds_since(cpu0),
        peak_memory_bytes: crate::device::peak_host_memory_bytes(),
        ..Default::default()
    };
    let credits = warm.tier.price.cost(1, timings.device_seconds());
    let device = crate::device::name(&ws.options.device);
    let params = serde_json::json!({
        "step": "upscale",
        "tier": warm.tier.name,
        "model": report.model,
        "arch": warm.upscaler.spec().arch_name(),
        "model_scale": warm.upscaler.spec().scale(),
        "model_sha256": report.sha256,
        "target": target,
        "input_size": report.input_size,
        "output_size": report.output_size,
        "passes": report.passes,
        "tiles": report.tiles,
        "tile": report.tile,
        "halo": report.halo,
        "feather": report.feather,
        "dtype": crate::device::dtype_name(warm.dtype),
        "device": device,
    });
    let job = NewJob {
        kind: RecordKind::Upscale,
        tier: Some(warm.tier.name.clone()),
        device,
        dtype: crate::device::dtype_name(warm.dtype).to_string(),
        model_id: warm.tier.model.clone(),
        images: 1,
        timings: timings.clone(),
        credits,
    };
    let [w, h] = report.output_size;
    let asset = NewAsset {
        kind: AssetKind::Upscaled,
        tier: Some(warm.tier.name.clone()),
        path: out.clone(),
        parent_id: resolved.asset_id,
        width: u32::try_from(w).unwrap_or(u32::MAX),
        height: u32::try_from(h).unwrap_or(u32::MAX),
        seed: resolved.record.as_ref().map(|r| r.seed),
        prompt: resolved.record.as_ref().map(|r| r.prompt.clone()),
        // The generation record of the image that was upscaled; the upscale step is `params`.
        record: resolved.record.clone(),
        model_hashes: warm.weights.clone(),
        credits,
    };
    let (job_id, ids) = ws.library.record_job_with_params(&job, &[asset], &[Some(params)])?;
    Ok(UpscaleStepResult {
        job_id,
        asset_id: ids.first().copied().unwrap_or_default(),
        parent_asset_id: resolved.asset_id,
        path: out,
        input_size: report.input_size,
        output_size: report.output_size,
        model: report.model,
        model_sha256: report.sha256,
        timings,
        credits,
        warnings,
    })
}
