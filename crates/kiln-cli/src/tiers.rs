//! `kiln tiers`: the resolved tier registry (built-in, user, project layers) with pin status.

use clap::Args;
use kiln_core::library::Project;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TiersArgs {
    /// Project folder whose kiln.toml layers the tiers.
    #[arg(long)]
    project: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TiersArgs) -> anyhow::Result<()> {
    let registry = Project::find(args.project.as_deref())?.tiers()?;
    if args.json {
        println!("{}", serde_json::to_string(&registry)?);
        return Ok(());
    }
    println!("layers: {}", registry.layers.join(" < "));
    for t in registry.tiers.values() {
        let size = match (t.width, t.height) {
            (Some(w), Some(h)) => format!("{w}x{h}"),
            _ => "model default".into(),
        };
        println!("\n[{}] {}", t.name, t.description);
        println!(
            "  model     {}{}",
            t.model,
            t.revision.as_deref().map(|r| format!(" @ {r}")).unwrap_or_default()
        );
        if let Some(vae) = &t.vae {
            println!(
                "  vae       {vae}{}",
                t.vae_revision.as_deref().map(|r| format!(" @ {r}")).unwrap_or_default()
            );
        }
        if t.kind == kiln_core::tiers::TierKind::Upscale {
            println!("  upscale   x{}", t.scale.unwrap_or(0));
        } else {
            println!(
                "  defaults  {size}, {} steps, {}, guidance {}, dtype {}",
                t.steps.map(|s| s.to_string()).unwrap_or_else(|| "30".into()),
                t.scheduler.as_deref().unwrap_or("model's scheduler"),
                t.guidance.map(|g| g.to_string()).unwrap_or_else(|| "model default".into()),
                t.dtype.as_deref().unwrap_or("auto")
            );
        }
        println!(
            "  price     {} credits/image + {} credits/GPU-second",
            t.price.credits_per_image, t.price.credits_per_gpu_second
        );
        println!("  pins      {}", t.pin_status());
        if !t.unpinned.is_empty() {
            println!(
                "  unpinned  {} (trusted on first use, then locked in kiln.lock)",
                t.unpinned.join(", ")
            );
        }
        println!("  from      {}", t.defined_in);
    }
    Ok(())
}
