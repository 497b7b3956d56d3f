//! ncnn `.param` (text) parsing and `.bin` blob reading.
//!
//! Text format: magic `7767517`, then `layer_count blob_count`, then one line per layer:
//! `Type name n_in n_out in_blobs... out_blobs... k=v ...`. A key `-233xx` (i.e. `-23300 - k`)
//! holds an array for key `k`: `count,v1,v2,...`. The `.bin` holds, in layer order, each
//! layer's weights; `Convolution` weights start with a 4-byte tag (fp16 / fp32 / quantized),
//! biases and PReLU slopes are raw fp32 (see ncnn's `ModelBinFromDataReader::load`).

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// One `k=v` parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Int(i32),
    Float(f32),
    Array(Vec<f32>),
}

/// A layer line of a `.param` file.
#[derive(Debug, Clone)]
pub struct Layer {
    pub kind: String,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub params: HashMap<i32, ParamValue>,
}

impl Layer {
    pub fn int(&self, key: i32, default: i32) -> i32 {
        match self.params.get(&key) {
            Some(ParamValue::Int(v)) => *v,
            Some(ParamValue::Float(v)) => *v as i32,
            _ => default,
        }
    }

    pub fn float(&self, key: i32, default: f32) -> f32 {
        match self.params.get(&key) {
            Some(ParamValue::Float(v)) => *v,
            Some(ParamValue::Int(v)) => *v as f32,
            _ => default,
        }
    }

    pub fn array(&self, key: i32) -> &[f32] {
        match self.params.get(&key) {
            Some(ParamValue::Array(v)) => v,
            _ => &[],
        }
    }

    /// A non-negative integer parameter, as usize.
    pub fn size(&self, key: i32, default: i32, path: &Path) -> Result<usize> {
        let v = self.int(key, default);
        usize::try_from(v)
            .map_err(|_| weights_err(path, format!("layer `{}`: parameter {key}={v} is negative", self.name)))
    }
}

pub(crate) fn weights_err(path: &Path, msg: String) -> Error {
    Error::Weights { path: path.to_path_buf(), msg }
}

/// Magic number on the first line of a text `.param`.
pub const PARAM_MAGIC: &str = "7767517";

/// Most layers a param file may declare (real SR graphs have about a thousand).
const MAX_LAYERS: usize = 1 << 20;

/// Parses a text `.param` file.
pub fn parse_param(text: &str, path: &Path) -> Result<Vec<Layer>> {
    let err = |line: usize, msg: String| weights_err(path, format!("line {line}: {msg}"));
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty());
    match lines.next() {
        Some((_, PARAM_MAGIC)) => {}
        Some((n, other)) => {
            let hint = if text.as_bytes().first() == Some(&0x5d) || !text.is_ascii() {
                " (binary .param.bin files are not supported; use the text .param)"
            } else {
                ""
            };
            return Err(err(n, format!("expected magic {PARAM_MAGIC}, found `{}`{hint}", truncate(other))));
        }
        None => return Err(weights_err(path, "empty .param file".into())),
    }
    let (n, counts) = lines.next().ok_or_else(|| weights_err(path, "missing layer/blob counts".into()))?;
    let counts: Vec<usize> = counts
        .split_whitespace()
        .map(|t| t.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| err(n, format!("bad layer/blob counts `{}`", truncate(counts))))?;
    let &[layer_count, _blob_count] = counts.as_slice() else {
        return Err(err(n, "expected `layer_count blob_count`".into()));
    };
    if layer_count > MAX_LAYERS {
        return Err(err(n, format!("{layer_count} layers is implausible")));
    }
    let mut layers = Vec::with_capacity(layer_count);
    for (n, line) in lines {
        layers.push(parse_layer(line).map_err(|m| err(n, m))?);
    }
    if layers.len() != layer_count {
        return Err(weights_err(
            path,
            format!(
                "header declares {layer_count} layers but {} are present (truncated file?)",
                layers.len()
            ),
        ));
    }
    Ok(layers)
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

