//! The tiered draft → final workflow over a [`Project`]: jobs that load a tier's model (kept
//! warm), check the budget and the drift lock, generate, write outputs atomically and record
//! them with their cost in the asset library.
//!
//! - [`draft`]: N variants with consecutive seeds plus a contact sheet;
//! - [`promote`]: a draft re-rendered by the final tier (img2img or reseed), with similarity;
//! - [`replay`]: an asset regenerated from its stored parameters alone;
//! - [`upscale`]: an asset run through the upscale tier, recorded as its child;
//! - [`redetail`]: an upscale re-detailed by a diffusion tier on blended latent tiles;
//! - [`cutout`]: an image's subject cut out by a matting model, recorded as its child;
//! - [`grade`]: an asset colour-graded with a 3D LUT, recorded as its child.

pub mod cutout;
pub mod draft;
pub mod grade;
pub mod promote;
pub mod redetail;
pub mod replay;
pub mod upscale;

use crate::error::{Error, Result};
use crate::jobs::pool::{ModelPool, PoolKey};
use crate::library::assets::{AssetKind, JobTimings, NewAsset, NewJob, RecordKind};
use crate::library::{ledger, Library, Project};
use crate::loaders::lora::LoraRequest;
use crate::pipeline::generate::GenerateOutput;
use crate::pipeline::metadata::{png_chunks, ImageRecord};
use crate::pipeline::model::LoadedModel;
use crate::pipeline::model::TextPlacement;
use crate::tiers::drift::{self, DriftOutcome};
use crate::tiers::load::{load_tier_model_with, tier_dtype};
use crate::tiers::{Tier, TierRegistry};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How jobs run: device, dtype override, drift policy.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub device: Device,
    /// `--dtype`; None = the tier's.
    pub dtype: Option<DType>,
    /// `--accept-drift`: re-pin the lock instead of refusing changed weights.
    pub accept_drift: bool,
    /// Show download progress (hub).
    pub show_progress: bool,
    /// `--text-encoders`: where every diffusion model's text encoders live (this machine's
    /// choice, like the device: the same tier runs with its encoders on an 80 GB card's device
    /// and on a 24 GB card's CPU).
    pub text_encoders: TextPlacement,
}

impl JobOptions {
    /// Jobs on `device` with the tiers' dtypes, text encoders beside the model, drift refused
    /// and no download progress.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            dtype: None,
            accept_drift: false,
            show_progress: false,
            text_encoders: TextPlacement::Device,
        }
    }
}

/// An open project with its library and tiers.
pub struct Workspace {
    pub project: Project,
    pub library: Library,
    pub tiers: TierRegistry,
    pub options: JobOptions,
    /// Where models are loaded once and shared with other jobs.
    pub pool: Arc<ModelPool>,
    /// Prefix of every output file name (a queued job's id), so the files of a job that did
    /// not finish can be found and removed.
    pub file_tag: Option<String>,
    /// The preset in force for the running job: its images record it and get its grade.
    pub preset: Option<crate::jobs::preset::AppliedPreset>,
}

/// A tier's model, loaded once and reused across jobs.
pub struct WarmModel {
    pub tier: Tier,
    pub model: Arc<LoadedModel>,
    /// Seconds the load took; billed to the first job that uses the model, then 0.
    pub load_seconds: f64,
    pub drift: DriftOutcome,
}

impl Workspace {
    /// Opens the project with a pool of its own (one-shot CLI jobs).
    pub fn open(project: Project, options: JobOptions) -> Result<Self> {
        Self::open_with_pool(project, options, Arc::new(ModelPool::new(None)))
    }

    /// Opens the project sharing `pool` with other workspaces (a server's jobs).
    pub fn open_with_pool(project: Project, options: JobOptions, pool: Arc<ModelPool>) -> Result<Self> {
        let library = project.library()?;
        let tiers = project.tiers()?;
        Ok(Self { project, library, tiers, options, pool, file_tag: None, preset: None })
    }

    /// The pool key of a tier's model on this workspace's device.
    pub fn tier_key(&self, tier: &Tier, dtype: DType) -> PoolKey {
        PoolKey {
            model: format!("tier:{}:{}", tier.name, tier.model),
            revision: tier.revision.clone(),
            device: crate::device::name(&self.options.device),
            dtype: crate::device::dtype_name(dtype).to_string(),
            loras: String::new(),
            text_encoders: self.options.text_encoders,
        }
    }

    /// Checks the budget for `images` images of `tier`: Err when refused, Some(warning) near it.
    pub fn check_budget(&self, tier: &Tier, images: usize) -> Result<Option<String>> {
        let estimate = ledger::estimate(&self.library, tier, images)?;
        ledger::check_budget(&self.project.config, self.library.spent()?, estimate)
    }

