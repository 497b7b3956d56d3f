//! Times kiln's FLUX.1 and Z-Image transformers and the T5 / Qwen3 text encoders on CPU, f32, per
//! block and per whole forward, on the full-width reduced-depth random models that
//! `benches/make_flux_zimage_random.py` writes (benches/flux_zimage_cpu.py runs this beside the
//! diffusers peer and compares):
//! `cargo run --release -p kiln-core --example flux_zimage_bench -- MODELS_DIR flux|zimage|t5|qwen3 [REPEATS]`.
//!
//! Inputs match benches/diffusers_flux_zimage.py: 512² (a 64×64 latent: FLUX packs it to 1024
//! tokens, Z-Image patches it to 1024), 512 T5 tokens for FLUX, a 128-token caption for Z-Image,
//! 512 ids for each encoder. Values are random: cost does not depend on them.
//!
//! Per-block times come from running the blocks in order, as the forward does, one untimed pass
//! first; the whole forward is timed after them, `REPEATS` more calls. Prints one
//! JSON object: milliseconds per block (one list of repeats per block) and per forward.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::diffusers::weight_files_in;
use kiln_core::loaders::weights::open_safetensors;
use kiln_core::models::flux::{FluxConfig, FluxTransformer};
use kiln_core::models::qwen3::{Qwen3Config, Qwen3Encoder};
use kiln_core::models::t5::{T5Config, T5Encoder};
use kiln_core::models::zimage::{ZImageBlock, ZImageConfig, ZImageTransformer};
use serde_json::{json, Map, Value};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Latent side at 512² (VAE factor 8).
const LATENT: usize = 64;
/// FluxPipeline's default T5 budget; the encoders' inputs too (ZImagePipeline pads to 512).
const TEXT_TOKENS: usize = 512;
/// Z-Image's caption: the real (unpadded) tokens of a longish templated prompt.
const CAPTION_TOKENS: usize = 128;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Runs `f` `reps` times; milliseconds per call. No untimed call: the per-block passes before
/// it ran every block, which is what warms the weights and the allocator.
fn repeat(reps: usize, mut f: impl FnMut() -> Res<Tensor>) -> Res<Vec<f64>> {
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        out.push(ms(t));
    }
    Ok(out)
}

/// Per-block timings: `passes` runs of `chain` (the first untimed), each filling one time per block.
fn chained(names: &[String], reps: usize, mut chain: impl FnMut(&mut Vec<f64>) -> Res<()>) -> Res<Value> {
    let mut per_block = vec![Vec::with_capacity(reps); names.len()];
    for pass in 0..=reps {
        let mut times = Vec::with_capacity(names.len());
        chain(&mut times)?;
        if pass > 0 {
            for (slot, t) in per_block.iter_mut().zip(times) {
                slot.push(t);
            }
        }
    }
    let mut m = Map::new();
    for (name, ts) in names.iter().zip(per_block) {
        m.insert(name.clone(), json!(ts));
    }
    Ok(Value::Object(m))
}

/// Times one step of `f` and records it in `times`.
fn timed<T>(times: &mut Vec<f64>, f: impl FnOnce() -> kiln_core::Result<T>) -> Res<T> {
    let t = Instant::now();
    let out = f()?;
    times.push(ms(t));
    Ok(out)
}

fn randn(shape: &[usize], dev: &Device) -> Res<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, dev)?)
}

fn ids(len: usize, vocab: usize, dev: &Device) -> Res<Tensor> {
    // Spread over the vocabulary so that the embedding gathers touch many rows, as real text does.
    let v: Vec<u32> = (0..len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    Ok(Tensor::from_vec(v, (1, len), dev)?)
}

fn var_builder(dir: &Path, dev: &Device) -> Res<candle_nn::VarBuilder<'static>> {
    Ok(open_safetensors(&weight_files_in(dir, false)?, DType::F32, dev)?)
}

fn bench_flux(dir: &Path, reps: usize, dev: &Device) -> Res<Value> {
    let cfg_path = dir.join("config.json");
    let cfg: FluxConfig = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg.validate(&cfg_path)?;
    let model = FluxTransformer::new(&cfg, var_builder(dir, dev)?)?;
    let n = (LATENT / 2) * (LATENT / 2);
    let tokens = randn(&[1, n, cfg.in_channels], dev)?;
    let text = randn(&[1, TEXT_TOKENS, cfg.joint_attention_dim], dev)?;
    let pooled = randn(&[1, cfg.pooled_projection_dim], dev)?;
    let guidance = Tensor::new(&[3.5f32], dev)?;
    let grid = (LATENT / 2, LATENT / 2);
    let names: Vec<String> = (0..cfg.num_layers)
        .map(|i| format!("double.{i}"))
        .chain((0..cfg.num_single_layers).map(|i| format!("single.{i}")))
        .collect();
    let blocks = chained(&names, reps, |times| {
        let inputs = model.block_inputs(&tokens, grid, &text, &pooled, 500.0, Some(&guidance))?;
        let (mut txt, mut img) = (inputs.txt.clone(), inputs.img.clone());
        for i in 0..cfg.num_layers {
            (txt, img) = timed(times, || model.double_block(i, &img, &txt, &inputs))?;
        }
        let mut joint = Tensor::cat(&[&txt, &img], 1)?;
        for i in 0..cfg.num_single_layers {
            joint = timed(times, || model.single_block(i, &joint, &inputs))?;
        }
        Ok(())
    })?;
    let step =
        repeat(reps, || Ok(model.forward_packed(&tokens, grid, &text, &pooled, 500.0, Some(&guidance))?))?;
    Ok(json!({"blocks": blocks, "step": step,
              "depth": {"double": cfg.num_layers, "single": cfg.num_single_layers}}))
}

