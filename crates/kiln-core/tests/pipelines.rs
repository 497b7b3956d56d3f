//! End-to-end parity with diffusers on tiny random-weight pipelines made by diffusers itself
//! (tests/fixtures/pipelines/make.py): same inputs → PSNR ≥ 40 dB against diffusers' images,
//! text embeddings within 1e-4.
//!
//! The same tests run on a GPU build: `KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=f16` (see
//! docs/gpu.md); in f16/bf16 the bars are PSNR ≥ 30 dB and embeddings within 2e-2 / 1e-1.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::LoadedModel;
use kiln_core::pipeline::text::encode_prompts;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug)]
struct Case {
    name: String,
    mode: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    scheduler: Option<String>,
    seed: Option<u64>,
    latents: Option<String>,
    init_image: Option<String>,
    strength: Option<f64>,
    output: String,
    prompt_embeds: Option<String>,
    negative_prompt_embeds: Option<String>,
    pooled_prompt_embeds: Option<String>,
    negative_pooled_prompt_embeds: Option<String>,
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines").join(name)
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).and_then(|d| d.sqr()).and_then(|d| d.mean_all()).and_then(|m| m.to_scalar::<f32>());
    let mse = mse.unwrap() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|m| m.to_scalar::<f32>()).unwrap()
}

fn run_fixture(name: &str) {
    let dir = fixture_dir(name);
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let (device, dtype) = kiln_core::device::test_target().unwrap();
    let (min_psnr, embed_tol) = match dtype {
        DType::F32 => (40.0, 1e-4),
        DType::F16 => (30.0, 2e-2),
        _ => (30.0, 1e-1),
    };
    println!("{name}: {} {}", kiln_core::device::name(&device), kiln_core::device::dtype_name(dtype));
    let model = LoadedModel::load(ModelSource::Folder(dir.join("model")), &device, dtype).unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let cfg = case.guidance > 1.0;
        // Text embeddings.
        let enc = encode_prompts(&model, &case.prompt, case.negative_prompt.as_deref(), cfg).unwrap();
        let mut check_embeds = |file: &Option<String>, got: Option<&Tensor>, what: &str| {
            if let (Some(file), Some(got)) = (file, got) {
                let want = Tensor::read_npy(dir.join(file)).unwrap();
                let got = got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                let got = got.reshape(want.shape()).unwrap();
                let d = max_abs_diff(&got, &want);
                println!("{name}/{} {what}: max abs diff {d:.2e}", case.name);
                if d > embed_tol {
                    failures.push(format!("{}: {what} differs by {d}", case.name));
                }
            }
        };
        check_embeds(&case.prompt_embeds, Some(&enc.positive.hidden), "prompt_embeds");
        check_embeds(&case.pooled_prompt_embeds, enc.positive.pooled.as_ref(), "pooled_prompt_embeds");
        if let Some(neg) = &enc.negative {
            check_embeds(&case.negative_prompt_embeds, Some(&neg.hidden), "negative_prompt_embeds");
            check_embeds(
                &case.negative_pooled_prompt_embeds,
                neg.pooled.as_ref(),
                "negative_pooled_prompt_embeds",
            );
        }

        // Images.
        let request = GenerateRequest {
            negative_prompt: case.negative_prompt.clone(),
            scheduler: case.scheduler.as_deref().map(|s| s.parse().unwrap()),
            init_latents: case.latents.as_ref().map(|f| Tensor::read_npy(dir.join(f)).unwrap()),
            init_image: case.init_image.as_ref().map(|f| kiln_core::image::load_rgb(&dir.join(f)).unwrap()),
            strength: case.strength.unwrap_or(1.0),
            ..GenerateRequest::txt2img(
                &case.prompt,
                (case.width, case.height),
                case.steps,
                case.guidance,
                case.seed.unwrap_or(0),
            )
        };
        assert_eq!(
            case.mode == "img2img",
            request.init_image.is_some(),
            "{}: mode/init_image mismatch",
            case.name
        );
        let out = match generate(&model, &request, &mut NoProgress) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let want = Tensor::read_npy(dir.join(&case.output)).unwrap();
        let want = want.reshape(out.images[0].pixels.shape()).unwrap();
        let p = psnr(&out.images[0].pixels, &want);
        println!("{name}/{}: PSNR {p:.1} dB", case.name);
        if p < min_psnr {
            failures.push(format!("{}: PSNR {p:.1} dB < {min_psnr}", case.name));
        }
    }
    assert!(failures.is_empty(), "{name}: {failures:#?}");
}

#[test]
fn sd1_matches_diffusers() {
    run_fixture("sd1");
}

#[test]
fn sd2_v_prediction_matches_diffusers() {
    run_fixture("sd2v");
}

#[test]
fn sdxl_matches_diffusers() {
    run_fixture("sdxl");
}
