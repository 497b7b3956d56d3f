//! Tiled VAE decode and encode whose GroupNorms use **whole-image** statistics.
//!
//! Tiled decoders that normalise each tile with its own GroupNorm statistics (diffusers'
//! `enable_tiling`, ComfyUI's VAEDecodeTiled) shift tone from tile to tile. Here every tile is
//! normalised with the mean/variance of the whole image, so tiles agree with each other and with an
//! untiled decode:
//!
//! - The parts of the network that mix the whole image — the mid block with its attention — run
//!   once, untiled, at latent resolution (1/64 of the pixels): decoder `conv_in` + mid block,
//!   encoder mid block + `conv_norm_out` + `conv_out`. Beyond [`TileSpec::attention_window`] the
//!   attention itself runs over overlapping windows (its cost is quadratic in the pixels).
//! - The high-resolution part (decoder up blocks, encoder down blocks) runs tile by tile on the
//!   planner of [`crate::tiling`]: overlapping windows, raised-cosine blending of the overlaps.
//! - GroupNorm statistics, exactly: one statistics pass per norm layer k runs every tile up to
//!   norm k (normalising layers before k with the whole-image statistics already found) and merges
//!   each group's count/mean/M2 over the tile *cores* (which partition the image at every
//!   resolution, so each pixel counts once; Chan et al.'s merge). Then a last pass runs every tile
//!   through with all statistics known and blends the outputs. (A cheaper fixed-point iteration —
//!   run everything with last pass's statistics, measure again — was tried: with random weights it
//!   only becomes exact one layer per pass, so it is not used.)
//! - A pass does not rerun what the previous one did: the network part is a list of stages, and
//!   each tile's input to the stage it stopped in is kept ([`super::kept`]: memory, then scratch
//!   files) for the next pass to resume from. Every layer of every tile runs once.
//!
//! Memory: the latent-resolution activations of the whole image (the mid block's input/output)
//! plus one tile's activations plus the kept activations held in memory plus the output image.
//! Attention inside up/down blocks (rare: none in SD/SDXL's VAEs) stays per tile, as in every
//! tiled decoder.

use super::blocks::{fusable, single, Activation, Norms, Stage};
use super::kept::{Kept, KeptFigures, KeptStore};
use super::with_f32_values;
use super::{AutoencoderKl, LatentDist};
use crate::error::{Error, Result};
use crate::tiling::{StripAssembler, TileOptions, TileOutput, TilePlan};
use candle_core::{DType, Module, Tensor};
use kiln_kernels::{fastmath, GroupNorm, InputNorm};
use rayon::prelude::*;
use std::ops::Range;

/// How to tile, in latent pixels except `tile_px`.
#[derive(Debug, Clone, PartialEq)]
pub struct TileSpec {
    /// Largest tile core in image pixels (rounded down to whole latent pixels, at least 1).
    pub tile_px: usize,
    /// Context around each core towards neighbouring tiles, in latent pixels.
    pub halo: usize,
    /// Cross-fade width around each boundary, in latent pixels (at most `2 * halo`; narrowed to
    /// the smallest tile).
    pub feather: usize,
    /// Bytes of tile activations kept in memory between statistics passes; the rest go to
    /// scratch files on disk ([`super::kept`]). Changes speed and memory, never pixels.
    pub keep_bytes: u64,
    /// Folder for those scratch files; None: the data folder's `scratch/`.
    pub scratch_dir: Option<std::path::PathBuf>,
    /// Largest side, in latent pixels, over which the mid block's attention is whole-map (as in
    /// an untiled pass); larger latents attend over overlapping windows of this size. The
    /// default covers a 1024² image, where untiled decodes still fit and can be compared.
    pub attention_window: usize,
}

/// [`TileSpec::keep_bytes`]'s default: with a 512-px tile's own activations (~1.5 GB at SDXL's
/// widest full-size layer), the output image and the model, a 4096² decode stays under 3 GB.
pub const DEFAULT_KEEP_BYTES: u64 = 256 << 20;

/// [`TileSpec::attention_window`]'s default: 128 latent pixels, a 1024² SD/SDXL image (16 384
/// tokens). At a 4096² decode's 512² latent, whole-map attention would be 140 TFLOP; 16 windows
/// of 160² are 21.
pub const DEFAULT_ATTENTION_WINDOW: usize = 128;

