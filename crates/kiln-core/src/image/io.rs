//! Image decoding (PNG 8/16-bit, JPEG, WebP; alpha; EXIF orientation; size limits checked
//! from the header before any pixel buffer is allocated) and a streamed, atomic PNG writer.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::error::{Error, Result};

/// Size limits applied before decoding or encoding.
#[derive(Debug, Clone, Copy)]
pub struct SizeLimits {
    /// Most input pixels (width * height).
    pub max_input_pixels: u64,
    /// Most output pixels.
    pub max_output_pixels: u64,
    /// Longest side accepted for either.
    pub max_side: u64,
}

impl Default for SizeLimits {
    fn default() -> Self {
        // 16K x 16K input, 1 gigapixel output (well past 8K), PNG's practical side limit.
        Self { max_input_pixels: 1 << 28, max_output_pixels: 1 << 30, max_side: 1 << 20 }
    }
}

impl SizeLimits {
    pub fn check_output(&self, width: usize, height: usize, path: &Path) -> Result<()> {
        let px = width as u64 * height as u64;
        if px > self.max_output_pixels || width as u64 > self.max_side || height as u64 > self.max_side {
            return Err(image_err(
                path,
                format!(
                    "output {width}x{height} exceeds the limit of {} pixels / {} per side",
                    self.max_output_pixels, self.max_side
                ),
            ));
        }
        if width == 0 || height == 0 {
            return Err(image_err(path, format!("output size {width}x{height} is empty")));
        }
        Ok(())
    }
}

pub(crate) fn image_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Image { path: path.to_path_buf(), msg: msg.into() }
}

/// A decoded image: planar f32 in [0, 1], RGB or RGBA (grey is expanded to RGB).
#[derive(Debug, Clone)]
pub struct PlanarImage {
    pub width: usize,
    pub height: usize,
    /// 3 (RGB) or 4 (RGBA).
    pub channels: usize,
    /// `channels` planes of `width * height` values.
    pub data: Vec<f32>,
}

impl PlanarImage {
    pub fn plane(&self, c: usize) -> &[f32] {
        &self.data[c * self.width * self.height..(c + 1) * self.width * self.height]
    }

    /// True when the alpha plane exists and is not fully opaque.
    pub fn has_translucency(&self) -> bool {
        self.channels == 4 && self.plane(3).iter().any(|&a| a < 1.0)
    }
}

/// What was read from an input file besides its pixels.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub image: PlanarImage,
    /// 8 or 16.
    pub bit_depth: u8,
    pub format: image::ImageFormat,
    /// PNG text chunks (tEXt, zTXt, iTXt), in file order.
    pub text: Vec<(String, String)>,
}

/// Reads the dimensions from the header only.
pub fn probe(path: &Path) -> Result<(usize, usize)> {
    let reader = ImageReader::open(path)?.with_guessed_format()?;
    let (w, h) = reader.into_dimensions().map_err(|e| image_err(path, e.to_string()))?;
    Ok((w as usize, h as usize))
}

/// Decodes an image, applying its EXIF orientation; refuses images over `limits` before
/// allocating pixel memory.
pub fn decode(path: &Path, limits: &SizeLimits) -> Result<Decoded> {
    let reader = ImageReader::open(path)?.with_guessed_format()?;
    let format = reader
        .format()
        .ok_or_else(|| image_err(path, "unknown image format (expected PNG, JPEG or WebP)"))?;
    let mut decoder = reader.into_decoder().map_err(|e| image_err(path, e.to_string()))?;
    let (w, h) = decoder.dimensions();
    let px = u64::from(w) * u64::from(h);
    if px == 0 {
        return Err(image_err(path, format!("empty image ({w}x{h})")));
    }
    if px > limits.max_input_pixels || u64::from(w.max(h)) > limits.max_side {
        return Err(image_err(
            path,
            format!("{w}x{h} exceeds the input limit of {} pixels", limits.max_input_pixels),
        ));
    }
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(px * 16 + (64 << 20));
    decoder.set_limits(image_limits).map_err(|e| image_err(path, e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| image_err(path, e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| image_err(path, e.to_string()))?;
    img.apply_orientation(orientation);
    let text = if format == image::ImageFormat::Png { png_text(path)? } else { vec![] };
    let bit_depth = match img.color() {
        image::ColorType::L16
        | image::ColorType::La16
        | image::ColorType::Rgb16
        | image::ColorType::Rgba16 => 16,
        image::ColorType::Rgb32F | image::ColorType::Rgba32F => 16,
        _ => 8,
    };
    let has_alpha = img.color().has_alpha();
    let (width, height) = (img.width() as usize, img.height() as usize);
    let n = width * height;
    let channels = if has_alpha { 4 } else { 3 };
    let mut data = vec![0f32; n * channels];
    if has_alpha {
        let rgba = img.into_rgba32f();
        for (i, p) in rgba.pixels().enumerate() {
            for c in 0..4 {
                data[c * n + i] = p.0[c];
            }
        }
    } else {
        let rgb = img.into_rgb32f();
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * n + i] = p.0[c];
            }
        }
    }
    Ok(Decoded { image: PlanarImage { width, height, channels, data }, bit_depth, format, text })
}

/// Text chunks of a PNG file.
pub fn png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = fs_err::File::open(path)?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| image_err(path, e.to_string()))?;
    let info = reader.info();
    let mut out = Vec::new();
    for t in &info.uncompressed_latin1_text {
        out.push((t.keyword.clone(), t.text.clone()));
    }
    for t in &info.compressed_latin1_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}

