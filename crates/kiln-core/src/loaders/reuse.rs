//! Switching a warm model's LoRA set without a full reload.
//!
//! Every model load records, per tensor name, the tensor its layers hold ([`WeightCache`]) and
//! the layers derived from those tensors (transposed gemm copies, fused q/k/v, Winograd
//! kernels; see `kiln_kernels::reuse`). A model rebuilt from the same files with another LoRA
//! set ([`ReuseBuild`]) takes every tensor and layer whose weights neither the old nor the new
//! set patches straight from the warm model (shared memory, no copy) and re-derives only the
//! patched ones from the memory-mapped base files, with the new deltas merged exactly as a
//! fresh load merges them. The rebuilt model therefore computes bit for bit what a fresh load
//! with the new set computes. Layers that only the old set patched are back to their base
//! weights, which the layout cache holds when it is on (see below): they are mapped, not re-read.
//!
//! A build on the CPU in f32 also uses the layout cache ([`super::layout_cache`]): a component
//! whose pre-laid-out file exists takes its layers from that file's mapping, and the tensors
//! those layers are built from are never read (the backend hands out a placeholder of the
//! right shape, whose values are NaN so that a use outside a cached layer could not go
//! unnoticed; a build checks that every placeholder went into a cached layer and is redone
//! from the files otherwise). A component without a file gets one written after the build.

use super::layout_cache::{LayerMeta, LayerSource, LayoutCache, LayoutFile, LayoutMeta, WriteResult};
use super::lora::merge::{apply_patches, apply_patches_mapped, Patch};
use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, TensorId};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use kiln_kernels::reuse::{DeriveMemo, Derived};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// A tensor of a model: its component folder (`unet`, `text_encoder`, `vae`, ...) and name.
type Name = (String, String);

/// What a loaded model's layers were built from, kept with the model for later rebuilds.
#[derive(Default)]
pub struct WeightCache {
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    /// The tensors handed to the layers, as the layers hold them (a Linear's weight as a view
    /// of its transposed copy, so keeping it costs no memory).
    tensors: HashMap<Name, Tensor>,
    /// Layers by kind and the names of their source tensors.
    layers: HashMap<(String, Vec<Name>), Derived>,
    /// While the model is built: which name each handed-out tensor stands for.
    ids: HashMap<TensorId, Name>,
    /// Names whose values were LoRA-merged (they differ from the base files).
    patched: HashSet<Name>,
    /// Names whose tensors are placeholders (their layers came from a layout file).
    placeholders: HashSet<Name>,
}

impl WeightCache {
    fn lock(&self) -> MutexGuard<'_, CacheInner> {
        // Entries are inserted whole; a panic elsewhere leaves the maps usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the build-time id map once the model is built (ids are never seen again).
    pub(crate) fn finish(&self) {
        self.lock().ids = HashMap::new();
    }

    /// Drops what the cache holds of `components` (folder names): a component the model
    /// released (text encoders after encoding) must not stay alive here.
    pub(crate) fn forget<'a>(&self, components: impl IntoIterator<Item = &'a str>) {
        let components: HashSet<&str> = components.into_iter().collect();
        let mut inner = self.lock();
        inner.tensors.retain(|(c, _), _| !components.contains(c.as_str()));
        inner.placeholders.retain(|(c, _)| !components.contains(c.as_str()));
        inner.layers.retain(|(_, names), _| !names.iter().any(|(c, _)| components.contains(c.as_str())));
    }
}

/// Runs a model build (`attempt(layout)` returns what it built and its [`ReuseBuild`]) with the
/// layout cache, and once more without it when a placeholder did not go into a mapped layer
/// ([`ReuseBuild::check_placeholders`]).
pub fn with_layout_fallback<T>(
    mut attempt: impl FnMut(bool) -> Result<(T, Arc<ReuseBuild>)>,
) -> Result<(T, Arc<ReuseBuild>)> {
    let (built, build) = attempt(true)?;
    match build.check_placeholders() {
        Ok(()) => Ok((built, build)),
        Err(e) => {
            tracing::warn!("{e}; loading from the weight files instead");
            attempt(false)
        }
    }
}

