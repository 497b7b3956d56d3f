//! `kiln inpaint`, `kiln outpaint` and `kiln erase`: one inpainting job each, with the
//! metadata `kiln generate` writes plus the mask and region used.

use crate::args::{ModelArgs, RunArgs, SamplingArgs};
use crate::generate::print_images;
use clap::Args;
use kiln_core::jobs::spec::{EditMode, ExtendSpec, ImageRef, InpaintSpec};
use kiln_core::jobs::JobSpec;
use kiln_core::pipeline::outpaint::DEFAULT_OVERLAP;
use std::path::PathBuf;

/// Options shared by the three commands.
#[derive(Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    source: ModelArgs,
    /// A LoRA merged into the model (after a tier's own): an imported name or a .safetensors
    /// file, optional weight (default 1). Repeatable; `<lora:NAME:WEIGHT>` in the prompt too.
    #[arg(long = "lora", value_name = "NAME|PATH[:WEIGHT]")]
    loras: Vec<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// FLUX: true classifier-free guidance (diffusers' true_cfg_scale). With --negative and S > 1
    /// each step also runs a negative pass (twice the denoiser work).
    #[arg(long, value_name = "S")]
    true_cfg: Option<f64>,
    /// Unit-normal starting noise (.npy) at the processing size (see --json's "plan").
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Pixels around the mask's box in only-masked mode.
    #[arg(long, default_value_t = kiln_core::pipeline::inpaint::DEFAULT_PADDING)]
    padding: u32,
    /// auto | whole | only-masked (auto: only-masked when the mask is small on a large image).
    #[arg(long, default_value = "auto")]
    region: String,
    /// kiln (soft masks, feathered; default) | diffusers (binarized, diffusers' own blending).
    #[arg(long, default_value = "kiln")]
    blend: String,
    /// Re-impose the known region at every step: auto (on for ordinary models, off for
    /// dedicated 9-channel inpainting models, which see the known image themselves) | on | off.
    #[arg(long, default_value = "auto")]
    reimpose: String,
    /// Output PNG (with --count N: PATH-0.png, ...). Default: kiln-<command>-<seed>.png.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
pub struct InpaintArgs {
    /// The image to edit.
    image: PathBuf,
    /// White = repaint: a grayscale image, or an RGBA image whose transparent pixels are repainted.
    #[arg(long)]
    mask: PathBuf,
    #[arg(long)]
    prompt: String,
    /// How much to change the masked area, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// Mask feathering in pixels (Gaussian standard deviation; 0 = hard edge). Default 4,
    /// 0 with --blend diffusers.
    #[arg(long)]
    mask_blur: Option<f64>,
    /// Stretch a mask of another size to the image instead of refusing it.
    #[arg(long)]
    resize_mask: bool,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Args, Debug)]
pub struct OutpaintArgs {
    /// The image to extend.
    image: PathBuf,
    /// What the new area shows (default: empty, the model continues the scene).
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 0)]
    left: u32,
    #[arg(long, default_value_t = 0)]
    right: u32,
    #[arg(long, default_value_t = 0)]
    top: u32,
    #[arg(long, default_value_t = 0)]
    bottom: u32,
    /// Extend to an aspect ratio (e.g. 16:9), evenly on both sides of the short dimension.
    #[arg(long, conflicts_with_all = ["left", "right", "top", "bottom"])]
    to: Option<String>,
    /// edge (replicate the border) | noise (noise matched to the border's colours).
    #[arg(long, default_value = "edge")]
    fill: String,
    /// How far the soft mask reaches into the original, in pixels.
    #[arg(long, default_value_t = DEFAULT_OVERLAP)]
    overlap: u32,
    #[command(flatten)]
    job: JobArgs,
}

#[derive(Args, Debug)]
pub struct EraseArgs {
    /// The image to clean up.
    image: PathBuf,
    /// White = remove.
    #[arg(long)]
    mask: PathBuf,
    /// Override the neutral fill prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Grow the mask by this many pixels to catch the object's fringe and shadow.
    #[arg(long, default_value_t = 8)]
    grow: u32,
    /// Mask feathering in pixels (default 4, 0 with --blend diffusers).
    #[arg(long)]
    mask_blur: Option<f64>,
    /// Stretch a mask of another size to the image instead of refusing it.
    #[arg(long)]
    resize_mask: bool,
    #[command(flatten)]
    job: JobArgs,
}

impl JobArgs {
    /// The spec fields every edit command shares.
    fn spec(&self, image: &std::path::Path, mode: EditMode) -> anyhow::Result<InpaintSpec> {
        self.sampling.scheduler()?;
        Ok(InpaintSpec {
            tier: self.source.tier.clone(),
            model: self.source.model.clone(),
            image: ImageRef::File(image.to_path_buf()),
            mode,
            negative: self.sampling.negative.clone(),
            steps: self.sampling.steps,
            guidance: self.sampling.guidance,
            true_cfg: self.true_cfg,
            scheduler: self.sampling.scheduler.clone(),
            seed: self.sampling.spec_seed(),
            preset: self.sampling.preset.clone(),
            count: Some(self.sampling.count),
            region: Some(self.region.clone()),
            padding: Some(self.padding),
            blend: Some(self.blend.clone()),
            reimpose: Some(self.reimpose.clone()),
            init_latents: self.init_latents.clone(),
            out: self.out.clone(),
            vae_tiling: Some(self.run.vae.vae_tiling.clone()),
            vae_tile: self.run.vae.vae_tile,
            loras: self.loras.clone(),
            ..Default::default()
        })
    }

    fn run(&self, spec: InpaintSpec) -> anyhow::Result<()> {
        let engine = crate::job::engine(self.source.project.as_deref(), &self.run, false)?;
        let out = crate::job::run(&engine, &JobSpec::Inpaint(spec), &self.run)?;
        print_images(&out, self.run.json)
    }
}

pub fn run_inpaint(args: InpaintArgs) -> anyhow::Result<()> {
    let spec = InpaintSpec {
        mask: Some(ImageRef::File(args.mask.clone())),
        prompt: args.prompt.clone(),
        strength: Some(args.strength),
        mask_blur: args.mask_blur,
        resize_mask: args.resize_mask,
        ..args.job.spec(&args.image, EditMode::Inpaint)?
    };
    args.job.run(spec)
}

pub fn run_outpaint(args: OutpaintArgs) -> anyhow::Result<()> {
    let extend = ExtendSpec {
        left: args.left,
        right: args.right,
        top: args.top,
        bottom: args.bottom,
        to: args.to.clone(),
        fill: Some(args.fill.clone()),
        overlap: Some(args.overlap),
    };
    let spec = InpaintSpec {
        prompt: args.prompt.clone(),
        extend: Some(extend),
        ..args.job.spec(&args.image, EditMode::Outpaint)?
    };
    args.job.run(spec)
}

pub fn run_erase(args: EraseArgs) -> anyhow::Result<()> {
    let spec = InpaintSpec {
        mask: Some(ImageRef::File(args.mask.clone())),
        prompt: args.prompt.clone().unwrap_or_default(),
        grow: Some(args.grow),
        mask_blur: args.mask_blur,
        resize_mask: args.resize_mask,
        ..args.job.spec(&args.image, EditMode::Erase)?
    };
    args.job.run(spec)
}
