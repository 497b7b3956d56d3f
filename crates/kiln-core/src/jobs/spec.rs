//! Typed job specs: what a client (the CLI, the HTTP server, a queued row) asks the engine to
//! do. Specs are plain data (serde, JSON in the queue and on the wire); everything they name is
//! resolved by the runner, so a spec can wait in the queue and run after a restart.
//!
//! Some fields name local files (`model` folders, `out`, `file` images, `init_latents`): the
//! CLI uses them, but [`JobSpec::check_remote`] refuses them for specs that arrive over HTTP,
//! where no request may name a filesystem path.

pub use super::spec_checks::{MAX_LORAS, MAX_PROMPT_BYTES};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Most images one job makes.
pub const MAX_IMAGES: usize = 256;

/// Every kind of job the engine runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// txt2img / img2img with a tier (recorded in the library) or a model (written to `out`).
    Generate(GenerateSpec),
    /// N variants from the draft tier plus a contact sheet.
    Draft(DraftSpec),
    /// A draft re-rendered by the final tier (optionally upscaled after).
    Promote(PromoteSpec),
    /// Repaint the masked part of an image (also outpaint and erase, by `mode`).
    Inpaint(InpaintSpec),
    /// An asset through an upscale tier.
    Upscale(UpscaleSpec),
    /// An asset regenerated from its stored record and compared with the original.
    Replay(ReplaySpec),
    /// A subject cut out of an image by a matting model.
    Cutout(CutoutSpec),
    /// An image colour-graded with a 3D LUT (local: the LUT is a file).
    Grade(GradeSpec),
}

/// The kind of a job, without its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Generate,
    Draft,
    Promote,
    Inpaint,
    Upscale,
    Replay,
    Cutout,
    Grade,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::Draft => "draft",
            JobKind::Promote => "promote",
            JobKind::Inpaint => "inpaint",
            JobKind::Upscale => "upscale",
            JobKind::Replay => "replay",
            JobKind::Cutout => "cutout",
            JobKind::Grade => "grade",
        }
    }
}

/// The queue lane a job waits in: drafts go before finals and upscales.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    Draft = 0,
    Final = 1,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Draft => "draft",
            Lane::Final => "final",
        }
    }

    pub fn from_index(i: i64) -> Self {
        if i == 0 {
            Lane::Draft
        } else {
            Lane::Final
        }
    }
}

/// An input image: a library asset, an image uploaded to the server (by its sha256), or a local
/// file (CLI only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageRef {
    Asset(i64),
    Upload(String),
    File(PathBuf),
}

/// txt2img / img2img.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    /// A tier name (see `kiln tiers`); the job is then recorded and billed.
    #[serde(default)]
    pub tier: Option<String>,
    /// A diffusers folder or hub id instead of a tier (local only).
    #[serde(default)]
    pub model: Option<String>,
    /// Hub revision for `model`.
    #[serde(default)]
    pub revision: Option<String>,
    pub prompt: String,
    #[serde(default)]
    pub negative: Option<String>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f64>,
    /// ddim | euler | euler-a | dpmpp-2m | dpmpp-2m-karras | lcm | pndm.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// First seed; image i uses seed + i. None = random (the result says which).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Number of images (default 1).
    #[serde(default)]
    pub count: Option<usize>,
    /// Images per denoiser batch.
    #[serde(default)]
    pub batch: Option<usize>,
    /// img2img's starting image.
    #[serde(default)]
    pub init_image: Option<ImageRef>,
    /// img2img strength in (0, 1] (default 0.8).
    #[serde(default)]
    pub strength: Option<f64>,
    /// Unit-normal starting noise as .npy (local only).
    #[serde(default)]
    pub init_latents: Option<PathBuf>,
    /// Output path (local only; with several images PATH-0.png, PATH-1.png, ...).
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// on | off | auto (default): decode/encode the VAE in tiles with whole-image statistics.
    #[serde(default)]
    pub vae_tiling: Option<String>,
    /// Largest VAE tile in output pixels.
    #[serde(default)]
    pub vae_tile: Option<usize>,
    /// Token budget of the long-context text encoder (FLUX's T5; default: the family's own).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// A preset (brand kit, `kiln presets`): its choices fill what this spec leaves unset, its
    /// template wraps the prompt, and its grade is applied to every image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// LoRAs merged into the model, `NAME|PATH[:WEIGHT]` each (weight 1 when absent): names of
    /// the LoRA library, or locally files. `<lora:NAME:WEIGHT>` in the prompt adds to these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
    /// With `model` a single-file transformer checkpoint (a FLUX.1 `.safetensors` in BFL's or
    /// ComfyUI's layout): the diffusers folder or hub id (`revision` applies to it) that the
    /// text encoders, tokenizers, VAE, scheduler and the transformer's config come from (local only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// FLUX's true classifier-free guidance (diffusers' `true_cfg_scale`): with `negative` and a
    /// value > 1, a negative pass and `neg + s·(pos − neg)`; `guidance` stays the distilled one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_cfg: Option<f64>,
    /// Release the text encoders once the prompts are encoded (the next job loads them again):
    /// lower peak memory while denoising, a reload per job. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_text_encoders: Option<bool>,
}

