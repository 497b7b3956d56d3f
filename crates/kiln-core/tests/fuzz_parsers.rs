//! Mutation fuzzing of every parser kiln runs on untrusted bytes: safetensors, ncnn `.param`
//! and `.bin`, the `.pth` unpickler, ONNX, PNG text chunks, `.npy`, `.cube` LUTs, images (uploads), kiln.toml
//! (project and tier layers) and job specs as JSON request bodies. Each target starts from
//! valid inputs, applies random byte-level mutations (proptest strategies, so a failure is
//! shrunk to a small mutation list) and must return `Ok` or a clean `Err` — never panic, never
//! abort on an allocation, never hang.
//!
//! CI runs each target for a few seconds; a long run is
//! `KILN_FUZZ_SECONDS=600 cargo test --release -p kiln-core --test fuzz_parsers -- --nocapture --test-threads 1`
//! (`KILN_FUZZ_SEED` varies the stream; each target prints how many inputs it tried).
#![allow(clippy::unwrap_used)]

mod mutation;

use mutation::fuzz;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(rel)).unwrap()
}

fn label() -> PathBuf {
    PathBuf::from("fuzzed-input")
}

#[test]
fn safetensors() {
    fuzz("safetensors", vec![fixture("sr/srvgg-tiny-x4.safetensors")], |b| {
        let _ = kiln_core::loaders::store::load_safetensors(b, &label());
    });
}

#[test]
fn ncnn_param() {
    let bin = fixture("sr/srvgg-tiny-x4.bin");
    let seeds = vec![fixture("sr/srvgg-tiny-x4.param"), fixture("sr/rrdb-tiny-x4.param")];
    fuzz("ncnn-param", seeds, |b| {
        let text = String::from_utf8_lossy(b);
        let _ = kiln_core::loaders::ncnn::load_from(&text, &label(), &bin, &label());
    });
}

#[test]
fn ncnn_bin() {
    let param = String::from_utf8(fixture("sr/srvgg-tiny-x4.param")).unwrap();
    fuzz("ncnn-bin", vec![fixture("sr/srvgg-tiny-x4.bin")], |b| {
        let _ = kiln_core::loaders::ncnn::load_from(&param, &label(), b, &label());
    });
}

/// A `.pth` is a zip whose members are CRC-checked, so byte mutations of the file mostly test
/// the zip reader; the pickle stream is mutated inside a freshly written archive as well.
#[test]
fn pth_unpickler() {
    let pth = fixture("sr/srvgg-tiny-x4.pth");
    let mut zip = zip::ZipArchive::new(Cursor::new(pth.clone())).unwrap();
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        members.push((f.name().unwrap().to_string(), bytes));
    }
    let pickle = members.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    let rezip = |pkl: &[u8]| -> Vec<u8> {
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (i, (name, bytes)) in members.iter().enumerate() {
            out.start_file(name.as_str(), opts).unwrap();
            out.write_all(if i == pickle { pkl } else { bytes }).unwrap();
        }
        out.finish().unwrap().into_inner()
    };
    fuzz("pth-pickle", vec![members[pickle].1.clone()], |b| {
        let _ = kiln_core::loaders::pth::load_reader(Cursor::new(rezip(b)), &label());
    });
    fuzz("pth-zip", vec![pth], |b| {
        let _ = kiln_core::loaders::pth::load_reader(Cursor::new(b.to_vec()), &label());
    });
}

#[test]
fn onnx() {
    fuzz("onnx", vec![fixture("cutout/tiny_u2netp.onnx")], |b| {
        let _ = kiln_core::loaders::matting::load_onnx_bytes(b, &label(), "fuzzed");
    });
}

