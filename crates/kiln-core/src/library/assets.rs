//! Recording jobs and their assets (one transaction per job) and reading them back.

use super::{now_unix, Library};
use crate::error::{Error, Result};
use crate::pipeline::generate::StageTimings;
use crate::pipeline::metadata::ImageRecord;
use crate::pipeline::model::WeightRecord;
use crate::store::{DbResult, Row};
use crate::vals;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Seconds a job spent, by stage. `device_seconds` is what the ledger bills.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct JobTimings {
    /// Model load (0 when the model was already warm).
    pub load: f64,
    pub text_encode: f64,
    pub vae_encode: f64,
    /// Each denoising step (UNet + solver).
    pub steps: Vec<f64>,
    pub vae_decode: f64,
    /// Super-resolution (upscale jobs).
    #[serde(default)]
    pub upscale: f64,
    /// Matting net, mask and composite (cutout jobs).
    #[serde(default)]
    pub matting: f64,
    /// Process CPU time (user + system) during the job, when the OS reports it.
    pub cpu_seconds: Option<f64>,
    pub peak_memory_bytes: Option<u64>,
}

impl JobTimings {
    /// From a generation's stage timings plus the load time.
    pub fn from_stages(load: f64, t: &StageTimings) -> Self {
        Self {
            load,
            text_encode: t.text_encode,
            vae_encode: t.vae_encode,
            steps: t.steps.clone(),
            vae_decode: t.vae_decode,
            upscale: 0.0,
            matting: 0.0,
            cpu_seconds: None,
            peak_memory_bytes: crate::device::peak_host_memory_bytes(),
        }
    }

    pub fn steps_total(&self) -> f64 {
        self.steps.iter().sum()
    }

    /// The sum of the stages: load + text encode + VAE encode + steps + VAE decode + upscale +
    /// matting.
    pub fn device_seconds(&self) -> f64 {
        self.load
            + self.text_encode
            + self.vae_encode
            + self.steps_total()
            + self.vae_decode
            + self.upscale
            + self.matting
    }
}

/// What a recorded job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Draft,
    Promote,
    Generate,
    Replay,
    Upscale,
    Inpaint,
    Erase,
    Outpaint,
    /// Diffusion re-detail of an upscale (blended latent tiles).
    Redetail,
    /// Background removal with a matting model.
    Cutout,
    /// A colour grade (3D LUT).
    Grade,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Draft => "draft",
            RecordKind::Promote => "promote",
            RecordKind::Generate => "generate",
            RecordKind::Replay => "replay",
            RecordKind::Upscale => "upscale",
            RecordKind::Inpaint => "inpaint",
            RecordKind::Erase => "erase",
            RecordKind::Outpaint => "outpaint",
            RecordKind::Redetail => "redetail",
            RecordKind::Cutout => "cutout",
            RecordKind::Grade => "grade",
        }
    }
}

/// What an asset is. Drafts and finals are told apart by their tier's lane, not its name, so
/// the ledger's draft:final ratio holds whatever the tiers are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssetKind {
    Draft,
    Final,
    Sheet,
    Replay,
    Upscaled,
    Inpaint,
    Erase,
    Outpaint,
    /// A subject cut out of its background (RGBA, or composited onto a new one).
    Cutout,
    /// An image colour-graded with a 3D LUT.
    Graded,
}

impl AssetKind {
    /// Every kind, as stored and as filters name them.
    pub const ALL: [AssetKind; 10] = [
        AssetKind::Draft,
        AssetKind::Final,
        AssetKind::Sheet,
        AssetKind::Replay,
        AssetKind::Upscaled,
        AssetKind::Inpaint,
        AssetKind::Erase,
        AssetKind::Outpaint,
        AssetKind::Cutout,
        AssetKind::Graded,
    ];

    /// The kind named `s`, or an error listing the kinds.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
            Error::arg("kind", format!("`{s}` is not an asset kind; expected one of {}", names.join(", ")))
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AssetKind::Draft => "draft",
            AssetKind::Final => "final",
            AssetKind::Sheet => "sheet",
            AssetKind::Replay => "replay",
            AssetKind::Upscaled => "upscaled",
            AssetKind::Inpaint => "inpaint",
            AssetKind::Erase => "erase",
            AssetKind::Outpaint => "outpaint",
            AssetKind::Cutout => "cutout",
            AssetKind::Graded => "graded",
        }
    }

    /// A draft or a final by the tier's lane.
    pub fn of_tier(tier: &crate::tiers::Tier) -> Self {
        if tier.is_draft() {
            AssetKind::Draft
        } else {
            AssetKind::Final
        }
    }
}

