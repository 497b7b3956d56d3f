//! LoRA merging against diffusers' `load_lora_weights` + `set_adapters` + `fuse_lora` on the tiny
//! pipelines (tests/fixtures/lora/make.py): a kohya SD1 LoRA on the UNet and text encoder, a PEFT
//! SDXL LoRA on the UNet and both text encoders, a LyCORIS LoCon on convolutions, and two LoRAs
//! stacked with their own weights (one negative), kohya FLUX with BFL's fused layers, and Z-Image
//! LoRAs in kohya layout and in Z-Image's own names (fused q/k/v). PSNR ≥ 40 dB each. Bad files
//! and LoRAs for another model are refused with errors naming what is wrong.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Tensor};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::loaders::lora::{LoraFile, LoraRequest};
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::LoadedModel;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Case {
    name: String,
    pipeline: String,
    loras: Vec<(String, f64)>,
    prompt: String,
    negative_prompt: Option<String>,
    max_sequence_length: Option<usize>,
    steps: usize,
    guidance: f64,
    latents: String,
    width: usize,
    height: usize,
    output: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn lora_dir() -> PathBuf {
    root().join("lora")
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    10.0 * (1.0 / mse).log10()
}

fn case(name: &str) -> Case {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(lora_dir().join("cases.json")).unwrap()).unwrap();
    cases.into_iter().find(|c| c.name == name).unwrap()
}

/// `pipeline` is the fixture folder under tests/fixtures (`pipelines/sd1`, `flux/schnell`).
fn model_source(pipeline: &str) -> ModelSource {
    ModelSource::Folder(root().join(pipeline).join("model"))
}

fn requests(loras: &[(String, f64)]) -> Vec<LoraRequest> {
    loras.iter().map(|(f, w)| LoraRequest { name: f.clone(), path: lora_dir().join(f), weight: *w }).collect()
}

fn run_case(name: &str) {
    let c = case(name);
    let (device, dtype) = kiln_core::device::test_target().unwrap();
    let min_psnr = if dtype == DType::F32 { 40.0 } else { 30.0 };
    let model =
        LoadedModel::load_with_loras(model_source(&c.pipeline), None, &requests(&c.loras), &device, dtype)
            .unwrap();
    assert!(model.load_warnings.is_empty(), "{:?}", model.load_warnings);
    assert_eq!(model.loras.len(), c.loras.len());
    let out = generate(&model, &request(&c), &mut NoProgress).unwrap();
    let want = Tensor::read_npy(lora_dir().join(&c.output)).unwrap();
    let got = out.images[0].pixels.to_device(&candle_core::Device::Cpu).unwrap();
    let want = want.reshape(got.shape()).unwrap();
    let p = psnr(&got, &want);
    println!("{name}: PSNR {p:.1} dB against diffusers ({} LoRA file(s))", c.loras.len());
    assert!(p >= min_psnr, "{name}: PSNR {p:.1} dB < {min_psnr}");
}

/// The case's generation from its committed latents.
fn request(c: &Case) -> GenerateRequest {
    let latents = root().join(&c.pipeline).join(&c.latents);
    GenerateRequest {
        negative_prompt: c.negative_prompt.clone(),
        init_latents: Some(Tensor::read_npy(latents).unwrap()),
        max_sequence_length: c.max_sequence_length,
        ..GenerateRequest::txt2img(&c.prompt, (c.width, c.height), c.steps, c.guidance, 0)
    }
}

