//! `kiln generate`.

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::device::{self, DeviceRequest};
use kiln_core::image::png_meta::write_png_atomic;
use kiln_core::image::unit_to_rgb8;
use kiln_core::loaders::diffusers::Family;
use kiln_core::loaders::hub::{self, ModelSource};
use kiln_core::loaders::weights::sha256_file;
use kiln_core::pipeline::generate::{generate, GenerateRequest, Progress};
use kiln_core::pipeline::metadata::{png_chunks, FileRef, ImageRecord, ModelRecord};
use kiln_core::pipeline::model::LoadedModel;
use kiln_core::schedule::SchedulerKind;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers folder or a hub id (e.g. stabilityai/sd-turbo).
    #[arg(long)]
    model: String,
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
    #[arg(long, default_value_t = 30)]
    steps: usize,
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

pub(crate) struct Bar(pub(crate) Option<ProgressBar>);

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
    let dtype = match &args.dtype {
        Some(d) => device::parse_dtype(d)?,
        None => device::default_dtype(&device),
    };
    let show = !(args.json || args.quiet);
    // Read the cheap inputs before the expensive model load, so bad input fails fast.
    let init_image = args.init_image.as_deref().map(kiln_core::image::load_rgb).transpose()?;
    let init_latents = match &args.init_latents {
        Some(p) => Some(read_npy(p)?),
        None => None,
    };

    let t0 = Instant::now();
    let source = hub::resolve(&args.model, args.revision.as_deref(), dtype != candle_dtype_f32(), show)?;
    let model =
        LoadedModel::load(source, &device, dtype).with_context(|| format!("loading model {}", args.model))?;
    let load_seconds = t0.elapsed().as_secs_f64();

    let (default_w, default_h) = match &init_image {
        // img2img defaults to the init image's size, rounded down to the VAE factor.
        Some(img) => {
            let f = model.vae.scale_factor();
            ((img.width() as usize / f) * f, (img.height() as usize / f) * f)
        }
        None => model.default_size(),
    };
    let guidance = args.guidance.unwrap_or(match model.family {
        Family::StableDiffusionXl => 5.0,
        Family::StableDiffusion => 7.5,
    });
    let seed = args.seed.unwrap_or_else(random_seed);
    let seeds: Vec<u64> = (0..args.count as u64).map(|i| seed.wrapping_add(i)).collect();
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        width: args.width.unwrap_or(default_w),
        height: args.height.unwrap_or(default_h),
        steps: args.steps,
        guidance,
        scheduler,
        seeds: seeds.clone(),
        init_latents,
        init_image,
        strength: args.strength,
        max_batch: args.batch.unwrap_or(args.count.min(4)),
    };
    request.validate(&model)?;

    let bar = show.then(|| {
        let bar = ProgressBar::new(request.steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} denoising [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let mut progress = Bar(bar);
    let output = generate(&model, &request, &mut progress)?;
    if let Some(bar) = progress.0 {
        bar.finish_and_clear();
    }
    for w in &output.warnings {
        eprintln!("warning: {w}");
    }

    let init_latents_ref = args.init_latents.as_deref().map(file_ref).transpose()?;
    let init_image_ref = args.init_image.as_deref().map(file_ref).transpose()?;
    let (hub_revision, model_id) = match &model.source {
        ModelSource::Hub { revision, repo, .. } => (Some(revision.clone()), repo.clone()),
        ModelSource::Folder(p) => (None, p.display().to_string()),
    };
    let mut outputs = Vec::new();
    for (i, image) in output.images.iter().enumerate() {
        let path = output_path(args.out.as_deref(), image.seed, i, args.count);
        let record = ImageRecord {
            kiln_version: kiln_core::VERSION.to_string(),
            mode: if request.init_image.is_some() { "img2img" } else { "txt2img" }.to_string(),
            model: ModelRecord {
                id: model_id.clone(),
                revision: hub_revision.clone(),
                files: model.weights.clone(),
            },
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            width: request.width,
            height: request.height,
            steps: request.steps,
            guidance: request.guidance,
            scheduler: output.scheduler.name().to_string(),
            scheduler_class: model.scheduler_class.clone(),
            scheduler_config: model.scheduler_config_json.clone(),
            seed: image.seed,
            batch_index: i,
            init_latents: init_latents_ref.clone(),
            init_image: init_image_ref.clone(),
            strength: request.init_image.as_ref().map(|_| request.strength),
            dtype: device::dtype_name(dtype).to_string(),
            device: device::name(&device),
            inpaint: None,
        };
        let rgb = unit_to_rgb8(&image.pixels)?;
        write_png_atomic(&path, &rgb, &png_chunks(&record, output.scheduler, &model))?;
        outputs.push(serde_json::json!({ "path": path, "seed": image.seed }));
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
