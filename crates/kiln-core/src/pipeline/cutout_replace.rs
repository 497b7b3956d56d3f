//! Background replacement: the cutout's mask inverted and feathered on the background side
//! becomes an inpainting mask, so the subject's pixels stay bit-identical and everything else
//! is painted from the prompt by [`crate::pipeline::inpaint`].

use image::GrayImage;

use crate::error::{Error, Result};
use crate::image::mask::Mask;
use crate::pipeline::inpaint::{InpaintRequest, Region};

/// Default feathering of the background mask, in pixels (Gaussian standard deviation).
pub const DEFAULT_FEATHER: f64 = 4.0;

/// The repaint mask for a subject mask (white = subject): `1 − alpha`, blurred by `feather`
/// px, then capped by `1 − alpha` again, so the blur only softens the background side and every
/// fully opaque subject pixel gets exactly 0 (kept bit-identical by the exact composite).
pub fn background_mask(subject: &GrayImage, feather: f64) -> Result<Mask> {
    if !feather.is_finite() || !(0.0..=256.0).contains(&feather) {
        return Err(Error::arg("--feather", format!("{feather} must be in 0..=256 px")));
    }
    let (w, h) = subject.dimensions();
    let inv: Vec<f32> = subject.as_raw().iter().map(|&a| 1.0 - f32::from(a) / 255.0).collect();
    let inv = Mask::new(w, h, inv)?;
    let soft = inv.blurred(feather);
    let capped = soft.values().iter().zip(inv.values()).map(|(&s, &v)| s.min(v)).collect();
    Mask::new(w, h, capped)
}

/// An inpainting request that repaints the background of `image` around `subject`.
/// The request's own blur is off (the mask is already feathered) and the whole image is
/// processed (the background is most of it). The caller sets steps, guidance, seeds.
pub fn replace_request(
    prompt: &str,
    image: &image::RgbImage,
    subject: &GrayImage,
    feather: f64,
) -> Result<InpaintRequest> {
    if subject.dimensions() != image.dimensions() {
        return Err(Error::arg("mask", "the subject mask and the image differ in size"));
    }
    let mask = background_mask(subject, feather)?;
    let mut req = InpaintRequest::new(prompt, image.clone(), mask);
    req.mask_blur = 0.0;
    req.region = Region::Whole;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_subject_pixels_get_zero_and_background_one() -> Result<()> {
        let subject = GrayImage::from_fn(40, 30, |x, _| image::Luma([if x < 20 { 255 } else { 0 }]));
        let m = background_mask(&subject, 3.0)?;
        for y in 0..30 {
            for x in 0..40 {
                let v = m.get(x, y);
                if x < 20 {
                    assert_eq!(v, 0.0);
                } else if x > 30 {
                    assert!((v - 1.0).abs() < 1e-6);
                } else {
                    assert!((0.0..=1.0).contains(&v));
                }
            }
        }
        Ok(())
    }
}
