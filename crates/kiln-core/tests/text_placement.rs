//! Text encoders on the CPU (`--text-encoders cpu`), on the tiny FLUX.1-dev pipeline of
//! tests/fixtures/flux: the encoders run in f32 on the CPU whatever the model's dtype, their
//! embeddings reach the denoiser in its dtype (as diffusers casts them), a model whose own
//! device and dtype are the CPU's f32 makes the same image bit for bit, and a job records the
//! placement so that its image replays bit-exactly.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use kiln_core::jobs::spec::{GenerateSpec, ImageRef, ReplaySpec};
use kiln_core::jobs::{Engine, JobSpec, NullSink, RunContext};
use kiln_core::library::Project;
use kiln_core::loaders::hub::ModelSource;
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::{LoadedModel, ModelParts, TextPlacement};
use kiln_core::pipeline::text::encode_prompts_with;
use kiln_core::workflow::JobOptions;
use std::path::{Path, PathBuf};

const PROMPT: &str = "a photo of an astronaut riding a horse on the moon";

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flux/dev/model")
}

fn load(dtype: DType, text: TextPlacement) -> LoadedModel {
    let parts = ModelParts { text, ..Default::default() };
    LoadedModel::load_parts(ModelSource::Folder(model_dir()), parts, &Device::Cpu, dtype).unwrap()
}

fn image(model: &LoadedModel) -> Tensor {
    let request = GenerateRequest::txt2img(PROMPT, (64, 64), 2, 3.5, 5);
    generate(model, &request, &mut NoProgress).unwrap().images.remove(0).pixels.to_dtype(DType::F32).unwrap()
}

/// PSNR of two images as the 8-bit PNGs they are written as.
fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let rgb = |t: &Tensor| kiln_core::image::unit_to_rgb8(t).unwrap();
    kiln_core::image::compare::psnr(&rgb(a), &rgb(b)).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn encoders_on_the_cpu_run_in_f32_and_hand_the_model_its_dtype() {
    // A model on the CPU in f32: placing its encoders on the CPU changes nothing.
    let plain = load(DType::F32, TextPlacement::Device);
    let placed = load(DType::F32, TextPlacement::Cpu);
    let reference = image(&plain);
    assert_eq!(values(&image(&placed)), values(&reference), "f32 model, encoders on the CPU");

    // A model in f16: its encoders stay f32 on the CPU, and the embeddings it gets are the f32
    // encoders' cast to f16, bit for bit (diffusers' `prompt_embeds.to(dtype)`).
    let half = load(DType::F16, TextPlacement::Cpu);
    assert!(half.text.device().is_cpu());
    assert_eq!(half.text_placement, TextPlacement::Cpu);
    let want = encode_prompts_with(&plain, PROMPT, None, false, None).unwrap().positive;
    let got = encode_prompts_with(&half, PROMPT, None, false, None).unwrap().positive;
    assert_eq!(got.hidden.dtype(), DType::F16);
    assert_eq!(values(&got.hidden), values(&want.hidden.to_dtype(DType::F16).unwrap()));
    let (got_pooled, want_pooled) = (got.pooled.unwrap(), want.pooled.unwrap());
    assert_eq!(values(&got_pooled), values(&want_pooled.to_dtype(DType::F16).unwrap()));

    // Its image is close to the f32 model's (printed beside the all-f16 model's).
    let p_placed = psnr(&image(&half), &reference);
    let p_half = psnr(&image(&load(DType::F16, TextPlacement::Device)), &reference);
    println!("f16 model vs f32: encoders f32 on the CPU {p_placed:.1} dB, encoders f16 {p_half:.1} dB");
    assert!(p_placed >= 30.0, "PSNR {p_placed:.1} dB");

    assert!("gpu".parse::<TextPlacement>().unwrap_err().to_string().contains("`device` or `cpu`"));
}

#[test]
fn a_job_records_where_its_encoders_ran_and_replays_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let options = JobOptions {
        dtype: Some(DType::F16),
        text_encoders: TextPlacement::Cpu,
        ..JobOptions::new(Device::Cpu)
    };
    let pool = std::sync::Arc::new(kiln_core::jobs::pool::ModelPool::new(None));
    let engine = Engine::new(Project::open(tmp.path()).unwrap(), options, pool);
    let out = tmp.path().join("placed.png");
    let spec = JobSpec::Generate(GenerateSpec {
        model: Some(model_dir().display().to_string()),
        prompt: PROMPT.into(),
        width: Some(64),
        height: Some(64),
        steps: Some(2),
        seed: Some(11),
        out: Some(out.clone()),
        ..Default::default()
    });
    engine.run(&spec, &RunContext::default(), &mut NullSink).unwrap();
    let chunks = kiln_core::image::png_meta::read_png_text(&out).unwrap();
    let record = kiln_core::pipeline::metadata::record_from_chunks(&chunks).unwrap();
    assert_eq!(record.text_encoders, Some(TextPlacement::Cpu));
    assert_eq!(record.dtype, "f16");

    // Replayed by an engine whose own setting is the default: the record decides.
    let options = JobOptions { text_encoders: TextPlacement::Device, ..JobOptions::new(Device::Cpu) };
    let pool = std::sync::Arc::new(kiln_core::jobs::pool::ModelPool::new(None));
    let engine = Engine::new(Project::open(tmp.path()).unwrap(), options, pool);
    let replay = JobSpec::Replay(ReplaySpec {
        asset: ImageRef::File(out),
        out: Some(tmp.path().join("replayed.png")),
        vae_tiling: None,
        vae_tile: None,
        max_sequence_length: None,
    });
    let result = engine.run(&replay, &RunContext::default(), &mut NullSink).unwrap();
    assert_eq!(result.detail["bit_exact"], true, "{}", result.detail);
}
