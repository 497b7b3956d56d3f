//! A pipeline's text encoders, which a job may release once its prompts are encoded.
//!
//! The text encoders are needed only at the start of a job, yet FLUX.1's T5-XXL is 9.5 GB in
//! bf16, as much as a 24 GB card cannot spare next to the transformer. [`TextEncoders`] holds
//! them behind a slot a job can empty after encoding (`--offload-text-encoders`); the next job
//! that encodes loads them again from the same files (with the same LoRAs merged), which come
//! from the OS page cache when the machine has the RAM: in effect the encoders wait in host
//! memory while the denoiser has the device. A job already encoding keeps its own handle, so a
//! release never pulls the encoders from under a concurrent job.

use super::model::{named, record, WeightRecord, WeightSource};
use crate::error::{Error, Result};
use crate::loaders::diffusers::DiffusersFolder;
use crate::loaders::lora::{Component, LoraPlan};
use crate::loaders::reuse::{with_layout_fallback, ReuseBuild, WeightCache};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::family::{EncoderKind, FamilySpec, TextStackSpec};
use crate::models::qwen3::tokenizer::QwenTokenizer;
use crate::models::qwen3::{Qwen3Config, Qwen3Encoder};
use crate::models::t5::tokenizer::T5Tokenizer;
use crate::models::t5::{T5Config, T5Encoder};
use candle_core::{DType, Device};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Where a pipeline's text encoders live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextPlacement {
    /// On the denoiser's device, in its dtype.
    #[default]
    Device,
    /// On the CPU in f32, whatever the denoiser's device: the device then holds the denoiser
    /// and the VAE only (FLUX.1-dev's bf16 T5-XXL is 8.9 GiB, which a 24 GB card cannot hold
    /// next to its 22.2 GiB transformer). Encoding runs at the CPU's speed; the embeddings are
    /// moved to the device in its dtype, as diffusers casts them.
    Cpu,
}

impl TextPlacement {
    /// The device and dtype the text encoders load on, for a denoiser on `device` in `dtype`.
    pub fn target(self, device: &Device, dtype: DType) -> (Device, DType) {
        match self {
            TextPlacement::Device => (device.clone(), dtype),
            TextPlacement::Cpu => (Device::Cpu, DType::F32),
        }
    }
}

impl std::str::FromStr for TextPlacement {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "device" => Ok(TextPlacement::Device),
            "cpu" => Ok(TextPlacement::Cpu),
            other => Err(Error::arg("text-encoders", format!("`{other}`: use `device` or `cpu`"))),
        }
    }
}

/// One text encoder with its tokenizer (boxed: the variants differ in size by a kilobyte).
pub enum TextStack {
    Clip { tokenizer: Box<ClipTokenizer>, encoder: Box<ClipTextModel> },
    T5 { tokenizer: Box<T5Tokenizer>, encoder: Box<T5Encoder> },
    Qwen3 { tokenizer: Box<QwenTokenizer>, encoder: Box<Qwen3Encoder> },
}

/// The family's text stacks in diffusers' order, resident or released, and what it takes to
/// load them again.
pub struct TextEncoders {
    resident: Mutex<Option<Arc<Vec<TextStack>>>>,
    folder: DiffusersFolder,
    spec: &'static FamilySpec,
    plan: Arc<LoraPlan>,
    /// The model's weight cache: a reload records the stacks there again, a release drops them
    /// from it (so the release frees their memory).
    cache: Arc<WeightCache>,
    device: Device,
    dtype: DType,
    /// The files (and hashes) first loaded: a reload from changed files is refused.
    records: Vec<WeightRecord>,
    loads: AtomicUsize,
}

