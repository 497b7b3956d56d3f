//! Tile planning and blending: pure, backend-free, shared by super-resolution and the VAE.
//!
//! An image of `width x height` is cut into an even grid (`n = ceil(len / max_tile)`,
//! `tile = ceil(len / n)`). Each tile's *core* is the part of the output it owns; its
//! *window* is the core grown by `halo` pixels towards its neighbours and by `border` pixels
//! past the image edges, where pixels are mirrored ([`mirror`]). With `feather == 0` each tile's output is cropped to
//! its core, which is exact when `halo` covers the network's receptive radius. With
//! `feather > 0` neighbouring tiles overlap by `feather` input pixels around each boundary and
//! are cross-faded with raised-cosine weights that sum to one ([`Axis::weight`]).
//!
//! [`StripAssembler`] accumulates one row of tiles at a time and hands back finished output
//! rows, so memory follows the width of the image, never its height. The blend itself is
//! `kiln_kernels::blend` (CPU reference here; a CUDA kernel for device-side strips).

use std::ops::Range;

use crate::error::{Error, Result};
use kiln_kernels::blend::{blend_tile_slice, BlendRegion};

/// Reflect-101 index: maps any integer coordinate into `[0, len)` by mirroring about the
/// edge pixels (`-1 -> 1`, `len -> len - 2`), repeating for coordinates far outside.
pub fn mirror(i: isize, len: usize) -> usize {
    if len <= 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let m = i.rem_euclid(period);
    (if m < len as isize { m } else { period - m }) as usize
}

/// Even split of `[0, len)` into segments of at most `max_tile` (rounded up to `multiple`).
pub fn even_split(len: usize, max_tile: usize, multiple: usize) -> Vec<Range<usize>> {
    let multiple = multiple.max(1);
    let max_tile = max_tile.max(multiple);
    if len == 0 {
        return vec![];
    }
    let n = len.div_ceil(max_tile);
    let tile = len.div_ceil(n).div_ceil(multiple) * multiple;
    (0..n).map(|k| (k * tile).min(len)..((k + 1) * tile).min(len)).filter(|r| !r.is_empty()).collect()
}

/// Tiling along one axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// Input length.
    pub len: usize,
    /// Cores: disjoint, covering `[0, len)`.
    pub cores: Vec<Range<usize>>,
    /// Context around each core towards neighbouring tiles, in input pixels.
    pub halo: usize,
    /// Mirrored context past the image edges, in input pixels.
    pub border: usize,
    /// Width of the cross-fade around each interior boundary, in input pixels (0 = hard crop).
    pub feather: usize,
    /// Window lengths are rounded up to a multiple of this (e.g. pixel-unshuffle nets).
    pub multiple: usize,
}

impl Axis {
    pub fn new(
        len: usize,
        max_tile: usize,
        halo: usize,
        border: usize,
        feather: usize,
        multiple: usize,
    ) -> Result<Self> {
        if len == 0 {
            return Err(Error::arg("image", "zero-sized image"));
        }
        if feather > 2 * halo {
            return Err(Error::arg(
                "feather",
                format!("{feather} px needs a halo of at least {}", feather.div_ceil(2)),
            ));
        }
        let multiple = multiple.max(1);
        let halo = halo.div_ceil(multiple) * multiple;
        let border = border.div_ceil(multiple) * multiple;
        Ok(Self { len, cores: even_split(len, max_tile, multiple), halo, border, feather, multiple })
    }

    /// Input window of tile `k`: core + halo towards neighbours, + border at the image
    /// edges, end rounded so the length is a multiple. Coordinates outside `[0, len)` are read
    /// through [`mirror`].
    pub fn window(&self, k: usize) -> Range<isize> {
        let core = &self.cores[k];
        let before = if k == 0 { self.border } else { self.halo };
        let after = if k + 1 == self.cores.len() { self.border } else { self.halo };
        let start = core.start as isize - before as isize;
        let len = (core.len() + before + after).div_ceil(self.multiple) * self.multiple;
        start..start + len as isize
    }

    /// The longest window (all windows fit a tensor of this size).
    pub fn max_window(&self) -> usize {
        (0..self.cores.len()).map(|k| self.window(k).len()).max().unwrap_or(0)
    }

    /// Output range (at `scale`) that tile `k` contributes to: its core grown by half the
    /// feather at interior boundaries.
    pub fn used(&self, k: usize, scale: usize) -> Range<usize> {
        let core = &self.cores[k];
        let (lo, hi) = self.fade(scale);
        let start = if k == 0 { 0 } else { core.start * scale - lo };
        let end = if k + 1 == self.cores.len() { self.len * scale } else { core.end * scale + hi };
        start..end
    }

