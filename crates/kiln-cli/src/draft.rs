//! `kiln draft`: N variants from the draft tier, plus a contact sheet, recorded in the project's
//! asset library.

use crate::args::RunArgs;
use crate::generate::{random_seed, Bar};
use clap::Args;
use kiln_core::library::Project;
use kiln_core::tiers::drift::DriftOutcome;
use kiln_core::tiers::load::Overrides;
use kiln_core::tiers::Tier;
use kiln_core::workflow::draft::{draft, DraftRequest};
use kiln_core::workflow::{JobOptions, Workspace};
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
    pub fn show(&self) -> bool {
        self.run.show()
    }

    pub fn json(&self) -> bool {
        self.run.json
    }

    /// Opens the project workspace (library, tiers) with these options.
    pub fn workspace(&self) -> anyhow::Result<Workspace> {
        let device = self.run.device()?;
        let dtype = self.run.explicit_dtype()?;
        let project = Project::find(self.project.as_deref())?;
        let options =
            JobOptions { device, dtype, accept_drift: self.accept_drift, show_progress: self.show() };
        Ok(Workspace::open(project, options)?)
    }
}

/// Reports a drift-guard outcome on stderr.
pub fn report_drift(tier: &str, outcome: &DriftOutcome, json: bool) {
    if json {
        return;
    }
    match outcome {
        DriftOutcome::Pinned => eprintln!("pinned tier `{tier}` weights in kiln.lock"),
        DriftOutcome::Accepted(changes) => {
            eprintln!("accepted drift of tier `{tier}`:\n  {}", changes.join("\n  "))
        }
        DriftOutcome::Unchanged => {}
    }
}

/// On a tier's first use in a project, warns about its explicitly unpinned parts (trusted now,
/// locked from here on). Printed even with --json: it is about what was trusted.
pub fn warn_trust_on_first_use(tier: &Tier, outcome: &DriftOutcome) {
    if *outcome == DriftOutcome::Pinned {
        if let Some(w) = tier.trust_on_first_use_warning() {
            eprintln!("warning: {w}");
        }
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
    #[command(flatten)]
    job: JobArgs,
}

pub fn run(args: DraftArgs) -> anyhow::Result<()> {
    if args.count == 0 || args.count > kiln_core::workflow::draft::MAX_DRAFTS {
        anyhow::bail!("invalid -n: {} (expected 1..={})", args.count, kiln_core::workflow::draft::MAX_DRAFTS);
    }
    let mut ws = args.job.workspace()?;
    let tier = ws.tiers.get(&args.tier)?.clone();
    // Refuse before the (expensive) model load when the budget is spent.
    ws.check_budget(&tier, args.count)?;
    let mut warm = ws.load_tier(&args.tier)?;
    report_drift(&args.tier, &warm.drift, args.job.json());
    warn_trust_on_first_use(&warm.tier, &warm.drift);
    let request = DraftRequest {
        prompt: args.prompt.clone(),
        count: args.count,
        seed: args.seed.unwrap_or_else(random_seed),
        overrides: Overrides {
            width: args.width,
            height: args.height,
            steps: args.steps,
            negative_prompt: args.negative.clone(),
            max_batch: args.batch,
            vae_tiling: args.job.run.vae.tiling()?,
            ..Default::default()
        },
    };
    let mut bar = Bar::new(args.job.show(), warm.tier.steps.unwrap_or(1));
    let result = draft(&mut ws, &mut warm, &request, &mut bar)?;
    bar.finish();
    for w in &result.warnings {
        eprintln!("warning: {w}");
    }
    if args.job.json() {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        for img in &result.images {
            println!(
                "#{:<3} asset {:<5} seed {:<12} {}",
                img.index,
                img.asset_id,
                img.seed,
                img.path.display()
            );
        }
        println!("contact sheet: {} (asset {})", result.sheet.display(), result.sheet_asset_id);
        println!(
            "job {}: {:.2} device-s, {:.4} credits",
            result.job_id,
            result.timings.device_seconds(),
            result.credits
        );
    }
    Ok(())
}
