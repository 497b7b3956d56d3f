//! `kiln inpaint`, `kiln outpaint` and `kiln erase`: one inpainting job each, with the
//! metadata `kiln generate` writes plus the mask and region used.

use crate::args::{ModelArgs, RunArgs, SamplingArgs};
use crate::generate::{file_ref, random_seed, read_npy, stage_seconds, Bar};
use anyhow::{bail, Context};
use clap::Args;
use kiln_core::device;
use kiln_core::image::mask::Mask;
use kiln_core::image::png_meta::write_png_atomic;
use kiln_core::library::assets::JobTimings;
use kiln_core::library::Project;
use kiln_core::pipeline::inpaint::{check_inputs, inpaint, Blend, InpaintOutput, InpaintRequest, Region};
use kiln_core::pipeline::metadata::{model_record, png_chunks, FileRef, ImageRecord, InpaintRecord};
use kiln_core::pipeline::model::LoadedModel;
use kiln_core::pipeline::outpaint::{extend_canvas, Extension, Prefill, DEFAULT_OVERLAP};
use kiln_core::tiers::load::{tier_request, Overrides};
use kiln_core::tiers::Tier;
use kiln_core::workflow::{record_tier_job, WrittenImage};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The eraser's prompt: ask for plain continuation of the surroundings.
pub const ERASE_PROMPT: &str = "empty background, seamless continuation of the surroundings, clean, natural";
/// The eraser's negative prompt: what removal must not put back.
pub const ERASE_NEGATIVE: &str = "object, person, animal, text, watermark, logo, frame, shadow, artifacts";

/// Options shared by the three commands.
#[derive(Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    source: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Unit-normal starting noise (.npy) at the processing size (see --json's "plan").
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Pixels around the mask's box in only-masked mode.
    #[arg(long, default_value_t = kiln_core::pipeline::inpaint::DEFAULT_PADDING)]
    padding: u32,
    /// auto | whole | only-masked (auto: only-masked when the mask is small on a large image).
    #[arg(long, default_value = "auto")]
    region: String,
    /// kiln (soft masks, feathered; default) | diffusers (binarized, diffusers' own blending).
    #[arg(long, default_value = "kiln")]
    blend: String,
    /// Re-impose the known region at every step: auto (on for ordinary models, off for
    /// dedicated 9-channel inpainting models, which see the known image themselves) | on | off.
    #[arg(long, default_value = "auto")]
    reimpose: String,
    /// Output PNG (with --count N: PATH-0.png, ...). Default: kiln-<command>-<seed>.png.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
pub struct InpaintArgs {
    /// The image to edit.
    image: PathBuf,
    /// White = repaint: a grayscale image, or an RGBA image whose transparent pixels are repainted.
    #[arg(long)]
    mask: PathBuf,
    #[arg(long)]
    prompt: String,
    /// How much to change the masked area, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// Mask feathering in pixels (Gaussian standard deviation; 0 = hard edge). Default 4,
    /// 0 with --blend diffusers.
    #[arg(long)]
    mask_blur: Option<f64>,
    /// Stretch a mask of another size to the image instead of refusing it.
    #[arg(long)]
    resize_mask: bool,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Args, Debug)]
pub struct OutpaintArgs {
    /// The image to extend.
    image: PathBuf,
    /// What the new area shows (default: empty, the model continues the scene).
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 0)]
    left: u32,
    #[arg(long, default_value_t = 0)]
    right: u32,
    #[arg(long, default_value_t = 0)]
    top: u32,
    #[arg(long, default_value_t = 0)]
    bottom: u32,
    /// Extend to an aspect ratio (e.g. 16:9), evenly on both sides of the short dimension.
    #[arg(long, conflicts_with_all = ["left", "right", "top", "bottom"])]
    to: Option<String>,
    /// edge (replicate the border) | noise (noise matched to the border's colours).
    #[arg(long, default_value = "edge")]
    fill: String,
    /// How far the soft mask reaches into the original, in pixels.
    #[arg(long, default_value_t = DEFAULT_OVERLAP)]
    overlap: u32,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Args, Debug)]
