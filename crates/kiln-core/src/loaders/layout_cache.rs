//! Pre-laid-out weights: the layers a model build derives (transposed and fused linear weights,
//! convolution weights in f32) written once to a file in exactly the layout the CPU kernels
//! read, then memory-mapped and used in place by every later load.
//!
//! Token embedding tables are kept too (read in place, a few rows per prompt).
//!
//! A later load builds its layers straight from the mapping ([`kiln_kernels::HostF32`]): no
//! copy, no transpose, and the pages are shared with the page cache and with every other kiln
//! process that maps the same file. The file is content-addressed: its name is a hash of the
//! layout version, the component and the sha256 of each source weight file (the hashes the
//! drift guard records), so a changed source or a new layout gets a new file and an old one is
//! never used for it. A file whose header does not parse, whose size disagrees with its header
//! (truncated), or whose recorded version or sources differ is not trusted: the load reads the
//! source files as before and writes a fresh file.
//!
//! The format is safetensors (f32, little-endian; the header is padded so every value is
//! 4-byte aligned) with kiln's own description of each layer in its metadata.

use crate::error::{Error, Result};
use kiln_kernels::reuse::Derived;
use kiln_kernels::{Conv2d, Embedding, HostF32, HostValues, LayerValues, Linear};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bumped whenever the layout of any cached layer changes: files of another version are
/// never used.
pub const LAYOUT_VERSION: u32 = 1;

/// File name extension of a cache file.
const EXT: &str = "kiln-layout";

/// The size the cache is kept under unless `KILN_LAYOUT_CACHE_MAX` says otherwise.
const DEFAULT_MAX_BYTES: u64 = 32 << 30;

/// Free disk space a cache write always leaves (the cache must never be what fills a disk).
const KEEP_FREE_BYTES: u64 = 2 << 30;

/// kiln's description of a cache file, in its safetensors metadata under `kiln_layout`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayoutMeta {
    pub version: u32,
    /// The model component (`unet`, `text_encoder`, `vae`, ...).
    pub component: String,
    /// The source weight files (as they were named when the file was written) and their sha256.
    pub sources: Vec<(String, String)>,
    pub layers: Vec<LayerMeta>,
}

/// One cached layer: its kind (as the kernels name it, e.g. `linear`, `conv2d/1/1`), the
/// source tensors it was derived from and its weight dims in the kernel's layout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerMeta {
    pub kind: String,
    pub names: Vec<String>,
    pub dims: Vec<usize>,
    pub bias: bool,
}

