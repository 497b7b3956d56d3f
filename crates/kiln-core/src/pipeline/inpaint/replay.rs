//! Rebuilding an inpainting-family job from the `kiln` record its PNG carries, so that
//! `kiln replay` can regenerate inpaint, outpaint and erase outputs as it does generations.

use super::{Blend, InpaintRequest, Region};
use crate::error::{Error, Result};
use crate::image::mask::Mask;
use crate::pipeline::metadata::ImageRecord;
use crate::pipeline::outpaint::{extend_canvas, Extension, Prefill};
use candle_core::Tensor;
use image::RgbImage;

/// The files a record names, read by the caller (which knows where they live now).
#[derive(Debug, Clone)]
pub struct RecordedInputs {
    /// `record.init_image`: the image that was edited (before any outpainting extension).
    pub image: RgbImage,
    /// `record.inpaint.mask` (None for outpainting, whose mask comes from the extension).
    pub mask: Option<Mask>,
    /// `record.init_latents`, if the job used them.
    pub init_latents: Option<Tensor>,
}

/// Whether `record` comes from `kiln inpaint`, `outpaint` or `erase`.
pub fn is_inpaint_record(record: &ImageRecord) -> bool {
    matches!(record.mode.as_str(), "inpaint" | "outpaint" | "erase") && record.inpaint.is_some()
}

/// The one-image request that regenerates `record`: the same canvas (outpainting extension and
/// pre-fill redone from the recorded seed), mask (resized and grown as the job did), region,
/// blending and sampler settings.
pub fn request_from_record(record: &ImageRecord, inputs: RecordedInputs) -> Result<InpaintRequest> {
    let bad = |msg: String| Error::arg("replay record", msg);
    let ip = record
        .inpaint
        .as_ref()
        .ok_or_else(|| bad(format!("mode `{}` has no inpaint section", record.mode)))?;
    let RecordedInputs { image, mask, init_latents } = inputs;
    let (w, h) = image.dimensions();
    let fit = |m: Mask| if (m.width(), m.height()) == (w, h) { Ok(m) } else { m.resized(w, h) };
    let need_mask = || bad(format!("a `{}` record needs its mask file", record.mode));
    let (image, mask) = match record.mode.as_str() {
        "inpaint" => (image, fit(mask.ok_or_else(need_mask)?)?),
        "erase" => (image, fit(mask.ok_or_else(need_mask)?)?.dilated(ip.grow.unwrap_or(0))),
        "outpaint" => {
            let [left, right, top, bottom] =
                ip.extend.ok_or_else(|| bad("an outpaint record without its extension".into()))?;
            let fill: Prefill = ip.fill.as_deref().unwrap_or("edge").parse()?;
            // The pre-fill noise is drawn from the job's first seed.
            let base_seed = record.seed.wrapping_sub(record.batch_index as u64);
            let canvas = extend_canvas(
                &image,
                Extension { left, right, top, bottom },
                fill,
                ip.overlap.unwrap_or(0),
                base_seed,
            )?;
            (canvas.image, canvas.mask)
        }
        other => return Err(bad(format!("mode `{other}` is not an inpainting job"))),
    };
    let mut req = InpaintRequest::new(record.prompt.clone(), image, mask);
    req.negative_prompt = record.negative_prompt.clone();
    req.steps = record.steps;
    req.guidance = record.guidance;
    req.true_cfg = record.true_cfg;
    req.scheduler = Some(record.scheduler.parse()?);
    req.seeds = vec![record.seed];
    req.init_latents = init_latents;
    req.strength = record.strength.unwrap_or(1.0);
    req.mask_blur = ip.mask_blur;
    req.blend = ip.blend.parse::<Blend>()?;
    req.region = if ip.only_masked { Region::OnlyMasked } else { Region::Whole };
    req.padding = ip.padding;
    req.reimpose = ip.reimpose;
    req.native_size = ip.native.map(|[nw, nh]| (nw, nh));
    Ok(req)
}
