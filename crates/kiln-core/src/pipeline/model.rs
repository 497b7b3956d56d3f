//! A diffusers pipeline loaded into memory: tokenizers, text encoders, the denoiser (UNet or
//! transformer), VAE and the scheduler config, as the family registry describes them. Built
//! once, reused across jobs (drafts, batches, a server's queue).

use crate::device;
use crate::error::{Error, Result};
use crate::loaders::diffusers::{weight_files_in, DiffusersFolder};
use crate::loaders::hub::ModelSource;
use crate::loaders::lora::{self, Component, LoraFile, LoraPlan, LoraRecord, LoraRequest, PlanInput};
use crate::loaders::reuse::{with_layout_fallback, ReuseBuild, ReuseCounts, WeightCache};
use crate::loaders::single_file::SingleFileFlux;
use crate::loaders::weights::{loading_error, open_safetensors, weight_sha256_cached};
use crate::models::denoiser::Denoiser;
use crate::models::family::{DenoiserKind, Family, FamilySpec, FlowSigmas, GuidanceStyle, SingleFileLayout};
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::models::zimage::{ZImageConfig, ZImageTransformer};
use crate::schedule::{self, FlowInputs, Scheduler, SchedulerConfig, SchedulerKind};
use candle_core::{DType, Device};
use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::pipeline::text_encoders::text_component;
pub use crate::pipeline::text_encoders::{TextEncoders, TextPlacement, TextStack};

/// A weight file the model was built from, for metadata and drift checks.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WeightRecord {
    pub component: String,
    pub file: String,
    pub sha256: String,
}

/// What a pipeline is built from besides its folder's own components.
#[derive(Debug, Clone, Default)]
pub struct ModelParts {
    /// A VAE loaded instead of the pipeline's own.
    pub vae: Option<ModelSource>,
    /// A single-file checkpoint of the denoiser (BFL's or ComfyUI's FLUX.1 transformer) loaded
    /// instead of the folder's, with the folder's config ([`FamilySpec::single_file`]).
    pub denoiser_file: Option<PathBuf>,
    /// LoRAs merged into the weights as they load.
    pub loras: Vec<LoraRequest>,
    /// Where the text encoders live.
    pub text: TextPlacement,
}

/// A loaded pipeline of any registered family.
pub struct LoadedModel {
    /// The folder (or hub snapshot) the pipeline comes from; with [`LoadedModel::denoiser_file`]
    /// the base folder of everything but the denoiser.
    pub source: ModelSource,
    /// The single-file denoiser checkpoint the model was built with, if any.
    pub denoiser_file: Option<PathBuf>,
    /// A VAE loaded instead of the pipeline's own (e.g. madebyollin/sdxl-vae-fp16-fix).
    pub vae_source: Option<ModelSource>,
    /// The family's registry entry.
    pub spec: &'static FamilySpec,
    /// The family's text stacks, in diffusers' order; released after encoding and loaded
    /// again on demand when a job asks ([`TextEncoders`]).
    pub text: TextEncoders,
    pub denoiser: Box<dyn Denoiser>,
    pub vae: AutoencoderKl,
    /// The VAE's weight files, reloaded in an overflow-safe dtype when an f16 decode overflows.
    pub vae_files: Vec<PathBuf>,
    /// That overflow-safe copy of the VAE, built on first need.
    vae_upcast: OnceLock<AutoencoderKl>,
    pub scheduler_class: String,
    pub scheduler_config: SchedulerConfig,
    /// The scheduler config as written in the folder (recorded for replay).
    pub scheduler_config_json: serde_json::Value,
    /// SDXL: an absent negative prompt means zero embeddings (model_index.json option).
    pub force_zeros_for_empty_prompt: bool,
    pub weights: Vec<WeightRecord>,
    /// The LoRAs merged into the weights, in the order asked (empty for the plain model).
    pub loras: Vec<LoraRecord>,
    /// What the load warns about: LoRA layers that matched nothing in this model (one line per
    /// LoRA file), pre-laid-out weights that could not be written (disk full, cache bound).
    pub load_warnings: Vec<String>,
    /// The tensors and derived layers the model was built from, so that the same model with
    /// another LoRA set can be built from it ([`LoadedModel::with_loras`]).
    weight_cache: Arc<WeightCache>,
    /// How many tensors this build shared with a warm model and how many it read from files.
    pub reuse: ReuseCounts,
    pub device: Device,
    pub dtype: DType,
    /// Where the text encoders live ([`TextEncoders::device`] says which device that is).
    pub text_placement: TextPlacement,
}