/// A PNG carrying every text chunk kind kiln reads (tEXt, zTXt, iTXt).
fn png_with_text() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 4, 3);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk("parameters".into(), "a lighthouse, Steps: 8, Seed: 42".into()).unwrap();
        enc.add_ztxt_chunk("kiln".into(), r#"{"mode":"txt2img","seed":42,"steps":8}"#.into()).unwrap();
        enc.add_itxt_chunk("Comment".into(), "phare à l'aube".into()).unwrap();
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[7u8; 36]).unwrap();
    }
    out
}

#[test]
fn png_text_chunks() {
    fuzz("png-text", vec![png_with_text()], |b| {
        let _ = kiln_core::image::png_meta::read_png_text_from(Cursor::new(b), &label());
    });
}

#[test]
fn npy() {
    fuzz("npy", vec![fixture("pipelines/sd1/latents.npy"), fixture("cutout/net_output.npy")], |b| {
        let _ = kiln_core::loaders::npy::parse(b, &label());
    });
}

#[test]
fn images() {
    let seeds =
        vec![fixture("inpaint/image.png"), fixture("sr/input_rgba_40x32.png"), fixture("cutout/photo.png")];
    fuzz("images", seeds, |b| {
        let _ = kiln_core::image::decode_bytes(b, 4096, &label());
    });
}

const KILN_TOML: &str = r#"# a studio project
[tiers.draft]
model = "stabilityai/sd-turbo"
revision = "b261bac6fd2cf515557d5d0707481eafa0485ec2"
width = 512
height = 512
steps = 1
guidance = 0.0
lane = "draft"
[tiers.draft.price]
credits_per_image = 0.01
credits_per_gpu_second = 0.002

[tiers.final]
model = "models/sdxl"
steps = 30
scheduler = "dpmpp-2m-karras"

[budget]
limit = 25.0
warn_at = 0.8

[policy]
drafts_per_final = 20
"#;

#[test]
fn kiln_toml() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kiln.toml");
    std::fs::write(&file, KILN_TOML).unwrap();
    kiln_core::library::Project::open(dir.path()).unwrap();
    kiln_core::tiers::TierRegistry::load(None, Some(&file)).unwrap();
    fuzz("kiln-toml", vec![KILN_TOML.as_bytes().to_vec()], |b| {
        std::fs::write(&file, b).unwrap();
        let _ = kiln_core::library::Project::open(dir.path());
        let _ = kiln_core::tiers::TierRegistry::load(None, Some(&file));
    });
}

#[test]
fn job_spec_json() {
    let seeds = [
        r#"{"kind":"generate","tier":"draft","prompt":"a lighthouse","width":512,"height":512,"count":4,"seed":7}"#,
        r#"{"kind":"draft","prompt":"a fox","count":20,"tier":"draft"}"#,
        r#"{"kind":"promote","draft":{"asset":12},"tier":"final","strength":0.5,"upscale":"4k"}"#,
        r#"{"kind":"inpaint","mode":"outpaint","tier":"final","image":{"upload":"ab12"},"prompt":"sea","extend":{"to":"16:9"}}"#,
        r#"{"kind":"upscale","image":{"asset":3},"tier":"upscale","tile":256,"to":"4k"}"#,
        r#"{"kind":"replay","asset":{"asset":5}}"#,
    ];
    for s in seeds {
        let spec: kiln_core::jobs::spec::JobSpec =
            serde_json::from_str(s).map_err(|e| format!("{s}: {e}")).unwrap();
        spec.validate().map_err(|e| format!("{s}: {e}")).unwrap();
    }
    fuzz("job-spec-json", seeds.iter().map(|s| s.as_bytes().to_vec()).collect(), |b| {
        if let Ok(spec) = serde_json::from_slice::<kiln_core::jobs::spec::JobSpec>(b) {
            let _ = spec.validate();
            let _ = spec.check_remote();
        }
    });
}

#[test]
fn cube_luts() {
    fuzz("cube", vec![fixture("lut/grade2.cube"), fixture("lut/grade17.cube")], |b| {
        let _ = kiln_core::image::lut::Lut3d::parse(&String::from_utf8_lossy(b), &label());
    });
}
