//! The engine: runs any [`JobSpec`] against a project (library, tiers, drift lock, budget) with
//! a shared model pool, reporting to an event sink. The CLI runs one job with it in-process; the
//! server's worker runs queued jobs with it. Everything a job does happens here, once.

use super::events::{EventSink, JobEvent, SinkProgress};
use super::pool::ModelPool;
use super::spec::{ImageRef, JobKind, JobSpec};
use crate::error::{Error, Result};
use crate::library::assets::JobTimings;
use crate::library::Project;
use crate::tiers::load::Overrides;
use crate::workflow::draft::{draft, DraftRequest};
use crate::workflow::promote::{promote, PromoteMode, PromoteRequest};
use crate::workflow::replay::{replay, ReplayRequest};
use crate::workflow::upscale::{parse_target, upscale_asset};
use crate::workflow::{AssetRef, JobOptions, Workspace};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Where uploaded input images live, relative to the project root (named by their sha256).
pub const UPLOADS_DIR: &str = ".kiln/uploads";

/// One image a job produced.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutputImage {
    /// The library asset, when the job was recorded.
    pub asset_id: Option<i64>,
    pub path: PathBuf,
    pub seed: Option<u64>,
    /// draft | final | sheet | upscaled | replay | image
    pub role: String,
}

/// What any job returns.
#[derive(Debug, Clone, Serialize)]
pub struct JobOutput {
    pub kind: JobKind,
    /// The library job it was recorded as (None for untiered local jobs).
    pub library_job_id: Option<i64>,
    pub images: Vec<OutputImage>,
    pub timings: JobTimings,
    /// Seconds billed (every stage, load included).
    pub device_seconds: f64,
    pub credits: f64,
    pub warnings: Vec<String>,
    /// The kind's own result (closeness of a promotion, bit-exactness of a replay, ...).
    pub detail: serde_json::Value,
}

/// What the runner needs to know about where a job came from.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// The queue row this run belongs to, with its attempt number: recording is refused
    /// unless that row is still running that attempt, so a job is never recorded twice.
    pub queue_claim: Option<(i64, i64)>,
}

/// The engine shared by all jobs of a process.
pub struct Engine {
    pub project: Project,
    pub options: JobOptions,
    pub pool: Arc<ModelPool>,
}

impl Engine {
    pub fn new(project: Project, options: JobOptions, pool: Arc<ModelPool>) -> Self {
        Self { project, options, pool }
    }

    /// A workspace (own library connection) over the shared pool.
    pub fn workspace(&self) -> Result<Workspace> {
        Workspace::open_with_pool(self.project.clone(), self.options.clone(), self.pool.clone())
    }

    /// A workspace whose library is the project's, or (`project_library` false: work on a
    /// model folder) one that keeps nothing, so no database is created.
    fn workspace_for(&self, project_library: bool) -> Result<Workspace> {
        if project_library {
            return self.workspace();
        }
        Ok(Workspace {
            library: crate::library::Library::in_memory(&self.project.root)?,
            tiers: self.project.tiers()?,
            project: self.project.clone(),
            options: self.options.clone(),
            pool: self.pool.clone(),
            file_tag: None,
            preset: None,
        })
    }

    /// A diffusion model for work that is not (yet) a job kind of its own, such as cutout's
    /// background replacement: a tier's (budget-checked for `images`, drift-guarded) or a
    /// folder's / hub id's, taken from the pool. Returns the model, its tier and warnings.
    pub fn diffusion_model(
        &self,
        tier: Option<&str>,
        model: Option<&str>,
        images: usize,
    ) -> Result<(Arc<crate::pipeline::model::LoadedModel>, Option<crate::tiers::Tier>, Vec<String>)> {
        let ws = self.workspace_for(tier.is_some())?;
        let jm = super::generate::job_model(&ws, tier, model, None, None, images, &[])?;
        Ok((jm.model, jm.tier, jm.warnings))
    }

