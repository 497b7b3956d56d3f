//! PyTorch `.pth` checkpoints (zip format, torch >= 1.6) read without executing pickle code.
//!
//! The pickle stream is interpreted by a small stack machine that knows only the opcodes
//! `torch.save` emits for state dicts, and treats `GLOBAL`s as inert names: only
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and `_rebuild_parameter` are
//! given meaning; any other callable becomes an opaque value that is never invoked.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Largest pickle accepted (a state dict's pickle is tens of KB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Largest single storage accepted.
const MAX_STORAGE_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage {
        dtype: DType,
        key: String,
    },
    Tensor(TensorRef),
    /// Result of calling a global kiln does not interpret; never executed.
    Opaque(String),
    Mark,
}

#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    dtype: DType,
    key: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights { path: path.to_path_buf(), msg: msg.into() }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    path: &'a Path,
}

impl<'a> Unpickler<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(err(self.path, "truncated pickle stream"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end =
            rest.iter().position(|&b| b == b'\n').ok_or_else(|| err(self.path, "unterminated GLOBAL"))?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| err(self.path, "pickle stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or_else(|| err(self.path, "pickle MARK missing"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| err(self.path, "pickle stack underflow"))
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let b = self.bytes(n)?;
        Ok(Value::Str(
            String::from_utf8(b.to_vec()).map_err(|_| err(self.path, "invalid UTF-8 in pickle string"))?,
        ))
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.bytes(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(vec![])),
                b']' => self.stack.push(Value::List(vec![])),
                b')' => self.stack.push(Value::Tuple(vec![])),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.bytes(n)?.to_vec();
                    self.stack.push(Value::Bytes(v));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.bytes(n)?.to_vec();
                    self.stack.push(Value::Bytes(v));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let b = self.bytes(2)?;
                    self.stack.push(Value::Int(i64::from(u16::from_le_bytes([b[0], b[1]]))));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    if n > 8 {
                        return Err(err(self.path, "pickle LONG1 wider than 64 bits"));
                    }
                    let mut buf =
                        if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let b = self.bytes(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(err(self.path, "pickle stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'q' => {
                    let k = u32::from(self.u8()?);
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { u32::from(self.u8()?) } else { self.u32()? };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or_else(|| err(self.path, format!("pickle memo {k} missing")))?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err(err(self.path, "STACK_GLOBAL with non-string names")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: object state (e.g. a state dict's `_metadata`) is not needed.
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(items) => items.push((k, v)),
                        _ => return Err(err(self.path, "SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let path = self.path;
                    match self.top()? {
                        Value::Dict(d) => {
                            if items.len() % 2 != 0 {
                                return Err(err(path, "SETITEMS with an odd number of values"));
                            }
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.push((k, v));
                            }
                        }
                        _ => return Err(err(path, "SETITEMS on a non-dict")),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(err(self.path, "APPEND on a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(err(self.path, "APPENDS on a non-list")),
                    }
                }
                other => {
                    return Err(err(
                        self.path,
                        format!(
                            "unsupported pickle opcode 0x{other:02x} at byte {} (not a plain state dict?)",
                            self.pos - 1
                        ),
                    ))
                }
            }
        }
    }

    fn persistent(&self, pid: Value) -> Result<Value> {
        let Value::Tuple(items) = pid else {
            return Err(err(self.path, "persistent id is not a tuple"));
        };
        match items.as_slice() {
            [Value::Str(kind), Value::Global(_, storage), Value::Str(key), _location, _numel]
                if kind == "storage" =>
            {
                let dtype = match storage.as_str() {
                    "FloatStorage" => DType::F32,
                    "HalfStorage" => DType::F16,
                    "BFloat16Storage" => DType::BF16,
                    "DoubleStorage" => DType::F64,
                    "LongStorage" => DType::I64,
                    "ByteStorage" => DType::U8,
                    other => {
                        return Err(Error::Unsupported(format!(
                            "torch storage type {other} in {}",
                            self.path.display()
                        )))
                    }
                };
                Ok(Value::Storage { dtype, key: key.clone() })
            }
            _ => Err(err(self.path, "unrecognised persistent id")),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(module, name) = callable else {
            return Ok(Value::Opaque("call of a non-global".into()));
        };
        let Value::Tuple(args) = args else {
            return Ok(Value::Opaque(format!("{module}.{name}")));
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => Ok(Value::Dict(vec![])),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                match args.as_slice() {
                    [Value::Storage { dtype, key }, Value::Int(offset), Value::Tuple(shape), Value::Tuple(stride), ..] =>
                    {
                        let dims = |t: &[Value]| -> Result<Vec<usize>> {
                            t.iter()
                                .map(|v| match v {
                                    Value::Int(i) => usize::try_from(*i)
                                        .map_err(|_| err(self.path, "negative tensor dimension")),
                                    _ => Err(err(self.path, "non-integer tensor dimension")),
                                })
                                .collect()
                        };
                        Ok(Value::Tensor(TensorRef {
                            dtype: *dtype,
                            key: key.clone(),
                            offset: usize::try_from(*offset)
                                .map_err(|_| err(self.path, "negative storage offset"))?,
                            shape: dims(shape)?,
                            stride: dims(stride)?,
                        }))
                    }
                    _ => Err(err(self.path, "unexpected _rebuild_tensor_v2 arguments")),
                }
            }
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                Ok(args.into_iter().next().unwrap_or(Value::None))
            }
            _ => Ok(Value::Opaque(format!("{module}.{name}"))),
        }
    }
}

/// Reads the state dict of a `.pth`: `params_ema`, else `params`, else `state_dict`, else the
/// top-level dict itself. Tensors come back on the CPU in their stored dtype.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = fs_err::File::open(path)?;
    load_reader(std::io::BufReader::new(file), path)
}

/// As [`load`], from any seekable reader (e.g. an entry of a wheel held in memory).
pub fn load_reader<R: Read + std::io::Seek>(reader: R, path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        err(path, format!("not a zip-format torch checkpoint ({e}); legacy pre-1.6 files must be re-saved with a recent torch"))
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| err(path, "no data.pkl in the archive (not a torch checkpoint)"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let pickle = read_entry(&mut zip, &pkl_name, MAX_PICKLE_BYTES, path)?;
    let root = Unpickler { data: &pickle, pos: 0, stack: vec![], memo: HashMap::new(), path }.run()?;

    let dict = select_state_dict(root, path)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = HashMap::new();
    for (k, v) in dict {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else { continue };
        if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            continue; // integer buffers (e.g. counters) are not weights
        }
        if !storages.contains_key(&t.key) {
            let bytes = read_entry(&mut zip, &format!("{prefix}data/{}", t.key), MAX_STORAGE_BYTES, path)?;
            storages.insert(t.key.clone(), bytes);
        }
        let bytes = &storages[&t.key];
        let tensor = materialise(&t, bytes, path, &name)?;
        let name = name.strip_prefix("module.").map(str::to_string).unwrap_or(name);
        out.insert(name, tensor);
    }
    if out.is_empty() {
        return Err(err(path, "no floating-point tensors found in the checkpoint"));
    }
    Ok(out)
}

fn read_entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    max: u64,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut entry = zip.by_name(name).map_err(|e| err(path, format!("archive entry `{name}`: {e}")))?;
    if entry.size() > max {
        return Err(err(
            path,
            format!("archive entry `{name}` is {} bytes, over the {max}-byte limit", entry.size()),
        ));
    }
    let mut buf = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut buf).map_err(|e| err(path, format!("archive entry `{name}`: {e}")))?;
    Ok(buf)
}

