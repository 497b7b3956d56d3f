//! Hallucination-QC reports ([`crate::image::qc`]) stored on the asset they judge: one row per
//! asset in `asset_qc`, replaced by a newer run, read back with the asset ([`AssetRow::qc`]).
//!
//! [`AssetRow::qc`]: super::assets::AssetRow::qc

use super::{now_unix, Library};
use crate::error::{Error, Result};
use crate::image::load_rgb;
use crate::image::png_meta::write_png_atomic;
use crate::image::qc::{self, QcOptions, QcReport};
use crate::vals;
use std::path::{Path, PathBuf};

impl Library {
    /// Stores (or replaces) the QC report of asset `id` (an unknown id is an error naming it).
    pub fn set_qc(&mut self, id: i64, report: &serde_json::Value) -> Result<()> {
        self.asset(id)?;
        self.db
            .execute(
                "INSERT INTO asset_qc (asset_id, json, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(asset_id) DO UPDATE SET json = excluded.json, created_at = excluded.created_at",
                vals![id, report.to_string(), now_unix()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// What `kiln qc` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QcRun {
    pub output: PathBuf,
    pub source: PathBuf,
    pub heatmap: PathBuf,
    pub sheet: PathBuf,
    /// The library asset the report was stored on, when the output is one.
    pub asset_id: Option<i64>,
    pub report: QcReport,
}

/// QC of `output` against `source` (default: the output's parent asset in `library`). Writes
/// `<stem>.qc-heatmap.png` and `<stem>.qc-sheet.png` (atomically) into `out_dir` (default: beside
/// the output) and stores the report on the output's asset when the library has it.
pub fn run_qc(
    output: &Path,
    source: Option<&Path>,
    library: Option<&mut Library>,
    options: &QcOptions,
    out_dir: Option<&Path>,
) -> Result<QcRun> {
    if !output.is_file() {
        return Err(Error::not_found("image", output, "pass the upscaled image to check"));
    }
    let asset = match library.as_deref() {
        Some(lib) => lib.asset_for_file(output)?,
        None => None,
    };
    let source = match (source, &asset, library.as_deref()) {
        (Some(s), _, _) => s.to_path_buf(),
        (None, Some(a), Some(lib)) => {
            let parent = a.parent_id.ok_or_else(|| {
                Error::arg(
                    "source",
                    format!("asset {} has no parent to compare with; pass --source SRC", a.id),
                )
            })?;
            lib.root.join(lib.asset(parent)?.path)
        }
        (None, _, _) => {
            return Err(Error::arg(
                "source",
                format!(
                "{} is not an asset of this project's library, so its source is unknown; pass --source SRC",
                output.display()
            ),
            ))
        }
    };
    let out_img = load_rgb(output)?;
    let src_img = load_rgb(&source)?;
    let report = qc::check(&src_img, &out_img, options)?;
    let dir = match out_dir {
        Some(d) => d.to_path_buf(),
        None => output.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    fs_err::create_dir_all(if dir.as_os_str().is_empty() { Path::new(".") } else { &dir })?;
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let heatmap = dir.join(format!("{stem}.qc-heatmap.png"));
    let sheet = dir.join(format!("{stem}.qc-sheet.png"));
    write_png_atomic(&heatmap, &qc::heatmap(&src_img, &report), &[])?;
    write_png_atomic(&sheet, &qc::worst_tiles_sheet(&out_img, &report)?, &[])?;
    let asset_id = asset.as_ref().map(|a| a.id);
    if let (Some(id), Some(lib)) = (asset_id, library) {
        let rel = |p: &Path| p.strip_prefix(&lib.root).unwrap_or(p).to_string_lossy().into_owned();
        let mut stored = serde_json::to_value(&report).map_err(|e| Error::Unsupported(e.to_string()))?;
        stored["source"] = rel(&source).into();
        stored["heatmap"] = rel(&heatmap).into();
        stored["sheet"] = rel(&sheet).into();
        lib.set_qc(id, &stored)?;
    }
    Ok(QcRun { output: output.to_path_buf(), source, heatmap, sheet, asset_id, report })
}
