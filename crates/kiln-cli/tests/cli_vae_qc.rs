//! `--vae-tiling` / `--vae-tile` on generate, and `kiln qc`.
// Tests fail by panicking: unwrap is the point here.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn kiln(dir: &Path, args: &[&str]) -> Output {
    // A named project must exist.
    std::fs::create_dir_all(dir.join("project")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_DATA_DIR", dir.join("data"))
        .env("KILN_PROJECT", dir.join("project"))
        .output()
        .unwrap()
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(FIXTURES).join(path)
}

fn generate<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
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
        "2",
        "--seed",
        "7",
        "--device",
        "cpu",
        "-q",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn generate_with_forced_tiles_is_close_to_untiled() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("pipelines/sd1/model");
    let model = model.to_str().unwrap();
    let (a, b) = (dir.path().join("untiled.png"), dir.path().join("tiled.png"));
    let o = kiln(dir.path(), &generate(model, a.to_str().unwrap(), &["--vae-tiling", "off"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o =
        kiln(dir.path(), &generate(model, b.to_str().unwrap(), &["--vae-tiling", "on", "--vae-tile", "32"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ia, ib) = (kiln_core::image::load_rgb(&a).unwrap(), kiln_core::image::load_rgb(&b).unwrap());
    let psnr = kiln_core::image::compare::psnr(&ia, &ib).unwrap();
    assert!(psnr >= 35.0, "tiled vs untiled {psnr:.1} dB");
    for bad in [&["--vae-tiling", "sometimes"][..], &["--vae-tile", "4"][..]] {
        let o = kiln(dir.path(), &generate(model, b.to_str().unwrap(), bad));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("vae-til"), "{err}");
    }
}

#[test]
fn qc_flags_a_pasted_blob_and_passes_a_clean_upscale() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("qc/source.png");
    let src = src.to_str().unwrap();
    let out_dir = dir.path().join("qc");
    let out_dir = out_dir.to_str().unwrap();
    for (image, verdict) in [("qc/clean_x4.png", "pass"), ("qc/blob_x4.png", "flag")] {
        let image = fixture(image);
        let o = kiln(
            dir.path(),
            &["qc", image.to_str().unwrap(), "--source", src, "--tile", "32", "--out-dir", out_dir, "--json"],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["report"]["verdict"], verdict);
        assert!(Path::new(v["heatmap"].as_str().unwrap()).is_file());
    }
    let blob = fixture("qc/blob_x4.png");
    let o =
        kiln(dir.path(), &["qc", blob.to_str().unwrap(), "--source", src, "--out-dir", out_dir, "--strict"]);
    assert_eq!(o.status.code(), Some(2));
    // No --source and no library that knows the file.
    let o = kiln(dir.path(), &["qc", blob.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--source"), "{err}");
}
