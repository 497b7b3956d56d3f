//! Opening safetensors weight files as a candle `VarBuilder`, hashing them, and turning candle's
//! loading errors into errors that name the file and tensor at fault.

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Opens one or more safetensors files (shards) memory-mapped.
///
/// Headers are validated up front so a truncated or corrupt file fails here, naming the file,
/// rather than later as an opaque tensor error.
pub fn open_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for file in files {
        validate_header(file)?;
    }
    // SAFETY: the files are mapped read-only; kiln never writes to a weight file while a model
    // built from it is alive. A file modified underneath by another process is the same hazard
    // every mmap-based loader (diffusers, candle) accepts for multi-GB weights.
    #[allow(unsafe_code)]
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) };
    vb.map_err(|e| Error::Weights { path: files.first().cloned().unwrap_or_default(), msg: e.to_string() })
}

/// Checks that the safetensors header parses and that every tensor's byte range fits in the file.
pub(crate) fn validate_header(path: &Path) -> Result<()> {
    let bad = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
    let mut file = fs_err::File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| bad("file is shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} does not fit a {file_len}-byte file (truncated or not safetensors)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let entries = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    for (name, info) in entries {
        if name == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad(format!("tensor `{name}` has no data_offsets")))?;
        if end > data_len {
            return Err(bad(format!(
                "tensor `{name}` ends at byte {end} but only {data_len} data bytes are present (file truncated?)"
            )));
        }
    }
    Ok(())
}

/// Maps candle's tensor-loading errors to kiln's: a missing tensor or a wrong shape names the
/// tensor and the weight file(s) it was looked up in.
pub fn loading_error(err: candle_core::Error, files: &[PathBuf]) -> Error {
    let path = match files {
        [one] => one.clone(),
        [first, ..] => first.parent().map(Path::to_path_buf).unwrap_or_else(|| first.clone()),
        [] => PathBuf::new(),
    };
    match err {
        candle_core::Error::CannotFindTensor { path: name } => Error::MissingTensor { path, name },
        candle_core::Error::UnexpectedShape { msg, expected, got } => Error::ShapeMismatch {
            name: msg.trim_start_matches("shape mismatch for ").to_string(),
            expected: expected.dims().to_vec(),
            found: got.dims().to_vec(),
        },
        candle_core::Error::WithBacktrace { inner, .. } => loading_error(*inner, files),
        candle_core::Error::Context { inner, .. } => loading_error(*inner, files),
        candle_core::Error::WithPath { inner, .. } => loading_error(*inner, files),
        other => Error::Weights { path, msg: other.to_string() },
    }
}

/// sha256 of a file, hex-encoded.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// sha256 of a weight file, reusing the hub cache's content address when the file is a hub blob
/// (the blob's name is its sha256), so multi-GB weights are not re-hashed on every load.
pub fn weight_sha256(path: &Path) -> Result<String> {
    if let Ok(target) = fs_err::canonicalize(path) {
        let in_blobs = target.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "blobs");
        if let Some(name) = target.file_name().and_then(|n| n.to_str()) {
            if in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(name.to_ascii_lowercase());
            }
        }
    }
    sha256_file(path)
}

/// [`weight_sha256`] with a cache keyed by (canonical path, size, mtime, and on Unix the inode
/// and ctime) in kiln's data dir, so local multi-GB folders are hashed once, not on every load.
/// The ctime cannot be set back by a user (any write or `touch -d` moves it), so a file edited
/// with its size and mtime restored is hashed again. Cache problems only cost a re-hash.
pub fn weight_sha256_cached(path: &Path) -> Result<String> {
    let Some(cache_file) = crate::env::data_dir().map(|d| d.join("hash-cache.json")) else {
        return weight_sha256(path);
    };
    let meta = fs_err::metadata(path)?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let canonical = fs_err::canonicalize(path)?;
    #[cfg(unix)]
    let changed = {
        use std::os::unix::fs::MetadataExt;
        format!("{}|{}.{}", meta.ino(), meta.ctime(), meta.ctime_nsec())
    };
    #[cfg(not(unix))]
    let changed = String::new();
    let key = format!(
        "{}|{}|{}|{changed}",
        canonical.display(),
        meta.len(),
        mtime.map(|d| d.as_nanos()).unwrap_or(0)
    );
    // Every load asks once per file for the layout cache and once for the drift record: answer
    // repeats in this process from memory (same key, so a changed file is still hashed again).
    static SEEN: std::sync::Mutex<Option<std::collections::HashMap<String, String>>> =
        std::sync::Mutex::new(None);
    let seen =
        |key: &str| SEEN.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|m| m.get(key).cloned());
    let remember = |key: String, hash: &str| {
        SEEN.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Default::default)
            .insert(key, hash.to_string());
    };
    if let Some(hash) = seen(&key) {
        return Ok(hash);
    }
    let mut cache: std::collections::BTreeMap<String, String> = std::fs::read_to_string(&cache_file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(hash) = cache.get(&key) {
        remember(key, hash);
        return Ok(hash.clone());
    }
    let hash = weight_sha256(path)?;
    remember(key.clone(), &hash);
    cache.insert(key, hash.clone());
    // Best effort: a failure to save the cache must not fail the load.
    if let Ok(text) = serde_json::to_string(&cache) {
        let _ = crate::files::write_atomic(&cache_file, text.as_bytes());
    }
    Ok(hash)
}
