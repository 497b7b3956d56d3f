//! Hallucination QC of an upscaled image against its source: a per-tile consistency map.
//!
//! Two figures per tile of the output, both in 8-bit levels (0–255):
//! - **back-projection error** (`bp`): the output taken back down to the source's size (Lanczos3)
//!   against the source, mean absolute difference over the tile's footprint. A faithful upscale
//!   reproduces its source when shrunk; pasted or moved content does not.
//! - **added high-frequency energy** (`hf`): the part of an image that its source's resolution
//!   cannot hold — `X - up(down(X))` — as an RMS over the tile, for the output minus the same for a
//!   plain Lanczos3 enlargement of the source. Invented micro-texture lives exactly there and
//!   vanishes when shrunk, so back-projection alone cannot see it.
//!
//! A tile is **flagged** when `bp > bp_threshold` or `hf > hf_threshold` ([`QcOptions`]; both 8
//! levels by default: a Lanczos round trip stays under 1 level of `bp` on smooth content and up to
//! about 4 at hard edges, where clipping of the ringing keeps it from inverting exactly, with
//! `hf` near 0; invented texture or a pasted object scores tens).

use super::sheet::{contact_sheet, SheetCell};
use crate::error::{Error, Result};
use image::imageops::{self, FilterType};
use image::{Rgb, RgbImage};

/// How QC tiles and judges.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QcOptions {
    /// Tile side in output pixels.
    pub tile_px: u32,
    /// Largest mean |down(output) - source| of a passing tile, in levels.
    pub bp_threshold: f64,
    /// Largest added high-frequency RMS of a passing tile, in levels.
    pub hf_threshold: f64,
    /// Tiles on the contact sheet (worst first).
    pub sheet_tiles: usize,
}

impl Default for QcOptions {
    fn default() -> Self {
        Self { tile_px: 128, bp_threshold: 8.0, hf_threshold: 8.0, sheet_tiles: 8 }
    }
}

/// One tile's figures and verdict.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TileQc {
    /// Position and size in output pixels.
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub bp: f64,
    pub hf: f64,
    pub flagged: bool,
}

impl TileQc {
    /// The larger of the two figures relative to its threshold (> 1 = flagged).
    pub fn severity(&self, o: &QcOptions) -> f64 {
        (self.bp / o.bp_threshold).max(self.hf / o.hf_threshold)
    }
}

/// The whole report (what the library stores on the asset).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QcReport {
    pub options: QcOptions,
    pub source_size: (u32, u32),
    pub output_size: (u32, u32),
    pub columns: u32,
    pub rows: u32,
    /// Row-major.
    pub tiles: Vec<TileQc>,
    pub flagged: usize,
    /// "pass" when no tile is flagged, else "flag".
    pub verdict: String,
}

/// Largest aspect mismatch between source and output (resampling rounds sides to whole pixels).
const ASPECT_SLACK: f64 = 0.02;

/// Checks that `output` is an enlargement of `source` at one scale on both axes.
fn check_sizes(source: &RgbImage, output: &RgbImage, o: &QcOptions) -> Result<()> {
    let (sw, sh) = source.dimensions();
    let (ow, oh) = output.dimensions();
    if sw == 0 || sh == 0 || ow == 0 || oh == 0 {
        return Err(Error::arg("source", "an image has no pixels"));
    }
    if ow < sw || oh < sh {
        return Err(Error::arg(
            "source",
            format!("the output ({ow}x{oh}) is smaller than the source ({sw}x{sh}); pass the image it was upscaled from"),
        ));
    }
    let (fx, fy) = (ow as f64 / sw as f64, oh as f64 / sh as f64);
    if (fx - fy).abs() / fx.max(fy) > ASPECT_SLACK {
        return Err(Error::arg(
            "source",
            format!(
                "{sw}x{sh} is not the source of {ow}x{oh}: the scales differ ({fx:.3} across, {fy:.3} down); pass the image it was upscaled from"
            ),
        ));
    }
    if o.tile_px < 8 || o.tile_px > 4096 {
        return Err(Error::arg("tile", format!("{} px is outside 8..=4096", o.tile_px)));
    }
    if !(o.bp_threshold > 0.0 && o.hf_threshold > 0.0) {
        return Err(Error::arg("threshold", "thresholds must be positive"));
    }
    Ok(())
}

