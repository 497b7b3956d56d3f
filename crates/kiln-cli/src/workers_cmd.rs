//! `kiln worker` (a queue worker in its own process, on this box or another, pointed at the
//! project's database) and `kiln workers` (who is working, and who is down).

use crate::args::RunArgs;
use crate::serve::parse_bytes;
use clap::Args;
use kiln_core::jobs::pool::ModelPool;
use kiln_core::jobs::queue::Queue;
use kiln_core::jobs::worker::{DbPublish, Worker, WorkerOptions};
use kiln_core::jobs::workers::WorkerAd;
use kiln_core::jobs::Engine;
use kiln_core::library::Project;
use kiln_core::workflow::JobOptions;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Project folder (kiln.toml, tiers, assets written here); default $KILN_PROJECT or the
    /// current folder.
    #[arg(long)]
    project: Option<PathBuf>,
    /// The shared database (postgres://user:password@host:port/db); default $KILN_DATABASE_URL,
    /// else the project's own SQLite library (workers on this box only).
    #[arg(long)]
    database: Option<String>,
    /// Run only jobs of these tiers (comma-separated; default: every tier).
    #[arg(long, value_delimiter = ',')]
    tiers: Vec<String>,
    /// Memory for loaded models (e.g. 24G): jobs whose model needs more go to other workers,
    /// and least recently used models are unloaded to stay within it.
    #[arg(long)]
    max_memory: Option<String>,
    /// This worker's name in `kiln workers` (default HOST:DEVICE:PID).
    #[arg(long)]
    name: Option<String>,
    /// Seconds a claimed job stays this worker's without a heartbeat; another worker re-runs it
    /// after that.
    #[arg(long, default_value_t = 30.0)]
    lease_seconds: f64,
    /// Seconds between heartbeats (at most a third of the lease).
    #[arg(long, default_value_t = 5.0)]
    heartbeat_seconds: f64,
    /// Re-pin kiln.lock when a tier's weights changed, instead of refusing.
    #[arg(long)]
    accept_drift: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// This machine's name (for worker ids and listings).
pub fn host_name() -> String {
    fs_err::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

pub fn open_project(project: Option<&std::path::Path>, database: Option<String>) -> anyhow::Result<Project> {
    let project = Project::find(project)?;
    Ok(match database {
        Some(url) => project.with_database(Some(url))?,
        None => project,
    })
}

/// Log lines to stderr (`KILN_LOG` filters; default info) for the long-running commands.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(kiln_core::env::KILN_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    init_logging();
    if !(args.lease_seconds.is_finite() && args.lease_seconds >= 1.0) {
        anyhow::bail!("invalid --lease-seconds {}: use 1 or more", args.lease_seconds);
    }
    if !(args.heartbeat_seconds.is_finite()
        && args.heartbeat_seconds > 0.0
        && args.heartbeat_seconds * 3.0 <= args.lease_seconds)
    {
        anyhow::bail!(
            "invalid --heartbeat-seconds {}: use more than 0 and at most a third of --lease-seconds ({})",
            args.heartbeat_seconds,
            args.lease_seconds
        );
    }
    let budget = args.max_memory.as_deref().map(|s| parse_bytes("--max-memory", s)).transpose()?;
    let project = open_project(args.project.as_deref(), args.database)?;
    let device = args.run.device()?;
    let device_name = kiln_core::device::name(&device);
    let options = JobOptions {
        device,
        dtype: args.run.explicit_dtype()?,
        accept_drift: args.accept_drift,
        show_progress: false,
        text_encoders: args.run.text_encoders()?,
    };
    let engine = Arc::new(Engine::new(project, options, Arc::new(ModelPool::new(budget))));
    let mut queue = Queue::open(&engine.project)?;
    let id = args.name.unwrap_or_else(|| format!("{}:{device_name}:{}", host_name(), std::process::id()));
    // This worker's previous life (same name) left its jobs running: settle them now rather
    // than after their lease.
    let recovery = queue.recover(&[id.as_str()])?;
    if !recovery.requeued.is_empty() {
        tracing::warn!(jobs = ?recovery.requeued, "queued again: left running by this worker's previous process");
    }
    let ad = WorkerAd {
        id: id.clone(),
        host: host_name(),
        device: device_name,
        tiers: args.tiers,
        max_memory: budget,
        ..Default::default()
    };
    let worker_options = WorkerOptions {
        ad,
        lease_seconds: args.lease_seconds,
        heartbeat_seconds: args.heartbeat_seconds,
        poll: Duration::from_millis(100),
        ..Default::default()
    };
    let publish = Arc::new(DbPublish::new(Queue::open(&engine.project)?));
    let worker = Worker::new(engine, publish, worker_options);
    let draining = worker.clone();
    kiln_server::on_shutdown_signal(move || {
        tracing::info!("draining: finishing the running job, taking no more");
        draining.drain();
    })?;
    tracing::info!(worker = %id, database = %queue.library().location().display(), "working");
    eprintln!("kiln worker {id}: working");
    drop(queue);
    worker.run()?;
    tracing::info!("stopped");
    Ok(())
}

#[derive(Args, Debug)]
pub struct WorkersArgs {
    /// Project folder; default $KILN_PROJECT or the current folder.
    #[arg(long)]
    project: Option<PathBuf>,
    /// The shared database; default $KILN_DATABASE_URL, else the project's SQLite library.
    #[arg(long)]
    database: Option<String>,
    #[arg(long)]
    json: bool,
}

pub fn run_workers(args: WorkersArgs) -> anyhow::Result<()> {
    let project = open_project(args.project.as_deref(), args.database)?;
    // A listing creates nothing: a folder without a library is an error, not a new library.
    project.existing_library()?;
    let queue = Queue::open(&project)?;
    let workers = queue.workers()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "workers": workers }))?);
        return Ok(());
    }
    if workers.is_empty() {
        println!("no workers have registered with this database");
        return Ok(());
    }
    println!(
        "{:<32} {:<9} {:<8} {:>7} {:>9} {:>10}  warm",
        "worker", "state", "device", "job", "jobs done", "heartbeat"
    );
    for w in workers {
        let job = w.current_job.map(|j| j.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:<9} {:<8} {:>7} {:>9} {:>8.1}s  {}",
            w.ad.id,
            w.state,
            w.ad.device,
            job,
            w.jobs_done,
            w.silent_seconds,
            w.ad.warm_models.join(",")
        );
    }
    Ok(())
}
