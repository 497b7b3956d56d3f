//! Images: pixels <-> tensors, decoding with size limits, PNG metadata and atomic writes;
//! [`qc`]: hallucination QC of upscales (back-projection and added high-frequency energy per tile).

pub mod chart;
pub mod compare;
pub mod depth;
pub mod font;
pub mod guided;
pub mod io;
pub mod lut;
pub mod mask;
pub mod pil_resize;
pub mod png_meta;
pub mod qc;
pub mod resize;
pub mod sheet;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use image::ImageDecoder as _;
pub use image::RgbImage;
use std::path::Path;

/// Largest image side kiln decodes or generates; larger requests are refused before allocating.
pub const MAX_SIDE: u32 = 16_384;
/// Largest pixel count kiln decodes (a 16k × 16k canvas).
pub const MAX_PIXELS: u64 = (MAX_SIDE as u64) * (MAX_SIDE as u64);

/// Decodes an image file to 8-bit RGB, refusing absurd sizes before the pixels are allocated.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(load_dynamic(path)?.to_rgb8())
}

/// Decodes an image file keeping its channels and bit depth (masks read the alpha channel,
/// inpainting keeps both), upright by its EXIF orientation as viewers show it (a phone photo
/// tagged "rotate 90°" is edited the way it looks), refusing absurd sizes before the pixels
/// are allocated.
pub fn load_dynamic(path: &Path) -> Result<image::DynamicImage> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Image { path: path.to_path_buf(), msg: format!("cannot open: {e}") })?;
    decode_from(std::io::BufReader::new(file), MAX_SIDE, path)
}

/// [`load_dynamic`] for bytes in memory (uploads), with `max_side` as the size limit; `label`
/// names the source in errors.
pub fn decode_bytes(bytes: &[u8], max_side: u32, label: &Path) -> Result<image::DynamicImage> {
    decode_from(std::io::Cursor::new(bytes), max_side.min(MAX_SIDE), label)
}

/// The one image decoder: format sniffed from the bytes, size checked from the header before
/// any pixel is allocated, EXIF orientation applied.
fn decode_from<R: std::io::BufRead + std::io::Seek>(
    reader: R,
    max_side: u32,
    path: &Path,
) -> Result<image::DynamicImage> {
    let bad = |msg: String| Error::Image { path: path.to_path_buf(), msg };
    let reader = image::ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(bad("not a recognised image format (PNG, JPEG or WebP expected)".into()));
    }
    // Opening the decoder reads the header only; the size is judged before any pixel exists.
    let mut decoder = reader.into_decoder().map_err(|e| bad(format!("cannot decode header: {e}")))?;
    let (w, h) = decoder.dimensions();
    check_size(w, h).map_err(bad)?;
    if w > max_side || h > max_side {
        return Err(bad(format!("{w}x{h} exceeds the limit of {max_side} px per side")));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    decoder.set_limits(limits).map_err(|e| bad(format!("cannot decode: {e}")))?;
    let orientation = decoder.orientation().map_err(|e| bad(format!("cannot read EXIF orientation: {e}")))?;
    let mut img =
        image::DynamicImage::from_decoder(decoder).map_err(|e| bad(format!("cannot decode: {e}")))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Refuses sizes kiln will not allocate.
pub fn check_size(width: u32, height: u32) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("{width}x{height} has no pixels"));
    }
    if width > MAX_SIDE || height > MAX_SIDE || (width as u64) * (height as u64) > MAX_PIXELS {
        return Err(format!("{width}x{height} exceeds kiln's limit of {MAX_SIDE} px per side"));
    }
    Ok(())
}

/// Resizes with Lanczos3 when the size differs (init images for img2img).
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        return img.clone();
    }
    image::imageops::resize(img, width, height, image::imageops::FilterType::Lanczos3)
}

/// RGB8 → [1, 3, H, W] tensor in [-1, 1] (diffusers' VaeImageProcessor normalisation).
pub fn rgb_to_tensor(img: &RgbImage, device: &Device, dtype: DType) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0 * 2.0 - 1.0).collect();
    let t = Tensor::from_vec(data, (h, w, 3), &Device::Cpu)?.permute((2, 0, 1))?.unsqueeze(0)?;
    Ok(t.to_device(device)?.to_dtype(dtype)?)
}

/// Decoder output [B, 3, H, W] in about [-1, 1] → float images [B, H, W, 3] in [0, 1] on the CPU
/// (diffusers' `output_type="np"`).
pub fn decoded_to_unit(decoded: &Tensor) -> Result<Tensor> {
    let t = decoded.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let t = ((t / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(t.permute((0, 2, 3, 1))?.contiguous()?)
}

/// One float image [H, W, 3] in [0, 1] → RGB8, rounding as diffusers' numpy_to_pil does.
pub fn unit_to_rgb8(image: &Tensor) -> Result<RgbImage> {
    let (h, w, c) = image.dims3()?;
    if c != 3 {
        return Err(Error::Unsupported(format!("expected 3 channels, found {c}")));
    }
    let data: Vec<u8> = image
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, data)
        .ok_or_else(|| Error::Unsupported("image buffer size mismatch".into()))
}
