//! LoRA merge cost and generation with vs without a merged LoRA, on CPU f32:
//! `cargo run --release -p kiln-core --example lora_bench -- LORA [MODEL_DIR] [size] [steps]`.
//!
//! Always: the merge arithmetic for every layer of LORA (B·A, scaled, added to a weight of the
//! layer's shape) without a base model, so a LoRA shaped for a model not at hand (SDXL) is timed.
//! With MODEL_DIR: the model's load without and with the LoRA merged (the difference is what
//! merging adds to a load) and one image each, after an untimed warm-up image, at size² px.
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::loaders::lora::{merge_without_base, LoraFile, LoraRequest};
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::LoadedModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let lora = PathBuf::from(args.next().ok_or("usage: lora_bench LORA [MODEL_DIR] [size] [steps]")?);
    let model_dir = args.next().map(PathBuf::from);
    let size: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(256);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let dev = Device::Cpu;

    let t = Instant::now();
    let file = LoraFile::open(&lora)?;
    let read = t.elapsed().as_secs_f64();
    let info = file.info();
    let t = Instant::now();
    let weights = merge_without_base(&file, 1.0, &dev)?;
    let merge = t.elapsed().as_secs_f64();
    println!(
        "{}: {} layers, rank {:?}; read + check {read:.3} s; merge arithmetic {merge:.3} s for {:.1} M weights",
        lora.display(),
        info.layers,
        info.ranks,
        weights as f64 / 1e6
    );

    let Some(dir) = model_dir else { return Ok(()) };
    let request = GenerateRequest {
        prompt: "a lighthouse at dawn".into(),
        negative_prompt: None,
        width: size,
        height: size,
        steps,
        guidance: 0.0,
        scheduler: None,
        seeds: vec![1],
        init_latents: None,
        init_image: None,
        strength: 1.0,
        max_batch: 1,
        vae_tiling: Default::default(),
        max_sequence_length: None,
    };
    let loras = [LoraRequest { name: "bench".into(), path: lora.clone(), weight: 1.0 }];
    for with_lora in [false, true] {
        let t = Instant::now();
        let list: &[LoraRequest] = if with_lora { &loras } else { &[] };
        let model =
            LoadedModel::load_with_loras(ModelSource::Folder(dir.clone()), None, list, &dev, DType::F32)?;
        let load = t.elapsed().as_secs_f64();
        generate(&model, &request, &mut NoProgress)?;
        let t = Instant::now();
        generate(&model, &request, &mut NoProgress)?;
        let image = t.elapsed().as_secs_f64();
        println!(
            "{}: load {load:.3} s, image {image:.3} s ({size}², {steps} step(s), warm)",
            if with_lora { "with LoRA" } else { "without" }
        );
    }
    Ok(())
}