pub struct EraseArgs {
    /// The image to clean up.
    image: PathBuf,
    /// White = remove.
    #[arg(long)]
    mask: PathBuf,
    /// Override the neutral fill prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Grow the mask by this many pixels to catch the object's fringe and shadow.
    #[arg(long, default_value_t = 8)]
    grow: u32,
    /// Mask feathering in pixels (default 4, 0 with --blend diffusers).
    #[arg(long)]
    mask_blur: Option<f64>,
    /// Stretch a mask of another size to the image instead of refusing it.
    #[arg(long)]
    resize_mask: bool,
    #[command(flatten)]
    job: JobArgs,
}

/// What differs between the three commands once their inputs are read.
struct Job {
    mode: &'static str,
    image_path: PathBuf,
    image: kiln_core::image::RgbImage,
    mask: Mask,
    mask_path: Option<PathBuf>,
    prompt: String,
    negative: Option<String>,
    strength: f64,
    /// None = the blend's default (4 px for kiln, 0 for diffusers).
    mask_blur: Option<f64>,
    extend: Option<(Extension, Prefill, u32)>,
    grow: Option<u32>,
}

pub fn run_inpaint(args: InpaintArgs) -> anyhow::Result<()> {
    let image = kiln_core::image::load_rgb(&args.image)?;
    let mask = read_mask(&args.mask, &image, args.resize_mask)?;
    let job = Job {
        mode: "inpaint",
        image_path: args.image,
        image,
        mask,
        mask_path: Some(args.mask),
        prompt: args.prompt,
        negative: args.job.sampling.negative.clone(),
        strength: args.strength,
        mask_blur: args.mask_blur,
        extend: None,
        grow: None,
    };
    run(job, &args.job)
}

pub fn run_outpaint(args: OutpaintArgs) -> anyhow::Result<()> {
    let image = kiln_core::image::load_rgb(&args.image)?;
    let ext = match &args.to {
        Some(aspect) => {
            let (aw, ah) = Extension::parse_aspect(aspect)?;
            Extension::to_aspect(image.width(), image.height(), aw, ah)?
        }
        None => Extension { left: args.left, right: args.right, top: args.top, bottom: args.bottom },
    };
    let fill: Prefill = args.fill.parse()?;
    let seed = args.job.sampling.seed.unwrap_or_else(random_seed);
    let canvas = extend_canvas(&image, ext, fill, args.overlap, seed)?;
    let job = Job {
        mode: "outpaint",
        image_path: args.image,
        image: canvas.image,
        mask: canvas.mask,
        mask_path: None,
        prompt: args.prompt,
        negative: args.job.sampling.negative.clone(),
        strength: 1.0,
        // The ramp into the original is the feathering.
        mask_blur: Some(0.0),
        extend: Some((ext, fill, args.overlap)),
        grow: None,
    };
    run_seeded(job, &args.job, seed)
}

pub fn run_erase(args: EraseArgs) -> anyhow::Result<()> {
    let image = kiln_core::image::load_rgb(&args.image)?;
    let mask = read_mask(&args.mask, &image, args.resize_mask)?;
    let grown = mask.dilated(args.grow);
    if grown.is_full() {
        bail!(
            "invalid --grow: the mask grown by {} px covers the whole image {}x{}; use a smaller --grow",
            args.grow,
            image.width(),
            image.height()
        );
    }
    let job = Job {
        mode: "erase",
        image_path: args.image,
        image,
        mask: grown,
        mask_path: Some(args.mask),
        prompt: args.prompt.unwrap_or_else(|| ERASE_PROMPT.to_string()),
        negative: Some(args.job.sampling.negative.clone().unwrap_or_else(|| ERASE_NEGATIVE.to_string())),
        strength: 1.0,
        mask_blur: args.mask_blur,
        extend: None,
        grow: Some(args.grow),
    };
    run(job, &args.job)
}

/// Reads the mask and checks it against the image before any model is loaded.
fn read_mask(path: &Path, image: &kiln_core::image::RgbImage, resize: bool) -> anyhow::Result<Mask> {
    let mut mask = Mask::load(path)?;
    if resize {
        mask = mask.resized(image.width(), image.height())?;
    }
    check_inputs(image, &mask).with_context(|| format!("mask {}", path.display()))?;
    Ok(mask)
}