/// `kiln draft`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DraftSpec {
    /// Default "draft".
    #[serde(default)]
    pub tier: Option<String>,
    pub prompt: String,
    /// Default 8.
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub negative: Option<String>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub batch: Option<usize>,
    /// on | off | auto (default): decode/encode the VAE in tiles with whole-image statistics.
    #[serde(default)]
    pub vae_tiling: Option<String>,
    /// Largest VAE tile in output pixels.
    #[serde(default)]
    pub vae_tile: Option<usize>,
    /// Token budget of the long-context text encoder (FLUX's T5; default: the family's own).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// A preset (brand kit, `kiln presets`): its choices fill what this spec leaves unset, its
    /// template wraps the prompt, and its grade is applied to every image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// LoRAs merged after the tier's own, `NAME|PATH[:WEIGHT]` each; `<lora:…>` in the prompt too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
}

/// `kiln promote`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteSpec {
    /// The draft: an asset id (or, locally, a kiln PNG).
    pub draft: ImageRef,
    /// Default "final".
    #[serde(default)]
    pub tier: Option<String>,
    /// img2img (default) or reseed.
    #[serde(default)]
    pub mode: Option<String>,
    /// img2img strength (default 0.5).
    #[serde(default)]
    pub strength: Option<f64>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub steps: Option<usize>,
    /// Upscale the final after: 4k, 8k, WxH or a scale factor.
    #[serde(default)]
    pub upscale: Option<String>,
    /// Default "upscale".
    #[serde(default)]
    pub upscale_tier: Option<String>,
    /// Upscale tile side in input pixels (default: chosen from available memory).
    #[serde(default)]
    pub tile: Option<usize>,
    /// Re-detail the upscale with a diffusion tier (needs `upscale`).
    #[serde(default)]
    pub redetail: Option<RedetailSpec>,
    /// on | off | auto (default): decode/encode the VAE in tiles with whole-image statistics.
    #[serde(default)]
    pub vae_tiling: Option<String>,
    /// Largest VAE tile in output pixels.
    #[serde(default)]
    pub vae_tile: Option<usize>,
    /// Token budget of the long-context text encoder (FLUX's T5; default: the family's own).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// A preset (brand kit): its LoRAs (before `loras`), steps and grade apply to the final;
    /// the draft's prompt stays. Unset: the final takes the grade of the draft's own preset.
    #[serde(default)]
    pub preset: Option<String>,
    /// LoRAs merged into the final tier's model (after the tier's and the preset's), each
    /// `NAME[:WEIGHT]`.
    #[serde(default)]
    pub loras: Vec<String>,
}

impl Default for ImageRef {
    fn default() -> Self {
        ImageRef::Asset(0)
    }
}