/// Where the cache lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct LayoutCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl LayoutCache {
    /// The cache in kiln's data folder, unless `KILN_LAYOUT_CACHE=off` (or there is no data
    /// folder, or the machine is big-endian, where the files' values could not be used in place).
    pub fn from_env() -> Result<Option<Self>> {
        if cfg!(target_endian = "big") {
            return Ok(None);
        }
        if let Ok(v) = std::env::var(crate::env::KILN_LAYOUT_CACHE) {
            if matches!(v.to_ascii_lowercase().as_str(), "0" | "off" | "false" | "no") {
                return Ok(None);
            }
        }
        let Some(dir) = crate::env::data_dir().map(|d| d.join("layout-cache")) else { return Ok(None) };
        let max_bytes = match std::env::var(crate::env::KILN_LAYOUT_CACHE_MAX) {
            Ok(v) if !v.is_empty() => parse_size(&v).ok_or_else(|| {
                Error::arg(
                    crate::env::KILN_LAYOUT_CACHE_MAX,
                    format!("`{v}` is not a size (e.g. 40G, 512M or a number of bytes)"),
                )
            })?,
            _ => DEFAULT_MAX_BYTES,
        };
        Ok(Some(Self { dir, max_bytes }))
    }

    pub fn at(dir: PathBuf, max_bytes: u64) -> Self {
        Self { dir, max_bytes }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The file for `component` built from source files with these sha256 (in load order).
    pub fn path_for(&self, component: &str, source_hashes: &[String]) -> PathBuf {
        let mut h = Sha256::new();
        h.update(format!("kiln-layout v{LAYOUT_VERSION}\n{component}\n"));
        for s in source_hashes {
            h.update(s.as_bytes());
            h.update(b"\n");
        }
        self.dir.join(format!("{}.{EXT}", &hex::encode(h.finalize())[..32]))
    }

    /// The cache file at `path` when it exists and can be trusted for `expected` sources.
    /// A file that cannot is removed (it would never be used again under its name).
    pub fn open(&self, path: &Path, component: &str, sources: &[(String, String)]) -> Option<LayoutFile> {
        if !path.exists() {
            return None;
        }
        match LayoutFile::open(path) {
            Ok(file) if file.meta.component == component && same_hashes(&file.meta.sources, sources) => {
                // Marks the file as used, for pruning by least recent use (best effort).
                if let Ok(f) = std::fs::File::open(path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                Some(file)
            }
            Ok(_) => {
                tracing::warn!("{}: layout cache file for other sources; rebuilding it", path.display());
                let _ = std::fs::remove_file(path);
                None
            }
            Err(e) => {
                tracing::warn!("{e}; rebuilding it");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// Whether a file for `meta` fits the cache's bound and the disk: `None` when it does, else
    /// why not (what [`LayoutCache::write`] would answer without writing).
    pub fn room_for(&self, meta: &LayoutMeta) -> Result<Option<WriteResult>> {
        let (header, data_bytes) = header_bytes(meta)?;
        let total = 8 + header.len() as u64 + data_bytes;
        if total > self.max_bytes {
            return Ok(Some(WriteResult::TooLarge { bytes: total, max: self.max_bytes }));
        }
        fs_err::create_dir_all(&self.dir)?;
        // What pruning would free counts as free.
        let cached: u64 = self.list()?.iter().map(|e| e.bytes).sum();
        let prunable = (cached + total).saturating_sub(self.max_bytes);
        if let Some(free) = crate::files::free_disk_bytes(&self.dir) {
            if free + prunable < total + KEEP_FREE_BYTES {
                return Ok(Some(WriteResult::DiskFull { bytes: total, free }));
            }
        }
        Ok(None)
    }

    /// Writes `layers` as the cache file at `path` (atomically; when another process published
    /// the same file first, theirs is kept). Makes room by removing the least recently used
    /// files; writes nothing when the file would not fit the cache's bound or the disk.
    pub fn write(
        &self,
        path: &Path,
        meta: &LayoutMeta,
        layers: &[(&LayerMeta, LayerSource)],
    ) -> Result<WriteResult> {
        if cfg!(target_endian = "big") {
            return Err(Error::Unsupported(
                "layout cache files are little-endian; this machine is not".into(),
            ));
        }
        let (header, data_bytes) = header_bytes(meta)?;
        let total = 8 + header.len() as u64 + data_bytes;
        if total > self.max_bytes {
            return Ok(WriteResult::TooLarge { bytes: total, max: self.max_bytes });
        }
        fs_err::create_dir_all(&self.dir)?;
        self.prune_to(self.max_bytes.saturating_sub(total))?;
        if let Some(free) = crate::files::free_disk_bytes(&self.dir) {
            if free < total + KEEP_FREE_BYTES {
                return Ok(WriteResult::DiskFull { bytes: total, free });
            }
        }
        let mut builder = tempfile::Builder::new();
        builder.prefix(".kiln-layout-").suffix(".part");
        // Readable by others (0666 less the umask, as any new file), so every kiln process
        // on the box that may read the models may map it too.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let tmp = builder.tempfile_in(&self.dir)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 22, tmp.as_file());
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (layer, source) in layers {
            let values = source.values()?;
            if values.dims != layer.dims || values.bias.is_some() != layer.bias {
                return Err(Error::Unsupported(format!(
                    "layout cache: layer {:?} changed shape while it was written",
                    layer.names
                )));
            }
            for part in std::iter::once(&values.weight).chain(values.bias.as_ref()) {
                // Native order is little-endian here: from_env refuses other machines.
                out.write_all(crate::files::f32_bytes(part))?;
            }
        }
        out.flush()?;
        drop(out);
        tmp.as_file().sync_all()?;
        let len = tmp.as_file().metadata()?.len();
        if len != total {
            return Err(Error::Io(std::io::Error::other(format!(
                "{}: wrote {len} of {total} bytes (disk full?); nothing was kept",
                path.display()
            ))));
        }
        match tmp.persist_noclobber(path) {
            Ok(_) => Ok(WriteResult::Written { bytes: total }),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(WriteResult::Existed),
            Err(e) => Err(Error::Io(std::io::Error::new(
                e.error.kind(),
                format!("{}: {}", path.display(), e.error),
            ))),
        }
    }

    /// The cache's files, most recently used first.
    pub fn list(&self) -> Result<Vec<CacheEntry>> {
        let mut out = Vec::new();
        let Ok(read) = std::fs::read_dir(&self.dir) else { return Ok(out) };
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            let meta = entry.metadata()?;
            let used = meta.modified().ok();
            let described = LayoutFile::open(&path).map(|f| f.meta);
            out.push(CacheEntry { path, bytes: meta.len(), used, meta: described.ok() });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.used));
        Ok(out)
    }

    /// Removes the least recently used files (and leftovers of interrupted writes) until the
    /// cache holds at most `keep_bytes`; returns what was removed.
    pub fn prune_to(&self, keep_bytes: u64) -> Result<Vec<CacheEntry>> {
        let mut removed = Vec::new();
        if let Ok(read) = std::fs::read_dir(&self.dir) {
            for entry in read.flatten() {
                let name = entry.file_name();
                let stale = entry.metadata().ok().and_then(|m| m.modified().ok()).is_some_and(|t| {
                    t.elapsed().is_ok_and(|age| age > std::time::Duration::from_secs(24 * 3600))
                });
                // A `.part` file younger than a day may be another process's write in progress.
                if name.to_string_lossy().starts_with(".kiln-layout-") && stale {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let mut entries = self.list()?;
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        while total > keep_bytes {
            let Some(oldest) = entries.pop() else { break };
            // Removing a file another process maps is safe: its mapping keeps the data.
            fs_err::remove_file(&oldest.path)?;
            total -= oldest.bytes;
            removed.push(oldest);
        }
        Ok(removed)
    }
}

/// Layout files being written in the background (see [`LayoutCache::write_in_background`]).
static PENDING: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(Vec::new());

impl LayoutCache {
    /// [`LayoutCache::write`] on a background thread, so the load that found no file returns
    /// (and its first image starts) at once: the write takes about as long as the disk needs
    /// for the weights. `layers` keep the model's layers alive until written. A failure is
    /// logged; the next load simply writes the file again. [`wait_for_writes`] joins them.
    pub fn write_in_background(&self, path: PathBuf, meta: LayoutMeta, layers: Vec<LayerSource>) {
        let cache = self.clone();
        let spawned = std::thread::Builder::new().name("kiln-layout-write".into()).spawn(move || {
            lower_thread_priority();
            let refs: Vec<(&LayerMeta, LayerSource)> = meta.layers.iter().zip(layers).collect();
            match cache.write(&path, &meta, &refs) {
                Ok(WriteResult::Written { bytes }) => {
                    tracing::info!(
                        "{}: wrote {bytes} bytes of pre-laid-out weights to {}",
                        meta.component,
                        path.display()
                    )
                }
                Ok(WriteResult::Existed) => {}
                Ok(other) => {
                    tracing::warn!("{}: pre-laid-out weights not written: {other:?}", meta.component)
                }
                Err(e) => tracing::warn!("{}: pre-laid-out weights not written: {e}", meta.component),
            }
        });
        match spawned {
            Ok(handle) => PENDING.lock().unwrap_or_else(|p| p.into_inner()).push(handle),
            Err(e) => tracing::warn!("pre-laid-out weights not written: {e}"),
        }
    }
}

/// The writer yields the CPU to the first image, which runs beside it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn lower_thread_priority() {
    #[allow(unsafe_code)]
    // SAFETY: gettid and setpriority take no pointers; setpriority on this thread's id changes
    // only this thread's nice value (a failure leaves it as it was).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn lower_thread_priority() {}

/// Whether layout files are being written in the background now.
pub fn writes_pending() -> bool {
    PENDING.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|h| !h.is_finished())
}

/// Waits for the layout files being written in the background (a one-shot process calls this
/// before it exits, or the next load would have to write them again).
pub fn wait_for_writes() {
    let handles = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|p| p.into_inner()));
    for handle in handles {
        let _ = handle.join();
    }
}

/// What [`LayoutCache::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Written {
        bytes: u64,
    },
    /// Another process published the same file first.
    Existed,
    TooLarge {
        bytes: u64,
        max: u64,
    },
    DiskFull {
        bytes: u64,
        free: u64,
    },
}

