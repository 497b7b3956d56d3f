//! `kiln assets list|show|check` and `kiln replay`.

use crate::draft::JobArgs;
use clap::{Args, Subcommand};
use kiln_core::jobs::spec::{ImageRef, ReplaySpec};
use kiln_core::jobs::JobSpec;
use kiln_core::library::assets::{AssetFilter, AssetRow};
use kiln_core::library::{utc_date, Project};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AssetsArgs {
    #[command(subcommand)]
    command: AssetsCommand,
    /// Project folder (default: $KILN_PROJECT or the current folder).
    #[arg(long, global = true)]
    project: Option<PathBuf>,
    /// One JSON value on stdout.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum AssetsCommand {
    /// Assets, newest first.
    List {
        /// draft | final | sheet | replay
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        tier: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One asset: parameters, model hashes, cost, lineage and what was made from it.
    Show { id: i64 },
    /// Consistency check: database integrity, recorded files present and unchanged, orphans.
    Check,
}

pub fn run(args: AssetsArgs) -> anyhow::Result<()> {
    let project = Project::find(args.project.as_deref())?;
    let library = project.existing_library()?;
    match args.command {
        AssetsCommand::List { kind, tier, limit } => {
            let rows = library.list_assets(&AssetFilter { kind, tier, limit: Some(limit) })?;
            if args.json {
                let slim: Vec<_> = rows.iter().map(summary).collect();
                println!("{}", serde_json::to_string(&slim)?);
            } else {
                println!(
                    "{:>5}  {:<7} {:<7} {:>6} {:>12}  {:<10}  {:<40}  prompt",
                    "id", "kind", "tier", "parent", "seed", "date", "path"
                );
                for a in &rows {
                    println!(
                        "{:>5}  {:<7} {:<7} {:>6} {:>12}  {:<10}  {:<40}  {}",
                        a.id,
                        a.kind,
                        a.tier.as_deref().unwrap_or("-"),
                        a.parent_id.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        a.seed.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                        utc_date(a.created_at),
                        a.path,
                        a.prompt.as_deref().unwrap_or("").chars().take(40).collect::<String>()
                    );
                }
            }
        }
        AssetsCommand::Show { id } => {
            let asset = library.asset(id)?;
            let lineage = library.lineage(id)?;
            let children = library.children(id)?;
            if args.json {
                let v = serde_json::json!({
                    "asset": asset,
                    "lineage": lineage.iter().map(summary).collect::<Vec<_>>(),
                    "children": children.iter().map(summary).collect::<Vec<_>>(),
                });
                println!("{v}");
            } else {
                println!(
                    "asset {} ({}), job {}, tier {}",
                    asset.id,
                    asset.kind,
                    asset.job_id,
                    asset.tier.as_deref().unwrap_or("-")
                );
                println!(
                    "file    {} ({}x{}), sha256 {}",
                    asset.path, asset.width, asset.height, asset.sha256
                );
                println!("cost    {:.4} credits", asset.credits);
                if let Some(r) = &asset.record {
                    println!("prompt  {}", r.prompt);
                    println!(
                        "params  {} steps, {} guidance {}, seed {}, {}x{}, {} on {}{}",
                        r.steps,
                        r.scheduler,
                        r.guidance,
                        r.seed,
                        r.width,
                        r.height,
                        r.dtype,
                        r.device,
                        r.strength.map(|s| format!(", img2img strength {s}")).unwrap_or_default()
                    );
                    println!(
                        "model   {}{}",
                        r.model.id,
                        r.model.revision.as_deref().map(|v| format!(" @ {v}")).unwrap_or_default()
                    );
                }
                if let Some(p) = asset.params.as_ref().filter(|p| p["step"] == "upscale") {
                    // The record above is the upscaled image's generation; this is the step after it.
                    println!(
                        "upscale {} ({} x{}) {} -> {}, tile {}, {} on {}",
                        p["model"].as_str().unwrap_or("?"),
                        p["arch"].as_str().unwrap_or("?"),
                        p["model_scale"],
                        p["input_size"],
                        p["output_size"],
                        p["tile"],
                        p["dtype"].as_str().unwrap_or("?"),
                        p["device"].as_str().unwrap_or("?")
                    );
                }
                if let Some(q) = &asset.qc {
                    println!(
                        "qc      {} ({} of {} tiles flagged; bp > {} or hf > {}), heatmap {}",
                        q["verdict"].as_str().unwrap_or("?"),
                        q["flagged"],
                        q["tiles"].as_array().map_or(0, Vec::len),
                        q["options"]["bp_threshold"],
                        q["options"]["hf_threshold"],
                        q["heatmap"].as_str().unwrap_or("?")
                    );
                }
                let label = if asset.params.is_some() { "weights" } else { "hashes" };
                if !asset.model_hashes.is_empty() {
                    println!("{label}");
                }
                for w in &asset.model_hashes {
                    println!("  {}/{} {}", w.component, w.file, w.sha256);
                }
                let chain: Vec<String> =
                    lineage.iter().rev().map(|a| format!("{} #{}", a.kind, a.id)).collect();
                println!("lineage {}", chain.join(" -> "));
                for c in &children {
                    println!("child   {} #{} {}", c.kind, c.id, c.path);
                }
            }
        }
        AssetsCommand::Check => {
            let problems = library.check()?;
            let orphans = library.orphans()?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "consistent": problems.is_empty(), "problems": problems, "orphans": orphans })
                );
            } else {
                for p in &problems {
                    println!("problem: {p}");
                }
                for o in &orphans {
                    println!(
                        "orphan (unrecorded output of an interrupted run; safe to delete): {}",
                        o.display()
                    );
                }
                println!(
                    "{}",
                    if problems.is_empty() { "library consistent" } else { "library INCONSISTENT" }
                );
            }
            if !problems.is_empty() {
                anyhow::bail!("{} consistency problem(s)", problems.len());
            }
        }
    }
    Ok(())
}

