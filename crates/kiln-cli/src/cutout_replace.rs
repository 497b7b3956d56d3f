//! `kiln cutout --replace PROMPT`: flags and model loading for background replacement.

use anyhow::bail;
use clap::Args;
use kiln_core::image::RgbImage;
use kiln_core::jobs::Engine;
use kiln_core::pipeline::cutout_replace::{replace_request, DEFAULT_FEATHER};
use kiln_core::pipeline::inpaint::inpaint_quiet;
use kiln_core::pipeline::model::LoadedModel;
use kiln_core::tiers::load::{tier_request, Overrides};
use kiln_core::tiers::Tier;
use std::path::PathBuf;

use crate::args::RunArgs;

#[derive(Args, Debug, Clone)]
pub struct ReplaceArgs {
    /// Paint a new background from this prompt (the subject stays bit-identical); needs
    /// --tier or --inpaint-model.
    #[arg(long, value_name = "PROMPT")]
    pub replace: Option<String>,
    /// Tier whose model paints the background (see `kiln tiers`).
    #[arg(long, requires = "replace", conflicts_with = "inpaint_model")]
    pub tier: Option<String>,
    /// Diffusers folder or hub id that paints the background (instead of --tier).
    #[arg(long, requires = "replace")]
    pub inpaint_model: Option<String>,
    /// Project folder: its tiers for --replace, its library for asset inputs (default:
    /// $KILN_PROJECT or the current folder).
    #[arg(long)]
    pub project: Option<PathBuf>,
    /// Denoising steps (default: the tier's, else 30).
    #[arg(long, requires = "replace")]
    pub steps: Option<usize>,
    /// Guidance scale (default: the tier's, else the model family's).
    #[arg(long, requires = "replace")]
    pub guidance: Option<f64>,
    /// Seed (default 0).
    #[arg(long, requires = "replace")]
    pub seed: Option<u64>,
    /// Feathering of the new background into the subject's edge, px (default 4).
    #[arg(long, requires = "replace")]
    pub feather: Option<f64>,
}

/// Replacement resolved but not loaded yet (so flag errors come before any model loads).
pub struct Prepared {
    args: ReplaceArgs,
    engine: Engine,
    images: usize,
}

/// A loaded inpainting model and the replacement settings.
pub struct Replacer {
    args: ReplaceArgs,
    model: std::sync::Arc<LoadedModel>,
    tier: Tier,
    tiered: bool,
}

impl ReplaceArgs {
    /// Checks the flags and resolves the device and tier (budget included).
    pub fn prepare(
        &self,
        run: &RunArgs,
        images: usize,
        background: bool,
    ) -> anyhow::Result<Option<Prepared>> {
        let Some(_) = &self.replace else { return Ok(None) };
        if background {
            bail!("--replace paints the background itself: drop --background");
        }
        if self.tier.is_none() && self.inpaint_model.is_none() {
            bail!("--replace needs a model to paint with: pass --tier T or --inpaint-model DIR|HUB_ID");
        }
        let engine = crate::job::engine(self.project.as_deref(), run, false)?;
        Ok(Some(Prepared { args: self.clone(), engine, images }))
    }
}

impl Prepared {
    /// Loads the model (the tier's, budget-checked and drift-guarded, or the folder's).
    pub fn load(self, _show: bool) -> anyhow::Result<Replacer> {
        let (model, tier, warnings) = self.engine.diffusion_model(
            self.args.tier.as_deref(),
            self.args.inpaint_model.as_deref(),
            self.images,
        )?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        let tiered = tier.is_some();
        Ok(Replacer { args: self.args, model, tier: tier.unwrap_or_else(Tier::untiered), tiered })
    }
}

impl Replacer {
    /// Paints the background of `image` around `subject` (white = keep).
    pub fn run(
        &self,
        image: &RgbImage,
        subject: &kiln_core::pipeline::cutout::GrayImage,
    ) -> anyhow::Result<(RgbImage, serde_json::Value)> {
        let prompt = self.args.replace.clone().unwrap_or_default();
        let seed = self.args.seed.unwrap_or(0);
        let overrides =
            Overrides { steps: self.args.steps, guidance: self.args.guidance, ..Overrides::default() };
        let defaults = tier_request(&self.tier, &self.model, &prompt, vec![seed], &overrides)?;
        let feather = self.args.feather.unwrap_or(DEFAULT_FEATHER);
        let mut req = replace_request(&prompt, image, subject, feather)?;
        req.negative_prompt = defaults.negative_prompt;
        req.steps = defaults.steps;
        req.guidance = defaults.guidance;
        req.scheduler = defaults.scheduler;
        req.seeds = vec![seed];
        if self.tiered {
            req.native_size = Some((defaults.width as u32, defaults.height as u32));
        }
        let out = inpaint_quiet(&self.model, &req)?;
        let Some(first) = out.images.into_iter().next() else { bail!("the inpainting job made no image") };
        let info = serde_json::json!({
            "prompt": prompt,
            "seed": seed,
            "steps": req.steps,
            "guidance": req.guidance,
            "feather": feather,
            "tier": self.args.tier,
            "model": self.args.inpaint_model,
            "seconds": out.timings.total,
        });
        Ok((first.image, info))
    }
}