/// One file of the cache.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    pub path: PathBuf,
    pub bytes: u64,
    pub used: Option<std::time::SystemTime>,
    /// `None` for a file that does not parse (it is not used, and pruned first by age).
    pub meta: Option<LayoutMeta>,
}

/// A built layer the cache writer takes values from.
pub enum LayerSource {
    Linear(Linear),
    Conv(Conv2d),
    Embedding(Embedding),
}

impl LayerSource {
    /// The layer in `derived`, if it is one the cache holds and it lives on the CPU in f32.
    pub fn of(derived: &Derived) -> Option<Self> {
        if let Some(l) = derived.downcast_ref::<Linear>() {
            return Some(Self::Linear(l.clone()));
        }
        if let Some(e) = derived.downcast_ref::<Embedding>() {
            return Some(Self::Embedding(e.clone()));
        }
        derived.downcast_ref::<Conv2d>().map(|c| Self::Conv(c.clone()))
    }

    /// The weight's dims in the kernel's layout and whether there is a bias (no copy).
    pub fn shape(&self) -> Option<(Vec<usize>, bool)> {
        match self {
            Self::Linear(l) => l.cpu_shape(),
            Self::Conv(c) => c.cpu_shape(),
            Self::Embedding(e) => e.cpu_shape(),
        }
    }

