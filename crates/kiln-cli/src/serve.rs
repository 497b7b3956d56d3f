//! `kiln serve` (the HTTP server over the project) and `kiln keys` (its API keys).

use crate::args::RunArgs;
use clap::{Args, Subcommand};
use kiln_core::jobs::keys::Keys;
use kiln_core::jobs::pool::ModelPool;
use kiln_core::jobs::Engine;
use kiln_core::library::Project;
use kiln_core::workflow::JobOptions;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Project folder (kiln.toml, library, assets); default $KILN_PROJECT or the current folder.
    #[arg(long)]
    project: Option<PathBuf>,
    /// Address to listen on. Anything but loopback needs API keys (`kiln keys add`).
    #[arg(long, default_value = "127.0.0.1:7860")]
    listen: std::net::SocketAddr,
    /// Memory budget for loaded models (e.g. 8G, 512M); least recently used models are
    /// unloaded to stay within it. Default: no limit.
    #[arg(long)]
    max_memory: Option<String>,
    /// Load these tiers before accepting requests (repeatable).
    #[arg(long)]
    preload: Vec<String>,
    /// Largest request body (e.g. 32M).
    #[arg(long, default_value = "32M")]
    max_body: String,
    /// Re-pin kiln.lock when a tier's weights changed, instead of refusing.
    #[arg(long)]
    accept_drift: bool,
    /// Let web pages from this origin call the API (repeatable; default: no CORS headers).
    #[arg(long)]
    cors_origin: Vec<String>,
    /// The shared database (postgres://…) that `kiln worker`s on other boxes also use;
    /// default $KILN_DATABASE_URL, else the project's own SQLite library.
    #[arg(long)]
    database: Option<String>,
    /// Run no jobs in this process: only `kiln worker` processes run them.
    #[arg(long)]
    no_worker: bool,
    /// Run a worker on each of these devices (e.g. cuda:0,cuda:1), each with its own model
    /// pool of --max-memory; the first also serves the API's estimates. Default: --device.
    #[arg(long, value_delimiter = ',', conflicts_with = "no_worker")]
    devices: Vec<String>,
    #[command(flatten)]
    run: RunArgs,
}

/// Parses 8G, 512M, 64K or plain bytes.
pub fn parse_bytes(field: &str, s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('G') => (&t[..t.len() - 1], 1u64 << 30),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('K') => (&t[..t.len() - 1], 1 << 10),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid {field}: `{s}` (expected e.g. 8G, 512M or bytes)"))?;
    if !(v.is_finite() && v > 0.0) {
        anyhow::bail!("invalid {field}: `{s}` must be > 0");
    }
    Ok((v * mult as f64) as u64)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::workers_cmd::init_logging();
    let budget = args.max_memory.as_deref().map(|s| parse_bytes("--max-memory", s)).transpose()?;
    let body = parse_bytes("--max-body", &args.max_body)?;
    let project = crate::workers_cmd::open_project(args.project.as_deref(), args.database)?;
    let dtype = args.run.explicit_dtype()?;
    let host = crate::workers_cmd::host_name();
    // One engine (own device, own model pool) per worker; the first is the server's.
    let mut devices = Vec::new();
    if args.devices.is_empty() {
        devices.push(args.run.device()?);
    }
    for d in &args.devices {
        devices.push(kiln_core::device::open(d.parse::<kiln_core::device::DeviceRequest>()?)?);
    }
    let mut engines = Vec::new();
    for (i, device) in devices.into_iter().enumerate() {
        let name = kiln_core::device::name(&device);
        // Stable across restarts: a restarted server settles its own previous jobs at once.
        let id = if i == 0 { format!("serve@{host}:{name}") } else { format!("serve@{host}:{name}#{i}") };
        let options = JobOptions {
            device,
            dtype,
            accept_drift: args.accept_drift,
            show_progress: false,
            text_encoders: args.run.text_encoders()?,
        };
        let worker = kiln_core::jobs::worker::WorkerOptions {
            ad: kiln_core::jobs::workers::WorkerAd {
                id,
                host: host.clone(),
                device: name,
                max_memory: budget,
                ..Default::default()
            },
            place_by_memory: false,
            ..Default::default()
        };
        engines.push((Engine::new(project.clone(), options, Arc::new(ModelPool::new(budget))), worker));
    }
    let mut engines = engines.into_iter();
    let Some((engine, worker)) = engines.next() else { anyhow::bail!("--devices names no device") };
    let limits = kiln_server::state::Limits {
        body_bytes: usize::try_from(body).unwrap_or(usize::MAX),
        ..Default::default()
    };
    let config = kiln_server::ServerConfig {
        listen: args.listen,
        limits,
        preload: args.preload,
        cors: kiln_server::state::Cors { origins: args.cors_origin },
        // With --no-worker the server runs no jobs: only `kiln worker` processes do.
        worker: (!args.no_worker).then_some(worker),
        more_workers: engines.collect(),
    };
    kiln_server::serve(engine, config)?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
    /// Project folder; default $KILN_PROJECT or the current folder.
    #[arg(long, global = true)]
    project: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Make a key; prints it once, alone, on the last line (only its hash is kept).
    Add {
        name: String,
        /// Credits the key may spend per 24 hours (default: unlimited).
        #[arg(long)]
        quota: Option<f64>,
    },
    /// The keys (names, quotas, revoked or not; never the keys).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by name.
    Revoke { name: String },
}

pub fn run_keys(args: KeysArgs) -> anyhow::Result<()> {
    let project = Project::find(args.project.as_deref())?;
    let mut keys = Keys::open(&project)?;
    match args.command {
        KeysCommand::Add { name, quota } => {
            let key = keys.add(&name, quota)?;
            eprintln!("added key `{name}`; it is shown once, keep it:");
            println!("{key}");
        }
        KeysCommand::List { json } => {
            let list = keys.list()?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for k in list {
                    let quota =
                        k.quota.map(|q| format!("{q} credits/day")).unwrap_or_else(|| "no quota".into());
                    let state = if k.revoked { "revoked" } else { "active" };
                    println!("{:<24} {state:<8} {quota}", k.name);
                }
            }
        }
        KeysCommand::Revoke { name } => {
            keys.revoke(&name)?;
            eprintln!("revoked key `{name}`");
        }
    }
    Ok(())
}
