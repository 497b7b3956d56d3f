//! Edits of deep (16-bit) or translucent sources. Diffusion works on 8-bit RGB, but an inpaint,
//! erase or outpaint must not cost the rest of the picture its bit depth or its alpha: every
//! pixel the edit left unchanged keeps the source's exact samples, alpha included.

use image::{DynamicImage, ImageBuffer, Rgb, RgbImage, Rgba};

/// Rebuilds an edit result in the source's colour type. `edited` is the 8-bit result;
/// `offset` is where the source's top-left pixel sits in it (outpainting adds margins).
/// A pixel whose 8-bit value equals the source's 8-bit reduction keeps the source's samples;
/// a changed pixel is widened from 8 bits (×257, exact) and keeps the source's alpha. New
/// canvas outside the source is opaque. 8-bit opaque sources are returned unchanged.
pub fn restore_depth(source: &DynamicImage, edited: &RgbImage, offset: (u32, u32)) -> DynamicImage {
    let deep = matches!(
        source.color(),
        image::ColorType::L16 | image::ColorType::La16 | image::ColorType::Rgb16 | image::ColorType::Rgba16
    );
    let alpha = source.color().has_alpha();
    if !deep && !alpha {
        return DynamicImage::ImageRgb8(edited.clone());
    }
    let source8 = source.to_rgb8();
    let (sw, sh) = (source8.width(), source8.height());
    let (ox, oy) = offset;
    // The source pixel under an output pixel, if any.
    let under = |x: u32, y: u32| -> Option<(u32, u32)> {
        let (sx, sy) = (x.checked_sub(ox)?, y.checked_sub(oy)?);
        (sx < sw && sy < sh).then_some((sx, sy))
    };
    let unchanged =
        |x: u32, y: u32, p: &Rgb<u8>| under(x, y).filter(|&(sx, sy)| source8.get_pixel(sx, sy) == p);
    let (w, h) = edited.dimensions();
    match (deep, alpha) {
        (false, _) => {
            let src = source.to_rgba8();
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(w, h, |x, y| {
                let p = edited.get_pixel(x, y);
                match under(x, y) {
                    Some((sx, sy)) => {
                        let s = src.get_pixel(sx, sy);
                        Rgba([p[0], p[1], p[2], s[3]])
                    }
                    None => Rgba([p[0], p[1], p[2], u8::MAX]),
                }
            }))
        }
        (true, false) => {
            let src = source.to_rgb16();
            DynamicImage::ImageRgb16(ImageBuffer::from_fn(w, h, |x, y| {
                let p = edited.get_pixel(x, y);
                match unchanged(x, y, p) {
                    Some((sx, sy)) => *src.get_pixel(sx, sy),
                    None => Rgb(p.0.map(widen)),
                }
            }))
        }
        (true, true) => {
            let src = source.to_rgba16();
            DynamicImage::ImageRgba16(ImageBuffer::from_fn(w, h, |x, y| {
                let p = edited.get_pixel(x, y);
                let a = under(x, y).map_or(u16::MAX, |(sx, sy)| src.get_pixel(sx, sy)[3]);
                match unchanged(x, y, p) {
                    Some((sx, sy)) => *src.get_pixel(sx, sy),
                    None => Rgba([widen(p[0]), widen(p[1]), widen(p[2]), a]),
                }
            }))
        }
    }
}

/// 8 → 16 bits exactly (0 → 0, 255 → 65535), the inverse of the 16 → 8 reduction.
fn widen(v: u8) -> u16 {
    u16::from(v) * 257
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_pixels_keep_deep_samples_and_alpha() {
        let src = ImageBuffer::from_fn(4, 2, |x, y| {
            Rgba([x as u16 * 1000 + 7, y as u16 * 300 + 1, 40_000, 1234 * (x as u16 + 1)])
        });
        let source = DynamicImage::ImageRgba16(src.clone());
        let mut edited = source.to_rgb8();
        edited.put_pixel(1, 1, Rgb([9, 8, 7]));
        let out = restore_depth(&source, &edited, (0, 0));
        let DynamicImage::ImageRgba16(out) = out else { panic!("expected RGBA16") };
        for (x, y, p) in out.enumerate_pixels() {
            if (x, y) == (1, 1) {
                assert_eq!(p.0, [9 * 257, 8 * 257, 7 * 257, src.get_pixel(1, 1)[3]]);
            } else {
                assert_eq!(p, src.get_pixel(x, y), "pixel {x},{y}");
            }
        }
        // 16 → 8 of the result is the 8-bit edit, so replay's comparison at 8 bits still holds.
        assert_eq!(DynamicImage::ImageRgba16(out).to_rgb8(), edited);
    }

    #[test]
    fn outpainted_margin_is_opaque_and_source_alpha_kept() {
        let src = ImageBuffer::from_fn(2, 2, |x, _| Rgba([10, 20, 30, if x == 0 { 0 } else { 128 }]));
        let source = DynamicImage::ImageRgba8(src);
        let edited = RgbImage::from_pixel(4, 2, Rgb([1, 2, 3]));
        let DynamicImage::ImageRgba8(out) = restore_depth(&source, &edited, (1, 0)) else {
            panic!("expected RGBA8")
        };
        let alphas: Vec<u8> = (0..4).map(|x| out.get_pixel(x, 0)[3]).collect();
        assert_eq!(alphas, [255, 0, 128, 255]);
    }

    #[test]
    fn plain_rgb8_is_passed_through() {
        let source = DynamicImage::ImageRgb8(RgbImage::from_pixel(2, 2, Rgb([5, 5, 5])));
        let edited = RgbImage::from_pixel(2, 2, Rgb([6, 6, 6]));
        assert_eq!(restore_depth(&source, &edited, (0, 0)), DynamicImage::ImageRgb8(edited));
    }
}
