//! `kiln qc UPSCALED [--source SRC]`: hallucination QC of an upscale (docs/qc.md).

use clap::Args;
use kiln_core::image::qc::QcOptions;
use kiln_core::library::qc::run_qc;
use kiln_core::library::Project;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct QcArgs {
    /// The upscaled image.
    output: PathBuf,
    /// The image it was upscaled from (default: its parent asset in the project library).
    #[arg(long)]
    source: Option<PathBuf>,
    /// Project folder whose library holds the asset (default: $KILN_PROJECT or the current folder).
    #[arg(long)]
    project: Option<PathBuf>,
    /// Tile side in output pixels.
    #[arg(long, default_value_t = QcOptions::default().tile_px)]
    tile: u32,
    /// Flag a tile whose back-projection error (mean |down(output) - source|, 0-255) exceeds this.
    #[arg(long, default_value_t = QcOptions::default().bp_threshold)]
    bp_threshold: f64,
    /// Flag a tile whose added high-frequency RMS (0-255, over a Lanczos enlargement) exceeds this.
    #[arg(long, default_value_t = QcOptions::default().hf_threshold)]
    hf_threshold: f64,
    /// Where the heatmap and the contact sheet go (default: beside the image).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Exit with status 2 when any tile is flagged.
    #[arg(long)]
    strict: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: QcArgs) -> anyhow::Result<()> {
    let options = QcOptions {
        tile_px: args.tile,
        bp_threshold: args.bp_threshold,
        hf_threshold: args.hf_threshold,
        ..QcOptions::default()
    };
    // The library is optional with --source; without it, it is where the source comes from.
    let project = Project::find(args.project.as_deref())?;
    let mut library = if project.library_path().is_file() { Some(project.existing_library()?) } else { None };
    let run =
        run_qc(&args.output, args.source.as_deref(), library.as_mut(), &options, args.out_dir.as_deref())?;
    let r = &run.report;
    if args.json {
        println!("{}", serde_json::to_string(&run)?);
    } else {
        println!(
            "{}: {} ({} of {} tiles flagged; thresholds bp {} hf {}) against {}",
            run.output.display(),
            r.verdict,
            r.flagged,
            r.tiles.len(),
            r.options.bp_threshold,
            r.options.hf_threshold,
            run.source.display()
        );
        for t in r.tiles.iter().filter(|t| t.flagged) {
            println!(
                "  flag  tile at {},{} ({}x{}): bp {:.1} hf {:.1}",
                t.x, t.y, t.width, t.height, t.bp, t.hf
            );
        }
        println!("heatmap {}\nsheet   {}", run.heatmap.display(), run.sheet.display());
        if let Some(id) = run.asset_id {
            println!("stored on asset #{id}");
        }
    }
    if args.strict && r.flagged > 0 {
        std::process::exit(2);
    }
    Ok(())
}
