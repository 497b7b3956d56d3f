//! `kiln`: thin binary over kiln-core. main → run → ExitCode; anyhow only here.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod generate;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Local, offline image generation on your own GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text-to-image and image-to-image with a Stable Diffusion-family model.
    Generate(generate::GenerateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
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
    }
}