impl Default for TileSpec {
    fn default() -> Self {
        Self {
            tile_px: 512,
            halo: 8,
            feather: 8,
            keep_bytes: DEFAULT_KEEP_BYTES,
            scratch_dir: None,
            attention_window: DEFAULT_ATTENTION_WINDOW,
        }
    }
}

/// What a tiled run did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TiledRun {
    pub tiles: usize,
    /// Passes over the tiles: one statistics pass per tiled norm layer, then the output pass.
    pub passes: usize,
    /// Stages run (or begun, when a statistics pass stops in one), over all tiles and passes: the
    /// run's cost in units of one tile stage.
    pub stage_runs: usize,
    /// Where the activations kept between passes went.
    pub kept: KeptFigures,
    /// Windows the mid block's attention ran over (1: the whole latent, as untiled).
    pub attention_windows: usize,
}

/// Running count/mean/M2 of one group (merged across tiles with Chan's formula).
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn merge(&mut self, o: Moments) {
        if o.n == 0.0 {
            return;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        self.mean += delta * o.n / n;
        self.m2 += o.m2 + delta * delta * self.n * o.n / n;
        self.n = n;
    }

    fn var(&self) -> f64 {
        if self.n > 0.0 {
            self.m2 / self.n
        } else {
            0.0
        }
    }
}

/// Per norm layer (in forward order), per group.
type LayerStats = Vec<Vec<Moments>>;

/// The [`Norms`] of one tile: normalises with the whole-image statistics found so far; at norm
/// `stop_at` it adds the tile core's moments to `acc` and stops the forward pass (`stopped`).
struct TileNorms<'a> {
    known: &'a LayerStats,
    acc: &'a mut Vec<Moments>,
    stop_at: Option<usize>,
    stopped: bool,
    next: usize,
    /// The tile core inside the window, in the window's base coordinates (`base` = window size).
    core_rows: Range<usize>,
    core_cols: Range<usize>,
    base: (usize, usize),
}

impl TileNorms<'_> {
    /// The core scaled to a feature map of `h x w` (exact: resolutions are powers of two of the base).
    fn core_at(&self, h: usize, w: usize) -> (Range<usize>, Range<usize>) {
        let (bh, bw) = self.base;
        let rows = self.core_rows.start * h / bh..self.core_rows.end * h / bh;
        let cols = self.core_cols.start * w / bw..self.core_cols.end * w / bw;
        (rows, cols)
    }

    fn measure(&self, xs: &Tensor, groups: usize) -> Result<Vec<Moments>> {
        with_f32_values(xs, |data| self.measure_values(data, xs.dims(), groups))?
    }

    fn measure_values(&self, data: &[f32], dims: &[usize], groups: usize) -> Result<Vec<Moments>> {
        let &[_, c, h, w] = dims else {
            return Err(Error::Unsupported(format!("tiled VAE: a norm's input of shape {dims:?}")));
        };
        let (rows, cols) = self.core_at(h, w);
        let per_group = c / groups;
        let mut out = vec![Moments::default(); groups];
        let row = |ch: usize, y: usize| &data[(ch * h + y) * w..][cols.clone()];
        // One group per task: at full size a tile's activation is tens of millions of values,
        // measured once per statistics pass.
        out.par_iter_mut().enumerate().for_each(|(g, m)| {
            let channels = g * per_group..(g + 1) * per_group;
            // Two passes (mean, then squared deviations): sum-of-squares minus squared sum loses
            // the variance of groups whose mean is large against their spread.
            let (mut sum, mut n) = (0f64, 0usize);
            for ch in channels.clone() {
                for y in rows.clone() {
                    let r = row(ch, y);
                    sum += fastmath::sum_f64(r);
                    n += r.len();
                }
            }
            if n == 0 {
                return;
            }
            let mean = sum / n as f64;
            let mut m2 = 0f64;
            for ch in channels {
                for y in rows.clone() {
                    m2 += fastmath::centered_square_sum_f64(row(ch, y), mean);
                }
            }
            *m = Moments { n: n as f64, mean, m2 };
        });
        Ok(out)
    }
}