    pub fn values(&self) -> Result<LayerValues> {
        let values = match self {
            Self::Linear(l) => l.cpu_values(),
            Self::Conv(c) => c.cpu_values(),
            Self::Embedding(e) => e.cpu_values(),
        };
        values?.ok_or_else(|| Error::Unsupported("layout cache: a layer not on the CPU in f32".into()))
    }
}

/// A mapped cache file.
pub struct LayoutFile {
    map: Arc<Mmap>,
    pub meta: LayoutMeta,
    /// Per layer: byte offsets of the weight and bias values in the mapping.
    offsets: Vec<(usize, Option<usize>)>,
    by_key: HashMap<(String, Vec<String>), usize>,
    /// Per tensor name: the layers built from it.
    by_name: HashMap<String, Vec<usize>>,
}

impl LayoutFile {
    /// Maps and checks a cache file; any problem is an error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad =
            |msg: String| Error::Weights { path: path.to_path_buf(), msg: format!("layout cache: {msg}") };
        let file = fs_err::File::open(path)?;
        // SAFETY: cache files are written to a temp name and published by an atomic link, never
        // modified in place; pruning unlinks them, which leaves existing mappings intact.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(file.file()) }.map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| bad(format!("{e} (truncated?)")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let text = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("kiln_layout"))
            .ok_or_else(|| bad("no kiln_layout metadata".into()))?;
        let meta: LayoutMeta = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if meta.version != LAYOUT_VERSION {
            return Err(bad(format!("layout version {} (this kiln writes {LAYOUT_VERSION})", meta.version)));
        }
        let base = map.as_ptr() as usize;
        let mut offsets = Vec::with_capacity(meta.layers.len());
        let locate = |name: String, len: usize| -> Result<usize> {
            let view = st.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
            let ptr = view.data().as_ptr() as usize;
            if view.dtype() != safetensors::Dtype::F32 || view.data().len() != 4 * len || ptr % 4 != 0 {
                return Err(bad(format!("{name}: not {len} aligned f32 values")));
            }
            Ok(ptr - base)
        };
        let mut by_key = HashMap::new();
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, layer) in meta.layers.iter().enumerate() {
            let weight = locate(format!("{i}.w"), layer.dims.iter().product())?;
            let bias = match layer.bias {
                true => Some(locate(format!("{i}.b"), bias_len(layer))?),
                false => None,
            };
            offsets.push((weight, bias));
            by_key.insert((layer.kind.clone(), layer.names.clone()), i);
            for n in &layer.names {
                by_name.entry(n.clone()).or_default().push(i);
            }
        }
        drop(st);
        Ok(Self { map: Arc::new(map), meta, offsets, by_key, by_name })
    }

    /// The layers built from tensor `name` (their source name lists).
    pub fn layers_of(&self, name: &str) -> impl Iterator<Item = &[String]> {
        self.by_name.get(name).into_iter().flatten().map(|&i| self.meta.layers[i].names.as_slice())
    }

    /// The cached layer of `kind` from `names`, computing from the mapping in place.
    pub fn layer(&self, kind: &str, names: &[String]) -> Option<Result<Derived>> {
        let &i = self.by_key.get(&(kind.to_string(), names.to_vec()))?;
        Some(self.build(i))
    }

    fn build(&self, i: usize) -> Result<Derived> {
        let layer = &self.meta.layers[i];
        let (w, b) = self.offsets[i];
        let weight = HostF32::new(Arc::new(Mapped {
            map: self.map.clone(),
            offset: w,
            len: layer.dims.iter().product(),
        }));
        let bias =
            b.map(|o| Mapped { map: self.map.clone(), offset: o, len: bias_len(layer) }.values().to_vec());
        let wrong =
            || Error::Unsupported(format!("layout cache: layer {:?} has dims {:?}", layer.names, layer.dims));
        let derived: Derived = match (layer.kind.as_str(), layer.dims.as_slice()) {
            ("linear", &[i, o]) => Arc::new(Linear::from_host(weight, i, o, bias)?),
            ("embedding", &[vocab, dim]) if bias.is_none() => {
                Arc::new(Embedding::from_host(weight, vocab, dim)?)
            }
            (kind, &[o, c, h, w]) if kind.starts_with("conv2d/") => {
                let mut parts = kind.split('/').skip(1).map(str::parse::<usize>);
                let (Some(Ok(stride)), Some(Ok(padding)), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(wrong());
                };
                let cfg = candle_nn::Conv2dConfig { stride, padding, ..Default::default() };
                Arc::new(Conv2d::from_host(weight, [o, c, h, w], bias, cfg)?)
            }
            _ => return Err(wrong()),
        };
        Ok(derived)
    }
}

