//! `kiln generate`.

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::device::{self, DeviceRequest};
use kiln_core::image::png_meta::write_png_atomic;
use kiln_core::image::unit_to_rgb8;
use kiln_core::library::assets::JobTimings;
use kiln_core::library::Project;
use kiln_core::loaders::hub;
use kiln_core::loaders::weights::sha256_file;
use kiln_core::pipeline::generate::{generate, Progress};
use kiln_core::pipeline::metadata::{png_chunks, FileRef, ImageRecord};
use kiln_core::pipeline::model::LoadedModel;
use kiln_core::schedule::SchedulerKind;
use kiln_core::tiers::load::{load_tier_model, tier_dtype, tier_request, Overrides};
use kiln_core::tiers::Tier;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers folder or a hub id (e.g. stabilityai/sd-turbo).
    #[arg(long, required_unless_present = "tier", conflicts_with = "tier")]
    model: Option<String>,
    /// Take the model and defaults from a tier (draft, final, ...; see `kiln tiers`).
    #[arg(long)]
    tier: Option<String>,
    /// Project folder whose kiln.toml layers the tiers (default: $KILN_PROJECT or the current folder).
    #[arg(long)]
    project: Option<PathBuf>,
    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    revision: Option<String>,
    #[arg(long)]
    prompt: String,
    /// Negative prompt (classifier-free guidance's unconditional side).
    #[arg(long)]
    negative: Option<String>,
    /// Width in pixels (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (default: the model's native size).
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps (default: the tier's, else 30).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; <= 1 skips the unconditional pass (default 7.5, SDXL 5).
    #[arg(long)]
    guidance: Option<f64>,
    /// ddim | euler | euler-a | dpmpp-2m | dpmpp-2m-karras | lcm | pndm (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    /// Seed of the first image (default: random); image i uses seed + i.
    #[arg(long)]
    seed: Option<u64>,
    /// Unit-normal starting noise (.npy, [1, C, H/8, W/8]); scaled by the scheduler's initial sigma.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// img2img: the starting image.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much to change the init image, in (0, 1].
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// Number of images (seeds S..S+N-1).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Images per UNet batch (default: all of --count, up to 4).
    #[arg(long)]
    batch: Option<usize>,
    /// auto | cpu | cuda[:N] | metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32 | f16 | bf16 (default: f16 on GPU, f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Output PNG (with --count N: PATH-0.png, PATH-1.png, ...). Default: kiln-<seed>.png.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object on stdout (paths, seeds, timings, memory); no progress bar.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

/// A denoising progress bar on stderr (hidden when `show` is false).
pub(crate) struct Bar(pub(crate) Option<ProgressBar>);

impl Bar {
    pub(crate) fn new(show: bool, steps: usize) -> Self {
        Bar(show.then(|| {
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} denoising [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        }))
    }

    pub(crate) fn finish(self) {
        if let Some(bar) = self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn step(&mut self, done: usize, total: usize, seconds: f64) {
        if let Some(bar) = &self.0 {
            if bar.length() != Some(total as u64) {
                bar.set_length(total as u64);
                bar.set_position(0);
            }
            bar.set_position(done as u64);
            bar.set_message(format!("{seconds:.2} s/step"));
        }
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let scheduler: Option<SchedulerKind> = args.scheduler.as_deref().map(str::parse).transpose()?;
    if args.count == 0 || args.count > 1000 {
        bail!("invalid --count: {} (expected 1..=1000)", args.count);
    }
    let device = device::open(args.device.parse::<DeviceRequest>()?)?;
    let explicit_dtype = args.dtype.as_deref().map(device::parse_dtype).transpose()?;
    let tier = match &args.tier {
        Some(name) => Some(Project::find(args.project.as_deref())?.tiers()?.get(name)?.clone()),
        None => None,
    };
    let dtype = match &tier {
        Some(t) => tier_dtype(t, &device, explicit_dtype)?,
        None => explicit_dtype.unwrap_or_else(|| device::default_dtype(&device)),
    };
    let show = !(args.json || args.quiet);
    // Read the cheap inputs before the expensive model load, so bad input fails fast.
    let init_image = args.init_image.as_deref().map(kiln_core::image::load_rgb).transpose()?;
    let init_latents = match &args.init_latents {
        Some(p) => Some(read_npy(p)?),
        None => None,
    };

    let t0 = Instant::now();
    let model = match (&tier, &args.model) {
        (Some(t), _) => load_tier_model(t, &device, dtype, show)?,
        (None, Some(spec)) => {
            let source = hub::resolve(spec, args.revision.as_deref(), dtype != candle_dtype_f32(), show)?;
            LoadedModel::load(source, &device, dtype).with_context(|| format!("loading model {spec}"))?
        }
        (None, None) => bail!("pass --model or --tier"),
    };
    let load_seconds = t0.elapsed().as_secs_f64();

    let seed = args.seed.unwrap_or_else(random_seed);
    let seeds: Vec<u64> = (0..args.count as u64).map(|i| seed.wrapping_add(i)).collect();
    let overrides = Overrides {
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        scheduler,
        negative_prompt: args.negative.clone(),
        max_batch: Some(args.batch.unwrap_or(args.count.min(4))),
    };
    let fallback = Tier::untiered();
    let mut request =
        tier_request(tier.as_ref().unwrap_or(&fallback), &model, &args.prompt, seeds.clone(), &overrides)?;
    if let Some(img) = init_image {
        // img2img without a tier defaults to the init image's size, rounded down to the VAE factor.
        if tier.is_none() {
            let f = model.vae.scale_factor();
            request.width = args.width.unwrap_or((img.width() as usize / f) * f);
            request.height = args.height.unwrap_or((img.height() as usize / f) * f);
        }
        request.init_image = Some(img);
        request.strength = args.strength;
    }
    request.init_latents = init_latents;
    request.validate(&model)?;

    let mut progress = Bar::new(show, request.steps);
    let output = generate(&model, &request, &mut progress)?;
    progress.finish();
    for w in &output.warnings {
        eprintln!("warning: {w}");
    }

    let init_latents_ref = args.init_latents.as_deref().map(file_ref).transpose()?;
    let init_image_ref = args.init_image.as_deref().map(file_ref).transpose()?;
    let mut outputs = Vec::new();
    for (i, image) in output.images.iter().enumerate() {
        let path = output_path(args.out.as_deref(), image.seed, i, args.count);
        let record = ImageRecord::build(
            &model,
            &request,
            output.scheduler,
            image.seed,
            i,
            init_latents_ref.clone(),
            init_image_ref.clone(),
        );
        let record = ImageRecord { tier: args.tier.clone(), ..record };
        let rgb = unit_to_rgb8(&image.pixels)?;
        write_png_atomic(&path, &rgb, &png_chunks(&record, output.scheduler, &model))?;
        outputs.push(serde_json::json!({
            "path": path,
            "seed": image.seed,
            // the dtype the image was decoded in again after its f16 VAE decode overflowed
            "vae_fallback": image.vae_fallback.map(device::dtype_name),
        }));
        if !args.json {
            eprintln!("wrote {} (seed {})", path.display(), image.seed);
        }
    }
    if args.json {
        let t = &output.timings;
        let report = serde_json::json!({
            "outputs": outputs,
            "seeds": seeds,
            "scheduler": output.scheduler.name(),
            "seconds": {
                "load": load_seconds,
                "text_encode": t.text_encode,
                "vae_encode": t.vae_encode,
                "steps": t.steps,
                "vae_decode": t.vae_decode,
                "generate": t.total,
                "total": start.elapsed().as_secs_f64(),
            },
            "peak_memory_bytes": device::peak_host_memory_bytes(),
            "device": device::name(&device),
            "dtype": device::dtype_name(dtype),
            "tier": args.tier,
            "credits": tier.as_ref().map(|tier| {
                let secs = JobTimings::from_stages(load_seconds, t).device_seconds();
                tier.price.cost(output.images.len(), secs)
            }),
            "warnings": output.warnings,
        });
        println!("{report}");
    }
    Ok(())
}

pub(crate) fn candle_dtype_f32() -> kiln_core::candle::DType {
    kiln_core::candle::DType::F32
}

pub(crate) fn read_npy(path: &Path) -> anyhow::Result<kiln_core::candle::Tensor> {
    if !path.is_file() {
        bail!("--init-latents: {} not found", path.display());
    }
    let t = kiln_core::candle::Tensor::read_npy(path)
        .with_context(|| format!("--init-latents: {} is not a readable .npy array", path.display()))?;
    Ok(t.to_dtype(kiln_core::candle::DType::F32)?)
}

pub(crate) fn file_ref(path: &Path) -> anyhow::Result<FileRef> {
    Ok(FileRef { path: path.display().to_string(), sha256: sha256_file(path)? })
}

fn output_path(out: Option<&Path>, seed: u64, index: usize, count: usize) -> PathBuf {
    match out {
        None => PathBuf::from(format!("kiln-{seed}.png")),
        Some(p) if count == 1 => p.to_path_buf(),
        Some(p) => {
            let stem =
                p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "kiln".into());
            p.with_file_name(format!("{stem}-{index}.png"))
        }
    }
}

pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    // Keep seeds within 32 bits: torch's CPU generator only uses the low 32 bits.
    h.finish() & 0xffff_ffff
}
