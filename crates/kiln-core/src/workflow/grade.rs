//! The grade step: a library asset colour-graded with a 3D LUT (`.cube`), written beside the
//! project's other outputs and recorded as the asset's child, with the LUT's sha256, the
//! strength and the interpolation, so a delivered grade is as traceable as the generation.

use super::Workspace;
use crate::error::Result;
use crate::image::lut::{grade_file, GradeReport, Interpolation, Lut3d};
use crate::library::assets::{AssetKind, JobTimings, NewAsset, NewJob, RecordKind};
use crate::pipeline::model::WeightRecord;
use std::path::{Path, PathBuf};

/// What a grade step produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GradeStepResult {
    pub job_id: i64,
    pub asset_id: i64,
    pub parent_asset_id: Option<i64>,
    pub path: PathBuf,
    pub report: GradeReport,
    pub timings: JobTimings,
}

/// Grades the image at `input` (a library asset's file, or any image) with the LUT at `lut_path`
/// and records the result, child of the input's asset when it is one.
pub fn grade_asset(
    ws: &mut Workspace,
    input: &Path,
    lut_path: &Path,
    interp: Interpolation,
    strength: f32,
) -> Result<GradeStepResult> {
    let lut = Lut3d::read(lut_path)?;
    let parent = ws.library.asset_for_file(input)?;
    let cpu0 = super::process_cpu_seconds();
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let out = ws.output_path("graded", &format!("{stem}-graded"));
    let report = grade_file(&lut, lut_path, input, &out, interp, strength)?;
    let timings = JobTimings {
        cpu_seconds: super::cpu_seconds_since(cpu0),
        peak_memory_bytes: crate::device::peak_host_memory_bytes(),
        ..Default::default()
    };
    let lut_name = lut_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut params = serde_json::to_value(&report).unwrap_or_default();
    if let Some(obj) = params.as_object_mut() {
        obj.insert("step".into(), "grade".into());
    }
    let job = NewJob {
        kind: RecordKind::Grade,
        tier: None,
        // A pixel operation on the host, whatever the job's device.
        device: "cpu".into(),
        dtype: "f32".into(),
        model_id: format!("lut:{lut_name}"),
        images: 1,
        timings: timings.clone(),
        credits: 0.0,
    };
    let [width, height] = report.size;
    let asset = NewAsset {
        kind: AssetKind::Graded,
        tier: parent.as_ref().and_then(|a| a.tier.clone()),
        path: out.clone(),
        parent_id: parent.as_ref().map(|a| a.id),
        width,
        height,
        seed: parent.as_ref().and_then(|a| a.seed),
        prompt: parent.as_ref().and_then(|a| a.prompt.clone()),
        record: parent.as_ref().and_then(|a| a.record.clone()),
        model_hashes: vec![WeightRecord {
            component: "lut".into(),
            file: lut_name,
            sha256: report.lut_sha256.clone(),
        }],
        credits: 0.0,
    };
    let (job_id, ids) = ws.library.record_job_with_params(&job, &[asset], &[Some(params)])?;
    Ok(GradeStepResult {
        job_id,
        asset_id: ids.first().copied().unwrap_or_default(),
        parent_asset_id: parent.map(|a| a.id),
        path: out,
        report,
        timings,
    })
}