/// A range of f32 values in a mapped cache file.
struct Mapped {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl HostValues for Mapped {
    fn values(&self) -> &[f32] {
        let bytes = &self.map[self.offset..self.offset + 4 * self.len];
        #[allow(unsafe_code)]
        // SAFETY: `LayoutFile::open` checked that the range holds `len` f32 values at a 4-byte
        // aligned address (f32 has no invalid bit patterns), and the mapping is read-only and
        // lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), self.len)
        }
    }
}

fn bias_len(layer: &LayerMeta) -> usize {
    // A linear layer's weight is kept `[in, out]`, a convolution's OIHW.
    if layer.kind == "linear" {
        layer.dims.last().copied().unwrap_or(0)
    } else {
        layer.dims.first().copied().unwrap_or(0)
    }
}

fn same_hashes(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.1 == y.1)
}

/// The safetensors header (padded to 8 bytes) and the data size of a file holding `meta`.
fn header_bytes(meta: &LayoutMeta) -> Result<(Vec<u8>, u64)> {
    let mut entries = serde_json::Map::new();
    let mut offset = 0u64;
    let mut add = |name: String, shape: Vec<usize>| {
        let bytes = 4 * shape.iter().product::<usize>() as u64;
        entries.insert(
            name,
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    };
    for (i, layer) in meta.layers.iter().enumerate() {
        add(format!("{i}.w"), layer.dims.clone());
        if layer.bias {
            add(format!("{i}.b"), vec![bias_len(layer)]);
        }
    }
    let described = serde_json::to_string(meta).map_err(|e| Error::Unsupported(e.to_string()))?;
    entries.insert("__metadata__".into(), serde_json::json!({ "kiln_layout": described }));
    let mut header = serde_json::to_vec(&entries).map_err(|e| Error::Unsupported(e.to_string()))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    Ok((header, offset))
}

/// `40G`, `512M`, `1.5T`, `4096` (bytes).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_uppercase();
    let t = t.strip_suffix('B').unwrap_or(&t);
    let (num, mult) = match t.chars().last()? {
        'K' => (&t[..t.len() - 1], 1u64 << 10),
        'M' => (&t[..t.len() - 1], 1 << 20),
        'G' => (&t[..t.len() - 1], 1 << 30),
        'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * mult as f64) as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    fn meta(layers: Vec<LayerMeta>) -> LayoutMeta {
        LayoutMeta {
            version: LAYOUT_VERSION,
            component: "unet".into(),
            sources: vec![("a".into(), "h".into())],
            layers,
        }
    }

    #[test]
    fn layers_read_back_from_the_mapping_compute_the_same_bits() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayoutCache::at(dir.path().to_path_buf(), 1 << 40);
        let dev = Device::Cpu;
        let lin = Linear::new(
            Tensor::randn(0f32, 1., (6, 5), &dev).unwrap(),
            Some(Tensor::randn(0f32, 1., 6, &dev).unwrap()),
        )
        .unwrap();
        let conv = Conv2d::new(
            Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap(),
            None,
            candle_nn::Conv2dConfig { padding: 1, ..Default::default() },
        )
        .unwrap();
        let m = meta(vec![
            LayerMeta {
                kind: "linear".into(),
                names: vec!["l.weight".into(), "l.bias".into()],
                dims: vec![5, 6],
                bias: true,
            },
            LayerMeta {
                kind: "conv2d/1/1".into(),
                names: vec!["c.weight".into()],
                dims: vec![4, 3, 3, 3],
                bias: false,
            },
        ]);
        let path = cache.path_for("unet", &["h".into()]);
        let layers = [
            (&m.layers[0], LayerSource::Linear(lin.clone())),
            (&m.layers[1], LayerSource::Conv(conv.clone())),
        ];
        assert!(matches!(cache.write(&path, &m, &layers).unwrap(), WriteResult::Written { .. }));
        assert_eq!(cache.write(&path, &m, &layers).unwrap(), WriteResult::Existed);
        let file = cache.open(&path, "unet", &m.sources).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5), &dev).unwrap();
        let mapped = file.layer("linear", &m.layers[0].names).unwrap().unwrap();
        let mapped = mapped.downcast_ref::<Linear>().unwrap();
        assert_eq!(
            mapped.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            lin.forward(&x).unwrap().to_vec2::<f32>().unwrap()
        );
        let x = Tensor::randn(0f32, 1., (1, 3, 8, 8), &dev).unwrap();
        let mapped = file.layer("conv2d/1/1", &m.layers[1].names).unwrap().unwrap();
        let mapped = mapped.downcast_ref::<Conv2d>().unwrap();
        let (a, b) = (mapped.forward(&x).unwrap(), conv.forward(&x).unwrap());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(file.layer("linear", &["other".into()]).is_none());
        assert_eq!(file.layers_of("l.bias").count(), 1);

        // Other sources: not used, and removed.
        assert!(cache.open(&path, "unet", &[("a".into(), "changed".into())]).is_none());
        assert!(!path.exists());
        // Truncated: not used, and removed.
        cache.write(&path, &m, &layers).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 4).unwrap();
        assert!(cache.open(&path, "unet", &m.sources).is_none());
        assert!(!path.exists());
        // Another layout version: not used.
        let mut old = m.clone();
        old.version = LAYOUT_VERSION + 1;
        cache.write(&path, &old, &layers).unwrap();
        assert!(cache.open(&path, "unet", &m.sources).is_none());
    }

    #[test]
    fn the_cache_stays_under_its_bound_dropping_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let lin = Linear::new(Tensor::randn(0f32, 1., (256, 256), &dev).unwrap(), None).unwrap();
        let m = meta(vec![LayerMeta {
            kind: "linear".into(),
            names: vec!["w".into()],
            dims: vec![256, 256],
            bias: false,
        }]);
        let one = 8 + header_bytes(&m).unwrap().0.len() as u64 + header_bytes(&m).unwrap().1;
        let cache = LayoutCache::at(dir.path().to_path_buf(), 2 * one + one / 2);
        let layers = [(&m.layers[0], LayerSource::Linear(lin))];
        let paths: Vec<PathBuf> = (0..3).map(|i| cache.path_for("unet", &[format!("h{i}")])).collect();
        for p in &paths {
            assert!(matches!(cache.write(p, &m, &layers).unwrap(), WriteResult::Written { .. }));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!paths[0].exists() && paths[1].exists() && paths[2].exists());
        let small = LayoutCache::at(dir.path().to_path_buf(), one - 1);
        assert!(matches!(small.write(&paths[0], &m, &layers).unwrap(), WriteResult::TooLarge { .. }));
        assert_eq!(cache.prune_to(0).unwrap().len(), 2);
        assert!(cache.list().unwrap().is_empty());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("40G"), Some(40 << 30));
        assert_eq!(parse_size("512mb"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("-1G"), None);
    }
}