fn run(job: Job, args: &JobArgs) -> anyhow::Result<()> {
    let seed = args.sampling.seed.unwrap_or_else(random_seed);
    run_seeded(job, args, seed)
}

fn run_seeded(job: Job, args: &JobArgs, seed: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let scheduler = args.sampling.scheduler()?;
    let blend: Blend = args.blend.parse()?;
    let region = match args.region.as_str() {
        "auto" => Region::Auto,
        "whole" => Region::Whole,
        "only-masked" => Region::OnlyMasked,
        other => bail!("invalid --region: `{other}` (expected auto, whole or only-masked)"),
    };
    let reimpose = match args.reimpose.as_str() {
        "auto" => None,
        "on" => Some(true),
        "off" => Some(false),
        other => bail!("invalid --reimpose: `{other}` (expected auto, on or off)"),
    };
    check_inputs(&job.image, &job.mask)?;
    let init_latents = args.init_latents.as_deref().map(read_npy).transpose()?;
    let choice = args.source.resolve(&args.run, args.sampling.count)?;
    let show = args.run.show();

    let t0 = Instant::now();
    let model = args.source.load(&choice, show)?;
    let load_seconds = t0.elapsed().as_secs_f64();

    let seeds = args.sampling.seeds(seed);
    // The tier's defaults (or, untiered, the model's) under the flags, resolved as generation does.
    let overrides = Overrides {
        steps: args.sampling.steps,
        guidance: args.sampling.guidance,
        scheduler,
        negative_prompt: job.negative.clone(),
        ..Overrides::default()
    };
    let fallback = Tier::untiered();
    let tiered = choice.tier();
    let defaults = tier_request(tiered.unwrap_or(&fallback), &model, &job.prompt, seeds.clone(), &overrides)?;
    let mut request = InpaintRequest::new(job.prompt.clone(), job.image.clone(), job.mask.clone());
    request.negative_prompt = defaults.negative_prompt;
    request.steps = defaults.steps;
    request.guidance = defaults.guidance;
    request.scheduler = defaults.scheduler;
    if tiered.is_some() {
        request.native_size = Some((defaults.width as u32, defaults.height as u32));
    }
    request.seeds = seeds.clone();
    request.init_latents = init_latents;
    request.strength = job.strength;
    request.mask_blur = job.mask_blur.unwrap_or(match blend {
        Blend::Kiln => 4.0,
        Blend::Diffusers => 0.0,
    });
    request.blend = blend;
    request.region = region;
    request.padding = args.padding;
    request.reimpose = reimpose;
    request.vae_tiling = args.run.vae.tiling()?;

    let mut progress = Bar::new(show, request.steps);
    let output = inpaint(&model, &request, &mut progress)?;
    progress.finish();
    for w in &output.warnings {
        eprintln!("warning: {w}");
    }
    let ctx = OutputContext { job: &job, args, model: &model, request: &request, output: &output };
    let tier = choice.tier.as_ref().map(|job| (&job.project, &job.tier));
    write_outputs(&ctx, tier, seeds, load_seconds, start)
}

/// One finished job, to write out.
struct OutputContext<'a> {
    job: &'a Job,
    args: &'a JobArgs,
    model: &'a LoadedModel,
    request: &'a InpaintRequest,
    output: &'a InpaintOutput,
}

