//! `kiln draft`: N variants of a prompt with seeds S..S+N-1 from the warm draft model, one
//! generation batch, plus a labelled contact sheet; recorded as one job.

use super::{job_and_assets, write_images, WarmModel, Workspace};
use crate::error::{Error, Result};
use crate::image::sheet::{contact_sheet, SheetCell};
use crate::library::assets::{AssetKind, JobTimings, NewAsset, RecordKind};
use crate::pipeline::generate::{generate, Progress};
use crate::tiers::load::{tier_request, Overrides};
use std::path::PathBuf;

/// Largest draft batch.
pub const MAX_DRAFTS: usize = 256;
/// Contact sheet thumbnails are at most this many pixels a side.
pub const SHEET_THUMB: u32 = 512;

/// What to draft.
#[derive(Debug, Clone)]
pub struct DraftRequest {
    pub prompt: String,
    pub count: usize,
    pub seed: u64,
    pub overrides: Overrides,
}

/// One recorded draft.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DraftImage {
    pub asset_id: i64,
    pub index: usize,
    pub seed: u64,
    pub path: PathBuf,
}

/// What a draft job produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DraftResult {
    pub job_id: i64,
    pub images: Vec<DraftImage>,
    pub sheet_asset_id: i64,
    pub sheet: PathBuf,
    pub timings: JobTimings,
    pub credits: f64,
    pub warnings: Vec<String>,
}

/// Runs a draft batch with `warm` (whose load time is billed once, to the first job).
pub fn draft(
    ws: &mut Workspace,
    warm: &mut WarmModel,
    req: &DraftRequest,
    progress: &mut dyn Progress,
) -> Result<DraftResult> {
    if req.count == 0 || req.count > MAX_DRAFTS {
        return Err(Error::arg("count", format!("{} is outside 1..={MAX_DRAFTS}", req.count)));
    }
    let mut warnings: Vec<String> = ws.check_budget(&warm.tier, req.count)?.into_iter().collect();
    let cpu0 = super::process_cpu_seconds();
    let seeds: Vec<u64> = (0..req.count as u64).map(|i| req.seed.wrapping_add(i)).collect();
    let request = tier_request(&warm.tier, &warm.model, &req.prompt, seeds, &req.overrides)?;
    let output = generate(&warm.model, &request, progress)?;
    warnings.extend(output.warnings.iter().cloned());

    let mut path_for = |i: usize, seed: u64| ws.output_path("drafts", &format!("draft-{i}-s{seed}"));
    let written = write_images(
        &warm.model,
        &request,
        &output,
        Some(&warm.tier.name),
        None,
        ws.preset.as_ref(),
        &mut path_for,
    )?;

    let labels: Vec<Vec<String>> =
        written.iter().enumerate().map(|(i, w)| vec![format!("#{i}"), format!("seed {}", w.seed)]).collect();
    let cells: Vec<SheetCell> =
        written.iter().zip(labels).map(|(w, lines)| SheetCell { image: &w.rgb, lines }).collect();
    let sheet_rgb = contact_sheet(&cells, SHEET_THUMB)?;
    let sheet_path = ws.output_path("sheets", &format!("sheet-s{}", req.seed));
    let sheet_text = crate::image::png_meta::TextChunk::new(
        "kiln-sheet",
        serde_json::json!({ "prompt": req.prompt, "seeds": written.iter().map(|w| w.seed).collect::<Vec<_>>() })
            .to_string(),
    );
    crate::image::png_meta::write_png_atomic(&sheet_path, &sheet_rgb, &[sheet_text])?;

    let mut timings = JobTimings::from_stages(std::mem::take(&mut warm.load_seconds), &output.timings);
    timings.cpu_seconds = super::cpu_seconds_since(cpu0);
    let (job, mut assets) = job_and_assets(
        RecordKind::Draft,
        AssetKind::of_tier(&warm.tier),
        Some(&warm.tier),
        &warm.model,
        timings.clone(),
        &written,
        None,
    );
    assets.push(NewAsset {
        kind: AssetKind::Sheet,
        tier: Some(warm.tier.name.clone()),
        path: sheet_path.clone(),
        parent_id: None,
        width: sheet_rgb.width(),
        height: sheet_rgb.height(),
        seed: None,
        prompt: Some(req.prompt.clone()),
        record: None,
        model_hashes: Vec::new(),
        credits: 0.0,
    });
    let credits = job.credits;
    let (job_id, ids) = ws.library.record_job(&job, &assets)?;
    let images = written
        .iter()
        .zip(&ids)
        .enumerate()
        .map(|(index, (w, &asset_id))| DraftImage { asset_id, index, seed: w.seed, path: w.path.clone() })
        .collect();
    let sheet_asset_id = ids.last().copied().unwrap_or_default();
    Ok(DraftResult { job_id, images, sheet_asset_id, sheet: sheet_path, timings, credits, warnings })
}