fn bench_zimage(dir: &Path, reps: usize, dev: &Device) -> Res<Value> {
    let cfg_path = dir.join("config.json");
    let cfg: ZImageConfig = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg.validate(&cfg_path)?;
    let model = ZImageTransformer::new(&cfg, var_builder(dir, dev)?)?;
    let latents = randn(&[1, cfg.in_channels, LATENT, LATENT], dev)?;
    let caption = randn(&[1, CAPTION_TOKENS, cfg.cap_feat_dim], dev)?;
    let r = cfg.n_refiner_layers;
    let names: Vec<String> = (0..r)
        .map(|i| format!("noise_refiner.{i}"))
        .chain((0..r).map(|i| format!("context_refiner.{i}")))
        .chain((0..cfg.n_layers).map(|i| format!("layers.{i}")))
        .collect();
    let blocks = chained(&names, reps, |times| {
        let inputs = model.block_inputs(&latents, &caption, 0.5)?;
        let mut x = inputs.image.clone();
        for i in 0..r {
            x = timed(times, || model.block(ZImageBlock::NoiseRefiner, i, &x, &inputs))?;
        }
        let mut cap = inputs.caption.clone();
        for i in 0..r {
            cap = timed(times, || model.block(ZImageBlock::ContextRefiner, i, &cap, &inputs))?;
        }
        let mut seq = Tensor::cat(&[&x, &cap], 1)?;
        for i in 0..cfg.n_layers {
            seq = timed(times, || model.block(ZImageBlock::Main, i, &seq, &inputs))?;
        }
        Ok(())
    })?;
    let step = repeat(reps, || Ok(model.forward(&latents, &caption, 0.5)?))?;
    Ok(json!({"blocks": blocks, "step": step,
              "depth": {"noise_refiner": r, "context_refiner": r, "layers": cfg.n_layers}}))
}

fn bench_t5(dir: &Path, reps: usize, dev: &Device) -> Res<Value> {
    let cfg_path = dir.join("config.json");
    let cfg = T5Config::from_file(&cfg_path)?;
    let model = T5Encoder::new(&cfg, &cfg_path, var_builder(dir, dev)?)?;
    let ids = ids(TEXT_TOKENS, cfg.vocab_size, dev)?;
    let names: Vec<String> = (0..cfg.num_layers).map(|i| format!("block.{i}")).collect();
    let blocks = chained(&names, reps, |times| {
        let bias = model.position_bias(TEXT_TOKENS, dev)?;
        let mut x = model.embed_tokens(&ids)?;
        for i in 0..cfg.num_layers {
            x = timed(times, || model.block(i, &x, &bias))?;
        }
        Ok(())
    })?;
    let step = repeat(reps, || Ok(model.forward(&ids)?))?;
    Ok(json!({"blocks": blocks, "step": step, "depth": {"block": cfg.num_layers}}))
}

fn bench_qwen3(dir: &Path, reps: usize, dev: &Device) -> Res<Value> {
    let cfg = Qwen3Config::from_file(&dir.join("config.json"))?;
    let model = Qwen3Encoder::new(&cfg, var_builder(dir, dev)?)?;
    let ids = ids(TEXT_TOKENS, cfg.vocab_size, dev)?;
    // hidden_states[-2]: kiln runs the first n - 1 layers only.
    let run = cfg.num_hidden_layers - 1;
    let names: Vec<String> = (0..run).map(|i| format!("layers.{i}")).collect();
    let blocks = chained(&names, reps, |times| {
        let rope = model.rope(TEXT_TOKENS, dev)?;
        let mut x = model.embed_tokens(&ids)?;
        for i in 0..run {
            x = timed(times, || model.layer(i, &x, &rope))?;
        }
        Ok(())
    })?;
    let step = repeat(reps, || Ok(model.forward_penultimate(&ids)?))?;
    Ok(json!({"blocks": blocks, "step": step, "depth": {"layers": run}}))
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(root), Some(which)) = (args.first(), args.get(1)) else {
        return Err("usage: flux_zimage_bench MODELS_DIR flux|zimage|t5|qwen3 [REPEATS]".into());
    };
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dir = PathBuf::from(root).join(which);
    let dev = Device::Cpu;
    let t = Instant::now();
    let mut out = match which.as_str() {
        "flux" => bench_flux(&dir, reps, &dev)?,
        "zimage" => bench_zimage(&dir, reps, &dev)?,
        "t5" => bench_t5(&dir, reps, &dev)?,
        "qwen3" => bench_qwen3(&dir, reps, &dev)?,
        other => return Err(format!("unknown model {other:?}").into()),
    };
    out["tool"] = json!("kiln");
    out["model"] = json!(which);
    out["threads"] = json!(candle_core::utils::get_num_threads());
    out["total_s"] = json!(t.elapsed().as_secs_f64());
    println!("{out}");
    Ok(())
}
