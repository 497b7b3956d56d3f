//! Switching a warm model's LoRA set without a full reload.
//!
//! Every model load records, per tensor name, the tensor its layers hold ([`WeightCache`]) and
//! the layers derived from those tensors (transposed gemm copies, fused q/k/v, Winograd
//! kernels; see `kiln_kernels::reuse`). A model rebuilt from the same files with another LoRA
//! set ([`ReuseBuild`]) takes every tensor and layer whose weights neither the old nor the new
//! set patches straight from the warm model (shared memory, no copy) and re-derives only the
//! patched ones from the memory-mapped base files, with the new deltas merged exactly as a
//! fresh load merges them. The rebuilt model therefore computes bit for bit what a fresh load
//! with the new set computes.

use super::lora::merge::{apply_patches, Patch};
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
        inner.layers.retain(|(_, names), _| !names.iter().any(|(c, _)| components.contains(c.as_str())));
    }
}

/// One model build: the cache it fills, and the warm model's cache it may take from.
pub struct ReuseBuild {
    from: Option<Arc<WeightCache>>,
    into: Arc<WeightCache>,
    /// Names patched by the old or the new LoRA set: never taken from the warm model.
    changed: HashSet<Name>,
    counts: Mutex<ReuseCounts>,
}

/// How a model's tensors were come by: shared with a warm model, or read from the files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReuseCounts {
    pub shared: usize,
    pub read: usize,
}

impl ReuseBuild {
    /// A build that fills `into`, taking unchanged weights from `from` when given. `patched`
    /// lists the names the new LoRA set patches.
    pub fn new(from: Option<Arc<WeightCache>>, into: Arc<WeightCache>, patched: HashSet<Name>) -> Self {
        let mut changed = patched.clone();
        if let Some(old) = &from {
            changed.extend(old.lock().patched.iter().cloned());
        }
        // A reload of released parts adds to what the model's first build recorded.
        into.lock().patched.extend(patched);
        Self { from, into, changed, counts: Mutex::default() }
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
        let backend = WeightBackend {
            base,
            patches: patches.unwrap_or_default(),
            component: component.to_string(),
            build: self.clone(),
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
        let from = self.from.as_ref()?;
        let names = self.names(sources)?;
        if names.iter().any(|n| self.changed.contains(n)) {
            return None;
        }
        let key = (kind.to_string(), names);
        let layer = from.lock().layers.get(&key).cloned()?;
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
}

impl WeightBackend {
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = (self.component.clone(), name.to_string());
        if !self.build.changed.contains(&key) {
            let warm = self.build.from.as_ref().and_then(|f| f.lock().tensors.get(&key).cloned());
            if let Some(t) = warm.filter(|t| t.dtype() == dtype && t.device().same_device(dev)) {
                self.build.counts.lock().unwrap_or_else(|p| p.into_inner()).shared += 1;
                return Ok(self.keep(key, t));
            }
        }
        let base = self.base.load(name, dev)?;
        let tensor = match self.patches.get(name) {
            Some(patches) => apply_patches(&base, patches, dtype, dev)?,
            None => base.to_dtype(dtype)?,
        };
        self.build.counts.lock().unwrap_or_else(|p| p.into_inner()).read += 1;
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
