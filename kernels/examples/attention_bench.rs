//! kiln's fused CPU attention vs candle's composed ops (`softmax(q kᵀ s) v`) on SD shapes:
//! `cargo run --release -p kiln-kernels --example attention_bench`.
use candle_core::{Device, Result, Tensor};
use std::time::Instant;

fn time<F: FnMut() -> Result<Tensor>>(reps: usize, mut f: F) -> Result<f64> {
    f()?; // warm-up
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    println!(
        "{:<44}{:>10}{:>10}{:>8}",
        "attention [b, heads, q x kv tokens, dim]", "candle s", "kiln s", "ratio"
    );
    // (label, heads, q tokens, kv tokens, dim, causal, repeats)
    let cases = [
        ("CLIP text 16 x 77 x 77 x 64, causal", 16, 77, 77, 64, true, 10),
        ("UNet 256² self 5 x 1024 x 1024 x 64", 5, 1024, 1024, 64, false, 5),
        ("UNet 256² cross 5 x 1024 x 77 x 64", 5, 1024, 77, 64, false, 5),
        ("UNet 512² self 5 x 4096 x 4096 x 64", 5, 4096, 4096, 64, false, 2),
        ("VAE 32² 1 x 1024 x 1024 x 512", 1, 1024, 1024, 512, false, 3),
        ("VAE 64² 1 x 4096 x 4096 x 512", 1, 4096, 4096, 512, false, 2),
        ("VAE 128² 1 x 16384 x 16384 x 512", 1, 16384, 16384, 512, false, 1),
    ];
    for (label, heads, nq, nk, d, causal, reps) in cases {
        let q = Tensor::randn(0f32, 1f32, (1, heads, nq, d), &dev)?;
        let k = Tensor::randn(0f32, 1f32, (1, heads, nk, d), &dev)?;
        let v = Tensor::randn(0f32, 1f32, (1, heads, nk, d), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let tc = time(reps, || kiln_kernels::attention_reference(&q, &k, &v, scale, causal))?;
        let tk = time(reps, || kiln_kernels::attention(&q, &k, &v, scale, causal))?;
        println!("{label:<44}{tc:>10.4}{tk:>10.4}{:>8.2}", tk / tc);
    }
    Ok(())
}
