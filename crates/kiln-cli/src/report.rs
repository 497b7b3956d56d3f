//! `kiln report`: burn per day, per tier, draft:final ratio against policy, cost per delivered
//! asset, budget left; as a table or JSON.

use clap::Args;
use kiln_core::library::ledger::{self, Burn};
use kiln_core::library::Project;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Project folder (default: $KILN_PROJECT or the current folder).
    #[arg(long)]
    project: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let project = Project::find(args.project.as_deref())?;
    let library = project.existing_library()?;
    let r = ledger::report(&library, &project.config)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    print_burns("day (UTC)", r.days.iter().map(|d| (d.date.as_str(), &d.burn)));
    println!();
    print_burns("tier", r.tiers.iter().map(|t| (t.tier.as_str(), &t.burn)));
    println!();
    println!(
        "total: {} jobs, {:.2} device-s, {:.4} credits",
        r.jobs, r.total_device_seconds, r.total_credits
    );
    match r.drafts_per_final {
        Some(x) => println!(
            "draft:final {}:{} = {x:.1}:1 (policy {}:1: {})",
            r.drafts, r.finals, r.policy_drafts_per_final, r.policy_verdict
        ),
        None => {
            println!("draft:final {}:0 (no finals yet; policy {}:1)", r.drafts, r.policy_drafts_per_final)
        }
    }
    match r.cost_per_delivered {
        Some(c) => println!("cost per delivered asset (final): {c:.4} credits"),
        None => println!("cost per delivered asset: - (nothing delivered yet)"),
    }
    if let (Some(limit), Some(left)) = (r.budget_limit, r.budget_left) {
        println!("budget: {:.4} of {limit:.4} credits left", left);
    }
    Ok(())
}

/// One table of burns, labelled by `heading` (day or tier).
fn print_burns<'a>(heading: &str, rows: impl Iterator<Item = (&'a str, &'a Burn)>) {
    println!("{heading:<12} {:>5} {:>7} {:>12} {:>10}", "jobs", "images", "device-s", "credits");
    for (label, b) in rows {
        println!("{label:<12} {:>5} {:>7} {:>12.2} {:>10.4}", b.jobs, b.images, b.device_seconds, b.credits);
    }
}
