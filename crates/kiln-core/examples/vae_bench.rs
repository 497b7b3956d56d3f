//! Times the VAE decoder on CPU, the first (cold: fresh pages) call and the warm ones apart:
//! `cargo run --release -p kiln-core --example vae_bench -- MODEL_DIR/vae [latent side] [reps]`.
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::weights::open_safetensors;
use kiln_core::models::vae::{AutoencoderKl, VaeConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: vae_bench VAE_DIR [latent side] [reps]")?);
    let side: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let reps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    let dev = Device::Cpu;
    let cfg = VaeConfig::from_file(dir.join("config.json"))?;
    let vb = open_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &dev)?;
    let vae = AutoencoderKl::new(&cfg, vb)?;
    let latents = Tensor::randn(0f32, 1f32, (1, cfg.latent_channels, side, side), &dev)?;
    for i in 0..reps {
        let t = Instant::now();
        let img = vae.decode(&latents)?;
        let _ = img.sum_all()?.to_scalar::<f32>()?;
        println!("decode {i}: {:.3} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