    /// Output pixels on each side of a boundary that are cross-faded.
    fn fade(&self, scale: usize) -> (usize, usize) {
        let f = self.feather * scale;
        (f / 2, f - f / 2)
    }

    /// Weight of tile `k` at output coordinate `x` (at `scale`); the weights of all tiles
    /// sum to 1 at every `x`. Raised cosine over `feather * scale` pixels per boundary.
    pub fn weight(&self, k: usize, x: usize, scale: usize) -> f32 {
        let used = self.used(k, scale);
        if !used.contains(&x) {
            return 0.0;
        }
        let f = self.feather * scale;
        if f == 0 {
            return 1.0;
        }
        let (lo, _) = self.fade(scale);
        let ramp = |boundary: usize| -> f32 {
            // Fraction of the way through the fade that starts at boundary - lo.
            let t = (x as f64 + 0.5 - (boundary as f64 - lo as f64)) / f as f64;
            if t <= 0.0 {
                0.0
            } else if t >= 1.0 {
                1.0
            } else {
                (0.5 - 0.5 * (std::f64::consts::PI * t).cos()) as f32
            }
        };
        let mut w = 1.0;
        if k > 0 {
            w *= ramp(self.cores[k].start * scale);
        }
        if k + 1 < self.cores.len() {
            w *= 1.0 - ramp(self.cores[k].end * scale);
        }
        w
    }
}

/// A 2-D tile plan: rows x columns.
#[derive(Debug, Clone, PartialEq)]
pub struct TilePlan {
    pub x: Axis,
    pub y: Axis,
}

/// How to tile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileOptions {
    pub max_tile: usize,
    /// Largest tile height (bounds the output strip held by [`StripAssembler`]).
    pub max_tile_rows: usize,
    pub halo: usize,
    pub border: usize,
    pub feather: usize,
    pub multiple: usize,
}

impl TilePlan {
    pub fn new(width: usize, height: usize, o: TileOptions) -> Result<Self> {
        Ok(Self {
            x: Axis::new(width, o.max_tile, o.halo, o.border, o.feather, o.multiple)?,
            y: Axis::new(height, o.max_tile_rows.min(o.max_tile), o.halo, o.border, o.feather, o.multiple)?,
        })
    }

    pub fn tile_count(&self) -> usize {
        self.x.cores.len() * self.y.cores.len()
    }
}

/// Copies the mirrored window `rows x cols` of a planar image (`channels` planes of
/// `width * height`) into `dst` (planar, `channels * rows.len() * cols.len()`).
pub fn extract_window(
    src: &[f32],
    width: usize,
    height: usize,
    channels: usize,
    rows: Range<isize>,
    cols: Range<isize>,
    dst: &mut Vec<f32>,
) -> Result<()> {
    if src.len() != width * height * channels {
        return Err(Error::arg(
            "image",
            format!("buffer of {} values for {width}x{height}x{channels}", src.len()),
        ));
    }
    let xs: Vec<usize> = cols.map(|x| mirror(x, width)).collect();
    dst.clear();
    dst.reserve(channels * rows.len() * xs.len());
    for c in 0..channels {
        let plane = &src[c * width * height..(c + 1) * width * height];
        for y in rows.clone() {
            let row = &plane[mirror(y, height) * width..][..width];
            dst.extend(xs.iter().map(|&x| row[x]));
        }
    }
    Ok(())
}

/// A tile's output ready to blend: planar `channels x rows x cols`, covering output
/// rows/cols starting at `origin` (which may be negative: windows reach outside the image).
pub struct TileOutput<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub origin: (isize, isize),
}

/// Accumulates blended tiles one tile-row at a time and releases finished output rows.
pub struct StripAssembler {
    plan: TilePlan,
    scale: usize,
    channels: usize,
    out_width: usize,
    /// First output row held in `acc`.
    top: usize,
    /// Interleaved (HWC) accumulation rows `[top, top + acc.len() / row_len)`.
    acc: Vec<f32>,
    x_weights: Vec<Vec<f32>>,
}

impl StripAssembler {
    pub fn new(plan: TilePlan, scale: usize, channels: usize) -> Self {
        let out_width = plan.x.len * scale;
        let x_weights = (0..plan.x.cores.len())
            .map(|k| plan.x.used(k, scale).map(|x| plan.x.weight(k, x, scale)).collect())
            .collect();
        Self { plan, scale, channels, out_width, top: 0, acc: vec![], x_weights }
    }

    pub fn plan(&self) -> &TilePlan {
        &self.plan
    }

    pub fn out_width(&self) -> usize {
        self.out_width
    }