/// Per-pixel high-band magnitude² summed over channels: `X - up(down(X))`.
fn high_band(x: &RgbImage, sw: u32, sh: u32, down: Option<&RgbImage>) -> Vec<f32> {
    let owned;
    let down = match down {
        Some(d) => d,
        None => {
            owned = imageops::resize(x, sw, sh, FilterType::Lanczos3);
            &owned
        }
    };
    let back = imageops::resize(down, x.width(), x.height(), FilterType::Lanczos3);
    x.pixels()
        .zip(back.pixels())
        .map(|(a, b)| (0..3).map(|c| (a[c] as f32 - b[c] as f32).powi(2)).sum::<f32>() / 3.0)
        .collect()
}

/// Runs QC of `output` against `source`.
pub fn check(source: &RgbImage, output: &RgbImage, o: &QcOptions) -> Result<QcReport> {
    check_sizes(source, output, o)?;
    let (sw, sh) = source.dimensions();
    let (ow, oh) = output.dimensions();
    let down = imageops::resize(output, sw, sh, FilterType::Lanczos3);
    let lanczos = imageops::resize(source, ow, oh, FilterType::Lanczos3);
    let hf_out = high_band(output, sw, sh, Some(&down));
    let hf_ref = high_band(&lanczos, sw, sh, None);
    drop(lanczos);
    let (fx, fy) = (sw as f64 / ow as f64, sh as f64 / oh as f64);
    let (columns, rows) = (ow.div_ceil(o.tile_px), oh.div_ceil(o.tile_px));
    let mut tiles = Vec::with_capacity((columns * rows) as usize);
    for ty in 0..rows {
        for tx in 0..columns {
            let (x0, y0) = (tx * o.tile_px, ty * o.tile_px);
            let (x1, y1) = ((x0 + o.tile_px).min(ow), (y0 + o.tile_px).min(oh));
            let (mut e_out, mut e_ref) = (0f64, 0f64);
            for y in y0..y1 {
                let row = (y * ow) as usize;
                for x in x0..x1 {
                    e_out += hf_out[row + x as usize] as f64;
                    e_ref += hf_ref[row + x as usize] as f64;
                }
            }
            let n = ((x1 - x0) * (y1 - y0)) as f64;
            let hf = (e_out / n).sqrt() - (e_ref / n).sqrt();
            // The tile's footprint on the source: every source pixel whose centre falls inside.
            let sx = |x: u32| ((x as f64 * fx).round() as u32).min(sw);
            let sy = |y: u32| ((y as f64 * fy).round() as u32).min(sh);
            let (sx0, sx1, sy0, sy1) =
                (sx(x0), sx(x1).max(sx(x0) + 1).min(sw), sy(y0), sy(y1).max(sy(y0) + 1).min(sh));
            let (mut err, mut m) = (0f64, 0usize);
            for y in sy0..sy1 {
                for x in sx0..sx1 {
                    let (a, b) = (down.get_pixel(x, y), source.get_pixel(x, y));
                    err += (0..3).map(|c| (a[c] as f64 - b[c] as f64).abs()).sum::<f64>() / 3.0;
                    m += 1;
                }
            }
            let bp = if m > 0 { err / m as f64 } else { 0.0 };
            let flagged = bp > o.bp_threshold || hf > o.hf_threshold;
            tiles.push(TileQc { x: x0, y: y0, width: x1 - x0, height: y1 - y0, bp, hf, flagged });
        }
    }
    let flagged = tiles.iter().filter(|t| t.flagged).count();
    Ok(QcReport {
        options: *o,
        source_size: (sw, sh),
        output_size: (ow, oh),
        columns,
        rows,
        tiles,
        flagged,
        verdict: if flagged == 0 { "pass" } else { "flag" }.into(),
    })
}

/// Green (0) → yellow (threshold) → red (2× threshold and beyond).
fn heat(severity: f64) -> [f64; 3] {
    let t = (severity / 2.0).clamp(0.0, 1.0);
    if t < 0.5 {
        [510.0 * t, 200.0, 40.0]
    } else {
        [255.0, 200.0 * (2.0 - 2.0 * t), 40.0]
    }
}

