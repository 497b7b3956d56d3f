//! `kiln bench`: draft vs final (and the upscale tier) on this device, per stage; table, JSON
//! and a PNG chart.

use clap::Args;
use kiln_core::bench::{bench_real, bench_synthetic, bench_upscale, BenchSettings, TierBench, UpscaleBench};
use kiln_core::device::{self, DeviceRequest};
use kiln_core::image::chart::{bar_chart, BarGroup};
use kiln_core::library::Project;
use kiln_core::tiers::TierKind;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Build each tier's architecture with zero-valued weights instead of loading its files
    /// (cost does not depend on weight values), so the benchmark runs without the weights.
    #[arg(long)]
    synthetic: bool,
    /// Tiers to compare, comma-separated (default draft,final,upscale; the upscale tier is
    /// skipped with a note when its model is not imported, unless named here).
    #[arg(long, value_delimiter = ',')]
    tiers: Option<Vec<String>>,
    /// Upscale tier input side (default: the last diffusion tier's output size, else 1024).
    #[arg(long)]
    upscale_size: Option<usize>,
    /// Image side for every tier (default: each tier's own size).
    #[arg(long)]
    size: Option<usize>,
    /// Steps for every tier (default: each tier's own).
    #[arg(long)]
    steps: Option<usize>,
    /// Synthetic: divide every channel width by K (1, 2, 4, 8, 16, 32) for quick CPU runs.
    #[arg(long, default_value_t = 1)]
    shrink: usize,
    /// Untimed images per tier before the timed ones (0: the first image is timed, as a
    /// one-shot `kiln generate` would see it; 1 or more: steady state, as a server sees it).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Timed images per tier; each stage reports its fastest.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
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
    kiln_core::bounds::BENCH_UPSCALE_SIZE.check_opt(args.upscale_size)?;
    let device = device::open(args.device.parse::<DeviceRequest>()?)?;
    let dtype = match &args.dtype {
        Some(d) => device::parse_dtype(d)?,
        None => device::default_dtype(&device),
    };
    let registry = Project::find(args.project.as_deref())?.tiers()?;
    let settings = BenchSettings {
        device,
        dtype,
        size: args.size,
        steps: args.steps,
        shrink: args.shrink,
        warmup: args.warmup,
        repeats: args.repeats,
    };
    let mut results: Vec<TierBench> = Vec::new();
    let mut upscales: Vec<UpscaleBench> = Vec::new();
    let explicit = args.tiers.is_some();
    let names = args.tiers.clone().unwrap_or_else(|| vec!["draft".into(), "final".into(), "upscale".into()]);
    for name in &names {
        let tier = registry.get(name)?;
        if tier.kind == TierKind::Upscale {
            let (w, h) = match (args.upscale_size, results.last()) {
                (Some(side), _) => (side, side),
                (None, Some(r)) => (r.width, r.height),
                (None, None) => (1024, 1024),
            };
            match bench_upscale(tier, &settings, args.synthetic, w, h) {
                Ok(r) => upscales.push(r),
                Err(e) if !explicit => eprintln!("note: upscale tier `{name}` skipped: {e}"),
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        let r = if args.synthetic { bench_synthetic(tier, &settings)? } else { bench_real(tier, &settings)? };
        results.push(r);
    }
    if let Some(path) = &args.chart {
        let mut series: Vec<String> = results
            .iter()
            .map(|r| format!("{} {}x{} {} steps", r.tier, r.width, r.height, r.steps))
            .collect();
        series.extend(upscales.iter().map(|u| {
            // The chart font has no `>`: "to".
            format!(
                "{} {}x{} to {}x{}",
                u.tier, u.input_width, u.input_height, u.output_width, u.output_height
            )
        }));
        // One bar per tier in each stage; a stage a tier does not have is 0.
        let pick = |f: fn(&TierBench) -> f64, g: fn(&UpscaleBench) -> f64| {
            results.iter().map(f).chain(upscales.iter().map(g)).collect::<Vec<f64>>()
        };
        let groups = vec![
            BarGroup { label: "load cold".into(), values: pick(|r| r.load_cold, |u| u.load_cold) },
            BarGroup { label: "text encode".into(), values: pick(|r| r.text_encode, |_| 0.0) },
            BarGroup { label: "one step".into(), values: pick(|r| r.step_mean, |_| 0.0) },
            BarGroup { label: "all steps".into(), values: pick(|r| r.steps_total, |_| 0.0) },
            BarGroup { label: "vae decode".into(), values: pick(|r| r.vae_decode, |_| 0.0) },
            BarGroup { label: "upscale".into(), values: pick(|_| 0.0, |u| u.upscale) },
            BarGroup { label: "per image".into(), values: pick(|r| r.per_image, |u| u.upscale) },
        ];
        let (device, dtype) = match (results.first(), upscales.first()) {
            (Some(r), _) => (r.device.as_str(), r.dtype.as_str()),
            (None, Some(u)) => (u.device.as_str(), u.dtype.as_str()),
            _ => ("", ""),
        };
        let title =
            format!("kiln bench{} on {device} {dtype}", if args.synthetic { " synthetic" } else { "" });
        let img = bar_chart(&title, &series, &groups, "S");
        kiln_core::image::png_meta::write_png_atomic(path, &img, &[])?;
    }
    if args.json {
        println!("{}", serde_json::json!({ "results": results, "upscale": upscales, "chart": args.chart }));
        return Ok(());
    }
    println!(
        "{:<8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>9}",
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
        "params",
        "peak MB"
    );
    for r in &results {
        println!(
            "{:<8} {:>9} {:>6} {:>9.3} {:>9.3} {:>9.4} {:>10.4} {:>10.3} {:>10.3} {:>10.3} {:>8.3} {:>9.0}M {:>9}",
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
            r.parameters as f64 / 1e6,
            r.peak_host_memory_bytes.map(|b| format!("{:.0}", b as f64 / 1e6)).unwrap_or_else(|| "-".into())
        );
    }
    if let (Some(d), Some(f)) =
        (results.iter().find(|r| r.tier == "draft"), results.iter().find(|r| r.tier == "final"))
    {
        if d.per_image > 0.0 {
            println!("final / draft per image: {:.1}x", f.per_image / d.per_image);
        }
    }
    for u in &upscales {
        println!(
            "{:<8} {:>9} -> {:<11} x{} {:<40} load {:.3} / {:.3}  upscale {:.3} s  {:.3} img/s  {:.3} MP/s  tile {}  peak {}  {:.1}M params",
            u.tier,
            format!("{}x{}", u.input_width, u.input_height),
            format!("{}x{}", u.output_width, u.output_height),
            u.scale,
            u.architecture,
            u.load_cold,
            u.load_warm,
            u.upscale,
            u.images_per_second,
            u.megapixels_per_second,
            u.tile,
            u.peak_host_memory_bytes.map(|b| format!("{:.0} MB", b as f64 / 1e6)).unwrap_or_else(|| "-".into()),
            u.parameters as f64 / 1e6
        );
    }
    if let Some(r) = results.first() {
        println!(
            "device {} {}{}; seconds{}; load = {}",
            r.device,
            r.dtype,
            if r.synthetic {
                format!(", synthetic weights (zero; random for upscale), shrink {}", r.shrink)
            } else {
                String::new()
            },
            match (r.warmup, r.repeats) {
                (0, 1) => String::new(),
                (w, n) => format!(", fastest of {n} images after {w} untimed"),
            },
            if r.synthetic { "building the model (allocation only)" } else { "reading the weights" }
        );
    }
    Ok(())
}
