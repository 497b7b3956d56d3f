//! `kiln upscale`: tiled super-resolution of images or folders.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::args::RunArgs;
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::device;
use kiln_core::jobs::spec::RedetailSpec;
use kiln_core::loaders::store::Store;
use kiln_core::pipeline::upscale::{Target, UpscaleOptions, Upscaler};

#[derive(Args, Debug)]
pub struct UpscaleArgs {
    /// Input images (PNG 8/16-bit, JPEG, WebP) or folders of them.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Imported model name (`kiln models list`) or a weight file (.param, .pth, .safetensors).
    #[arg(long)]
    pub model: String,
    /// Scale factor (any; the model runs at its native scale, then Lanczos to the target).
    #[arg(long, conflicts_with = "to")]
    pub scale: Option<f64>,
    /// Target size: 4k or 8k (long edge 3840 / 7680) or WxH (fit inside the box).
    #[arg(long)]
    pub to: Option<String>,
    /// Largest tile side in input pixels (default: from available memory).
    #[arg(long)]
    pub tile: Option<usize>,
    /// Context pixels around each tile (default: receptive radius for SRVGG, 32 for RRDBNet).
    #[arg(long)]
    pub halo: Option<usize>,
    /// Cross-fade width between RRDBNet tiles (default: the halo).
    #[arg(long)]
    pub feather: Option<usize>,
    /// Tiles per forward call (default: 1 on CPU, 4 on GPUs).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Mirrored context past the image edges (default 10).
    #[arg(long)]
    pub border: Option<usize>,
    /// Output file (one input) or folder (several); default: `<stem>_upscaled.png` beside the input.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub redetail: RedetailArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Diffusion re-detail after super-resolution (docs/upscale.md).
#[derive(Args, Debug)]
pub struct RedetailArgs {
    /// Re-detail the upscaled image with a diffusion model: img2img at a low strength on
    /// overlapping latent tiles blended into one latent, so real detail appears and no seam can.
    #[arg(long)]
    pub redetail: bool,
    /// Tier whose model re-details (see `kiln tiers`).
    #[arg(long, requires = "redetail")]
    pub tier: Option<String>,
    /// Diffusers folder or hub id that re-details (instead of --tier).
    #[arg(long, requires = "redetail", conflicts_with = "tier")]
    pub redetail_model: Option<String>,
    /// Project folder defining the tiers (default: $KILN_PROJECT or the current folder).
    #[arg(long, requires = "redetail")]
    pub project: Option<PathBuf>,
    /// How far the result may depart from the upscale, in (0, 1] [default: 0.3].
    #[arg(long, requires = "redetail")]
    pub strength: Option<f64>,
    /// Prompt (default: the prompt recorded in the input, else none).
    #[arg(long, requires = "redetail")]
    pub prompt: Option<String>,
    /// Steps of the full schedule (about strength × steps run) [default: the tier's, else 20].
    #[arg(long, requires = "redetail")]
    pub steps: Option<usize>,
    /// Guidance scale [default: the tier's, else 5].
    #[arg(long, requires = "redetail")]
    pub guidance: Option<f64>,
    /// Negative prompt [default: the tier's].
    #[arg(long, requires = "redetail")]
    pub negative: Option<String>,
    /// FLUX: true classifier-free guidance (diffusers' true_cfg_scale). With --negative and S > 1
    /// each tile also runs a negative pass (twice the denoiser work).
    #[arg(long, value_name = "S", requires = "redetail")]
    pub true_cfg: Option<f64>,
    /// Seed [default: 0].
    #[arg(long, requires = "redetail")]
    pub seed: Option<u64>,
    /// Denoiser tile side in image pixels (a multiple of 8) [default: 512].
    #[arg(long, requires = "redetail")]
    pub redetail_tile: Option<usize>,
    /// A LoRA merged into the re-detail model (after a tier's own): an imported name
    /// (`kiln loras list`) or a .safetensors file, optional weight (default 1). Repeatable.
    #[arg(long = "lora", value_name = "NAME|PATH[:WEIGHT]", requires = "redetail")]
    pub loras: Vec<String>,
}

const REDETAIL_NEEDS_MODEL: &str =
    "--redetail needs a diffusion model: pass --tier T or --redetail-model DIR|HUB_ID";

impl RedetailArgs {
    /// Checks the options before any model loads (the job layer's checks, and a model named).
    fn check(&self) -> anyhow::Result<()> {
        if self.redetail {
            self.spec().request(None)?;
            if self.tier.is_none() && self.redetail_model.is_none() {
                bail!(REDETAIL_NEEDS_MODEL);
            }
        }
        Ok(())
    }

