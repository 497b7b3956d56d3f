//! Loading a tier's model and turning its defaults into a [`GenerateRequest`].

use super::{Tier, TierKind};
use crate::device;
use crate::error::{Error, Result};
use crate::loaders::diffusers::Family;
use crate::loaders::hub::{self, ModelSource};
use crate::pipeline::generate::GenerateRequest;
use crate::pipeline::model::LoadedModel;
use crate::schedule::SchedulerKind;
use candle_core::{DType, Device};

/// The dtype a tier runs in: an explicit override, else the tier's (`auto` = the device's default).
pub fn tier_dtype(tier: &Tier, device: &Device, explicit: Option<DType>) -> Result<DType> {
    if let Some(d) = explicit {
        return Ok(d);
    }
    match tier.dtype.as_deref() {
        None | Some("auto") => Ok(device::default_dtype(device)),
        Some(d) => device::parse_dtype(d),
    }
}

/// Refuses tiers that are not diffusion pipelines (an upscale tier given to draft/promote).
pub fn require_diffusion(tier: &Tier) -> Result<()> {
    if tier.kind != TierKind::Diffusion {
        return Err(Error::arg(
            "--tier",
            format!(
                "tier `{}` is an upscale tier; it runs through `kiln upscale`, not a diffusion job",
                tier.name
            ),
        ));
    }
    Ok(())
}

/// Finds the tier's model (and VAE) folder: local folder, hub cache, or download.
pub fn resolve_tier(tier: &Tier, dtype: DType, progress: bool) -> Result<(ModelSource, Option<ModelSource>)> {
    require_diffusion(tier)?;
    let fp16 = dtype != DType::F32;
    let in_tier = |e: Error, what: &str, spec: &str| {
        Error::config(&tier.defined_in, format!("tier `{}` {what} `{spec}`: {e}", tier.name))
    };
    let model = hub::resolve(&tier.model, tier.revision.as_deref(), fp16, progress)
        .map_err(|e| in_tier(e, "model", &tier.model))?;
    let vae = match &tier.vae {
        Some(spec) => Some(
            hub::resolve_vae(spec, tier.vae_revision.as_deref(), fp16, progress)
                .map_err(|e| in_tier(e, "vae", spec))?,
        ),
        None => None,
    };
    Ok((model, vae))
}

/// Loads the tier's pipeline and checks the tier's own weight pins (kiln.lock drift is checked
/// by [`super::drift`]).
pub fn load_tier_model(tier: &Tier, device: &Device, dtype: DType, progress: bool) -> Result<LoadedModel> {
    let (source, vae) = resolve_tier(tier, dtype, progress)?;
    let model = LoadedModel::load_with_vae(source, vae, device, dtype)?;
    let mismatches = tier.weight_mismatches(&model.weights);
    if !mismatches.is_empty() {
        return Err(Error::config(
            &tier.defined_in,
            format!(
                "tier `{}`: weights differ from the tier's pins:\n  {}\nfix the files or update the pins",
                tier.name,
                mismatches.join("\n  ")
            ),
        ));
    }
    Ok(model)
}

/// Per-job values that override the tier's defaults (CLI flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    pub negative_prompt: Option<String>,
    pub max_batch: Option<usize>,
}

/// A txt2img request for `seeds` from the tier's defaults, overridden by `o`; what neither sets
/// takes the model's own defaults (native size, 30 steps, diffusers' guidance per family).
pub fn tier_request(
    tier: &Tier,
    model: &LoadedModel,
    prompt: &str,
    seeds: Vec<u64>,
    o: &Overrides,
) -> Result<GenerateRequest> {
    let (default_w, default_h) = model.default_size();
    let scheduler = match (&o.scheduler, &tier.scheduler) {
        (Some(k), _) => Some(*k),
        (None, Some(s)) => Some(s.parse::<SchedulerKind>()?),
        (None, None) => None,
    };
    let guidance = o.guidance.or(tier.guidance).unwrap_or(match model.family {
        Family::StableDiffusionXl => 5.0,
        Family::StableDiffusion => 7.5,
    });
    let n = seeds.len();
    Ok(GenerateRequest {
        prompt: prompt.to_string(),
        negative_prompt: o.negative_prompt.clone().or_else(|| tier.negative_prompt.clone()),
        width: o.width.or(tier.width).unwrap_or(default_w),
        height: o.height.or(tier.height).unwrap_or(default_h),
        steps: o.steps.or(tier.steps).unwrap_or(30),
        guidance,
        scheduler,
        seeds,
        init_latents: None,
        init_image: None,
        strength: 1.0,
        max_batch: o.max_batch.unwrap_or(n.min(8)).max(1),
    })
}