    /// Runs `spec` to completion (or cancellation), emitting events to `sink`.
    pub fn run(&self, spec: &JobSpec, ctx: &RunContext, sink: &mut dyn EventSink) -> Result<JobOutput> {
        spec.validate()?;
        // A job on a model folder (no tier) keeps nothing: no library is opened or created.
        let untiered = match spec {
            JobSpec::Generate(s) => s.tier.is_none(),
            JobSpec::Inpaint(s) => s.tier.is_none(),
            _ => false,
        };
        let mut ws = self.workspace_for(!untiered)?;
        if let Some((id, attempt)) = ctx.queue_claim {
            ws.file_tag = Some(format!("q{id}a{attempt}"));
            ws.library.claim_for_queue(id, attempt);
        }
        let (spec, preset, preset_warnings) = super::preset::apply(&ws, spec)?;
        ws.preset = preset;
        let spec = &spec;
        let mut out = match spec {
            JobSpec::Generate(s) => super::generate::run(&mut ws, s, sink),
            JobSpec::Inpaint(s) => super::edit::run(&mut ws, s, sink),
            JobSpec::Draft(s) => run_draft(&mut ws, s, sink),
            JobSpec::Promote(s) => run_promote(&mut ws, s, sink),
            JobSpec::Upscale(s) => run_upscale(&mut ws, s, sink),
            JobSpec::Replay(s) => run_replay(&mut ws, s, sink),
            JobSpec::Cutout(s) => run_cutout(&mut ws, s, sink),
            JobSpec::Grade(s) => run_grade(&mut ws, s, sink),
        }?;
        out.warnings.splice(0..0, preset_warnings);
        Ok(out)
    }
}

/// The local path of an input image.
pub fn image_path(ws: &Workspace, r: &ImageRef, field: &str) -> Result<PathBuf> {
    match r {
        ImageRef::Asset(id) => {
            let asset = ws
                .library
                .asset(*id)
                .map_err(|_| Error::UnknownId { what: "asset".into(), id: id.to_string() })?;
            ws.library.local_file(&asset)
        }
        ImageRef::Upload(sha) => {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::arg(field, "an upload id is the 64-hex-digit sha256 the upload returned"));
            }
            // An upload another box's server took is fetched from a shared library.
            let path = ws
                .library
                .fetch_into(&upload_path(&ws.project, sha), &sha.to_ascii_lowercase(), "upload")
                .map_err(|_| Error::UnknownId { what: "upload".into(), id: sha.clone() })?;
            if !path.is_file() {
                return Err(Error::UnknownId { what: "upload".into(), id: sha.clone() });
            }
            Ok(path)
        }
        ImageRef::File(p) => Ok(p.clone()),
    }
}

/// Where an upload with this sha256 is kept.
pub fn upload_path(project: &Project, sha256: &str) -> PathBuf {
    project.root.join(UPLOADS_DIR).join(format!("{}.png", sha256.to_ascii_lowercase()))
}

fn asset_ref(ws: &Workspace, r: &ImageRef, field: &str) -> Result<AssetRef> {
    Ok(match r {
        ImageRef::Asset(id) => AssetRef::Id(*id),
        other => AssetRef::File(image_path(ws, other, field)?),
    })
}

fn output(kind: JobKind, job: Option<i64>, images: Vec<OutputImage>, timings: JobTimings) -> JobOutput {
    JobOutput {
        kind,
        library_job_id: job,
        images,
        device_seconds: timings.device_seconds(),
        timings,
        credits: 0.0,
        warnings: Vec::new(),
        detail: serde_json::Value::Null,
    }
}

fn run_draft(ws: &mut Workspace, s: &super::spec::DraftSpec, sink: &mut dyn EventSink) -> Result<JobOutput> {
    let tier_name = s.tier.as_deref().unwrap_or("draft");
    let tier = ws.tiers.get(tier_name)?.clone();
    let count = s.count.unwrap_or(8);
    // Refuse before the (expensive) model load when the budget is spent.
    ws.check_budget(&tier, count)?;
    let (prompt, lora_args) = s.lora_args()?;
    let loras = crate::loaders::lora::resolve_all(&lora_args)?;
    sink.emit(JobEvent::Stage { stage: "load".into() });
    let mut warm = ws.load_tier_with(tier_name, &loras)?;
    let request = DraftRequest {
        prompt,
        count,
        seed: s.seed.unwrap_or_else(random_seed),
        overrides: Overrides {
            width: s.width,
            height: s.height,
            steps: s.steps,
            negative_prompt: s.negative.clone(),
            max_batch: s.batch,
            vae_tiling: super::spec::vae_tiling(s.vae_tiling.as_deref(), s.vae_tile)?,
            ..Default::default()
        },
    };
    let mut warnings: Vec<String> = tier_warnings(&warm.tier, &warm.drift);
    warnings.extend(warm.model.load_warnings.iter().cloned());
    let r = draft(ws, &mut warm, &request, &mut SinkProgress::new(sink))?;
    let mut images: Vec<OutputImage> = r
        .images
        .iter()
        .map(|i| OutputImage {
            asset_id: Some(i.asset_id),
            path: i.path.clone(),
            seed: Some(i.seed),
            role: "draft".into(),
        })
        .collect();
    images.push(OutputImage {
        asset_id: Some(r.sheet_asset_id),
        path: r.sheet.clone(),
        seed: None,
        role: "sheet".into(),
    });
    warnings.extend(r.warnings.iter().cloned());
    let mut out = output(JobKind::Draft, Some(r.job_id), images, r.timings.clone());
    out.credits = r.credits;
    out.warnings = warnings;
    out.detail = serde_json::to_value(&r).unwrap_or_default();
    Ok(out)
}

