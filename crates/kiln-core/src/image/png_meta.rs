//! PNG text metadata (A1111 `parameters`, kiln's replay JSON) and atomic PNG writes.

use crate::error::{Error, Result};
use image::{DynamicImage, RgbImage};
use std::path::Path;

/// One PNG text chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextChunk {
    pub keyword: String,
    pub text: String,
}

impl TextChunk {
    pub fn new(keyword: impl Into<String>, text: impl Into<String>) -> Self {
        Self { keyword: keyword.into(), text: text.into() }
    }
}

/// Writes an RGB PNG with text chunks atomically: a temp file in the same folder, renamed over
/// `path` only once complete, so a killed run never leaves a half-written image.
pub fn write_png_atomic(path: &Path, image: &RgbImage, chunks: &[TextChunk]) -> Result<()> {
    write_pixels_atomic(path, image.width(), image.height(), Pixels::Rgb8(image.as_raw()), chunks)
}

/// Writes an 8-bit RGBA PNG (straight alpha: a cutout) atomically.
pub fn write_rgba_atomic(path: &Path, image: &image::RgbaImage, chunks: &[TextChunk]) -> Result<()> {
    write_pixels_atomic(path, image.width(), image.height(), Pixels::Rgba8Fast(image.as_raw()), chunks)
}

/// Writes an 8-bit grey PNG (a mask: white = subject / repaint) atomically.
pub fn write_gray_atomic(path: &Path, image: &image::GrayImage, chunks: &[TextChunk]) -> Result<()> {
    write_pixels_atomic(path, image.width(), image.height(), Pixels::Gray8(image.as_raw()), chunks)
}

/// Writes an 8- or 16-bit RGB or RGBA image with text chunks atomically (edits of a deep or
/// translucent source keep its depth and alpha); other colour types are written as RGB8.
pub fn write_dynamic_png_atomic(path: &Path, image: &DynamicImage, chunks: &[TextChunk]) -> Result<()> {
    let (w, h) = (image.width(), image.height());
    match image {
        DynamicImage::ImageRgba8(img) => write_pixels_atomic(path, w, h, Pixels::Rgba8(img.as_raw()), chunks),
        DynamicImage::ImageRgb16(img) => write_pixels_atomic(path, w, h, Pixels::Rgb16(img.as_raw()), chunks),
        DynamicImage::ImageRgba16(img) => {
            write_pixels_atomic(path, w, h, Pixels::Rgba16(img.as_raw()), chunks)
        }
        DynamicImage::ImageRgb8(img) => write_png_atomic(path, img, chunks),
        other => write_png_atomic(path, &other.to_rgb8(), chunks),
    }
}