/// One model build: the cache it fills, and the warm model's cache it may take from.
pub struct ReuseBuild {
    from: Option<Arc<WeightCache>>,
    into: Arc<WeightCache>,
    /// Names patched by the old or the new LoRA set: never taken from the warm model.
    changed: HashSet<Name>,
    /// Names the new LoRA set patches: never taken from a layout file either (it holds base
    /// weights, which are right for every other name, the old set's included).
    patched: HashSet<Name>,
    counts: Mutex<ReuseCounts>,
    /// The layout cache, unless it is off.
    layout: Option<LayoutCache>,
    layouts: Mutex<LayoutState>,
}

/// A component without a layout file yet: the file to write and its sources (file, sha256).
struct MissingLayout {
    component: String,
    path: PathBuf,
    sources: Vec<(String, String)>,
}

#[derive(Default)]
struct LayoutState {
    /// Per component: the layout file its layers come from.
    mapped: HashMap<String, Arc<LayoutFile>>,
    missing: Vec<MissingLayout>,
    /// Placeholder tensors handed out, and those that went into a layer from a layout file.
    handed: HashMap<TensorId, Name>,
    consumed: HashSet<TensorId>,
}

/// How a model's tensors were come by: shared with a warm model, read from the files, or not
/// read at all because the layers built from them were mapped from the layout cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReuseCounts {
    pub shared: usize,
    pub read: usize,
    pub mapped: usize,
}

impl ReuseBuild {
    /// A build that fills `into`, taking unchanged weights from `from` when given. `patched`
    /// lists the names the new LoRA set patches.
    /// `layout`: whether CPU f32 components use and fill the layout cache (when it is on).
    pub fn new(
        from: Option<Arc<WeightCache>>,
        into: Arc<WeightCache>,
        patched: HashSet<Name>,
        layout: bool,
    ) -> Result<Self> {
        let mut changed = patched.clone();
        if let Some(old) = &from {
            changed.extend(old.lock().patched.iter().cloned());
        }
        // A reload of released parts adds to what the model's first build recorded.
        into.lock().patched.extend(patched.iter().cloned());
        let layout = if layout { LayoutCache::from_env()? } else { None };
        Ok(Self { from, into, changed, patched, counts: Mutex::default(), layout, layouts: Mutex::default() })
    }

