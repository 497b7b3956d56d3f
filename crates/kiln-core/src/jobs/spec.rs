//! Typed job specs: what a client (the CLI, the HTTP server, a queued row) asks the engine to
//! do. Specs are plain data (serde, JSON in the queue and on the wire); everything they name is
//! resolved by the runner, so a spec can wait in the queue and run after a restart.
//!
//! Some fields name local files (`model` folders, `out`, `file` images, `init_latents`): the
//! CLI uses them, but [`JobSpec::check_remote`] refuses them for specs that arrive over HTTP,
//! where no request may name a filesystem path.

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
}

/// Most LoRAs one job merges.
pub const MAX_LORAS: usize = 16;

impl GenerateSpec {
    /// The prompt without its `<lora:…>` tags, and every LoRA asked for (`loras`, then the tags
    /// in prompt order), each checked for syntax and weight range.
    pub fn lora_args(&self) -> Result<(String, Vec<String>)> {
        lora_args(&self.prompt, &self.loras)
    }
}

impl InpaintSpec {
    /// As [`GenerateSpec::lora_args`].
    pub fn lora_args(&self) -> Result<(String, Vec<String>)> {
        lora_args(&self.prompt, &self.loras)
    }
}

impl DraftSpec {
    /// As [`GenerateSpec::lora_args`].
    pub fn lora_args(&self) -> Result<(String, Vec<String>)> {
        lora_args(&self.prompt, &self.loras)
    }
}

