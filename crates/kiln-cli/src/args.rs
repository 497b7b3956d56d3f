//! Flags the generation-family commands share (generate, inpaint, outpaint, erase, and the
//! project jobs), and what they resolve to.

use anyhow::bail;
use clap::Args;
use kiln_core::candle::{DType, Device};
use kiln_core::device::{self, DeviceRequest};
use kiln_core::schedule::SchedulerKind;
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
    /// device | cpu: where diffusion models' text encoders live. `cpu` runs them in f32 on the
    /// CPU so the device holds only the denoiser and the VAE (FLUX.1-dev on a 24 GB card).
    #[arg(long, default_value = "device", value_name = "WHERE")]
    pub text_encoders: String,
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

impl RunArgs {
    /// The CPU and no progress bar: for jobs that are pixel operations on the host (grading),
    /// whose commands have no device options.
    pub fn quiet(json: bool) -> Self {
        Self {
            device: "cpu".into(),
            dtype: None,
            text_encoders: "device".into(),
            json,
            quiet: true,
            vae: VaeTilingArgs { vae_tiling: "auto".into(), vae_tile: None },
        }
    }

    /// `--text-encoders`, checked.
    pub fn text_encoders(&self) -> anyhow::Result<kiln_core::pipeline::model::TextPlacement> {
        Ok(self.text_encoders.parse()?)
    }

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

/// How the sampler runs and how many images it makes.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Negative prompt (classifier-free guidance's unconditional side).
    #[arg(long)]
    pub negative: Option<String>,
    /// Denoising steps (default: the tier's, else 30; FLUX 28).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale (default: the tier's, else the family's: SD 7.5, SDXL 5, FLUX 3.5). SD/SDXL:
    /// classifier-free guidance, <= 1 skips the unconditional pass. FLUX.1-dev: the distilled
    /// guidance the transformer embeds (no negative pass); FLUX.1-schnell ignores it.
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
    /// A preset (brand kit, `kiln presets`): its prompt template, negative prompt, tier, size,
    /// sampler settings, seed and grade apply where these options leave them unset.
    #[arg(long)]
    pub preset: Option<String>,
}

impl SamplingArgs {
    /// The spec's seed: --seed, else (without a preset, whose policy may fix it) a random one
    /// chosen here so the command can print it.
    pub fn spec_seed(&self) -> Option<u64> {
        seed_for(self.seed, self.preset.as_deref())
    }

    /// Checks --count and parses --scheduler.
    pub fn scheduler(&self) -> anyhow::Result<Option<SchedulerKind>> {
        if self.count == 0 || self.count > MAX_COUNT {
            bail!("invalid --count: {} (expected 1..={MAX_COUNT})", self.count);
        }
        Ok(self.scheduler.as_deref().map(str::parse).transpose()?)
    }
}

/// `--seed`, else a random seed unless a preset decides (its seed policy, applied by the job).
pub fn seed_for(seed: Option<u64>, preset: Option<&str>) -> Option<u64> {
    match (seed, preset) {
        (Some(s), _) => Some(s),
        (None, Some(_)) => None,
        (None, None) => Some(kiln_core::jobs::engine::random_seed()),
    }
}
