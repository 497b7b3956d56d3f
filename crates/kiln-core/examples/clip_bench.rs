//! Times the SD-Turbo-sized CLIP text encoder and its parts on CPU:
//! `cargo run --release -p kiln-core --example clip_bench -- MODEL_DIR/text_encoder`.
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use kiln_core::models::clip::{ClipTextConfig, ClipTextModel};

fn time<F: FnMut() -> candle_core::Result<Tensor>>(
    label: &str,
    reps: usize,
    mut f: F,
) -> candle_core::Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{label:<40}{:>10.3} ms", best * 1e3);
    Ok(best)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1f32, (1, 77, 1024), &dev)?;
    let w1 = Tensor::randn(0f32, 0.02f32, (4096, 1024), &dev)?;
    let b1 = Tensor::randn(0f32, 0.02f32, 4096, &dev)?;
    let w2 = Tensor::randn(0f32, 0.02f32, (1024, 4096), &dev)?;
    let lin1 = candle_nn::Linear::new(w1.clone(), Some(b1.clone()));
    let kiln1 = kiln_kernels::Linear::new(w1.clone(), Some(b1.clone()))?;
    time("candle Linear 1024->4096 + gelu_erf", 10, || lin1.forward(&x)?.gelu_erf())?;
    time("kiln Linear 1024->4096 + fused gelu", 10, || {
        kiln1.forward_with(&x, kiln_kernels::Epilogue::GeluErf)
    })?;
    let lin2 = candle_nn::Linear::new(w2.clone(), None);
    let kiln2 = kiln_kernels::Linear::new(w2.clone(), None)?;
    let h = Tensor::randn(0f32, 1f32, (1, 77, 4096), &dev)?;
    time("candle Linear 4096->1024", 10, || lin2.forward(&h))?;
    time("kiln Linear 4096->1024", 10, || kiln2.forward(&h))?;
    // UNet 256² GEGLU feed-forward at the top level: 1024 tokens, 320 -> 2 x 1280.
    let xu = Tensor::randn(0f32, 1f32, (1, 1024, 320), &dev)?;
    let wu = Tensor::randn(0f32, 0.05f32, (2560, 320), &dev)?;
    let bu = Tensor::randn(0f32, 0.05f32, 2560, &dev)?;
    let candle_u = candle_nn::Linear::new(wu.clone(), Some(bu.clone()));
    let kiln_u = kiln_kernels::Linear::new(wu, Some(bu))?;
    time("candle Linear 320->2560 + GEGLU (1024 tok)", 10, || {
        kiln_kernels::linear::apply_epilogue(&candle_u.forward(&xu)?, kiln_kernels::Epilogue::Geglu)
    })?;
    time("kiln Linear 320->2560 + fused GEGLU", 10, || {
        kiln_u.forward_with(&xu, kiln_kernels::Epilogue::Geglu)
    })?;
    let ln = candle_nn::LayerNorm::new(
        Tensor::ones(1024, DType::F32, &dev)?,
        Tensor::zeros(1024, DType::F32, &dev)?,
        1e-5,
    );
    time("layernorm [77,1024]", 10, || ln.forward(&x))?;

    if let Some(dir) = std::env::args().nth(1) {
        let dir = std::path::PathBuf::from(dir);
        let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let t = Instant::now();
        let model = ClipTextModel::load(&cfg, &[dir.join("model.safetensors")], DType::F32, &dev, false)?;
        println!("load {:.3} s", t.elapsed().as_secs_f64());
        let ids: Vec<u32> = (0..77u32).map(|i| if i == 10 { 2 } else { 3 + i }).collect();
        let ids = Tensor::from_vec(ids, (1, 77), &dev)?;
        time("text encoder forward", 5, || {
            Ok(model.forward(&ids).map_err(|e| candle_core::Error::Msg(e.to_string()))?.last_hidden_state)
        })?;
    }
    Ok(())
}
