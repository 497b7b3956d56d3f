//! The model pool: models loaded once and shared by every job (`Arc`), keyed by what makes two
//! loads interchangeable (tier or model, revision, device, dtype), evicted least-recently-used
//! within a memory budget. A job that causes a load is billed its seconds; later jobs pay 0.
//! A model asked for with another LoRA set than a pooled copy is built from that copy, sharing
//! every weight neither set touches.

use crate::error::{Error, Result};
use crate::loaders::lora::LoraRequest;
use crate::pipeline::model::LoadedModel;
use crate::pipeline::upscale::Upscaler;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What identifies a loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// `tier:NAME` or `model:SPEC`.
    pub model: String,
    pub revision: Option<String>,
    pub device: String,
    pub dtype: String,
    /// The LoRAs merged into the weights ([`crate::loaders::lora::pool_key`]); empty for none.
    pub loras: String,
    /// Where the model's text encoders live.
    pub text_encoders: crate::pipeline::model::TextPlacement,
}

/// A loaded model of any kind the pool holds.
#[derive(Clone)]
pub enum Pooled {
    Diffusion(Arc<LoadedModel>),
    /// A super-resolution model with the weight records the drift lock checks.
    Upscaler(Arc<Upscaler>, Vec<crate::pipeline::model::WeightRecord>),
}

struct Entry {
    value: Pooled,
    bytes: u64,
    last_used: u64,
}

/// What the pool holds now (for `/v1/report` and logs).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolEntryInfo {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub bytes: u64,
}

/// Loaded models, shared and bounded.
pub struct ModelPool {
    entries: Mutex<(HashMap<PoolKey, Entry>, u64)>,
    /// Serialises loads so two jobs needing the same model load it once.
    loading: Mutex<()>,
    budget: Option<u64>,
}

impl ModelPool {
    /// A pool holding at most `budget` bytes of weights (None = unbounded).
    pub fn new(budget: Option<u64>) -> Self {
        Self { entries: Mutex::new((HashMap::new(), 0)), loading: Mutex::new(()), budget }
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<PoolKey, Entry>, u64)> {
        // A panic while holding the lock leaves a consistent map (entries are whole), so a
        // poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self, key: &PoolKey) -> Option<Pooled> {
        let mut guard = self.lock();
        guard.1 += 1;
        let tick = guard.1;
        guard.0.get_mut(key).map(|e| {
            e.last_used = tick;
            e.value.clone()
        })
    }