impl TextEncoders {
    /// Loads the family's text stacks from `folder` through `sources` (the model build's),
    /// recording their weight files in `weights`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        folder: &DiffusersFolder,
        spec: &'static FamilySpec,
        plan: Arc<LoraPlan>,
        sources: &WeightSource,
        cache: Arc<WeightCache>,
        device: &Device,
        dtype: DType,
        weights: &mut Vec<WeightRecord>,
    ) -> Result<Self> {
        let mut records = Vec::new();
        let stacks = load_stacks(folder, spec, sources, device, dtype, &mut records)?;
        weights.extend(records.iter().cloned());
        Ok(Self {
            resident: Mutex::new(Some(Arc::new(stacks))),
            folder: folder.clone(),
            spec,
            plan,
            cache,
            device: device.clone(),
            dtype,
            records,
            loads: AtomicUsize::new(1),
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Vec<TextStack>>>> {
        // The slot is replaced whole, so a poisoned lock still holds a consistent value.
        self.resident.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The text stacks, loaded again first when they were released.
    pub fn get(&self) -> Result<Arc<Vec<TextStack>>> {
        let mut slot = self.slot();
        if let Some(stacks) = slot.as_ref() {
            return Ok(stacks.clone());
        }
        let mut records = Vec::new();
        // Recorded in the model's cache again, so a later LoRA switch can share them.
        let (stacks, _) = with_layout_fallback(|layout| {
            records.clear();
            let build = Arc::new(ReuseBuild::new(None, self.cache.clone(), Default::default(), layout)?);
            let memo: Arc<dyn kiln_kernels::reuse::DeriveMemo> = build.clone();
            let sources = WeightSource { plan: &self.plan, build: &build };
            let stacks = kiln_kernels::reuse::with_memo(memo, || {
                load_stacks(&self.folder, self.spec, &sources, &self.device, self.dtype, &mut records)
            })?;
            self.cache.finish();
            Ok((stacks, build))
        })?;
        if records != self.records {
            let changed: Vec<String> = records
                .iter()
                .filter(|r| !self.records.contains(r))
                .map(|r| format!("{}/{}", r.component, r.file))
                .collect();
            return Err(Error::Unsupported(format!(
                "the text encoder weights changed on disk since the model was loaded ({}); load the model again",
                changed.join(", ")
            )));
        }
        self.loads.fetch_add(1, Ordering::Relaxed);
        let stacks = Arc::new(stacks);
        *slot = Some(stacks.clone());
        Ok(stacks)
    }

    /// Drops the model's own reference to the text stacks (jobs encoding now keep theirs);
    /// returns whether they were resident.
    pub fn release(&self) -> bool {
        let released = self.slot().take().is_some();
        self.cache.forget(self.spec.text.iter().map(|s| s.encoder));
        released
    }

    /// The device the text stacks run on (the denoiser's, or the CPU: [`TextPlacement`]).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the text stacks are loaded now.
    pub fn is_resident(&self) -> bool {
        self.slot().is_some()
    }

    /// How many times the text stacks were loaded (1 until a release and a later job).
    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::Relaxed)
    }
}

fn load_stacks(
    folder: &DiffusersFolder,
    spec: &FamilySpec,
    sources: &WeightSource,
    device: &Device,
    dtype: DType,
    records: &mut Vec<WeightRecord>,
) -> Result<Vec<TextStack>> {
    spec.text
        .iter()
        .enumerate()
        .map(|(i, stack)| load_text_stack(folder, stack, text_component(i), sources, device, dtype, records))
        .collect()
}

/// The LoRA component of the family's `i`-th text encoder.
pub(crate) fn text_component(i: usize) -> Component {
    if i == 0 {
        Component::Text1
    } else {
        Component::Text2
    }
}

/// Loads one tokenizer + text encoder pair as the registry describes it.
fn load_text_stack(
    folder: &DiffusersFolder,
    stack: &TextStackSpec,
    component: Component,
    sources: &WeightSource,
    device: &Device,
    dtype: DType,
    weights: &mut Vec<WeightRecord>,
) -> Result<TextStack> {
    let prefer_fp16 = dtype != DType::F32;
    let files = folder.weight_files(stack.encoder, prefer_fp16)?;
    let tokenizer_dir = folder.component_dir(stack.tokenizer)?;
    // The tokenizer is read on a second thread while this one builds the encoder (the layer
    // memo is this thread's): with mapped weights, parsing a 50k-entry vocabulary is a third
    // of a model load.
    let loaded = match stack.kind {
        EncoderKind::Clip => {
            let (tokenizer, encoder) = alongside(
                || ClipTokenizer::from_dir(&tokenizer_dir),
                || {
                    let (_, cfg): (_, ClipTextConfig) = folder.parse_config(stack.encoder)?;
                    let with_projection =
                        folder.component_class(stack.encoder) == Some("CLIPTextModelWithProjection");
                    let vb = sources.var_builder(component, stack.encoder, &files, dtype, device)?;
                    ClipTextModel::new(&cfg, vb, with_projection).map_err(|e| named(e, &files))
                },
            )?;
            TextStack::Clip { tokenizer: Box::new(tokenizer), encoder: Box::new(encoder) }
        }
        EncoderKind::T5 => {
            let (tokenizer, encoder) = alongside(
                || T5Tokenizer::from_dir(&tokenizer_dir),
                || {
                    let (cfg_path, _) = folder.config(stack.encoder)?;
                    let cfg = T5Config::from_file(&cfg_path)?;
                    let vb = sources.var_builder(component, stack.encoder, &files, dtype, device)?;
                    T5Encoder::new(&cfg, &cfg_path, vb).map_err(|e| named(e, &files))
                },
            )?;
            TextStack::T5 { tokenizer: Box::new(tokenizer), encoder: Box::new(encoder) }
        }
        EncoderKind::Qwen3 => {
            let (tokenizer, encoder) = alongside(
                || QwenTokenizer::from_dir(&tokenizer_dir),
                || {
                    let (cfg_path, _) = folder.config(stack.encoder)?;
                    let cfg = Qwen3Config::from_file(&cfg_path)?;
                    let vb = sources.var_builder(component, stack.encoder, &files, dtype, device)?;
                    Qwen3Encoder::new(&cfg, vb).map_err(|e| named(e, &files))
                },
            )?;
            TextStack::Qwen3 { tokenizer: Box::new(tokenizer), encoder: Box::new(encoder) }
        }
    };
    record(weights, stack.encoder, &files)?;
    Ok(loaded)
}

/// `side()` on a scoped thread while `main()` runs on this one; the tokenizer's error first.
fn alongside<T: Send, U>(
    side: impl FnOnce() -> Result<T> + Send,
    main: impl FnOnce() -> Result<U>,
) -> Result<(T, U)> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(side);
        let main = main();
        let side = handle.join().map_err(|_| Error::Unsupported("the tokenizer thread panicked".into()))?;
        Ok((side?, main?))
    })
}