    /// Checks the budget for several jobs at once (a promotion with its upscale): their
    /// estimates are summed, so the chain is refused up front rather than half-way.
    pub fn check_budget_all(&self, jobs: &[(Tier, usize)]) -> Result<Option<String>> {
        let mut estimate = 0.0;
        for (tier, images) in jobs {
            estimate += ledger::estimate(&self.library, tier, *images)?;
        }
        ledger::check_budget(&self.project.config, self.library.spent()?, estimate)
    }

    /// Loads a tier's model and checks it against the project's drift lock.
    pub fn load_tier(&self, name: &str) -> Result<WarmModel> {
        self.load_tier_with(name, &[])
    }

    /// [`Workspace::load_tier`] with `job_loras` merged into the model after the tier's own
    /// LoRAs (a pool entry of its own). The tier's LoRAs are pinned by the drift lock with the
    /// model's files; a job's are recorded in its images instead.
    pub fn load_tier_with(&self, name: &str, job_loras: &[LoraRequest]) -> Result<WarmModel> {
        let tier = self.tiers.get(name)?.clone();
        crate::tiers::load::require_diffusion(&tier)?;
        let dtype = tier_dtype(&tier, &self.options.device, self.options.dtype)?;
        let loras = crate::tiers::load::tier_loras(&tier, job_loras)?;
        let own_loras = loras.len() - job_loras.len();
        let mut key = self.tier_key(&tier, dtype);
        key.loras = crate::loaders::lora::pool_key(&loras)?;
        let (model, load_seconds) = self.pool.get_or_load_diffusion(&key, &loras, || {
            let o = &self.options;
            load_tier_model_with(&tier, &loras, &o.device, dtype, o.text_encoders, o.show_progress)
        })?;
        // The lock is checked on every job, warm or not: kiln.lock may have changed meanwhile.
        let mut pinned = model.weights.clone();
        pinned.extend(model.loras.iter().take(own_loras).map(|l| crate::pipeline::model::WeightRecord {
            component: "lora".into(),
            file: l.name.clone(),
            sha256: l.sha256.clone(),
        }));
        let drift = drift::check_files(&self.project.lock_path(), &tier, &pinned, self.options.accept_drift)?;
        Ok(WarmModel { tier, model, load_seconds, drift })
    }

    /// A fresh output path under assets/<folder>/ (millisecond stamp + suffix, never reused).
    pub fn output_path(&self, folder: &str, stem: &str) -> PathBuf {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let dir = self.project.assets_dir().join(folder);
        let stem = match &self.file_tag {
            Some(tag) => format!("{tag}-{stem}"),
            None => stem.to_string(),
        };
        let mut path = dir.join(format!("{stem}-{ms}.png"));
        let mut k = 1;
        while path.exists() {
            path = dir.join(format!("{stem}-{ms}-{k}.png"));
            k += 1;
        }
        path
    }
}

/// CPU seconds this process used since `start` (a [`process_cpu_seconds`] reading), when the OS
/// reports them.
pub(crate) fn cpu_seconds_since(start: Option<f64>) -> Option<f64> {
    Some(process_cpu_seconds()? - start?)
}

/// Process CPU time (user + system) in seconds, from /proc (Linux; None elsewhere).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks at USER_HZ, 100 on every mainstream configuration.
    Some((utime + stime) / 100.0)
}

/// One generated image written to disk, before it is recorded.
pub struct WrittenImage {
    pub path: PathBuf,
    pub seed: u64,
    pub rgb: image::RgbImage,
    pub record: ImageRecord,
}

/// Writes each generated image as a PNG with its replay metadata (atomically).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_images(
    model: &LoadedModel,
    req: &crate::pipeline::generate::GenerateRequest,
    output: &GenerateOutput,
    tier: Option<&str>,
    init_image: Option<crate::pipeline::metadata::FileRef>,
    preset: Option<&crate::jobs::preset::AppliedPreset>,
    path_for: &mut dyn FnMut(usize, u64) -> PathBuf,
) -> Result<Vec<WrittenImage>> {
    let mut out = Vec::with_capacity(output.images.len());
    for (i, image) in output.images.iter().enumerate() {
        let mut record =
            ImageRecord::build(model, req, output.scheduler, image.seed, i, None, init_image.clone());
        record.tier = tier.map(str::to_string);
        let mut rgb = crate::image::unit_to_rgb8(&image.pixels)?;
        if let Some(p) = preset {
            rgb = p.finish(&mut record, rgb)?;
        }
        let path = path_for(i, image.seed);
        crate::image::png_meta::write_png_atomic(&path, &rgb, &png_chunks(&record, output.scheduler, model))?;
        out.push(WrittenImage { path, seed: image.seed, rgb, record });
    }
    Ok(out)
}

