//! `kiln promote`: a chosen draft re-rendered by the final tier. `img2img` (default) starts
//! from the draft resized to the final size with the same prompt and seed, so the approved
//! layout survives; `reseed` runs the final model from the draft's seed and prompt alone. The
//! result's similarity to the draft (final downscaled to the draft's size) is measured.

use super::{job_and_assets, resolve_input, write_images, AssetRef, WarmModel, Workspace};
use crate::error::{Error, Result};
use crate::image::compare::{psnr, ssim};
use crate::library::assets::{AssetKind, JobTimings, RecordKind};
use crate::pipeline::generate::{generate, Progress};
use crate::pipeline::metadata::FileRef;
use crate::tiers::load::{tier_request, Overrides};
use std::path::PathBuf;

/// How the final is made from the draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromoteMode {
    Img2img,
    Reseed,
}

impl std::str::FromStr for PromoteMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "img2img" => Ok(Self::Img2img),
            "reseed" => Ok(Self::Reseed),
            _ => Err(Error::arg("mode", format!("`{s}`: expected img2img or reseed"))),
        }
    }
}

/// What to promote.
#[derive(Debug, Clone)]
pub struct PromoteRequest {
    pub draft: AssetRef,
    pub mode: PromoteMode,
    /// img2img strength in (0, 1].
    pub strength: f64,
    pub overrides: Overrides,
}

/// What a promotion produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromoteResult {
    pub job_id: i64,
    pub asset_id: i64,
    pub parent_asset_id: Option<i64>,
    pub path: PathBuf,
    pub mode: PromoteMode,
    pub seed: u64,
    /// SSIM of the final, downscaled to the draft's size, against the draft (1 = identical).
    pub ssim: f64,
    /// PSNR in dB of the same comparison.
    pub psnr: f64,
    pub timings: JobTimings,
    pub credits: f64,
    pub warnings: Vec<String>,
}

/// Promotes a draft with the warm final-tier model.
pub fn promote(
    ws: &mut Workspace,
    warm: &mut WarmModel,
    req: &PromoteRequest,
    progress: &mut dyn Progress,
) -> Result<PromoteResult> {
    if req.mode == PromoteMode::Img2img && !(req.strength > 0.0 && req.strength <= 1.0) {
        return Err(Error::arg("strength", format!("{} must be in (0, 1]", req.strength)));
    }
    let input = resolve_input(&ws.library, &ws.project.root, &req.draft, "promote")?;
    let draft_rgb = crate::image::load_rgb(&input.path)?;
    let mut warnings: Vec<String> = ws.check_budget(&warm.tier, 1)?.into_iter().collect();
    let cpu0 = super::process_cpu_seconds();

    let record = &input.record;
    let mut overrides = req.overrides.clone();
    if overrides.negative_prompt.is_none() {
        overrides.negative_prompt = record.negative_prompt.clone();
    }
    let mut request = tier_request(&warm.tier, &warm.model, &record.prompt, vec![record.seed], &overrides)?;
    let init_ref = match req.mode {
        PromoteMode::Img2img => {
            request.init_image = Some(draft_rgb.clone());
            request.strength = req.strength;
            let abs = std::fs::canonicalize(&input.path).unwrap_or_else(|_| input.path.clone());
            Some(FileRef {
                path: abs.display().to_string(),
                sha256: crate::loaders::weights::sha256_file(&input.path)?,
            })
        }
        PromoteMode::Reseed => None,
    };
    let output = generate(&warm.model, &request, progress)?;
    warnings.extend(output.warnings.iter().cloned());

    let mut path_for = |_: usize, seed: u64| ws.output_path("finals", &format!("final-s{seed}"));
    let preset = ws.preset.clone();
    let written = write_images(
        &warm.model,
        &request,
        &output,
        Some(&warm.tier.name),
        init_ref,
        preset.as_ref(),
        &mut path_for,
    )?;
    let final_img =
        written.first().ok_or_else(|| Error::Unsupported("generation returned no image".into()))?;
    let small = crate::image::resize_rgb(&final_img.rgb, draft_rgb.width(), draft_rgb.height());
    let (ssim_v, psnr_v) = (ssim(&small, &draft_rgb)?, psnr(&small, &draft_rgb)?);

    let mut timings = JobTimings::from_stages(std::mem::take(&mut warm.load_seconds), &output.timings);
    timings.cpu_seconds = super::cpu_seconds_since(cpu0);
    let (job, assets) = job_and_assets(
        RecordKind::Promote,
        AssetKind::of_tier(&warm.tier),
        Some(&warm.tier),
        &warm.model,
        timings.clone(),
        &written,
        input.asset_id,
    );
    let credits = job.credits;
    let (job_id, ids) = ws.library.record_job(&job, &assets)?;
    Ok(PromoteResult {
        job_id,
        asset_id: ids.first().copied().unwrap_or_default(),
        parent_asset_id: input.asset_id,
        path: final_img.path.clone(),
        mode: req.mode,
        seed: record.seed,
        ssim: ssim_v,
        psnr: psnr_v,
        timings,
        credits,
        warnings,
    })
}
