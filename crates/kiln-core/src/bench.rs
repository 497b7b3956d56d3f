//! Draft-vs-final benchmark: per stage (load, text encode, denoising step, VAE decode) for each
//! tier on the current device. `synthetic` builds each tier's architecture with zero-valued
//! weights instead of loading files (compute cost does not depend on weight values), so it
//! runs where the real weights are absent; `shrink` divides every width by K for CI-sized runs.
//! The upscale tier ([`bench_upscale`]) times one image of the final's size through its SR model.

use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionModel, UNetCond, UNetConfig};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::tiers::Tier;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One tier's numbers (seconds unless named otherwise).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TierBench {
    pub tier: String,
    pub architecture: String,
    pub synthetic: bool,
    pub shrink: usize,
    pub device: String,
    pub dtype: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance doubles the UNet batch.
    pub cfg: bool,
    /// First load (synthetic: building the zero-weight model, i.e. allocation only).
    pub load_cold: f64,
    /// Second load of the same model (OS file cache warm).
    pub load_warm: f64,
    /// Untimed images made before the timed ones.
    pub warmup: usize,
    /// Timed images; every stage below is the fastest of them.
    pub repeats: usize,
    pub text_encode: f64,
    pub step_mean: f64,
    pub steps_total: f64,
    pub vae_decode: f64,
    /// text encode + steps + VAE decode for one image (the fastest image).
    pub per_image: f64,
    pub images_per_second: f64,
    /// Peak resident memory while this tier ran (Linux; cumulative where it cannot be reset).
    pub peak_host_memory_bytes: Option<u64>,
    pub parameters: usize,
}

/// Settings shared by every tier of a run.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub device: Device,
    pub dtype: DType,
    /// Overrides each tier's size (both sides).
    pub size: Option<usize>,
    /// Overrides each tier's step count.
    pub steps: Option<usize>,
    /// Divide every channel width by this (1, 2, 4, 8, 16 or 32).
    pub shrink: usize,
    /// Untimed images made first (caches, allocator and, on a GPU, kernel loading warm).
    pub warmup: usize,
    /// Timed images (at least 1); each stage reports its fastest.
    pub repeats: usize,
}

impl BenchSettings {
    /// Checks the settings before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        crate::bounds::REPEATS.check(self.repeats)?;
        crate::bounds::WARMUP.check(self.warmup)?;
        crate::bounds::STEPS.check_opt(self.steps)?;
        crate::bounds::BENCH_SIZE.check_opt(self.size)?;
        if ![1, 2, 4, 8, 16, 32].contains(&self.shrink) {
            return Err(Error::arg("shrink", format!("{} is not one of 1, 2, 4, 8, 16, 32", self.shrink)));
        }
        Ok(())
    }
}

/// The synthetic architectures kiln knows: (text encoders, unet, vae, name) configs in
/// diffusers/transformers key names, for the tiers' shipped models.
struct Arch {
    name: &'static str,
    text: Vec<(serde_json::Value, bool)>,
    unet: serde_json::Value,
    vae: serde_json::Value,
    sdxl: bool,
}