/// The heatmap at the source's size: each tile's severity colour over a grey copy of the source,
/// flagged tiles outlined.
pub fn heatmap(source: &RgbImage, report: &QcReport) -> RgbImage {
    let (sw, sh) = source.dimensions();
    let (ow, oh) = report.output_size;
    let mut out = RgbImage::new(sw, sh);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (ox, oy) = ((x as u64 * ow as u64 / sw as u64) as u32, (y as u64 * oh as u64 / sh as u64) as u32);
        let (tx, ty) = (ox / report.options.tile_px, oy / report.options.tile_px);
        let Some(tile) = report.tiles.get((ty * report.columns + tx) as usize) else { continue };
        let s = source.get_pixel(x, y);
        let grey = (s[0] as f64 * 0.299 + s[1] as f64 * 0.587 + s[2] as f64 * 0.114) * 0.5;
        let c = heat(tile.severity(&report.options));
        let edge = {
            let sx = |v: u32| (v as u64 * sw as u64 / ow as u64) as u32;
            let sy = |v: u32| (v as u64 * sh as u64 / oh as u64) as u32;
            x == sx(tile.x)
                || y == sy(tile.y)
                || x + 1 == sx(tile.x + tile.width)
                || y + 1 == sy(tile.y + tile.height)
        };
        *p = if tile.flagged && edge {
            Rgb([255, 0, 255])
        } else {
            Rgb([0, 1, 2].map(|i| (grey + 0.5 * c[i]).min(255.0) as u8))
        };
    }
    out
}

/// The worst tiles (flagged first, by severity) cropped from the output at 100%, on one sheet.
pub fn worst_tiles_sheet(output: &RgbImage, report: &QcReport) -> Result<RgbImage> {
    let o = &report.options;
    let mut order: Vec<&TileQc> = report.tiles.iter().collect();
    order.sort_by(|a, b| b.severity(o).total_cmp(&a.severity(o)));
    order.truncate(o.sheet_tiles.max(1));
    // Full tiles only have one size; edge tiles are padded to it so the sheet keeps 100%.
    let side = o.tile_px.min(output.width()).min(output.height());
    let crops: Vec<RgbImage> = order
        .iter()
        .map(|t| {
            let (w, h) = (t.width.min(side), t.height.min(side));
            let mut cell = RgbImage::from_pixel(side, side, Rgb([24, 24, 24]));
            imageops::replace(&mut cell, &imageops::crop_imm(output, t.x, t.y, w, h).to_image(), 0, 0);
            cell
        })
        .collect();
    let cells: Vec<SheetCell> = order
        .iter()
        .zip(&crops)
        .map(|(t, img)| SheetCell {
            image: img,
            lines: vec![
                format!("{} @{},{}", if t.flagged { "FLAG" } else { "ok" }, t.x, t.y),
                format!("bp {:.1} hf {:.1}", t.bp, t.hf),
            ],
        })
        .collect();
    contact_sheet(&cells, side)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            Rgb([(255.0 * fx) as u8, (255.0 * fy) as u8, (128.0 + 100.0 * (6.0 * fx + 4.0 * fy).sin()) as u8])
        })
    }

    #[test]
    fn a_lanczos_enlargement_passes() {
        let src = scene(40, 30);
        let up = imageops::resize(&src, 160, 120, FilterType::Lanczos3);
        let report = check(&src, &up, &QcOptions { tile_px: 32, ..QcOptions::default() }).expect("qc");
        assert_eq!(report.verdict, "pass", "{report:?}");
        assert_eq!((report.columns, report.rows), (5, 4));
    }

    #[test]
    fn unrelated_sizes_are_refused() {
        let err =
            check(&scene(40, 30), &scene(160, 60), &QcOptions::default()).expect_err("must fail").to_string();
        assert!(err.contains("not the source"), "{err}");
        let err =
            check(&scene(40, 30), &scene(20, 15), &QcOptions::default()).expect_err("must fail").to_string();
        assert!(err.contains("smaller"), "{err}");
    }
}