/// A job to record.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: RecordKind,
    pub tier: Option<String>,
    pub device: String,
    pub dtype: String,
    pub model_id: String,
    pub images: usize,
    pub timings: JobTimings,
    pub credits: f64,
}

/// An output to record; its file must already be written (atomically).
#[derive(Debug, Clone)]
pub struct NewAsset {
    pub kind: AssetKind,
    pub tier: Option<String>,
    pub path: PathBuf,
    pub parent_id: Option<i64>,
    pub width: u32,
    pub height: u32,
    pub seed: Option<u64>,
    pub prompt: Option<String>,
    pub record: Option<ImageRecord>,
    pub model_hashes: Vec<WeightRecord>,
    pub credits: f64,
}

/// A recorded asset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AssetRow {
    pub id: i64,
    pub job_id: i64,
    pub parent_id: Option<i64>,
    pub kind: String,
    pub tier: Option<String>,
    /// Relative to the project root.
    pub path: String,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub seed: Option<u64>,
    pub prompt: Option<String>,
    pub record: Option<ImageRecord>,
    pub model_hashes: Vec<WeightRecord>,
    pub credits: f64,
    pub created_at: i64,
    /// Parameters of a step that is not a generation (an upscale's model, sizes, tiling);
    /// see [`Library::record_job_with_params`].
    pub params: Option<serde_json::Value>,
    /// The latest hallucination-QC report (`kiln qc`), see [`Library::set_qc`].
    pub qc: Option<serde_json::Value>,
}

/// A recorded job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub kind: String,
    pub tier: Option<String>,
    pub created_at: i64,
    pub device: String,
    pub dtype: String,
    pub model_id: String,
    pub images: usize,
    pub device_seconds: f64,
    pub credits: f64,
    pub timings: JobTimings,
}

/// Which assets to list.
#[derive(Debug, Clone, Default)]
pub struct AssetFilter {
    pub kind: Option<String>,
    pub tier: Option<String>,
    /// Most recent first, at most this many (None = all, oldest first).
    pub limit: Option<usize>,
}

const ASSET_COLUMNS: &str = "id, job_id, parent_id, kind, tier, path, sha256, width, height, seed, prompt, \
                             record_json, model_hashes, credits, created_at, \
                             (SELECT json FROM asset_params WHERE asset_params.asset_id = assets.id), \
                             (SELECT json FROM asset_qc WHERE asset_qc.asset_id = assets.id)";

fn asset_from_row(row: &Row) -> DbResult<AssetRow> {
    let record: Option<String> = row.get(11)?;
    let hashes: String = row.get(12)?;
    let seed: Option<i64> = row.get(9)?;
    Ok(AssetRow {
        id: row.get(0)?,
        job_id: row.get(1)?,
        parent_id: row.get(2)?,
        kind: row.get(3)?,
        tier: row.get(4)?,
        path: row.get(5)?,
        sha256: row.get(6)?,
        width: row.get(7)?,
        height: row.get(8)?,
        seed: seed.map(|s| s as u64),
        prompt: row.get(10)?,
        record: record.and_then(|r| serde_json::from_str(&r).ok()),
        model_hashes: serde_json::from_str(&hashes).unwrap_or_default(),
        credits: row.get(13)?,
        created_at: row.get(14)?,
        params: row.get::<Option<String>>(15)?.and_then(|p| serde_json::from_str(&p).ok()),
        qc: row.get::<Option<String>>(16)?.and_then(|p| serde_json::from_str(&p).ok()),
    })
}

impl Library {
    /// Records a job and its assets in one transaction; returns (job id, asset ids). Every
    /// asset's file must exist (outputs are written before they are recorded); its sha256 is
    /// taken now so a later change is detectable.
    pub fn record_job(&mut self, job: &NewJob, assets: &[NewAsset]) -> Result<(i64, Vec<i64>)> {
        self.record_job_with_params(job, assets, &[])
    }

