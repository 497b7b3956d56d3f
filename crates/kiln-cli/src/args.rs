//! Flags the generation-family commands share (generate, inpaint, outpaint, erase, and the
//! project jobs), and what they resolve to.

use anyhow::{bail, Context};
use clap::Args;
use kiln_core::candle::{DType, Device};
use kiln_core::device::{self, DeviceRequest};
use kiln_core::library::{ledger, Project};
use kiln_core::loaders::hub;
use kiln_core::pipeline::model::LoadedModel;
use kiln_core::pipeline::vae_tiling::VaeTiling;
use kiln_core::schedule::SchedulerKind;
use kiln_core::tiers::load::{load_tier_model, tier_dtype};
use kiln_core::tiers::Tier;
use std::path::PathBuf;

/// Most images one command makes.
const MAX_COUNT: usize = 1000;

/// Where a job runs and how it reports.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// auto | cpu | cuda[:N] | metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32 | f16 | bf16 (default: the tier's, else f16 on GPU and f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Print one JSON object on stdout (paths, seeds, timings, memory); no progress bar.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub vae: VaeTilingArgs,
}

/// Tiled VAE decode/encode, for every command that runs the VAE (docs/vae-tiling.md).
#[derive(Args, Debug, Clone)]
pub struct VaeTilingArgs {
    /// on | off | auto: decode/encode the VAE in tiles with whole-image GroupNorm statistics
    /// (auto: when the untiled pass would not fit the memory budget).
    #[arg(long, default_value = "auto")]
    pub vae_tiling: String,
    /// Largest VAE tile in output pixels (default 512; smaller forces more tiles).
    #[arg(long, value_name = "PX")]
    pub vae_tile: Option<usize>,
}

impl VaeTilingArgs {
    /// The checked choice the core request carries.
    pub fn tiling(&self) -> anyhow::Result<VaeTiling> {
        let tiling = VaeTiling { mode: self.vae_tiling.parse()?, tile_px: self.vae_tile, budget_bytes: None };
        tiling.validate()?;
        Ok(tiling)
    }
}

impl RunArgs {
    /// Whether progress goes to stderr.
    pub fn show(&self) -> bool {
        !(self.json || self.quiet)
    }

    pub fn device(&self) -> anyhow::Result<Device> {
        Ok(device::open(self.device.parse::<DeviceRequest>()?)?)
    }

    /// The dtype the user asked for, if any.
    pub fn explicit_dtype(&self) -> anyhow::Result<Option<DType>> {
        Ok(self.dtype.as_deref().map(device::parse_dtype).transpose()?)
    }
}

/// Which model a job uses: a folder or hub id, or a tier of a project.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A diffusers folder or a hub id (e.g. stabilityai/sd-turbo; inpainting also takes
    /// 9-channel inpainting models).
    #[arg(long, required_unless_present = "tier", conflicts_with = "tier")]
    pub model: Option<String>,
    /// Take the model and its defaults from a tier (draft, final, ...; see `kiln tiers`); the
    /// job is then recorded in the project's asset library and billed to its budget.
    #[arg(long)]
    pub tier: Option<String>,
    /// Project folder whose kiln.toml layers the tiers and whose library records --tier jobs
    /// (default: $KILN_PROJECT or the current folder).
    #[arg(long)]
    pub project: Option<PathBuf>,
    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
}

/// A tier job: the tier and the project that defines it, records it and pays for it.
pub struct TierJob {
    pub project: Project,
    pub tier: Tier,
}

/// What [`ModelArgs::resolve`] decided: the device, the dtype and, for --tier, the tier job.
pub struct ModelChoice {
    pub device: Device,
    pub dtype: DType,
    pub tier: Option<TierJob>,
}

impl ModelArgs {
    /// Resolves the device, the tier (with its project) and the dtype. A tier job of `images`
    /// images is checked against the project budget here, before any expensive work: a warning
    /// past the soft limit, an error past the hard one.
    pub fn resolve(&self, run: &RunArgs, images: usize) -> anyhow::Result<ModelChoice> {
        let device = run.device()?;
        let explicit_dtype = run.explicit_dtype()?;
        let tier = match &self.tier {
            Some(name) => {
                let project = Project::find(self.project.as_deref())?;
                let tier = project.tiers()?.get(name)?.clone();
                let library = project.library()?;
                let estimate = ledger::estimate(&library, &tier, images)?;
                if let Some(warning) = ledger::check_budget(&project.config, library.spent()?, estimate)? {
                    eprintln!("warning: {warning}");
                }
                Some(TierJob { project, tier })
            }
            None => None,
        };
        let dtype = match &tier {
            Some(job) => tier_dtype(&job.tier, &device, explicit_dtype)?,
            None => explicit_dtype.unwrap_or_else(|| device::default_dtype(&device)),
        };
        Ok(ModelChoice { device, dtype, tier })
    }

    /// Loads the chosen model: the tier's (with its VAE and drift check) or --model's.
    pub fn load(&self, choice: &ModelChoice, show: bool) -> anyhow::Result<LoadedModel> {
        match (&choice.tier, &self.model) {
            (Some(job), _) => Ok(load_tier_model(&job.tier, &choice.device, choice.dtype, show)?),
            (None, Some(spec)) => {
                let fp16_variant = choice.dtype != DType::F32;
                let source = hub::resolve(spec, self.revision.as_deref(), fp16_variant, show)?;
                LoadedModel::load(source, &choice.device, choice.dtype)
                    .with_context(|| format!("loading model {spec}"))
            }
            (None, None) => bail!("pass --model or --tier"),
        }
    }
}

impl ModelChoice {
    pub fn tier(&self) -> Option<&Tier> {
        self.tier.as_ref().map(|job| &job.tier)
    }
}

/// How the sampler runs and how many images it makes.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Negative prompt (classifier-free guidance's unconditional side).
    #[arg(long)]
    pub negative: Option<String>,
    /// Denoising steps (default: the tier's, else 30).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; <= 1 skips the unconditional pass (default 7.5, SDXL 5).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim | euler | euler-a | dpmpp-2m | dpmpp-2m-karras | lcm | pndm (default: the model's own).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Seed of the first image (default: random); image i uses seed + i.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images (seeds S..S+N-1).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

impl SamplingArgs {
    /// Checks --count and parses --scheduler.
    pub fn scheduler(&self) -> anyhow::Result<Option<SchedulerKind>> {
        if self.count == 0 || self.count > MAX_COUNT {
            bail!("invalid --count: {} (expected 1..={MAX_COUNT})", self.count);
        }
        Ok(self.scheduler.as_deref().map(str::parse).transpose()?)
    }

    /// The per-image seeds starting at `first`.
    pub fn seeds(&self, first: u64) -> Vec<u64> {
        (0..self.count as u64).map(|i| first.wrapping_add(i)).collect()
    }
}
