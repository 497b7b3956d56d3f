//! `kiln`: thin binary over kiln-core.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod models_cmd;
mod upscale;

/// Local image-generation engine: generate, upscale, manage models.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
enum Command {
    /// Upscale images with a super-resolution model (tiled, streamed, any target size).
    Upscale(upscale::UpscaleArgs),
    /// Import and list super-resolution models.
    Models(models_cmd::ModelsArgs),
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Upscale(args) => upscale::run(args),
        Command::Models(args) => models_cmd::run(args),
    }
}
