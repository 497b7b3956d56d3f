//! The layout cache end to end: a model's first CPU load writes its pre-laid-out weights, later
//! loads map them and compute the same bits; a cache file that is truncated, from another layout
//! version, or whose sources changed is rebuilt and never used.
//!
//! One test function: the cache's folder comes from `KILN_DATA_DIR`, which is process-wide.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device};
use kiln_core::loaders::hub::ModelSource;
use kiln_core::pipeline::generate::{generate, GenerateRequest, NoProgress};
use kiln_core::pipeline::model::LoadedModel;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sd1/model")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A load, and the layout files it writes in the background.
fn load(dir: &Path) -> LoadedModel {
    let model = LoadedModel::load(ModelSource::Folder(dir.to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    kiln_core::loaders::layout_cache::wait_for_writes();
    model
}

fn pixels(model: &LoadedModel) -> Vec<f32> {
    let request = GenerateRequest::txt2img("a lighthouse at dusk", (64, 64), 2, 5.0, 7);
    let out = generate(model, &request, &mut NoProgress).unwrap();
    out.images[0].pixels.flatten_all().unwrap().to_vec1().unwrap()
}

/// The cache files, by component.
fn files(data: &Path) -> Vec<(String, PathBuf, u64)> {
    let dir = data.join("layout-cache");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .map(|r| r.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.path().extension().is_some_and(|x| x == "kiln-layout"))
        .map(|e| {
            let meta =
                kiln_core::loaders::layout_cache::LayoutFile::open(&e.path()).map(|f| f.meta.component);
            (meta.unwrap_or_default(), e.path(), e.metadata().unwrap().len())
        })
        .collect();
    out.sort();
    out
}

fn unet_file(data: &Path) -> (PathBuf, u64) {
    let (_, path, len) = files(data).into_iter().find(|(c, _, _)| c == "unet").unwrap();
    (path, len)
}

fn uncached(dir: &Path) -> Vec<f32> {
    std::env::set_var(kiln_core::env::KILN_LAYOUT_CACHE, "off");
    let model = load(dir);
    std::env::remove_var(kiln_core::env::KILN_LAYOUT_CACHE);
    assert_eq!(model.reuse.mapped, 0);
    pixels(&model)
}

#[test]
fn pre_laid_out_weights_are_written_once_mapped_later_and_never_trusted_when_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, model_dir) = (tmp.path().join("data"), tmp.path().join("model"));
    copy_dir(&fixture(), &model_dir);
    std::env::set_var(kiln_core::env::KILN_DATA_DIR, &data);
    std::env::remove_var(kiln_core::env::KILN_LAYOUT_CACHE);
    std::env::remove_var(kiln_core::env::KILN_LAYOUT_CACHE_MAX);

    let reference = uncached(&model_dir);
    assert!(files(&data).is_empty(), "a load with the cache off writes nothing");

    // First load: reads every tensor, writes one file per component.
    let first = load(&model_dir);
    assert_eq!(first.reuse.mapped, 0);
    let total = first.reuse.read;
    let written: Vec<String> = files(&data).into_iter().map(|(c, _, _)| c).collect();
    assert_eq!(written, ["text_encoder", "unet", "vae"]);
    assert_eq!(pixels(&first), reference);

    // Later loads map the layers: most tensors are never read, and the bits are the same.
    let mapped = load(&model_dir);
    let r = mapped.reuse;
    println!("mapped load: {r:?} of {total} tensors");
    assert_eq!(r.read + r.mapped, total);
    assert!(r.mapped * 2 > total, "{r:?}");
    assert_eq!(pixels(&mapped), reference);

    // A truncated file is not used, and the load writes it again whole.
    let (unet, len) = unet_file(&data);
    std::fs::OpenOptions::new().write(true).open(&unet).unwrap().set_len(len / 2).unwrap();
    let rebuilt = load(&model_dir);
    assert!(rebuilt.reuse.mapped < r.mapped, "{:?}", rebuilt.reuse);
    assert_eq!(pixels(&rebuilt), reference);
    assert_eq!(unet_file(&data), (unet.clone(), len));
    assert_eq!(load(&model_dir).reuse, r);

    // A file from another layout version is not used either.
    let mut bytes = std::fs::read(&unet).unwrap();
    let pattern = br#"\"version\":1,"#;
    let at = bytes.windows(pattern.len()).position(|w| w == pattern).unwrap();
    bytes[at + pattern.len() - 2] = b'9';
    std::fs::write(&unet, &bytes).unwrap();
    let rebuilt = load(&model_dir);
    assert!(rebuilt.reuse.mapped < r.mapped, "{:?}", rebuilt.reuse);
    assert_eq!(pixels(&rebuilt), reference);
    assert_eq!(load(&model_dir).reuse, r);

    // A changed source weight file gets a new cache file; the old one is never used for it.
    let weights = model_dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 4;
    let v = f32::from_le_bytes(bytes[last..].try_into().unwrap()) + 0.5;
    bytes[last..].copy_from_slice(&v.to_le_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    let changed_reference = uncached(&model_dir);
    assert_ne!(changed_reference, reference);
    let changed = load(&model_dir);
    assert!(changed.reuse.mapped < r.mapped, "{:?}", changed.reuse);
    assert_eq!(pixels(&changed), changed_reference);
    let unets = files(&data).into_iter().filter(|(c, _, _)| c == "unet").count();
    assert_eq!(unets, 2, "the changed source's layout is a file of its own");
    let remapped = load(&model_dir);
    assert_eq!(remapped.reuse, r);
    assert_eq!(pixels(&remapped), changed_reference);
}
