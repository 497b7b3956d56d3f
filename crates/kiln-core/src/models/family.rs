//! The family registry: every pipeline family kiln runs, how a diffusers folder is recognised
//! as one, and what differs between families, as data. This is the only place that matches on
//! [`Family`]; the pipelines read the [`FamilySpec`] fields instead, so a new family is one
//! entry here plus its model files.

use crate::loaders::diffusers::DiffusersFolder;

/// A pipeline family: decides how prompts are encoded, which network denoises and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// SD 1.x / 2.x: one CLIP text encoder, last hidden state, UNet.
    StableDiffusion,
    /// SDXL: two CLIP encoders, penultimate hidden states, pooled + size/crop conditioning.
    StableDiffusionXl,
    /// FLUX.1 (schnell, dev): CLIP-L pooled + T5 hidden states, flow-matching transformer.
    Flux,
    /// Z-Image (Turbo): Qwen3 hidden states, single-stream flow-matching transformer.
    ZImage,
}

/// Which kind of text encoder a component holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// CLIP text model (BPE tokenizer, 77 tokens).
    Clip,
    /// T5 encoder (Unigram tokenizer from tokenizer.json).
    T5,
    /// Qwen3 decoder used as an encoder (byte-level BPE from tokenizer.json, chat template).
    Qwen3,
}

/// One tokenizer + text encoder pair, by component folder name.
#[derive(Debug, Clone, Copy)]
pub struct TextStackSpec {
    pub tokenizer: &'static str,
    pub encoder: &'static str,
    pub kind: EncoderKind,
}

/// How the text encoders' outputs become the denoiser's conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextConditioning {
    /// The single encoder's last hidden state (SD 1.x / 2.x).
    LastHidden,
    /// Every encoder's penultimate hidden state, concatenated; pooled from the projecting
    /// encoder (SDXL).
    PenultimateConcatPooled,
    /// CLIP's pooled output as the pooled vector, T5's last hidden state as the tokens (FLUX.1).
    ClipPooledT5Tokens,
    /// Qwen3's second-to-last hidden state of the chat-templated prompt, padding dropped
    /// (Z-Image); no pooled vector.
    QwenPenultimate,
}

/// What `--guidance` means for the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceStyle {
    /// Classifier-free guidance with the negative prompt when g > 1 (unless the network embeds
    /// guidance itself, as LCM-distilled UNets do).
    ClassifierFree,
    /// Guidance-distilled: the value is embedded by the network when it has a guidance
    /// embedding (FLUX.1-dev) and ignored otherwise (FLUX.1-schnell); no negative pass.
    Distilled,
    /// Classifier-free guidance counted from zero, as ZImagePipeline: `pos + g·(pos − neg)`,
    /// with a negative pass whenever g > 0 (g = 0 runs the positive prompt alone).
    ClassifierFreeFromZero,
}

/// How img2img's strength picks the first step (diffusers differs between pipelines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrengthRule {
    /// `init = int(n * strength)`, `start = n - init` (Stable Diffusion pipelines).
    IntegerInit,
    /// `init = min(n * strength, n)`, `start = int(max(n - init, 0))` (FLUX, SD3 pipelines).
    FloatInit,
}

/// The sigmas a flow-matching pipeline hands its scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSigmas {
    /// The scheduler's own spacing (non-flow families; flow schedulers spaced by config).
    Scheduler,
    /// `np.linspace(1.0, 1 / n, n)`, as FluxPipeline passes.
    LinspaceToInverseSteps,
}

/// Which network denoises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenoiserKind {
    /// diffusers' UNet2DConditionModel.
    UNet,
    /// diffusers' FluxTransformer2DModel.
    FluxTransformer,
    /// diffusers' ZImageTransformer2DModel.
    ZImageTransformer,
}

/// How a family's denoiser may come as one checkpoint file instead of a folder component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleFileLayout {
    /// BFL's FLUX.1 release names (`double_blocks.N.img_attn.qkv`, ...), bare or under
    /// ComfyUI's `model.diffusion_model.` ([`crate::loaders::single_file`]).
    BflFlux,
}

