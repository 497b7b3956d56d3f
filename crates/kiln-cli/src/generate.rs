//! `kiln generate`.

use crate::args::{ModelArgs, RunArgs, SamplingArgs, TierJob};
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::device;
use kiln_core::image::png_meta::write_png_atomic;
use kiln_core::image::unit_to_rgb8;
use kiln_core::library::assets::JobTimings;
use kiln_core::loaders::weights::sha256_file;
use kiln_core::pipeline::generate::{generate, Progress};
use kiln_core::pipeline::metadata::{png_chunks, FileRef, ImageRecord};
use kiln_core::tiers::load::{tier_request, Overrides};
use kiln_core::tiers::Tier;
use kiln_core::workflow::{record_tier_job, WrittenImage};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    source: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Width in pixels (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (default: the model's native size).
    #[arg(long)]
    height: Option<usize>,
    /// Unit-normal starting noise (.npy, [1, C, H/8, W/8]); scaled by the scheduler's initial sigma.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// img2img: the starting image.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much to change the init image, in (0, 1].
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// Images per UNet batch (default: all of --count, up to 4).
    #[arg(long)]
    batch: Option<usize>,
    /// Output PNG (with --count N: PATH-0.png, PATH-1.png, ...). Default: kiln-<seed>.png.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
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
    let scheduler = args.sampling.scheduler()?;
    let choice = args.source.resolve(&args.run, args.sampling.count)?;
    let (device, dtype, tier) = (&choice.device, choice.dtype, choice.tier());
    let show = args.run.show();
    // Read the cheap inputs before the expensive model load, so bad input fails fast.
    let init_image = args.init_image.as_deref().map(kiln_core::image::load_rgb).transpose()?;
    let init_latents = match &args.init_latents {
        Some(p) => Some(read_npy(p)?),
        None => None,
    };

    let cpu0 = kiln_core::workflow::process_cpu_seconds();
    let t0 = Instant::now();
    let model = args.source.load(&choice, show)?;
    let load_seconds = t0.elapsed().as_secs_f64();

    let seeds = args.sampling.seeds(args.sampling.seed.unwrap_or_else(random_seed));
    let count = args.sampling.count;
    let overrides = Overrides {
        width: args.width,
        height: args.height,
        steps: args.sampling.steps,
        guidance: args.sampling.guidance,
        scheduler,
        negative_prompt: args.sampling.negative.clone(),
        max_batch: Some(args.batch.unwrap_or(count.min(4))),
        vae_tiling: args.run.vae.tiling()?,
    };
    let fallback = Tier::untiered();
    let mut request =
        tier_request(tier.unwrap_or(&fallback), &model, &args.prompt, seeds.clone(), &overrides)?;
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
    let mut written = Vec::new();
    for (i, image) in output.images.iter().enumerate() {
        let path = output_path(args.out.as_deref(), image.seed, i, count);
        let record = ImageRecord::build(
            &model,
            &request,
            output.scheduler,
            image.seed,
            i,
            init_latents_ref.clone(),
            init_image_ref.clone(),
        );
        let record = ImageRecord { tier: tier.map(|t| t.name.clone()), ..record };
        let rgb = unit_to_rgb8(&image.pixels)?;
        write_png_atomic(&path, &rgb, &png_chunks(&record, output.scheduler, &model))?;
        outputs.push(serde_json::json!({
            "path": path,
            "seed": image.seed,
            // the dtype the image was decoded in again after its f16 VAE decode overflowed
            "vae_fallback": image.vae_fallback.map(device::dtype_name),
        }));
        if !args.run.json {
            eprintln!("wrote {} (seed {})", path.display(), image.seed);
        }
        // Absolute the way the project root is, so the library stores it relative to the root.
        let path = std::path::absolute(&path).unwrap_or(path);
        written.push(WrittenImage { path, seed: image.seed, rgb, record });
    }
    let mut timings = JobTimings::from_stages(load_seconds, &output.timings);
    timings.cpu_seconds = cpu_seconds_since(cpu0);
    // A tier's images are assets of the project (kind: the tier's name), children of the init
    // image's asset when it is one.
    let recorded = match &choice.tier {
        Some(TierJob { project, tier }) => {
            let mut library = project.library()?;
            let kind = tier.name.as_str();
            let r = record_tier_job(
                &mut library,
                "generate",
                kind,
                tier,
                &model,
                timings.clone(),
                &written,
                init_image_ref.as_ref(),
            )?;
            if !args.run.json {
                eprintln!("recorded job {}, assets {:?}", r.job_id, r.asset_ids);
            }
            Some(r)
        }
        None => None,
    };
    if args.run.json {
        let t = &output.timings;
        let report = serde_json::json!({
            "outputs": outputs,
            "seeds": seeds,
            "scheduler": output.scheduler.name(),
            "seconds": stage_seconds(load_seconds, t, "generate", start),
            "peak_memory_bytes": device::peak_host_memory_bytes(),
            "device": device::name(device),
            "dtype": device::dtype_name(dtype),
            "tier": tier.map(|t| t.name.clone()),
            "credits": tier.map(|tier| tier.price.cost(output.images.len(), timings.device_seconds())),
            "library": recorded,
            "warnings": output.warnings,
        });
        println!("{report}");
    }
    Ok(())
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

fn cpu_seconds_since(start: Option<f64>) -> Option<f64> {
    match (start, kiln_core::workflow::process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    }
}

/// The `seconds` object of a job's `--json` report: load, each stage, the job (`job_key`) and
/// the whole command since `start`.
pub(crate) fn stage_seconds(
    load: f64,
    t: &kiln_core::pipeline::generate::StageTimings,
    job_key: &str,
    start: Instant,
) -> serde_json::Value {
    let mut seconds = serde_json::json!({
        "load": load,
        "text_encode": t.text_encode,
        "vae_encode": t.vae_encode,
        "steps": t.steps,
        "vae_decode": t.vae_decode,
        "total": start.elapsed().as_secs_f64(),
    });
    seconds[job_key] = serde_json::json!(t.total);
    seconds
}
