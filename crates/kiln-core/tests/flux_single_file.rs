//! Single-file FLUX.1 transformer checkpoints on the tiny dev fixture: `dev/flux1-dev-tiny.safetensors`
//! is the fixture's transformer in BFL's layout, written by tests/fixtures/flux/make_dev_extras.py
//! and loaded back to the exact folder state dict by diffusers' own `from_single_file` there.
//! The single-file model must give the folder model's image bit for bit (and so diffusers'
//! reference at >= 40 dB), a ComfyUI-style copy too, and every way a file can be wrong is an
//! error naming the tensor or config at fault.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::{LoadedModel, ModelParts};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SINGLE_FILE: &str = "flux1-dev-tiny.safetensors";

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(path)
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

fn load_single(base: &Path, file: &Path) -> kiln_core::Result<LoadedModel> {
    let parts = ModelParts { denoiser_file: Some(file.to_path_buf()), ..Default::default() };
    LoadedModel::load_parts(ModelSource::Folder(base.to_path_buf()), parts, &Device::Cpu, DType::F32)
}

/// The dev fixture's `latents_g3.5` case (diffusers' reference `dev/latents_g3.5.npy`).
fn request(steps: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on the moon".into(),
        negative_prompt: None,
        width: 96,
        height: 64,
        steps,
        guidance: 3.5,
        true_cfg: None,
        offload_text_encoders: false,
        scheduler: None,
        seeds: vec![0],
        init_latents: Some(Tensor::read_npy(fixture("flux/dev/latents.npy")).unwrap()),
        init_image: None,
        strength: 1.0,
        max_batch: 1,
        vae_tiling: Default::default(),
        max_sequence_length: None,
    }
}

fn image(model: &LoadedModel, req: &GenerateRequest) -> Tensor {
    generate(model, req, &mut NoProgress).unwrap().images.remove(0).pixels
}

