//! The `kiln` binary end to end on the committed tiny SD1 model: outputs, metadata, batching,
//! determinism, and clear errors (non-zero exit, no panic, nothing written) on bad input.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sd1/model")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("KILN_DATA_DIR", tmp_data()).output().unwrap()
}

fn tmp_data() -> PathBuf {
    std::env::temp_dir().join("kiln-cli-test-data")
}

fn base_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a lighthouse",
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "3",
        "--seed",
        "7",
        "--device",
        "cpu",
        "-q",
        "--out",
        out,
    ]
}

fn text_chunks(path: &Path) -> Vec<(String, String)> {
    kiln_core::image::png_meta::read_png_text(path)
        .unwrap()
        .into_iter()
        .map(|c| (c.keyword, c.text))
        .collect()
}

#[test]
fn generates_png_with_metadata_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let model = model();
    let model = model.to_str().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    for out in [&a, &b] {
        let o = kiln(&base_args(model, out.to_str().unwrap()));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Same inputs, same backend → identical bytes (pixels and metadata).
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    let chunks = text_chunks(&a);
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.starts_with("a lighthouse\n"), "{params}");
    for field in [
        "Steps: 3",
        "Sampler: PLMS",
        "CFG scale: 7.5",
        "Seed: 7",
        "Size: 96x64",
        "Model hash: ",
        "Model: model",
    ] {
        assert!(params.contains(field), "missing {field} in {params}");
    }
    let record: serde_json::Value =
        serde_json::from_str(&chunks.iter().find(|(k, _)| k == "kiln").unwrap().1).unwrap();
    assert_eq!(record["seed"], 7);
    assert_eq!(record["scheduler"], "pndm");
    assert_eq!(record["scheduler_class"], "PNDMScheduler");
    assert_eq!(record["dtype"], "f32");
    assert_eq!(record["device"], "cpu");
    let files = record["model"]["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["component"] == "unet" && f["sha256"].as_str().unwrap().len() == 64));
}

#[test]
fn count_batches_seeds_like_separate_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = model();
    let model = model.to_str().unwrap();
    let batch_out = dir.path().join("batch.png");
    let mut args = base_args(model, batch_out.to_str().unwrap());
    args.extend(["--count", "2", "--json"]);
    let o = kiln(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["seeds"], serde_json::json!([7, 8]));
    assert_eq!(report["seconds"]["steps"].as_array().unwrap().len(), 4); // PLMS: steps + 1 evaluations
    assert!(report["peak_memory_bytes"].as_u64().unwrap() > 0);

    // The second image of the batch equals a single run with seed 8.
    let single = dir.path().join("single.png");
    let mut args = base_args(model, single.to_str().unwrap());
    let seed_pos = args.iter().position(|a| *a == "7").unwrap();
    args[seed_pos] = "8";
    assert!(kiln(&args).status.success());
    let px = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let second = dir.path().join("batch-1.png");
    assert_eq!(px(&second), px(&single));
    assert_ne!(px(&dir.path().join("batch-0.png")), px(&single));
}

fn assert_fails(args: &[&str], needle: &str) {
    let o = kiln(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let out_s = out.to_str().unwrap();
    let model = model();
    let model = model.to_str().unwrap();
    // Replaces a flag's value when the base args have it, appends it otherwise.
    let with = |extra: &[&'static str]| {
        let mut a = base_args(model, out_s);
        match (extra, a.iter().position(|x| Some(x) == extra.first())) {
            ([_, value], Some(i)) => a[i + 1] = value,
            _ => a.extend_from_slice(extra),
        }
        a
    };
    assert_fails(&base_args("/no/such/folder", out_s), "model folder not found");
    assert_fails(&base_args("nobody/not-cached-model", out_s), "nobody/not-cached-model");
    assert_fails(&with(&["--scheduler", "heun"]), "ddim");
    assert_fails(&with(&["--width", "100"]), "multiple of the VAE factor 8");
    assert_fails(&with(&["--width", "65536"]), "invalid width");
    assert_fails(&with(&["--steps", "0"]), "invalid steps");
    assert_fails(&with(&["--device", "tpu"]), "--device");
    assert_fails(&with(&["--dtype", "f8"]), "--dtype");
    assert_fails(&with(&["--bogus-flag"]), "--bogus-flag");
    let not_image = dir.path().join("not-an-image.png");
    std::fs::write(&not_image, b"hello").unwrap();
    let mut a = base_args(model, out_s);
    a.extend(["--init-image", not_image.to_str().unwrap()]);
    assert_fails(&a, "not-an-image.png");
    // Init latents of the wrong shape name the expected shape.
    let npy = dir.path().join("lat.npy");
    kiln_core::candle::Tensor::zeros(
        (1, 4, 4, 4),
        kiln_core::candle::DType::F32,
        &kiln_core::candle::Device::Cpu,
    )
    .unwrap()
    .write_npy(&npy)
    .unwrap();
    let mut a = base_args(model, out_s);
    a.extend(["--init-latents", npy.to_str().unwrap()]);
    assert_fails(&a, "expected [1, 4, 8, 12]");
    // A truncated weight file names the file.
    let broken = dir.path().join("broken");
    copy_dir(Path::new(model), &broken);
    let unet = broken.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&base_args(broken.to_str().unwrap(), out_s), "truncated");
    assert!(!out.exists(), "nothing may be written on failure");
}

#[test]
fn offline_hub_id_fails_fast_with_a_hint() {
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", "--model", "stabilityai/sd-turbo", "--prompt", "x", "-q"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", std::env::temp_dir().join("kiln-empty-hf-home"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("stabilityai/sd-turbo") && stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
    assert!(stderr.contains("--model DIR"), "{stderr}");
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