/// Everything the pipelines need to know about a family.
#[derive(Debug, Clone, Copy)]
pub struct FamilySpec {
    pub family: Family,
    /// Short name recorded in metadata and shown in errors.
    pub name: &'static str,
    /// The denoiser's component folder.
    pub denoiser: &'static str,
    pub denoiser_kind: DenoiserKind,
    /// Output side (px) when the denoiser config records no sample size.
    pub default_size: usize,
    /// Text stacks in diffusers' order.
    pub text: &'static [TextStackSpec],
    pub conditioning: TextConditioning,
    /// SDXL's (original size, crop, target size) ids.
    pub size_conditioning: bool,
    /// Whether model_index.json's `force_zeros_for_empty_prompt` applies (SDXL).
    pub zeros_for_empty_negative: bool,
    pub guidance: GuidanceStyle,
    /// diffusers' default `guidance_scale` for the pipeline.
    pub default_guidance: f64,
    /// kiln's default step count when neither the request nor a tier sets one.
    pub default_steps: usize,
    pub strength: StrengthRule,
    /// Trained with flow matching (velocity prediction): only flow schedulers apply.
    pub flow_matching: bool,
    pub flow_sigmas: FlowSigmas,
    /// Default text token budget (`--max-sequence-length`) of the family's long-context
    /// encoder, and its upper bound; None when every encoder has a fixed length (CLIP).
    pub max_sequence_length: Option<(usize, usize)>,
    /// The single-file checkpoint layout the denoiser may be loaded from (`--model FILE
    /// --base DIR`); None when only the folder's own component loads.
    pub single_file: Option<SingleFileLayout>,
}

const SD: FamilySpec = FamilySpec {
    family: Family::StableDiffusion,
    name: "sd",
    denoiser: "unet",
    denoiser_kind: DenoiserKind::UNet,
    default_size: 512,
    text: &[TextStackSpec { tokenizer: "tokenizer", encoder: "text_encoder", kind: EncoderKind::Clip }],
    conditioning: TextConditioning::LastHidden,
    size_conditioning: false,
    zeros_for_empty_negative: false,
    guidance: GuidanceStyle::ClassifierFree,
    default_guidance: 7.5,
    default_steps: 30,
    strength: StrengthRule::IntegerInit,
    flow_matching: false,
    flow_sigmas: FlowSigmas::Scheduler,
    max_sequence_length: None,
    single_file: None,
};

const SDXL: FamilySpec = FamilySpec {
    family: Family::StableDiffusionXl,
    name: "sdxl",
    denoiser: "unet",
    denoiser_kind: DenoiserKind::UNet,
    default_size: 512,
    text: &[
        TextStackSpec { tokenizer: "tokenizer", encoder: "text_encoder", kind: EncoderKind::Clip },
        TextStackSpec { tokenizer: "tokenizer_2", encoder: "text_encoder_2", kind: EncoderKind::Clip },
    ],
    conditioning: TextConditioning::PenultimateConcatPooled,
    size_conditioning: true,
    zeros_for_empty_negative: true,
    guidance: GuidanceStyle::ClassifierFree,
    default_guidance: 5.0,
    default_steps: 30,
    strength: StrengthRule::IntegerInit,
    flow_matching: false,
    flow_sigmas: FlowSigmas::Scheduler,
    max_sequence_length: None,
    single_file: None,
};

const FLUX: FamilySpec = FamilySpec {
    family: Family::Flux,
    name: "flux",
    denoiser: "transformer",
    denoiser_kind: DenoiserKind::FluxTransformer,
    // FluxPipeline: default_sample_size 128 latents × VAE factor 8.
    default_size: 1024,
    text: &[
        TextStackSpec { tokenizer: "tokenizer", encoder: "text_encoder", kind: EncoderKind::Clip },
        TextStackSpec { tokenizer: "tokenizer_2", encoder: "text_encoder_2", kind: EncoderKind::T5 },
    ],
    conditioning: TextConditioning::ClipPooledT5Tokens,
    size_conditioning: false,
    zeros_for_empty_negative: false,
    guidance: GuidanceStyle::Distilled,
    default_guidance: 3.5,
    // FluxPipeline's num_inference_steps default (schnell is distilled for 1-4: set --steps).
    default_steps: 28,
    strength: StrengthRule::FloatInit,
    flow_matching: true,
    flow_sigmas: FlowSigmas::LinspaceToInverseSteps,
    // FluxPipeline: max_sequence_length defaults to 512 and may not exceed it.
    max_sequence_length: Some((512, 512)),
    single_file: Some(SingleFileLayout::BflFlux),
};

const ZIMAGE: FamilySpec = FamilySpec {
    family: Family::ZImage,
    name: "zimage",
    denoiser: "transformer",
    denoiser_kind: DenoiserKind::ZImageTransformer,
    // ZImagePipeline: height and width default to 1024.
    default_size: 1024,
    text: &[TextStackSpec { tokenizer: "tokenizer", encoder: "text_encoder", kind: EncoderKind::Qwen3 }],
    conditioning: TextConditioning::QwenPenultimate,
    size_conditioning: false,
    zeros_for_empty_negative: false,
    guidance: GuidanceStyle::ClassifierFreeFromZero,
    // ZImagePipeline's defaults (Z-Image-Turbo is distilled for guidance 0 and ~9 steps: its
    // tier sets those).
    default_guidance: 5.0,
    default_steps: 50,
    strength: StrengthRule::FloatInit,
    flow_matching: true,
    // get_default_z_image_sigmas: linspace(1, 1/n, n), as FluxPipeline.
    flow_sigmas: FlowSigmas::LinspaceToInverseSteps,
    // ZImagePipeline: max_sequence_length defaults to 512 and has no limit of its own; the
    // transformer's RoPE table (axes_lens) bounds the caption, 1024 rows in diffusers' default.
    max_sequence_length: Some((512, 1024)),
    single_file: None,
};

