//! `kiln models import|list` and `kiln upscale` end to end, on the tiny fixture models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sr")).join(name)
}

fn kiln(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).env("KILN_DATA_DIR", data).args(args).output().expect("run kiln")
}

#[test]
fn import_list_upscale_json_and_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let param = fixture("srvgg-tiny-x4.param");
    let out = kiln(&data, &["models", "import", param.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = kiln(&data, &["models", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list["models"][0]["name"], "srvgg-tiny-x4");
    assert_eq!(list["models"][0]["arch"], "SRVGGNetCompact");
    assert_eq!(list["models"][0]["scale"], 4);

    // Two inputs into a folder, by store name, target 4k long edge... of a tiny image: 2x.
    let outdir = dir.path().join("out");
    let input = fixture("input_40x32.png");
    let rgba = fixture("input_rgba_40x32.png");
    let args = [
        "upscale",
        input.to_str().expect("utf8"),
        rgba.to_str().expect("utf8"),
        "--model",
        "srvgg-tiny-x4",
        "--scale",
        "2",
        "--out",
        outdir.to_str().expect("utf8"),
        "--json",
    ];
    let out = kiln(&data, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["outputs"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["outputs"][0]["output_size"], serde_json::json!([80, 64]));
    assert!(report["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(
        outdir.join("input_40x32_upscaled.png").exists()
            && outdir.join("input_rgba_40x32_upscaled.png").exists()
    );

    // A model path works too; an unknown name and a bad file fail with a message, exit 1.
    let single = dir.path().join("single.png");
    let out = kiln(
        &data,
        &[
            "upscale",
            input.to_str().expect("utf8"),
            "--model",
            param.to_str().expect("utf8"),
            "--out",
            single.to_str().expect("utf8"),
            "-q",
        ],
    );
    assert!(out.status.success() && single.exists());
    let out = kiln(&data, &["upscale", input.to_str().expect("utf8"), "--model", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported: srvgg-tiny-x4"));
    let bad = dir.path().join("bad.param");
    std::fs::write(&bad, "7767517\n1 1\nInput in 0 1 data\n").expect("write");
    std::fs::write(dir.path().join("bad.bin"), b"").expect("write");
    let out = kiln(&data, &["models", "import", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no convolutions"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--redetail`: super-resolution, then diffusion re-detail on blended latent tiles; the
/// output keeps the upscale record and adds the re-detail record; same seed, same pixels.
#[test]
fn redetail_after_super_resolution() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let sd1 = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/pipelines/sd1/model"));
    let input = fixture("input_40x32.png");
    let lora =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/lora/sd1_kohya.safetensors"));
    let lora_arg = format!("{}:0.8", lora.display());
    let sr = fixture("srvgg-tiny-x4.safetensors");
    let run = |out: &Path, loras: &[&str]| {
        let mut args = vec![
            "upscale",
            input.to_str().expect("utf8"),
            "--model",
            sr.to_str().expect("utf8"),
            "--redetail",
            "--redetail-model",
            sd1.to_str().expect("utf8"),
            "--redetail-tile",
            "128",
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--prompt",
            "a lighthouse",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--json",
            "--out",
            out.to_str().expect("utf8"),
        ];
        for l in loras {
            args.extend(["--lora", *l]);
        }
        let o = kiln(&data, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(v["redetail"][0]["tiles"], serde_json::json!([1, 2]), "{v}");
        (image::open(out).expect("png").to_rgb8(), v)
    };
    let (a_path, b_path) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let ((a, _), (b, _)) = (run(&a_path, &[]), run(&b_path, &[]));
    assert_eq!(a.dimensions(), (160, 128));
    assert!(a == b, "same seed, same pixels");
    // A LoRA on the re-detail model changes the detail and is recorded with its hash and weight.
    let (with_lora, v) = run(&dir.path().join("lora.png"), &[&lora_arg]);
    assert!(with_lora != a, "the LoRA changes the re-detailed image");
    let recorded = &v["redetail"][0]["loras"];
    assert_eq!(recorded[0]["weight"], 0.8, "{v}");
    assert_eq!(recorded[0]["sha256"].as_str().map(str::len), Some(64), "{v}");
    let text = kiln_core::image::png_meta::read_png_text(&a_path).expect("text");
    let keys: Vec<&str> = text.iter().map(|c| c.keyword.as_str()).collect();
    assert!(keys.contains(&"kiln.upscale") && keys.contains(&"kiln.redetail"), "{keys:?}");
    let record: serde_json::Value =
        serde_json::from_str(&text.iter().find(|c| c.keyword == "kiln.redetail").expect("record").text)
            .expect("json");
    assert_eq!(record["prompt"], "a lighthouse");
    assert_eq!(record["strength"], 0.5);

    let o = kiln(
        &data,
        &["upscale", input.to_str().expect("utf8"), "--model", "nosuch", "--redetail", "--out", "never.png"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--redetail needs a diffusion model"));
}