/// Streams rows into a PNG that appears at its path only when complete (temp file in the
/// same folder, renamed on [`PngStreamWriter::finish`]; dropped unfinished, it is deleted).
pub struct PngStreamWriter {
    path: PathBuf,
    temp: tempfile::NamedTempFile,
    /// Bytes the encoder wrote and the first write error, checked before the file is committed.
    outcome: crate::files::WriteOutcome,
    stream: png::StreamWriter<'static, crate::files::CheckedWriter>,
    width: usize,
    height: usize,
    channels: usize,
    bit_depth: u8,
    rows_written: usize,
    row_bytes: Vec<u8>,
}

impl PngStreamWriter {
    /// `channels`: 3 or 4; `bit_depth`: 8 or 16; `text`: tEXt/iTXt chunks to write.
    pub fn create(
        path: &Path,
        width: usize,
        height: usize,
        channels: usize,
        bit_depth: u8,
        text: &[(String, String)],
    ) -> Result<Self> {
        let (Ok(w32), Ok(h32)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(image_err(path, format!("{width}x{height} is too large for PNG")));
        };
        let temp = crate::files::temp_beside(path, ".png.tmp")?;
        let file = temp.as_file().try_clone()?;
        let (writer, outcome) = crate::files::CheckedWriter::new(file);
        let mut enc = png::Encoder::new(writer, w32, h32);
        enc.set_color(match channels {
            3 => png::ColorType::Rgb,
            4 => png::ColorType::Rgba,
            c => return Err(image_err(path, format!("{c} channels (expected 3 or 4)"))),
        });
        enc.set_depth(if bit_depth == 16 { png::BitDepth::Sixteen } else { png::BitDepth::Eight });
        enc.set_compression(png::Compression::Fast);
        for (k, v) in text {
            let r = if v.is_ascii() && k.is_ascii() {
                enc.add_text_chunk(k.clone(), v.clone())
            } else {
                enc.add_itxt_chunk(k.clone(), v.clone())
            };
            r.map_err(|e| image_err(path, format!("text chunk `{k}`: {e}")))?;
        }
        let writer = enc.write_header().map_err(|e| image_err(path, e.to_string()))?;
        let stream = writer.into_stream_writer().map_err(|e| image_err(path, e.to_string()))?;
        let bit_depth = if bit_depth == 16 { 16 } else { 8 };
        Ok(Self {
            path: path.to_path_buf(),
            temp,
            outcome,
            stream,
            width,
            height,
            channels,
            bit_depth,
            rows_written: 0,
            row_bytes: Vec::with_capacity(width * channels * 2),
        })
    }

    pub fn rows_written(&self) -> usize {
        self.rows_written
    }

    /// Writes whole rows given as interleaved f32 in [0, 1] (clamped, rounded).
    pub fn write_rows(&mut self, rows: &[f32]) -> Result<()> {
        let row_len = self.width * self.channels;
        if rows.len() % row_len != 0 || self.rows_written + rows.len() / row_len > self.height {
            return Err(image_err(&self.path, "row data does not fit the image"));
        }
        for row in rows.chunks_exact(row_len) {
            self.row_bytes.clear();
            if self.bit_depth == 16 {
                for &v in row {
                    let q = (v.clamp(0.0, 1.0) * 65535.0).round() as u16;
                    self.row_bytes.extend_from_slice(&q.to_be_bytes());
                }
            } else {
                self.row_bytes.extend(row.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8));
            }
            self.stream.write_all(&self.row_bytes).map_err(|e| image_err(&self.path, e.to_string()))?;
            self.rows_written += 1;
        }
        Ok(())
    }

    /// Completes the PNG and moves it into place.
    pub fn finish(self) -> Result<()> {
        if self.rows_written != self.height {
            return Err(image_err(
                &self.path,
                format!("only {} of {} rows were written", self.rows_written, self.height),
            ));
        }
        // Finishing drops the buffered writer; its flush error (a full disk) lands in `outcome`.
        self.stream.finish().map_err(|e| image_err(&self.path, e.to_string()))?;
        let (written, error) = self.outcome.lock().map(|g| g.clone()).unwrap_or((0, Some("poisoned".into())));
        if let Some(e) = error {
            return Err(image_err(&self.path, format!("writing failed: {e}; nothing was replaced")));
        }
        crate::files::commit_temp(self.temp, &self.path, written)
    }
}

/// Writes a whole interleaved f32 image (RGB/RGBA, [0, 1]) atomically as JPEG or WebP
/// (lossless), chosen by the extension. These encoders need the full image in memory.
pub fn write_buffered(
    path: &Path,
    width: usize,
    height: usize,
    channels: usize,
    pixels: &[f32],
) -> Result<()> {
    let to_u8 = |v: &f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let bytes: Vec<u8> = pixels.iter().map(to_u8).collect();
    let (w, h) = (width as u32, height as u32);
    let img = match channels {
        3 => DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w, h, bytes).ok_or_else(|| image_err(path, "bad buffer"))?,
        ),
        4 => DynamicImage::ImageRgba8(
            image::RgbaImage::from_raw(w, h, bytes).ok_or_else(|| image_err(path, "bad buffer"))?,
        ),
        c => return Err(image_err(path, format!("{c} channels"))),
    };
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let mut buf = Vec::new();
    match ext.as_str() {
        "jpg" | "jpeg" => {
            let rgb = DynamicImage::ImageRgb8(img.into_rgb8());
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95);
            rgb.write_with_encoder(enc).map_err(|e| image_err(path, e.to_string()))?;
        }
        "webp" => {
            let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut buf);
            img.write_with_encoder(enc).map_err(|e| image_err(path, e.to_string()))?;
        }
        other => {
            return Err(image_err(path, format!("unsupported output extension `.{other}` (png, jpg, webp)")))
        }
    }
    crate::loaders::store::write_atomic(path, &buf)
}
