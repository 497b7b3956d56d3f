//! LoRA merge cost and generation with vs without a merged LoRA, on CPU f32:
//! `cargo run --release -p kiln-core --example lora_bench -- LORA [MODEL_DIR] [size] [steps] [with|without|both|interleave]`.
//!
//! Always: the merge arithmetic for every layer of LORA (B·A, scaled, added to a weight of the
//! layer's shape) without a base model, so a LoRA shaped for a model not at hand (SDXL) is timed.
//! With MODEL_DIR: the model's load without and with the LoRA merged (the difference is what
//! merging adds to a load) and the fastest of two images each, after an untimed warm-up image,
//! at size² px. `with` / `without` run one of the two, so each can have a process of its own
//! (models loaded earlier in a process leave caches and heap behind that skew the second).
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::loaders::lora::{merge_without_base, LoraFile, LoraRequest};
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::LoadedModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the `kiln` binary (and so `kiln serve`) runs.
    kiln_core::host_memory::keep_freed_blocks();
    let mut args = std::env::args().skip(1);
    let lora = PathBuf::from(args.next().ok_or("usage: lora_bench LORA [MODEL_DIR] [size] [steps]")?);
    let model_dir = args.next().map(PathBuf::from);
    let size: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(256);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let which = args.next().unwrap_or_else(|| "both".into());
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
    let request = GenerateRequest::txt2img("a lighthouse at dawn", (size, size), steps, 0.0, 1);
    let loras = [LoraRequest { name: "bench".into(), path: lora.clone(), weight: 1.0 }];
    if which == "interleave" {
        // Both models loaded, images alternated: machine load that drifts over the run (a
        // shared machine) hits both alike; the fastest of each is reported.
        let plain =
            LoadedModel::load_with_loras(ModelSource::Folder(dir.clone()), None, &[], &dev, DType::F32)?;
        let merged =
            LoadedModel::load_with_loras(ModelSource::Folder(dir.clone()), None, &loras, &dev, DType::F32)?;
        let mut best = [f64::INFINITY; 2];
        for round in 0..4 {
            for (i, model) in [&plain, &merged].into_iter().enumerate() {
                let t = Instant::now();
                generate(model, &request, &mut NoProgress)?;
                if round > 0 {
                    best[i] = best[i].min(t.elapsed().as_secs_f64());
                }
            }
        }
        println!(
            "interleaved, fastest of 3 after a warm-up each: without {:.3} s, with LoRA {:.3} s ({size}², {steps} step(s))",
            best[0], best[1]
        );
        return Ok(());
    }
    if which == "switch" {
        let other = PathBuf::from(args.next().ok_or("switch needs a second LoRA: ... switch LORA2")?);
        return switch(&dir, &request, &loras, &other);
    }
    let runs: &[bool] = match which.as_str() {
        "with" => &[true],
        "without" => &[false],
        _ => &[false, true],
    };
    for &with_lora in runs {
        let t = Instant::now();
        let list: &[LoraRequest] = if with_lora { &loras } else { &[] };
        let model =
            LoadedModel::load_with_loras(ModelSource::Folder(dir.clone()), None, list, &dev, DType::F32)?;
        let load = t.elapsed().as_secs_f64();
        generate(&model, &request, &mut NoProgress)?;
        let mut image = f64::INFINITY;
        for _ in 0..2 {
            let t = Instant::now();
            generate(&model, &request, &mut NoProgress)?;
            image = image.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{}: load {load:.3} s, image {image:.3} s ({size}², {steps} step(s), warm)",
            if with_lora { "with LoRA" } else { "without" }
        );
    }
    Ok(())
}

/// Switching a warm model between two LoRA sets against loading it with the new set: the
/// model is loaded with `first` and has made an image (its kept kernels built, as in a server),
/// then switched to `second`, back, to none and back, each timed; then `second` is loaded fresh
/// and its image compared with the switched model's (they must be bit-identical).
fn switch(
    dir: &std::path::Path,
    request: &GenerateRequest,
    first: &[LoraRequest],
    other: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let second = [LoraRequest { name: "bench-2".into(), path: other.to_path_buf(), weight: 0.8 }];
    let source = || ModelSource::Folder(dir.to_path_buf());
    let t = Instant::now();
    let mut warm = LoadedModel::load_with_loras(source(), None, first, &dev, DType::F32)?;
    let full_first = t.elapsed().as_secs_f64();
    generate(&warm, request, &mut NoProgress)?;
    let mut switches = Vec::new();
    let steps = [
        ("A -> B", &second[..]),
        ("B -> A", first),
        ("A -> none", &[][..]),
        ("none -> none (what every switch pays besides its layers)", &[][..]),
        ("none -> B", &second[..]),
    ];
    for (label, set) in steps {
        let t = Instant::now();
        let next = warm.with_loras(set)?;
        let seconds = t.elapsed().as_secs_f64();
        println!(
            "switch {label}: {seconds:.3} s ({} tensors shared, {} re-read)",
            next.reuse.shared, next.reuse.read
        );
        switches.push(seconds);
        warm = next;
    }
    let switched = generate(&warm, request, &mut NoProgress)?;
    drop(warm);
    let t = Instant::now();
    let fresh = LoadedModel::load_with_loras(source(), None, &second, &dev, DType::F32)?;
    let full_second = t.elapsed().as_secs_f64();
    let image = generate(&fresh, request, &mut NoProgress)?;
    let same = switched.images[0].pixels.flatten_all()?.to_vec1::<f32>()?
        == image.images[0].pixels.flatten_all()?.to_vec1::<f32>()?;
    let full = full_first.min(full_second);
    let worst = switches.iter().cloned().fold(0.0, f64::max);
    println!(
        "full load with a LoRA set: {full_first:.3} s (A), {full_second:.3} s (B); slowest switch {worst:.3} s = {:.1} % of the faster full load; switched image {} the fresh load's",
        100.0 * worst / full,
        if same { "bit-identical to" } else { "DIFFERS from" }
    );
    Ok(())
}
