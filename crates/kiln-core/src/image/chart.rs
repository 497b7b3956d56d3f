//! A horizontal bar chart drawn with the built-in font (benchmark results), no plotting crate.

use super::font::{draw_text, fill_rect, text_width, GLYPH_H};
use image::{Rgb, RgbImage};

/// Colours of the series, in order (draft, final, ...).
pub const SERIES_COLOURS: [Rgb<u8>; 4] =
    [Rgb([66, 165, 245]), Rgb([239, 83, 80]), Rgb([102, 187, 106]), Rgb([255, 202, 40])];

/// One group of bars: a label (a stage) and one value per series.
pub struct BarGroup {
    pub label: String,
    pub values: Vec<f64>,
}

/// Draws the groups as rows of bars; each group is scaled to its own largest value (stages
/// differ by orders of magnitude), and every bar carries its value followed by `unit`.
pub fn bar_chart(title: &str, series: &[String], groups: &[BarGroup], unit: &str) -> RgbImage {
    let scale = 2;
    let line = (GLYPH_H + 3) * scale;
    let bar_h = line;
    let label_w = groups.iter().map(|g| text_width(&g.label, scale)).max().unwrap_or(0) + 16;
    let bar_w = 420;
    let value_w = 150;
    let n = series.len().max(1) as u32;
    let group_h = n * (bar_h + 4) + 12;
    let width = 16 + label_w + bar_w + value_w;
    // Legend entries flow left to right and wrap to a new line rather than run off the image.
    let mut legend = Vec::with_capacity(series.len());
    let (mut x, mut row) = (16, 0u32);
    for name in series {
        let w = 20 + text_width(name, scale);
        if x > 16 && x + w > width - 16 {
            (x, row) = (16, row + 1);
        }
        legend.push((x, row));
        x += w + 24;
    }
    let legend_rows = row + 1;
    let top = 16 + (1 + legend_rows) * line + 8;
    let height = top + groups.len() as u32 * group_h + 8;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let ink = Rgb([30, 30, 30]);
    draw_text(&mut img, 16, 12, title, scale, ink);
    for (i, (name, &(x, row))) in series.iter().zip(&legend).enumerate() {
        let y = 16 + (1 + row) * line;
        fill_rect(&mut img, x, y, 14, 14, SERIES_COLOURS[i % SERIES_COLOURS.len()]);
        draw_text(&mut img, x + 20, y, name, scale, ink);
    }
    for (gi, group) in groups.iter().enumerate() {
        let y0 = top + gi as u32 * group_h;
        draw_text(&mut img, 16, y0 + 4, &group.label, scale, ink);
        let max = group.values.iter().copied().filter(|v| v.is_finite()).fold(0.0, f64::max);
        for (si, v) in group.values.iter().enumerate() {
            let y = y0 + si as u32 * (bar_h + 4);
            let len = if max > 0.0 && v.is_finite() {
                ((v / max) * bar_w as f64).round().max(1.0) as u32
            } else {
                1
            };
            fill_rect(&mut img, 16 + label_w, y, len, bar_h, SERIES_COLOURS[si % SERIES_COLOURS.len()]);
            draw_text(&mut img, 16 + label_w + len + 6, y + 2, &format_value(*v, unit), scale, ink);
        }
    }
    img
}

fn format_value(v: f64, unit: &str) -> String {
    if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else if v >= 1.0 {
        format!("{v:.2}{unit}")
    } else {
        format!("{v:.4}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_within_a_group() {
        let groups = [BarGroup { label: "STEP".into(), values: vec![1.0, 4.0] }];
        let img = bar_chart("T", &["A".into(), "B".into()], &groups, "S");
        let pixels = |colour: Rgb<u8>| img.pixels().filter(|p| **p == colour).count();
        // Bars 420/4 = 105 and 420 px long, 20 px high, plus a 14×14 legend swatch each.
        assert_eq!(pixels(SERIES_COLOURS[0]), 105 * 20 + 196);
        assert_eq!(pixels(SERIES_COLOURS[1]), 420 * 20 + 196);
        // A legend too long for one line wraps: the third swatch sits on a second line.
        let long: Vec<String> = (0..3).map(|i| format!("SERIES {i} NAME15")).collect();
        let groups = [BarGroup { label: "X".into(), values: vec![1.0, 1.0, 1.0] }];
        let wide = bar_chart("T", &long, &groups, "S");
        let short = bar_chart("T", &["A".into(), "B".into(), "C".into()], &groups, "S");
        assert_eq!(wide.height(), short.height() + (GLYPH_H + 3) * 2);
        let swatch_rows: Vec<u32> = (0..wide.height())
            .filter(|&y| (0..wide.width()).any(|x| wide.get_pixel(x, y) == &SERIES_COLOURS[2]))
            .collect();
        assert!(swatch_rows.first().is_some_and(|&y| y >= 16 + 2 * (GLYPH_H + 3) * 2), "{swatch_rows:?}");
    }
}
