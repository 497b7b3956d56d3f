//! Times one UNet step on CPU, the first (cold) call and the warm ones apart:
//! `cargo run --release -p kiln-core --example unet_bench -- MODEL_DIR/unet [latent side] [reps]`.
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::weights::open_safetensors;
use kiln_core::models::unet::{PerBlock, UNet2DConditionModel, UNetCond, UNetConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: unet_bench UNET_DIR [latent side] [reps]")?);
    let side: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let reps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    let dev = Device::Cpu;
    let cfg = UNetConfig::from_file(dir.join("config.json"))?;
    let vb = open_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &dev)?;
    let unet = UNet2DConditionModel::new(&cfg, vb)?;
    let latents = Tensor::randn(0f32, 1f32, (1, cfg.in_channels, side, side), &dev)?;
    let cross = match &cfg.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Each(list) => list.first().copied().ok_or("empty cross_attention_dim")?,
    };
    let hidden = Tensor::randn(0f32, 1f32, (1, 77, cross), &dev)?;
    let cond =
        UNetCond { encoder_hidden_states: &hidden, text_embeds: None, time_ids: None, timestep_cond: None };
    for i in 0..reps {
        let t = Instant::now();
        let out = unet.forward(&latents, 999.0, &cond)?;
        let _ = out.sum_all()?.to_scalar::<f32>()?;
        println!("step {i}: {:.3} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
