//! A diffusers pipeline loaded into memory: tokenizers, text encoders, UNet, VAE and the
//! scheduler config. Built once, reused across jobs (drafts, batches, a server's queue).

use crate::device;
use crate::error::{Error, Result};
use crate::loaders::diffusers::{weight_files_in, DiffusersFolder, Family};
use crate::loaders::hub::ModelSource;
use crate::loaders::weights::{loading_error, open_safetensors, weight_sha256_cached};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::schedule::{SchedulerConfig, SchedulerKind};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One text encoder with its tokenizer.
pub struct TextStack {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModel,
}

/// A weight file the model was built from, for metadata and drift checks.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WeightRecord {
    pub component: String,
    pub file: String,
    pub sha256: String,
}

/// A loaded Stable Diffusion-family pipeline.
pub struct LoadedModel {
    pub source: ModelSource,
    /// A VAE loaded instead of the pipeline's own (e.g. madebyollin/sdxl-vae-fp16-fix).
    pub vae_source: Option<ModelSource>,
    pub family: Family,
    /// One stack for SD 1.x/2.x, two for SDXL (in diffusers' order).
    pub text: Vec<TextStack>,
    pub unet: UNet2DConditionModel,
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
    pub device: Device,
    pub dtype: DType,
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
        crate::device::check_dtype(device, dtype)?;
        let folder = DiffusersFolder::open(source.dir())?;
        let family = folder.family();
        let prefer_fp16 = dtype != DType::F32;
        let mut weights = Vec::new();

        let mut text = Vec::new();
        let stacks: &[(&str, &str)] = match family {
            Family::StableDiffusion => &[("tokenizer", "text_encoder")],
            Family::StableDiffusionXl => &[("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
        };
        for (tok_name, enc_name) in stacks {
            let tokenizer = ClipTokenizer::from_dir(&folder.component_dir(tok_name)?)?;
            let (_, cfg): (_, ClipTextConfig) = folder.parse_config(enc_name)?;
            let with_projection = folder.component_class(enc_name) == Some("CLIPTextModelWithProjection");
            let files = folder.weight_files(enc_name, prefer_fp16)?;
            let vb = open_safetensors(&files, dtype, device)?;
            let encoder = ClipTextModel::new(&cfg, vb, with_projection).map_err(|e| named(e, &files))?;
            record(&mut weights, enc_name, &files)?;
            text.push(TextStack { tokenizer, encoder });
        }

        let (_, unet_cfg): (_, UNetConfig) = folder.parse_config("unet")?;
        let files = folder.weight_files("unet", prefer_fp16)?;
        let vb = open_safetensors(&files, dtype, device)?;
        let unet = UNet2DConditionModel::new(&unet_cfg, vb).map_err(|e| named(e, &files))?;
        record(&mut weights, "unet", &files)?;

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
        let vb = open_safetensors(&files, dtype, device)?;
        let vae = AutoencoderKl::new(&vae_cfg, vb).map_err(|e| named(e, &files))?;
        record(&mut weights, "vae", &files)?;

        let (sched_path, scheduler_config_json) = folder.config("scheduler")?;
        let scheduler_config: SchedulerConfig = serde_json::from_value(scheduler_config_json.clone())
            .map_err(|e| Error::config(&sched_path, e.to_string()))?;
        let scheduler_class = folder.component_class("scheduler").unwrap_or_default().to_string();

        Ok(Self {
            source,
            vae_source,
            family,
            text,
            unet,
            vae,
            vae_files: files,
            vae_upcast: OnceLock::new(),
            scheduler_class,
            scheduler_config,
            scheduler_config_json,
            force_zeros_for_empty_prompt: folder.index_flag("force_zeros_for_empty_prompt").unwrap_or(true),
            weights,
            device: device.clone(),
            dtype,
        })
    }

    /// The scheduler the folder ships with (diffusers' default for this model).
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        SchedulerKind::from_class(&self.scheduler_class, &self.scheduler_config)
    }

    /// diffusers' default output size: the UNet's sample size times the VAE factor.
    /// Returns (width, height); 512² when the config has no usable sample_size.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae.scale_factor();
        let as_usize = |v: &serde_json::Value| v.as_u64().map(|n| n as usize);
        match &self.unet.config().sample_size {
            Some(serde_json::Value::Array(hw)) if hw.len() == 2 => match (as_usize(&hw[0]), as_usize(&hw[1]))
            {
                (Some(h), Some(w)) => (w * f, h * f),
                _ => (512, 512),
            },
            Some(v) => as_usize(v).map(|n| (n * f, n * f)).unwrap_or((512, 512)),
            None => (512, 512),
        }
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

    /// The UNet weights' sha256, A1111's "Model hash" is its first 10 hex digits.
    pub fn unet_sha256(&self) -> &str {
        self.weights.iter().find(|w| w.component == "unet").map(|w| w.sha256.as_str()).unwrap_or("")
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

fn named(err: Error, files: &[PathBuf]) -> Error {
    match err {
        Error::Candle(e) => loading_error(e, files),
        other => other,
    }
}

fn record(out: &mut Vec<WeightRecord>, component: &str, files: &[PathBuf]) -> Result<()> {
    for file in files {
        out.push(WeightRecord {
            component: component.to_string(),
            file: file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            sha256: weight_sha256_cached(file)?,
        });
    }
    Ok(())
}
