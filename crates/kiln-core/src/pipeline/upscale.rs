//! Upscale job: tiled super-resolution of an image file to any target size, streamed to disk.
//!
//! One *pass* runs the model once over a [`TilePlan`]: windows are cut from the (mirrored)
//! input, batched through the net, blended by [`StripAssembler`] and released as finished
//! output rows. Targets beyond the model's scale run several passes (all but the last kept in
//! memory); a target that is not a power of the scale gets a streaming Lanczos resample.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::image::io::{self, PlanarImage, PngStreamWriter, SizeLimits};
use crate::image::resize::{bicubic_planar, StreamResizer};
use crate::loaders::store::{self, SrWeights};
use crate::models::sr::{SrArch, SrNet, SrSpec};
use crate::tiling::{extract_window, StripAssembler, TileOptions, TileOutput, TilePlan};

/// Budget for the blended output strip (one tile row at full output width, f32 RGBA).
const STRIP_BYTES: usize = 96 << 20;

/// PNG text key under which upscale steps are recorded (a JSON array, one object per step).
pub const META_KEY: &str = "kiln.upscale";

/// Requested output size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Target {
    /// Multiply both sides.
    Scale(f64),
    /// Fit the longer side to this many pixels (`4k` = 3840, `8k` = 7680).
    LongEdge(usize),
    /// Fit inside `width x height`, keeping the aspect ratio.
    Fit { width: usize, height: usize },
}

impl Target {
    /// Parses `--to`: `4k`, `8k`, or `WxH`.
    pub fn parse_to(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "2k" => return Ok(Target::LongEdge(1920)),
            "4k" => return Ok(Target::LongEdge(3840)),
            "8k" => return Ok(Target::LongEdge(7680)),
            _ => {}
        }
        let bad = || Error::arg("to", format!("`{s}`: expected 4k, 8k or WIDTHxHEIGHT"));
        let (w, h) = lower.split_once('x').ok_or_else(bad)?;
        let (width, height) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
        if width == 0 || height == 0 {
            return Err(bad());
        }
        Ok(Target::Fit { width, height })
    }

    /// Output size for an input of `w x h`.
    pub fn size(&self, w: usize, h: usize) -> Result<(usize, usize)> {
        let s = match *self {
            Target::Scale(s) => s,
            Target::LongEdge(n) => n as f64 / w.max(h) as f64,
            Target::Fit { width, height } => (width as f64 / w as f64).min(height as f64 / h as f64),
        };
        if !(s.is_finite() && s > 0.0) {
            return Err(Error::arg("--scale", format!("{s} is not a positive scale")));
        }
        let size = |v: usize| ((v as f64 * s).round() as usize).max(1);
        Ok((size(w), size(h)))
    }
}

/// How to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpscaleOptions {
    /// Output size; `None` = the model's scale.
    pub target: Option<Target>,
    /// Largest tile side in input pixels; `None` = chosen from available memory.
    pub tile: Option<usize>,
    /// Context around tiles; `None` = receptive radius (SRVGG) or 32 (RRDBNet).
    pub halo: Option<usize>,
    /// Cross-fade width for RRDBNet tiles; `None` = the halo. Ignored for exact (SRVGG) tiling.
    pub feather: Option<usize>,
    /// Mirrored context past the image edges; `None` = 10 (as realesrgan-ncnn-vulkan pads).
    pub border: Option<usize>,
    /// Windows per forward call; `None` = 1 on CPU (its GEMMs are already large), 4 on GPUs.
    pub batch: Option<usize>,
    pub limits: SizeLimits,
}

impl UpscaleOptions {
    /// Checks every setting against [`crate::bounds`] before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        crate::bounds::TILE.check_opt(self.tile)?;
        crate::bounds::HALO.check_opt(self.halo)?;
        crate::bounds::BORDER.check_opt(self.border)?;
        crate::bounds::FEATHER.check_opt(self.feather)?;
        crate::bounds::BATCH.check_opt(self.batch)?;
        Ok(())
    }
}

/// What a finished job reports (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct UpscaleReport {
    pub input: PathBuf,
    pub output: PathBuf,
    pub input_size: [usize; 2],
    pub output_size: [usize; 2],
    pub model: String,
    pub sha256: Option<String>,
    pub passes: usize,
    pub tiles: usize,
    pub tile: usize,
    pub halo: usize,
    pub feather: usize,
    pub seconds: f64,
}

