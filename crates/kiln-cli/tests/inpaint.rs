//! `kiln inpaint`, `kiln outpaint` and `kiln erase` end to end on the tiny inpainting fixtures
//! (tests/fixtures/inpaint): outputs, metadata, the exact composite, and clear errors with
//! nothing written on bad input.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/inpaint").join(rel).display().to_string()
}

fn kiln(args: &[&str]) -> Output {
    let data = std::env::temp_dir().join("kiln-cli-inpaint-test-data");
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("KILN_DATA_DIR", data).output().unwrap()
}

fn record(path: &Path) -> serde_json::Value {
    let chunks = kiln_core::image::png_meta::read_png_text(path).unwrap();
    let kiln = chunks.iter().find(|c| c.keyword == "kiln").unwrap();
    serde_json::from_str(&kiln.text).unwrap()
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

#[test]
fn inpaint_writes_metadata_keeps_unmasked_pixels_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let outs: Vec<PathBuf> = ["a.png", "b.png"].iter().map(|n| dir.path().join(n)).collect();
    let (image, mask, model) = (fixture("image.png"), fixture("mask.png"), fixture("plain4/model"));
    for out in &outs {
        let o = kiln(&[
            "inpaint",
            &image,
            "--mask",
            &mask,
            "--prompt",
            "a fox",
            "--model",
            &model,
            "--steps",
            "3",
            "--seed",
            "4",
            "--device",
            "cpu",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(report["unet"], "plain");
        assert_eq!(report["plan"]["only_masked"], false);
    }
    let (a, b) = (rgb(&outs[0]), rgb(&outs[1]));
    assert_eq!(a, b, "same seed, same pixels");
    // Outside the feathered mask (3 sigma = 12 px beyond any masked pixel) nothing changed.
    let input = rgb(Path::new(&image));
    let m = kiln_core::image::mask::Mask::load(Path::new(&mask)).unwrap().blurred(4.0);
    let mut kept = 0;
    for (i, (p, q)) in input.pixels().zip(a.pixels()).enumerate() {
        if m.values()[i] == 0.0 {
            assert_eq!(p, q);
            kept += 1;
        }
    }
    assert!(kept > 1000, "{kept}");
    assert_ne!(input, a);
    let r = record(&outs[0]);
    assert_eq!(r["mode"], "inpaint");
    assert_eq!(r["seed"], 4);
    assert_eq!(r["inpaint"]["blend"], "kiln");
    assert_eq!(r["inpaint"]["mask_blur"], 4.0);
    assert_eq!(r["inpaint"]["mask"]["path"], mask);
    assert_eq!(r["init_image"]["path"], image);
}

#[test]
fn outpaint_to_aspect_and_erase() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("wide.png");
    let image = fixture("image.png");
    let o = kiln(&[
        "outpaint",
        &image,
        "--to",
        "16:9",
        "--model",
        &fixture("inpaint9/model"),
        "--steps",
        "3",
        "--seed",
        "1",
        "--device",
        "cpu",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wide = rgb(&out);
    assert_eq!(wide.dimensions(), (114, 64));
    let input = rgb(Path::new(&image));
    // The original sits at x = 9; past the 16 px overlap it is unchanged.
    for y in 0..64 {
        for x in 16..80 {
            assert_eq!(wide.get_pixel(9 + x, y), input.get_pixel(x, y));
        }
    }
    let r = record(&out);
    assert_eq!(r["mode"], "outpaint");
    assert_eq!(r["inpaint"]["extend"], serde_json::json!([9, 9, 0, 0]));

    let erased = dir.path().join("erased.png");
    let o = kiln(&[
        "erase",
        &image,
        "--mask",
        &fixture("mask.png"),
        "--model",
        &fixture("plain4/model"),
        "--steps",
        "3",
        "--seed",
        "1",
        "--device",
        "cpu",
        "-q",
        "--out",
        erased.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = record(&erased);
    assert_eq!(r["mode"], "erase");
    assert_eq!(r["inpaint"]["grow"], 8);
    assert!(r["negative_prompt"].as_str().unwrap().contains("watermark"));
}

#[test]
fn bad_masks_fail_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, img: image::GrayImage| {
        let p = dir.path().join(name);
        img.save(&p).unwrap();
        p.display().to_string()
    };
    let small = write("small.png", image::GrayImage::from_pixel(50, 40, image::Luma([255])));
    let empty = write("empty.png", image::GrayImage::new(96, 64));
    let full = write("full.png", image::GrayImage::from_pixel(96, 64, image::Luma([255])));
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not an image").unwrap();
    let text = text.display().to_string();
    let image = fixture("image.png");
    let model = fixture("plain4/model");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inpaint", &image, "--mask", &small], "the mask is 50x40 but the image is 96x64"),
        (vec!["inpaint", &image, "--mask", &empty], "nothing to inpaint"),
        (vec!["inpaint", &image, "--mask", &full], "covers the whole image"),
        (vec!["inpaint", &image, "--mask", &text], "not a recognised image format"),
        (vec!["inpaint", &text, "--mask", &empty], "not a recognised image format"),
        (vec!["erase", &image, "--mask", &empty], "nothing to inpaint"),
        (vec!["outpaint", &image], "nothing to extend"),
        (vec!["outpaint", &image, "--to", "16:0"], "aspect ratio"),
    ];
    for (mut args, expected) in cases {
        let out = dir.path().join("out.png");
        let out_s = out.display().to_string();
        args.extend(["--model", &model, "--prompt", "x", "--device", "cpu", "-q", "--out", &out_s]);
        let o = kiln(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{args:?} wrote {out_s}");
    }
    // With --resize-mask the smaller mask is stretched to the image and the run succeeds.
    let out = dir.path().join("resized.png");
    let o = kiln(&[
        "inpaint",
        &image,
        "--mask",
        &write(
            "half.png",
            image::GrayImage::from_fn(48, 32, |x, _| image::Luma([if x > 30 { 255 } else { 0 }])),
        ),
        "--resize-mask",
        "--model",
        &model,
        "--prompt",
        "x",
        "--steps",
        "2",
        "--device",
        "cpu",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rgb(&out).dimensions(), (96, 64));
}

#[test]
fn tier_sets_the_defaults_and_the_library_records_the_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let model = std::fs::canonicalize(fixture("plain4/model")).unwrap();
    std::fs::write(
        root.join("kiln.toml"),
        format!(
            "[tiers.fix]
model = \"{}\"
width = 32
height = 32
steps = 3
scheduler = \"euler\"
guidance = 3.0
negative_prompt = \"murky\"
price = {{ credits_per_image = 0.5 }}
",
            model.display()
        ),
    )
    .unwrap();
    let project = root.display().to_string();
    let mask = fixture("mask.png");
    let run = |input: &str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "inpaint",
            input,
            "--mask",
            &mask,
            "--prompt",
            "a fox",
            "--tier",
            "fix",
            "--project",
            &project,
            "--seed",
            "2",
            "--device",
            "cpu",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = kiln(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let first = root.join("first.png");
    let report = run(&fixture("image.png"), &first, &["--region", "only-masked"]);
    assert_eq!(report["tier"], "fix");
    assert_eq!(report["scheduler"], "euler");
    assert_eq!(report["credits"], 0.5);
    // Only-masked mode processes at the tier's 32x32 pixel count (at the crop's aspect).
    let (pw, ph) = (
        report["plan"]["process_width"].as_u64().unwrap(),
        report["plan"]["process_height"].as_u64().unwrap(),
    );
    assert!((768..=1344).contains(&(pw * ph)), "{pw}x{ph}");
    assert!(report["library"]["parent_asset_id"].is_null(), "{report}");
    let first_id = report["library"]["asset_ids"][0].as_i64().unwrap();
    let r = record(&first);
    assert_eq!((r["steps"].clone(), r["guidance"].clone()), (serde_json::json!(3), serde_json::json!(3.0)));
    assert_eq!(r["negative_prompt"], "murky");
    assert_eq!(r["tier"], "fix");
    assert_eq!(r["scheduler"], "euler");

    // Editing the recorded output again: flags override the tier, and the new asset's parent is
    // the first one.
    let second = root.join("second.png");
    let report = run(first.to_str().unwrap(), &second, &["--steps", "2", "--negative", "dark"]);
    assert_eq!(report["library"]["parent_asset_id"], first_id, "{report}");
    let r = record(&second);
    assert_eq!(r["steps"], 2);
    assert_eq!(r["negative_prompt"], "dark");
    let o = kiln(&[
        "assets",
        "show",
        &report["library"]["asset_ids"][0].to_string(),
        "--project",
        &project,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["asset"]["kind"], "inpaint");
    assert_eq!(shown["lineage"].as_array().unwrap().len(), 2, "{shown}");

    // --model and --tier exclude each other; an unknown tier names itself.
    let o = kiln(&[
        "inpaint",
        &fixture("image.png"),
        "--mask",
        &fixture("mask.png"),
        "--prompt",
        "x",
        "--tier",
        "nope",
        "--project",
        &project,
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"), "{}", String::from_utf8_lossy(&o.stderr));
}
