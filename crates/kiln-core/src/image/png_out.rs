//! Atomic PNG writes for grey (masks) and RGBA (cutouts) pixels, with text chunks; RGB goes
//! through [`super::png_meta::write_png_atomic`].

use std::io::BufWriter;
use std::path::Path;

use image::{GrayImage, RgbaImage};

use super::png_meta::TextChunk;
use crate::error::{Error, Result};

/// Writes an 8-bit grey PNG (a mask: white = subject / repaint) atomically.
pub fn write_gray_atomic(path: &Path, image: &GrayImage, chunks: &[TextChunk]) -> Result<()> {
    write_raw(path, image.width(), image.height(), png::ColorType::Grayscale, image.as_raw(), chunks)
}

/// Writes an 8-bit RGBA PNG (straight alpha) atomically.
pub fn write_rgba_atomic(path: &Path, image: &RgbaImage, chunks: &[TextChunk]) -> Result<()> {
    write_raw(path, image.width(), image.height(), png::ColorType::Rgba, image.as_raw(), chunks)
}

fn write_raw(
    path: &Path,
    width: u32,
    height: u32,
    color: png::ColorType,
    data: &[u8],
    chunks: &[TextChunk],
) -> Result<()> {
    let bad = |msg: String| Error::Image { path: path.to_path_buf(), msg };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs_err::create_dir_all(dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-")
        .suffix(".png.part")
        .tempfile_in(dir)
        .map_err(|e| bad(format!("cannot create a temp file in {}: {e}", dir.display())))?;
    {
        let mut encoder = png::Encoder::new(BufWriter::new(tmp.as_file()), width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        for c in chunks {
            let res = if c.text.is_ascii() {
                encoder.add_text_chunk(c.keyword.clone(), c.text.clone())
            } else {
                encoder.add_itxt_chunk(c.keyword.clone(), c.text.clone())
            };
            res.map_err(|e| bad(format!("text chunk `{}`: {e}", c.keyword)))?;
        }
        let mut writer = encoder.write_header().map_err(|e| bad(e.to_string()))?;
        writer.write_image_data(data).map_err(|e| bad(e.to_string()))?;
        writer.finish().map_err(|e| bad(e.to_string()))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| bad(format!("cannot move the finished file into place: {}", e.error)))?;
    Ok(())
}