fn run_promote(
    ws: &mut Workspace,
    s: &super::spec::PromoteSpec,
    sink: &mut dyn EventSink,
) -> Result<JobOutput> {
    let tier_name = s.tier.as_deref().unwrap_or("final");
    let mode: PromoteMode = s.mode.as_deref().unwrap_or("img2img").parse()?;
    let tier = ws.tiers.get(tier_name)?.clone();
    // Validate the whole chain (target size, upscale tier, budget for both) before rendering.
    let target = s.upscale.as_deref().map(parse_target).transpose()?;
    if let (Some(t), Some(w), Some(h)) = (target, s.width.or(tier.width), s.height.or(tier.height)) {
        // The final's size is known from the tier: an upscale it cannot reach is refused before
        // the final renders, not after it is billed.
        let (ow, oh) = t.size(w, h)?;
        crate::image::io::SizeLimits::default()
            .check_output(ow, oh, std::path::Path::new("upscaled final"))
            .map_err(|e| Error::arg("upscale", e.to_string()))?;
    }
    let upscale_tier_name = s.upscale_tier.as_deref().unwrap_or("upscale");
    let mut jobs = vec![(tier, 1)];
    if target.is_some() {
        let up = ws.tiers.get(upscale_tier_name)?.clone();
        crate::tiers::load::require_upscale(&up)?;
        jobs.push((up, 1));
    }
    let redetail = redetail_plan(ws, s.redetail.as_ref())?;
    if redetail.is_some() && target.is_none() {
        return Err(Error::arg("redetail", "re-detail follows an upscale: set `upscale` too (e.g. 4k)"));
    }
    if let Some(plan) = &redetail {
        jobs.push((plan.tier.clone(), 1));
    }
    ws.check_budget_all(&jobs)?;
    let request = PromoteRequest {
        draft: asset_ref(ws, &s.draft, "draft")?,
        mode,
        strength: s.strength.unwrap_or(0.5),
        overrides: Overrides {
            width: s.width,
            height: s.height,
            steps: s.steps,
            vae_tiling: super::spec::vae_tiling(s.vae_tiling.as_deref(), s.vae_tile)?,
            ..Default::default()
        },
    };
    crate::workflow::resolve_input(&ws.library, &ws.project.root, &request.draft, "draft")?;
    sink.emit(JobEvent::Stage { stage: "load".into() });
    // The upscaler loads first: a missing or drifted SR model fails before the final renders.
    let mut warm_up = match target {
        Some(_) => Some(ws.load_upscale_tier(upscale_tier_name)?),
        None => None,
    };
    let loras = crate::loaders::lora::resolve_all(&s.lora_args()?)?;
    let mut warm = ws.load_tier_with(tier_name, &loras)?;
    let mut warnings = tier_warnings(&warm.tier, &warm.drift);
    warnings.extend(warm.model.load_warnings.iter().cloned());
    let r = promote(ws, &mut warm, &request, &mut SinkProgress::new(sink))?;
    warnings.extend(r.warnings.iter().cloned());
    let mut images = vec![OutputImage {
        asset_id: Some(r.asset_id),
        path: r.path.clone(),
        seed: Some(r.seed),
        role: "final".into(),
    }];
    let mut timings = r.timings.clone();
    let mut credits = r.credits;
    let mut detail = serde_json::to_value(&r).unwrap_or_default();
    let mut redetailed = None;
    if let (Some(up), Some(target)) = (warm_up.as_mut(), target) {
        if sink.cancelled() {
            return Err(Error::Cancelled);
        }
        sink.emit(JobEvent::Stage { stage: "upscale".into() });
        let u =
            upscale_asset(ws, up, &AssetRef::Id(r.asset_id), Some(target), s.tile, &mut |done, total| {
                sink.emit(JobEvent::Tiles { done, total });
                !sink.cancelled()
            })?;
        warnings.extend(u.warnings.iter().cloned());
        images.push(OutputImage {
            asset_id: Some(u.asset_id),
            path: u.path.clone(),
            seed: Some(r.seed),
            role: "upscaled".into(),
        });
        timings.upscale += u.timings.upscale;
        timings.load += u.timings.load;
        credits += u.credits;
        if let Some(obj) = detail.as_object_mut() {
            obj.insert("upscaled".into(), serde_json::to_value(&u).unwrap_or_default());
        }
        redetailed = redetail.map(|plan| run_redetail(ws, plan, u.asset_id, sink)).transpose()?;
    }
    let mut out = output(JobKind::Promote, Some(r.job_id), images, timings);
    out.credits = credits;
    out.warnings = warnings;
    out.detail = detail;
    if let Some(d) = redetailed {
        add_redetailed(&mut out, d, Some(r.seed));
    }
    Ok(out)
}

