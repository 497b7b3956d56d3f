//! `kiln`: thin binary over kiln-core. main → run → ExitCode; anyhow only here.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod generate;
mod inpaint;

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
    /// Repaint the masked part of an image (white = repaint); the rest stays bit-identical.
    Inpaint(inpaint::InpaintArgs),
    /// Extend the canvas (--left/--right/--top/--bottom PX or --to 16:9) and paint the new area.
    Outpaint(inpaint::OutpaintArgs),
    /// Remove the masked object, filling in its surroundings.
    Erase(inpaint::EraseArgs),
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
        Command::Inpaint(args) => inpaint::run_inpaint(args),
        Command::Outpaint(args) => inpaint::run_outpaint(args),
        Command::Erase(args) => inpaint::run_erase(args),
    }
}
