//! `kiln promote`: a draft re-rendered by the final tier, keeping its composition.

use crate::draft::JobArgs;
use clap::Args;
use kiln_core::jobs::spec::{ImageRef, PromoteSpec, RedetailSpec};
use kiln_core::jobs::JobSpec;

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
    /// After the upscale, re-detail it with a diffusion tier on blended latent tiles (real
    /// detail, no seams); recorded as the upscale's child.
    #[arg(long, requires = "upscale")]
    redetail: bool,
    /// Tier that re-details.
    #[arg(long, default_value = "final", requires = "redetail")]
    redetail_tier: String,
    /// Re-detail strength, in (0, 1] [default: 0.3].
    #[arg(long, requires = "redetail")]
    redetail_strength: Option<f64>,
    /// Re-detail denoiser tile in image pixels [default: 512].
    #[arg(long, requires = "redetail")]
    redetail_tile: Option<usize>,
    /// A LoRA merged into the re-detail tier's model (after the tier's own): an imported name or
    /// a .safetensors file, optional weight (default 1). Repeatable.
    #[arg(long = "redetail-lora", value_name = "NAME|PATH[:WEIGHT]", requires = "redetail")]
    redetail_loras: Vec<String>,
    /// Override the tier's steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Override the tier's width.
    #[arg(long)]
    width: Option<usize>,
    /// Override the tier's height.
    #[arg(long)]
    height: Option<usize>,
    /// A preset (brand kit, `kiln presets`): its LoRAs, steps and grade apply to the final (the
    /// draft's prompt stays). Without it the final takes the grade of the draft's own preset.
    #[arg(long)]
    preset: Option<String>,
    /// A LoRA merged into the final tier's model (after the tier's and the preset's): an
    /// imported name or a .safetensors file, optional weight (default 1). Repeatable.
    #[arg(long = "lora", value_name = "NAME|PATH[:WEIGHT]")]
    loras: Vec<String>,
    #[command(flatten)]
    job: JobArgs,
}

pub fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let draft = match args.draft.trim_start_matches('#').trim_start_matches("asset:").parse::<i64>() {
        Ok(id) if !std::path::Path::new(&args.draft).exists() => ImageRef::Asset(id),
        _ => ImageRef::File(args.draft.clone().into()),
    };
    if args.tile == Some(0) {
        anyhow::bail!("invalid --tile: 0 (expected a tile side in pixels, or leave it out)");
    }
    let spec = JobSpec::Promote(PromoteSpec {
        draft,
        tier: Some(args.tier.clone()),
        mode: Some(args.mode.clone()),
        strength: Some(args.strength),
        width: args.width,
        height: args.height,
        steps: args.steps,
        upscale: args.upscale.clone(),
        upscale_tier: Some(args.upscale_tier.clone()),
        tile: args.tile,
        redetail: args.redetail.then(|| RedetailSpec {
            tier: Some(args.redetail_tier.clone()),
            strength: args.redetail_strength,
            tile: args.redetail_tile,
            loras: args.redetail_loras.clone(),
            ..Default::default()
        }),
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
    let d = &out.detail;
    if let Some(fin) = out.images.iter().find(|i| i.role == "final") {
        println!(
            "final: {} (asset {}, seed {})",
            fin.path.display(),
            fin.asset_id.unwrap_or_default(),
            fin.seed.unwrap_or_default()
        );
    }
    println!(
        "closeness to the draft (final downscaled): SSIM {:.4}, PSNR {:.2} dB; lower --strength keeps more",
        d["ssim"].as_f64().unwrap_or(f64::NAN),
        d["psnr"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "job {}: {:.2} device-s, {:.4} credits",
        d["job_id"],
        d["timings"]["load"].as_f64().unwrap_or(0.0)
            + d["timings"]["text_encode"].as_f64().unwrap_or(0.0)
            + d["timings"]["steps"]
                .as_array()
                .map(|s| s.iter().filter_map(|v| v.as_f64()).sum())
                .unwrap_or(0.0)
            + d["timings"]["vae_encode"].as_f64().unwrap_or(0.0)
            + d["timings"]["vae_decode"].as_f64().unwrap_or(0.0),
        d["credits"].as_f64().unwrap_or(0.0)
    );
    if let Some(up) = d.get("upscaled") {
        println!(
            "upscaled: {} (asset {}, child of {}) {}x{} -> {}x{} with {}",
            up["path"].as_str().unwrap_or_default(),
            up["asset_id"],
            d["asset_id"],
            up["input_size"][0],
            up["input_size"][1],
            up["output_size"][0],
            up["output_size"][1],
            up["model"].as_str().unwrap_or_default()
        );
        println!(
            "job {}: {:.2} device-s (upscale {:.2}), {:.4} credits",
            up["job_id"],
            up["timings"]["upscale"].as_f64().unwrap_or(0.0) + up["timings"]["load"].as_f64().unwrap_or(0.0),
            up["timings"]["upscale"].as_f64().unwrap_or(0.0),
            up["credits"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(rd) = d.get("redetailed") {
        println!(
            "re-detailed: {} (asset {}, child of {}), {:.2} device-s, {:.4} credits",
            rd["path"].as_str().unwrap_or_default(),
            rd["asset_id"],
            rd["parent_asset_id"],
            rd["timings"]["steps"]
                .as_array()
                .map(|s| s.iter().filter_map(|v| v.as_f64()).sum())
                .unwrap_or(0.0)
                + rd["timings"]["load"].as_f64().unwrap_or(0.0),
            rd["credits"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
