//! Imported super-resolution models: a content-addressed store under the user's data dir.
//!
//! Layout: `<data>/models/blobs/<sha256>.safetensors` (tensors with basicsr names, the
//! architecture in the safetensors metadata) and `<data>/models/index.json` (name -> blob).
//! Every import format (ncnn pair, `.pth`, `.safetensors`, or those inside a `.whl`/`.zip`)
//! becomes one canonical blob, so loading is the same whatever the source was.

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ncnn, pth};
use crate::env;
use crate::error::{Error, Result};
use crate::models::sr::SrSpec;

/// Safetensors metadata key holding the [`SrSpec`] as JSON.
pub const SPEC_KEY: &str = "kiln.sr_spec";
/// Largest archive member kiln reads when importing from a `.whl`/`.zip`.
const MAX_MEMBER_BYTES: u64 = 2 << 30;

/// A super-resolution model ready to build: architecture + tensors (CPU, stored dtype).
#[derive(Debug)]
pub struct SrWeights {
    pub name: String,
    pub spec: SrSpec,
    pub tensors: HashMap<String, Tensor>,
    /// sha256 of the canonical blob, when loaded from the store.
    pub sha256: Option<String>,
}

/// One entry of `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoreEntry {
    pub name: String,
    pub sha256: String,
    pub arch: String,
    pub scale: usize,
    pub params: usize,
    /// Original file name(s) the model was imported from.
    pub source: String,
    pub spec: SrSpec,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    models: BTreeMap<String, StoreEntry>,
}

/// kiln's data dir ([`env::data_dir`]), or an error saying which variable to set.
pub fn data_dir() -> Result<PathBuf> {
    env::data_dir()
        .ok_or_else(|| Error::arg("data dir", format!("set {} or {}", env::KILN_DATA_DIR, env::HOME)))
}

/// The model store rooted at a data dir.
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn open_default() -> Result<Self> {
        Ok(Self::at(data_dir()?))
    }

    pub fn at(data_dir: impl Into<PathBuf>) -> Self {
        Self { root: data_dir.into().join("models") }
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{sha256}.safetensors"))
    }

    fn read_index(&self) -> Result<Index> {
        crate::files::read_json_or_default(&self.index_path())
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(index).map_err(|e| Error::config(self.index_path(), e.to_string()))?;
        write_atomic(&self.index_path(), &json)
    }

    /// All imported models, sorted by name.
    pub fn list(&self) -> Result<Vec<StoreEntry>> {
        Ok(self.read_index()?.models.into_values().collect())
    }

    /// Looks a model up by name (case-insensitive).
    pub fn find(&self, name: &str) -> Result<Option<StoreEntry>> {
        Ok(self.read_index()?.models.into_values().find(|e| e.name.eq_ignore_ascii_case(name)))
    }

    /// Adds weights under `name`. A name already pointing at other weights is refused unless
    /// `replace` (re-pointing a name silently would change what every tier using it runs).
    /// The tensors must build the architecture they claim, so wrong shapes are never stored.
    pub fn add(
        &self,
        name: &str,
        source: &str,
        spec: &SrSpec,
        tensors: &HashMap<String, Tensor>,
        replace: bool,
    ) -> Result<StoreEntry> {
        let prepared = prepare(name, source, spec, tensors)?;
        Ok(self.commit(vec![prepared], replace)?.remove(0))
    }

    /// Imports every model found in `path` (file, folder, `.whl`/`.zip`). Every model is
    /// checked (shapes, name conflicts) before anything is written, so a bad one leaves the
    /// store unchanged.
    pub fn import(&self, path: &Path, replace: bool) -> Result<Vec<StoreEntry>> {
        let found = find_models(path)?;
        if found.is_empty() {
            return Err(Error::not_found(
                "super-resolution weights (.param+.bin, .pth, .safetensors)",
                path,
                "pass a weight file, a folder or a .whl holding them",
            ));
        }
        let prepared = found
            .iter()
            .map(|w| prepare(&w.name, &w.source, &w.spec, &w.tensors))
            .collect::<Result<Vec<_>>>()?;
        self.commit(prepared, replace)
    }

    fn commit(&self, prepared: Vec<Prepared>, replace: bool) -> Result<Vec<StoreEntry>> {
        let mut index = self.read_index()?;
        let stored: Vec<super::NamedModel> = match replace {
            true => vec![],
            false => {
                index.models.values().map(|e| (e.name.as_str(), e.sha256.as_str(), e.arch.as_str())).collect()
            }
        };
        let incoming: Vec<super::NamedModel> = prepared
            .iter()
            .map(|p| (p.entry.name.as_str(), p.entry.sha256.as_str(), p.entry.arch.as_str()))
            .collect();
        super::check_import_names(&stored, &incoming)?;
        let mut out = Vec::new();
        for p in prepared {
            let blob = self.blob_path(&p.entry.sha256);
            if !blob.exists() {
                write_atomic(&blob, &p.bytes)?;
            }
            index.models.retain(|k, _| !k.eq_ignore_ascii_case(&p.entry.name));
            index.models.insert(p.entry.name.clone(), p.entry.clone());
            out.push(p.entry);
        }
        self.write_index(&index)?;
        Ok(out)
    }

    /// Resolves `--model`: an existing path is loaded directly, anything else is a store name.
    pub fn resolve(&self, model: &str) -> Result<SrWeights> {
        let path = Path::new(model);
        if path.is_file() {
            return load_file(path);
        }
        let Some(entry) = self.find(model)? else {
            let names: Vec<String> = self.list()?.into_iter().map(|e| e.name).collect();
            let hint = if names.is_empty() {
                "no models imported yet; see `kiln models import` in docs/upscale.md".to_string()
            } else {
                format!("imported: {}", names.join(", "))
            };
            return Err(Error::not_found(
                format!("model `{model}` (neither a file nor an imported name)"),
                path,
                hint,
            ));
        };
        let blob = self.blob_path(&entry.sha256);
        let bytes = fs_err::read(&blob)?;
        // The store is content-addressed: a blob whose bytes no longer hash to its name was
        // changed on disk, and is refused rather than used.
        let actual = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if actual != entry.sha256 {
            return Err(Error::Weights {
                path: blob.clone(),
                msg: format!(
                    "the stored model `{}` was changed on disk (sha256 {actual}, recorded {}); import it again",
                    entry.name, entry.sha256
                ),
            });
        }
        let mut w = load_safetensors(&bytes, &blob)?;
        w.name = entry.name;
        w.sha256 = Some(entry.sha256);
        Ok(w)
    }
}

