//! Times one tiled VAE decode on CPU and reports its peak memory, as one JSON line (driven by
//! benches/vae_tiled_bench.py): `cargo run --release -p kiln-core --example vae_tiled_bench --
//! VAE_DIR LATENT_SIDE TILE_PX [untiled|compare]`. `compare` decodes both ways and adds the tiled
//! decode's PSNR against the untiled one and its worst per-tile mean tone difference (1/255).
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::weights::open_safetensors;
use kiln_core::models::vae::{AutoencoderKl, TileSpec, VaeConfig};

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: vae_tiled_bench VAE_DIR LATENT_SIDE TILE_PX [untiled|compare]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let side: usize = args.next().ok_or(usage)?.parse()?;
    let tile_px: usize = args.next().ok_or(usage)?.parse()?;
    let mode = args.next().unwrap_or_default();
    let untiled = mode == "untiled";
    let dev = Device::Cpu;
    let cfg = VaeConfig::from_file(dir.join("config.json"))?;
    let vb = open_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &dev)?;
    let vae = AutoencoderKl::new(&cfg, vb)?;
    let latents = Tensor::randn(0f32, 1f32, (1, cfg.latent_channels, side, side), &dev)?;
    let rss_loaded = peak_rss();
    let t = Instant::now();
    let (image, run) = if untiled {
        (vae.decode(&latents)?, Default::default())
    } else {
        vae.decode_tiled(&latents, &TileSpec { tile_px, ..TileSpec::default() }, &mut || false)?
    };
    let seconds = t.elapsed().as_secs_f64();
    let (_, _, h, w) = image.dims4()?;
    let (mut psnr, mut tone) = (None, None);
    if mode == "compare" {
        let reference = vae.decode(&latents)?;
        let unit = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            ((t.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?.flatten_all()?.to_vec1::<f32>()
        };
        let (a, b) = (unit(&image)?, unit(&reference)?);
        let mse = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64;
        psnr = Some(10.0 * (1.0 / mse).log10());
        let mut worst = 0f64;
        for y0 in (0..h).step_by(tile_px) {
            for x0 in (0..w).step_by(tile_px) {
                let (mut d, mut n) = (0f64, 0usize);
                for c in 0..3 {
                    for y in y0..(y0 + tile_px).min(h) {
                        for x in x0..(x0 + tile_px).min(w) {
                            let i = (c * h + y) * w + x;
                            d += (a[i] - b[i]) as f64;
                            n += 1;
                        }
                    }
                }
                worst = worst.max((d / n as f64 * 255.0).abs());
            }
        }
        tone = Some(worst);
    }
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds, "width": w, "height": h, "tiles": run.tiles, "passes": run.passes,
            "stage_runs": run.stage_runs, "kept": run.kept, "attention_windows": run.attention_windows,
            "psnr_vs_untiled_db": psnr, "worst_tile_tone_255": tone, "peak_rss_bytes": peak_rss(), "rss_after_load_bytes": rss_loaded,
        })
    );
    Ok(())
}