/// What an inpainting job does with its mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EditMode {
    /// Repaint the masked area with the prompt.
    #[default]
    Inpaint,
    /// Remove what the mask covers (neutral prompt, grown mask).
    Erase,
    /// Extend the canvas (`extend`) and paint the new area; the mask is made from the extension.
    Outpaint,
}

/// How outpainting extends the canvas.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendSpec {
    #[serde(default)]
    pub left: u32,
    #[serde(default)]
    pub right: u32,
    #[serde(default)]
    pub top: u32,
    #[serde(default)]
    pub bottom: u32,
    /// An aspect ratio such as 16:9 instead of the four sides.
    #[serde(default)]
    pub to: Option<String>,
    /// edge (default) | noise.
    #[serde(default)]
    pub fill: Option<String>,
    /// How far the soft mask reaches into the original, in pixels.
    #[serde(default)]
    pub overlap: Option<u32>,
}

/// `kiln inpaint` / `kiln erase` (the server's edits).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InpaintSpec {
    #[serde(default)]
    pub tier: Option<String>,
    /// Local only.
    #[serde(default)]
    pub model: Option<String>,
    pub image: ImageRef,
    /// White = repaint (grayscale, or RGBA whose transparent pixels are repainted). Not used
    /// by outpainting.
    #[serde(default)]
    pub mask: Option<ImageRef>,
    #[serde(default)]
    pub mode: EditMode,
    /// Outpainting's extension.
    #[serde(default)]
    pub extend: Option<ExtendSpec>,
    /// kiln (default) | diffusers.
    #[serde(default)]
    pub blend: Option<String>,
    /// auto (default) | on | off.
    #[serde(default)]
    pub reimpose: Option<String>,
    /// Local only: unit-normal starting noise (.npy).
    #[serde(default)]
    pub init_latents: Option<PathBuf>,
    /// Local only: output path.
    #[serde(default)]
    pub out: Option<PathBuf>,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative: Option<String>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f64>,
    /// FLUX's true classifier-free guidance scale (diffusers' `true_cfg_scale`): with `negative`
    /// and a scale > 1, a negative pass per step.
    #[serde(default)]
    pub true_cfg: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub count: Option<usize>,
    /// In (0, 1] (default 1).
    #[serde(default)]
    pub strength: Option<f64>,
    /// Feathering in px (default 4).
    #[serde(default)]
    pub mask_blur: Option<f64>,
    /// auto | whole | only-masked.
    #[serde(default)]
    pub region: Option<String>,
    /// Pixels around the mask's box in only-masked mode.
    #[serde(default)]
    pub padding: Option<u32>,
    /// Stretch a mask of another size to the image instead of refusing it.
    #[serde(default)]
    pub resize_mask: bool,
    /// Erase: grow the mask by this many pixels (default 8).
    #[serde(default)]
    pub grow: Option<u32>,
    /// on | off | auto (default): decode/encode the VAE in tiles with whole-image statistics.
    #[serde(default)]
    pub vae_tiling: Option<String>,
    /// Largest VAE tile in output pixels.
    #[serde(default)]
    pub vae_tile: Option<usize>,
    /// Token budget of the long-context text encoder (FLUX's T5; default: the family's own).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// A preset (brand kit, `kiln presets`): its choices fill what this spec leaves unset, its
    /// template wraps the prompt, and its grade is applied to every image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// LoRAs merged into the model (after a tier's own), `NAME|PATH[:WEIGHT]` each; `<lora:…>`
    /// in the prompt too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
}