fn write_outputs(
    ctx: &OutputContext,
    tier: Option<(&Project, &Tier)>,
    seeds: Vec<u64>,
    load_seconds: f64,
    start: Instant,
) -> anyhow::Result<()> {
    let OutputContext { job, args, model, request, output } = *ctx;
    let timings = JobTimings::from_stages(load_seconds, &output.timings);
    let credits = tier.map(|(_, t)| t.price.cost(output.images.len(), timings.device_seconds()));
    let image_ref = file_ref(&job.image_path)?;
    let mask_ref: Option<FileRef> = job.mask_path.as_deref().map(file_ref).transpose()?;
    let init_latents_ref = args.init_latents.as_deref().map(file_ref).transpose()?;
    let plan = output.plan;
    let inpaint_record = InpaintRecord {
        mask: mask_ref,
        mask_blur: request.mask_blur,
        blend: match request.blend {
            Blend::Kiln => "kiln",
            Blend::Diffusers => "diffusers",
        }
        .to_string(),
        padding: request.padding,
        only_masked: plan.only_masked,
        crop: [plan.crop.x, plan.crop.y, plan.crop.width, plan.crop.height],
        process_width: plan.process_width,
        process_height: plan.process_height,
        extend: job.extend.map(|(e, _, _)| [e.left, e.right, e.top, e.bottom]),
        fill: job.extend.map(|(_, f, _)| match f {
            Prefill::Edge => "edge".to_string(),
            Prefill::Noise => "noise".to_string(),
        }),
        overlap: job.extend.map(|(_, _, o)| o),
        grow: job.grow,
        reimpose: request.reimpose,
        native: Some([plan.native_width, plan.native_height]),
    };
    let mut outputs = Vec::new();
    let mut written = Vec::new();
    for (i, image) in output.images.iter().enumerate() {
        let path = output_path(args.out.as_deref(), job.mode, image.seed, i, args.sampling.count);
        let record = ImageRecord {
            kiln_version: kiln_core::VERSION.to_string(),
            mode: job.mode.to_string(),
            model: model_record(&model.source, model.weights.clone()),
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            width: image.image.width() as usize,
            height: image.image.height() as usize,
            steps: request.steps,
            guidance: request.guidance,
            scheduler: output.scheduler.name().to_string(),
            scheduler_class: model.scheduler_class.clone(),
            scheduler_config: model.scheduler_config_json.clone(),
            seed: image.seed,
            batch_index: i,
            init_latents: init_latents_ref.clone(),
            init_image: Some(image_ref.clone()),
            strength: Some(request.strength),
            dtype: device::dtype_name(model.dtype).to_string(),
            device: device::name(&model.device),
            vae: None,
            tier: tier.map(|(_, t)| t.name.clone()),
            inpaint: Some(inpaint_record.clone()),
        };
        write_png_atomic(&path, &image.image, &png_chunks(&record, output.scheduler, model))?;
        outputs.push(serde_json::json!({ "path": path, "seed": image.seed }));
        if !args.run.json {
            eprintln!("wrote {} (seed {})", path.display(), image.seed);
        }
        // Absolute the way the project root is, so the library stores it relative to the root.
        let path = std::path::absolute(&path).unwrap_or(path);
        written.push(WrittenImage { path, seed: image.seed, rgb: image.image.clone(), record });
    }
    let recorded = match tier {
        Some((project, tier)) => {
            let mut library = project.library()?;
            let (kind, input) = (job.mode, Some(&image_ref));
            Some(record_tier_job(&mut library, kind, kind, tier, model, timings.clone(), &written, input)?)
        }
        None => None,
    };
    if let (Some(r), false) = (&recorded, args.run.json) {
        let parent = r.parent_asset_id.map(|p| format!(", child of asset {p}")).unwrap_or_default();
        eprintln!("recorded job {}, assets {:?}{parent}", r.job_id, r.asset_ids);
    }
    if args.run.json {
        let t = &output.timings;
        let report = serde_json::json!({
            "outputs": outputs,
            "seeds": seeds,
            "mode": job.mode,
            "scheduler": output.scheduler.name(),
            "unet": match output.unet_kind {
                kiln_core::pipeline::inpaint::UNetKind::Plain => "plain",
                kiln_core::pipeline::inpaint::UNetKind::Inpaint => "inpaint",
            },
            "plan": plan,
            "seconds": stage_seconds(load_seconds, t, "inpaint", start),
            "peak_memory_bytes": device::peak_host_memory_bytes(),
            "device": device::name(&model.device),
            "dtype": device::dtype_name(model.dtype),
            "tier": tier.map(|(_, t)| t.name.clone()),
            "credits": credits,
            "library": recorded,
            "warnings": output.warnings,
        });
        println!("{report}");
    }
    Ok(())
}

fn output_path(out: Option<&Path>, mode: &str, seed: u64, index: usize, count: usize) -> PathBuf {
    match out {
        None => PathBuf::from(format!("kiln-{mode}-{seed}.png")),
        Some(p) if count == 1 => p.to_path_buf(),
        Some(p) => {
            let stem =
                p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "kiln".into());
            p.with_file_name(format!("{stem}-{index}.png"))
        }
    }
}