/// The job row and per-image asset rows for written images.
pub(crate) fn job_and_assets(
    kind: RecordKind,
    asset_kind: AssetKind,
    tier: Option<&Tier>,
    model: &LoadedModel,
    timings: JobTimings,
    written: &[WrittenImage],
    parent_id: Option<i64>,
) -> (NewJob, Vec<NewAsset>) {
    let credits = tier.map(|t| t.price.cost(written.len(), timings.device_seconds())).unwrap_or(0.0);
    let job = NewJob {
        kind,
        tier: tier.map(|t| t.name.clone()),
        device: crate::device::name(&model.device),
        dtype: crate::device::dtype_name(model.dtype).to_string(),
        model_id: crate::pipeline::metadata::model_record(&model.source, Vec::new()).id,
        images: written.len(),
        timings,
        credits,
    };
    let per_image = if written.is_empty() { 0.0 } else { credits / written.len() as f64 };
    let assets = written
        .iter()
        .map(|w| NewAsset {
            kind: asset_kind,
            tier: tier.map(|t| t.name.clone()),
            path: w.path.clone(),
            parent_id,
            width: w.rgb.width(),
            height: w.rgb.height(),
            seed: Some(w.seed),
            prompt: Some(w.record.prompt.clone()),
            record: Some(w.record.clone()),
            model_hashes: model.weights.clone(),
            credits: per_image,
        })
        .collect();
    (job, assets)
}

/// What [`record_tier_job`] stored: the job id, the asset ids, and the parent asset (if any).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordedJob {
    pub job_id: i64,
    pub asset_ids: Vec<i64>,
    pub parent_asset_id: Option<i64>,
}

/// Records a finished tier job run outside a [`Workspace`] (`generate --tier`, `inpaint --tier`)
/// and its written images; the parent is the library asset whose file is `input`, when it is one.
#[allow(clippy::too_many_arguments)]
pub fn record_tier_job(
    library: &mut Library,
    kind: RecordKind,
    asset_kind: AssetKind,
    tier: &Tier,
    model: &LoadedModel,
    timings: JobTimings,
    written: &[WrittenImage],
    input: Option<&crate::pipeline::metadata::FileRef>,
) -> Result<RecordedJob> {
    let parent_asset_id = match input {
        Some(f) => library.asset_by_sha256(&f.sha256)?.map(|a| a.id),
        None => None,
    };
    let (job, assets) =
        job_and_assets(kind, asset_kind, Some(tier), model, timings, written, parent_asset_id);
    let (job_id, asset_ids) = library.record_job(&job, &assets)?;
    Ok(RecordedJob { job_id, asset_ids, parent_asset_id })
}

/// Where a job's input image comes from.
#[derive(Debug, Clone)]
pub enum AssetRef {
    /// An asset id in the library.
    Id(i64),
    /// A PNG file (made by kiln: it must carry the `kiln` metadata chunk).
    File(PathBuf),
}

impl AssetRef {
    /// `12`, `#12` or `asset:12` is an id; anything else a path.
    pub fn parse(s: &str) -> Self {
        let digits = s.trim_start_matches('#').trim_start_matches("asset:");
        match digits.parse::<i64>() {
            Ok(id) if !Path::new(s).exists() => AssetRef::Id(id),
            _ => AssetRef::File(PathBuf::from(s)),
        }
    }
}

/// An input image with its kiln record and, when the library knows it, its asset id.
pub struct ResolvedInput {
    pub path: PathBuf,
    pub record: ImageRecord,
    pub asset_id: Option<i64>,
}

/// Resolves an asset id or a kiln PNG to its file and replay record.
pub fn resolve_input(library: &Library, root: &Path, input: &AssetRef, arg: &str) -> Result<ResolvedInput> {
    match input {
        AssetRef::Id(id) => {
            let asset = library.asset(*id)?;
            let record = asset.record.clone().ok_or_else(|| {
                Error::arg(
                    arg,
                    format!("asset {id} ({}) has no generation record (a contact sheet?)", asset.path),
                )
            })?;
            let path =
                if root == library.root { library.local_file(&asset)? } else { root.join(&asset.path) };
            Ok(ResolvedInput { path, record, asset_id: Some(*id) })
        }
        AssetRef::File(path) => {
            if !path.is_file() {
                return Err(Error::not_found(format!("{arg} image"), path, "pass a kiln PNG or an asset id"));
            }
            let chunks = crate::image::png_meta::read_png_text(path)?;
            let record =
                crate::pipeline::metadata::record_from_chunks(&chunks).ok_or_else(|| Error::Image {
                    path: path.clone(),
                    msg: "has no kiln metadata (not made by kiln, or its text chunks were stripped); \
                      promote and replay need the `kiln` chunk kiln writes"
                        .into(),
                })?;
            let asset_id = library.asset_for_file(path)?.map(|a| a.id);
            Ok(ResolvedInput { path: path.clone(), record, asset_id })
        }
    }
}
