//! FLUX.1 parity with diffusers on the tiny random-weight pipelines of tests/fixtures/flux
//! (made by make.py there): dev-style (guidance embedding, dynamic shift) and schnell-style
//! (no guidance embedding, static shift), each loaded from its diffusers folder with sharded
//! transformer and T5 weights. Checks T5 hidden states and CLIP pooled embeddings (1e-4),
//! images (PSNR >= 40 dB) from given latents, from a seed, img2img from a seed and true CFG
//! (FluxPipeline's `true_cfg_scale` with a negative prompt), the T5/CLIP token ids of awkward
//! prompts, and text encoders released after encoding (same image, loaded again on demand).

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::models::clip_tokenizer::ClipTokenizer;
use kiln_core::models::family::Family;
use kiln_core::models::t5::tokenizer::T5Tokenizer;
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
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    seed: Option<u64>,
    latents: Option<String>,
    init_image: Option<String>,
    strength: Option<f64>,
    max_sequence_length: Option<usize>,
    /// FluxPipeline's true CFG: `negative_prompt` with `true_cfg_scale`.
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    true_cfg_scale: Option<f64>,
    output: String,
    t5_hidden: String,
    clip_pooled: String,
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flux").join(name)
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
    assert_eq!(model.family(), Family::Flux);
    let mut failures = Vec::new();
    for case in &cases {
        let enc = encode_prompts_with(&model, &case.prompt, None, false, case.max_sequence_length).unwrap();
        for (file, got, what) in [
            (&case.t5_hidden, Some(&enc.positive.hidden), "T5 hidden states"),
            (&case.clip_pooled, enc.positive.pooled.as_ref(), "CLIP pooled"),
        ] {
            let want = Tensor::read_npy(dir.join(file)).unwrap();
            let got = got.unwrap().to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(got.dims(), want.dims(), "{}: {what} shape", case.name);
            let d = max_abs_diff(&got, &want);
            println!("{name}/{} {what}: max abs diff {d:.2e}", case.name);
            if d > embed_tol {
                failures.push(format!("{}: {what} differs by {d}", case.name));
            }
        }

        let request = GenerateRequest {
            negative_prompt: case.negative_prompt.clone(),
            true_cfg: case.true_cfg_scale,
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
        println!("{name}/{}: PSNR {p:.1} dB", case.name);
        if p < min_psnr {
            failures.push(format!("{}: PSNR {p:.1} dB < {min_psnr}", case.name));
        }
    }
    assert!(failures.is_empty(), "{name}: {failures:#?}");
}

#[test]
fn flux_dev_matches_diffusers() {
    run_fixture("dev");
}

#[test]
fn flux_schnell_matches_diffusers() {
    run_fixture("schnell");
}

#[derive(Deserialize)]
struct TokenizerCase {
    prompt: String,
    t5_max_length: usize,
    t5_ids: Vec<u32>,
    clip_ids: Vec<u32>,
}

#[test]
fn tokenizers_match_transformers_on_awkward_prompts() {
    let dir = fixture_dir("dev");
    let cases: Vec<TokenizerCase> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    let t5 = T5Tokenizer::from_dir(&dir.join("model/tokenizer_2")).unwrap();
    let clip = ClipTokenizer::from_dir(&dir.join("model/tokenizer")).unwrap();
    for case in &cases {
        let got = t5.encode_padded(&case.prompt, case.t5_max_length).unwrap().ids;
        assert_eq!(got, case.t5_ids, "T5 ids of {:?}", case.prompt);
        let got = clip.encode_padded(&case.prompt).unwrap().ids;
        assert_eq!(got, case.clip_ids, "CLIP ids of {:?}", case.prompt);
    }
    println!("{} prompts: T5 and CLIP ids equal to transformers'", cases.len());
}

