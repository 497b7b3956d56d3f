//! Queue overhead per job on each database engine: enqueue → leased claim → library record →
//! finish, the database work every job pays besides its compute. Run from the repo root:
//!
//! ```sh
//! cargo run --release -p kiln-core --example queue_bench -- [JOBS] [POSTGRES_URL]
//! ```
//!
//! With a PostgreSQL URL (a database the benchmark may write to, e.g. a fresh one), both
//! engines are measured in the same run and the ratio printed.

use kiln_core::jobs::queue::{Claimer, Finish, Queue};
use kiln_core::jobs::spec::{JobSpec, Lane};
use kiln_core::library::assets::{AssetKind, JobTimings, NewAsset, NewJob, RecordKind};
use kiln_core::library::Project;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let jobs: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let mut results = Vec::new();
    let dir = tempfile::tempdir()?;
    results.push(("sqlite", run(Project::open(dir.path())?, jobs)?));
    if let Some(url) = args.get(1) {
        let dir = tempfile::tempdir()?;
        results.push(("postgres", run(Project::open(dir.path())?.with_database(Some(url.clone()))?, jobs)?));
    }
    println!("{jobs} jobs, one process, per job (ms):");
    println!(
        "{:<9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "engine", "enqueue", "claim", "record", "finish", "total"
    );
    for (name, r) in &results {
        println!(
            "{name:<9} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            r[0] * 1e3,
            r[1] * 1e3,
            r[2] * 1e3,
            r[3] * 1e3,
            r.iter().sum::<f64>() * 1e3
        );
    }
    if results.len() == 2 {
        let total = |r: &[f64; 4]| r.iter().sum::<f64>();
        println!("postgres / sqlite: {:.2}x", total(&results[1].1) / total(&results[0].1));
    }
    Ok(())
}

/// Mean seconds per job of each stage: enqueue, claim, record, finish.
fn run(project: Project, jobs: usize) -> Result<[f64; 4], Box<dyn std::error::Error>> {
    let mut queue = Queue::open(&project)?;
    let spec: JobSpec =
        serde_json::from_value(serde_json::json!({ "kind": "draft", "prompt": "bench", "count": 1 }))?;
    let assets = project.assets_dir();
    std::fs::create_dir_all(&assets)?;
    let claimer = Claimer { id: "bench".into(), lease_seconds: 30.0, ..Default::default() };
    let mut t = [0.0f64; 4];
    for i in 0..jobs {
        let s = Instant::now();
        queue.enqueue(&spec, &format!("key{}", i % 4), Lane::Draft, 0.01, Some(1e9))?;
        t[0] += s.elapsed().as_secs_f64();
        let s = Instant::now();
        let claim = queue.claim_as(Some(&claimer), None)?.ok_or("nothing to claim")?;
        t[1] += s.elapsed().as_secs_f64();
        // The record of a one-image job (the file written first, as a job does).
        let path = assets.join(format!("q{}a{}-bench.png", claim.id, claim.attempt));
        image::RgbImage::from_pixel(8, 8, image::Rgb([i as u8, 1, 2])).save(&path)?;
        let s = Instant::now();
        let mut library = project.library()?;
        library.claim_for_queue(claim.id, claim.attempt);
        let job = NewJob {
            kind: RecordKind::Draft,
            tier: Some("draft".into()),
            device: "cpu".into(),
            dtype: "f32".into(),
            model_id: "bench".into(),
            images: 1,
            timings: JobTimings { steps: vec![0.01], ..Default::default() },
            credits: 0.01,
        };
        let asset = NewAsset {
            kind: AssetKind::Draft,
            tier: Some("draft".into()),
            path,
            parent_id: None,
            width: 8,
            height: 8,
            seed: Some(i as u64),
            prompt: Some("bench".into()),
            record: None,
            model_hashes: Vec::new(),
            credits: 0.01,
        };
        library.record_job(&job, &[asset])?;
        t[2] += s.elapsed().as_secs_f64();
        let s = Instant::now();
        queue.finish(
            claim.id,
            claim.attempt,
            Finish::Done { result: &serde_json::json!({}), credits: 0.01 },
        )?;
        t[3] += s.elapsed().as_secs_f64();
    }
    Ok(t.map(|x| x / jobs as f64))
}