    /// Whether `key` is loaded.
    pub fn contains(&self, key: &PoolKey) -> bool {
        self.lock().0.contains_key(key)
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> u64 {
        self.lock().0.values().map(|e| e.bytes).sum()
    }

    /// Whether a model of `bytes` could be held next to everything loaded now (no eviction).
    pub fn fits_alongside(&self, bytes: u64) -> bool {
        self.budget.is_none_or(|b| self.held_bytes() + bytes <= b)
    }

    pub fn entries(&self) -> Vec<PoolEntryInfo> {
        let guard = self.lock();
        let mut out: Vec<PoolEntryInfo> = guard
            .0
            .iter()
            .map(|(k, e)| PoolEntryInfo {
                model: k.model.clone(),
                device: k.device.clone(),
                dtype: k.dtype.clone(),
                bytes: e.bytes,
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// The model for `key`, loading it with `load` (which returns it and its size in bytes)
    /// when absent. Returns the model and the seconds this call spent loading (0 when warm).
    /// Least-recently-used models are evicted to make room; a model larger than the whole
    /// budget is refused before loading when its size is known (`expected_bytes`).
    pub fn get_or_load(
        &self,
        key: &PoolKey,
        expected_bytes: Option<u64>,
        load: impl FnOnce() -> Result<(Pooled, u64)>,
    ) -> Result<(Pooled, f64)> {
        if let Some(v) = self.touch(key) {
            return Ok((v, 0.0));
        }
        let _loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        // Another job may have loaded it while this one waited.
        if let Some(v) = self.touch(key) {
            return Ok((v, 0.0));
        }
        if let (Some(budget), Some(bytes)) = (self.budget, expected_bytes) {
            if bytes > budget {
                return Err(Error::arg(
                    "max-memory",
                    format!(
                        "{} needs about {} MB, more than the {} MB budget; raise --max-memory",
                        key.model,
                        bytes / 1_000_000,
                        budget / 1_000_000
                    ),
                ));
            }
            self.evict_for(bytes);
        }
        let t0 = Instant::now();
        let (value, bytes) = load()?;
        let seconds = t0.elapsed().as_secs_f64();
        self.evict_for(bytes);
        let mut guard = self.lock();
        guard.1 += 1;
        let tick = guard.1;
        guard.0.insert(key.clone(), Entry { value: value.clone(), bytes, last_used: tick });
        Ok((value, seconds))
    }

    /// The diffusion model for `key`: the pooled one; else, when the pool holds the same model
    /// with another LoRA set, that model switched to `key`'s set
    /// ([`LoadedModel::with_loras`]: only the layers either set touches are re-derived); else
    /// `load`ed. Returns the model and the seconds spent (0 when warm).
    pub fn get_or_load_diffusion(
        &self,
        key: &PoolKey,
        loras: &[LoraRequest],
        load: impl FnOnce() -> Result<LoadedModel>,
    ) -> Result<(Arc<LoadedModel>, f64)> {
        let (pooled, seconds) = self.get_or_load(key, None, || {
            let model = match self.lora_sibling(key) {
                Some(warm) => warm.with_loras(loras)?,
                None => load()?,
            };
            let bytes = model_bytes(&model);
            Ok((Pooled::Diffusion(Arc::new(model)), bytes))
        })?;
        match pooled {
            Pooled::Diffusion(model) => Ok((model, seconds)),
            Pooled::Upscaler(..) => {
                Err(Error::Unsupported(format!("{} is loaded as another kind of model", key.model)))
            }
        }
    }

    /// The most recently used diffusion model that differs from `key` only in its LoRA set.
    fn lora_sibling(&self, key: &PoolKey) -> Option<Arc<LoadedModel>> {
        let guard = self.lock();
        guard
            .0
            .iter()
            .filter(|(k, _)| {
                k.model == key.model
                    && k.revision == key.revision
                    && k.device == key.device
                    && k.dtype == key.dtype
                    && k.loras != key.loras
            })
            .max_by_key(|(_, e)| e.last_used)
            .and_then(|(_, e)| match &e.value {
                Pooled::Diffusion(m) => Some(m.clone()),
                Pooled::Upscaler(..) => None,
            })
    }

    /// Evicts least-recently-used entries until `bytes` more fit the budget. Jobs that hold an
    /// evicted model keep it alive (`Arc`) until they finish.
    fn evict_for(&self, bytes: u64) {
        let Some(budget) = self.budget else { return };
        let mut guard = self.lock();
        loop {
            let held: u64 = guard.0.values().map(|e| e.bytes).sum();
            if held + bytes <= budget || guard.0.is_empty() {
                return;
            }
            let oldest = guard.0.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    guard.0.remove(&k);
                }
                None => return,
            }
        }
    }
}

/// Approximate bytes of a loaded pipeline: the size of the weight files it was built from.
pub fn model_bytes(model: &LoadedModel) -> u64 {
    let dir = model.source.dir();
    let single_file = model.denoiser_file.is_some();
    let mut total: u64 = model
        .weights
        .iter()
        .filter(|w| w.component != "vae" || model.vae_source.is_none())
        .filter(|w| !(single_file && w.component == model.spec.denoiser))
        .filter_map(|w| std::fs::metadata(dir.join(&w.component).join(&w.file)).ok())
        .map(|m| m.len())
        .sum();
    total +=
        model.denoiser_file.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum::<u64>();
    total += model.vae_files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum::<u64>();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> PoolKey {
        PoolKey {
            model: name.into(),
            revision: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            loras: String::new(),
            text_encoders: Default::default(),
        }
    }

    fn fake(bytes: u64) -> Result<(Pooled, u64)> {
        let fixture =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sr/srvgg-tiny-x4.safetensors");
        let weights = crate::loaders::store::load_file(std::path::Path::new(fixture))?;
        let up = Upscaler::new(weights, &candle_core::Device::Cpu, candle_core::DType::F32)?;
        Ok((Pooled::Upscaler(Arc::new(up), Vec::new()), bytes))
    }

    #[test]
    fn loads_once_and_evicts_least_recently_used() -> Result<()> {
        let pool = ModelPool::new(Some(100));
        let (_, s) = pool.get_or_load(&key("a"), None, || fake(60))?;
        assert!(s >= 0.0);
        let (_, s) = pool.get_or_load(&key("a"), None, || Err(Error::Unsupported("loaded twice".into())))?;
        assert_eq!(s, 0.0);
        pool.get_or_load(&key("b"), None, || fake(30))?;
        // a was used before b; touching a makes b the oldest.
        pool.get_or_load(&key("a"), None, || fake(60))?;
        pool.get_or_load(&key("c"), None, || fake(40))?;
        assert!(pool.contains(&key("a")) && pool.contains(&key("c")) && !pool.contains(&key("b")));
        assert!(pool.get_or_load(&key("d"), Some(500), || fake(500)).is_err());
        Ok(())
    }

    #[test]
    fn loaded_models_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LoadedModel>();
        assert_send_sync::<Upscaler>();
        assert_send_sync::<ModelPool>();
    }
}