fn summary(a: &AssetRow) -> serde_json::Value {
    serde_json::json!({
        "id": a.id, "kind": a.kind, "tier": a.tier, "parent_id": a.parent_id, "job_id": a.job_id,
        "path": a.path, "seed": a.seed, "prompt": a.prompt, "credits": a.credits, "created_at": a.created_at,
    })
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// An asset id or a kiln PNG.
    source: String,
    /// Where to write the regenerated image (default: assets/replays/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Exit non-zero unless the replay is bit-exact.
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    job: JobArgs,
}

pub fn run_replay(args: ReplayArgs) -> anyhow::Result<()> {
    let asset = match args.source.trim_start_matches('#').trim_start_matches("asset:").parse::<i64>() {
        Ok(id) if !std::path::Path::new(&args.source).exists() => ImageRef::Asset(id),
        _ => ImageRef::File(args.source.clone().into()),
    };
    let spec = JobSpec::Replay(ReplaySpec {
        asset,
        out: args.out.clone(),
        vae_tiling: Some(args.job.run.vae.vae_tiling.clone()),
        vae_tile: args.job.run.vae.vae_tile,
        max_sequence_length: None,
    });
    let engine = args.job.engine()?;
    let out = crate::job::run(&engine, &spec, &args.job.run)?;
    let d = &out.detail;
    let bit_exact = d["bit_exact"].as_bool().unwrap_or(false);
    if args.job.json() {
        println!("{d}");
    } else {
        println!(
            "replayed {} -> {} (asset {})",
            d["original"].as_str().unwrap_or_default(),
            d["path"].as_str().unwrap_or_default(),
            d["asset_id"]
        );
        if bit_exact {
            println!("bit-exact: every pixel equals the original");
        } else {
            println!(
                "NOT bit-exact: max pixel difference {}, PSNR {:.2} dB",
                d["max_abs_diff"],
                d["psnr"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if args.strict && !bit_exact {
        anyhow::bail!("replay is not bit-exact (max difference {})", d["max_abs_diff"]);
    }
    Ok(())
}
