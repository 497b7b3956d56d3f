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
            negative_prompt: case.negative_prompt.clone(),
            init_latents: case.latents.as_ref().map(|f| Tensor::read_npy(dir.join(f)).unwrap()),
            init_image: case.init_image.as_ref().map(|f| kiln_core::image::load_rgb(&dir.join(f)).unwrap()),
            strength: case.strength.unwrap_or(1.0),
            max_sequence_length: case.max_sequence_length,
            ..GenerateRequest::txt2img(
                &case.prompt,
                (case.width, case.height),
                case.steps,
                case.guidance,
                case.seed.unwrap_or(0),
            )
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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Loads a copy of the model after `damage` changed it, returning the error text.
fn load_error(damage: impl FnOnce(&Path)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture_dir().join("model"), &model);
    damage(&model);
    match LoadedModel::load(ModelSource::Folder(model), &Device::Cpu, DType::F32) {
        Ok(_) => panic!("the damaged model loaded"),
        Err(e) => e.to_string(),
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn zimage_folder_damage_is_named() {
    // A shard the index lists is missing.
    let err = load_error(|m| {
        std::fs::remove_file(m.join("transformer/diffusion_pytorch_model-00002-of-00004.safetensors"))
            .unwrap()
    });
    assert!(
        err.contains("diffusion_pytorch_model-00002-of-00004.safetensors") && err.contains("index"),
        "{err}"
    );
    let err = load_error(|m| {
        std::fs::remove_file(m.join("text_encoder/model-00003-of-00006.safetensors")).unwrap()
    });
    assert!(err.contains("model-00003-of-00006.safetensors"), "{err}");
    // A transformer config that does not match the weights: tensor, expected and found shapes.
    let err = load_error(|m| {
        edit(&m.join("transformer/config.json"), "\"cap_feat_dim\": 32", "\"cap_feat_dim\": 40")
    });
    assert!(err.contains("cap_embedder.0.weight") && err.contains("40") && err.contains("32"), "{err}");
    // A text encoder config that does not match its shards.
    let err =
        load_error(|m| edit(&m.join("text_encoder/config.json"), "\"head_dim\": 12", "\"head_dim\": 8"));
    assert!(err.contains("layers.0.self_attn.q_proj.weight") && err.contains("[48, 32]"), "{err}");
    // A config kiln cannot run is refused before any weight is read.
    let err =
        load_error(|m| edit(&m.join("transformer/config.json"), "\"qk_norm\": true", "\"qk_norm\": false"));
    assert!(err.contains("qk_norm") && err.contains("config.json"), "{err}");
    // The Qwen tokenizer is missing, or carries no chat template.
    let err = load_error(|m| std::fs::remove_file(m.join("tokenizer/tokenizer.json")).unwrap());
    assert!(err.contains("Qwen tokenizer") && err.contains("tokenizer.json"), "{err}");
    let err = load_error(|m| std::fs::remove_file(m.join("tokenizer/chat_template.jinja")).unwrap());
    assert!(err.contains("chat template"), "{err}");
}

fn request(width: usize, height: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on the moon".into(),
        negative_prompt: None,
        width,
        height,
        steps: 1,
        guidance: 0.0,
        true_cfg: None,
        offload_text_encoders: false,
        scheduler: None,
        seeds: vec![1],
        init_latents: None,
        init_image: None,
        strength: 1.0,
        max_batch: 1,
        vae_tiling: Default::default(),
        max_sequence_length: None,
    }
}

#[test]
fn zimage_refuses_bad_sizes_and_budgets_and_warns_on_truncation() {
    let model = LoadedModel::load(ModelSource::Folder(fixture_dir().join("model")), &Device::Cpu, DType::F32)
        .unwrap();
    // Sides must be multiples of 16 (the VAE factor 8 times the 2x2 patches).
    let err = generate(&model, &request(72, 64), &mut NoProgress).unwrap_err().to_string();
    assert!(err.contains("72") && err.contains("16"), "{err}");
    // The token budget is bounded and positive.
    let mut r = request(32, 32);
    r.max_sequence_length = Some(0);
    assert!(generate(&model, &r, &mut NoProgress).is_err());
    r.max_sequence_length = Some(100_000);
    let err = generate(&model, &r, &mut NoProgress).unwrap_err().to_string();
    assert!(err.contains("max-sequence-length"), "{err}");
    // A budget shorter than the templated prompt truncates it, with a warning naming the rest.
    r.max_sequence_length = Some(8);
    let out = generate(&model, &r, &mut NoProgress).unwrap();
    let all = out.warnings.join("\n");
    assert!(all.contains("longer than 8 Qwen tokens") && all.contains("moon"), "{all}");
}

/// The path `kiln generate --model DIR` takes (a generate job through the engine, defaults from
/// the family registry), written as a PNG: the 8-bit image matches diffusers' float reference.
#[test]
fn zimage_generate_job_from_a_folder_writes_the_reference_image() {
    use kiln_core::jobs::spec::GenerateSpec;
    use kiln_core::jobs::{Engine, JobSpec, NullSink, RunContext};
    use kiln_core::library::Project;
    use kiln_core::workflow::JobOptions;

    let dir = fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("zimage.png");
    let options = JobOptions::new(Device::Cpu);
    let pool = std::sync::Arc::new(kiln_core::jobs::pool::ModelPool::new(None));
    let engine = Engine::new(Project::open(tmp.path()).unwrap(), options, pool);
    let spec = JobSpec::Generate(GenerateSpec {
        model: Some(dir.join("model").display().to_string()),
        prompt: "a photo of an astronaut riding a horse on the moon".into(),
        width: Some(96),
        height: Some(64),
        steps: Some(4),
        guidance: Some(0.0),
        seed: Some(42),
        max_sequence_length: Some(20),
        out: Some(out.clone()),
        ..Default::default()
    });
    let result = engine.run(&spec, &RunContext::default(), &mut NullSink).unwrap();
    let png = kiln_core::image::load_rgb(&out).unwrap();
    let got: Vec<f32> = png.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let got = Tensor::from_vec(got, (64, 96, 3), &Device::Cpu).unwrap();
    let want = Tensor::read_npy(dir.join("seed42_msl20.npy")).unwrap().reshape((64, 96, 3)).unwrap();
    let p = psnr(&got, &want);
    println!(
        "generate job (8-bit PNG) vs diffusers seed42_msl20: PSNR {p:.1} dB; warnings {:?}",
        result.warnings
    );
    assert!(p >= 40.0, "PSNR {p:.1} dB");
}
