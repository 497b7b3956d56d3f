//! `kiln cache list|prune`: the layout cache of pre-laid-out weights.

use clap::{Args, Subcommand};
use kiln_core::loaders::layout_cache::{parse_size, CacheEntry, LayoutCache};

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List the pre-laid-out weight files, most recently used first: size, component, sources.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove the least recently used files until the cache holds at most --max-size (default:
    /// the cache's bound, KILN_LAYOUT_CACHE_MAX); --all removes every file. A removed file is
    /// written again by the next load that needs it.
    Prune {
        /// e.g. 10G, 512M, or a number of bytes.
        #[arg(long, conflicts_with = "all")]
        max_size: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: CacheArgs) -> anyhow::Result<()> {
    let Some(cache) = LayoutCache::from_env()? else {
        anyhow::bail!(
            "the layout cache is off (KILN_LAYOUT_CACHE=off, or no data folder: set KILN_DATA_DIR)"
        );
    };
    match args.command {
        CacheCommand::List { json } => {
            let entries = cache.list()?;
            let total: u64 = entries.iter().map(|e| e.bytes).sum();
            if json {
                let list: Vec<_> = entries.iter().map(entry_json).collect();
                println!(
                    "{}",
                    serde_json::json!({ "dir": cache.dir(), "bytes": total, "max_bytes": cache.max_bytes(), "files": list })
                );
                return Ok(());
            }
            println!("{}: {} of at most {}", cache.dir().display(), gb(total), gb(cache.max_bytes()));
            if entries.is_empty() {
                println!("no pre-laid-out weights yet (a model's first CPU load writes them)");
            }
            for e in &entries {
                println!("{}", line(e));
            }
        }
        CacheCommand::Prune { max_size, all, json } => {
            let keep = match (all, max_size) {
                (true, _) => 0,
                (false, Some(text)) => parse_size(&text).ok_or_else(|| {
                    anyhow::anyhow!("--max-size {text}: not a size (e.g. 10G, 512M or bytes)")
                })?,
                (false, None) => cache.max_bytes(),
            };
            let removed = cache.prune_to(keep)?;
            if json {
                let list: Vec<_> = removed.iter().map(entry_json).collect();
                println!("{}", serde_json::json!({ "removed": list }));
            } else {
                let freed: u64 = removed.iter().map(|e| e.bytes).sum();
                println!("removed {} file(s), {}", removed.len(), gb(freed));
            }
        }
    }
    Ok(())
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn line(e: &CacheEntry) -> String {
    let name = e.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match &e.meta {
        Some(m) => {
            let sources: Vec<&str> = m.sources.iter().map(|(f, _)| f.as_str()).collect();
            format!(
                "{name}  {}  {}  {} layers from {}",
                gb(e.bytes),
                m.component,
                m.layers.len(),
                sources.join(", ")
            )
        }
        None => format!("{name}  {}  (unreadable: not used, removed by prune)", gb(e.bytes)),
    }
}

fn entry_json(e: &CacheEntry) -> serde_json::Value {
    let used = e.used.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs());
    serde_json::json!({
        "file": e.path,
        "bytes": e.bytes,
        "last_used_unix": used,
        "component": e.meta.as_ref().map(|m| &m.component),
        "sources": e.meta.as_ref().map(|m| &m.sources),
        "layers": e.meta.as_ref().map(|m| m.layers.len()),
    })
}
