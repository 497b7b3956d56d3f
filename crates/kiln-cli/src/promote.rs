//! `kiln promote`: a draft re-rendered by the final tier, keeping its composition.

use crate::draft::{report_drift, JobArgs};
use crate::generate::Bar;
use clap::Args;
use kiln_core::tiers::load::Overrides;
use kiln_core::workflow::promote::{promote, PromoteMode, PromoteRequest};
use kiln_core::workflow::AssetRef;

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The draft: a kiln PNG or an asset id (see `kiln assets list`).
    draft: String,
    /// img2img (keep the draft's layout) or reseed (same seed and prompt, final model from noise).
    #[arg(long, default_value = "img2img")]
    mode: String,
    /// img2img: how much the final may depart from the draft, in (0, 1].
    #[arg(long, default_value_t = 0.5)]
    strength: f64,
    /// Tier to promote with.
    #[arg(long, default_value = "final")]
    tier: String,
    /// Upscale the final afterwards (4k, 8k, WxH) with the upscale tier. Not available in this
    /// build yet: see `upscale_seam` below.
    #[arg(long)]
    upscale: Option<String>,
    /// Override the tier's steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Override the tier's width.
    #[arg(long)]
    width: Option<usize>,
    /// Override the tier's height.
    #[arg(long)]
    height: Option<usize>,
    #[command(flatten)]
    job: JobArgs,
}

/// The seam for `--upscale`: `kiln upscale` (super-resolution) is built on its own branch. When
/// it lands, this takes the final's path and the target (4k/8k/WxH), runs the `upscale` tier's
/// model (tiers::Tier with kind Upscale) and records the result as an asset whose parent is
/// the final, in the same way promote records the final (workflow::job_and_assets). Until
/// then it refuses up front, before any GPU time is spent.
fn upscale_seam(target: &str) -> anyhow::Result<()> {
    anyhow::bail!(
        "--upscale {target}: upscaling is not available in this build yet; promote without --upscale, \
         then run `kiln upscale` on the final"
    )
}

pub fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let mode: PromoteMode = args.mode.parse()?;
    if let Some(target) = &args.upscale {
        upscale_seam(target)?;
    }
    let mut ws = args.job.workspace()?;
    let tier = ws.tiers.get(&args.tier)?.clone();
    kiln_core::tiers::load::require_diffusion(&tier)?;
    ws.check_budget(&tier, 1)?;
    let request = PromoteRequest {
        draft: AssetRef::parse(&args.draft),
        mode,
        strength: args.strength,
        overrides: Overrides {
            width: args.width,
            height: args.height,
            steps: args.steps,
            ..Default::default()
        },
    };
    // Resolve the draft (cheap) before loading the final model (expensive).
    kiln_core::workflow::resolve_input(&ws.library, &ws.project.root, &request.draft, "promote")?;
    let mut warm = ws.load_tier(&args.tier)?;
    report_drift(&args.tier, &warm.drift, args.job.json);
    let mut bar = Bar::new(args.job.show(), warm.tier.steps.unwrap_or(1));
    let result = promote(&mut ws, &mut warm, &request, &mut bar)?;
    bar.finish();
    for w in &result.warnings {
        eprintln!("warning: {w}");
    }
    if args.job.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("final: {} (asset {}, seed {})", result.path.display(), result.asset_id, result.seed);
        println!(
            "closeness to the draft (final downscaled): SSIM {:.4}, PSNR {:.2} dB; lower --strength keeps more",
            result.ssim, result.psnr
        );
        println!(
            "job {}: {:.2} device-s, {:.4} credits",
            result.job_id,
            result.timings.device_seconds(),
            result.credits
        );
    }
    Ok(())
}
