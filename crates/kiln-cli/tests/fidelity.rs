//! Edits and img2img keep what the user sees and what they did not ask to change: an image's
//! EXIF orientation is honoured (a phone photo tagged "rotate 90°" is used upright), and
//! inpaint/erase/outpaint keep a source's alpha and 16-bit depth, with every pixel the edit did
//! not touch written back bit-identical.
#![allow(clippy::unwrap_used)]

use image::{DynamicImage, ImageBuffer, Rgba};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(rel).display().to_string()
}

fn kiln_ok(args: &[&str]) -> Output {
    let data = std::env::temp_dir().join("kiln-cli-fidelity-test-data");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("KILN_DATA_DIR", data).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// Writes 8-bit RGB pixels as a PNG whose eXIf chunk carries `orientation` (1–8).
fn png_with_orientation(path: &Path, img: &image::RgbImage, orientation: u8) {
    let f = std::fs::File::create(path).unwrap();
    let mut info = png::Info::with_size(img.width(), img.height());
    info.color_type = png::ColorType::Rgb;
    info.bit_depth = png::BitDepth::Eight;
    // Big-endian TIFF header, one IFD entry: tag 0x0112 (Orientation), SHORT, count 1.
    let mut exif = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
    exif.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, orientation, 0, 0, 0, 0, 0, 0]);
    info.exif_metadata = Some(exif.into());
    let mut w = png::Encoder::with_info(f, info).unwrap().write_header().unwrap();
    w.write_image_data(img.as_raw()).unwrap();
}

#[test]
fn img2img_uses_the_image_upright_by_its_exif_orientation() {
    let dir = tempfile::tempdir().unwrap();
    // Upright 64x96 picture, and the same picture stored rotated 90° counter-clockwise with
    // EXIF orientation 6 ("rotate 90° clockwise to display"): both show the same image.
    let upright = image::RgbImage::from_fn(64, 96, |x, y| image::Rgb([(x * 4) as u8, (y * 2) as u8, 90]));
    let plain = dir.path().join("upright.png");
    upright.save(&plain).unwrap();
    let tagged = dir.path().join("tagged.png");
    png_with_orientation(&tagged, &image::imageops::rotate270(&upright), 6);
    let run = |init: &Path, out: &Path| {
        kiln_ok(&[
            "generate",
            "--model",
            &fixture("pipelines/sd1/model"),
            "--prompt",
            "a tower",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0.5",
            "--width",
            "64",
            "--height",
            "96",
            "--steps",
            "4",
            "--seed",
            "3",
            "--device",
            "cpu",
            "-q",
            "--out",
            out.to_str().unwrap(),
        ]);
        image::open(out).unwrap().to_rgb8()
    };
    let a = run(&plain, &dir.path().join("a.png"));
    let b = run(&tagged, &dir.path().join("b.png"));
    assert_eq!(a.dimensions(), (64, 96));
    assert!(a == b, "the EXIF-tagged init image was not used upright");
}

/// A 16-bit RGBA source made from the inpainting fixture: samples that an 8-bit copy cannot
/// hold (v·257 + 3) and an alpha ramp.
fn deep_source(dir: &Path) -> (PathBuf, ImageBuffer<Rgba<u16>, Vec<u16>>) {
    let base = image::open(fixture("inpaint/image.png")).unwrap().to_rgb8();
    let deep = ImageBuffer::from_fn(base.width(), base.height(), |x, y| {
        let p = base.get_pixel(x, y);
        let v = |c: u8| (u16::from(c) * 257).saturating_add(if c < 255 { 3 } else { 0 });
        Rgba([v(p[0]), v(p[1]), v(p[2]), 20_000 + (x as u16) * 400])
    });
    let path = dir.join("deep.png");
    deep.save(&path).unwrap();
    (path, deep)
}