/// Diffusion re-detail after an upscale (`upscale` and `promote --upscale`): img2img at a low
/// strength on blended latent tiles (docs/upscale.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedetailSpec {
    /// The diffusion tier that re-details (default "final").
    #[serde(default)]
    pub tier: Option<String>,
    /// How far the result may depart from the upscale, in (0, 1] (default 0.3).
    #[serde(default)]
    pub strength: Option<f64>,
    /// Default: the asset's own prompt.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Negative prompt (default: the tier's).
    #[serde(default)]
    pub negative: Option<String>,
    /// FLUX's true classifier-free guidance scale (diffusers' `true_cfg_scale`): with a negative
    /// prompt and a scale > 1, a negative pass per tile.
    #[serde(default)]
    pub true_cfg: Option<f64>,
    /// Steps of the full schedule (default: the tier's, else 20).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Default 0.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Denoiser tile side in image pixels, a multiple of 8 in 64..=2048 (default 512).
    #[serde(default)]
    pub tile: Option<usize>,
    /// Guidance scale (default: the tier's, else 5).
    #[serde(default)]
    pub guidance: Option<f64>,
    /// LoRAs merged into the re-detail model after its tier's own, `NAME|PATH[:WEIGHT]` each
    /// (over HTTP, library names only), so the added detail keeps the look.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
}

impl RedetailSpec {
    /// Checks the numbers and builds the request (image and, when empty, prompt filled later),
    /// with the tier's defaults when there is one (a model named directly has none). Called
    /// without a tier it is also the up-front check, before any model loads.
    pub fn request(
        &self,
        tier: Option<&crate::tiers::Tier>,
    ) -> Result<crate::pipeline::redetail::RedetailRequest> {
        use crate::pipeline::redetail::{RedetailRequest, DEFAULT_OVERLAP, DEFAULT_TILE};
        let strength = self.strength.unwrap_or(0.3);
        self.lora_args()?;
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::arg("redetail.strength", format!("{strength} must be in (0, 1]")));
        }
        let tile = match self.tile {
            Some(px) if px % 8 != 0 || !(64..=2048).contains(&px) => {
                return Err(Error::arg("redetail.tile", format!("{px} must be a multiple of 8 in 64..=2048")))
            }
            Some(px) => px / 8,
            None => DEFAULT_TILE,
        };
        crate::bounds::STEPS.check_opt(self.steps)?;
        if let Some(v) = self.true_cfg.filter(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::arg("redetail.true_cfg", format!("{v} must be a finite number >= 0")));
        }
        Ok(RedetailRequest {
            image: image::RgbImage::new(0, 0),
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative.clone().or_else(|| tier.and_then(|t| t.negative_prompt.clone())),
            true_cfg: self.true_cfg,
            steps: self.steps.or(tier.and_then(|t| t.steps)).unwrap_or(20),
            strength,
            guidance: self.guidance.or(tier.and_then(|t| t.guidance)).unwrap_or(5.0),
            scheduler: tier.and_then(|t| t.scheduler.as_deref()).map(str::parse).transpose()?,
            seed: self.seed.unwrap_or(0),
            tile,
            overlap: DEFAULT_OVERLAP.min(tile / 2),
            vae_tiling: Default::default(),
        })
    }
}

/// `kiln upscale` of an asset through an upscale tier.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpscaleSpec {
    pub image: ImageRef,
    /// Default "upscale".
    #[serde(default)]
    pub tier: Option<String>,
    /// 4k, 8k, WxH or a scale factor (default: the model's scale).
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub tile: Option<usize>,
    /// Re-detail the upscale with a diffusion tier.
    #[serde(default)]
    pub redetail: Option<RedetailSpec>,
}

/// `kiln cutout`: background removal (the matting model's mask, as rembg computes it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CutoutSpec {
    pub image: ImageRef,
    /// An imported matting model's name (`kiln models list`); default u2netp.
    #[serde(default)]
    pub model: Option<String>,
    /// Composite onto this colour (#rrggbb, #rgb, white, black, ...) instead of writing a
    /// transparent (RGBA) image.
    #[serde(default)]
    pub background: Option<String>,
    /// Composite onto this image instead (it must have the input's size unless
    /// `fit_background`).
    #[serde(default)]
    pub background_image: Option<ImageRef>,
    /// Scale and centre-crop `background_image` to the input's size.
    #[serde(default)]
    pub fit_background: bool,
    /// Refine the mask's edges at full resolution, guided by the image (hair, soft contours).
    #[serde(default)]
    pub refine: bool,
}