    pub fn out_height(&self) -> usize {
        self.plan.y.len * self.scale
    }

    /// Adds tile (`row`, `col`) of the plan.
    pub fn add(&mut self, row: usize, col: usize, tile: &TileOutput) -> Result<()> {
        let (used_y, used_x) = (self.plan.y.used(row, self.scale), self.plan.x.used(col, self.scale));
        let row_len = self.out_width * self.channels;
        if used_y.start < self.top {
            return Err(Error::arg("tile", format!("tile row {row} reaches rows already released")));
        }
        let needed = (used_y.end - self.top) * row_len;
        if self.acc.len() < needed {
            self.acc.resize(needed, 0.0);
        }
        let (oy, ox) = tile.origin;
        let plane = tile.rows * tile.cols;
        if tile.data.len() < plane * self.channels {
            return Err(Error::arg("tile", "tile output smaller than declared"));
        }
        let local = |v: usize, origin: isize, len: usize| -> Result<usize> {
            let l = v as isize - origin;
            if l < 0 || l as usize >= len {
                return Err(Error::arg(
                    "tile",
                    "tile output does not cover its used region (halo too small)",
                ));
            }
            Ok(l as usize)
        };
        let x0 = local(used_x.start, ox, tile.cols)?;
        local(used_x.end - 1, ox, tile.cols)?;
        let y0 = local(used_y.start, oy, tile.rows)?;
        local(used_y.end - 1, oy, tile.rows)?;
        let wy: Vec<f32> = used_y.clone().map(|y| self.plan.y.weight(row, y, self.scale)).collect();
        let region = BlendRegion {
            strip_row: used_y.start - self.top,
            strip_col: used_x.start,
            tile_row: y0,
            tile_col: x0,
            rows: used_y.len(),
            cols: used_x.len(),
        };
        // The kernel's CPU reference; a GPU strip would run the same op on device tensors.
        blend_tile_slice(
            &mut self.acc[..needed],
            self.out_width,
            self.channels,
            &tile.data[..plane * self.channels],
            tile.rows,
            tile.cols,
            region,
            &wy,
            &self.x_weights[col],
        )
        .map_err(|e| Error::arg("tile", e.to_string()))
    }

    /// After all tiles of tile-row `row` were added: returns the output rows that are now
    /// final (interleaved HWC, `rows x out_width x channels`) and forgets them.
    pub fn finish_row(&mut self, row: usize) -> Vec<f32> {
        let row_len = self.out_width * self.channels;
        let final_end = if row + 1 == self.plan.y.cores.len() {
            self.out_height()
        } else {
            self.plan.y.used(row + 1, self.scale).start
        };
        let n = final_end.saturating_sub(self.top);
        let n_vals = (n * row_len).min(self.acc.len());
        let rest = self.acc.split_off(n_vals);
        let done = std::mem::replace(&mut self.acc, rest);
        self.top += n;
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_reflects_without_repeating_edges() {
        let got: Vec<usize> = (-4..8).map(|i| mirror(i, 4)).collect();
        assert_eq!(got, vec![2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]);
        assert_eq!(mirror(-5, 1), 0);
    }

    #[test]
    fn even_split_matches_the_issue_formula() {
        // n = ceil(1000 / 256) = 4, tile = ceil(1000 / 4) = 250.
        assert_eq!(even_split(1000, 256, 1), vec![0..250, 250..500, 500..750, 750..1000]);
        assert_eq!(even_split(7, 4, 2), vec![0..4, 4..7]);
        assert_eq!(even_split(5, 100, 1), vec![0..5]);
    }

    #[test]
    fn weights_sum_to_one_everywhere() {
        for &(len, tile, feather, scale) in &[(100, 30, 8, 4), (57, 20, 0, 2), (64, 16, 9, 3), (40, 40, 8, 1)]
        {
            let axis = Axis::new(len, tile, 8, 3, feather, 1).expect("axis");
            for x in 0..len * scale {
                let s: f32 = (0..axis.cores.len()).map(|k| axis.weight(k, x, scale)).sum();
                assert!((s - 1.0).abs() < 1e-6, "len {len} x {x}: {s}");
            }
        }
    }

    #[test]
    fn used_region_stays_inside_the_window() {
        let axis = Axis::new(300, 64, 16, 5, 32, 2).expect("axis");
        for k in 0..axis.cores.len() {
            let w = axis.window(k);
            let u = axis.used(k, 4);
            assert!(w.start * 4 <= u.start as isize && u.end as isize <= w.end * 4);
            assert_eq!(w.len() % 2, 0);
        }
        assert!(Axis::new(10, 4, 3, 3, 7, 1).is_err());
    }
}
