//! `kiln`: thin binary over kiln-core. main → run → ExitCode; anyhow only here.
use clap::{CommandFactory, FromArgMatches, Subcommand};
use std::process::ExitCode;

mod args;
mod assets;
mod bench;
mod cache_cmd;
mod cutout;
mod cutout_replace;
mod draft;
mod generate;
mod grade;
mod inpaint;
mod job;
mod loras_cmd;
mod models_cmd;
mod presets;
mod promote;
mod qc;
mod report;
mod serve;
mod tiers;
mod upscale;
mod workers_cmd;

#[derive(clap::Parser)]
#[command(name = "kiln", version, about = "Local, offline image generation on your own GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
enum Command {
    /// Text-to-image and image-to-image with a Stable Diffusion-family model.
    Generate(generate::GenerateArgs),
    /// N quick variants from the draft tier plus a labelled contact sheet.
    Draft(draft::DraftArgs),
    /// Re-render a draft with the final tier, keeping its composition.
    Promote(promote::PromoteArgs),
    /// The project's asset library: list, show, check.
    Assets(assets::AssetsArgs),
    /// Regenerate an asset from its stored parameters and compare with the original.
    Replay(assets::ReplayArgs),
    /// Costs: burn per day, draft:final ratio, cost per delivered asset.
    Report(report::ReportArgs),
    /// Draft vs final per stage on this device (table, JSON, PNG chart).
    Bench(bench::BenchArgs),
    /// The tier registry as this project resolves it, with pin status.
    Tiers(tiers::TiersArgs),
    /// Brand kits: the presets (`[presets.NAME]`) as this project resolves them.
    Presets(presets::PresetsArgs),
    /// Repaint the masked part of an image (white = repaint); the rest stays bit-identical.
    Inpaint(inpaint::InpaintArgs),
    /// Extend the canvas (--left/--right/--top/--bottom PX or --to 16:9) and paint the new area.
    Outpaint(inpaint::OutpaintArgs),
    /// Remove the masked object, filling in its surroundings.
    Erase(inpaint::EraseArgs),
    /// Upscale images with a super-resolution model (tiled, streamed, any target size).
    Upscale(upscale::UpscaleArgs),
    /// Remove (or replace) the background: RGBA cutout, composite, mask (U²-Net matting).
    Cutout(cutout::CutoutArgs),
    /// Import and list super-resolution and matting models.
    Models(models_cmd::ModelsArgs),
    /// The LoRA library: import LoRA files (kohya, diffusers/PEFT, LyCORIS LoCon), list, show.
    Loras(loras_cmd::LorasArgs),
    /// The layout cache: pre-laid-out weights written on a model's first CPU load and mapped
    /// in place by later loads (list, prune).
    Cache(cache_cmd::CacheArgs),
    /// Serve the project over HTTP: native jobs API, OpenAI Images, AUTOMATIC1111; one warm
    /// engine and a durable queue (drafts first).
    Serve(serve::ServeArgs),
    /// API keys for `kiln serve`: add, list, revoke.
    Keys(serve::KeysArgs),
    /// A queue worker in its own process (another GPU, another box): pulls the jobs it can run
    /// from the project's database, runs them, records the results; drains on SIGTERM.
    Worker(workers_cmd::WorkerArgs),
    /// The workers on the project's database: device, state, current job, jobs done, heartbeat.
    Workers(workers_cmd::WorkersArgs),
    /// Hallucination QC of an upscale against its source: per-tile map, heatmap, worst tiles.
    Qc(qc::QcArgs),
    /// Colour-grade images with a 3D LUT (.cube), recorded in their metadata.
    Grade(grade::GradeArgs),
}

fn main() -> ExitCode {
    kiln_core::host_memory::keep_freed_blocks();
    let cli = parse_args();
    let result = run(cli);
    // A model's first load writes its pre-laid-out weights in the background; this process's
    // output is done, but the next load needs the files whole.
    if kiln_core::loaders::layout_cache::writes_pending() {
        eprintln!("finishing the pre-laid-out weights for the next load (once per model)…");
    }
    kiln_core::loaders::layout_cache::wait_for_writes();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Draft(args) => draft::run(args),
        Command::Promote(args) => promote::run(args),
        Command::Assets(args) => assets::run(args),
        Command::Replay(args) => assets::run_replay(args),
        Command::Report(args) => report::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Tiers(args) => tiers::run(args),
        Command::Presets(args) => presets::run(args),
        Command::Inpaint(args) => inpaint::run_inpaint(args),
        Command::Outpaint(args) => inpaint::run_outpaint(args),
        Command::Erase(args) => inpaint::run_erase(args),
        Command::Upscale(args) => upscale::run(args),
        Command::Models(args) => models_cmd::run(args),
        Command::Loras(args) => loras_cmd::run(args),
        Command::Cache(args) => cache_cmd::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Keys(args) => serve::run_keys(args),
        Command::Worker(args) => workers_cmd::run_worker(args),
        Command::Workers(args) => workers_cmd::run_workers(args),
        Command::Cutout(args) => cutout::run(args),
        Command::Qc(args) => qc::run(args),
        Command::Grade(args) => grade::run(args),
    }
}

/// Parses the command line. Negative numbers are values (`--width -64` is then refused as a
/// negative width, not read as an unknown flag `-6`), and the standard library's parse errors
/// are said in words.
fn parse_args() -> Cli {
    fn allow_negative(cmd: clap::Command) -> clap::Command {
        cmd.allow_negative_numbers(true).mut_subcommands(allow_negative)
    }
    let parsed = allow_negative(Cli::command()).try_get_matches().and_then(|m| Cli::from_arg_matches(&m));
    match parsed {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let text = e.render().to_string();
            let text = [
                ("invalid digit found in string", "expected a whole number (0 or more)"),
                ("cannot parse integer from empty string", "expected a whole number"),
                ("number too large to fit in target type", "the number is too large"),
                ("invalid float literal", "expected a number"),
            ]
            .iter()
            .fold(text, |t, (from, to)| t.replace(from, to));
            eprint!("{text}");
            std::process::exit(e.exit_code());
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks over every subcommand's flags (shared flattened groups
    /// included): duplicate names, dangling `requires`/`conflicts_with`, bad defaults.
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
