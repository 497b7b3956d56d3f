//! `kiln loras import|list|show`: the LoRA library.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use kiln_core::loaders::lora::{LoraEntry, LoraLibrary};

#[derive(Args, Debug)]
pub struct LorasArgs {
    #[command(subcommand)]
    pub command: LorasCommand,
}

#[derive(Subcommand, Debug)]
pub enum LorasCommand {
    /// Import LoRA .safetensors files into the content-addressed store (named by file stem).
    /// Every file is checked first; one bad file imports nothing.
    Import {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Point a name that is already imported at the new file.
        #[arg(long)]
        replace: bool,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List imported LoRAs: name, family, format, trigger words, sha256.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Everything the library knows about one LoRA.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: LorasArgs) -> anyhow::Result<()> {
    let library = LoraLibrary::open_default()?;
    match args.command {
        LorasCommand::Import { paths, replace, json } => {
            let entries = library.import(&paths, replace)?;
            if json {
                println!("{}", serde_json::json!({ "imported": entries }));
            } else {
                for e in &entries {
                    println!("imported {}", line(e));
                }
            }
        }
        LorasCommand::List { json } => {
            let entries = library.list()?;
            if json {
                println!("{}", serde_json::json!({ "loras": entries }));
            } else if entries.is_empty() {
                println!("no LoRAs imported (kiln loras import FILE.safetensors)");
            } else {
                for e in &entries {
                    println!("{}", line(e));
                }
            }
        }
        LorasCommand::Show { name, json } => {
            let Some(e) = library.find(&name)? else {
                anyhow::bail!("no LoRA named `{name}` is imported (see `kiln loras list`)");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                let i = &e.info;
                let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
                println!("name:          {}", e.name);
                println!("sha256:        {}", e.sha256);
                println!("source:        {} ({} bytes)", e.source, e.bytes);
                println!("format:        {}", i.format);
                println!("family:        {}", or_unknown(&i.family));
                println!("base model:    {}", or_unknown(&i.base_model));
                println!("trigger words: {}", i.trigger_words.join(", "));
                println!("resolution:    {}", or_unknown(&i.resolution));
                println!("layers:        {} (rank {:?}) in {}", i.layers, i.ranks, i.components.join(", "));
                println!("file:          {}", library.blob_path(&e.sha256).display());
            }
        }
    }
    Ok(())
}

fn line(e: &LoraEntry) -> String {
    let words = if e.info.trigger_words.is_empty() {
        String::new()
    } else {
        format!("  triggers: {}", e.info.trigger_words.join(", "))
    };
    format!(
        "{}  {}  {}  {} layers  sha256 {}{}",
        e.name,
        e.info.family.as_deref().unwrap_or("family?"),
        e.info.format,
        e.info.layers,
        e.sha256.get(..12).unwrap_or(&e.sha256),
        words
    )
}
