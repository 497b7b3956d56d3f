//! `.npy` arrays (init latents) read with every header field checked before anything is
//! allocated: the shape's element count is bounded and must match the bytes that are there, so
//! a 100-byte file claiming a 10¹²-element array is an error, not a terabyte allocation.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";
/// Longest header accepted (numpy writes 128 bytes or so; the format allows 4 GiB).
const MAX_HEADER: usize = 1 << 16;
const MAX_DIMS: usize = 8;

/// Reads an `.npy` file of little-endian f16/f32/f64 values (C order) as an f32 tensor.
pub fn read(path: &Path) -> Result<Tensor> {
    parse(&fs_err::read(path)?, path)
}

/// [`read`] on bytes in memory; `path` names the source in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Tensor> {
    let bad = |msg: String| Error::Weights {
        path: path.to_path_buf(),
        msg: format!("not a readable .npy array: {msg} (save it with numpy.save)"),
    };
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("no .npy magic".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(bad(format!("format version {v} is not 1, 2 or 3"))),
    };
    if header_len > MAX_HEADER || start + header_len > bytes.len() {
        return Err(bad(format!("header of {header_len} bytes does not fit the file")));
    }
    let header = std::str::from_utf8(&bytes[start..start + header_len])
        .map_err(|_| bad("header is not text".into()))?;
    let descr = field(header, "descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    let size = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f2" => 2,
        "<f4" => 4,
        "<f8" => 8,
        other => return Err(bad(format!("dtype {other} is not little-endian float16/32/64"))),
    };
    if field(header, "fortran_order").map(str::trim) != Some("False") {
        return Err(bad("only C-order arrays are read (numpy.ascontiguousarray before saving)".into()));
    }
    let shape = parse_shape(field(header, "shape").ok_or_else(|| bad("header has no 'shape'".into()))?)
        .ok_or_else(|| bad("'shape' is not a tuple of sizes".into()))?;
    if shape.len() > MAX_DIMS {
        return Err(bad(format!("{} dimensions (at most {MAX_DIMS})", shape.len())));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    crate::bounds::NPY_ELEMENTS.check(count).map_err(|e| bad(e.to_string()))?;
    let data = &bytes[start + header_len..];
    if data.len() != count * size {
        return Err(bad(format!(
            "shape {shape:?} needs {} bytes of data but the file has {}",
            count * size,
            data.len()
        )));
    }
    let values: Vec<f32> = match size {
        2 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        4 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        _ => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
    };
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// The text of `'key': value` in numpy's header dict, up to the next top-level comma.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth <= 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

/// `(1, 4, 8, 8)`, `(5,)` or `()`.
fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_numpy_headers_and_refuses_lies() -> Result<()> {
        let data: Vec<u8> = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = Path::new("x.npy");
        let ok = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", &data);
        let t = parse(&ok, p)?;
        assert_eq!(t.dims(), &[1, 2, 3]);
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let huge =
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100000), }", &data);
        assert!(parse(&huge, p).expect_err("refused").to_string().contains("npy elements"));
        let short = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }", &data);
        assert!(parse(&short, p).expect_err("refused").to_string().contains("needs 96 bytes"));
        let overflow =
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }", &data);
        assert!(parse(&overflow, p).expect_err("refused").to_string().contains("overflows"));
        let fortran = npy("{'descr': '<f4', 'fortran_order': True, 'shape': (6,), }", &data);
        assert!(parse(&fortran, p).expect_err("refused").to_string().contains("C-order"));
        let ints = npy("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", &data);
        assert!(parse(&ints, p).expect_err("refused").to_string().contains("<i8"));
        Ok(())
    }
}
