//! kiln's UNet2DConditionModel against diffusers 0.42.1 on tiny random UNets
//! (tests/fixtures/unet/make.py): SD1-like, SD2-like, SDXL-like and a "misc" config of the
//! less common keys.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_core::models::unet::{UNet2DConditionModel, UNetCond, UNetConfig};
use kiln_core::Error;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/unet")).join(case)
}

fn weights(case: &str, dtype: DType) -> VarBuilder<'static> {
    let path = fixture(case).join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture weights");
    VarBuilder::from_tensors(tensors, dtype, &Device::Cpu)
}

fn config(case: &str) -> UNetConfig {
    UNetConfig::from_file(fixture(case).join("config.json")).expect("fixture config")
}

fn npy(case: &str, name: &str) -> Tensor {
    Tensor::read_npy(fixture(case).join(format!("{name}.npy"))).expect("fixture npy")
}

struct Inputs {
    timestep: f64,
    sample: Tensor,
    context: Tensor,
    text_embeds: Option<Tensor>,
    time_ids: Option<Tensor>,
    timestep_cond: Option<Tensor>,
}

fn inputs(case: &str) -> Inputs {
    let text = std::fs::read_to_string(fixture(case).join("inputs.json")).expect("inputs.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("inputs.json parses");
    let has = |key: &str| json[key].as_bool().unwrap_or(false);
    Inputs {
        timestep: json["timestep"].as_f64().expect("timestep"),
        sample: npy(case, "sample"),
        context: npy(case, "encoder_hidden_states"),
        text_embeds: has("text_time").then(|| npy(case, "text_embeds")),
        time_ids: has("text_time").then(|| npy(case, "time_ids")),
        timestep_cond: has("timestep_cond").then(|| npy(case, "timestep_cond")),
    }
}

fn run(case: &str, dtype: DType) -> (Tensor, Tensor) {
    let unet = UNet2DConditionModel::new(&config(case), weights(case, dtype)).expect("UNet builds");
    let i = inputs(case);
    let cond = UNetCond {
        encoder_hidden_states: &i.context,
        text_embeds: i.text_embeds.as_ref(),
        time_ids: i.time_ids.as_ref(),
        timestep_cond: i.timestep_cond.as_ref(),
    };
    let out = unet.forward(&i.sample, i.timestep, &cond).expect("UNet forward");
    assert_eq!(out.dtype(), dtype);
    (out.to_dtype(DType::F32).expect("to f32"), npy(case, "out"))
}

/// Max |kiln - diffusers| and the reference's max |value|.
fn compare(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), reference.dims());
    let diff = (ours - reference).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    (diff.to_scalar::<f32>().unwrap(), scale.to_scalar::<f32>().unwrap())
}

fn check_f32(case: &str) {
    let (ours, reference) = run(case, DType::F32);
    let (diff, scale) = compare(&ours, &reference);
    println!("{case}: f32 shape {:?} max |diff| {diff:.3e}, max |ref| {scale:.3}", ours.dims());
    assert!(diff <= 1e-4 * scale.max(1.0), "{case}: max |kiln - diffusers| = {diff} (scale {scale})");
}

#[test]
fn sd1_like_matches_diffusers() {
    check_f32("sd1");
}

#[test]
fn sd2_like_matches_diffusers() {
    check_f32("sd2");
}

#[test]
fn sdxl_like_matches_diffusers() {
    check_f32("sdxl");
}

#[test]
fn less_common_config_keys_match_diffusers() {
    check_f32("misc");
}

/// f16 runs end to end (time embedding cast to the model dtype) and stays close to the f32
/// reference. (bf16 is not tested here: candle's CPU matmul has no bf16.)
#[test]
fn f16_runs_close_to_reference() {
    for case in ["sd1", "sdxl"] {
        let (ours, reference) = run(case, DType::F16);
        let (diff, scale) = compare(&ours, &reference);
        println!("{case}: f16 max |diff| {diff:.3e}, max |ref| {scale:.3}");
        assert!(diff <= 1e-2 * scale, "{case} f16: max |kiln - diffusers| = {diff} (scale {scale})");
    }
}

/// The SDXL-like UNet refuses to run without its text_time inputs.
#[test]
fn text_time_inputs_are_required() {
    let unet = UNet2DConditionModel::new(&config("sdxl"), weights("sdxl", DType::F32)).unwrap();
    let i = inputs("sdxl");
    let err = unet.forward(&i.sample, i.timestep, &UNetCond::text(&i.context)).unwrap_err();
    assert!(err.to_string().contains("text_embeds"), "{err}");
}

#[test]
fn wrong_weight_shape_names_tensor_and_shapes() {
    // The sd1 weights have cross_attention_dim 32; a config saying 48 expects to_k [32, 48].
    let mut cfg = config("sd1");
    cfg.cross_attention_dim = kiln_core::models::unet::PerBlock::One(48);
    let err = UNet2DConditionModel::new(&cfg, weights("sd1", DType::F32)).unwrap_err();
    match &err {
        Error::ShapeMismatch { name, expected, found } => {
            assert_eq!(name, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight");
            assert_eq!((expected.as_slice(), found.as_slice()), (&[32, 48][..], &[32, 32][..]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("attn2.to_k.weight") && msg.contains("[32, 48]") && msg.contains("[32, 32]"),
        "{msg}"
    );
}

#[test]
fn unsupported_config_values_are_refused() {
    let cases: [(&str, serde_json::Value); 5] = [
        ("resnet_time_scale_shift", "scale_shift".into()),
        ("class_embed_type", "timestep".into()),
        ("addition_embed_type", "text".into()),
        ("only_cross_attention", true.into()),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn".into()),
    ];
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sd1").join("config.json")).unwrap()).unwrap();
    for (key, value) in cases {
        let mut json = base.clone();
        json[key] = value;
        let cfg: UNetConfig = serde_json::from_value(json).unwrap();
        let err = UNet2DConditionModel::new(&cfg, weights("sd1", DType::F32)).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{key}: {err:?}");
        assert!(err.to_string().contains(key), "{key}: {err}");
    }
}

#[test]
fn absent_keys_take_diffusers_defaults() {
    let cfg: UNetConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(cfg.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
    assert!(cfg.flip_sin_to_cos && !cfg.use_linear_projection);
    // SDXL's hub config has "upcast_attention": null and nulls for unused keys.
    let cfg: UNetConfig =
        serde_json::from_str(r#"{"upcast_attention": null, "transformer_layers_per_block": [1, 2, 10]}"#)
            .unwrap();
    assert_eq!(cfg.upcast_attention, None);
}