    /// [`Self::record_job`], with step parameters for the assets (`params[i]` for `assets[i]`;
    /// missing entries are none), in the same transaction.
    pub fn record_job_with_params(
        &mut self,
        job: &NewJob,
        assets: &[NewAsset],
        params: &[Option<serde_json::Value>],
    ) -> Result<(i64, Vec<i64>)> {
        let mut hashes = Vec::with_capacity(assets.len());
        for a in assets {
            if !a.path.is_file() {
                return Err(Error::not_found(
                    "output to record",
                    &a.path,
                    "outputs are written before they are recorded",
                ));
            }
            hashes.push(crate::loaders::weights::sha256_file(&a.path)?);
        }
        let now = now_unix();
        let t = &job.timings;
        let timings_json = serde_json::to_string(t).unwrap_or_default();
        let root = self.root.clone();
        let path = self.path.clone();
        let err = |e| super::library_error(&path, e);
        let tx = self.db.begin().map_err(err)?;
        let job_id = tx.insert_id(
            "INSERT INTO jobs (kind, tier, created_at, device, dtype, model_id, images, load_seconds, \
             text_encode_seconds, vae_encode_seconds, steps_seconds, vae_decode_seconds, device_seconds, \
             cpu_seconds, peak_memory_bytes, credits, timings_json) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) RETURNING id",
            vals![
                job.kind.as_str(),
                job.tier,
                now,
                job.device,
                job.dtype,
                job.model_id,
                job.images as i64,
                t.load,
                t.text_encode,
                t.vae_encode,
                t.steps_total(),
                t.vae_decode,
                t.device_seconds(),
                t.cpu_seconds,
                t.peak_memory_bytes.map(|b| b as i64),
                job.credits,
                timings_json,
            ],
        )
        .map_err(err)?;
        if let Some((queue_id, attempt)) = self.queue_claim {
            let n = tx
                .execute(
                    "UPDATE queue SET library_job_id = COALESCE(library_job_id, ?1) \
                     WHERE id = ?2 AND attempts = ?3 AND state = 'running'",
                    vals![job_id, queue_id, attempt],
                )
                .map_err(err)?;
            if n != 1 {
                return Err(Error::Library {
                    path: path.clone(),
                    msg: format!(
                        "queue job {queue_id} is no longer running this attempt; not recording it twice"
                    ),
                });
            }
        }
        let mut ids = Vec::with_capacity(assets.len());
        for (i, (a, sha)) in assets.iter().zip(&hashes).enumerate() {
            let rel = a.path.strip_prefix(&root).unwrap_or(&a.path).to_string_lossy().into_owned();
            let id = tx.insert_id(
                "INSERT INTO assets (job_id, parent_id, kind, tier, path, sha256, width, height, seed, prompt, \
                 record_json, model_hashes, credits, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) RETURNING id",
                vals![
                    job_id,
                    a.parent_id,
                    a.kind.as_str(),
                    a.tier,
                    rel,
                    sha,
                    a.width,
                    a.height,
                    a.seed.map(|s| s as i64),
                    a.prompt,
                    a.record.as_ref().and_then(|r| serde_json::to_string(r).ok()),
                    serde_json::to_string(&a.model_hashes).unwrap_or_else(|_| "[]".into()),
                    a.credits,
                    now,
                ],
            )
            .map_err(err)?;
            if let Some(p) = params.get(i).and_then(Option::as_ref) {
                tx.execute(
                    "INSERT INTO asset_params (asset_id, json) VALUES (?1, ?2)",
                    vals![id, p.to_string()],
                )
                .map_err(err)?;
            }
            ids.push(id);
        }
        tx.commit().map_err(err)?;
        Ok((job_id, ids))
    }

    /// Assets matching `filter`.
    pub fn list_assets(&self, filter: &AssetFilter) -> Result<Vec<AssetRow>> {
        if let Some(kind) = &filter.kind {
            AssetKind::parse(kind)?;
        }
        let order = if filter.limit.is_some() { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT {ASSET_COLUMNS} FROM assets WHERE (CAST(?1 AS TEXT) IS NULL OR kind = ?1) \
             AND (CAST(?2 AS TEXT) IS NULL OR tier = ?2) \
             ORDER BY id {order} LIMIT ?3"
        );
        let limit = filter.limit.map(|l| l as i64).unwrap_or(i64::MAX);
        self.db
            .query_map(&sql, vals![&filter.kind, &filter.tier, limit], asset_from_row)
            .map_err(|e| self.err(e))
    }

