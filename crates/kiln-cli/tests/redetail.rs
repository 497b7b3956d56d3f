//! `promote --upscale … --redetail`: the final, its upscale and the re-detailed upscale, each a
//! library asset, child of the one before, with the re-detail step's parameters, timings and
//! cost recorded, and the library consistent.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").canonicalize().unwrap()
}

fn kiln(root: &Path, args: &[&str]) -> serde_json::Value {
    let o = support::kiln(root).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

/// A project whose draft and final tiers are the tiny SD1 model (the final priced per image)
/// and whose upscale tier is the tiny SRVGG.
fn chain_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "[tiers.draft]\nmodel = \"{0}\"\nwidth = 64\nheight = 64\nsteps = 2\nlane = \"draft\"\n\
             [tiers.final]\nmodel = \"{0}\"\nwidth = 64\nheight = 64\nsteps = 4\n\
             [tiers.final.price]\ncredits_per_image = 0.5\n\
             [tiers.upscale]\nmodel = \"{1}\"\n",
            f.join("pipelines/sd1/model").display(),
            f.join("sr/srvgg-tiny-x4.safetensors").display()
        ),
    )
    .unwrap();
    dir
}

#[test]
fn promote_upscale_redetail_records_the_chain() {
    let dir = chain_project();
    let root = dir.path();
    kiln(root, &["draft", "a lighthouse", "-n", "1", "--seed", "5", "--device", "cpu", "-q"]);
    let v = kiln(
        root,
        &[
            "promote",
            "1",
            "--upscale",
            "2",
            "--redetail",
            "--redetail-strength",
            "0.5",
            "--redetail-tile",
            "64",
            "--device",
            "cpu",
            "--json",
        ],
    );
    let rd = &v["redetailed"];
    assert_eq!(rd["output_size"], serde_json::json!([128, 128]), "{v}");
    let (up_id, rd_id) = (v["upscaled"]["asset_id"].as_i64().unwrap(), rd["asset_id"].as_i64().unwrap());
    assert_eq!(rd["parent_asset_id"].as_i64(), Some(up_id));
    let credits = rd["credits"].as_f64().unwrap();
    assert!((0.5..0.6).contains(&credits), "the final tier's price per image plus its seconds: {credits}");

    let show = kiln(root, &["assets", "show", &rd_id.to_string(), "--json"]);
    let text = show.to_string();
    assert!(text.contains("\"step\":\"redetail\"") && text.contains("a lighthouse"), "{show}");
    let check = kiln(root, &["assets", "check", "--json"]);
    assert_eq!(check["consistent"], true, "{check}");
    let report = kiln(root, &["report", "--json"]);
    assert_eq!(report["jobs"], 4, "draft, final, upscale, re-detail: {report}");
    assert!(report["total_credits"].as_f64().unwrap() > 1.0, "{report}");

    // Re-detail without an upscale is refused before anything runs.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["promote", "1", "--redetail", "--device", "cpu"])
        .env("KILN_PROJECT", root)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--upscale"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_redetailed_asset_replays_bit_exact() {
    let dir = chain_project();
    let root = dir.path();
    kiln(root, &["draft", "a harbour", "-n", "1", "--seed", "9", "--device", "cpu", "-q"]);
    let v = kiln(
        root,
        &[
            "promote",
            "1",
            "--upscale",
            "2",
            "--redetail",
            "--redetail-tile",
            "64",
            "--device",
            "cpu",
            "--json",
        ],
    );
    let rd = v["redetailed"]["asset_id"].as_i64().unwrap();
    // Generation, upscale and re-detail again, from the records alone.
    let r = kiln(root, &["replay", &rd.to_string(), "--device", "cpu", "--json"]);
    assert_eq!(r["bit_exact"], true, "{r}");
    let replayed = image::open(r["path"].as_str().unwrap()).unwrap();
    assert_eq!((replayed.width(), replayed.height()), (128, 128));
    // No intermediate file of the chain is left beside the replay.
    let left: Vec<_> = std::fs::read_dir(root.join("assets/replays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    let check = kiln(root, &["assets", "check", "--json"]);
    assert_eq!(check["consistent"], true, "{check}");
}

/// A LoRA on the re-detail step (after the tier's own): merged, recorded on the asset with its
/// hash and weight, and merged again by replay, bit-exact; a path over HTTP is refused.
#[test]
fn a_redetail_lora_is_recorded_and_replayed() {
    let dir = chain_project();
    let root = dir.path();
    kiln(root, &["draft", "a harbour", "-n", "1", "--seed", "9", "--device", "cpu", "-q"]);
    let lora = format!("{}:0.8", fixtures().join("lora/sd1_kohya.safetensors").display());
    let promote = |extra: &[&str]| {
        let mut args =
            vec!["promote", "1", "--upscale", "2", "--redetail", "--redetail-tile", "64", "--device", "cpu"];
        args.extend(extra);
        args.push("--json");
        let v = kiln(root, &args);
        let id = v["redetailed"]["asset_id"].as_i64().unwrap();
        let path = root.join(
            kiln(root, &["assets", "show", &id.to_string(), "--json"])["asset"]["path"].as_str().unwrap(),
        );
        (id, image::open(path).unwrap().to_rgb8())
    };
    let (_, plain) = promote(&[]);
    let (rd, with_lora) = promote(&["--redetail-lora", &lora]);
    assert!(plain != with_lora, "the LoRA changes the re-detailed image");
    let show = kiln(root, &["assets", "show", &rd.to_string(), "--json"]).to_string();
    assert!(show.contains("\"loras\"") && show.contains("\"weight\":0.8"), "{show}");
    let r = kiln(root, &["replay", &rd.to_string(), "--device", "cpu", "--json"]);
    assert_eq!(r["bit_exact"], true, "{r}");

    // Over HTTP a LoRA is a library name, never a path.
    let spec = kiln_core::jobs::spec::JobSpec::Upscale(kiln_core::jobs::spec::UpscaleSpec {
        image: kiln_core::jobs::spec::ImageRef::Asset(1),
        redetail: Some(kiln_core::jobs::spec::RedetailSpec {
            loras: vec![lora.clone()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = spec.check_remote().unwrap_err().to_string();
    assert!(err.contains("path"), "{err}");
}