fn parse_layer(line: &str) -> std::result::Result<Layer, String> {
    let mut tokens = line.split_whitespace();
    let mut next = |what: &str| tokens.next().ok_or_else(|| format!("missing {what}"));
    let kind = next("layer type")?.to_string();
    let name = next("layer name")?.to_string();
    let n_in: usize = next("input count")?.parse().map_err(|_| "bad input count".to_string())?;
    let n_out: usize = next("output count")?.parse().map_err(|_| "bad output count".to_string())?;
    if n_in > 4096 || n_out > 4096 {
        return Err(format!("layer `{name}`: implausible blob counts {n_in}/{n_out}"));
    }
    let mut blobs = Vec::with_capacity(n_in + n_out);
    for _ in 0..n_in + n_out {
        blobs.push(next("blob name")?.to_string());
    }
    let outputs = blobs.split_off(n_in);
    let mut params = HashMap::new();
    for token in tokens {
        let (k, v) =
            token.split_once('=').ok_or_else(|| format!("layer `{name}`: bad parameter `{token}`"))?;
        let key: i32 = k.parse().map_err(|_| format!("layer `{name}`: bad parameter key `{k}`"))?;
        if key <= -23300 {
            let mut items = v.split(',');
            let count: usize = items
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("layer `{name}`: bad array `{token}`"))?;
            let values: Vec<f32> = items
                .map(|x| x.parse::<f32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| format!("layer `{name}`: bad array value in `{token}`"))?;
            if values.len() != count {
                return Err(format!(
                    "layer `{name}`: array `{token}` declares {count} values, has {}",
                    values.len()
                ));
            }
            params.insert(-key - 23300, ParamValue::Array(values));
        } else {
            let is_float = v.contains(['.', 'e', 'E']);
            let value = if is_float {
                ParamValue::Float(v.parse().map_err(|_| format!("layer `{name}`: bad float `{v}`"))?)
            } else {
                ParamValue::Int(v.parse().map_err(|_| format!("layer `{name}`: bad integer `{v}`"))?)
            };
            params.insert(key, value);
        }
    }
    Ok(Layer { kind, name, inputs: blobs, outputs, params })
}

/// A blob read from the `.bin`, with its element type as stored.
#[derive(Debug, Clone)]
pub enum Blob {
    F16(Vec<half::f16>),
    F32(Vec<f32>),
}

impl Blob {
    pub fn len(&self) -> usize {
        match self {
            Blob::F16(v) => v.len(),
            Blob::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sequential reader over the `.bin` bytes, mirroring ncnn's `ModelBin::load(w, type)`.
pub struct BinReader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

const TAG_FP16: u32 = 0x0130_6B47;
const TAG_INT8: u32 = 0x000D_4B38;

impl<'a> BinReader<'a> {
    pub fn new(data: &'a [u8], path: &'a Path) -> Self {
        Self { data, pos: 0, path }
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(weights_err(
                self.path,
                format!(
                    "truncated .bin: {what} needs {n} bytes at offset {}, only {} left (bin does not match param?)",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let slice = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn f32s(&mut self, count: usize, what: &str) -> Result<Vec<f32>> {
        let bytes = self.take(
            count.checked_mul(4).ok_or_else(|| weights_err(self.path, "size overflow".into()))?,
            what,
        )?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Raw fp32 data (ncnn `load(w, 1)`: biases, PReLU slopes).
    pub fn raw(&mut self, count: usize, what: &str) -> Result<Blob> {
        Ok(Blob::F32(self.f32s(count, what)?))
    }

    /// Tagged data (ncnn `load(w, 0)`: convolution weights).
    pub fn tagged(&mut self, count: usize, what: &str) -> Result<Blob> {
        let tag_bytes = self.take(4, what)?;
        let tag = u32::from_le_bytes([tag_bytes[0], tag_bytes[1], tag_bytes[2], tag_bytes[3]]);
        if tag == TAG_FP16 {
            let n = count.checked_mul(2).ok_or_else(|| weights_err(self.path, "size overflow".into()))?;
            let bytes = self.take(n.div_ceil(4) * 4, what)?;
            let values = bytes[..n].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
            return Ok(Blob::F16(values));
        }
        if tag == TAG_INT8 {
            return Err(weights_err(
                self.path,
                format!("{what}: int8-quantized ncnn weights are not supported"),
            ));
        }
        if tag == 0 {
            return Ok(Blob::F32(self.f32s(count, what)?));
        }
        // Any other non-zero flag: a 256-entry fp32 table followed by one u8 index per value.
        let table = self.f32s(256, what)?;
        let indices = self.take(count.div_ceil(4) * 4, what)?;
        Ok(Blob::F32(indices[..count].iter().map(|&i| table[usize::from(i)]).collect()))
    }
}
