//! Contact sheets: a grid of thumbnails, each labelled with its index and seed, so a director
//! can pick a draft by number.

use super::font::{draw_text, fill_rect, text_width, GLYPH_H};
use crate::error::{Error, Result};
use image::{Rgb, RgbImage};

const GAP: u32 = 4;
const PAD: u32 = 3;
const BACKGROUND: Rgb<u8> = Rgb([24, 24, 24]);
const INK: Rgb<u8> = Rgb([240, 240, 240]);

/// One cell: an image and its label lines (e.g. ["#3", "seed 1234"]).
pub struct SheetCell<'a> {
    pub image: &'a RgbImage,
    pub lines: Vec<String>,
}

/// Lays the cells out in a near-square grid. Thumbnails are shrunk to fit `max_thumb` pixels
/// per side (never enlarged); labels are drawn under each thumbnail, larger for larger thumbs.
pub fn contact_sheet(cells: &[SheetCell], max_thumb: u32) -> Result<RgbImage> {
    if cells.is_empty() {
        return Err(Error::arg("contact sheet", "no images"));
    }
    let (w0, h0) = cells[0].image.dimensions();
    if w0 == 0 || h0 == 0 {
        return Err(Error::arg("contact sheet", "empty image"));
    }
    let shrink = (max_thumb.max(8) as f64 / w0.max(h0) as f64).min(1.0);
    let (tw, th) = (((w0 as f64 * shrink) as u32).max(1), ((h0 as f64 * shrink) as u32).max(1));
    let scale = (tw / 128).clamp(1, 4);
    let lines = cells.iter().map(|c| c.lines.len()).max().unwrap_or(0) as u32;
    let line_h = (GLYPH_H + 2) * scale;
    let label_h = lines * line_h + 2 * PAD;
    let widest =
        cells.iter().flat_map(|c| c.lines.iter()).map(|l| text_width(l, scale) + 2 * PAD).max().unwrap_or(0);
    let cell_w = tw.max(widest);
    let cell_h = th + label_h;
    let cols = (cells.len() as f64).sqrt().ceil().max(1.0) as u32;
    let rows = (cells.len() as u32).div_ceil(cols);
    let (sw, sh) = (GAP + cols * (cell_w + GAP), GAP + rows * (cell_h + GAP));
    crate::image::check_size(sw, sh).map_err(|m| Error::arg("contact sheet", m))?;
    let mut sheet = RgbImage::from_pixel(sw, sh, BACKGROUND);
    for (i, cell) in cells.iter().enumerate() {
        let (col, row) = (i as u32 % cols, i as u32 / cols);
        let (x, y) = (GAP + col * (cell_w + GAP), GAP + row * (cell_h + GAP));
        let thumb = crate::image::resize_rgb(cell.image, tw, th);
        image::imageops::replace(&mut sheet, &thumb, (x + (cell_w - tw) / 2) as i64, y as i64);
        fill_rect(&mut sheet, x, y + th, cell_w, label_h, Rgb([40, 40, 40]));
        for (k, line) in cell.lines.iter().enumerate() {
            draw_text(&mut sheet, x + PAD, y + th + PAD + k as u32 * line_h, line, scale, INK);
        }
    }
    Ok(sheet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_layout_and_labels() -> Result<()> {
        let imgs: Vec<RgbImage> =
            (0..5u8).map(|i| RgbImage::from_pixel(64, 48, Rgb([i * 50, 0, 0]))).collect();
        let cells: Vec<SheetCell> = imgs
            .iter()
            .enumerate()
            .map(|(i, im)| SheetCell { image: im, lines: vec![format!("#{i}"), format!("seed {}", 100 + i)] })
            .collect();
        let sheet = contact_sheet(&cells, 256)?;
        // 5 cells → 3 columns × 2 rows; "seed 104" is 47 px wide + padding < 64, so cells are 64 wide.
        let label_h = 2 * 9 + 2 * PAD;
        assert_eq!(sheet.dimensions(), (GAP + 3 * (64 + GAP), GAP + 2 * (48 + label_h + GAP)));
        // Cell 4 (row 1, col 1) shows its image's colour.
        let (x, y) = (GAP + (64 + GAP) + 10, GAP + (48 + label_h + GAP) + 10);
        assert_eq!(sheet.get_pixel(x, y), &Rgb([200, 0, 0]));
        // The label area under cell 0 has ink.
        let inked = (0..64)
            .flat_map(|dx| (0..label_h).map(move |dy| (GAP + dx, GAP + 48 + dy)))
            .any(|(x, y)| sheet.get_pixel(x, y) == &INK);
        assert!(inked);
        Ok(())
    }
}