impl LoadedModel {
    /// Loads every component from the source folder onto `device` in `dtype`.
    pub fn load(source: ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with_vae(source, None, device, dtype)
    }

    /// [`LoadedModel::load`] with the VAE taken from `vae_source` instead: a VAE folder
    /// (config.json + weights, as madebyollin/sdxl-vae-fp16-fix ships) or a pipeline folder's `vae/`.
    pub fn load_with_vae(
        source: ModelSource,
        vae_source: Option<ModelSource>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_with_loras(source, vae_source, &[], device, dtype)
    }

    /// [`LoadedModel::load_with_vae`] with `loras` merged into the text encoders' and the
    /// denoiser's weights as they load (before any of kiln's own weight transforms). Every LoRA
    /// is read and matched against the model before anything is built: one that does not fit is
    /// an error naming its layers; layers that match nothing are listed in `load_warnings`.
    pub fn load_with_loras(
        source: ModelSource,
        vae_source: Option<ModelSource>,
        loras: &[LoraRequest],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let parts = ModelParts { vae: vae_source, loras: loras.to_vec(), ..Default::default() };
        Self::load_parts(source, parts, device, dtype)
    }

    /// Loads the pipeline in `source` with `parts` replacing or adding to its own components.
    pub fn load_parts(source: ModelSource, parts: ModelParts, device: &Device, dtype: DType) -> Result<Self> {
        Self::build(source, parts, device, dtype, None)
    }

    /// This model with another LoRA set (none for the plain model), built from this one: the
    /// weights and layers neither set touches are shared with it (no copy, no re-derivation),
    /// the touched ones are read again from the memory-mapped files with the new set merged.
    /// The result computes exactly what a fresh load with `loras` gives.
    pub fn with_loras(&self, loras: &[LoraRequest]) -> Result<Self> {
        let parts = || ModelParts {
            vae: self.vae_source.clone(),
            denoiser_file: self.denoiser_file.clone(),
            loras: loras.to_vec(),
            text: self.text_placement,
        };
        let warm = Some(self.weight_cache.clone());
        let model = Self::build(self.source.clone(), parts(), &self.device, self.dtype, warm)?;
        if model.weights != self.weights {
            // A weight file changed on disk since this model was loaded: its tensors are no
            // longer the files' tensors, so nothing of it may be mixed in.
            return Self::load_parts(self.source.clone(), parts(), &self.device, self.dtype);
        }
        Ok(model)
    }

    /// CPU f32 components use and fill the layout cache (see `loaders::layout_cache`); a build
    /// whose layout files do not fit the model is redone without it.
    fn build(
        source: ModelSource,
        parts: ModelParts,
        device: &Device,
        dtype: DType,
        warm: Option<Arc<WeightCache>>,
    ) -> Result<Self> {
        crate::device::check_dtype(device, dtype)?;
        let ModelParts { vae: vae_source, denoiser_file, loras, text: text_placement } = parts;
        let loras = loras.as_slice();
        let folder = DiffusersFolder::open(source.dir())?;
        let spec = folder.family().spec();
        let prefer_fp16 = dtype != DType::F32;
        if let Some(file) = &denoiser_file {
            if spec.single_file.is_none() {
                return Err(Error::arg(
                    "model",
                    format!(
                        "{}: single-file checkpoints load for FLUX.1 only; the base folder {} is a {} pipeline",
                        file.display(),
                        source.dir().display(),
                        spec.name
                    ),
                ));
            }
        }
        let (plan, lora_records) = plan_loras(&folder, spec, denoiser_file.as_deref(), loras, prefer_fp16)?;
        let load_warnings = plan
            .unmatched
            .iter()
            .map(|(path, keys)| {
                format!(
                    "LoRA {}: {} tensors match nothing in this model and were not merged: {}{}",
                    path.display(),
                    keys.len(),
                    keys.iter().take(6).cloned().collect::<Vec<_>>().join(", "),
                    if keys.len() > 6 { ", …" } else { "" }
                )
            })
            .collect();

        // The tensors the new set patches, by component folder, so a rebuild knows what changed.
        let mut patched = HashSet::new();
        let components = spec.text.iter().enumerate().map(|(i, s)| (text_component(i), s.encoder));
        for (component, folder_name) in components.chain([(Component::Denoiser, spec.denoiser)]) {
            for name in plan.patched_names(component) {
                patched.insert((folder_name.to_string(), name.clone()));
            }
        }
        let parts =
            BuildParts { folder, source, denoiser_file, vae_source, plan: Arc::new(plan), text_placement };
        let ((mut model, weight_cache), build) = with_layout_fallback(|layout| {
            let weight_cache = Arc::new(WeightCache::default());
            let build =
                Arc::new(ReuseBuild::new(warm.clone(), weight_cache.clone(), patched.clone(), layout)?);
            let memo: Arc<dyn kiln_kernels::reuse::DeriveMemo> = build.clone();
            let model = kiln_kernels::reuse::with_memo(memo, || {
                Self::build_parts(parts.clone(), &build, &weight_cache, device, dtype)
            })?;
            weight_cache.finish();
            Ok(((model, weight_cache), build))
        })?;
        model.loras = lora_records;
        model.load_warnings = load_warnings;
        model.load_warnings.extend(build.write_layouts());
        model.weight_cache = weight_cache;
        model.reuse = build.counts();
        Ok(model)
    }