fn arch_for(model: &str, k: usize) -> Result<Arch> {
    let g = 32 / k;
    let vae = |scaling: f64| {
        json!({
            "block_out_channels": [128 / k, 256 / k, 512 / k, 512 / k], "norm_num_groups": g,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 4, "layers_per_block": 2, "sample_size": 512, "scaling_factor": scaling
        })
    };
    let clip = |hidden: usize, layers: usize, heads: usize, inter: usize, act: &str, proj: usize| {
        json!({
            "hidden_size": hidden / k, "intermediate_size": inter / k, "num_hidden_layers": layers,
            "num_attention_heads": heads, "hidden_act": act, "projection_dim": proj / k, "vocab_size": 49408
        })
    };
    match model {
        // SD 2.1-base architecture (SD-Turbo is a distilled SD 2.1).
        "stabilityai/sd-turbo" => Ok(Arch {
            name: "sd-turbo (SD 2.1 UNet 865M, OpenCLIP-H text)",
            text: vec![(clip(1024, 23, 16, 4096, "gelu", 512), false)],
            unet: json!({
                "block_out_channels": [320 / k, 640 / k, 1280 / k, 1280 / k], "norm_num_groups": g,
                "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024 / k,
                "use_linear_projection": true, "sample_size": 64,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
            }),
            vae: vae(0.18215),
            sdxl: false,
        }),
        "stabilityai/stable-diffusion-xl-base-1.0" => Ok(Arch {
            name: "SDXL base (UNet 2.6B, CLIP-L + OpenCLIP-bigG text)",
            text: vec![
                (clip(768, 12, 12, 3072, "quick_gelu", 768), false),
                (clip(1280, 32, 20, 5120, "gelu", 1280), true),
            ],
            unet: json!({
                "block_out_channels": [320 / k, 640 / k, 1280 / k], "norm_num_groups": g,
                "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048 / k,
                "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true, "sample_size": 128,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256 / k,
                "projection_class_embeddings_input_dim": 1280 / k + 6 * (256 / k)
            }),
            vae: vae(0.13025),
            sdxl: true,
        }),
        other => Err(Error::Unsupported(format!(
            "no synthetic architecture for `{other}` (known: stabilityai/sd-turbo, \
             stabilityai/stable-diffusion-xl-base-1.0); run without --synthetic to load its weights"
        ))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::config(what, e.to_string()))
}

struct Built {
    parameters: usize,
    text: Vec<ClipTextModel>,
    unet: UNet2DConditionModel,
    vae: AutoencoderKl,
    sdxl: bool,
}

fn build(arch: &Arch, device: &Device, dtype: DType) -> Result<Built> {
    let count = Arc::new(AtomicUsize::new(0));
    let vb = |shape_of: ShapeOf| {
        VarBuilder::from_backend(Box::new(CountingZeros(count.clone(), shape_of)), dtype, device.clone())
    };
    let mut text = Vec::new();
    for (i, (cfg, proj)) in arch.text.iter().enumerate() {
        let cfg: ClipTextConfig = parse(cfg.clone(), &format!("synthetic text encoder {i}"))?;
        text.push(ClipTextModel::new(&cfg, vb(clip_shape(&cfg)), *proj)?);
    }
    let unet_cfg: UNetConfig = parse(arch.unet.clone(), "synthetic unet")?;
    let vae_cfg: VaeConfig = parse(arch.vae.clone(), "synthetic vae")?;
    let unet = UNet2DConditionModel::new(&unet_cfg, vb(Box::new(|_: &str| None)))?;
    // The VAE's only attention sits in the mid blocks, at the widest channel count.
    let mid = vae_cfg.block_out_channels.last().copied().unwrap_or(512);
    let vae = AutoencoderKl::new(&vae_cfg, vb(Box::new(move |_: &str| Some(vec![mid, mid]))))?;
    Ok(Built { parameters: count.load(Ordering::Relaxed), text, unet, vae, sdxl: arch.sdxl })
}

type ShapeOf = Box<dyn Fn(&str) -> Option<Vec<usize>> + Send + Sync>;

/// candle's zeros backend, counting the parameters it hands out; `shape_of` answers the
/// shape-less lookups (`get_unchecked`) the CLIP and VAE loaders make, from the key name.
struct CountingZeros(Arc<AtomicUsize>, ShapeOf);

/// Shapes of CLIP text-encoder keys (transformers names) for a config.
fn clip_shape(cfg: &ClipTextConfig) -> ShapeOf {
    let (h, i, v, p) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings);
    let proj = cfg.projection_dim.unwrap_or(h);
    Box::new(move |name: &str| {
        let shape = match name {
            n if n.ends_with("token_embedding.weight") => vec![v, h],
            n if n.ends_with("position_embedding.weight") => vec![p, h],
            n if n.ends_with("text_projection.weight") => vec![proj, h],
            n if n.contains("layer_norm") => vec![h],
            n if n.ends_with("_proj.weight") => vec![h, h],
            n if n.ends_with("_proj.bias") => vec![h],
            n if n.ends_with("fc1.weight") => vec![i, h],
            n if n.ends_with("fc1.bias") => vec![i],
            n if n.ends_with("fc2.weight") => vec![h, i],
            n if n.ends_with("fc2.bias") => vec![h],
            _ => return None,
        };
        Some(shape)
    })
}

