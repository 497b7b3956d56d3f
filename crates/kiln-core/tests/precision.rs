//! Precision safety: an f16 VAE decode that overflows (as SD/SDXL's do on real latents) must not
//! give a black image. The tiny SD1 fixture's decoder gets its `conv_in` scaled by 1e6, which lifts
//! the decoder's residual stream far past f16's 65504 while the output norm brings the image back
//! to a normal range: in f16 the decode turns to inf/NaN, in f32 it is a valid image. kiln must
//! detect it, decode again in f32 (on CPU), flag the image and warn.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::pipeline::generate::{decode_batch, generate, GenerateRequest, NoProgress, StageTimings};
use kiln_core::pipeline::model::LoadedModel;
use std::path::{Path, PathBuf};

const SCALE: f64 = 1e6;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sd1")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), dst).unwrap();
        }
    }
}

/// The sd1 fixture model with the VAE decoder's conv_in (weight and bias) scaled by [`SCALE`].
fn overflowing_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    copy_dir(&fixture().join("model"), &model);
    let file = model.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    for key in ["decoder.conv_in.weight", "decoder.conv_in.bias"] {
        let t = tensors.get(key).unwrap();
        let scaled = (t.to_dtype(DType::F32).unwrap() * SCALE).unwrap().to_dtype(t.dtype()).unwrap();
        tensors.insert(key.to_string(), scaled);
    }
    candle_core::safetensors::save(&tensors, &file).unwrap();
    model
}

fn is_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

#[test]
fn f16_vae_overflow_falls_back_to_f32_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = overflowing_model(tmp.path());
    let half = LoadedModel::load(ModelSource::Folder(dir.clone()), &Device::Cpu, DType::F16).unwrap();
    let full = LoadedModel::load(ModelSource::Folder(dir), &Device::Cpu, DType::F32).unwrap();
    // Latents as the f16 pipeline holds them; the f32 reference decodes the same (rounded) values.
    let latents = Tensor::read_npy(fixture().join("latents.npy")).unwrap().to_dtype(DType::F16).unwrap();

    // The case overflows: the f16 VAE's own output is not finite.
    let z = (latents.to_dtype(DType::F32).unwrap() / half.vae.config().scaling_factor).unwrap();
    let raw = half.vae.decode(&z.to_dtype(DType::F16).unwrap()).unwrap();
    assert!(!is_finite(&raw), "the scaled fixture no longer overflows in f16: the test proves nothing");

    let mut timings = StageTimings::default();
    let got =
        decode_batch(&half, &latents, &[7], &Default::default(), &mut timings, &mut NoProgress).unwrap();
    let want = decode_batch(
        &full,
        &latents.to_dtype(DType::F32).unwrap(),
        &[7],
        &Default::default(),
        &mut timings,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(got[0].vae_fallback, Some(DType::F32));
    assert_eq!(want[0].vae_fallback, None);
    let (g, w) = (&got[0].pixels, &want[0].pixels);
    assert!(is_finite(g));
    let d = max_abs_diff(g, w);
    println!("fallback vs f32 decode: max abs diff {d:.2e}");
    assert!(d < 1e-5, "fallback decode differs from the f32 decode by {d}");
    // Not a black (or saturated) image: the pixels spread over the range.
    let mean = w.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let spread = w.flatten_all().unwrap().var(0).unwrap().to_scalar::<f32>().unwrap().sqrt();
    println!("f32 decode: mean {mean:.3}, std {spread:.3}");
    assert!(mean > 0.05 && mean < 0.95 && spread > 0.02, "degenerate reference image");
}

#[test]
fn f16_generate_warns_and_matches_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = overflowing_model(tmp.path());
    let latents = Tensor::read_npy(fixture().join("latents.npy")).unwrap();
    let request = GenerateRequest {
        scheduler: Some("euler".parse().unwrap()),
        init_latents: Some(latents),
        ..GenerateRequest::txt2img("a photo of an astronaut riding a horse on the moon", (96, 64), 2, 7.5, 0)
    };
    let run = |dtype| {
        let model = LoadedModel::load(ModelSource::Folder(dir.clone()), &Device::Cpu, dtype).unwrap();
        generate(&model, &request, &mut NoProgress).unwrap()
    };
    let half = run(DType::F16);
    let full = run(DType::F32);
    assert_eq!(half.images[0].vae_fallback, Some(DType::F32));
    assert!(
        half.warnings.iter().any(|w| w.contains("overflowed")),
        "no fallback warning in {:?}",
        half.warnings
    );
    assert!(full.warnings.iter().all(|w| !w.contains("overflowed")));
    // The f16 UNet differs from the f32 one by rounding only.
    let p = psnr(&half.images[0].pixels, &full.images[0].pixels);
    println!("f16 (VAE fallback) vs f32 generate: PSNR {p:.1} dB");
    assert!(p >= 30.0, "PSNR {p:.1} dB < 30");
}
