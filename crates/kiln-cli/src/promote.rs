//! `kiln promote`: a draft re-rendered by the final tier, keeping its composition.

use crate::draft::{report_drift, warn_trust_on_first_use, JobArgs};
use crate::generate::Bar;
use clap::Args;
use kiln_core::tiers::load::Overrides;
use kiln_core::workflow::promote::{promote, PromoteMode, PromoteRequest};
use kiln_core::workflow::upscale::{parse_target, upscale_asset};
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
    /// Upscale the final afterwards with the upscale tier: 4k, 8k, WxH (fit inside) or a scale
    /// such as 4. The upscaled image is its own asset, child of the final.
    #[arg(long)]
    upscale: Option<String>,
    /// Tier to upscale with.
    #[arg(long, default_value = "upscale")]
    upscale_tier: String,
    /// Upscale tile side in input pixels (default: chosen from available memory).
    #[arg(long)]
    tile: Option<usize>,
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

pub fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let mode: PromoteMode = args.mode.parse()?;
    let target = args.upscale.as_deref().map(parse_target).transpose()?;
    let mut ws = args.job.workspace()?;
    let tier = ws.tiers.get(&args.tier)?.clone();
    kiln_core::tiers::load::require_diffusion(&tier)?;
    let mut jobs = vec![(tier.clone(), 1)];
    if target.is_some() {
        let up = ws.tiers.get(&args.upscale_tier)?.clone();
        kiln_core::tiers::load::require_upscale(&up)?;
        jobs.push((up, 1));
    }
    // The whole promotion (final + upscale) must fit the budget before anything runs.
    ws.check_budget_all(&jobs)?;
    let request = PromoteRequest {
        draft: AssetRef::parse(&args.draft),
        mode,
        strength: args.strength,
        overrides: Overrides {
            width: args.width,
            height: args.height,
            steps: args.steps,
            vae_tiling: args.job.run.vae.tiling()?,
            ..Default::default()
        },
    };
    // Resolve the draft (cheap) before loading the final model (expensive).
    kiln_core::workflow::resolve_input(&ws.library, &ws.project.root, &request.draft, "promote")?;
    // The upscaler loads first: a missing or drifted SR model fails before the final is rendered.
    let mut warm_up = match target {
        Some(_) => {
            let w = ws.load_upscale_tier(&args.upscale_tier)?;
            report_drift(&args.upscale_tier, &w.drift, args.job.json());
            warn_trust_on_first_use(&w.tier, &w.drift);
            Some(w)
        }
        None => None,
    };
    let mut warm = ws.load_tier(&args.tier)?;
    report_drift(&args.tier, &warm.drift, args.job.json());
    warn_trust_on_first_use(&warm.tier, &warm.drift);
    let mut bar = Bar::new(args.job.show(), warm.tier.steps.unwrap_or(1));
    let result = promote(&mut ws, &mut warm, &request, &mut bar)?;
    bar.finish();
    for w in &result.warnings {
        eprintln!("warning: {w}");
    }
    let upscaled = match (warm_up.as_mut(), target) {
        (Some(up), Some(target)) => {
            let bar = UpscaleBar::new(args.job.show());
            let r = upscale_asset(
                &mut ws,
                up,
                &AssetRef::Id(result.asset_id),
                Some(target),
                args.tile,
                &mut |done, total| bar.tick(done, total),
            )?;
            bar.finish();
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            Some(r)
        }
        _ => None,
    };
    if args.job.json() {
        let mut value = serde_json::to_value(&result)?;
        if let (Some(obj), Some(up)) = (value.as_object_mut(), &upscaled) {
            obj.insert("upscaled".into(), serde_json::to_value(up)?);
        }
        println!("{value}");
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
        if let Some(up) = &upscaled {
            println!(
                "upscaled: {} (asset {}, child of {}) {}x{} -> {}x{} with {}",
                up.path.display(),
                up.asset_id,
                result.asset_id,
                up.input_size[0],
                up.input_size[1],
                up.output_size[0],
                up.output_size[1],
                up.model
            );
            println!(
                "job {}: {:.2} device-s (upscale {:.2}), {:.4} credits",
                up.job_id,
                up.timings.device_seconds(),
                up.timings.upscale,
                up.credits
            );
        }
    }
    Ok(())
}

/// Tile progress of the upscale step on stderr.
struct UpscaleBar(Option<indicatif::ProgressBar>);

impl UpscaleBar {
    fn new(show: bool) -> Self {
        Self(show.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_message("upscale tiles");
            bar
        }))
    }

    fn tick(&self, done: usize, total: usize) {
        if let Some(b) = &self.0 {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