enum Pixels<'a> {
    Rgb8(&'a [u8]),
    Rgba8(&'a [u8]),
    /// RGBA written with the fast deflate, as upscales are: a batch of cutouts is otherwise a
    /// fifth PNG compression, for files about a tenth larger.
    Rgba8Fast(&'a [u8]),
    Gray8(&'a [u8]),
    Rgb16(&'a [u16]),
    Rgba16(&'a [u16]),
}

fn write_pixels_atomic(
    path: &Path,
    width: u32,
    height: u32,
    pixels: Pixels,
    chunks: &[TextChunk],
) -> Result<()> {
    let bad = |msg: String| Error::Image { path: path.to_path_buf(), msg };
    crate::files::guard_target(path)?;
    // Encoded in memory first, then written with the one atomic writer (flush, sync, length
    // check, rename): an encoder error or a full disk never reaches the final path.
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, width, height);
        let (color, depth) = match pixels {
            Pixels::Rgb8(_) => (png::ColorType::Rgb, png::BitDepth::Eight),
            Pixels::Rgba8(_) | Pixels::Rgba8Fast(_) => (png::ColorType::Rgba, png::BitDepth::Eight),
            Pixels::Gray8(_) => (png::ColorType::Grayscale, png::BitDepth::Eight),
            Pixels::Rgb16(_) => (png::ColorType::Rgb, png::BitDepth::Sixteen),
            Pixels::Rgba16(_) => (png::ColorType::Rgba, png::BitDepth::Sixteen),
        };
        encoder.set_color(color);
        encoder.set_depth(depth);
        if matches!(pixels, Pixels::Rgba8Fast(_) | Pixels::Gray8(_)) {
            encoder.set_compression(png::Compression::Fast);
        }
        for chunk in chunks {
            // Latin-1 text goes in tEXt (what A1111 and most readers expect), anything else in iTXt.
            let res = if chunk.text.chars().all(|c| (c as u32) < 256) && chunk.text.is_ascii() {
                encoder.add_text_chunk(chunk.keyword.clone(), chunk.text.clone())
            } else {
                encoder.add_itxt_chunk(chunk.keyword.clone(), chunk.text.clone())
            };
            res.map_err(|e| bad(format!("text chunk `{}`: {e}", chunk.keyword)))?;
        }
        let mut writer = encoder.write_header().map_err(|e| bad(e.to_string()))?;
        // PNG stores 16-bit samples big-endian.
        let data: std::borrow::Cow<[u8]> = match pixels {
            Pixels::Rgb8(p) | Pixels::Rgba8(p) | Pixels::Rgba8Fast(p) | Pixels::Gray8(p) => p.into(),
            Pixels::Rgb16(p) | Pixels::Rgba16(p) => p.iter().flat_map(|v| v.to_be_bytes()).collect(),
        };
        writer.write_image_data(&data).map_err(|e| bad(e.to_string()))?;
        writer.finish().map_err(|e| bad(e.to_string()))?;
    }
    crate::files::write_atomic(path, &png_bytes)
}

/// Reads every text chunk (tEXt, zTXt, iTXt) of a PNG.
pub fn read_png_text(path: &Path) -> Result<Vec<TextChunk>> {
    let file = fs_err::File::open(path)?;
    read_png_text_from(std::io::BufReader::new(file), path)
}

/// [`read_png_text`] from any reader (bytes in memory); `path` names the source in errors.
pub fn read_png_text_from<R: std::io::BufRead + std::io::Seek>(
    reader: R,
    path: &Path,
) -> Result<Vec<TextChunk>> {
    let bad = |msg: String| Error::Image { path: path.to_path_buf(), msg };
    let decoder = png::Decoder::new(reader);
    let reader = decoder.read_info().map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let mut out = Vec::new();
    for c in &info.uncompressed_latin1_text {
        out.push(TextChunk::new(c.keyword.clone(), c.text.clone()));
    }
    for c in &info.compressed_latin1_text {
        let mut c = c.clone();
        c.decompress_text().map_err(|e| bad(e.to_string()))?;
        out.push(TextChunk::new(c.keyword.clone(), c.get_text().map_err(|e| bad(e.to_string()))?));
    }
    for c in &info.utf8_text {
        out.push(TextChunk::new(c.keyword.clone(), c.get_text().map_err(|e| bad(e.to_string()))?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_round_trip_and_write_is_atomic() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/out.png");
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let chunks = vec![
            TextChunk::new("parameters", "a cat\nNegative prompt: dog\nSteps: 4"),
            TextChunk::new("kiln", "{\"prompt\":\"caf\u{e9} \u{1F525}\"}"),
        ];
        write_png_atomic(&path, &img, &chunks)?;
        let read = read_png_text(&path)?;
        assert_eq!(read, chunks);
        let back = image::open(&path).map_err(|e| Error::Unsupported(e.to_string()))?.to_rgb8();
        assert_eq!(back, img);
        // No temp files left behind.
        let leftovers: Vec<_> = fs_err::read_dir(path.parent().unwrap_or(dir.path()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .collect();
        assert!(leftovers.is_empty());
        Ok(())
    }
}