    fn layouts(&self) -> MutexGuard<'_, LayoutState> {
        self.layouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut ReuseCounts)) {
        f(&mut self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Fails when a placeholder tensor was handed out but no layer from a layout file took it
    /// (the model uses that tensor some other way, so its values are needed): the caller then
    /// builds again without the layout cache.
    pub fn check_placeholders(&self) -> Result<()> {
        let state = self.layouts();
        let mut unused: Vec<String> = state
            .handed
            .iter()
            .filter(|(id, _)| !state.consumed.contains(id))
            .map(|(_, (c, n))| format!("{c}/{n}"))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        let files: Vec<String> = state.mapped.values().map(|f| f.meta.component.clone()).collect();
        Err(Error::Unsupported(format!(
            "the layout cache for {} does not cover how the model uses {} tensor(s), e.g. {}",
            files.join(", "),
            unused.len(),
            unused[0]
        )))
    }

    /// Starts writing the layout files of the components that had none, from the layers this
    /// build derived, in the background ([`LayoutCache::write_in_background`]). Returns why a
    /// file will not be written (the cache's bound, a full disk): the model is loaded either way.
    pub fn write_layouts(&self) -> Vec<String> {
        let Some(cache) = &self.layout else { return Vec::new() };
        let missing = std::mem::take(&mut self.layouts().missing);
        let mut notes = Vec::new();
        for MissingLayout { component, path, sources } in missing {
            let layers: Vec<(LayerMeta, LayerSource)> = {
                let into = self.into.lock();
                let mut layers: Vec<_> = into
                    .layers
                    .iter()
                    .filter(|((_, names), _)| !names.is_empty() && names.iter().all(|(c, _)| *c == component))
                    .filter(|((_, names), _)| !names.iter().any(|n| into.patched.contains(n)))
                    .filter_map(|((kind, names), layer)| {
                        let source = LayerSource::of(layer)?;
                        let (dims, bias) = source.shape()?;
                        let names = names.iter().map(|(_, n)| n.clone()).collect();
                        let meta = LayerMeta { kind: kind.clone(), names, dims, bias };
                        Some((meta, source))
                    })
                    .collect();
                layers.sort_by(|a, b| (&a.0.names, &a.0.kind).cmp(&(&b.0.names, &b.0.kind)));
                layers
            };
            if layers.is_empty() {
                continue;
            }
            let (metas, layer_sources): (Vec<LayerMeta>, Vec<LayerSource>) = layers.into_iter().unzip();
            let meta = LayoutMeta {
                version: super::layout_cache::LAYOUT_VERSION,
                component: component.clone(),
                sources,
                layers: metas,
            };
            let note = match cache.room_for(&meta) {
                Ok(None) => {
                    cache.write_in_background(path, meta, layer_sources);
                    continue;
                }
                Ok(Some(WriteResult::TooLarge { bytes, max })) => format!(
                    "{component}: pre-laid-out weights ({bytes} bytes) exceed the layout cache's bound of {max} bytes \
                     ({}); loads stay slower",
                    crate::env::KILN_LAYOUT_CACHE_MAX
                ),
                Ok(Some(WriteResult::DiskFull { bytes, free })) => format!(
                    "{component}: not writing {bytes} bytes of pre-laid-out weights: only {free} bytes free under {}",
                    cache.dir().display()
                ),
                Ok(Some(_)) => continue,
                Err(e) => format!("{component}: pre-laid-out weights not written: {e}"),
            };
            tracing::warn!("{note}");
            notes.push(note);
        }
        notes
    }

    /// The tensors handed out so far, by where they came from.
    pub fn counts(&self) -> ReuseCounts {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A component's weights as a `VarBuilder`: the warm model's tensors where unchanged, the
    /// files (with `patches` merged) elsewhere.
    pub(crate) fn var_builder(
        self: &Arc<Self>,
        component: &str,
        files: &[PathBuf],
        patches: Option<HashMap<String, Vec<Patch>>>,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        for file in files {
            crate::loaders::weights::validate_header(file)?;
        }
        // SAFETY: read-only maps of weight files; kiln never writes to a weight file while a
        // model built from it is alive (the hazard every mmap-based loader accepts).
        #[allow(unsafe_code)]
        let base = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::Weights {
            path: files.first().cloned().unwrap_or_default(),
            msg: e.to_string(),
        })?;
        let layout = match &self.layout {
            Some(cache) if device.is_cpu() && dtype == DType::F32 => {
                let sources = files
                    .iter()
                    .map(|f| {
                        let name =
                            f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        Ok((name, crate::loaders::weights::weight_sha256_cached(f)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let hashes: Vec<String> = sources.iter().map(|(_, h)| h.clone()).collect();
                let path = cache.path_for(component, &hashes);
                match cache.open(&path, component, &sources) {
                    Some(file) => {
                        let file = Arc::new(file);
                        self.layouts().mapped.insert(component.to_string(), file.clone());
                        Some(file)
                    }
                    None => {
                        // Only a build without LoRA deltas in this component lays out its base.
                        if patches.as_ref().is_none_or(|p| p.is_empty()) {
                            let component = component.to_string();
                            self.layouts().missing.push(MissingLayout { component, path, sources });
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        let backend = WeightBackend {
            base,
            patches: patches.unwrap_or_default(),
            component: component.to_string(),
            build: self.clone(),
            layout,
        };
        Ok(VarBuilder::from_backend(Box::new(backend), dtype, device.clone()))
    }

    fn names(&self, ids: &[TensorId]) -> Option<Vec<Name>> {
        let into = self.into.lock();
        ids.iter().map(|id| into.ids.get(id).cloned()).collect()
    }
}

impl DeriveMemo for ReuseBuild {
    fn lookup(&self, kind: &str, sources: &[TensorId]) -> Option<Derived> {
        let names = self.names(sources)?;
        if names.iter().any(|n| self.patched.contains(n)) {
            return None;
        }
        // A layer the old set patched is not the warm model's to share, but its base is in the
        // layout file (switching a LoRA off costs no re-read).
        let shareable = !names.iter().any(|n| self.changed.contains(n));
        let key = (kind.to_string(), names);
        let warm = match shareable {
            true => self.from.as_ref().and_then(|from| from.lock().layers.get(&key).cloned()),
            false => None,
        };
        let layer = match warm {
            Some(layer) => layer,
            None => {
                let (component, _) = key.1.first()?;
                let file = self.layouts().mapped.get(component).cloned()?;
                let tensor_names: Vec<String> = key.1.iter().map(|(_, n)| n.clone()).collect();
                match file.layer(kind, &tensor_names)? {
                    Ok(layer) => layer,
                    Err(e) => {
                        tracing::warn!("{e}");
                        return None;
                    }
                }
            }
        };
        self.layouts().consumed.extend(sources.iter().copied());
        self.into.lock().layers.insert(key, layer.clone());
        Some(layer)
    }

    fn store(&self, kind: &str, sources: &[TensorId], layer: Derived, views: Vec<(TensorId, Tensor)>) {
        let Some(names) = self.names(sources) else { return };
        let mut into = self.into.lock();
        for (id, view) in views {
            if let Some(name) = into.ids.get(&id).cloned() {
                into.tensors.insert(name, view);
            }
        }
        into.layers.insert((kind.to_string(), names), layer);
    }
}

/// A component's mmapped files, LoRA deltas added to the tensors they patch, unchanged tensors
/// taken from the warm model; every tensor handed out is recorded in the new model's cache.
struct WeightBackend {
    base: MmapedSafetensors,
    patches: HashMap<String, Vec<Patch>>,
    component: String,
    build: Arc<ReuseBuild>,
    /// The component's layout file, when it has one.
    layout: Option<Arc<LayoutFile>>,
}

impl WeightBackend {
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = (self.component.clone(), name.to_string());
        if self.mappable(name) {
            return self.placeholder(key, dtype, dev);
        }
        if !self.build.changed.contains(&key) {
            let warm = self.build.from.as_ref().and_then(|f| {
                let from = f.lock();
                // A warm placeholder has no values to share.
                if from.placeholders.contains(&key) {
                    return None;
                }
                from.tensors.get(&key).cloned()
            });
            if let Some(t) = warm.filter(|t| t.dtype() == dtype && t.device().same_device(dev)) {
                self.build.count(|c| c.shared += 1);
                return Ok(self.keep(key, t));
            }
        }
        let tensor = match self.patches.get(name) {
            Some(patches) => match apply_patches_mapped(&self.base, name, patches, dtype, dev)? {
                Some(merged) => merged,
                None => apply_patches(&self.base.load(name, dev)?, patches, dtype, dev)?,
            },
            None => self.base.load(name, dev)?.to_dtype(dtype)?,
        };
        self.build.count(|c| c.read += 1);
        Ok(self.keep(key, tensor))
    }

    /// Whether every layer the layout file builds from `name` can be taken from it (none of
    /// their tensors changes in this build), so `name` itself need not be read.
    fn mappable(&self, name: &str) -> bool {
        let Some(file) = &self.layout else { return false };
        let mut layers = file.layers_of(name).peekable();
        layers.peek().is_some()
            && layers.all(|names| {
                names.iter().all(|n| !self.build.patched.contains(&(self.component.clone(), n.clone())))
            })
    }

    /// A stand-in of the right shape and dtype that holds one NaN (broadcast, no allocation).
    fn placeholder(&self, key: Name, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = Shape::from_dims(self.base.get(&key.1)?.shape());
        let tensor = Tensor::new(&[f32::NAN], dev)?.to_dtype(dtype)?.reshape(())?.broadcast_as(shape)?;
        self.build.count(|c| c.mapped += 1);
        self.build.layouts().handed.insert(tensor.id(), key.clone());
        self.build.into.lock().placeholders.insert(key.clone());
        Ok(self.keep(key, tensor))
    }

    fn keep(&self, key: Name, tensor: Tensor) -> Tensor {
        let mut into = self.build.into.lock();
        into.ids.insert(tensor.id(), key.clone());
        into.tensors.insert(key, tensor.clone());
        tensor
    }
}

impl SimpleBackend for WeightBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.read(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.get(name).is_ok()
    }
}