fn select_state_dict(root: Value, path: &Path) -> Result<Vec<(Value, Value)>> {
    let Value::Dict(items) = root else {
        return Err(err(path, "checkpoint root is not a dict"));
    };
    for key in ["params_ema", "params", "state_dict", "model"] {
        if let Some((_, Value::Dict(inner))) = items.iter().find(|(k, _)| *k == Value::Str(key.into())) {
            return Ok(inner.clone());
        }
    }
    Ok(items)
}

fn materialise(t: &TensorRef, bytes: &[u8], path: &Path, name: &str) -> Result<Tensor> {
    let elem = t.dtype.size_in_bytes();
    if t.shape.len() != t.stride.len() {
        return Err(err(path, format!("tensor `{name}`: shape and stride ranks differ")));
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(path, "tensor size overflow"))?;
    // Highest element index touched, to bounds-check before copying.
    let extent = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&d, &s)| acc.checked_add(d.saturating_sub(1).checked_mul(s)?))
        .ok_or_else(|| err(path, "tensor extent overflow"))?;
    if numel > 0 && (extent + 1) * elem > bytes.len() {
        return Err(err(
            path,
            format!("tensor `{name}` reaches past the end of its storage (truncated file?)"),
        ));
    }
    let mut data = Vec::with_capacity(numel * elem);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        data.extend_from_slice(&bytes[at * elem..(at + 1) * elem]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(Tensor::from_raw_buffer(&data, t.dtype, &t.shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_opcode_without_panicking() {
        let path = Path::new("x.pkl");
        let r = Unpickler { data: &[0x80, 2, 0xff], pos: 0, stack: vec![], memo: HashMap::new(), path }.run();
        assert!(r.is_err());
        let r = Unpickler { data: &[0x80], pos: 0, stack: vec![], memo: HashMap::new(), path }.run();
        assert!(r.is_err());
    }

    #[test]
    fn globals_are_never_called() {
        // cos\nsystem\n(S'echo'\ntR. in protocol 0 uses `S` (unsupported) — with BINUNICODE:
        let mut data = b"cos\nsystem\n(X\x04\x00\x00\x00echot".to_vec();
        data.extend_from_slice(b"R.");
        let path = Path::new("x.pkl");
        let v = Unpickler { data: &data, pos: 0, stack: vec![], memo: HashMap::new(), path }.run();
        assert_eq!(v.ok(), Some(Value::Opaque("os.system".into())));
    }
}
