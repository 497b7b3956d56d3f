//! Z-Image parity with diffusers on the tiny random-weight pipeline of tests/fixtures/zimage
//! (made by make.py there): chat-templated Qwen token ids of awkward prompts, Qwen3
//! `hidden_states[-2]` (1e-4), and images (PSNR >= 40 dB) from given latents, from a seed and
//! img2img from a seed, with and without classifier-free guidance.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::diffusers::weight_files_in;
use kiln_core::loaders::weights::open_safetensors;
use kiln_core::models::qwen3::tokenizer::QwenTokenizer;
use kiln_core::models::qwen3::{Qwen3Config, Qwen3Encoder};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug)]
#[allow(dead_code)] // the image fields are read by the pipeline tests
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