/// A prompt without its `<lora:…>` tags, and `loras` followed by the tags, each checked.
fn lora_args(prompt: &str, loras: &[String]) -> Result<(String, Vec<String>)> {
    let (prompt, tags) = crate::loaders::lora::take_prompt_loras(prompt)?;
    let all: Vec<String> = loras.iter().cloned().chain(tags).collect();
    if all.len() > MAX_LORAS {
        return Err(Error::arg("loras", format!("{} LoRAs; at most {MAX_LORAS} per job", all.len())));
    }
    for arg in &all {
        crate::loaders::lora::parse_lora_arg(arg)?;
    }
    Ok((prompt, all))
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
        Ok(RedetailRequest {
            image: image::RgbImage::new(0, 0),
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: tier.and_then(|t| t.negative_prompt.clone()),
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

    /// Checks what can be checked without the project (counts, ranges): the whole job is
    /// validated before any work, so nothing is rendered and then refused.
    pub fn validate(&self) -> Result<()> {
        let n = self.images();
        if n == 0 || n > MAX_IMAGES {
            return Err(Error::arg("count", format!("{n} is outside 1..={MAX_IMAGES}")));
        }
        let strength = match self {
            JobSpec::Generate(s) => s.strength,
            JobSpec::Promote(s) => s.strength,
            JobSpec::Inpaint(s) => s.strength,
            _ => None,
        };
        if let Some(v) = strength {
            if !(v > 0.0 && v <= 1.0) {
                return Err(Error::arg("strength", format!("{v} must be in (0, 1]")));
            }
        }
        let (batch, steps, tile) = match self {
            JobSpec::Generate(s) => (s.batch, s.steps, None),
            JobSpec::Draft(s) => (s.batch, s.steps, None),
            JobSpec::Promote(s) => (None, s.steps, s.tile),
            JobSpec::Inpaint(s) => (None, s.steps, None),
            JobSpec::Upscale(s) => (None, None, s.tile),
            JobSpec::Replay(_) | JobSpec::Cutout(_) | JobSpec::Grade(_) => (None, None, None),
        };
        crate::bounds::BATCH.check_opt(batch)?;
        crate::bounds::STEPS.check_opt(steps)?;
        crate::bounds::TILE.check_opt(tile)?;
        self.vae()?;
        if let JobSpec::Generate(s) = self {
            match (&s.tier, &s.model) {
                (None, None) => return Err(Error::arg("tier", "name a tier (or, locally, a model)")),
                (Some(_), Some(_)) => return Err(Error::arg("model", "give a tier or a model, not both")),
                _ => {}
            }
            if s.prompt.len() > MAX_PROMPT_BYTES {
                return Err(Error::arg("prompt", format!("longer than {MAX_PROMPT_BYTES} bytes")));
            }
            s.lora_args()?;
        }
        if let JobSpec::Draft(s) = self {
            s.lora_args()?;
        }
        if let JobSpec::Inpaint(s) = self {
            s.lora_args()?;
        }
        if let JobSpec::Grade(s) = self {
            if let Some(v) = s.strength.filter(|v| !(0.0..=1.0).contains(v)) {
                return Err(Error::arg("strength", format!("{v} must be in 0..=1")));
            }
            if let Some(i) = &s.interp {
                i.parse::<crate::image::lut::Interpolation>()?;
            }
        }
        if let JobSpec::Cutout(s) = self {
            if s.background.is_some() && s.background_image.is_some() {
                return Err(Error::arg(
                    "background",
                    "give a colour or an image to composite onto, not both",
                ));
            }
            if let Some(c) =
                s.background.as_deref().filter(|c| crate::pipeline::cutout::parse_color(c).is_none())
            {
                return Err(Error::arg(
                    "background",
                    format!("`{c}` is not a colour (#rrggbb, #rgb, white, black, gray, red, green, blue)"),
                ));
            }
            if s.fit_background && s.background_image.is_none() {
                return Err(Error::arg("fit_background", "needs a background_image to fit"));
            }
        }
        if let JobSpec::Inpaint(s) = self {
            if s.tier.is_none() && s.model.is_none() {
                return Err(Error::arg("tier", "name a tier (or, locally, a model)"));
            }
            match (s.mode, &s.mask, &s.extend) {
                (EditMode::Outpaint, _, None) => {
                    return Err(Error::arg("extend", "outpainting needs the sides to extend or an aspect"))
                }
                (EditMode::Inpaint | EditMode::Erase, None, _) => {
                    return Err(Error::arg("mask", "inpainting and erasing need a mask (white = repaint)"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Refuses what a remote client may not ask for: anything naming a filesystem path.
    pub fn check_remote(&self) -> Result<()> {
        let refuse_lora_paths = |args: &[String]| -> Result<()> {
            for arg in args {
                if crate::loaders::lora::library::is_path(&crate::loaders::lora::parse_lora_arg(arg)?.0) {
                    return Err(Error::arg(
                        "loras",
                        "names a filesystem path; over HTTP name LoRAs of the library",
                    ));
                }
            }
            Ok(())
        };
        let path_field = |field: &str| {
            Err(Error::arg(field, "names a filesystem path; over HTTP use asset ids and uploads instead"))
        };
        let image = |field: &str, r: &ImageRef| match r {
            ImageRef::File(_) => path_field(field),
            _ => Ok(()),
        };
        match self {
            JobSpec::Generate(s) => {
                if s.model.is_some() {
                    return path_field("model");
                }
                if s.out.is_some() {
                    return path_field("out");
                }
                if s.init_latents.is_some() {
                    return path_field("init_latents");
                }
                if let Some(r) = &s.init_image {
                    image("init_image", r)?;
                }
                refuse_lora_paths(&s.lora_args()?.1)?;
            }
            JobSpec::Draft(s) => refuse_lora_paths(&s.lora_args()?.1)?,
            JobSpec::Promote(s) => image("draft", &s.draft)?,
            JobSpec::Inpaint(s) => {
                if s.model.is_some() {
                    return path_field("model");
                }
                if s.out.is_some() {
                    return path_field("out");
                }
                if s.init_latents.is_some() {
                    return path_field("init_latents");
                }
                image("image", &s.image)?;
                if let Some(m) = &s.mask {
                    image("mask", m)?;
                }
                refuse_lora_paths(&s.lora_args()?.1)?;
            }
            JobSpec::Upscale(s) => image("image", &s.image)?,
            JobSpec::Cutout(s) => {
                image("image", &s.image)?;
                if let Some(b) = &s.background_image {
                    image("background_image", b)?;
                }
                // A model is an imported name; a path (an .onnx file) is for the CLI only.
                if s.model.as_deref().is_some_and(|m| m.contains(['/', '\\']) || m.ends_with(".onnx")) {
                    return path_field("model");
                }
            }
            JobSpec::Grade(_) => return path_field("lut"),
            JobSpec::Replay(s) => {
                image("asset", &s.asset)?;
                if s.out.is_some() {
                    return path_field("out");
                }
            }
        }
        self.validate()
    }

    /// Every input image the spec names, with its field (so a bad id can be refused before
    /// the job is queued).
    pub fn image_refs(&self) -> Vec<(&'static str, &ImageRef)> {
        match self {
            JobSpec::Generate(g) => g.init_image.iter().map(|r| ("init_image", r)).collect(),
            JobSpec::Promote(p) => vec![("draft", &p.draft)],
            JobSpec::Inpaint(i) => {
                let mut v = vec![("image", &i.image)];
                v.extend(i.mask.iter().map(|m| ("mask", m)));
                v
            }
            JobSpec::Upscale(u) => vec![("image", &u.image)],
            JobSpec::Replay(r) => vec![("asset", &r.asset)],
            JobSpec::Cutout(c) => {
                let mut v = vec![("image", &c.image)];
                v.extend(c.background_image.iter().map(|b| ("background_image", b)));
                v
            }
            JobSpec::Grade(g) => vec![("image", &g.image)],
            JobSpec::Draft(_) => Vec::new(),
        }
    }
}

/// Longest prompt accepted (CLIP truncates at 77 tokens anyway; this bounds stored specs).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_as_tagged_json() {
        let spec = JobSpec::Generate(GenerateSpec {
            tier: Some("draft".into()),
            prompt: "a kiln".into(),
            seed: Some(3),
            ..Default::default()
        });
        let json = serde_json::to_string(&spec).unwrap_or_default();
        assert!(json.contains("\"kind\":\"generate\""), "{json}");
        let back: JobSpec = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(back, spec);
    }

    #[test]
    fn unknown_fields_and_paths_are_refused() {
        let bad = serde_json::from_str::<JobSpec>(r#"{"kind":"draft","prompt":"x","cout":3}"#);
        assert!(bad.is_err());
        let spec: JobSpec =
            serde_json::from_str(r#"{"kind":"generate","tier":"draft","prompt":"x","out":"/etc/x.png"}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        let err = spec.check_remote().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("out") && err.contains("path"), "{err}");
        let spec: JobSpec = serde_json::from_str(r#"{"kind":"upscale","image":{"file":"../../etc/passwd"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(spec.check_remote().is_err());
    }

    #[test]
    fn counts_are_bounded() {
        let spec = JobSpec::Draft(DraftSpec { prompt: "x".into(), count: Some(0), ..Default::default() });
        assert!(spec.validate().is_err());
        let spec =
            JobSpec::Draft(DraftSpec { prompt: "x".into(), count: Some(100_000), ..Default::default() });
        assert!(spec.validate().is_err());
    }
}