#[test]
fn inpaint_keeps_alpha_and_16_bit_depth_outside_the_edit() {
    let dir = tempfile::tempdir().unwrap();
    let (source, deep) = deep_source(dir.path());
    let out = dir.path().join("out.png");
    let mask = fixture("inpaint/mask.png");
    kiln_ok(&[
        "inpaint",
        source.to_str().unwrap(),
        "--mask",
        &mask,
        "--prompt",
        "a fox",
        "--model",
        &fixture("inpaint/plain4/model"),
        "--steps",
        "3",
        "--seed",
        "4",
        "--device",
        "cpu",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ]);
    let DynamicImage::ImageRgba16(got) = image::open(&out).unwrap() else {
        panic!("a 16-bit RGBA source must give a 16-bit RGBA result")
    };
    assert_eq!(got.dimensions(), deep.dimensions());
    let blurred = kiln_core::image::mask::Mask::load(Path::new(&mask)).unwrap().blurred(4.0);
    let (mut kept, mut edited) = (0, 0);
    for (i, (x, y, p)) in got.enumerate_pixels().enumerate() {
        let s = deep.get_pixel(x, y);
        assert_eq!(p[3], s[3], "alpha changed at {x},{y}");
        if blurred.values()[i] == 0.0 {
            assert_eq!(p, s, "untouched pixel {x},{y} lost its 16-bit value");
            kept += 1;
        } else if p != s {
            edited += 1;
        }
    }
    assert!(kept > 1000 && edited > 100, "kept {kept}, edited {edited}");
}

#[test]
fn outpaint_keeps_the_source_alpha_and_makes_the_new_canvas_opaque() {
    let dir = tempfile::tempdir().unwrap();
    let base = image::open(fixture("inpaint/image.png")).unwrap().to_rgb8();
    let rgba = ImageBuffer::from_fn(base.width(), base.height(), |x, y| {
        let p = base.get_pixel(x, y);
        Rgba([p[0], p[1], p[2], if y < 32 { 255 } else { 100 }])
    });
    let source = dir.path().join("rgba.png");
    rgba.save(&source).unwrap();
    let out = dir.path().join("wide.png");
    kiln_ok(&[
        "outpaint",
        source.to_str().unwrap(),
        "--to",
        "16:9",
        "--model",
        &fixture("inpaint/inpaint9/model"),
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
    let DynamicImage::ImageRgba8(wide) = image::open(&out).unwrap() else {
        panic!("an RGBA source must give an RGBA result")
    };
    // 96x64 → 114x64 with the original at x = 9 (as the plain outpaint test shows).
    assert_eq!(wide.dimensions(), (114, 64));
    for (x, y, p) in wide.enumerate_pixels() {
        let want = if (9..105).contains(&x) { rgba.get_pixel(x - 9, y)[3] } else { 255 };
        assert_eq!(p[3], want, "alpha at {x},{y}");
    }
    // Past the 16 px overlap the original's pixels are unchanged, alpha included.
    for y in 0..64 {
        for x in 16..80 {
            assert_eq!(wide.get_pixel(9 + x, y), rgba.get_pixel(x, y));
        }
    }
}

#[test]
fn grade_keeps_the_generation_record_and_adds_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("gen.png");
    kiln_ok(&[
        "generate",
        "--model",
        &fixture("pipelines/sd1/model"),
        "--prompt",
        "a harbour",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "1",
        "--device",
        "cpu",
        "-q",
        "--out",
        generated.to_str().unwrap(),
    ]);
    let lut = fixture("lut/grade17.cube");
    let graded = dir.path().join("graded.png");
    let o = kiln_ok(&[
        "grade",
        generated.to_str().unwrap(),
        "--lut",
        &lut,
        "--strength",
        "0.8",
        "--json",
        "--out",
        graded.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outputs"][0]["interpolation"], "tetrahedral");
    let text = kiln_core::image::png_meta::read_png_text(&graded).unwrap();
    let find = |k: &str| text.iter().find(|c| c.keyword == k).map(|c| c.text.clone());
    assert!(find("kiln").is_some_and(|t| t.contains("a harbour")), "the generation record is kept");
    let record: serde_json::Value = serde_json::from_str(&find("kiln.grade").unwrap()).unwrap();
    assert_eq!(record["lut_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(record["strength"], 0.8);
    let table = kiln_core::image::lut::Lut3d::read(Path::new(&lut)).unwrap();
    let want = table.apply(
        &image::open(&generated).unwrap().to_rgb8(),
        kiln_core::image::lut::Interpolation::Tetrahedral,
        0.8,
    );
    assert!(image::open(&graded).unwrap().to_rgb8() == want);
}
