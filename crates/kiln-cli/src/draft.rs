//! `kiln draft`: N variants from the draft tier, plus a contact sheet, recorded in the project's
//! asset library.

use crate::args::RunArgs;
use clap::Args;
use kiln_core::jobs::spec::DraftSpec;
use kiln_core::jobs::JobSpec;
use std::path::PathBuf;

/// Options every project job takes.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Project folder (kiln.toml, kiln.lock, assets/, .kiln/library.db); default $KILN_PROJECT or the current folder.
    #[arg(long)]
    pub project: Option<PathBuf>,
    /// Re-pin kiln.lock when a tier's weights changed, instead of refusing.
    #[arg(long)]
    pub accept_drift: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

impl JobArgs {
    pub fn json(&self) -> bool {
        self.run.json
    }

    /// The job engine over the project with these options.
    pub fn engine(&self) -> anyhow::Result<kiln_core::jobs::Engine> {
        crate::job::engine(self.project.as_deref(), &self.run, self.accept_drift)
    }
}

#[derive(Args, Debug)]
pub struct DraftArgs {
    /// The prompt.
    prompt: String,
    /// Number of variants (seeds S..S+N-1).
    #[arg(short = 'n', long = "count", default_value_t = 8)]
    count: usize,
    /// First seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Tier to draft with.
    #[arg(long, default_value = "draft")]
    tier: String,
    #[arg(long)]
    negative: Option<String>,
    /// Override the tier's width.
    #[arg(long)]
    width: Option<usize>,
    /// Override the tier's height.
    #[arg(long)]
    height: Option<usize>,
    /// Override the tier's steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Images per UNet batch (default: all, up to 8).
    #[arg(long)]
    batch: Option<usize>,
    /// A preset (brand kit, `kiln presets`): its prompt template, negative prompt, size, steps,
    /// seed and grade apply where these options leave them unset (the draft tier stays).
    #[arg(long)]
    preset: Option<String>,
    /// A LoRA merged into the tier's model (after the tier's own): an imported name or a
    /// .safetensors file, optional weight (default 1). Repeatable; `<lora:NAME:WEIGHT>` too.
    #[arg(long = "lora", value_name = "NAME|PATH[:WEIGHT]")]
    loras: Vec<String>,
    #[command(flatten)]
    job: JobArgs,
}

pub fn run(args: DraftArgs) -> anyhow::Result<()> {
    let spec = JobSpec::Draft(DraftSpec {
        tier: Some(args.tier.clone()),
        prompt: args.prompt.clone(),
        count: Some(args.count),
        seed: crate::args::seed_for(args.seed, args.preset.as_deref()),
        negative: args.negative.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        batch: args.batch,
        vae_tiling: Some(args.job.run.vae.vae_tiling.clone()),
        vae_tile: args.job.run.vae.vae_tile,
        max_sequence_length: None,
        preset: args.preset.clone(),
        loras: args.loras.clone(),
    });
    let engine = args.job.engine()?;
    let out = crate::job::run(&engine, &spec, &args.job.run)?;
    if args.job.json() {
        println!("{}", out.detail);
        return Ok(());
    }
    for (index, img) in out.images.iter().filter(|i| i.role == "draft").enumerate() {
        println!(
            "#{:<3} asset {:<5} seed {:<12} {}",
            index,
            img.asset_id.unwrap_or_default(),
            img.seed.unwrap_or_default(),
            img.path.display()
        );
    }
    if let Some(sheet) = out.images.iter().find(|i| i.role == "sheet") {
        println!("contact sheet: {} (asset {})", sheet.path.display(), sheet.asset_id.unwrap_or_default());
    }
    println!(
        "job {}: {:.2} device-s, {:.4} credits",
        out.library_job_id.unwrap_or_default(),
        out.device_seconds,
        out.credits
    );
    Ok(())
}