    /// Builds every component through `build` (see [`LoadedModel::build`]).
    fn build_parts(
        parts: BuildParts,
        build: &Arc<ReuseBuild>,
        cache: &Arc<WeightCache>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let BuildParts { folder, source, denoiser_file, vae_source, plan, text_placement } = parts;
        let spec = folder.family().spec();
        let prefer_fp16 = dtype != DType::F32;
        let mut weights = Vec::new();
        let sources = WeightSource { plan: &plan, build };
        let (text_device, text_dtype) = text_placement.target(device, dtype);
        let text = TextEncoders::load(
            &folder,
            spec,
            plan.clone(),
            &sources,
            cache.clone(),
            &text_device,
            text_dtype,
            &mut weights,
        )?;
        let denoiser =
            load_denoiser(&folder, spec, denoiser_file.as_deref(), &sources, device, dtype, &mut weights)?;

        let (vae_cfg, files) = match &vae_source {
            None => {
                let (_, cfg): (_, VaeConfig) = folder.parse_config("vae")?;
                (cfg, folder.weight_files("vae", prefer_fp16)?)
            }
            Some(src) => {
                let dir = vae_dir(src.dir())?;
                let cfg = VaeConfig::from_file(dir.join("config.json"))?;
                (cfg, weight_files_in(&dir, prefer_fp16)?)
            }
        };
        let vb = build.var_builder("vae", &files, None, dtype, device)?;
        let vae = AutoencoderKl::new(&vae_cfg, vb).map_err(|e| named(e, &files))?;
        record(&mut weights, "vae", &files)?;

        let (sched_path, scheduler_config_json) = folder.config("scheduler")?;
        let scheduler_config: SchedulerConfig = serde_json::from_value(scheduler_config_json.clone())
            .map_err(|e| Error::config(&sched_path, e.to_string()))?;
        let scheduler_class = folder.component_class("scheduler").unwrap_or_default().to_string();

        Ok(Self {
            source,
            denoiser_file,
            vae_source,
            spec,
            text,
            denoiser,
            vae,
            vae_files: files,
            vae_upcast: OnceLock::new(),
            scheduler_class,
            scheduler_config,
            scheduler_config_json,
            force_zeros_for_empty_prompt: folder.index_flag("force_zeros_for_empty_prompt").unwrap_or(true),
            weights,
            loras: Vec::new(),
            load_warnings: Vec::new(),
            weight_cache: Arc::default(),
            reuse: ReuseCounts::default(),
            device: device.clone(),
            dtype,
            text_placement,
        })
    }

