//! Z-Image parity with diffusers on the tiny random-weight pipeline of tests/fixtures/zimage
//! (made by make.py there): chat-templated Qwen token ids of awkward prompts, Qwen3
//! `hidden_states[-2]` (1e-4), and images (PSNR >= 40 dB) from given latents, from a seed and
//! img2img from a seed, with and without classifier-free guidance.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::diffusers::weight_files_in;
use kiln_core::loaders::hub::ModelSource;
use kiln_core::loaders::weights::open_safetensors;
use kiln_core::models::family::Family;
use kiln_core::models::qwen3::tokenizer::QwenTokenizer;
use kiln_core::models::qwen3::{Qwen3Config, Qwen3Encoder};
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::LoadedModel;
use kiln_core::pipeline::text::encode_prompts_with;
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
    seed: Option<u64>,
    latents: Option<String>,
    init_image: Option<String>,
    strength: Option<f64>,
    max_sequence_length: Option<usize>,
    output: String,
    qwen_hidden: String,
    qwen_hidden_negative: Option<String>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/zimage/turbo")
}

fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|m| m.to_scalar::<f32>()).unwrap()
}

#[derive(Deserialize)]
struct TokenizerCase {
    prompt: String,
    templated: String,
    max_length: usize,
    ids: Vec<u32>,
}

#[test]
fn qwen_tokenizer_matches_transformers_with_chat_template() {
    let dir = fixture_dir();
    let tok = QwenTokenizer::from_dir(&dir.join("model/tokenizer")).unwrap();
    let cases: Vec<TokenizerCase> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for c in &cases {
        assert_eq!(QwenTokenizer::apply_chat_template(&c.prompt), c.templated, "{:?}: template", c.prompt);
        let got = tok.encode_prompt(&c.prompt, c.max_length).unwrap();
        assert_eq!(got.ids, c.ids, "{:?}: ids", c.prompt);
    }
}

/// Loads the fixture's Qwen3 encoder directly (sharded weights through the index file).
fn encoder(device: &Device, dtype: DType) -> (QwenTokenizer, Qwen3Encoder) {
    let model = fixture_dir().join("model");
    let tok = QwenTokenizer::from_dir(&model.join("tokenizer")).unwrap();
    let cfg = Qwen3Config::from_file(&model.join("text_encoder/config.json")).unwrap();
    let files = weight_files_in(&model.join("text_encoder"), false).unwrap();
    assert!(files.len() > 1, "the fixture's text encoder is sharded");
    let vb = open_safetensors(&files, dtype, device).unwrap();
    (tok, Qwen3Encoder::new(&cfg, vb).unwrap())
}

#[test]
fn qwen3_penultimate_hidden_states_match_transformers() {
    let dir = fixture_dir();
    let (device, dtype) = kiln_core::device::test_target().unwrap();
    let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
    let (tok, enc) = encoder(&device, dtype);
    let mut worst = 0f32;
    for case in cases() {
        let msl = case.max_sequence_length.unwrap_or(512);
        let mut texts = vec![(case.prompt.clone(), case.qwen_hidden.clone())];
        if let Some(neg) = &case.qwen_hidden_negative {
            texts.push((case.negative_prompt.clone().unwrap_or_default(), neg.clone()));
        }
        for (text, file) in texts {
            let ids = tok.encode_prompt(&text, msl).unwrap().ids;
            let n = ids.len();
            let ids = Tensor::from_vec(ids, (1, n), &device).unwrap();
            let got = enc.forward_penultimate(&ids).unwrap().squeeze(0).unwrap();
            let got = got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let want = Tensor::read_npy(dir.join(&file)).unwrap();
            assert_eq!(got.dims(), want.dims(), "{}: {text:?} shape", case.name);
            let d = max_abs_diff(&got, &want);
            println!("{} {text:?}: max abs diff {d:.2e}", case.name);
            worst = worst.max(d);
        }
    }
    assert!(worst <= tol, "Qwen3 hidden states differ by {worst} (> {tol})");
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

#[test]
fn zimage_pipeline_matches_diffusers() {
    let dir = fixture_dir();
    let (device, dtype) = kiln_core::device::test_target().unwrap();
    let (min_psnr, embed_tol) = match dtype {
        DType::F32 => (40.0, 1e-4),
        DType::F16 => (30.0, 5e-2),
        _ => (30.0, 2e-1),
    };
    println!("zimage: {} {}", kiln_core::device::name(&device), kiln_core::device::dtype_name(dtype));
    let model = LoadedModel::load(ModelSource::Folder(dir.join("model")), &device, dtype).unwrap();
    assert_eq!(model.family(), Family::ZImage);
    let mut failures = Vec::new();
    for case in cases() {
        // Through the pipeline's own prompt encoding (chat template, budget, negative rule).
        let cfg = model.classifier_free(case.guidance);
        assert_eq!(cfg, case.guidance > 0.0, "{}: CFG whenever guidance > 0", case.name);
        let enc = encode_prompts_with(
            &model,
            &case.prompt,
            case.negative_prompt.as_deref(),
            cfg,
            case.max_sequence_length,
        )
        .unwrap();
        let mut pairs = vec![(&case.qwen_hidden, Some(&enc.positive.hidden), "Qwen3 hidden states")];
        if let Some(neg) = &case.qwen_hidden_negative {
            pairs.push((neg, enc.negative.as_ref().map(|n| &n.hidden), "negative Qwen3 hidden states"));
        }
        for (file, got, what) in pairs {
            let want = Tensor::read_npy(dir.join(file)).unwrap();
            let got = got.unwrap().squeeze(0).unwrap().to_device(&Device::Cpu).unwrap();
            let got = got.to_dtype(DType::F32).unwrap();
            assert_eq!(got.dims(), want.dims(), "{}: {what} shape", case.name);
            let d = max_abs_diff(&got, &want);
            println!("{} {what}: max abs diff {d:.2e}", case.name);
            if d > embed_tol {
                failures.push(format!("{}: {what} differ by {d}", case.name));
            }
        }

        let request = GenerateRequest {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            width: case.width,
            height: case.height,
            steps: case.steps,
            guidance: case.guidance,
            scheduler: None,
            seeds: vec![case.seed.unwrap_or(0)],
            init_latents: case.latents.as_ref().map(|f| Tensor::read_npy(dir.join(f)).unwrap()),
            init_image: case.init_image.as_ref().map(|f| kiln_core::image::load_rgb(&dir.join(f)).unwrap()),
            strength: case.strength.unwrap_or(1.0),
            max_batch: 1,
            vae_tiling: Default::default(),
            max_sequence_length: case.max_sequence_length,
        };
        assert_eq!(case.mode == "img2img", request.init_image.is_some(), "{}: mode", case.name);
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
        println!("{}: PSNR {p:.1} dB", case.name);
        if p < min_psnr {
            failures.push(format!("{}: PSNR {p:.1} dB < {min_psnr}", case.name));
        }
    }
    assert!(failures.is_empty(), "zimage: {failures:#?}");
}