impl Norms for TileNorms<'_> {
    fn apply(&mut self, norm: &GroupNorm, act: Option<Activation>, xs: &Tensor) -> Result<Tensor> {
        let idx = self.next;
        self.next += 1;
        if self.stop_at == Some(idx) {
            return Err(self.stop(norm, xs)?);
        }
        let channels = xs.dim(1)?;
        let (scale, shift) = self.affine(idx, norm, channels)?;
        let shape = (1, channels, 1, 1);
        let scale = Tensor::from_vec(scale, shape, xs.device())?.to_dtype(xs.dtype())?;
        let shift = Tensor::from_vec(shift, shape, xs.device())?.to_dtype(xs.dtype())?;
        let ys = xs.broadcast_mul(&scale)?.broadcast_add(&shift)?;
        match act {
            Some(act) => act.apply(&ys),
            None => Ok(ys),
        }
    }

    fn input_norm(
        &mut self,
        norm: &GroupNorm,
        act: Option<Activation>,
        xs: &Tensor,
    ) -> Result<Option<InputNorm>> {
        if !(fusable(act) && xs.device().is_cpu() && xs.dtype() == DType::F32) {
            return Ok(None);
        }
        let idx = self.next;
        self.next += 1;
        if self.stop_at == Some(idx) {
            return Err(self.stop(norm, xs)?);
        }
        let (batch, channels) = (xs.dim(0)?, xs.dim(1)?);
        let (scale, shift) = self.affine(idx, norm, channels)?;
        let (scale, shift) = (scale.repeat(batch), shift.repeat(batch));
        Ok(Some(InputNorm::new(scale, shift, act.is_some())?))
    }
}

impl TileNorms<'_> {
    /// Adds the tile core's moments of norm `norm`'s input to the accumulator and marks the tile
    /// stopped; returns the error that ends the tile's forward pass.
    fn stop(&mut self, norm: &GroupNorm, xs: &Tensor) -> Result<Error> {
        let groups = norm.groups();
        let tile = self.measure(xs, groups)?;
        self.acc.resize(groups, Moments::default());
        for (a, t) in self.acc.iter_mut().zip(&tile) {
            a.merge(*t);
        }
        self.stopped = true;
        // Not a failure: run_tiles sees `stopped` and skips the rest of the tile's forward pass.
        Ok(Error::Unsupported("statistics pass stop".into()))
    }

    /// Norm layer `idx` with the whole-image statistics as a per-channel `(scale, shift)`.
    fn affine(&self, idx: usize, norm: &GroupNorm, channels: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let Some(stats) = self.known.get(idx) else {
            return Err(Error::Unsupported(format!("tiled VAE: norm layer {idx} has no statistics yet")));
        };
        let per_group = channels / norm.groups().max(1);
        let gamma = norm.weight().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let beta = norm.bias().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let (mut scale, mut shift) = (Vec::with_capacity(channels), Vec::with_capacity(channels));
        for ch in 0..channels {
            let m = stats.get(ch / per_group).copied().unwrap_or_default();
            let a = gamma.get(ch).copied().unwrap_or(1.0) / (m.var() + norm.eps()).sqrt();
            scale.push(a as f32);
            shift.push((beta.get(ch).copied().unwrap_or(0.0) - m.mean * a) as f32);
        }
        Ok((scale, shift))
    }
}

/// A window of `axis`'s tile `k`, clamped to the image: the untiled network sees zero padding
/// at the image edges, and so does a tile there.
fn clamp(window: Range<isize>, len: usize) -> Range<usize> {
    window.start.max(0) as usize..(window.end.max(0) as usize).min(len)
}

/// One tile's input window (None once the input is released), its extent in plan units and its
/// core in the window's base coordinates.
struct Window {
    input: Option<Tensor>,
    ys: Range<usize>,
    xs: Range<usize>,
    core_rows: Range<usize>,
    core_cols: Range<usize>,
}