/// A model ready to store: its canonical blob and index entry.
struct Prepared {
    entry: StoreEntry,
    bytes: Vec<u8>,
}

fn prepare(name: &str, source: &str, spec: &SrSpec, tensors: &HashMap<String, Tensor>) -> Result<Prepared> {
    // Building the network checks every tensor the architecture needs, name and shape.
    let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    crate::models::sr::SrNet::new(spec, vb).map_err(|e| Error::Weights {
        path: PathBuf::from(source),
        msg: format!("the tensors do not fit the {} architecture they claim: {e}", spec.arch_name()),
    })?;
    let bytes = serialize(spec, tensors)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let entry = StoreEntry {
        name: name.to_string(),
        sha256,
        arch: spec.arch_name().to_string(),
        scale: spec.scale(),
        params: spec.param_count(),
        source: source.to_string(),
        spec: spec.clone(),
    };
    Ok(Prepared { entry, bytes })
}

/// A model found while importing.
struct Found {
    name: String,
    source: String,
    spec: SrSpec,
    tensors: HashMap<String, Tensor>,
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

fn extension(path: &Path) -> String {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

/// Loads one weight file of any supported format (`.param` finds its `.bin`, and vice versa).
pub fn load_file(path: &Path) -> Result<SrWeights> {
    let (spec, tensors) = match extension(path).as_str() {
        "param" => {
            let m = ncnn::load(path, &ncnn::bin_path_for(path))?;
            (m.spec, m.tensors)
        }
        "bin" => {
            let m = ncnn::load(&path.with_extension("param"), path)?;
            (m.spec, m.tensors)
        }
        "pth" | "pt" | "ckpt" => {
            let tensors = pth::load(path)?;
            (detect(&tensors, path)?, tensors)
        }
        "safetensors" => {
            let w = load_safetensors(&fs_err::read(path)?, path)?;
            (w.spec, w.tensors)
        }
        other => {
            return Err(Error::Unsupported(format!(
                "weight file extension `.{other}` ({}); expected .param, .bin, .pth or .safetensors",
                path.display()
            )))
        }
    };
    Ok(SrWeights { name: stem(path), spec, tensors, sha256: None })
}

fn detect(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<SrSpec> {
    let shapes = tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    SrSpec::detect(&shapes, path)
}

/// Reads super-resolution weights from safetensors bytes (the store's blobs, imported files);
/// `path` names the source in errors.
pub fn load_safetensors(bytes: &[u8], path: &Path) -> Result<SrWeights> {
    let bad = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
    let spec = match meta.metadata().as_ref().and_then(|m| m.get(SPEC_KEY)) {
        Some(json) => serde_json::from_str::<SrSpec>(json).map_err(|e| bad(format!("{SPEC_KEY}: {e}")))?,
        None => detect(&tensors, path)?,
    };
    spec.validate()?;
    Ok(SrWeights { name: stem(path), spec, tensors, sha256: None })
}

fn serialize(spec: &SrSpec, tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let json = serde_json::to_string(spec).map_err(|e| Error::arg("model spec", e.to_string()))?;
    let meta = HashMap::from([(SPEC_KEY.to_string(), json)]);
    // Sorted for a deterministic byte stream (the blob's address).
    let mut items: Vec<(&String, &Tensor)> = tensors.iter().collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let contiguous: Vec<(String, Tensor)> =
        items.into_iter().map(|(k, t)| Ok((k.clone(), t.contiguous()?))).collect::<Result<_>>()?;
    safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
        .map_err(|e| Error::arg("model tensors", e.to_string()))
}

pub use crate::files::write_atomic;

/// Finds importable models in a file, folder (recursively) or archive.
fn find_models(path: &Path) -> Result<Vec<Found>> {
    if path.is_dir() {
        let mut out = Vec::new();
        for p in crate::files::walk_files(path)? {
            match extension(&p).as_str() {
                "param" | "pth" | "safetensors" | "whl" => out.extend(find_models(&p)?),
                _ => {}
            }
        }
        return Ok(out);
    }
    if !path.exists() {
        return Err(Error::not_found("import path", path, ""));
    }
    match extension(path).as_str() {
        "whl" | "zip" => find_in_archive(path),
        _ => {
            let w = load_file(path)?;
            let source = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(vec![Found { name: w.name, source, spec: w.spec, tensors: w.tensors }])
        }
    }
}

fn find_in_archive(path: &Path) -> Result<Vec<Found>> {
    let bad = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
    let file = fs_err::File::open(path)?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a zip archive: {e}")))?;
    let mut names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    names.sort();
    let mut read = |name: &str| -> Result<Vec<u8>> {
        let mut entry = zip.by_name(name).map_err(|e| bad(format!("{name}: {e}")))?;
        if entry.size() > MAX_MEMBER_BYTES {
            return Err(bad(format!("{name}: {} bytes is over the limit", entry.size())));
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut buf).map_err(|e| bad(format!("{name}: {e}")))?;
        Ok(buf)
    };
    let mut out = Vec::new();
    for name in &names {
        let member = path.join(name);
        let source = format!("{}:{name}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        let (spec, tensors) = match extension(Path::new(name)).as_str() {
            "param" => {
                let bin_name = Path::new(name).with_extension("bin").to_string_lossy().into_owned();
                if !names.contains(&bin_name) {
                    return Err(bad(format!("{name} has no matching {bin_name}")));
                }
                let text = String::from_utf8(read(name)?).map_err(|_| bad(format!("{name} is not text")))?;
                let bin = read(&bin_name)?;
                let m = ncnn::load_from(&text, &member, &bin, &member.with_extension("bin"))?;
                (m.spec, m.tensors)
            }
            "pth" => {
                let tensors = pth::load_reader(Cursor::new(read(name)?), &member)?;
                (detect(&tensors, &member)?, tensors)
            }
            "safetensors" => {
                let w = load_safetensors(&read(name)?, &member)?;
                (w.spec, w.tensors)
            }
            _ => continue,
        };
        out.push(Found { name: stem(Path::new(name)), source, spec, tensors });
    }
    Ok(out)
}

/// Converts all tensors to `dtype` (e.g. f16 blobs to f32 for CPU inference) on `device`.
pub fn to_device(
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?.to_device(device)?))).collect()
}

#[cfg(test)]
mod integrity_tests {
    use super::*;

    #[test]
    fn a_changed_blob_is_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::at(dir.path());
        let fixture =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sr/srvgg-tiny-x4.safetensors");
        let entries = store.import(Path::new(fixture), false)?;
        let name = entries.first().map(|e| e.name.clone()).unwrap_or_default();
        assert!(store.resolve(&name).is_ok());
        let blob = store.blob_path(&entries[0].sha256);
        let mut bytes = std::fs::read(&blob)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&blob, bytes)?;
        let err = store.resolve(&name).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("changed on disk"), "{err}");
        Ok(())
    }
}
