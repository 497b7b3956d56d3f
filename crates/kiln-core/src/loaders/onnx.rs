//! ONNX model files: the graph (nodes in file order, their attributes) and its initializers.
//!
//! kiln does not run ONNX graphs: an importer reads one to find the weights of an architecture
//! kiln implements itself (e.g. [`crate::models::matting`]), checking that the graph is the one
//! it expects. The protobuf is decoded with `prost`; the messages below declare only the fields
//! of `onnx.proto` that kiln reads (same tags), so everything else is skipped by the decoder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use prost::Message;

use crate::error::{Error, Result};

/// Largest `.onnx` file kiln reads (protobuf's own limit; bigger models use external data).
pub const MAX_ONNX_BYTES: u64 = 2 << 30;

/// `onnx.ModelProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

/// `onnx.OperatorSetIdProto`.
#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `onnx.GraphProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// `onnx.ValueInfoProto` (name only).
#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `onnx.NodeProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `onnx.AttributeProto` (scalars, strings, int/float lists, tensors; not sub-graphs).
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

/// `onnx.TensorProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    /// 1 = EXTERNAL: the data lives in another file (models over 2 GB), which kiln refuses.
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// ONNX `TensorProto.DataType` values kiln reads.
pub const DT_FLOAT: i32 = 1;
pub const DT_FLOAT16: i32 = 10;

/// A decoded ONNX file: its graph plus where it came from (for error messages).
#[derive(Debug, Clone)]
pub struct OnnxModel {
    pub path: PathBuf,
    pub model: ModelProto,
    pub graph: GraphProto,
}

impl OnnxModel {
    /// Reads and decodes an `.onnx` file, refusing oversized files before reading them.
    pub fn read(path: &Path) -> Result<Self> {
        let len = fs_err::metadata(path)?.len();
        if len > MAX_ONNX_BYTES {
            return Err(bad(path, format!("{len} bytes is over kiln's limit of {MAX_ONNX_BYTES}")));
        }
        Self::from_bytes(&fs_err::read(path)?, path)
    }

    /// Decodes ONNX bytes; `path` names them in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        if bytes.is_empty() {
            return Err(bad(path, "the file is empty".into()));
        }
        let model = ModelProto::decode(bytes)
            .map_err(|e| bad(path, format!("not an ONNX model (protobuf decode failed: {e})")))?;
        let graph = match &model.graph {
            Some(g) if !g.node.is_empty() => g.clone(),
            _ => return Err(bad(path, "not an ONNX model (no graph nodes)".into())),
        };
        let mut model = model;
        // The graph is kept once, outside the model, so its bytes are not held twice.
        model.graph = None;
        Ok(Self { path: path.to_path_buf(), model, graph })
    }

    /// Encodes back to bytes (tests craft variants of a model this way).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut model = self.model.clone();
        model.graph = Some(self.graph.clone());
        model.encode_to_vec()
    }

    /// The default-domain opset version, if declared.
    pub fn opset(&self) -> Option<i64> {
        self.model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
    }

    /// Initializers by name.
    pub fn initializers(&self) -> HashMap<&str, &TensorProto> {
        self.graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect()
    }

    /// An initializer as an f32 CPU tensor, checking its data against its declared shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self
            .graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: name.to_string() })?;
        tensor_to_candle(t, &self.path)
    }
}

fn bad(path: &Path, msg: String) -> Error {
    Error::Weights { path: path.to_path_buf(), msg }
}

/// Converts an ONNX tensor (float32 or float16, raw or typed data) to an f32 CPU tensor.
pub fn tensor_to_candle(t: &TensorProto, path: &Path) -> Result<Tensor> {
    let what = |msg: String| bad(path, format!("initializer `{}`: {msg}", t.name));
    if t.data_location == 1 {
        return Err(what("its data is stored outside the .onnx file (external data); not supported".into()));
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut count: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| what(format!("negative dimension in {:?}", t.dims)))?;
        count = count.checked_mul(d).ok_or_else(|| what(format!("shape {:?} overflows", t.dims)))?;
        dims.push(d);
    }
    let values: Vec<f32> = match t.data_type {
        DT_FLOAT if !t.raw_data.is_empty() => {
            if t.raw_data.len() != count * 4 {
                return Err(what(format!(
                    "{} data bytes for shape {:?} (expected {})",
                    t.raw_data.len(),
                    t.dims,
                    count * 4
                )));
            }
            t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        DT_FLOAT => {
            if t.float_data.len() != count {
                return Err(what(format!("{} values for shape {:?}", t.float_data.len(), t.dims)));
            }
            t.float_data.clone()
        }
        DT_FLOAT16 => {
            let bits: Vec<u16> = if !t.raw_data.is_empty() {
                t.raw_data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
            } else {
                // Typed float16 data is stored as the bit pattern in int32_data.
                t.int32_data.iter().map(|&v| v as u16).collect()
            };
            if bits.len() != count {
                return Err(what(format!("{} values for shape {:?}", bits.len(), t.dims)));
            }
            bits.into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect()
        }
        other => return Err(what(format!("data type {other} (kiln reads float32 and float16 weights)"))),
    };
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

impl NodeProto {
    /// An attribute by name.
    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name == name)
    }

    /// An integer-list attribute (`default` when absent).
    pub fn ints(&self, name: &str, default: &[i64]) -> Vec<i64> {
        self.attr(name).map(|a| a.ints.clone()).unwrap_or_else(|| default.to_vec())
    }

    /// An integer attribute (`default` when absent).
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).map(|a| a.i).unwrap_or(default)
    }

    /// A string attribute (`default` when absent).
    pub fn string(&self, name: &str, default: &str) -> String {
        self.attr(name).map(|a| String::from_utf8_lossy(&a.s).into_owned()).unwrap_or_else(|| default.into())
    }

    /// "Conv #12 (`Conv_40`)" — how errors name a node.
    pub fn describe(&self, index: usize) -> String {
        if self.name.is_empty() {
            format!("{} #{index}", self.op_type)
        } else {
            format!("{} #{index} (`{}`)", self.op_type, self.name)
        }
    }
}