    /// The scheduler the folder ships with (diffusers' default for this model).
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        SchedulerKind::from_class(&self.scheduler_class, &self.scheduler_config)
    }

    /// The family the model belongs to.
    pub fn family(&self) -> Family {
        self.spec.family
    }

    /// The UNet, when the model's denoiser is one (tests and benchmarks inspect its config).
    pub fn unet(&self) -> Option<&UNet2DConditionModel> {
        self.denoiser.as_any().downcast_ref::<UNet2DConditionModel>()
    }

    /// diffusers' default output size: the denoiser's sample size times the VAE factor.
    /// Returns (width, height); the family's default when the config has no usable sample_size.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae.scale_factor();
        match self.denoiser.default_latent_size() {
            Some((h, w)) => (w * f, h * f),
            None => (self.spec.default_size, self.spec.default_size),
        }
    }

    /// The guidance used when neither the request nor a tier sets one: the family's, or 0 for a
    /// guidance-distilled family's model without a guidance embedding (FLUX.1-schnell).
    pub fn default_guidance(&self) -> f64 {
        if self.spec.guidance == GuidanceStyle::Distilled && !self.denoiser.embeds_guidance() {
            0.0
        } else {
            self.spec.default_guidance
        }
    }

    /// What the request's guidance, true CFG and negative prompt will be ignored for, as warnings.
    pub fn guidance_warnings(
        &self,
        guidance: f64,
        true_cfg: Option<f64>,
        negative: Option<&str>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        if self.spec.guidance != GuidanceStyle::Distilled {
            return out;
        }
        if !self.denoiser.embeds_guidance() && guidance != 0.0 {
            out.push(format!(
                "guidance {guidance} is ignored: this {} model has no guidance embedding (schnell-style)",
                self.spec.name
            ));
        }
        let true_cfg_on = true_cfg.is_some_and(|s| s > 1.0);
        if negative.is_some_and(|n| !n.is_empty()) && !true_cfg_on {
            out.push(format!(
                "the negative prompt is ignored: {} models are guidance-distilled; true CFG (--true-cfg S \
                 with S > 1) runs a negative pass",
                self.spec.name
            ));
        }
        if true_cfg_on && negative.is_none() {
            out.push("--true-cfg is ignored without a negative prompt (--negative), as in diffusers".into());
        }
        out
    }

    /// Refuses true CFG where the family has no use for it: classifier-free families guide
    /// with `--guidance` already.
    pub fn check_true_cfg(&self, true_cfg: Option<f64>) -> Result<()> {
        let Some(s) = true_cfg else { return Ok(()) };
        if !s.is_finite() || s < 0.0 {
            return Err(Error::arg("true-cfg", format!("{s} must be a finite number >= 0")));
        }
        if self.spec.guidance != GuidanceStyle::Distilled {
            return Err(Error::arg(
                "true-cfg",
                format!(
                    "{} models guide with --guidance (classifier-free already); --true-cfg is for \
                     guidance-distilled models (FLUX)",
                    self.spec.name
                ),
            ));
        }
        Ok(())
    }

    /// The scale of FLUX's true CFG when it runs: as FluxPipeline, with `true_cfg` > 1 and a
    /// negative prompt (an empty one counts).
    pub fn true_cfg_scale(&self, true_cfg: Option<f64>, negative: Option<&str>) -> Option<f64> {
        let on = self.spec.guidance == GuidanceStyle::Distilled && negative.is_some();
        true_cfg.filter(|&s| on && s > 1.0)
    }

    /// Whether `guidance` turns classifier-free guidance (a negative pass) on: for
    /// [`GuidanceStyle::ClassifierFree`] families when g > 1 (Z-Image's
    /// [`GuidanceStyle::ClassifierFreeFromZero`]: g > 0), unless the denoiser embeds the
    /// guidance itself (LCM-distilled UNets), as diffusers decides.
    pub fn classifier_free(&self, guidance: f64) -> bool {
        self.spec.cfg_requested(guidance) && !self.denoiser.embeds_guidance()
    }

    /// The scheduler `kind` for `steps` steps on `latent_h`×`latent_w` latents (flow-matching
    /// schedules shift by the image's token count).
    pub fn build_scheduler(
        &self,
        kind: SchedulerKind,
        steps: usize,
        latent_h: usize,
        latent_w: usize,
    ) -> Result<Box<dyn Scheduler>> {
        if kind.is_flow() != self.spec.flow_matching {
            let fits = SchedulerKind::ALL
                .iter()
                .filter(|k| k.is_flow() == self.spec.flow_matching)
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::arg(
                "scheduler",
                format!("`{kind}` does not apply to {} models; use one of: {fits}", self.spec.name),
            ));
        }
        let patch = self.denoiser.patch_size();
        let flow = FlowInputs {
            image_seq_len: Some((latent_h / patch) * (latent_w / patch)),
            sigmas: match self.spec.flow_sigmas {
                FlowSigmas::Scheduler => None,
                FlowSigmas::LinspaceToInverseSteps => Some(FlowInputs::linspace_to_inverse_steps(steps)),
            },
        };
        schedule::build_with(kind, &self.scheduler_config, steps, &flow)
    }

    /// Image sides must be multiples of this: the VAE factor times the denoiser's patch size.
    pub fn size_multiple(&self) -> usize {
        self.vae.scale_factor() * self.denoiser.patch_size()
    }

    /// The VAE in [`device::overflow_safe_dtype`] (bf16 on CUDA, f32 elsewhere), loaded from the
    /// same files on first use: the fallback when the model's own (f16) VAE overflows.
    pub fn vae_upcast(&self) -> Result<&AutoencoderKl> {
        if let Some(vae) = self.vae_upcast.get() {
            return Ok(vae);
        }
        let dtype = device::overflow_safe_dtype(&self.device);
        let vb = open_safetensors(&self.vae_files, dtype, &self.device)?;
        let vae = AutoencoderKl::new(self.vae.config(), vb).map_err(|e| named(e, &self.vae_files))?;
        Ok(self.vae_upcast.get_or_init(|| vae))
    }

    /// The denoiser weights' sha256 (the first file's, for sharded weights); A1111's "Model
    /// hash" is its first 10 hex digits.
    pub fn denoiser_sha256(&self) -> &str {
        let component = self.spec.denoiser;
        self.weights.iter().find(|w| w.component == component).map(|w| w.sha256.as_str()).unwrap_or("")
    }
}

