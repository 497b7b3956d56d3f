//! `kiln bench`: draft vs final on this device, per stage; table, JSON and a PNG chart.

use clap::Args;
use kiln_core::bench::{bench_real, bench_synthetic, BenchSettings, TierBench};
use kiln_core::device::{self, DeviceRequest};
use kiln_core::image::chart::{bar_chart, BarGroup};
use kiln_core::library::Project;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Build each tier's architecture with zero-valued weights instead of loading its files
    /// (cost does not depend on weight values), so the benchmark runs without the weights.
    #[arg(long)]
    synthetic: bool,
    /// Tiers to compare, comma-separated.
    #[arg(long, default_value = "draft,final", value_delimiter = ',')]
    tiers: Vec<String>,
    /// Image side for every tier (default: each tier's own size).
    #[arg(long)]
    size: Option<usize>,
    /// Steps for every tier (default: each tier's own).
    #[arg(long)]
    steps: Option<usize>,
    /// Synthetic: divide every channel width by K (1, 2, 4, 8, 16, 32) for quick CPU runs.
    #[arg(long, default_value_t = 1)]
    shrink: usize,
    /// auto | cpu | cuda[:N] | metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32 | f16 | bf16 (default: f16 on GPU, f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Write a bar chart PNG here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Project folder whose kiln.toml layers the tiers.
    #[arg(long)]
    project: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = device::open(args.device.parse::<DeviceRequest>()?)?;
    let dtype = match &args.dtype {
        Some(d) => device::parse_dtype(d)?,
        None => device::default_dtype(&device),
    };
    let registry = Project::find(args.project.as_deref())?.tiers()?;
    let settings = BenchSettings { device, dtype, size: args.size, steps: args.steps, shrink: args.shrink };
    let mut results: Vec<TierBench> = Vec::new();
    for name in &args.tiers {
        let tier = registry.get(name)?;
        let r = if args.synthetic { bench_synthetic(tier, &settings)? } else { bench_real(tier, &settings)? };
        results.push(r);
    }
    if let Some(path) = &args.chart {
        let series: Vec<String> = results
            .iter()
            .map(|r| format!("{} {}x{} {} steps", r.tier, r.width, r.height, r.steps))
            .collect();
        let pick = |f: fn(&TierBench) -> f64| results.iter().map(f).collect::<Vec<f64>>();
        let groups = vec![
            BarGroup { label: "load cold".into(), values: pick(|r| r.load_cold) },
            BarGroup { label: "text encode".into(), values: pick(|r| r.text_encode) },
            BarGroup { label: "one step".into(), values: pick(|r| r.step_mean) },
            BarGroup { label: "all steps".into(), values: pick(|r| r.steps_total) },
            BarGroup { label: "vae decode".into(), values: pick(|r| r.vae_decode) },
            BarGroup { label: "per image".into(), values: pick(|r| r.per_image) },
        ];
        let first = results.first();
        let title = format!(
            "kiln bench{} on {} {}",
            if args.synthetic { " synthetic" } else { "" },
            first.map(|r| r.device.as_str()).unwrap_or(""),
            first.map(|r| r.dtype.as_str()).unwrap_or("")
        );
        let img = bar_chart(&title, &series, &groups, "S");
        kiln_core::image::png_meta::write_png_atomic(path, &img, &[])?;
    }
    if args.json {
        println!("{}", serde_json::json!({ "results": results, "chart": args.chart }));
        return Ok(());
    }
    println!(
        "{:<8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10}",
        "tier",
        "size",
        "steps",
        "load",
        "load2",
        "text",
        "step",
        "steps",
        "decode",
        "per-image",
        "img/s",
        "params"
    );
    for r in &results {
        println!(
            "{:<8} {:>9} {:>6} {:>9.3} {:>9.3} {:>9.4} {:>10.4} {:>10.3} {:>10.3} {:>10.3} {:>8.3} {:>9.0}M",
            r.tier,
            format!("{}x{}", r.width, r.height),
            r.steps,
            r.load_cold,
            r.load_warm,
            r.text_encode,
            r.step_mean,
            r.steps_total,
            r.vae_decode,
            r.per_image,
            r.images_per_second,
            r.parameters as f64 / 1e6
        );
    }
    if let (Some(d), Some(f)) =
        (results.iter().find(|r| r.tier == "draft"), results.iter().find(|r| r.tier == "final"))
    {
        if d.per_image > 0.0 {
            println!("final / draft per image: {:.1}x", f.per_image / d.per_image);
        }
    }
    if let Some(r) = results.first() {
        println!(
            "device {} {}{}; seconds; load = {}",
            r.device,
            r.dtype,
            if r.synthetic {
                format!(", synthetic zero weights, shrink {}", r.shrink)
            } else {
                String::new()
            },
            if r.synthetic { "building the model (allocation only)" } else { "reading the weights" }
        );
    }
    Ok(())
}
