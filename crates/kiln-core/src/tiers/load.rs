//! Loading a tier's model and turning its defaults into a [`GenerateRequest`].

use super::{Tier, TierKind};
use crate::device;
use crate::error::{Error, Result};
use crate::loaders::hub::{self, ModelSource};
use crate::loaders::store::{SrWeights, Store};
use crate::pipeline::generate::GenerateRequest;
use crate::pipeline::model::{LoadedModel, ModelParts, TextPlacement, WeightRecord};
use crate::pipeline::upscale::Upscaler;
use crate::pipeline::vae_tiling::VaeTiling;
use crate::schedule::SchedulerKind;
use candle_core::{DType, Device};
use std::path::Path;

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

/// Loads the tier's pipeline, with the tier's own LoRAs merged, and checks the tier's own
/// weight pins (kiln.lock drift is checked by [`super::drift`]).
pub fn load_tier_model(tier: &Tier, device: &Device, dtype: DType, progress: bool) -> Result<LoadedModel> {
    load_tier_model_with(tier, &tier_loras(tier, &[])?, device, dtype, TextPlacement::Device, progress)
}

/// The LoRAs a job on `tier` merges: the tier's own (its `loras`, resolved), then `job_loras`.
pub fn tier_loras(
    tier: &Tier,
    job_loras: &[crate::loaders::lora::LoraRequest],
) -> Result<Vec<crate::loaders::lora::LoraRequest>> {
    let own = crate::loaders::lora::resolve_all(&tier.loras)
        .map_err(|e| Error::config(&tier.defined_in, format!("tier `{}` loras: {e}", tier.name)))?;
    Ok(own.into_iter().chain(job_loras.iter().cloned()).collect())
}

/// The tier's pipeline with exactly `loras` merged into the weights as they load (the tier's
/// own included: see [`tier_loras`]).
pub fn load_tier_model_with(
    tier: &Tier,
    loras: &[crate::loaders::lora::LoraRequest],
    device: &Device,
    dtype: DType,
    text: TextPlacement,
    progress: bool,
) -> Result<LoadedModel> {
    let (source, vae) = resolve_tier(tier, dtype, progress)?;
    let parts = ModelParts { vae, loras: loras.to_vec(), text, ..Default::default() };
    let model = LoadedModel::load_parts(source, parts, device, dtype)?;
    check_pins(tier, &model.weights)?;
    Ok(model)
}

/// Refuses loaded files that contradict the tier's pins.
fn check_pins(tier: &Tier, loaded: &[WeightRecord]) -> Result<()> {
    let mismatches = tier.pin_problems(loaded);
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
    Ok(())
}

/// Refuses tiers that are not upscale tiers where an upscaler is needed.
pub fn require_upscale(tier: &Tier) -> Result<()> {
    if tier.kind != TierKind::Upscale {
        return Err(Error::arg(
            "--upscale-tier",
            format!("tier `{}` is a diffusion tier, not an upscale tier (kind = \"upscale\")", tier.name),
        ));
    }
    Ok(())
}

/// The weight records of a super-resolution model: the store blob for an imported name
/// ("store/NAME.safetensors"), else the file itself ("file/NAME.ext", with an ncnn pair's
/// other half).
pub fn upscale_weight_records(tier: &Tier, weights: &SrWeights) -> Result<Vec<WeightRecord>> {
    let path = Path::new(&tier.model);
    if !path.is_file() {
        let sha256 = weights.sha256.clone().ok_or_else(|| {
            Error::config(&tier.defined_in, format!("tier `{}`: store model without a sha256", tier.name))
        })?;
        return Ok(vec![WeightRecord {
            component: "store".into(),
            file: format!("{}.safetensors", weights.name),
            sha256,
        }]);
    }
    let mut files = vec![path.to_path_buf()];
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("param") => files.push(path.with_extension("bin")),
        Some("bin") => files.insert(0, path.with_extension("param")),
        _ => {}
    }
    files
        .iter()
        .filter(|p| p.is_file())
        .map(|p| {
            Ok(WeightRecord {
                component: "file".into(),
                file: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                sha256: crate::loaders::weights::sha256_file(p)?,
            })
        })
        .collect()
}

/// Loads an upscale tier's super-resolution model (an imported store name, or a weight file)
/// and checks the tier's pins. Returns the upscaler and the weight records for the drift lock.
pub fn load_upscale_tier_model(
    tier: &Tier,
    device: &Device,
    dtype: DType,
) -> Result<(Upscaler, Vec<WeightRecord>)> {
    require_upscale(tier)?;
    let in_tier = |e: Error| {
        Error::config(&tier.defined_in, format!("tier `{}` model `{}`: {e}", tier.name, tier.model))
    };
    let weights = Store::open_default().and_then(|s| s.resolve(&tier.model)).map_err(in_tier)?;
    if let Some(scale) = tier.scale {
        if weights.spec.scale() != scale as usize {
            return Err(in_tier(Error::arg(
                "scale",
                format!("the tier says x{scale}, the model is x{}", weights.spec.scale()),
            )));
        }
    }
    let records = upscale_weight_records(tier, &weights)?;
    check_pins(tier, &records)?;
    let upscaler = Upscaler::new(weights, device, dtype)?;
    Ok((upscaler, records))
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
    /// `--vae-tiling` / `--vae-tile`.
    pub vae_tiling: VaeTiling,
}

/// A txt2img request for `seeds` from the tier's defaults, overridden by `o`; what neither sets
/// takes the family's defaults (native size, steps and guidance from the family registry).
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
    let guidance = o.guidance.or(tier.guidance).unwrap_or_else(|| model.default_guidance());
    let n = seeds.len();
    Ok(GenerateRequest {
        prompt: prompt.to_string(),
        negative_prompt: o.negative_prompt.clone().or_else(|| tier.negative_prompt.clone()),
        width: o.width.or(tier.width).unwrap_or(default_w),
        height: o.height.or(tier.height).unwrap_or(default_h),
        steps: o.steps.or(tier.steps).unwrap_or(model.spec.default_steps),
        guidance,
        true_cfg: None,
        offload_text_encoders: false,
        scheduler,
        seeds,
        init_latents: None,
        init_image: None,
        strength: 1.0,
        max_batch: o.max_batch.unwrap_or(n.min(8)).max(1),
        vae_tiling: o.vae_tiling,
        max_sequence_length: None,
    })
}