impl candle_nn::var_builder::SimpleBackend for CountingZeros {
    fn get(
        &self,
        s: candle_core::Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.fetch_add(s.elem_count(), Ordering::Relaxed);
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match (self.1)(name) {
            Some(shape) => {
                self.0.fetch_add(shape.iter().product(), Ordering::Relaxed);
                Tensor::zeros(shape, dtype, dev)
            }
            None => candle_core::bail!("synthetic weights: no shape known for `{name}`"),
        }
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Resets the process's peak resident memory (Linux `clear_refs` 5), so each tier's
/// `peak_host_memory_bytes` is its own rather than the run's so far. Best effort: elsewhere
/// (or without permission) the peak stays cumulative.
fn reset_peak_host_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One image's stage times (seconds).
#[derive(Debug, Clone, Copy)]
struct ImageTimes {
    text_encode: f64,
    steps_total: f64,
    vae_decode: f64,
}

/// Makes `s.warmup` untimed images, then `s.repeats` timed ones (the callers' [`BenchSettings::validate`]
/// made sure there is at least one); returns each stage's fastest and the fastest whole image.
fn time_images(
    s: &BenchSettings,
    mut image: impl FnMut() -> Result<ImageTimes>,
) -> Result<(ImageTimes, f64)> {
    for _ in 0..s.warmup {
        image()?;
    }
    let mut best = ImageTimes { text_encode: f64::MAX, steps_total: f64::MAX, vae_decode: f64::MAX };
    let mut per_image = f64::MAX;
    for _ in 0..s.repeats {
        let t = image()?;
        per_image = per_image.min(t.text_encode + t.steps_total + t.vae_decode);
        best = ImageTimes {
            text_encode: best.text_encode.min(t.text_encode),
            steps_total: best.steps_total.min(t.steps_total),
            vae_decode: best.vae_decode.min(t.vae_decode),
        };
    }
    Ok((best, per_image))
}

/// Times one tier (synthetic: zero-weight model of its architecture).
pub fn bench_synthetic(tier: &Tier, s: &BenchSettings) -> Result<TierBench> {
    reset_peak_host_memory();
    s.validate()?;
    let arch = arch_for(&tier.model, s.shrink)?;
    let sync = |d: &Device| d.synchronize();
    let t0 = Instant::now();
    let built = build(&arch, &s.device, s.dtype)?;
    sync(&s.device)?;
    let load_cold = t0.elapsed().as_secs_f64();
    drop(built);
    let t0 = Instant::now();
    let built = build(&arch, &s.device, s.dtype)?;
    sync(&s.device)?;
    let load_warm = t0.elapsed().as_secs_f64();

    let side_w = s.size.or(tier.width).unwrap_or(512);
    let side_h = s.size.or(tier.height).unwrap_or(512);
    if side_w % 8 != 0 || side_h % 8 != 0 || side_w == 0 || side_h == 0 {
        return Err(Error::arg("--size", format!("{side_w}x{side_h} is not a positive multiple of 8")));
    }
    let steps = s.steps.or(tier.steps).unwrap_or(30).max(1);
    let cfg = tier.guidance.unwrap_or(7.5) > 1.0;
    let b = if cfg { 2 } else { 1 };

    let (best, per_image) = time_images(s, || {
        let t0 = Instant::now();
        let ids = Tensor::zeros((1, 77), DType::U32, &s.device)?;
        let mut hidden = Vec::new();
        let mut pooled = None;
        for enc in &built.text {
            let out = enc.forward(&ids)?;
            let n = out.hidden_states.len();
            let h = if built.sdxl { out.hidden_states.get(n.saturating_sub(2)).cloned() } else { None };
            hidden.push(h.unwrap_or(out.last_hidden_state));
            if let Some(p) = out.text_embeds {
                pooled = Some(p);
            }
        }
        let hidden = Tensor::cat(&hidden, candle_core::D::Minus1)?.repeat((b, 1, 1))?;
        sync(&s.device)?;
        let text_encode = t0.elapsed().as_secs_f64();

        let latents = Tensor::zeros((b, 4, side_h / 8, side_w / 8), s.dtype, &s.device)?;
        let text_embeds = pooled.map(|p| p.repeat((b, 1))).transpose()?;
        let time_ids = if built.sdxl { Some(Tensor::zeros((b, 6), s.dtype, &s.device)?) } else { None };
        let cond = UNetCond {
            encoder_hidden_states: &hidden,
            text_embeds: text_embeds.as_ref(),
            time_ids: time_ids.as_ref(),
            timestep_cond: None,
        };
        let mut steps_total = 0.0;
        for i in 0..steps {
            let t0 = Instant::now();
            let out = built.unet.forward(&latents, 999.0 - i as f64, &cond)?;
            sync(&s.device)?;
            drop(out);
            steps_total += t0.elapsed().as_secs_f64();
        }
        let t0 = Instant::now();
        let z = latents.narrow(0, 0, 1)?;
        let image = built.vae.decode(&z)?;
        sync(&s.device)?;
        drop(image);
        Ok(ImageTimes { text_encode, steps_total, vae_decode: t0.elapsed().as_secs_f64() })
    })?;
    Ok(TierBench {
        tier: tier.name.clone(),
        architecture: arch.name.to_string(),
        synthetic: true,
        shrink: s.shrink,
        device: crate::device::name(&s.device),
        dtype: crate::device::dtype_name(s.dtype).to_string(),
        width: side_w,
        height: side_h,
        steps,
        cfg,
        load_cold,
        load_warm,
        warmup: s.warmup,
        repeats: s.repeats,
        text_encode: best.text_encode,
        step_mean: best.steps_total / steps as f64,
        steps_total: best.steps_total,
        vae_decode: best.vae_decode,
        per_image,
        images_per_second: if per_image > 0.0 { 1.0 / per_image } else { 0.0 },
        peak_host_memory_bytes: crate::device::peak_host_memory_bytes(),
        parameters: built.parameters,
    })
}

/// Times one tier with its real weights (through the generation pipeline, one image).
pub fn bench_real(tier: &Tier, s: &BenchSettings) -> Result<TierBench> {
    s.validate()?;
    reset_peak_host_memory();
    use crate::pipeline::generate::{generate, NoProgress};
    let t0 = Instant::now();
    let model = crate::tiers::load::load_tier_model(tier, &s.device, s.dtype, false)?;
    let load_cold = t0.elapsed().as_secs_f64();
    drop(model);
    let t0 = Instant::now();
    let model = crate::tiers::load::load_tier_model(tier, &s.device, s.dtype, false)?;
    let load_warm = t0.elapsed().as_secs_f64();
    let overrides =
        crate::tiers::load::Overrides { width: s.size, height: s.size, steps: s.steps, ..Default::default() };
    let req = crate::tiers::load::tier_request(tier, &model, "a benchmark prompt", vec![0], &overrides)?;
    let mut steps = 0;
    let (best, per_image) = time_images(s, || {
        let t = generate(&model, &req, &mut NoProgress)?.timings;
        steps = t.steps.len();
        Ok(ImageTimes {
            text_encode: t.text_encode,
            steps_total: t.steps.iter().sum(),
            vae_decode: t.vae_decode,
        })
    })?;
    Ok(TierBench {
        tier: tier.name.clone(),
        architecture: model.source.display_name(),
        synthetic: false,
        shrink: 1,
        device: crate::device::name(&s.device),
        dtype: crate::device::dtype_name(s.dtype).to_string(),
        width: req.width,
        height: req.height,
        steps,
        cfg: req.guidance > 1.0,
        load_cold,
        load_warm,
        warmup: s.warmup,
        repeats: s.repeats,
        text_encode: best.text_encode,
        step_mean: best.steps_total / steps.max(1) as f64,
        steps_total: best.steps_total,
        vae_decode: best.vae_decode,
        per_image,
        images_per_second: if per_image > 0.0 { 1.0 / per_image } else { 0.0 },
        peak_host_memory_bytes: crate::device::peak_host_memory_bytes(),
        parameters: 0,
    })
}

/// The upscale tier's numbers: one image of the final's size through the SR model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpscaleBench {
    pub tier: String,
    pub architecture: String,
    pub synthetic: bool,
    pub shrink: usize,
    pub device: String,
    pub dtype: String,
    pub scale: usize,
    pub input_width: usize,
    pub input_height: usize,
    pub output_width: usize,
    pub output_height: usize,
    /// Tile side used (input pixels).
    pub tile: usize,
    pub load_cold: f64,
    pub load_warm: f64,
    /// The whole tiled upscale of one image.
    pub upscale: f64,
    pub images_per_second: f64,
    /// Output megapixels per second.
    pub megapixels_per_second: f64,
    pub peak_host_memory_bytes: Option<u64>,
    pub parameters: usize,
}

/// Whether `model` names Real-ESRGAN x4plus (the shipped upscale tier), whose shape
/// `--synthetic` can build.
fn is_x4plus(model: &str) -> bool {
    let name = std::path::Path::new(model).file_stem().map(|s| s.to_string_lossy().to_ascii_lowercase());
    name.is_some_and(|n| n.starts_with("realesrgan-x4plus") && !n.contains("anime"))
}

/// Random weights of Real-ESRGAN x4plus's shape (RRDBNet, 64 features, 23 blocks, growth 32,
/// x4), channel widths divided by `shrink`. Random rather than zero so no path can shortcut.
pub fn synthetic_x4plus(shrink: usize) -> Result<crate::loaders::store::SrWeights> {
    use crate::models::sr::{RrdbConfig, SrArch, SrNet, SrSpec};
    let mut config: RrdbConfig = parse(json!({}), "synthetic x4plus")?;
    config.num_feat = (config.num_feat / shrink).max(1);
    config.num_grow_ch = (config.num_grow_ch / shrink).max(1);
    let spec = SrSpec { arch: SrArch::Rrdbnet(config), output_scale: None };
    // Build once on a VarMap to learn every tensor's name and shape, then draw weights small
    // enough (std 0.02) that 23 residual blocks stay finite.
    let varmap = candle_nn::VarMap::new();
    SrNet::new(&spec, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let names: Vec<(String, Vec<usize>)> = varmap
        .data()
        .lock()
        .map_err(|_| Error::Unsupported("synthetic x4plus: poisoned lock".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().dims().to_vec()))
        .collect();
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in names {
        tensors.insert(name, Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?);
    }
    Ok(crate::loaders::store::SrWeights {
        name: format!("synthetic realesrgan-x4plus (shrink {shrink})"),
        spec,
        tensors,
        sha256: None,
    })
}

/// Times the upscale tier on one `width x height` image (the final's size). `synthetic`
/// builds random x4plus-shaped weights for the shipped x4plus tier instead of loading them.
pub fn bench_upscale(
    tier: &Tier,
    s: &BenchSettings,
    synthetic: bool,
    width: usize,
    height: usize,
) -> Result<UpscaleBench> {
    use crate::pipeline::upscale::{UpscaleOptions, Upscaler};
    crate::tiers::load::require_upscale(tier)?;
    reset_peak_host_memory();
    if width == 0 || height == 0 {
        return Err(Error::arg("--size", "the upscale input must be at least 1x1"));
    }
    let synthetic = synthetic && is_x4plus(&tier.model);
    s.validate()?;
    let load = || -> Result<Upscaler> {
        if synthetic {
            Upscaler::new(synthetic_x4plus(s.shrink)?, &s.device, s.dtype)
        } else {
            Ok(crate::tiers::load::load_upscale_tier_model(tier, &s.device, s.dtype)?.0)
        }
    };
    let t0 = Instant::now();
    let up = load()?;
    s.device.synchronize()?;
    let load_cold = t0.elapsed().as_secs_f64();
    drop(up);
    let t0 = Instant::now();
    let up = load()?;
    s.device.synchronize()?;
    let load_warm = t0.elapsed().as_secs_f64();

    // A deterministic textured input (cost does not depend on pixel values either).
    let data: Vec<f32> = (0..3 * width * height).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect();
    let input = crate::image::io::PlanarImage { width, height, channels: 3, data };
    let t0 = Instant::now();
    let (out, tile) = up.upscale_planar(&input, &UpscaleOptions::default())?;
    s.device.synchronize()?;
    let upscale = t0.elapsed().as_secs_f64();
    let mp = (out.width * out.height) as f64 / 1e6;
    Ok(UpscaleBench {
        tier: tier.name.clone(),
        architecture: format!("{} x{} ({})", up.spec().arch_name(), up.spec().scale(), up.name()),
        synthetic,
        shrink: if synthetic { s.shrink } else { 1 },
        device: crate::device::name(&s.device),
        dtype: crate::device::dtype_name(s.dtype).to_string(),
        scale: up.spec().scale(),
        input_width: width,
        input_height: height,
        output_width: out.width,
        output_height: out.height,
        tile,
        load_cold,
        load_warm,
        upscale,
        images_per_second: if upscale > 0.0 { 1.0 / upscale } else { 0.0 },
        megapixels_per_second: if upscale > 0.0 { mp / upscale } else { 0.0 },
        peak_host_memory_bytes: crate::device::peak_host_memory_bytes(),
        parameters: up.spec().param_count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_x4plus_has_the_published_parameter_count() -> Result<()> {
        // Real-ESRGAN x4plus (RRDBNet, basicsr): 16,697,987 parameters.
        let w = synthetic_x4plus(1)?;
        let n: usize = w.tensors.values().map(|t| t.elem_count()).sum();
        assert_eq!(n, 16_697_987);
        assert_eq!(w.spec.param_count(), n);
        assert!(is_x4plus("realesrgan-x4plus") && is_x4plus("/m/realesrgan-x4plus.param"));
        assert!(!is_x4plus("realesrgan-x4plus-anime") && !is_x4plus("srvgg-tiny-x4"));
        Ok(())
    }
}