fn run_upscale(
    ws: &mut Workspace,
    s: &super::spec::UpscaleSpec,
    sink: &mut dyn EventSink,
) -> Result<JobOutput> {
    let tier_name = s.tier.as_deref().unwrap_or("upscale");
    let target = s.to.as_deref().map(parse_target).transpose()?;
    let input = asset_ref(ws, &s.image, "image")?;
    let tier = ws.tiers.get(tier_name)?.clone();
    crate::tiers::load::require_upscale(&tier)?;
    let redetail = redetail_plan(ws, s.redetail.as_ref())?;
    let mut jobs = vec![(tier, 1)];
    if let Some(plan) = &redetail {
        jobs.push((plan.tier.clone(), 1));
    }
    ws.check_budget_all(&jobs)?;
    sink.emit(JobEvent::Stage { stage: "load".into() });
    let mut warm = ws.load_upscale_tier(tier_name)?;
    let mut warnings = tier_warnings(&warm.tier, &warm.drift);
    sink.emit(JobEvent::Stage { stage: "upscale".into() });
    let u = upscale_asset(ws, &mut warm, &input, target, s.tile, &mut |done, total| {
        sink.emit(JobEvent::Tiles { done, total });
        !sink.cancelled()
    })?;
    warnings.extend(u.warnings.iter().cloned());
    let images = vec![OutputImage {
        asset_id: Some(u.asset_id),
        path: u.path.clone(),
        seed: None,
        role: "upscaled".into(),
    }];
    let mut out = output(JobKind::Upscale, Some(u.job_id), images, u.timings.clone());
    out.credits = u.credits;
    out.warnings = warnings;
    out.detail = serde_json::to_value(&u).unwrap_or_default();
    if let Some(plan) = redetail {
        let d = run_redetail(ws, plan, u.asset_id, sink)?;
        add_redetailed(&mut out, d, None);
    }
    Ok(out)
}

fn run_cutout(
    ws: &mut Workspace,
    s: &super::spec::CutoutSpec,
    sink: &mut dyn EventSink,
) -> Result<JobOutput> {
    let image = image_path(ws, &s.image, "image")?;
    let background_image =
        s.background_image.as_ref().map(|b| image_path(ws, b, "background_image")).transpose()?;
    let request = crate::workflow::cutout::CutoutRequest {
        image: &image,
        model: s.model.as_deref(),
        background: s.background.as_deref(),
        background_image: background_image.as_deref(),
        fit_background: s.fit_background,
        refine: s.refine,
    };
    let c = crate::workflow::cutout::cutout_asset(ws, &request, &mut |stage| {
        sink.emit(JobEvent::Stage { stage: stage.into() });
        !sink.cancelled()
    })?;
    let images = vec![OutputImage {
        asset_id: Some(c.asset_id),
        path: c.path.clone(),
        seed: None,
        role: "cutout".into(),
    }];
    let mut out = output(JobKind::Cutout, Some(c.job_id), images, c.timings.clone());
    out.detail = serde_json::to_value(&c).unwrap_or_default();
    Ok(out)
}

fn run_grade(ws: &mut Workspace, s: &super::spec::GradeSpec, sink: &mut dyn EventSink) -> Result<JobOutput> {
    let image = image_path(ws, &s.image, "image")?;
    let interp = s.interp.as_deref().unwrap_or("tetrahedral").parse()?;
    sink.emit(JobEvent::Stage { stage: "grade".into() });
    let g = crate::workflow::grade::grade_asset(ws, &image, &s.lut, interp, s.strength.unwrap_or(1.0))?;
    let images = vec![OutputImage {
        asset_id: Some(g.asset_id),
        path: g.path.clone(),
        seed: None,
        role: "graded".into(),
    }];
    let mut out = output(JobKind::Grade, Some(g.job_id), images, g.timings.clone());
    out.detail = serde_json::to_value(&g).unwrap_or_default();
    Ok(out)
}