    /// The options as the job layer's spec, whose checks and defaults the CLI shares.
    fn spec(&self) -> RedetailSpec {
        RedetailSpec {
            tier: self.tier.clone(),
            strength: self.strength,
            prompt: self.prompt.clone(),
            steps: self.steps,
            seed: self.seed,
            tile: self.redetail_tile,
            guidance: self.guidance,
            negative: self.negative.clone(),
            true_cfg: self.true_cfg,
            loras: self.loras.clone(),
        }
    }
}

/// The re-detail model and the request every input shares.
fn redetail_setup(
    a: &RedetailArgs,
    dev: &kiln_core::candle::Device,
    dtype: Option<kiln_core::candle::DType>,
    vae: &crate::args::VaeTilingArgs,
    text: kiln_core::pipeline::model::TextPlacement,
    show: bool,
) -> anyhow::Result<
    Option<(kiln_core::pipeline::model::LoadedModel, kiln_core::pipeline::redetail::RedetailRequest)>,
> {
    if !a.redetail {
        return Ok(None);
    }
    let spec = a.spec();
    let job_loras = kiln_core::loaders::lora::resolve_all(&spec.lora_args()?)?;
    let (model, mut request) = match (&a.tier, &a.redetail_model) {
        (Some(name), _) => {
            let project = kiln_core::library::Project::find(a.project.as_deref())?;
            let tiers = kiln_core::tiers::TierRegistry::discover(Some(&project.root))?;
            let tier = tiers.get(name)?;
            kiln_core::tiers::load::require_diffusion(tier)?;
            let request = spec.request(Some(tier))?;
            let dtype = kiln_core::tiers::load::tier_dtype(tier, dev, dtype)?;
            let loras = kiln_core::tiers::load::tier_loras(tier, &job_loras)?;
            let model = kiln_core::tiers::load::load_tier_model_with(tier, &loras, dev, dtype, text, show)?;
            (model, request)
        }
        (None, Some(model)) => {
            let request = spec.request(None)?;
            let dtype = dtype.unwrap_or_else(|| device::default_dtype(dev));
            let source =
                kiln_core::loaders::hub::resolve(model, None, dtype != kiln_core::candle::DType::F32, show)?;
            let parts = kiln_core::pipeline::model::ModelParts {
                loras: job_loras.clone(),
                text,
                ..Default::default()
            };
            let model = kiln_core::pipeline::model::LoadedModel::load_parts(source, parts, dev, dtype)?;
            (model, request)
        }
        (None, None) => bail!(REDETAIL_NEEDS_MODEL),
    };
    request.vae_tiling = kiln_core::jobs::spec::vae_tiling(Some(&vae.vae_tiling), vae.vae_tile)?;
    Ok(Some((model, request)))
}

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Files and folders (their PNG/JPEG/WebP files, sorted) → the input list.
pub(crate) fn expand_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut files: Vec<PathBuf> = fs_err::read_dir(input)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("no PNG/JPEG/WebP images in folder {}", input.display());
            }
            out.extend(files);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            bail!("input not found: {}", input.display());
        }
    }
    Ok(out)
}

