//! AutoencoderKL against diffusers 0.42.1 on tiny random models (tests/fixtures/vae/make.py).
// Tests fail by panicking: unwrap is the point here.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_core::models::vae::{AutoencoderKl, SampleSize, VaeConfig};
use std::collections::HashMap;
use std::path::PathBuf;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/vae");
const VARIANTS: [&str; 3] = ["lpb1", "lpb2", "noquant_noattn"];

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(FIXTURES).join(path)
}

fn npy(path: &str) -> Tensor {
    Tensor::read_npy(fixture(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn weights(variant: &str) -> HashMap<String, Tensor> {
    let path = fixture(&format!("{variant}/diffusion_pytorch_model.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config(variant: &str) -> VaeConfig {
    VaeConfig::from_file(fixture(&format!("{variant}/config.json"))).expect("config")
}

fn model(variant: &str, dtype: DType, device: &Device) -> AutoencoderKl {
    let vb = VarBuilder::from_tensors(weights(variant), dtype, device);
    AutoencoderKl::new(&config(variant), vb).expect("model")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Checks encode (mean, std, a sample with fixed noise) and decode against diffusers' f32 outputs:
/// max abs difference <= `tol` in f32; in half precision `tol` is relative to each reference's
/// largest magnitude (at least 1). For scale, torch itself in f16 lands 2.2e-2 off on lpb2's
/// decode (max |x| 5.0) and 1.5e-1 in bf16.
fn check_against_reference(variant: &str, vae: &AutoencoderKl, tol: f32) {
    let image = npy("image.npy");
    let dist = vae.encode(&image).expect("encode");
    let sample = dist.sample(&npy("noise.npy")).expect("sample");
    let decoded = vae.decode(&npy("latents.npy")).expect("decode");
    let mut failures = Vec::new();
    for (name, ours, file) in [
        ("encode mean", &dist.mean, "encode_mean.npy"),
        ("encode std", &dist.std, "encode_std.npy"),
        ("sample", &sample, "sample.npy"),
        ("decode", &decoded, "decode.npy"),
    ] {
        let reference = npy(&format!("{variant}/{file}"));
        let diff = max_abs_diff(ours, &reference);
        let bound = if vae.dtype() == DType::F32 { tol } else { tol * max_abs(&reference).max(1.0) };
        println!("{variant} {:?} {name}: max abs diff {diff:.3e} (bound {bound:.1e})", vae.dtype());
        failures.push((name, diff, bound));
    }
    for (name, diff, bound) in failures {
        assert!(diff <= bound, "{variant} {name}: max abs diff {diff} > {bound}");
    }
    assert!(std::ptr::eq(dist.mode(), &dist.mean));
}

#[test]
fn matches_diffusers_f32() {
    for variant in VARIANTS {
        let vae = model(variant, DType::F32, &Device::Cpu);
        check_against_reference(variant, &vae, 1e-4);
    }
}

#[test]
fn half_precision_stays_close() {
    // f16 weights and activations against the f32 reference: rounding only. (candle 0.11.1 has no
    // bf16 matmul on CPU; bf16 is checked on CUDA below.)
    let vae = model("lpb2", DType::F16, &Device::Cpu);
    check_against_reference("lpb2", &vae, 1e-2);
    assert_eq!(vae.decode(&npy("latents.npy")).unwrap().dtype(), DType::F16);
}

/// Run with `cargo test -p kiln-core --features cuda --test vae` on a CUDA machine.
#[cfg(feature = "cuda")]
#[test]
fn gpu_matches_diffusers() {
    let dev = Device::new_cuda(0).expect("cuda:0");
    for variant in VARIANTS {
        check_against_reference(variant, &model(variant, DType::F32, &dev), 1e-4);
    }
    for (dtype, tol) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
        check_against_reference("lpb2", &model("lpb2", dtype, &dev), tol);
    }
}

#[test]
fn config_and_factors() {
    let cfg = config("noquant_noattn");
    assert!(!cfg.use_quant_conv && !cfg.use_post_quant_conv && !cfg.mid_block_add_attention);
    assert_eq!(cfg.shift_factor, Some(0.0609));
    assert_eq!(cfg.sample_size, SampleSize::Square(64));
    let vae = model("lpb1", DType::F32, &Device::Cpu);
    assert_eq!(vae.scale_factor(), 8);
    assert_eq!(vae.latent_channels(), 4);
    assert_eq!(vae.config().scaling_factor, 0.18215);
    assert_eq!(vae.config().shift_factor, None);
    assert!(vae.config().force_upcast);

    // Absent keys take diffusers' defaults; unknown keys are ignored.
    let cfg: VaeConfig =
        serde_json::from_str(r#"{"_class_name": "AutoencoderKL", "sample_size": [64, 96]}"#).unwrap();
    assert_eq!(cfg, VaeConfig { sample_size: SampleSize::HeightWidth(vec![64, 96]), ..VaeConfig::default() });
    assert_eq!(cfg.block_out_channels, vec![64]);
    assert_eq!(cfg.norm_num_groups, 32);
    assert_eq!(cfg.layers_per_block, 1);
}

#[test]
fn deprecated_attention_key_names() {
    // Old folders name the attention projections query/key/value/proj_attn; LDM conversions may
    // keep them as 1×1 conv weights.
    let mut renamed = HashMap::new();
    let mut count = 0;
    for (name, tensor) in weights("lpb1") {
        let old = [("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")]
            .iter()
            .find_map(|(new, old)| name.contains(new).then(|| name.replace(new, old)));
        match old {
            Some(old) => {
                count += 1;
                let tensor = if old.ends_with("query.weight") {
                    tensor.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
                } else {
                    tensor
                };
                renamed.insert(old, tensor);
            }
            None => {
                renamed.insert(name, tensor);
            }
        }
    }
    assert_eq!(count, 16, "two attention blocks, four projections with weight and bias");
    let vae =
        AutoencoderKl::new(&config("lpb1"), VarBuilder::from_tensors(renamed, DType::F32, &Device::Cpu))
            .expect("model with deprecated keys");
    check_against_reference("lpb1", &vae, 1e-4);
}

fn build_error(tensors: HashMap<String, Tensor>) -> String {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    match AutoencoderKl::new(&config("lpb1"), vb) {
        Ok(_) => panic!("model built from bad weights"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_or_wrong_tensors_are_named() {
    for name in [
        "decoder.mid_block.resnets.1.conv2.weight",
        "encoder.mid_block.attentions.0.to_v.bias",
        "encoder.down_blocks.2.downsamplers.0.conv.weight",
        "post_quant_conv.bias",
    ] {
        let mut tensors = weights("lpb1");
        assert!(tensors.remove(name).is_some(), "{name} not in fixture");
        let msg = build_error(tensors);
        assert!(msg.contains(name), "error for missing {name} does not name it: {msg}");
    }
    for name in ["encoder.conv_in.weight", "decoder.mid_block.attentions.0.to_q.weight"] {
        let mut tensors = weights("lpb1");
        tensors.insert(name.to_string(), Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap());
        let msg = build_error(tensors);
        assert!(msg.contains(name), "error for misshapen {name} does not name it: {msg}");
    }
}

#[test]
fn bad_inputs_and_configs_are_errors() {
    let vae = model("lpb1", DType::F32, &Device::Cpu);
    let dev = Device::Cpu;
    let err = vae.encode(&Tensor::zeros((1, 4, 16, 16), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(err.contains("image"), "{err}");
    let err = vae.decode(&Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(err.contains("latents"), "{err}");
    let err = vae.encode(&Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(err.contains("too small"), "{err}");
    let dist = vae.encode(&Tensor::zeros((1, 3, 16, 16), DType::F32, &dev).unwrap()).unwrap();
    assert_eq!(dist.mean.dims(), &[1, 4, 2, 2]);
    let err = dist.sample(&Tensor::zeros((1, 4, 2, 3), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(err.contains("noise"), "{err}");

    let bad = VaeConfig { up_block_types: vec!["UpBlock2D".into()], ..VaeConfig::default() };
    let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &dev);
    let err = AutoencoderKl::new(&bad, vb).unwrap_err().to_string();
    assert!(err.contains("UpBlock2D"), "{err}");
}
