//! Times one tiled VAE decode on CPU and reports its peak memory, as one JSON line (driven by
//! benches/vae_tiled_bench.py): `cargo run --release -p kiln-core --example vae_tiled_bench --
//! VAE_DIR LATENT_SIDE TILE_PX [untiled]`.
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
    let usage = "usage: vae_tiled_bench VAE_DIR LATENT_SIDE TILE_PX [untiled]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let side: usize = args.next().ok_or(usage)?.parse()?;
    let tile_px: usize = args.next().ok_or(usage)?.parse()?;
    let untiled = args.next().as_deref() == Some("untiled");
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
        vae.decode_tiled(&latents, &TileSpec { tile_px, ..TileSpec::default() })?
    };
    let seconds = t.elapsed().as_secs_f64();
    let (_, _, h, w) = image.dims4()?;
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds, "width": w, "height": h, "tiles": run.tiles, "passes": run.passes,
            "peak_rss_bytes": peak_rss(), "rss_after_load_bytes": rss_loaded,
        })
    );
    Ok(())
}
