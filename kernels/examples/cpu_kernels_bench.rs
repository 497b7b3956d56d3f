//! Quick CPU comparison of kiln's kernels against candle's own ops on SD-VAE / Real-ESRGAN
//! shapes: `cargo run --release -p kiln-kernels --example cpu_kernels_bench`.
use candle_core::{Device, Module, Result, Tensor};
use std::time::Instant;

fn time<F: FnMut() -> Result<Tensor>>(mut f: F) -> Result<f64> {
    f()?; // warm-up
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    println!("{:<34}{:>10}{:>10}{:>8}", "op", "candle s", "kiln s", "ratio");
    for &(c, hw, o) in &[(128usize, 256usize, 128usize), (512, 64, 512), (64, 256, 64), (256, 128, 256)] {
        let x = Tensor::randn(0f32, 1f32, (1, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.05f32, (o, c, 3, 3), &dev)?;
        let tc = time(|| x.conv2d(&w, 1, 1, 1, 1))?;
        let tk = time(|| kiln_kernels::conv::conv2d_forward(&x, &w, 1, 1))?;
        println!("{:<34}{tc:>10.3}{tk:>10.3}{:>8.2}", format!("conv3x3 {c}->{o} @{hw}x{hw}"), tk / tc);
    }
    // 3x3 stride-1 convs of the SD VAE decoder (256² image), SD-Turbo's UNet (32² latent) and
    // Real-ESRGAN: candle, kiln's im2col, Winograd transforming the weights per call (what
    // `Conv2d` runs) and Winograd with weights transformed once (the SR layers).
    println!(
        "{:<28}{:>9}{:>9}{:>9}{:>9}{:>10}{:>10}",
        "conv3x3 (batch 1)", "candle", "im2col", "wino", "wino-pre", "wino/i2c", "pre/i2c"
    );
    let shapes = [
        (512usize, 32usize, 512usize),
        (512, 64, 512),
        (512, 128, 256),
        (256, 128, 256),
        (256, 256, 128),
        (128, 256, 128),
        (4, 32, 320),
        (320, 32, 320),
        (640, 16, 640),
        (1280, 8, 1280),
        (1280, 4, 1280),
        (64, 128, 64),
        (96, 128, 32),
        (64, 256, 64),
    ];
    for &(c, hw, o) in &shapes {
        let x = Tensor::randn(0f32, 1f32, (1, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.05f32, (o, c, 3, 3), &dev)?;
        let tc = time(|| x.conv2d(&w, 1, 1, 1, 1))?;
        let ti = time(|| kiln_kernels::conv::conv2d_forward_im2col(&x, &w, 1, 1))?;
        let tw = time(|| kiln_kernels::conv3x3_winograd(&x, &w))?;
        let weights = kiln_kernels::WinogradWeights::new(&w, &[c])?;
        let act = kiln_kernels::Act::None;
        let tp = time(|| {
            let input = kiln_kernels::WinoInput::new(&x)?;
            kiln_kernels::winograd::winograd_forward(&weights, &[&input], None, &act, 1.0, None)
        })?;
        println!(
            "{:<28}{tc:>9.4}{ti:>9.4}{tw:>9.4}{tp:>9.4}{:>10.2}{:>10.2}",
            format!("{c}->{o} @{hw}x{hw}"),
            tw / ti,
            tp / ti
        );
    }
    for &(c, hw) in &[(128usize, 256usize), (512, 64)] {
        let x = Tensor::randn(0f32, 1f32, (1, c, hw, hw), &dev)?;
        let w = Tensor::ones(c, candle_core::DType::F32, &dev)?;
        let b = Tensor::zeros(c, candle_core::DType::F32, &dev)?;
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, 32, 1e-6)?;
        let ours = kiln_kernels::GroupNorm::new(w, b, c, 32, 1e-6)?;
        let tc = time(|| candle_nn::ops::silu(&reference.forward(&x)?))?;
        let tk = time(|| ours.forward_silu(&x))?;
        println!("{:<34}{tc:>10.3}{tk:>10.3}{:>8.2}", format!("groupnorm+silu {c} @{hw}x{hw}"), tk / tc);
    }
    Ok(())
}