impl Family {
    /// Every family, in detection order.
    pub const ALL: [Family; 4] =
        [Family::ZImage, Family::Flux, Family::StableDiffusionXl, Family::StableDiffusion];

    /// The family's registry entry.
    pub fn spec(self) -> &'static FamilySpec {
        match self {
            Family::StableDiffusion => &SD,
            Family::StableDiffusionXl => &SDXL,
            Family::Flux => &FLUX,
            Family::ZImage => &ZIMAGE,
        }
    }

    /// The family a diffusers folder holds, from its pipeline class and components (not the
    /// model version).
    pub fn detect(folder: &DiffusersFolder) -> Family {
        let class = folder.class_name();
        if class.starts_with("ZImage")
            || folder.component_class("transformer") == Some("ZImageTransformer2DModel")
        {
            Family::ZImage
        } else if class.starts_with("Flux")
            || folder.component_class("transformer") == Some("FluxTransformer2DModel")
        {
            Family::Flux
        } else if folder.has("text_encoder_2") || class.contains("XL") {
            Family::StableDiffusionXl
        } else {
            Family::StableDiffusion
        }
    }

    /// The family by its [`FamilySpec::name`].
    pub fn from_name(name: &str) -> Option<Family> {
        Self::ALL.into_iter().find(|f| f.spec().name == name)
    }
}

impl FamilySpec {
    /// Whether guidance `g` runs a negative pass (classifier-free guidance), before asking
    /// whether the denoiser embeds guidance itself: g > 1 for the SD families, g > 0 for Z-Image.
    pub fn cfg_requested(&self, g: f64) -> bool {
        match self.guidance {
            GuidanceStyle::ClassifierFree => g > 1.0,
            GuidanceStyle::ClassifierFreeFromZero => g > 0.0,
            GuidanceStyle::Distilled => false,
        }
    }

    /// The scale `s` of `neg + s·(pos − neg)` that guidance `g` means: `g` itself, or `g + 1`
    /// for Z-Image's `pos + g·(pos − neg)`.
    pub fn cfg_scale(&self, g: f64) -> f64 {
        match self.guidance {
            GuidanceStyle::ClassifierFreeFromZero => g + 1.0,
            _ => g,
        }
    }

    /// diffusers' img2img start index for `n` steps at `strength` (times the scheduler order,
    /// 1 for all of kiln's).
    pub fn strength_start(&self, n: usize, strength: f64) -> usize {
        match self.strength {
            StrengthRule::IntegerInit => crate::schedule::strength_start(n, strength),
            StrengthRule::FloatInit => {
                let init = (n as f64 * strength).min(n as f64);
                (n as f64 - init).max(0.0) as usize
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Family::ALL {
            assert_eq!(Family::from_name(f.spec().name), Some(f));
            assert_eq!(f.spec().family, f);
        }
    }

    #[test]
    fn flux_strength_rounds_like_flux_img2img() {
        // FluxImg2ImgPipeline.get_timesteps: 4 steps at 0.6 keep int(4 - 2.4) = 1 → 3 steps run;
        // the SD pipelines start at 4 - int(2.4) = 2.
        assert_eq!(Family::Flux.spec().strength_start(4, 0.6), 1);
        assert_eq!(Family::StableDiffusion.spec().strength_start(4, 0.6), 2);
        assert_eq!(Family::Flux.spec().strength_start(5, 0.6), 2);
        assert_eq!(Family::Flux.spec().strength_start(4, 1.0), 0);
    }

    #[test]
    fn zimage_guidance_counts_from_zero() {
        let z = Family::ZImage.spec();
        assert!(!z.cfg_requested(0.0) && z.cfg_requested(0.5));
        assert_eq!(z.cfg_scale(2.0), 3.0);
        let sd = Family::StableDiffusion.spec();
        assert!(!sd.cfg_requested(1.0) && sd.cfg_requested(1.5));
        assert_eq!(sd.cfg_scale(7.5), 7.5);
        assert!(!Family::Flux.spec().cfg_requested(3.5));
    }
}
