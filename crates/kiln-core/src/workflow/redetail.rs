//! The re-detail step of a chain (`upscale` or `promote --upscale` with `redetail`): a
//! library asset (usually the upscale just made) re-detailed by a diffusion tier on blended
//! latent tiles ([`crate::pipeline::redetail`]), recorded as its child with the step's
//! parameters, timings and cost.

use super::upscale::UpscaleStepResult;
use super::{WarmModel, Workspace};
use crate::error::Result;
use crate::library::assets::{AssetKind, JobTimings, NewAsset, NewJob, RecordKind};
use crate::pipeline::generate::Progress;
use crate::pipeline::redetail::{redetail_png, RedetailRequest};

/// Re-details asset `asset_id` with the warm diffusion tier `warm`; `request` carries the
/// options (its image and, when empty, its prompt are taken from the asset).
pub fn redetail_asset(
    ws: &mut Workspace,
    warm: &mut WarmModel,
    asset_id: i64,
    mut request: RedetailRequest,
    progress: &mut dyn Progress,
) -> Result<UpscaleStepResult> {
    let input = ws.library.asset(asset_id)?;
    let warnings: Vec<String> = ws.check_budget(&warm.tier, 1)?.into_iter().collect();
    if request.prompt.is_empty() {
        request.prompt = input.prompt.clone().unwrap_or_default();
    }
    let source = ws.project.root.join(&input.path);
    let stem = source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let out = ws.output_path("upscaled", &format!("{stem}-detail"));
    if let Some(dir) = out.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let cpu0 = super::process_cpu_seconds();
    let report = redetail_png(&warm.model, &source, &out, request, progress)?;
    let timings = JobTimings {
        load: std::mem::take(&mut warm.load_seconds),
        steps: vec![report.seconds],
        cpu_seconds: super::cpu_seconds_since(cpu0),
        peak_memory_bytes: crate::device::peak_host_memory_bytes(),
        ..Default::default()
    };
    let credits = warm.tier.price.cost(1, timings.device_seconds());
    let device = crate::device::name(&warm.model.device);
    let dtype = crate::device::dtype_name(warm.model.dtype).to_string();
    let mut params = serde_json::to_value(&report).unwrap_or_default();
    if let Some(obj) = params.as_object_mut() {
        obj.insert("step".into(), "redetail".into());
        obj.insert("tier".into(), warm.tier.name.clone().into());
        obj.insert("device".into(), device.clone().into());
        obj.insert("dtype".into(), dtype.clone().into());
    }
    let job = NewJob {
        kind: RecordKind::Redetail,
        tier: Some(warm.tier.name.clone()),
        device,
        dtype,
        model_id: warm.tier.model.clone(),
        images: 1,
        timings: timings.clone(),
        credits,
    };
    let [w, h] = report.size;
    let asset = NewAsset {
        kind: AssetKind::Upscaled,
        tier: Some(warm.tier.name.clone()),
        path: out.clone(),
        parent_id: Some(asset_id),
        width: u32::try_from(w).unwrap_or(u32::MAX),
        height: u32::try_from(h).unwrap_or(u32::MAX),
        seed: input.seed,
        prompt: Some(report.prompt.clone()),
        record: input.record.clone(),
        model_hashes: warm.model.weights.clone(),
        credits,
    };
    let (job_id, ids) = ws.library.record_job_with_params(&job, &[asset], &[Some(params)])?;
    Ok(UpscaleStepResult {
        job_id,
        asset_id: ids.first().copied().unwrap_or_default(),
        parent_asset_id: Some(asset_id),
        path: out,
        input_size: [input.width as usize, input.height as usize],
        output_size: report.size,
        model: report.model,
        model_sha256: None,
        timings,
        credits,
        warnings,
    })
}
