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

/// Runs kiln and asserts it succeeded (showing its stderr otherwise).
fn kiln_ok(args: &[&str]) -> Output {
    let o = kiln(args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
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
        let o = kiln_ok(&[
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
    kiln_ok(&[
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
    kiln_ok(&[
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
    let soft = fixture("mask.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inpaint", &image, "--mask", &small], "the mask is 50x40 but the image is 96x64"),
        (vec!["inpaint", &image, "--mask", &empty], "nothing to inpaint"),
        (vec!["inpaint", &image, "--mask", &full], "covers the whole image"),
        (vec!["inpaint", &image, "--mask", &text], "not a recognised image format"),
        (vec!["inpaint", &text, "--mask", &empty], "not a recognised image format"),
        (vec!["erase", &image, "--mask", &empty], "nothing to inpaint"),
        (vec!["erase", &image, "--mask", &soft, "--grow", "200"], "use a smaller grow"),
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
    kiln_ok(&[
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
        let o = kiln_ok(&args);
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
    let o = kiln_ok(&[
        "assets",
        "show",
        &report["library"]["asset_ids"][0].to_string(),
        "--project",
        &project,
        "--json",
    ]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["asset"]["kind"], "inpaint");
    assert_eq!(shown["lineage"].as_array().unwrap().len(), 2, "{shown}");

    // Past the project's budget (1.0 spent of 1.2; this job would cost 0.5) the job is refused
    // before anything runs, and nothing is written.
    let toml = std::fs::read_to_string(root.join("kiln.toml")).unwrap();
    std::fs::write(root.join("kiln.toml"), format!("[budget]\nlimit = 1.2\n{toml}")).unwrap();
    let third = root.join("third.png");
    let o = kiln(&[
        "inpaint",
        &fixture("image.png"),
        "--mask",
        &mask,
        "--prompt",
        "x",
        "--tier",
        "fix",
        "--project",
        &project,
        "--device",
        "cpu",
        "--out",
        third.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("budget"), "{err}");
    assert!(!third.exists());

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

/// PSNR (dB) of `got` against diffusers' float image over the pixels where `mask` >= 0.5.
fn psnr_inside(got: &image::RgbImage, want: &[f32], mask: &kiln_core::image::mask::Mask) -> f64 {
    let (mut se, mut n) = (0f64, 0usize);
    for (i, px) in got.pixels().enumerate() {
        if mask.values()[i] >= 0.5 {
            for c in 0..3 {
                let d = px.0[c] as f64 / 255.0 - want[i * 3 + c] as f64;
                se += d * d;
                n += 1;
            }
        }
    }
    10.0 * (n as f64 / se).log10()
}

/// `--init-latents` + `--blend diffusers` from the command line reproduce diffusers' own
/// StableDiffusionInpaintPipeline output (the plain4_pndm case of tests/fixtures/inpaint); latents of
/// the wrong shape are refused with the expected shape, and nothing is written.
#[test]
fn init_latents_and_diffusers_blend_reproduce_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.png");
    let (image, mask) = (fixture("image.png"), fixture("mask.png"));
    let common = [
        "inpaint",
        &image,
        "--mask",
        &mask,
        "--prompt",
        "a red fox sitting in the snow",
        "--negative",
        "blurry",
        "--model",
        &fixture("plain4/model"),
        "--steps",
        "5",
        "--guidance",
        "7.5",
        "--seed",
        "1",
        "--blend",
        "diffusers",
        "--region",
        "whole",
        "--device",
        "cpu",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut args = common.to_vec();
    let latents = fixture("latents.npy");
    args.extend(["--init-latents", &latents]);
    kiln_ok(&args);
    let want = kiln_core::candle::Tensor::read_npy(fixture("plain4_pndm.npy"))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let m = kiln_core::image::mask::Mask::load(Path::new(&mask)).unwrap();
    let p = psnr_inside(&rgb(&out), &want, &m);
    assert!(p >= 35.0, "PSNR inside the mask {p:.1} dB");
    // Another seed's noise (no --init-latents) is far from that reference.
    std::fs::remove_file(&out).unwrap();
    kiln_ok(&common);
    let p_other = psnr_inside(&rgb(&out), &want, &m);
    assert!(p_other < 30.0, "{p_other}");
    assert_eq!(record(&out)["inpaint"]["blend"], "diffusers");

    std::fs::remove_file(&out).unwrap();
    let wrong = dir.path().join("wrong.npy");
    let t = kiln_core::candle::Tensor::zeros(
        (1, 4, 8, 8),
        kiln_core::candle::DType::F32,
        &kiln_core::candle::Device::Cpu,
    )
    .unwrap();
    t.write_npy(&wrong).unwrap();
    let mut args = common.to_vec();
    args.extend(["--init-latents", wrong.to_str().unwrap()]);
    let o = kiln(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("[1, 4, 8, 8]") && err.contains("[1, 4, 8, 12]"), "{err}");
    assert!(!out.exists());
}

/// A mask given as an RGBA image's alpha (transparent = repaint) gives the same image as the
/// equivalent grayscale mask; grey levels stay soft (no rounding to 0/1).
#[test]
fn rgba_alpha_mask_equals_its_grayscale_mask() {
    let dir = tempfile::tempdir().unwrap();
    let gray = image::open(fixture("mask.png")).unwrap().to_luma8();
    assert!(gray.pixels().any(|p| p.0[0] > 0 && p.0[0] < 255), "the fixture mask has soft edges");
    let rgba = image::RgbaImage::from_fn(gray.width(), gray.height(), |x, y| {
        image::Rgba([10, 200, 30, 255 - gray.get_pixel(x, y).0[0]])
    });
    let rgba_path = dir.path().join("alpha.png");
    rgba.save(&rgba_path).unwrap();
    let loaded = kiln_core::image::mask::Mask::load(&rgba_path).unwrap();
    let from_gray = kiln_core::image::mask::Mask::load(Path::new(&fixture("mask.png"))).unwrap();
    assert!(loaded == from_gray, "the alpha mask differs from the grayscale one");
    assert!(loaded.values().iter().any(|&v| v > 0.0 && v < 1.0));
    let mut outs = Vec::new();
    for (name, m) in [("g.png", fixture("mask.png")), ("a.png", rgba_path.display().to_string())] {
        let out = dir.path().join(name);
        kiln_ok(&[
            "inpaint",
            &fixture("image.png"),
            "--mask",
            &m,
            "--prompt",
            "x",
            "--model",
            &fixture("plain4/model"),
            "--steps",
            "2",
            "--seed",
            "3",
            "--device",
            "cpu",
            "-q",
            "--out",
            out.to_str().unwrap(),
        ]);
        outs.push(rgb(&out));
    }
    assert_eq!(outs[0], outs[1]);
}

/// `--left/--right/--top/--bottom` with noise pre-fill, and `--reimpose on` for a 9-channel model.
#[test]
fn outpaint_sides_with_noise_fill_and_forced_reimposition() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixture("image.png");
    let input = rgb(Path::new(&image));
    let mut results = Vec::new();
    for reimpose in ["auto", "on"] {
        let out = dir.path().join(format!("{reimpose}.png"));
        let o = kiln_ok(&[
            "outpaint",
            &image,
            "--left",
            "16",
            "--bottom",
            "8",
            "--fill",
            "noise",
            "--overlap",
            "8",
            "--reimpose",
            reimpose,
            "--model",
            &fixture("inpaint9/model"),
            "--steps",
            "3",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ]);
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(report["unet"], "inpaint");
        let got = rgb(&out);
        assert_eq!(got.dimensions(), (112, 72));
        // The original sits at (16, 0); beyond the 8 px overlap (left side and bottom) it is exact.
        for y in 0..56 {
            for x in 8..96 {
                assert_eq!(got.get_pixel(16 + x, y), input.get_pixel(x, y), "({x}, {y})");
            }
        }
        let r = record(&out);
        assert_eq!(r["inpaint"]["extend"], serde_json::json!([16, 0, 0, 8]));
        assert_eq!(r["inpaint"]["fill"], "noise");
        assert_eq!(
            r["inpaint"]["reimpose"],
            if reimpose == "on" { serde_json::json!(true) } else { serde_json::Value::Null }
        );
        results.push(got);
    }
    assert_ne!(results[0], results[1], "--reimpose on changed nothing");
    let o = kiln(&[
        "outpaint",
        &image,
        "--left",
        "8",
        "--reimpose",
        "sometimes",
        "--model",
        &fixture("inpaint9/model"),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("reimpose"));
}

/// Each command's PNG record rebuilds, through kiln_core's replay helper, a request that gives
/// the same bytes (the second image of a `--count 2` batch, so per-image seeds are exercised).
#[test]
fn records_replay_bit_exactly() {
    use kiln_core::image::mask::Mask;
    use kiln_core::pipeline::inpaint::replay::{is_inpaint_record, request_from_record, RecordedInputs};
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.png");
    // 160x128 with a small spot, processed only-masked (native 64x64).
    image::RgbImage::from_fn(160, 128, |x, y| image::Rgb([(x * 3 % 256) as u8, (y * 5 % 256) as u8, 90]))
        .save(&big)
        .unwrap();
    let spot = dir.path().join("spot.png");
    image::GrayImage::from_fn(160, 128, |x, y| {
        image::Luma([if (100..116).contains(&x) && (40..52).contains(&y) { 255 } else { 0 }])
    })
    .save(&spot)
    .unwrap();
    let (big, spot) = (big.display().to_string(), spot.display().to_string());
    let jobs: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "inpaint",
            vec!["inpaint", &big, "--mask", &spot, "--prompt", "a fox", "--region", "only-masked"],
            "plain4",
        ),
        ("outpaint", vec!["outpaint", &big, "--left", "24", "--top", "8", "--fill", "noise"], "inpaint9"),
        ("erase", vec!["erase", &big, "--mask", &spot, "--grow", "4"], "plain4"),
    ];
    for (mode, mut args, model) in jobs {
        let out = dir.path().join(format!("{mode}.png"));
        let model_dir = fixture(&format!("{model}/model"));
        let out_s = out.display().to_string();
        args.extend([
            "--model", &model_dir, "--steps", "3", "--seed", "7", "--count", "2", "--device", "cpu",
            "--json", "--out", &out_s,
        ]);
        let o = kiln_ok(&args);
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let second = PathBuf::from(report["outputs"][1]["path"].as_str().unwrap());
        let chunks = kiln_core::image::png_meta::read_png_text(&second).unwrap();
        let text = &chunks.iter().find(|c| c.keyword == "kiln").unwrap().text;
        let rec: kiln_core::pipeline::metadata::ImageRecord = serde_json::from_str(text).unwrap();
        assert!(is_inpaint_record(&rec), "{mode}");
        assert_eq!((rec.seed, rec.batch_index), (8, 1));
        if mode == "inpaint" {
            assert!(rec.inpaint.as_ref().unwrap().only_masked, "{mode}: expected only-masked");
        }
        let inputs = RecordedInputs {
            image: kiln_core::image::load_rgb(Path::new(&rec.init_image.as_ref().unwrap().path)).unwrap(),
            mask: rec
                .inpaint
                .as_ref()
                .unwrap()
                .mask
                .as_ref()
                .map(|m| Mask::load(Path::new(&m.path)).unwrap()),
            init_latents: None,
        };
        let req = request_from_record(&rec, inputs).unwrap();
        let model = kiln_core::pipeline::model::LoadedModel::load(
            kiln_core::loaders::hub::ModelSource::Folder(PathBuf::from(&model_dir)),
            &kiln_core::candle::Device::Cpu,
            kiln_core::candle::DType::F32,
        )
        .unwrap();
        let again = kiln_core::pipeline::inpaint::inpaint_quiet(&model, &req).unwrap();
        assert_eq!(again.images[0].image, rgb(&second), "{mode}: replay differs");
        // The first image of the batch is a different image: the comparison can fail.
        assert_ne!(again.images[0].image, rgb(&out.with_file_name(format!("{mode}-0.png"))), "{mode}");
    }
}