/// Reads the requested LoRAs and matches them against the folder's text encoders and denoiser.
fn plan_loras(
    folder: &DiffusersFolder,
    spec: &FamilySpec,
    single_file: Option<&std::path::Path>,
    loras: &[LoraRequest],
    prefer_fp16: bool,
) -> Result<(LoraPlan, Vec<LoraRecord>)> {
    if loras.is_empty() {
        return Ok((LoraPlan::default(), Vec::new()));
    }
    let mut files = Vec::new();
    let mut records = Vec::new();
    for req in loras {
        // A path's stem (A1111 names LoRAs so); a library name as it was asked for.
        let name = if lora::library::is_path(&req.name) {
            req.path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            req.name.clone()
        };
        let weight = lora::check_weight(&name, req.weight)?;
        // Errors name a library LoRA by its name, not by its file in the store.
        let by_name = |e: Error| match e {
            Error::Lora { msg, .. } if !lora::library::is_path(&req.name) => {
                Error::Lora { lora: format!("`{}`", req.name), msg }
            }
            other => other,
        };
        files.push((std::sync::Arc::new(LoraFile::open(&req.path).map_err(by_name)?), weight));
        let sha256 = weight_sha256_cached(&req.path)?;
        // A library copy is found again by its hash; only files from elsewhere need the path.
        let in_library = req.path.file_stem().is_some_and(|s| s.to_string_lossy() == sha256);
        let path = (!in_library).then(|| std::path::absolute(&req.path).unwrap_or(req.path.clone()));
        records.push(LoraRecord { name, sha256, weight, path: path.map(|p| p.display().to_string()) });
    }
    let mut inputs = Vec::new();
    for (i, stack) in spec.text.iter().enumerate() {
        let files = folder.weight_files(stack.encoder, prefer_fp16)?;
        inputs.push(PlanInput::from_files(text_component(i), &files, true)?);
    }
    inputs.push(match single_file.zip(spec.single_file) {
        // A single-file transformer answers to diffusers' names, as it will when it is read.
        Some((file, layout)) => PlanInput {
            component: Component::Denoiser,
            shapes: open_single_file(folder, spec, file, layout)?.0.shapes()?,
            text_encoder: false,
        },
        None => {
            let files = folder.weight_files(spec.denoiser, prefer_fp16)?;
            PlanInput::from_files(Component::Denoiser, &files, false)?
        }
    });
    let plan = lora::plan(&files, &inputs).map_err(|e| match e {
        // `plan` names the file; name a library LoRA by its name.
        Error::Lora { lora: file, msg } => {
            let req = loras.iter().find(|r| r.path.display().to_string() == file);
            match req.filter(|r| !lora::library::is_path(&r.name)) {
                Some(r) => Error::Lora { lora: format!("`{}`", r.name), msg },
                None => Error::Lora { lora: file, msg },
            }
        }
        other => other,
    })?;
    Ok((plan, records))
}

/// What a build assembles besides its weight sources.
#[derive(Clone)]
struct BuildParts {
    folder: DiffusersFolder,
    source: ModelSource,
    denoiser_file: Option<PathBuf>,
    vae_source: Option<ModelSource>,
    plan: Arc<LoraPlan>,
    text_placement: TextPlacement,
}