/// The BFL file's tensors, renamed and extended by `edit`, written to `dir/name`.
fn rewrite(dir: &Path, name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors =
        candle_core::safetensors::load(fixture("flux/dev").join(SINGLE_FILE), &Device::Cpu).unwrap();
    edit(&mut tensors);
    let path = dir.join(name);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn single_file_transformer_gives_the_folder_models_image() {
    let dev = fixture("flux/dev");
    let folder = LoadedModel::load(ModelSource::Folder(dev.join("model")), &Device::Cpu, DType::F32).unwrap();
    let single = load_single(&dev.join("model"), &dev.join(SINGLE_FILE)).unwrap();

    let req = request(4);
    let from_folder = image(&folder, &req);
    let from_file = image(&single, &req);
    let diff =
        (&from_folder - &from_file).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let want = Tensor::read_npy(dev.join("latents_g3.5.npy")).unwrap().reshape((64, 96, 3)).unwrap();
    let p = psnr(&from_file, &want);
    println!("BFL single file vs folder: max abs diff {diff:e}; vs diffusers latents_g3.5: PSNR {p:.1} dB");
    assert_eq!(diff, 0.0, "the single-file model differs from the folder model");
    assert!(p >= 40.0, "PSNR {p:.1} dB");

    // The weights record names the file and its sha256, in place of the folder's shards.
    let transformer: Vec<_> = single.weights.iter().filter(|w| w.component == "transformer").collect();
    let sha = kiln_core::loaders::weights::sha256_file(&dev.join(SINGLE_FILE)).unwrap();
    assert_eq!(transformer.len(), 1, "{transformer:?}");
    assert_eq!((transformer[0].file.as_str(), transformer[0].sha256.as_str()), (SINGLE_FILE, sha.as_str()));

    // ComfyUI: the same names under `model.diffusion_model.`, next to VAE and text-encoder tensors.
    let tmp = tempfile::tempdir().unwrap();
    let comfy = rewrite(tmp.path(), "comfy.safetensors", |t| {
        *t = t.drain().map(|(k, v)| (format!("model.diffusion_model.{k}"), v)).collect();
        t.insert(
            "first_stage_model.decoder.conv_out.weight".into(),
            Tensor::zeros((3, 8, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight".into(),
            Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let comfy = load_single(&dev.join("model"), &comfy).unwrap();
    let req = request(1);
    let diff = (image(&folder, &req) - image(&comfy, &req)).unwrap().abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    println!("ComfyUI-prefixed single file vs folder (1 step): max abs diff {diff:e}");
    assert_eq!(diff, 0.0);
}

/// A LoRA merges into a single-file transformer exactly as into the folder's: the kohya FLUX
/// fixture LoRA (BFL names, fused q/k/v split over diffusers' projections) gives the folder
/// model's image bit for bit, and switching back to no LoRA gives the plain single-file image.
#[test]
fn loras_merge_into_a_single_file_transformer_as_into_the_folders() {
    use kiln_core::loaders::lora::LoraRequest;
    let dev = fixture("flux/dev");
    let file = fixture("lora/flux_kohya.safetensors");
    let loras = vec![LoraRequest { name: "flux_kohya".into(), path: file, weight: 0.8 }];
    let source = || ModelSource::Folder(dev.join("model"));
    let folder = LoadedModel::load_parts(
        source(),
        ModelParts { loras: loras.clone(), ..Default::default() },
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let parts = ModelParts { denoiser_file: Some(dev.join(SINGLE_FILE)), loras, ..Default::default() };
    let single = LoadedModel::load_parts(source(), parts, &Device::Cpu, DType::F32).unwrap();
    assert!(single.load_warnings.is_empty(), "{:?}", single.load_warnings);
    assert_eq!(single.loras.len(), 1);
    let req = request(2);
    let with_lora = image(&single, &req);
    let diff = (image(&folder, &req) - &with_lora).unwrap().abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    println!("single file + LoRA vs folder + LoRA: max abs diff {diff:e}");
    assert_eq!(diff, 0.0, "the LoRA merges differently into the single file");

    let plain = image(&load_single(&dev.join("model"), &dev.join(SINGLE_FILE)).unwrap(), &req);
    let p = psnr(&plain, &with_lora);
    println!("single file with vs without the LoRA: PSNR {p:.1} dB");
    assert!(p < 35.0, "the LoRA hardly changes the image ({p:.1} dB)");
    let switched = image(&single.with_loras(&[]).unwrap(), &req);
    assert_eq!(
        (switched - plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );
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

/// A copy of the dev folder with its transformer config edited.
fn base_with(dir: &Path, from: &str, to: &str) -> PathBuf {
    let base = dir.join("base");
    copy_dir(&fixture("flux/dev/model"), &base);
    let path = base.join("transformer/config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(path, text.replace(from, to)).unwrap();
    base
}

fn err(result: kiln_core::Result<LoadedModel>) -> String {
    match result {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn single_file_problems_are_named() {
    let dev = fixture("flux/dev");
    let base = dev.join("model");
    let file = dev.join(SINGLE_FILE);
    let tmp = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let mut check = |what: &str, e: String, needles: &[&str]| {
        assert!(needles.iter().all(|n| e.contains(n)), "{what}: {e}");
        report.push(format!("{what}: {e}"));
    };

    // Not FLUX: an SD UNet file names its first tensor.
    let unet = fixture("pipelines/sd1/model/unet/diffusion_pytorch_model.safetensors");
    check(
        "not FLUX",
        err(load_single(&base, &unet)),
        &["not a FLUX.1 transformer checkpoint", "first tensor is `"],
    );
    // A missing tensor, expected against found.
    let path = rewrite(tmp.path(), "missing.safetensors", |t| {
        t.remove("single_blocks.1.linear2.bias");
    });
    check(
        "missing",
        err(load_single(&base, &path)),
        &["`single_blocks.1.linear2.bias` is missing", "59 of them"],
    );
    // A tensor FLUX.1 does not have.
    let path = rewrite(tmp.path(), "unknown.safetensors", |t| {
        t.insert(
            "double_blocks.0.img_attn.lora.weight".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    check(
        "unknown",
        err(load_single(&base, &path)),
        &["unexpected tensor `double_blocks.0.img_attn.lora.weight`"],
    );
    // Depth from the base folder's config, checked against the file.
    let deeper = base_with(&tmp.path().join("a"), "\"num_single_layers\": 2", "\"num_single_layers\": 3");
    check("depth", err(load_single(&deeper, &file)), &["2 single-stream blocks", "num_single_layers 3"]);
    // A dev file on a schnell folder.
    check(
        "guidance",
        err(load_single(&fixture("flux/schnell/model"), &file)),
        &["guidance embedding", "guidance_embeds"],
    );
    // Shapes that differ from the folder's config: the BFL tensor, expected and found.
    let wider =
        base_with(&tmp.path().join("b"), "\"joint_attention_dim\": 32", "\"joint_attention_dim\": 48");
    check("shape", err(load_single(&wider, &file)), &["txt_in.weight", "[32, 48]", "[32, 32]"]);
    // A fused q/k/v with the wrong number of rows.
    let path = rewrite(tmp.path(), "fused.safetensors", |t| {
        let qkv = t["double_blocks.0.img_attn.qkv.weight"].narrow(0, 0, 80).unwrap();
        t.insert("double_blocks.0.img_attn.qkv.weight".into(), qkv);
    });
    check(
        "fused rows",
        err(load_single(&base, &path)),
        &["double_blocks.0.img_attn.qkv.weight rows 64..80", "to_v.weight"],
    );
    // A single file on another family's folder.
    check("family", err(load_single(&fixture("pipelines/sd1/model"), &file)), &["FLUX.1 only"]);
    println!("{}", report.join("\n"));
}

/// `kiln generate --model FILE --base DIR`: the job writes diffusers' image and records the
/// file (path and sha256) so the image names its weights.
#[test]
fn single_file_generate_job_records_the_file() {
    use kiln_core::jobs::spec::GenerateSpec;
    use kiln_core::jobs::{Engine, JobSpec, NullSink, RunContext};
    use kiln_core::library::Project;
    use kiln_core::workflow::JobOptions;

    let dev = fixture("flux/dev");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("single.png");
    let options = JobOptions::new(Device::Cpu);
    let pool = std::sync::Arc::new(kiln_core::jobs::pool::ModelPool::new(None));
    let engine = Engine::new(Project::open(tmp.path()).unwrap(), options, pool);
    let spec = |base: Option<PathBuf>| {
        JobSpec::Generate(GenerateSpec {
            model: Some(dev.join(SINGLE_FILE).display().to_string()),
            base: base.map(|b| b.display().to_string()),
            prompt: "a photo of an astronaut riding a horse on the moon".into(),
            width: Some(96),
            height: Some(64),
            steps: Some(4),
            seed: Some(42),
            out: Some(out.clone()),
            ..Default::default()
        })
    };
    let e = engine.run(&spec(None), &RunContext::default(), &mut NullSink).unwrap_err().to_string();
    assert!(e.contains("single-file checkpoint") && e.contains("--base"), "{e}");

    engine.run(&spec(Some(dev.join("model"))), &RunContext::default(), &mut NullSink).unwrap();
    let png = kiln_core::image::load_rgb(&out).unwrap();
    let got: Vec<f32> = png.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let got = Tensor::from_vec(got, (64, 96, 3), &Device::Cpu).unwrap();
    let want = Tensor::read_npy(dev.join("seed42.npy")).unwrap().reshape((64, 96, 3)).unwrap();
    let p = psnr(&got, &want);
    println!("generate job from the single file (8-bit PNG) vs diffusers seed42: PSNR {p:.1} dB");
    assert!(p >= 40.0, "PSNR {p:.1} dB");

    let chunks = kiln_core::image::png_meta::read_png_text(&out).unwrap();
    let record = kiln_core::pipeline::metadata::record_from_chunks(&chunks).unwrap();
    let sha = kiln_core::loaders::weights::sha256_file(&dev.join(SINGLE_FILE)).unwrap();
    let single = record.single_file.expect("the record names the single file");
    assert_eq!(single.sha256, sha);
    assert!(single.path.ends_with(SINGLE_FILE), "{}", single.path);
    assert!(record.model.id.ends_with("model"), "{}", record.model.id);
    assert!(record
        .model
        .files
        .iter()
        .any(|w| w.component == "transformer" && w.file == SINGLE_FILE && w.sha256 == sha));

    // A true-CFG image from the single file replays bit-exactly from its record alone (the
    // file found again at its recorded path, the true-CFG scale and negative prompt recorded).
    let cfg_out = tmp.path().join("single-cfg.png");
    let cfg_spec = match spec(Some(dev.join("model"))) {
        JobSpec::Generate(g) => JobSpec::Generate(GenerateSpec {
            negative: Some("blurry, low quality".into()),
            true_cfg: Some(3.0),
            steps: Some(2),
            out: Some(cfg_out.clone()),
            ..g
        }),
        _ => unreachable!(),
    };
    engine.run(&cfg_spec, &RunContext::default(), &mut NullSink).unwrap();
    let chunks = kiln_core::image::png_meta::read_png_text(&cfg_out).unwrap();
    let record = kiln_core::pipeline::metadata::record_from_chunks(&chunks).unwrap();
    assert_eq!(record.true_cfg, Some(3.0));
    let replay = JobSpec::Replay(kiln_core::jobs::spec::ReplaySpec {
        asset: kiln_core::jobs::spec::ImageRef::File(cfg_out.clone()),
        out: Some(tmp.path().join("replayed.png")),
        vae_tiling: None,
        vae_tile: None,
        max_sequence_length: None,
    });
    let result = engine.run(&replay, &RunContext::default(), &mut NullSink).unwrap();
    println!("replay of a true-CFG single-file image: {}", result.detail);
    assert_eq!(result.detail["bit_exact"], true, "{}", result.detail);
}
