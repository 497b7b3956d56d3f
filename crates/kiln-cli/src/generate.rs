//! `kiln generate`.

use crate::args::{ModelArgs, RunArgs, SamplingArgs};
use clap::Args;
use kiln_core::jobs::spec::{GenerateSpec, ImageRef};
use kiln_core::jobs::{JobOutput, JobSpec};
use std::path::PathBuf;

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
    /// Token budget of the long-context text encoder (FLUX: T5, default and maximum 512);
    /// longer prompts are truncated with a warning.
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// A LoRA merged into the model: an imported name (`kiln loras list`) or a .safetensors file,
    /// with an optional weight (default 1). Repeatable; `<lora:NAME:WEIGHT>` in the prompt too.
    #[arg(long = "lora", value_name = "NAME|PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// With --model FILE.safetensors (a single-file FLUX.1 transformer: BFL's release or a
    /// ComfyUI checkpoint): the diffusers folder or hub id the text encoders, tokenizers, VAE,
    /// scheduler and the transformer's config come from (--revision applies to it).
    #[arg(long, value_name = "DIR|HUB_ID", requires = "model")]
    base: Option<String>,
    /// FLUX: true classifier-free guidance (diffusers' true_cfg_scale). With --negative and S > 1
    /// the transformer also runs on the negative prompt: neg + S·(pos − neg), twice the
    /// denoising cost; --guidance stays the distilled guidance (FLUX.1-dev).
    #[arg(long, value_name = "S")]
    true_cfg: Option<f64>,
    /// Release the text encoders once the prompts are encoded, so they are not resident while
    /// the image denoises (the next job loads them again); see docs/flux.md.
    #[arg(long)]
    offload_text_encoders: bool,
    /// Output PNG (with --count N: PATH-0.png, PATH-1.png, ...). Default: kiln-<seed>.png.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let spec = JobSpec::Generate(GenerateSpec {
        tier: args.source.tier.clone(),
        model: args.source.model.clone(),
        revision: args.source.revision.clone(),
        prompt: args.prompt.clone(),
        negative: args.sampling.negative.clone(),
        width: args.width,
        height: args.height,
        steps: args.sampling.steps,
        guidance: args.sampling.guidance,
        scheduler: args.sampling.scheduler.clone(),
        seed: args.sampling.spec_seed(),
        count: Some(args.sampling.count),
        batch: args.batch,
        init_image: args.init_image.clone().map(ImageRef::File),
        strength: Some(args.strength),
        init_latents: args.init_latents.clone(),
        out: args.out.clone(),
        vae_tiling: Some(args.run.vae.vae_tiling.clone()),
        vae_tile: args.run.vae.vae_tile,
        max_sequence_length: args.max_sequence_length,
        preset: args.sampling.preset.clone(),
        loras: args.loras.clone(),
        base: args.base.clone(),
        true_cfg: args.true_cfg,
        offload_text_encoders: args.offload_text_encoders.then_some(true),
    });
    args.sampling.scheduler()?;
    let engine = crate::job::engine(args.source.project.as_deref(), &args.run, false)?;
    let out = crate::job::run(&engine, &spec, &args.run)?;
    print_images(&out, args.run.json)
}

/// Prints an image job's result: the JSON detail, or a line per image and the record.
pub(crate) fn print_images(out: &JobOutput, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", out.detail);
        return Ok(());
    }
    for img in &out.images {
        let seed = img.seed.map(|s| format!(" (seed {s})")).unwrap_or_default();
        eprintln!("wrote {}{seed}", img.path.display());
    }
    if let Some(job) = out.library_job_id {
        let ids: Vec<i64> = out.images.iter().filter_map(|i| i.asset_id).collect();
        let parent = out.detail["library"]["parent_asset_id"]
            .as_i64()
            .map(|p| format!(", child of asset {p}"))
            .unwrap_or_default();
        eprintln!("recorded job {job}, assets {ids:?}{parent}");
    }
    Ok(())
}