/// Progress callback: (tiles done, tiles total).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// A loaded super-resolution model on a device.
pub struct Upscaler {
    net: SrNet,
    spec: SrSpec,
    name: String,
    sha256: Option<String>,
    device: Device,
    dtype: DType,
    /// Testing aid: windows larger than this many pixels fail as if out of memory.
    simulated_memory_px: Option<usize>,
}

/// Tiling of one pass, resolved from options.
#[derive(Debug, Clone, Copy)]
struct PassTiling {
    tile: usize,
    /// Tile height limit: the output strip (a tile row at full width) stays within
    /// [`STRIP_BYTES`] however wide the image is.
    tile_rows: usize,
    halo: usize,
    border: usize,
    feather: usize,
    batch: usize,
}

fn is_oom(e: &Error) -> bool {
    let s = e.to_string().to_ascii_lowercase();
    s.contains("out of memory") || s.contains("out_of_memory")
}

impl Upscaler {
    pub fn new(weights: SrWeights, device: &Device, dtype: DType) -> Result<Self> {
        crate::device::check_dtype(device, dtype)?;
        let tensors = store::to_device(&weights.tensors, dtype, device)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let net = SrNet::new(&weights.spec, vb)?;
        Ok(Self {
            net,
            spec: weights.spec,
            name: weights.name,
            sha256: weights.sha256,
            device: device.clone(),
            dtype,
            simulated_memory_px: None,
        })
    }

    /// Makes forward calls on more than `px` input pixels (batch included) fail with an
    /// out-of-memory error, to exercise the halve-and-retry path without a GPU.
    #[doc(hidden)]
    pub fn simulate_memory_limit(&mut self, px: usize) {
        self.simulated_memory_px = Some(px);
    }

