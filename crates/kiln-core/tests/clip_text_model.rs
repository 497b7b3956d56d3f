//! CLIP text encoder against transformers 5.23 CLIPTextModel / CLIPTextModelWithProjection on
//! tiny random models (tests/fixtures/clip/make.py).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_core::models::clip::{text_model_prefix, ClipTextConfig, ClipTextModel};
use kiln_core::models::clip_tokenizer::ClipTokenizer;
use kiln_core::Error;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/clip");
const TOLERANCE: f32 = 1e-4;

fn model_dir(name: &str) -> PathBuf {
    Path::new(FIXTURES).join("models").join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Runs `weights` of model `name` on the reference ids and compares every output.
fn check(name: &str, weights: &str, with_projection: bool, expect_prefix: bool) {
    let dir = model_dir(name);
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let tensors = candle_core::safetensors::load(dir.join(weights), &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    assert_eq!(text_model_prefix(&vb).is_some(), expect_prefix, "{name}/{weights}: prefix detection");
    let model = ClipTextModel::new(&cfg, vb, with_projection).unwrap();

    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let out = model.forward(&ids).unwrap();
    let hidden = &reference["hidden_states"];
    let layers = hidden.dim(0).unwrap();
    assert_eq!(out.hidden_states.len(), layers, "{name}: number of hidden states");

    let mut report = vec![
        ("last_hidden_state", max_abs_diff(&out.last_hidden_state, &reference["last_hidden_state"])),
        ("hidden_states[-2]", max_abs_diff(&out.hidden_states[layers - 2], &hidden.get(layers - 2).unwrap())),
        ("pooled", max_abs_diff(&out.pooled, &reference["pooled"])),
    ];
    for (i, h) in out.hidden_states.iter().enumerate() {
        report.push(("hidden_states[i]", max_abs_diff(h, &hidden.get(i).unwrap())));
    }
    match (&out.text_embeds, reference.get("text_embeds")) {
        (Some(got), Some(want)) => report.push(("text_embeds", max_abs_diff(got, want))),
        (None, None) => {}
        _ => panic!("{name}: text_embeds presence differs from the reference"),
    }
    println!("{name}/{weights}: {report:?}");
    for (what, diff) in report {
        assert!(diff <= TOLERANCE, "{name}/{weights}: {what} max abs diff {diff} > {TOLERANCE}");
    }
}

#[test]
fn text_model_quick_gelu_without_prefix() {
    check("text_quick_gelu", "plain.safetensors", false, false);
}

#[test]
fn text_model_quick_gelu_with_prefix() {
    check("text_quick_gelu", "prefixed.safetensors", false, true);
}

#[test]
fn text_model_gelu_eos2_pools_at_argmax() {
    check("text_gelu_eos2", "plain.safetensors", false, false);
}

#[test]
fn with_projection_quick_gelu() {
    check("proj_quick_gelu", "prefixed.safetensors", true, true);
}

#[test]
fn with_projection_gelu_eos2() {
    check("proj_gelu_eos2", "prefixed.safetensors", true, true);
}

/// The reference ids are what kiln's tokenizer produces for the fixture prompts.
#[test]
fn reference_ids_come_from_the_tokenizer() {
    let tokenizers = Path::new(FIXTURES).join("tokenizers");
    let small = Path::new(FIXTURES).join("../clip-tokenizer-small");
    let prompts = ["a photo of a cat, highly detailed #$ 8k", "An astronaut riding a horse on mars!"];
    for (model, folder) in [("text_quick_gelu", small), ("text_gelu_eos2", tokenizers.join("pad-bang"))] {
        let tok = ClipTokenizer::from_dir(&folder).unwrap();
        let reference =
            candle_core::safetensors::load(model_dir(model).join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let want = reference["input_ids"].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
        for (prompt, row) in prompts.iter().zip(want) {
            assert_eq!(tok.encode_padded(prompt).unwrap().ids, row, "{model}: {prompt}");
        }
    }
}

fn load_tensors(name: &str, weights: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir(name).join(weights), &Device::Cpu).unwrap()
}

#[test]
fn missing_tensor_is_named() {
    let cfg = ClipTextConfig::from_file(&model_dir("text_quick_gelu").join("config.json")).unwrap();
    let mut tensors = load_tensors("text_quick_gelu", "prefixed.safetensors");
    tensors.remove("text_model.encoder.layers.1.mlp.fc2.bias");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    match ClipTextModel::new(&cfg, vb, false) {
        Err(Error::MissingTensor { name, .. }) => {
            assert_eq!(name, "text_model.encoder.layers.1.mlp.fc2.bias")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    // No projection in a CLIPTextModel file.
    let vb = VarBuilder::from_tensors(
        load_tensors("text_quick_gelu", "plain.safetensors"),
        DType::F32,
        &Device::Cpu,
    );
    let err = ClipTextModel::new(&cfg, vb, true).unwrap_err();
    assert!(err.to_string().contains("`text_projection.weight`"), "{err}");

    // load() names the file.
    let file = model_dir("text_quick_gelu").join("plain.safetensors");
    let err = ClipTextModel::load(&cfg, &[file], DType::F32, &Device::Cpu, true).unwrap_err().to_string();
    assert!(err.contains("text_projection.weight") && err.contains("plain.safetensors"), "{err}");
    let absent = model_dir("text_quick_gelu").join("absent.safetensors");
    let err = ClipTextModel::load(&cfg, &[absent], DType::F32, &Device::Cpu, false).unwrap_err().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    let cfg = ClipTextConfig::from_file(&model_dir("text_quick_gelu").join("config.json")).unwrap();
    let mut tensors = load_tensors("text_quick_gelu", "plain.safetensors");
    tensors.insert(
        "encoder.layers.2.self_attn.k_proj.weight".into(),
        Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    match ClipTextModel::new(&cfg, vb, false) {
        Err(Error::ShapeMismatch { name, expected, found }) => {
            assert_eq!(name, "encoder.layers.2.self_attn.k_proj.weight");
            assert_eq!(expected, vec![32, 32]);
            assert_eq!(found, vec![32, 31]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }

    // A config that disagrees with the file (vocab) is caught the same way.
    let mut bad_cfg = cfg.clone();
    bad_cfg.vocab_size = 1000;
    let vb = VarBuilder::from_tensors(
        load_tensors("text_quick_gelu", "plain.safetensors"),
        DType::F32,
        &Device::Cpu,
    );
    let err = ClipTextModel::new(&bad_cfg, vb, false).unwrap_err().to_string();
    assert!(err.contains("embeddings.token_embedding.weight"), "{err}");
}

#[test]
fn bad_input_ids_are_errors() {
    let cfg = ClipTextConfig::from_file(&model_dir("text_quick_gelu").join("config.json")).unwrap();
    let vb = VarBuilder::from_tensors(
        load_tensors("text_quick_gelu", "plain.safetensors"),
        DType::F32,
        &Device::Cpu,
    );
    let model = ClipTextModel::new(&cfg, vb, false).unwrap();
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    assert!(model.forward(&too_long).is_err());
    let out_of_vocab = Tensor::new(&[[1512u32, 5000, 1513]], &Device::Cpu).unwrap();
    let err = model.forward(&out_of_vocab).unwrap_err().to_string();
    assert!(err.contains("5000"), "{err}");
    let one_d = Tensor::new(&[1512u32, 1513], &Device::Cpu).unwrap();
    assert!(model.forward(&one_d).is_err());
}

/// Half precision runs (softmax in f32 as transformers does) and stays close to the f32 reference.
#[test]
fn f16_and_bf16_stay_close() {
    let dir = model_dir("proj_quick_gelu");
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    for (dtype, tolerance) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
        let vb = VarBuilder::from_tensors(
            load_tensors("proj_quick_gelu", "prefixed.safetensors"),
            dtype,
            &Device::Cpu,
        );
        let model = ClipTextModel::new(&cfg, vb, true).unwrap();
        let out = model.forward(&reference["input_ids"]).unwrap();
        assert_eq!(out.last_hidden_state.dtype(), dtype);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let diffs = [
            max_abs_diff(&f32(&out.last_hidden_state), &reference["last_hidden_state"]),
            max_abs_diff(&f32(&out.pooled), &reference["pooled"]),
            max_abs_diff(&f32(out.text_embeds.as_ref().unwrap()), &reference["text_embeds"]),
        ];
        println!("{dtype:?}: {diffs:?}");
        assert!(diffs.iter().all(|&d| d <= tolerance), "{dtype:?}: {diffs:?} > {tolerance}");
    }
}
