//! Inpainting against diffusers' StableDiffusionInpaintPipeline on tiny random-weight models
//! (tests/fixtures/inpaint/make.py): PSNR ≥ 35 dB inside the mask, the input's own bytes
//! outside it, and no seam at the mask boundary of a flat image.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use kiln_core::image::mask::Mask;
use kiln_core::loaders::hub::ModelSource;
use kiln_core::pipeline::inpaint::{inpaint_quiet, Blend, InpaintRequest, Region, UNetKind};
use kiln_core::pipeline::model::LoadedModel;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug)]
struct Case {
    name: String,
    model: String,
    scheduler: Option<String>,
    steps: usize,
    guidance: f64,
    seed: u64,
    latents: Option<String>,
    strength: f64,
    prompt: String,
    negative_prompt: String,
    output: String,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/inpaint")
}

fn load_model(name: &str) -> LoadedModel {
    LoadedModel::load(ModelSource::Folder(dir().join(name).join("model")), &Device::Cpu, DType::F32).unwrap()
}

fn request(case: &Case, image: &RgbImage, mask: &Mask) -> InpaintRequest {
    let mut req = InpaintRequest::new(case.prompt.clone(), image.clone(), mask.clone());
    req.negative_prompt = Some(case.negative_prompt.clone());
    req.steps = case.steps;
    req.guidance = case.guidance;
    req.scheduler = case.scheduler.as_deref().map(|s| s.parse().unwrap());
    req.seeds = vec![case.seed];
    req.init_latents = case.latents.as_ref().map(|f| Tensor::read_npy(dir().join(f)).unwrap());
    req.strength = case.strength;
    req.blend = Blend::Diffusers;
    req.region = Region::Whole;
    req.mask_blur = 0.0;
    req
}

/// PSNR over the pixels where `select` is true (values in [0, 1]).
fn masked_psnr(got: &RgbImage, want: &[f32], select: impl Fn(usize) -> bool) -> f64 {
    let mut se = 0f64;
    let mut n = 0usize;
    for (i, px) in got.pixels().enumerate() {
        if select(i) {
            for c in 0..3 {
                let d = px.0[c] as f64 / 255.0 - want[i * 3 + c] as f64;
                se += d * d;
                n += 1;
            }
        }
    }
    assert!(n > 0, "empty selection");
    10.0 * (1.0 / (se / n as f64)).log10()
}

fn assert_outside_identical(input: &RgbImage, output: &RgbImage, mask: &Mask, what: &str) {
    let mut kept = 0;
    for (i, (a, b)) in input.pixels().zip(output.pixels()).enumerate() {
        if mask.values()[i] == 0.0 {
            assert_eq!(a, b, "{what}: pixel {i} outside the mask changed");
            kept += 1;
        }
    }
    assert!(kept > 0, "{what}: nothing outside the mask");
}

#[test]
fn matches_diffusers_inside_the_mask_and_keeps_the_rest() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let mask = Mask::load(&dir().join("mask.png")).unwrap();
    let inside = mask.binarized();
    let mut models = std::collections::HashMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        let model = models.entry(case.model.clone()).or_insert_with(|| load_model(&case.model));
        let want = Tensor::read_npy(dir().join(&case.output))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let out = inpaint_quiet(model, &request(case, &image, &mask)).unwrap();
        let expected_kind = if case.model == "inpaint9" { UNetKind::Inpaint } else { UNetKind::Plain };
        assert_eq!(out.unet_kind, expected_kind);
        let got = &out.images[0].image;
        let p = masked_psnr(got, &want, |i| inside.values()[i] == 1.0);
        println!("{}: PSNR inside the mask {p:.1} dB", case.name);
        if p < 35.0 {
            failures.push(format!("{}: {p:.1} dB", case.name));
        }
        assert_outside_identical(&image, got, &out.composite_mask, &case.name);
    }
    assert!(failures.is_empty(), "below 35 dB: {failures:?}");
}

/// A different case's reference must not pass: the parity test can fail.
#[test]
fn parity_test_tells_cases_apart() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let mask = Mask::load(&dir().join("mask.png")).unwrap();
    let inside = mask.binarized();
    let model = load_model("plain4");
    let case = cases.iter().find(|c| c.name == "plain4_pndm").unwrap();
    let other = cases.iter().find(|c| c.name == "plain4_euler_a").unwrap();
    let want =
        Tensor::read_npy(dir().join(&other.output)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let out = inpaint_quiet(&model, &request(case, &image, &mask)).unwrap();
    let p = masked_psnr(&out.images[0].image, &want, |i| inside.values()[i] == 1.0);
    println!("plain4_pndm vs the euler-a reference: {p:.1} dB");
    assert!(p < 30.0, "{p}");
}