/// Runs `stages` on every tile of `plan` (windows of `input` at `in_scale` input pixels per plan
/// unit), blending outputs at `out_scale` output pixels per plan unit, for as many passes as the
/// statistics need. Between passes each tile's input to the stage it stopped in is kept
/// ([`KeptStore`], up to `spec.keep_bytes` in memory), so the next pass resumes there; once every
/// tile is kept, `input` is released (at 4096² the decoder's is half a gigabyte). Returns the
/// blended output `[1, C, H, W]` (f32) and the run's figures.
fn run_tiles(
    input: Tensor,
    plan: &TilePlan,
    scales: (usize, usize),
    out_channels: usize,
    stages: &[Stage<'_>],
    spec: &TileSpec,
    cancelled: &mut dyn FnMut() -> bool,
) -> Result<(Tensor, TiledRun)> {
    let (in_scale, out_scale) = scales;
    let mut known = LayerStats::new();
    let mut run = TiledRun { tiles: plan.tile_count(), ..TiledRun::default() };
    let mut store = KeptStore::new(spec.keep_bytes, spec.scratch_dir.clone());
    let cols = plan.x.cores.len();
    let mut kept: Vec<Option<Kept>> = (0..plan.tile_count()).map(|_| None).collect();
    let device = input.device().clone();
    let mut input = Some(input);
    let norm_count = count_norms(stages, &input, in_scale)?;
    // Window of tile (row, col), and its core in the window's base coordinates.
    let tile = |input: Option<&Tensor>, row: usize, col: usize| -> Result<Window> {
        let (ys, xs) = (clamp(plan.y.window(row), plan.y.len), clamp(plan.x.window(col), plan.x.len));
        let (cy, cx) = (&plan.y.cores[row], &plan.x.cores[col]);
        let window = match input {
            Some(input) => Some(input.narrow(2, ys.start * in_scale, ys.len() * in_scale)?.narrow(
                3,
                xs.start * in_scale,
                xs.len() * in_scale,
            )?),
            None => None,
        };
        let core_rows = (cy.start - ys.start) * in_scale..(cy.end - ys.start) * in_scale;
        let core_cols = (cx.start - xs.start) * in_scale..(cx.end - xs.start) * in_scale;
        Ok(Window { input: window, ys, xs, core_rows, core_cols })
    };
    // Statistics passes: norm k's whole-image moments, with norms before k already exact. The pass
    // whose tiles run through without meeting a new norm is the output pass: its tiles are blended.
    loop {
        // A kept tile never goes back to its input (a keep that fails leaves the earlier one).
        if kept.iter().all(Option::is_some) {
            input = None;
        }
        let stop_at = known.len();
        let mut acc = Vec::new();
        let mut assembler = StripAssembler::new(plan.clone(), out_scale, out_channels);
        let mut rows_out: Vec<f32> = Vec::new();
        let mut reached = false;
        // Statistics passes alternate their tile order (the output pass runs in order, as the
        // assembler needs): a pass then starts with the tiles the previous one kept last, whose
        // spilled activations are the likeliest still in the OS's cache (and, deleted once read,
        // may never reach the disk at all).
        let reverse = run.passes % 2 == 1 && stop_at < norm_count;
        let order: Vec<usize> =
            if reverse { (0..plan.tile_count()).rev().collect() } else { (0..plan.tile_count()).collect() };
        for (i, &t) in order.iter().enumerate() {
            let (row, col) = (t / cols, t % cols);
            // The next tile's spilled activation is read from disk while this one runs.
            if let Some(next) = order.get(i + 1).and_then(|&n| kept[n].as_ref()) {
                store.prefetch(next);
            }
            // A 4K decode on a CPU runs for many minutes: a cancelled job stops between tiles.
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let Window { input: window, ys, xs, core_rows, core_cols } = tile(input.as_ref(), row, col)?;
            let base = (ys.len() * in_scale, xs.len() * in_scale);
            let slot = &mut kept[row * cols + col];
            let (mut stage, mut acts, first_norm) = match (slot.as_mut(), window) {
                (Some(k), _) => (k.stage, store.load(k, &device)?, k.norms_before),
                (None, Some(window)) => (0, vec![window], 0),
                (None, None) => {
                    return Err(Error::Unsupported("tiled VAE: a tile's input was released".into()))
                }
            };
            let mut norms = TileNorms {
                known: &known,
                acc: &mut acc,
                stop_at: Some(stop_at),
                stopped: false,
                next: first_norm,
                core_rows,
                core_cols,
                base,
            };
            let mut stage_norms = first_norm;
            while let Some(run_stage) = stages.get(stage) {
                stage_norms = norms.next;
                run.stage_runs += 1;
                // Tiles call each conv once per tile: transforming its weights per call costs
                // nothing measurable and keeps 0.7 GB of transforms (SD/SDXL) out of memory.
                let ran = kiln_kernels::conv::without_kept_transforms(|| run_stage(&acts, &mut norms));
                match ran {
                    Ok(next) => {
                        acts = next;
                        stage += 1;
                    }
                    Err(_) if norms.stopped => break,
                    Err(e) => return Err(e),
                }
            }
            if norms.stopped {
                reached = true;
                // Keep the input of the stage this tile stopped in, unless it is kept already;
                // when it cannot be kept, the earlier one stays (the tile resumes from there).
                if stage > slot.as_ref().map_or(0, |k| k.stage) {
                    if let Some(new) = store.keep(stage, stage_norms, &acts)? {
                        if let Some(old) = slot.replace(new) {
                            store.release(old);
                        }
                    }
                }
                continue;
            }
            if reached || reverse {
                return Err(Error::Unsupported("tiled VAE: tiles disagree on their norm layers".into()));
            }
            if let Some(old) = slot.take() {
                store.release(old);
            }
            let out = single(&acts)?;
            let (_, c, h, w) = out.dims4()?;
            if c != out_channels || h != ys.len() * out_scale || w != xs.len() * out_scale {
                return Err(Error::Unsupported(format!(
                    "tiled VAE: a tile produced {c}x{h}x{w}, expected {out_channels}x{}x{}",
                    ys.len() * out_scale,
                    xs.len() * out_scale
                )));
            }
            let origin = ((ys.start * out_scale) as isize, (xs.start * out_scale) as isize);
            with_f32_values(out, |data| {
                assembler.add(row, col, &TileOutput { data, rows: h, cols: w, origin })
            })??;
            if !reached && col + 1 == cols {
                rows_out.extend(assembler.finish_row(row));
            }
        }
        run.passes += 1;
        if reached {
            known.push(acc);
            continue;
        }
        run.kept = store.figures;
        let (h, w) = (assembler.out_height(), assembler.out_width());
        let image = Tensor::from_vec(rows_out, (1, h, w, out_channels), &device)?;
        return Ok((image.permute((0, 3, 1, 2))?.contiguous()?, run));
    }
}

/// The norm layers `stages` apply, counted by a dry run on a tile of one latent pixel (a few
/// milliseconds): the statistics passes needed before the output pass.
fn count_norms(stages: &[Stage<'_>], input: &Option<Tensor>, in_scale: usize) -> Result<usize> {
    struct Counting(usize);
    impl Norms for Counting {
        fn apply(&mut self, _: &GroupNorm, _: Option<Activation>, xs: &Tensor) -> Result<Tensor> {
            self.0 += 1;
            Ok(xs.clone())
        }
    }
    let Some(input) = input else {
        return Err(Error::Unsupported("tiled VAE: no input".into()));
    };
    let probe = Tensor::zeros((1, input.dim(1)?, in_scale, in_scale), input.dtype(), input.device())?;
    let mut counting = Counting(0);
    super::blocks::run_stages(stages, &probe, &mut counting)?;
    Ok(counting.0)
}

fn plan(latent_h: usize, latent_w: usize, factor: usize, spec: &TileSpec) -> Result<TilePlan> {
    if spec.feather > 2 * spec.halo {
        return Err(Error::arg(
            "vae-tile",
            format!(
                "a feather of {} latent pixels needs a halo of at least {}",
                spec.feather,
                spec.feather.div_ceil(2)
            ),
        ));
    }
    let tile = (spec.tile_px / factor.max(1)).max(1);
    // The cross-fade reaches half its width into each neighbour: keep it inside the smallest core.
    let smallest =
        |len: usize| crate::tiling::even_split(len, tile, 1).iter().map(|r| r.len()).min().unwrap_or(1);
    let feather = spec.feather.min(smallest(latent_h)).min(smallest(latent_w));
    TilePlan::new(
        latent_w,
        latent_h,
        TileOptions { max_tile: tile, max_tile_rows: tile, halo: spec.halo, border: 0, feather, multiple: 1 },
    )
}

impl AutoencoderKl {
    /// [`AutoencoderKl::decode`] tile by tile with whole-image GroupNorm statistics. Output in f32.
    /// Stops with [`Error::Cancelled`] between tiles once `cancelled` says so.
    pub fn decode_tiled(
        &self,
        latents: &Tensor,
        spec: &TileSpec,
        cancelled: &mut dyn FnMut() -> bool,
    ) -> Result<(Tensor, TiledRun)> {
        let latents = self.prepare("latents", latents, self.cfg.latent_channels)?;
        let (b, _, lh, lw) = latents.dims4()?;
        let f = self.scale_factor();
        let plan = plan(lh, lw, f, spec)?;
        if plan.tile_count() == 1 {
            return Ok((self.decode(&latents)?, TiledRun { tiles: 1, passes: 1, ..TiledRun::default() }));
        }
        let mut images = Vec::with_capacity(b);
        let mut run = TiledRun::default();
        for i in 0..b {
            let mut z = latents.narrow(0, i, 1)?;
            if let Some(conv) = &self.post_quant_conv {
                z = conv.forward(&z)?;
            }
            let (h, windows) = self.decoder.start_windowed(&z, spec.attention_window)?;
            drop(z);
            let stages = self.decoder.render_stages();
            let (image, r) = run_tiles(h, &plan, (1, f), self.cfg.out_channels, &stages, spec, cancelled)?;
            images.push(image);
            run = TiledRun { attention_windows: windows, ..r };
        }
        Ok((Tensor::cat(&images, 0)?, run))
    }

    /// [`AutoencoderKl::encode`] tile by tile with whole-image GroupNorm statistics. The image's
    /// height and width must be multiples of the scale factor.
    /// Stops with [`Error::Cancelled`] between tiles once `cancelled` says so.
    pub fn encode_tiled(
        &self,
        image: &Tensor,
        spec: &TileSpec,
        cancelled: &mut dyn FnMut() -> bool,
    ) -> Result<(LatentDist, TiledRun)> {
        let image = self.prepare("image", image, self.cfg.in_channels)?;
        let (b, _, h, w) = image.dims4()?;
        let f = self.scale_factor();
        if h % f != 0 || w % f != 0 {
            return Err(Error::arg(
                "image",
                format!("{w}x{h} is not a multiple of {f}; tiled VAE encoding needs whole latent pixels"),
            ));
        }
        let plan = plan(h / f, w / f, f, spec)?;
        if plan.tile_count() == 1 {
            return Ok((self.encode(&image)?, TiledRun { tiles: 1, passes: 1, ..TiledRun::default() }));
        }
        let channels = self.cfg.block_out_channels.last().copied().unwrap_or_default();
        let mut means = Vec::with_capacity(b);
        let mut stds = Vec::with_capacity(b);
        let mut run = TiledRun::default();
        for i in 0..b {
            let x = image.narrow(0, i, 1)?;
            let stages = self.encoder.feature_stages();
            let (feats, r) = run_tiles(x, &plan, (f, 1), channels, &stages, spec, cancelled)?;
            let (mut moments, windows) =
                self.encoder.finish_windowed(&feats.to_dtype(self.dtype)?, spec.attention_window)?;
            run = TiledRun { attention_windows: windows, ..r };
            if let Some(conv) = &self.quant_conv {
                moments = conv.forward(&moments)?;
            }
            let dist = self.split_moments(&moments)?;
            means.push(dist.mean);
            stds.push(dist.std);
        }
        Ok((LatentDist { mean: Tensor::cat(&means, 0)?, std: Tensor::cat(&stds, 0)? }, run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn measured_whole_image_statistics_reproduce_group_norm() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (1, 8, 6, 5), &dev)? + 3.0)?;
        let norm = GroupNorm::new(
            Tensor::randn(1f32, 0.2, 8, &dev)?,
            Tensor::randn(0f32, 0.2, 8, &dev)?,
            8,
            2,
            1e-6,
        )?;
        let want = Activation::Silu.after_norm(&norm, &x)?;
        let mut acc = Vec::new();
        // Two "tiles": rows 0..2 and 2..6 of the same window.
        for rows in [0..2, 2..6] {
            let known = LayerStats::new();
            let mut n = TileNorms {
                known: &known,
                acc: &mut acc,
                stop_at: Some(0),
                stopped: false,
                next: 0,
                core_rows: rows,
                core_cols: 0..5,
                base: (6, 5),
            };
            assert!(n.apply(&norm, Some(Activation::Silu), &x).is_err() && n.stopped);
        }
        let known = vec![acc];
        let mut none = Vec::new();
        let mut n = TileNorms {
            known: &known,
            acc: &mut none,
            stop_at: None,
            stopped: false,
            next: 0,
            core_rows: 0..6,
            core_cols: 0..5,
            base: (6, 5),
        };
        let got = n.apply(&norm, Some(Activation::Silu), &x)?;
        let diff = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn merged_moments_equal_the_whole() {
        let xs: Vec<f64> = (0..1000).map(|i| ((i * 37 % 101) as f64).sin() * 3.0 + 1.5).collect();
        let whole = {
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / xs.len() as f64;
            (mean, var)
        };
        let mut acc = Moments::default();
        for chunk in xs.chunks(137) {
            let n = chunk.len() as f64;
            let mean = chunk.iter().sum::<f64>() / n;
            let m2 = chunk.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>();
            acc.merge(Moments { n, mean, m2 });
        }
        assert!((acc.mean - whole.0).abs() < 1e-12 && (acc.var() - whole.1).abs() < 1e-12);
    }
}
