//! `kiln presets`: the brand kits (`[presets.NAME]`) as the project resolves them.

use clap::{Args, Subcommand};
use kiln_core::library::Project;
use kiln_core::tiers::presets::{Preset, SeedPolicy};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PresetsArgs {
    #[command(subcommand)]
    command: Option<PresetsCommand>,
    /// Project folder whose kiln.toml layers the presets.
    #[arg(long, global = true)]
    project: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum PresetsCommand {
    /// Every preset, a line each (the default).
    List,
    /// One preset, resolved: every setting, its hash and where it is defined.
    Show { name: String },
}

pub fn run(args: PresetsArgs) -> anyhow::Result<()> {
    let registry = Project::find(args.project.as_deref())?.presets()?;
    match args.command.unwrap_or(PresetsCommand::List) {
        PresetsCommand::List => {
            if args.json {
                println!("{}", serde_json::to_string(&registry)?);
                return Ok(());
            }
            if registry.presets.is_empty() {
                println!("no presets: add [presets.NAME] tables to kiln.toml (see docs/presets.md)");
                return Ok(());
            }
            println!("{:<16}  {:<10}  {:<12}  DESCRIPTION", "NAME", "TIER", "SHA256");
            for p in registry.presets.values() {
                println!(
                    "{:<16}  {:<10}  {:<12}  {}",
                    p.name,
                    p.tier.as_deref().unwrap_or("-"),
                    &p.sha256[..12],
                    p.description
                );
            }
        }
        PresetsCommand::Show { name } => {
            let p = registry.get(&name)?;
            if args.json {
                println!("{}", serde_json::to_string(p)?);
                return Ok(());
            }
            show(p);
        }
    }
    Ok(())
}

fn show(p: &Preset) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    println!("[{}] {}", p.name, p.description);
    println!("  prompt     {}", p.prompt);
    println!("  negative   {}", opt(p.negative_prompt.clone()));
    println!("  tier       {}", opt(p.tier.clone()));
    println!("  loras      {}", if p.loras.is_empty() { "-".into() } else { p.loras.join(", ") });
    let size = match (&p.aspect, p.width, p.height) {
        (Some(a), _, _) => format!("aspect {a} (the tier's area)"),
        (None, Some(w), Some(h)) => format!("{w}x{h}"),
        (None, Some(w), None) => format!("width {w}"),
        (None, None, Some(h)) => format!("height {h}"),
        (None, None, None) => "the tier's".into(),
    };
    println!("  size       {size}");
    println!(
        "  sampler    {} steps, guidance {}, scheduler {}",
        opt(p.steps.map(|s| s.to_string())),
        opt(p.guidance.map(|g| g.to_string())),
        opt(p.scheduler.clone())
    );
    let seed = match p.seed {
        SeedPolicy::Random => "random per job".to_string(),
        SeedPolicy::Fixed(s) => format!("fixed {s}"),
    };
    println!("  seed       {seed}");
    match &p.grade {
        Some(g) => println!(
            "  grade      {} at {} ({})",
            g.lut.display(),
            g.strength,
            g.interp.as_deref().unwrap_or("tetrahedral")
        ),
        None => println!("  grade      -"),
    }
    println!("  sha256     {}", p.sha256);
    println!("  from       {}", p.defined_in);
}