/// Where one input's result goes: `<stem>_<suffix>.png` beside it, or in `out` when that is a
/// folder (or there are several inputs), else `out` itself.
pub(crate) fn output_for(input: &Path, out: Option<&Path>, many: bool, suffix: &str) -> PathBuf {
    let name = format!("{}_{suffix}.png", input.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default());
    match out {
        None => input.with_file_name(name),
        Some(o) if many || o.is_dir() || o.as_os_str().to_string_lossy().ends_with('/') => o.join(name),
        Some(o) => o.to_path_buf(),
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub fn run(args: UpscaleArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let target = match (&args.scale, &args.to) {
        (Some(s), _) => Some(Target::Scale(*s)),
        (None, Some(to)) => Some(Target::parse_to(to)?),
        (None, None) => None,
    };
    let inputs = expand_inputs(&args.inputs)?;
    let many = inputs.len() > 1;
    if let (true, Some(out)) = (many, &args.out) {
        if out.is_file() {
            bail!("--out {} is a file, but there are {} inputs: give a folder", out.display(), inputs.len());
        }
    }
    let opts = UpscaleOptions {
        target,
        tile: args.tile,
        halo: args.halo,
        feather: args.feather,
        batch: args.batch,
        border: args.border,
        ..Default::default()
    };
    // Every size and count is checked before a model loads or a pixel is allocated.
    opts.validate()?;
    // Two inputs that would write the same file (a.png and a.jpg) are refused before any work.
    let mut targets = std::collections::BTreeMap::new();
    for input in &inputs {
        let output = output_for(input, args.out.as_deref(), many, "upscaled");
        if let Some(first) = targets.insert(output.clone(), input.clone()) {
            bail!(
                "{} and {} would both be written to {}; upscale them in separate calls or rename one",
                first.display(),
                input.display(),
                output.display()
            );
        }
        kiln_core::files::guard_target(&output)?;
    }
    args.redetail.check()?;
    let dev = args.run.device()?;
    let dtype = args.run.explicit_dtype()?.unwrap_or_else(|| device::default_dtype(&dev));
    let weights = Store::open_default()?.resolve(&args.model)?;
    let upscaler = Upscaler::new(weights, &dev, dtype).context("building the model")?;
    let redetail = redetail_setup(
        &args.redetail,
        &dev,
        args.run.explicit_dtype()?,
        &args.run.vae,
        args.run.text_encoders()?,
        args.run.show(),
    )?;
    // What the re-detail model's load warns about (LoRA layers that matched nothing).
    let warnings: Vec<String> = redetail.iter().flat_map(|(m, _)| m.load_warnings.clone()).collect();
    if !args.run.json {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
    }
    let show = args.run.show();
    let mut reports = Vec::new();
    let mut redetails = Vec::new();
    let mut failures = Vec::new();
    for input in &inputs {
        let output = output_for(input, args.out.as_deref(), many, "upscaled");
        let bar = if show { ProgressBar::new(1) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tiles {elapsed_precise} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let mut progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        let result = upscaler.upscale_file(input, &output, &opts, &mut progress).and_then(|r| {
            let Some((model, request)) = &redetail else { return Ok((r, None)) };
            bar.set_message("re-detail");
            let mut none = kiln_core::pipeline::generate::NoProgress;
            let d = kiln_core::pipeline::redetail::redetail_png(
                model,
                &output,
                &output,
                request.clone(),
                &mut none,
            )?;
            Ok((r, Some(d)))
        });
        match result {
            Ok((r, detail)) => {
                bar.finish_and_clear();
                if let (false, Some(d)) = (args.run.json, &detail) {
                    eprintln!(
                        "re-detailed {} at strength {} of a {}-step {} schedule ({}x{} latent tiles, {:.1}s)",
                        output.display(),
                        d.strength,
                        d.steps,
                        d.scheduler,
                        d.tiles[0],
                        d.tiles[1],
                        d.seconds
                    );
                }
                redetails.extend(detail);
                if !args.run.json {
                    eprintln!(
                        "{} -> {} ({}x{} -> {}x{}, {:.1}s)",
                        input.display(),
                        output.display(),
                        r.input_size[0],
                        r.input_size[1],
                        r.output_size[0],
                        r.output_size[1],
                        r.seconds
                    );
                }
                reports.push(r);
            }
            Err(e) => {
                bar.abandon();
                if !args.run.json {
                    eprintln!("error: {}: {e}", input.display());
                }
                failures.push(serde_json::json!({ "input": input, "error": e.to_string() }));
            }
        }
    }
    if args.run.json {
        let obj = serde_json::json!({
            "outputs": reports,
            "redetail": redetails,
            "errors": failures,
            "warnings": warnings,
            "model": upscaler.name(),
            "arch": upscaler.spec().arch_name(),
            "device": device::name(&dev),
            "dtype": device::dtype_name(dtype),
            "seconds": start.elapsed().as_secs_f64(),
            "peak_rss_bytes": peak_rss(),
        });
        println!("{obj}");
    }
    if !failures.is_empty() {
        bail!("{} of {} inputs failed", failures.len(), inputs.len());
    }
    Ok(())
}