    pub fn spec(&self) -> &SrSpec {
        &self.spec
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn tiling(&self, opts: &UpscaleOptions, w: usize, h: usize) -> PassTiling {
        let exact = self.spec.receptive_radius();
        let halo = opts.halo.unwrap_or(exact.unwrap_or(32));
        let feather = match exact {
            Some(r) if halo >= r => 0,
            _ => opts.feather.unwrap_or(halo).min(2 * halo),
        };
        let batch = opts.batch.unwrap_or(if self.device.is_cpu() { 1 } else { 4 }).max(1);
        let border = opts.border.unwrap_or(10);
        let tile = opts.tile.unwrap_or_else(|| self.auto_tile(halo, batch)).max(16).min(w.max(h));
        let s = self.spec.scale();
        let strip_row_bytes = w * s * s * 4 * 4;
        let tile_rows = (STRIP_BYTES / strip_row_bytes.max(1)).clamp(16, tile.max(16));
        PassTiling { tile, tile_rows, halo, border, feather, batch }
    }

    /// Largest tile whose activations fit a share of the available memory.
    fn auto_tile(&self, halo: usize, batch: usize) -> usize {
        let budget: u64 = if self.device.is_cpu() {
            (available_memory().unwrap_or(4 << 30) / 4).clamp(256 << 20, 768 << 20)
        } else {
            4 << 30
        };
        // Peak bytes per window pixel at f32 (activations, Winograd transforms and products;
        // measured, see benches/RESULTS.md).
        let per_px: u64 = match &self.spec.arch {
            SrArch::Rrdbnet(_) => 6 << 10,
            SrArch::Srvgg(_) => 3 << 10,
        } * self.dtype.size_in_bytes() as u64
            / 4;
        let px = budget / (per_px * batch.max(1) as u64);
        let side = (px as f64).sqrt() as usize;
        side.saturating_sub(2 * halo).clamp(32, 1024)
    }

    /// Runs the model (net + any output resize) on a batch `[B, 3, h, w]` in [0, 1].
    pub fn forward_raw(&self, input: &Tensor) -> Result<Tensor> {
        self.forward(input)
    }

    /// Runs the net on a batch `[B, 3, h, w]`, returning `[B, 3, h*s, w*s]` at the final
    /// scale (the net's output resampled if the model has an output resize). On
    /// out-of-memory, halves the batch.
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let run = |x: &Tensor| -> Result<Tensor> {
            if let Some(limit) = self.simulated_memory_px {
                if x.elem_count() / 3 > limit {
                    return Err(Error::Candle(candle_core::Error::Msg(
                        "simulated CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
                    )));
                }
            }
            let y = self.net.forward(&x.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?;
            match self.spec.output_scale {
                None => Ok(y),
                Some(s) => {
                    let (b, c, h, w) = y.dims4()?;
                    let n = self.spec.net_scale();
                    let (oh, ow) = (h / n * s, w / n * s);
                    let data = y.flatten_all()?.to_vec1::<f32>()?;
                    let out = bicubic_planar(&data, b * c, h, w, oh, ow);
                    Ok(Tensor::from_vec(out, (b, c, oh, ow), y.device())?)
                }
            }
        };
        match run(input) {
            Err(e) if is_oom(&e) && input.dim(0)? > 1 => {
                let b = input.dim(0)?;
                let a = self.forward(&input.narrow(0, 0, b / 2)?)?;
                let c = self.forward(&input.narrow(0, b / 2, b - b / 2)?)?;
                Ok(Tensor::cat(&[a, c], 0)?)
            }
            other => other,
        }
    }

    /// One pass at the model's scale. Output rows (interleaved, `channels` per pixel, values
    /// unclamped) go to `sink`; the first `skip_rows` output rows are not computed or sent.
    fn pass(
        &self,
        img: &PlanarImage,
        t: PassTiling,
        skip_rows: usize,
        progress: &mut dyn FnMut(usize) -> Result<()>,
        sink: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let scale = self.spec.scale();
        let opts = TileOptions {
            max_tile: t.tile,
            max_tile_rows: t.tile_rows,
            halo: t.halo,
            border: t.border,
            feather: t.feather,
            multiple: self.spec.input_multiple(),
        };
        let plan = TilePlan::new(img.width, img.height, opts)?;
        let translucent = img.has_translucency();
        let channels = img.channels;
        let mut asm = StripAssembler::new(plan.clone(), scale, channels);
        let mut emitted = 0usize;
        let mut window = Vec::new();
        for row in 0..plan.y.cores.len() {
            let used_y = plan.y.used(row, scale);
            if used_y.end <= skip_rows {
                // Rows already delivered; keep the assembler's position in step.
                let _ = asm.finish_row(row);
                emitted = asm_top(&plan, row, scale);
                progress(plan.x.cores.len())?;
                continue;
            }
            let rows = plan.y.window(row);
            // Cut every window of this tile row: RGB, plus alpha (as grey RGB) when translucent.
            let mut items: Vec<(usize, bool, Tensor)> = Vec::new();
            for col in 0..plan.x.cores.len() {
                let cols = plan.x.window(col);
                let (wh, ww) = (rows.len(), cols.len());
                extract_window(
                    &img.data[..3 * img.width * img.height],
                    img.width,
                    img.height,
                    3,
                    rows.clone(),
                    cols.clone(),
                    &mut window,
                )?;
                items.push((col, false, Tensor::from_slice(&window, (3, wh, ww), &self.device)?));
                if translucent {
                    extract_window(
                        img.plane(3),
                        img.width,
                        img.height,
                        1,
                        rows.clone(),
                        cols.clone(),
                        &mut window,
                    )?;
                    let a = Tensor::from_slice(&window, (1, wh, ww), &self.device)?;
                    items.push((col, true, a.repeat((3, 1, 1))?));
                }
            }
            // Batch windows of equal size.
            let mut outputs: Vec<Option<Tensor>> = vec![None; items.len()];
            let mut i = 0;
            while i < items.len() {
                let dims = items[i].2.dims().to_vec();
                let mut j = i + 1;
                while j < items.len() && j - i < t.batch && items[j].2.dims() == dims.as_slice() {
                    j += 1;
                }
                let stacked =
                    Tensor::stack(&items[i..j].iter().map(|it| it.2.clone()).collect::<Vec<_>>(), 0)?;
                let out = self.forward(&stacked)?;
                for (k, slot) in outputs[i..j].iter_mut().enumerate() {
                    *slot = Some(out.get(k)?);
                }
                i = j;
            }
            // Blend each column's output (RGB [+ alpha]) into the strip.
            let mut k = 0;
            while k < items.len() {
                let col = items[k].0;
                let rgb = outputs[k].take().ok_or_else(|| Error::arg("tile", "missing tile output"))?;
                let (_, oh, ow) = rgb.dims3()?;
                let mut data = rgb.flatten_all()?.to_vec1::<f32>()?;
                k += 1;
                if channels == 4 {
                    if translucent && k < items.len() && items[k].1 {
                        let a =
                            outputs[k].take().ok_or_else(|| Error::arg("tile", "missing alpha output"))?;
                        data.extend(a.mean(0)?.flatten_all()?.to_vec1::<f32>()?);
                        k += 1;
                    } else {
                        data.extend(std::iter::repeat_n(1.0f32, oh * ow));
                    }
                }
                let origin = (rows.start * scale as isize, plan.x.window(col).start * scale as isize);
                asm.add(row, col, &TileOutput { data: &data, rows: oh, cols: ow, origin })?;
            }
            progress(plan.x.cores.len())?;
            let done = asm.finish_row(row);
            let row_len = asm.out_width() * channels;
            let n_rows = done.len() / row_len;
            let skip = skip_rows.saturating_sub(emitted).min(n_rows);
            sink(&done[skip * row_len..])?;
            emitted += n_rows;
        }
        Ok(())
    }

    /// One pass with out-of-memory recovery: on OOM the tile side is halved and the pass
    /// resumes after the rows already delivered.
    fn pass_with_retry(
        &self,
        img: &PlanarImage,
        mut t: PassTiling,
        progress: &mut dyn FnMut(usize) -> Result<()>,
        sink: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<PassTiling> {
        let delivered = std::cell::Cell::new(0usize);
        let row_len = img.width * self.spec.scale() * img.channels;
        loop {
            let mut counting = |rows: &[f32]| -> Result<()> {
                delivered.set(delivered.get() + rows.len() / row_len);
                sink(rows)
            };
            match self.pass(img, t, delivered.get(), progress, &mut counting) {
                Err(e) if is_oom(&e) && t.tile >= 16 => {
                    t.tile /= 2;
                    t.tile_rows = t.tile_rows.min(t.tile);
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(t),
            }
        }
    }

    /// Upscales an in-memory image to the model's scale (planar f32, clamped to [0, 1]);
    /// also returns the tile side finally used (smaller than asked after out-of-memory).
    pub fn upscale_planar(&self, img: &PlanarImage, opts: &UpscaleOptions) -> Result<(PlanarImage, usize)> {
        opts.validate()?;
        let t = self.tiling(opts, img.width, img.height);
        let (out, used) = self.run_planar(img, t, &mut |_| Ok(()))?;
        Ok((out, used.tile))
    }

    fn run_planar(
        &self,
        img: &PlanarImage,
        t: PassTiling,
        progress: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<(PlanarImage, PassTiling)> {
        let s = self.spec.scale();
        let (w, h, c) = (img.width * s, img.height * s, img.channels);
        let mut data = vec![0f32; w * h * c];
        let mut pixel = 0usize;
        let used = self.pass_with_retry(img, t, progress, &mut |rows: &[f32]| {
            for px in rows.chunks_exact(c) {
                for (ch, &v) in px.iter().enumerate() {
                    data[ch * w * h + pixel] = v.clamp(0.0, 1.0);
                }
                pixel += 1;
            }
            Ok(())
        })?;
        Ok((PlanarImage { width: w, height: h, channels: c, data }, used))
    }

    /// Upscales `input` to `output` (PNG streamed; JPEG/WebP buffered), carrying PNG text
    /// metadata over and appending this step to [`META_KEY`].
    pub fn upscale_file(
        &self,
        input: &Path,
        output: &Path,
        opts: &UpscaleOptions,
        progress: Progress,
    ) -> Result<UpscaleReport> {
        self.upscale_file_until(input, output, opts, &mut |done, total| {
            progress(done, total);
            true
        })
    }

    /// [`Upscaler::upscale_file`] whose progress callback can stop the work: returning false
    /// after a tile row ends the upscale with [`Error::Cancelled`], and nothing is written.
    pub fn upscale_file_until(
        &self,
        input: &Path,
        output: &Path,
        opts: &UpscaleOptions,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<UpscaleReport> {
        opts.validate()?;
        let start = Instant::now();
        let decoded = io::decode(input, &opts.limits)?;
        let img = decoded.image;
        let (w, h) = (img.width, img.height);
        let native = self.spec.scale();
        let (tw, th) = match opts.target {
            Some(t) => t.size(w, h)?,
            None => (w * native, h * native),
        };
        opts.limits.check_output(tw, th, output)?;
        // Passes: smallest k with native^k covering the target.
        let need = (tw as f64 / w as f64).max(th as f64 / h as f64);
        let mut passes = 1;
        while (native as f64).powi(passes as i32) + 1e-9 < need {
            passes += 1;
            if passes > 4 {
                return Err(Error::arg(
                    "--scale",
                    format!("{need:.1}x needs more than 4 passes of a x{native} model"),
                ));
            }
        }
        let (fw, fh) = (w * native.pow(passes as u32), h * native.pow(passes as u32));
        let pre_last = native.pow(passes as u32 - 1);
        if (w * pre_last) as u64 * (h * pre_last) as u64 > opts.limits.max_input_pixels {
            return Err(Error::arg(
                "--scale",
                format!("intermediate {}x{} is over the input limit", w * pre_last, h * pre_last),
            ));
        }
        let mut tiles_total = 0;
        let mut sizes = vec![(w, h)];
        for p in 1..passes {
            let (pw, ph) = (w * native.pow(p as u32), h * native.pow(p as u32));
            sizes.push((pw, ph));
        }
        let tilings: Vec<PassTiling> = sizes.iter().map(|&(pw, ph)| self.tiling(opts, pw, ph)).collect();
        for (&(pw, ph), t) in sizes.iter().zip(&tilings) {
            tiles_total += pw.div_ceil(t.tile) * ph.div_ceil(t.tile_rows.min(t.tile));
        }
        let mut tiles_done = 0;
        let mut tick = |n: usize| -> Result<()> {
            tiles_done += n;
            if progress(tiles_done.min(tiles_total), tiles_total) {
                Ok(())
            } else {
                Err(Error::Cancelled)
            }
        };
        let mut current = img;
        for t in &tilings[..passes - 1] {
            current = self.run_planar(&current, *t, &mut tick)?.0;
        }
        let text = metadata_with_step(&decoded.text, self, input, (w, h), (tw, th));
        let channels = current.channels;
        let bit_depth = decoded.bit_depth;
        let is_png = output.extension().is_none_or(|e| e.eq_ignore_ascii_case("png"));
        let last = tilings[passes - 1];
        let mut resizer = ((tw, th) != (fw, fh)).then(|| StreamResizer::new(fw, fh, tw, th, channels));
        let clamp = |v: Vec<f32>| v.into_iter().map(|x| x.clamp(0.0, 1.0)).collect::<Vec<f32>>();
        let used = if is_png {
            let mut writer = PngStreamWriter::create(output, tw, th, channels, bit_depth, &text)?;
            let used = self.pass_with_retry(&current, last, &mut tick, &mut |rows: &[f32]| {
                let rows = clamp(rows.to_vec());
                match resizer.as_mut() {
                    Some(r) => writer.write_rows(&r.push(&rows)),
                    None => writer.write_rows(&rows),
                }
            })?;
            writer.finish()?;
            used
        } else {
            let mut all = Vec::with_capacity(tw * th * channels);
            let used = self.pass_with_retry(&current, last, &mut tick, &mut |rows: &[f32]| {
                let rows = clamp(rows.to_vec());
                match resizer.as_mut() {
                    Some(r) => all.extend(r.push(&rows)),
                    None => all.extend(rows),
                }
                Ok(())
            })?;
            io::write_buffered(output, tw, th, channels, &all)?;
            used
        };
        Ok(UpscaleReport {
            input: input.to_path_buf(),
            output: output.to_path_buf(),
            input_size: [w, h],
            output_size: [tw, th],
            model: self.name.clone(),
            sha256: self.sha256.clone(),
            passes,
            tiles: tiles_total,
            tile: used.tile,
            halo: used.halo,
            feather: used.feather,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Output row reached after tile row `row` is finished.
fn asm_top(plan: &TilePlan, row: usize, scale: usize) -> usize {
    if row + 1 == plan.y.cores.len() {
        plan.y.len * scale
    } else {
        plan.y.used(row + 1, scale).start
    }
}

/// Input text chunks plus this step appended to the [`META_KEY`] JSON array.
fn metadata_with_step(
    text: &[(String, String)],
    up: &Upscaler,
    input: &Path,
    from: (usize, usize),
    to: (usize, usize),
) -> Vec<(String, String)> {
    let mut steps: Vec<serde_json::Value> = text
        .iter()
        .find(|(k, _)| k == META_KEY)
        .and_then(|(_, v)| serde_json::from_str::<Vec<serde_json::Value>>(v).ok())
        .unwrap_or_default();
    steps.push(serde_json::json!({
        "step": "upscale",
        "model": up.name,
        "arch": up.spec.arch_name(),
        "model_scale": up.spec.scale(),
        "sha256": up.sha256,
        "input": input.file_name().map(|n| n.to_string_lossy().into_owned()),
        "from": [from.0, from.1],
        "to": [to.0, to.1],
        "kiln": crate::VERSION,
    }));
    let mut out: Vec<(String, String)> = text.iter().filter(|(k, _)| k != META_KEY).cloned().collect();
    out.push((META_KEY.to_string(), serde_json::Value::Array(steps).to_string()));
    out
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