    /// The asset with `id`; an unknown id is an error naming it.
    pub fn asset(&self, id: i64) -> Result<AssetRow> {
        let sql = format!("SELECT {ASSET_COLUMNS} FROM assets WHERE id = ?1");
        self.db
            .query_opt(&sql, vals![id], asset_from_row)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| Error::arg("asset", format!("no asset with id {id} in {}", self.path.display())))
    }

    /// The most recent asset whose file has this sha256.
    pub fn asset_by_sha256(&self, sha256: &str) -> Result<Option<AssetRow>> {
        let sql = format!("SELECT {ASSET_COLUMNS} FROM assets WHERE sha256 = ?1 ORDER BY id DESC LIMIT 1");
        self.db.query_opt(&sql, vals![sha256], asset_from_row).map_err(|e| self.err(e))
    }

    /// The latest asset made with preset `name`, with the preset hash it recorded.
    pub fn last_preset_use(&self, name: &str) -> Result<Option<(i64, String)>> {
        let sql = format!(
            "SELECT id, {} FROM assets WHERE {} = ?1 ORDER BY id DESC LIMIT 1",
            self.db.json_text("record_json", &["preset", "sha256"]),
            self.db.json_text("record_json", &["preset", "name"]),
        );
        self.db
            .query_opt(&sql, vals![name], |r| {
                Ok((r.get::<i64>(0)?, r.get::<Option<String>>(1)?.unwrap_or_default()))
            })
            .map_err(|e| self.err(e))
    }

    /// The asset recorded for a file (matched by content, so a moved file is still found).
    pub fn asset_for_file(&self, path: &Path) -> Result<Option<AssetRow>> {
        let sha = crate::loaders::weights::sha256_file(path)?;
        self.asset_by_sha256(&sha)
    }

    /// The asset and its ancestors, the asset first (draft → final → ... read backwards).
    pub fn lineage(&self, id: i64) -> Result<Vec<AssetRow>> {
        let mut out = vec![self.asset(id)?];
        while let Some(parent) = out.last().and_then(|a| a.parent_id) {
            if out.len() > 10_000 || out.iter().any(|a| a.id == parent) {
                break; // a cycle cannot be written by kiln; stop rather than loop
            }
            out.push(self.asset(parent)?);
        }
        Ok(out)
    }

    /// Assets made from `id` (promotions, replays).
    pub fn children(&self, id: i64) -> Result<Vec<AssetRow>> {
        let sql = format!("SELECT {ASSET_COLUMNS} FROM assets WHERE parent_id = ?1 ORDER BY id");
        self.db.query_map(&sql, vals![id], asset_from_row).map_err(|e| self.err(e))
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRow>> {
        self.query_jobs("", vals![])
    }

    /// One job (None when no job has this id).
    pub fn job(&self, id: i64) -> Result<Option<JobRow>> {
        Ok(self.query_jobs("WHERE id = ?1", vals![id])?.pop())
    }

    fn query_jobs(&self, filter: &str, params: &[crate::store::Value]) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT id, kind, tier, created_at, device, dtype, model_id, images, device_seconds, credits, \
             timings_json FROM jobs {filter} ORDER BY id"
        );
        self.db
            .query_map(&sql, params, |r| {
                let timings: String = r.get(10)?;
                Ok(JobRow {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    tier: r.get(2)?,
                    created_at: r.get(3)?,
                    device: r.get(4)?,
                    dtype: r.get(5)?,
                    model_id: r.get(6)?,
                    images: r.get::<i64>(7)? as usize,
                    device_seconds: r.get(8)?,
                    credits: r.get(9)?,
                    timings: serde_json::from_str(&timings).unwrap_or_default(),
                })
            })
            .map_err(|e| self.err(e))
    }

    /// Credits spent so far.
    pub fn spent(&self) -> Result<f64> {
        self.db
            .query_row("SELECT COALESCE(SUM(credits), 0) FROM jobs", vals![], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Average billed device seconds per image of a tier's past jobs (for cost estimates).
    pub fn seconds_per_image(&self, tier: &str) -> Result<Option<f64>> {
        self.db
            .query_row(
                "SELECT SUM(device_seconds) / CAST(SUM(images) AS DOUBLE PRECISION) FROM jobs \
                 WHERE tier = ?1 AND images > 0",
                vals![tier],
                |r| r.get::<Option<f64>>(0),
            )
            .map_err(|e| self.err(e))
    }
}