/// Adds a chain's re-detail step to the job's output: its image, seconds, cost, warnings and
/// its own result under `redetailed`.
fn add_redetailed(out: &mut JobOutput, d: crate::workflow::upscale::UpscaleStepResult, seed: Option<u64>) {
    out.images.push(OutputImage {
        asset_id: Some(d.asset_id),
        path: d.path.clone(),
        seed,
        role: "redetailed".into(),
    });
    out.timings.steps.extend(d.timings.steps.iter().copied());
    out.timings.load += d.timings.load;
    out.device_seconds = out.timings.device_seconds();
    out.credits += d.credits;
    out.warnings.extend(d.warnings.iter().cloned());
    if let Some(obj) = out.detail.as_object_mut() {
        obj.insert("redetailed".into(), serde_json::to_value(&d).unwrap_or_default());
    }
}

/// A chain's re-detail step: its diffusion tier, request and the job's own LoRAs.
struct RedetailPlan {
    tier: crate::tiers::Tier,
    request: crate::pipeline::redetail::RedetailRequest,
    loras: Vec<crate::loaders::lora::LoraRequest>,
}

/// The re-detail step of a chain, checked (and its LoRAs found) before any work.
fn redetail_plan(ws: &Workspace, spec: Option<&super::spec::RedetailSpec>) -> Result<Option<RedetailPlan>> {
    let Some(spec) = spec else { return Ok(None) };
    let tier = ws.tiers.get(spec.tier.as_deref().unwrap_or("final"))?.clone();
    crate::tiers::load::require_diffusion(&tier)?;
    let request = spec.request(Some(&tier))?;
    let loras = crate::loaders::lora::resolve_all(&spec.lora_args()?)?;
    Ok(Some(RedetailPlan { tier, request, loras }))
}

/// Loads the re-detail tier (pooled, with the step's LoRAs) and re-details asset `asset_id`,
/// with progress events.
fn run_redetail(
    ws: &mut Workspace,
    plan: RedetailPlan,
    asset_id: i64,
    sink: &mut dyn EventSink,
) -> Result<crate::workflow::upscale::UpscaleStepResult> {
    if sink.cancelled() {
        return Err(Error::Cancelled);
    }
    sink.emit(JobEvent::Stage { stage: "redetail".into() });
    let mut warm = ws.load_tier_with(&plan.tier.name, &plan.loras)?;
    let progress = &mut SinkProgress::new(sink);
    crate::workflow::redetail::redetail_asset(ws, &mut warm, asset_id, plan.request, progress)
}

fn run_replay(
    ws: &mut Workspace,
    s: &super::spec::ReplaySpec,
    sink: &mut dyn EventSink,
) -> Result<JobOutput> {
    let request = ReplayRequest {
        source: asset_ref(ws, &s.asset, "asset")?,
        out: s.out.clone(),
        vae_tiling: super::spec::vae_tiling(s.vae_tiling.as_deref(), s.vae_tile)?,
    };
    let r = replay(ws, &request, &mut SinkProgress::new(sink))?;
    let images = vec![OutputImage {
        asset_id: Some(r.asset_id),
        path: r.path.clone(),
        seed: None,
        role: "replay".into(),
    }];
    let mut out = output(JobKind::Replay, Some(r.job_id), images, r.timings.clone());
    out.warnings = r.warnings.clone();
    out.detail = serde_json::to_value(&r).unwrap_or_default();
    Ok(out)
}

/// Warnings a tier's load leaves: drift accepted, or weights trusted on first use.
pub fn tier_warnings(tier: &crate::tiers::Tier, drift: &crate::tiers::drift::DriftOutcome) -> Vec<String> {
    use crate::tiers::drift::DriftOutcome;
    match drift {
        DriftOutcome::Pinned => tier.trust_on_first_use_warning().into_iter().collect(),
        DriftOutcome::Accepted(changes) => {
            vec![format!("accepted drift of tier `{}`: {}", tier.name, changes.join("; "))]
        }
        DriftOutcome::Unchanged => Vec::new(),
    }
}

/// A random seed within 32 bits (torch's CPU generator only uses the low 32 bits).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}
