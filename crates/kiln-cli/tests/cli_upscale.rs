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