#[test]
fn flux_bad_inputs_are_clear_errors() {
    let dir = fixture_dir("schnell");
    let model = LoadedModel::load(ModelSource::Folder(dir.join("model")), &Device::Cpu, DType::F32).unwrap();
    let base = GenerateRequest::txt2img("a fox", (96, 64), 2, 0.0, 1);
    // 72 is a multiple of the VAE factor 8 but not of 16 (8 x the 2x2 latent patch).
    let err = generate(&model, &GenerateRequest { width: 72, ..base.clone() }, &mut NoProgress).unwrap_err();
    assert!(err.to_string().contains("multiple of 16"), "{err}");
    let err = generate(
        &model,
        &GenerateRequest { max_sequence_length: Some(513), ..base.clone() },
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("512"), "{err}");
    let err = generate(
        &model,
        &GenerateRequest { scheduler: Some("euler".parse().unwrap()), ..base },
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("flow-euler"), "{err}");
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

/// Loads a copy of the schnell model after `damage` changed it, returning the error text.
fn load_error(damage: impl FnOnce(&Path)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture_dir("schnell").join("model"), &model);
    damage(&model);
    match LoadedModel::load(ModelSource::Folder(model), &Device::Cpu, DType::F32) {
        Ok(_) => panic!("the damaged model loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn flux_folder_damage_is_named() {
    // A missing shard that the index lists.
    let err = load_error(|m| {
        std::fs::remove_file(m.join("transformer/diffusion_pytorch_model-00002-of-00003.safetensors"))
            .unwrap()
    });
    assert!(
        err.contains("diffusion_pytorch_model-00002-of-00003.safetensors") && err.contains("index"),
        "{err}"
    );
    // A config that does not match the weights: the tensor, expected and found shapes.
    let err = load_error(|m| {
        let path = m.join("transformer/config.json");
        let cfg = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"joint_attention_dim\": 32", "\"joint_attention_dim\": 48");
        std::fs::write(path, cfg).unwrap();
    });
    assert!(err.contains("context_embedder.weight") && err.contains("48") && err.contains("32"), "{err}");
    // The T5 tokenizer file is missing.
    let err = load_error(|m| std::fs::remove_file(m.join("tokenizer_2/tokenizer.json")).unwrap());
    assert!(err.contains("T5 tokenizer") && err.contains("tokenizer.json"), "{err}");
}

#[test]
fn flux_warns_on_ignored_guidance_and_truncated_prompts() {
    let dir = fixture_dir("schnell");
    let model = LoadedModel::load(ModelSource::Folder(dir.join("model")), &Device::Cpu, DType::F32).unwrap();
    let request = GenerateRequest {
        max_sequence_length: Some(6),
        ..GenerateRequest::txt2img("a photo of an astronaut riding a horse on the moon", (32, 32), 1, 3.5, 1)
    };
    let out = generate(&model, &request, &mut NoProgress).unwrap();
    let all = out.warnings.join("\n");
    assert!(all.contains("guidance 3.5 is ignored"), "{all}");
    assert!(all.contains("longer than 6 T5 tokens") && all.contains("moon"), "{all}");
    println!("{all}");
}

/// The path `kiln generate --model DIR` takes (a generate job through the engine, defaults from
/// the family registry), written as a PNG: the 8-bit image matches diffusers' float reference.
#[test]
fn flux_generate_job_from_a_folder_writes_the_reference_image() {
    use kiln_core::jobs::spec::GenerateSpec;
    use kiln_core::jobs::{Engine, JobSpec, NullSink, RunContext};
    use kiln_core::library::Project;
    use kiln_core::workflow::JobOptions;

    let dir = fixture_dir("dev");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("flux.png");
    let options = JobOptions::new(Device::Cpu);
    let pool = std::sync::Arc::new(kiln_core::jobs::pool::ModelPool::new(None));
    let engine = Engine::new(Project::open(tmp.path()).unwrap(), options, pool);
    // Guidance left out: FLUX.1-dev's default 3.5, as the reference case used.
    let spec = JobSpec::Generate(GenerateSpec {
        model: Some(dir.join("model").display().to_string()),
        prompt: "a photo of an astronaut riding a horse on the moon".into(),
        width: Some(96),
        height: Some(64),
        steps: Some(4),
        seed: Some(42),
        out: Some(out.clone()),
        ..Default::default()
    });
    let result = engine.run(&spec, &RunContext::default(), &mut NullSink).unwrap();
    assert!(result.warnings.is_empty(), "{:?}", result.warnings);
    let png = kiln_core::image::load_rgb(&out).unwrap();
    let got: Vec<f32> = png.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let got = Tensor::from_vec(got, (64, 96, 3), &Device::Cpu).unwrap();
    let want = Tensor::read_npy(dir.join("seed42.npy")).unwrap().reshape((64, 96, 3)).unwrap();
    let p = psnr(&got, &want);
    println!("generate job (8-bit PNG) vs diffusers seed42: PSNR {p:.1} dB");
    assert!(p >= 40.0, "PSNR {p:.1} dB");
}

/// `offload_text_encoders`: the encoders are released after encoding, the image is the same,
/// and the next job that encodes loads them again; through the job layer the pooled model no
/// longer holds them after the job.
#[test]
fn flux_offloaded_text_encoders_give_the_same_image_and_reload() {
    let dir = fixture_dir("schnell");
    let model = LoadedModel::load(ModelSource::Folder(dir.join("model")), &Device::Cpu, DType::F32).unwrap();
    let request = GenerateRequest {
        max_sequence_length: Some(256),
        ..GenerateRequest::txt2img("a photo of an astronaut riding a horse on the moon", (96, 64), 2, 0.0, 5)
    };
    let run = |r: &GenerateRequest| generate(&model, r, &mut NoProgress).unwrap().images.remove(0).pixels;
    let kept = run(&request);
    assert!(model.text.is_resident());
    let offload = GenerateRequest { offload_text_encoders: true, ..request.clone() };
    let released = run(&offload);
    assert!(!model.text.is_resident(), "the encoders are still resident after an offloading job");
    assert_eq!(model.text.loads(), 1);
    let again = run(&request);
    assert!(model.text.is_resident());
    assert_eq!(model.text.loads(), 2, "the next job did not load the encoders again");
    for (what, img) in [("released", &released), ("reloaded", &again)] {
        assert_eq!(max_abs_diff(&kept, img), 0.0, "{what}: image differs");
    }

    // The job layer: the pooled model no longer holds the encoders after an offloading job.
    use kiln_core::jobs::spec::GenerateSpec;
    use kiln_core::jobs::{Engine, JobSpec, NullSink, RunContext};
    let tmp = tempfile::tempdir().unwrap();
    let options = kiln_core::workflow::JobOptions::new(Device::Cpu);
    let pool = std::sync::Arc::new(kiln_core::jobs::pool::ModelPool::new(None));
    let engine = Engine::new(kiln_core::library::Project::open(tmp.path()).unwrap(), options, pool);
    let folder = dir.join("model").display().to_string();
    let spec = JobSpec::Generate(GenerateSpec {
        model: Some(folder.clone()),
        prompt: "a fox".into(),
        width: Some(32),
        height: Some(32),
        steps: Some(1),
        seed: Some(1),
        out: Some(tmp.path().join("fox.png")),
        offload_text_encoders: Some(true),
        ..Default::default()
    });
    engine.run(&spec, &RunContext::default(), &mut NullSink).unwrap();
    let (pooled, _, _) = engine.diffusion_model(None, Some(&folder), 1).unwrap();
    assert!(!pooled.text.is_resident(), "the pooled model still holds its text encoders");
    println!("text encoders: released after encoding, reloaded by the next job, same pixels");
}