/// `kiln grade` of a library asset: recorded as its child.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GradeSpec {
    pub image: ImageRef,
    /// The `.cube` LUT (a local file: over HTTP, grade through a preset).
    pub lut: PathBuf,
    /// 0..=1 (default 1).
    #[serde(default)]
    pub strength: Option<f32>,
    /// tetrahedral (default) or trilinear.
    #[serde(default)]
    pub interp: Option<String>,
}

/// `kiln replay`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaySpec {
    pub asset: ImageRef,
    /// Local only.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// on | off | auto (default): decode/encode the VAE in tiles with whole-image statistics.
    #[serde(default)]
    pub vae_tiling: Option<String>,
    /// Largest VAE tile in output pixels.
    #[serde(default)]
    pub vae_tile: Option<usize>,
    /// Token budget of the long-context text encoder (FLUX's T5; default: the family's own).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
}

/// A spec's `vae_tiling` and `vae_tile` as the pipelines take them, checked.
pub fn vae_tiling(mode: Option<&str>, tile: Option<usize>) -> Result<crate::pipeline::vae_tiling::VaeTiling> {
    let tiling = crate::pipeline::vae_tiling::VaeTiling {
        mode: mode.unwrap_or("auto").parse()?,
        tile_px: tile,
        budget_bytes: None,
    };
    tiling.validate()?;
    Ok(tiling)
}

impl JobSpec {
    /// The spec's VAE tiling choice.
    pub fn vae(&self) -> Result<crate::pipeline::vae_tiling::VaeTiling> {
        let (mode, tile) = match self {
            JobSpec::Generate(s) => (s.vae_tiling.as_deref(), s.vae_tile),
            JobSpec::Draft(s) => (s.vae_tiling.as_deref(), s.vae_tile),
            JobSpec::Promote(s) => (s.vae_tiling.as_deref(), s.vae_tile),
            JobSpec::Inpaint(s) => (s.vae_tiling.as_deref(), s.vae_tile),
            JobSpec::Replay(s) => (s.vae_tiling.as_deref(), s.vae_tile),
            JobSpec::Upscale(_) | JobSpec::Cutout(_) | JobSpec::Grade(_) => (None, None),
        };
        vae_tiling(mode, tile)
    }

    pub fn kind(&self) -> JobKind {
        match self {
            JobSpec::Generate(_) => JobKind::Generate,
            JobSpec::Draft(_) => JobKind::Draft,
            JobSpec::Promote(_) => JobKind::Promote,
            JobSpec::Inpaint(_) => JobKind::Inpaint,
            JobSpec::Upscale(_) => JobKind::Upscale,
            JobSpec::Replay(_) => JobKind::Replay,
            JobSpec::Cutout(_) => JobKind::Cutout,
            JobSpec::Grade(_) => JobKind::Grade,
        }
    }

    /// The tier the job runs on, when it names one (defaults included).
    pub fn tier(&self) -> Option<&str> {
        match self {
            JobSpec::Generate(s) => s.tier.as_deref(),
            JobSpec::Draft(s) => Some(s.tier.as_deref().unwrap_or("draft")),
            JobSpec::Promote(s) => Some(s.tier.as_deref().unwrap_or("final")),
            JobSpec::Inpaint(s) => s.tier.as_deref(),
            JobSpec::Upscale(s) => Some(s.tier.as_deref().unwrap_or("upscale")),
            JobSpec::Replay(_) | JobSpec::Cutout(_) | JobSpec::Grade(_) => None,
        }
    }

    /// How many images the job makes (for budget estimates and limits).
    pub fn images(&self) -> usize {
        match self {
            JobSpec::Generate(s) => s.count.unwrap_or(1),
            JobSpec::Draft(s) => s.count.unwrap_or(8),
            JobSpec::Inpaint(s) => s.count.unwrap_or(1),
            JobSpec::Promote(_)
            | JobSpec::Upscale(_)
            | JobSpec::Replay(_)
            | JobSpec::Cutout(_)
            | JobSpec::Grade(_) => 1,
        }
    }
}