fn pixels(model: &LoadedModel, c: &Case) -> Vec<f32> {
    let out = generate(model, &request(c), &mut NoProgress).unwrap();
    out.images[0]
        .pixels
        .flatten_all()
        .unwrap()
        .to_device(&candle_core::Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn a_warm_model_switches_lora_sets_rereading_only_the_touched_tensors() {
    let (device, dtype) = kiln_core::device::test_target().unwrap();
    let (kohya, locon, stacked) = (case("sd1_kohya"), case("sd1_locon"), case("sd1_stacked"));
    let source = || model_source(&kohya.pipeline);
    let plain = LoadedModel::load_with_loras(source(), None, &[], &device, dtype).unwrap();
    kiln_core::loaders::layout_cache::wait_for_writes();
    // Tensors whose layers come from the layout cache are not read at all (mapped).
    let total = plain.reuse.read + plain.reuse.mapped;
    assert_eq!(plain.reuse.shared, 0);
    // plain → kohya → stacked (kohya + LoCon) → LoCon → plain, each switch from the one before.
    let mut warm = plain;
    for (c, set) in [
        (&kohya, requests(&kohya.loras)),
        (&stacked, requests(&stacked.loras)),
        (&locon, requests(&locon.loras)),
        (&kohya, Vec::new()),
    ] {
        let switched = warm.with_loras(&set).unwrap();
        let fresh = LoadedModel::load_with_loras(source(), None, &set, &device, dtype).unwrap();
        assert_eq!(switched.loras, fresh.loras);
        assert_eq!(switched.weights, fresh.weights);
        // Every tensor is shared, mapped or read; only the ones a LoRA touches (and, with the
        // layout cache, the others of their fused layers) are read.
        let r = switched.reuse;
        assert_eq!(r.shared + r.read + r.mapped, total, "{r:?}");
        if set.is_empty() && fresh.reuse.mapped > 0 {
            // Switched off: the old set's layers are back to their base weights, which the
            // layout cache holds, so nothing is read.
            assert_eq!(r.read, 0, "switched off with the layout cache: {r:?}");
        } else {
            assert!(r.read > 0 && r.read * 4 < total, "{} LoRA(s): {r:?} of {total}", set.len());
        }
        assert_eq!(
            pixels(&switched, c),
            pixels(&fresh, c),
            "switched to {:?}: the image differs from a fresh load's",
            set.iter().map(|l| &l.name).collect::<Vec<_>>()
        );
        println!("switch to {} LoRA(s): {} tensors shared, {} re-read", set.len(), r.shared, r.read);
        warm = switched;
    }
    // Text encoders released after encoding are not kept alive for a later switch: they are
    // read from the files again, and the image still equals a fresh load's.
    let before = warm.reuse;
    assert!(warm.text.release());
    let switched = warm.with_loras(&requests(&kohya.loras)).unwrap();
    assert!(switched.reuse.read > before.read, "{:?} after {before:?}", switched.reuse);
    let fresh =
        LoadedModel::load_with_loras(source(), None, &requests(&kohya.loras), &device, dtype).unwrap();
    assert_eq!(pixels(&switched, &kohya), pixels(&fresh, &kohya));
}

#[test]
fn kohya_sd1_unet_and_text_encoder_match_diffusers() {
    run_case("sd1_kohya");
}

#[test]
fn peft_sdxl_unet_and_both_text_encoders_match_diffusers() {
    run_case("sdxl_peft");
}

#[test]
fn locon_convolutions_match_diffusers() {
    run_case("sd1_locon");
}

#[test]
fn two_stacked_loras_match_diffusers() {
    run_case("sd1_stacked");
}

#[test]
fn kohya_sdxl_with_sgm_block_names_matches_diffusers() {
    run_case("sdxl_kohya");
}

#[test]
fn kohya_flux_with_fused_qkv_matches_diffusers() {
    run_case("flux_kohya");
}

#[test]
fn kohya_zimage_with_diffusers_names_matches_diffusers() {
    run_case("zimage_kohya");
}

#[test]
fn zimage_reference_names_with_fused_qkv_match_diffusers() {
    run_case("zimage_reference");
}

#[test]
fn alphas_come_from_kohya_tensors_and_peft_metadata() {
    let kohya = LoraFile::open(&lora_dir().join("sd1_kohya.safetensors")).unwrap();
    assert!(kohya.layers().iter().all(|(_, r, a)| *r == 4 && *a == Some(2.0)), "{:?}", &kohya.layers()[..2]);
    let peft = LoraFile::open(&lora_dir().join("sdxl_peft.safetensors")).unwrap();
    assert!(peft.layers().iter().all(|(_, r, a)| *r == 4 && *a == Some(8.0)), "{:?}", &peft.layers()[..2]);
}

/// A scratch folder under the target dir (no tempfile dependency), emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lora").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn load_err(pipeline: &str, loras: &[LoraRequest]) -> String {
    match LoadedModel::load_with_loras(
        model_source(pipeline),
        None,
        loras,
        &candle_core::Device::Cpu,
        DType::F32,
    ) {
        Ok(_) => panic!("loading {loras:?} into {pipeline} should fail"),
        Err(e) => e.to_string(),
    }
}

/// The fixture's tensors with `edit` applied, saved as a new file.
fn edited(
    src: &str,
    dst: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> PathBuf {
    let mut tensors =
        candle_core::safetensors::load(lora_dir().join(src), &candle_core::Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dst).unwrap();
    dst.to_path_buf()
}

#[test]
fn a_lora_for_another_family_is_refused_naming_layers_and_shapes() {
    let err = load_err("pipelines/sdxl", &requests(&[("sd1_kohya.safetensors".into(), 1.0)]));
    assert!(err.contains("sd1_kohya.safetensors") && err.contains("does not fit"), "{err}");
    assert!(err.contains("lora_") && err.contains("makes [") && err.contains(".weight` ["), "{err}");
    assert!(err.contains("sd1"), "the family the file says: {err}");
    let err = load_err("pipelines/sd1", &requests(&[("sdxl_peft.safetensors".into(), 1.0)]));
    assert!(err.contains("sdxl_peft.safetensors") && err.contains("does not fit"), "{err}");
    // Between the transformer families: no layer matches, and the error says what the file is for.
    let err = load_err("flux/schnell", &requests(&[("zimage_reference.safetensors".into(), 1.0)]));
    assert!(err.contains("none of its") && err.contains("zimage"), "{err}");
    let err = load_err("zimage/turbo", &requests(&[("flux_kohya.safetensors".into(), 1.0)]));
    assert!(err.contains("none of its") && err.contains("flux"), "{err}");
}

#[test]
fn truncated_nan_and_unsupported_files_are_refused_by_name() {
    let dir = scratch("bad");
    let bytes = std::fs::read(lora_dir().join("sd1_kohya.safetensors")).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = LoraFile::open(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated.safetensors") && err.contains("truncated"), "{err}");

    let key = "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight";
    let nan = edited("sd1_kohya.safetensors", &dir.join("nan.safetensors"), |t| {
        let bad = (t[key].ones_like().unwrap() * f64::NAN).unwrap();
        t.insert(key.into(), bad);
    });
    let err = LoraFile::open(&nan).unwrap_err().to_string();
    assert!(err.contains("nan.safetensors") && err.contains("NaN") && err.contains("proj_in"), "{err}");

    let loha = edited("sd1_kohya.safetensors", &dir.join("loha.safetensors"), |t| {
        t.insert(
            "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a".into(),
            Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    });
    let err = LoraFile::open(&loha).unwrap_err().to_string();
    assert!(err.contains("LoHa"), "{err}");

    let not_lora = dir.join("not_lora.safetensors");
    std::fs::copy(root().join("pipelines/sd1/model/vae/diffusion_pytorch_model.safetensors"), &not_lora)
        .unwrap();
    let err = LoraFile::open(&not_lora).unwrap_err().to_string();
    assert!(err.contains("no LoRA layers"), "{err}");
}

#[test]
fn weights_out_of_range_are_refused() {
    for w in [8.5, -9.0, f64::NAN, f64::INFINITY] {
        let err = load_err("pipelines/sd1", &requests(&[("sd1_kohya.safetensors".into(), w)]));
        assert!(err.contains("sd1_kohya") && err.contains("outside"), "{err}");
    }
}

#[test]
fn layers_that_match_nothing_are_reported_not_dropped() {
    let dir = scratch("unmatched");
    let extra = edited("sd1_kohya.safetensors", &dir.join("extra.safetensors"), |t| {
        let down = t["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].clone();
        let up = t["lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight"].clone();
        t.insert("lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight".into(), down);
        t.insert("lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight".into(), up);
        t.insert(
            "some_other_tensor".into(),
            Tensor::zeros(2, DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    });
    let model = LoadedModel::load_with_loras(
        model_source("pipelines/sd1"),
        None,
        &[LoraRequest { name: "extra".into(), path: extra, weight: 1.0 }],
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let w = model.load_warnings.join("\n");
    assert!(w.contains("down_blocks_7") && w.contains("some_other_tensor") && w.contains("2 tensors"), "{w}");
}

#[test]
fn metadata_says_base_model_trigger_words_resolution_and_family() {
    let info = LoraFile::open(&lora_dir().join("sd1_kohya.safetensors")).unwrap().info();
    assert_eq!(info.family.as_deref(), Some("sd1"));
    assert_eq!(info.base_model.as_deref(), Some("sd_v1"));
    assert_eq!(info.resolution.as_deref(), Some("(96, 64)"));
    assert_eq!(info.trigger_words, ["astrostyle", "moon"]);
    assert_eq!(info.format, "kohya");
    let info = LoraFile::open(&lora_dir().join("sdxl_peft.safetensors")).unwrap().info();
    assert_eq!(info.family.as_deref(), Some("sdxl"));
    assert_eq!(info.components, ["denoiser", "text_encoder", "text_encoder_2"]);
    assert_eq!(
        LoraFile::open(&lora_dir().join("sd1_locon.safetensors")).unwrap().info().format,
        "kohya LoCon"
    );
    // Z-Image: from the metadata, and from the layers alone (the reference-named file has none).
    for (file, base) in
        [("zimage_kohya.safetensors", Some("z_image")), ("zimage_reference.safetensors", None)]
    {
        let info = LoraFile::open(&lora_dir().join(file)).unwrap().info();
        assert_eq!((info.family.as_deref(), info.base_model.as_deref()), (Some("zimage"), base), "{file}");
    }
}

#[test]
fn specs_check_lora_arguments_and_refuse_paths_from_the_network() {
    use kiln_core::jobs::spec::{GenerateSpec, JobSpec};
    let spec = |prompt: &str, loras: &[&str]| {
        JobSpec::Generate(GenerateSpec {
            tier: Some("draft".into()),
            prompt: prompt.into(),
            loras: loras.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    };
    assert!(spec("a fox <lora:ink:0.8>", &["grain:0.5"]).check_remote().is_ok());
    for (prompt, loras) in [
        ("a fox", vec!["/etc/ink.safetensors"]),
        ("a fox <lora:../ink:1>", vec![]),
        ("a fox <lora:ink.safetensors:1>", vec![]),
    ] {
        let err = spec(prompt, &loras).check_remote().unwrap_err().to_string();
        assert!(err.contains("loras") && err.contains("path"), "{err}");
    }
    for (prompt, loras) in
        [("a fox", vec!["ink:9"]), ("a fox <lora:ink:0.5:0.2>", vec![]), ("a fox", vec![" "])]
    {
        assert!(spec(prompt, &loras).validate().is_err(), "{prompt} {loras:?}");
    }
    let many: Vec<String> = (0..17).map(|i| format!("l{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = spec("a fox", &many).validate().unwrap_err().to_string();
    assert!(err.contains("at most 16"), "{err}");
}