/// Where a build's components get their weights: the LoRA plan's patches merged, the warm
/// model's unchanged tensors reused.
pub(crate) struct WeightSource<'a> {
    pub plan: &'a LoraPlan,
    pub build: &'a Arc<ReuseBuild>,
}

impl WeightSource<'_> {
    pub fn var_builder(
        &self,
        component: Component,
        folder_name: &str,
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<candle_nn::VarBuilder<'static>> {
        self.build.var_builder(folder_name, files, self.plan.patches(component), dtype, device)
    }
}

/// Loads the family's denoiser from its component folder, or from `single_file` with the
/// component folder's config.
fn load_denoiser(
    folder: &DiffusersFolder,
    spec: &FamilySpec,
    single_file: Option<&std::path::Path>,
    sources: &WeightSource,
    device: &Device,
    dtype: DType,
    weights: &mut Vec<WeightRecord>,
) -> Result<Box<dyn Denoiser>> {
    if let (Some(file), Some(layout)) = (single_file, spec.single_file) {
        let files = [file.to_path_buf()];
        let (checkpoint, cfg) = open_single_file(folder, spec, file, layout)?;
        let vb = checkpoint.var_builder(sources.plan.patches(Component::Denoiser), dtype, device);
        let denoiser: Box<dyn Denoiser> =
            Box::new(FluxTransformer::new(&cfg, vb).map_err(|e| named(e, &files))?);
        // Recorded under the denoiser's component with the file's own name and sha256.
        record(weights, spec.denoiser, &files)?;
        return Ok(denoiser);
    }
    let prefer_fp16 = dtype != DType::F32;
    let files = folder.weight_files(spec.denoiser, prefer_fp16)?;
    let vb = sources.var_builder(Component::Denoiser, spec.denoiser, &files, dtype, device)?;
    let denoiser: Box<dyn Denoiser> = match spec.denoiser_kind {
        DenoiserKind::UNet => {
            let (_, cfg): (_, UNetConfig) = folder.parse_config(spec.denoiser)?;
            Box::new(UNet2DConditionModel::new(&cfg, vb).map_err(|e| named(e, &files))?)
        }
        DenoiserKind::FluxTransformer => {
            let (cfg_path, cfg): (_, FluxConfig) = folder.parse_config(spec.denoiser)?;
            cfg.validate(&cfg_path)?;
            Box::new(FluxTransformer::new(&cfg, vb).map_err(|e| named(e, &files))?)
        }
        DenoiserKind::ZImageTransformer => {
            let (cfg_path, cfg): (_, ZImageConfig) = folder.parse_config(spec.denoiser)?;
            cfg.validate(&cfg_path)?;
            Box::new(ZImageTransformer::new(&cfg, vb).map_err(|e| named(e, &files))?)
        }
    };
    record(weights, spec.denoiser, &files)?;
    Ok(denoiser)
}

/// A single-file transformer checkpoint, checked against the component folder's config.
fn open_single_file(
    folder: &DiffusersFolder,
    spec: &FamilySpec,
    file: &std::path::Path,
    layout: SingleFileLayout,
) -> Result<(SingleFileFlux, FluxConfig)> {
    match layout {
        SingleFileLayout::BflFlux => {
            let (cfg_path, cfg): (_, FluxConfig) = folder.parse_config(spec.denoiser)?;
            cfg.validate(&cfg_path)?;
            Ok((SingleFileFlux::open(file, &cfg, &cfg_path)?, cfg))
        }
    }
}

/// The folder holding a VAE's config.json: the folder itself, or a pipeline folder's `vae/`.
fn vae_dir(dir: &std::path::Path) -> Result<PathBuf> {
    if dir.join("model_index.json").is_file() {
        return DiffusersFolder::open(dir)?.component_dir("vae");
    }
    if !dir.join("config.json").is_file() {
        return Err(Error::not_found(
            "VAE config.json",
            dir.join("config.json"),
            "--vae takes a VAE folder (config.json + safetensors) or a diffusers pipeline folder",
        ));
    }
    Ok(dir.to_path_buf())
}

pub(crate) fn named(err: Error, files: &[PathBuf]) -> Error {
    match err {
        Error::Candle(e) => loading_error(e, files),
        other => other,
    }
}

pub(crate) fn record(out: &mut Vec<WeightRecord>, component: &str, files: &[PathBuf]) -> Result<()> {
    for file in files {
        out.push(WeightRecord {
            component: component.to_string(),
            file: file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            sha256: weight_sha256_cached(file)?,
        });
    }
    Ok(())
}
