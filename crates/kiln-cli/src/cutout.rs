//! `kiln cutout`: background removal (and replacement) for images or folders.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::device;
use kiln_core::image::png_meta::{write_gray_atomic, write_png_atomic, write_rgba_atomic, TextChunk};
use kiln_core::loaders::matting::{MattingEntry, MattingStore};
use kiln_core::pipeline::cutout::{
    cutout, fit_background, parse_color, Background, CutoutImage, CutoutOptions, MattingModel,
};

use crate::args::RunArgs;
use kiln_core::jobs::spec::{CutoutSpec, ImageRef, JobSpec};

#[derive(Args, Debug)]
pub struct CutoutArgs {
    /// Input images (PNG, JPEG, WebP) or folders of them; or library assets (`asset:12`,
    /// `#12`), whose cutouts are recorded in the project as their children.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Matting model: an imported name (`kiln models list`) or an .onnx file (default: u2netp).
    #[arg(long)]
    pub model: Option<String>,
    /// Output file (one input) or folder (several); default: `<stem>_cutout.png` beside the input.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the mask (grey PNG, white = subject; `kiln inpaint --mask` reads it): a file
    /// for one input, a folder (`<stem>_mask.png`) for several.
    #[arg(long)]
    pub mask_out: Option<PathBuf>,
    /// Composite onto a colour (#rrggbb, #rgb, white, black, ...) or an image instead of
    /// writing a transparent PNG.
    #[arg(long)]
    pub background: Option<String>,
    /// Scale and centre-crop a background image of another size to each input's size
    /// (otherwise a size mismatch is an error).
    #[arg(long)]
    pub fit_background: bool,
    /// Refine the mask's edges at full resolution with a guided filter (hair, soft contours).
    #[arg(long)]
    pub refine: bool,
    #[command(flatten)]
    pub replace: crate::cutout_replace::ReplaceArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

use crate::upscale::{expand_inputs, output_for, peak_rss};

/// `--background`: a colour, or else an image file.
fn parse_background(arg: Option<&str>) -> anyhow::Result<Background> {
    let Some(s) = arg else { return Ok(Background::Transparent) };
    if let Some(c) = parse_color(s) {
        if !Path::new(s).is_file() {
            return Ok(Background::Color(c));
        }
    }
    let path = Path::new(s);
    if !path.is_file() {
        bail!("invalid --background `{s}`: neither a colour (#rrggbb, #rgb, white, black, gray, red, green, blue) nor an image file");
    }
    Ok(Background::Image(kiln_core::image::load_rgb(path)?))
}

/// Cutouts of library assets: each a cutout job on the project, recorded as the asset's child.
fn run_assets(args: &CutoutArgs, ids: &[i64]) -> anyhow::Result<()> {
    for (flag, given) in [
        ("--out", args.out.is_some()),
        ("--mask-out", args.mask_out.is_some()),
        ("--replace", args.replace.replace.is_some()),
    ] {
        if given {
            bail!("{flag} is for image files; an asset's cutout is written to the project's assets/cutout/ and recorded");
        }
    }
    let (background, background_image) = match args.background.as_deref() {
        Some(b) if parse_color(b).is_some() && !Path::new(b).is_file() => (Some(b.to_string()), None),
        Some(b) => (None, Some(ImageRef::File(PathBuf::from(b)))),
        None => (None, None),
    };
    let engine = crate::job::engine(args.replace.project.as_deref(), &args.run, false)?;
    let mut results = Vec::new();
    for &id in ids {
        let spec = JobSpec::Cutout(CutoutSpec {
            image: ImageRef::Asset(id),
            model: args.model.clone(),
            background: background.clone(),
            background_image: background_image.clone(),
            fit_background: args.fit_background,
            refine: args.refine,
        });
        let out = crate::job::run(&engine, &spec, &args.run).with_context(|| format!("asset {id}"))?;
        if !args.run.json {
            let c = &out.detail;
            eprintln!(
                "asset {id} -> asset {} {} ({:.1} % subject, {:.2}s)",
                c["asset_id"],
                c["path"].as_str().unwrap_or_default(),
                c["coverage"].as_f64().unwrap_or_default() * 100.0,
                out.device_seconds
            );
        }
        results.push(out);
    }
    if args.run.json {
        println!("{}", serde_json::to_string(&results)?);
    }
    Ok(())
}

pub fn run(args: CutoutArgs) -> anyhow::Result<()> {
    if let Some(ids) = crate::job::asset_ids(&args.inputs)? {
        return run_assets(&args, &ids);
    }
    let start = Instant::now();
    let inputs = expand_inputs(&args.inputs)?;
    let many = inputs.len() > 1;
    for (flag, out) in [("--out", &args.out), ("--mask-out", &args.mask_out)] {
        if let (true, Some(o)) = (many, out) {
            if o.is_file() {
                bail!(
                    "{flag} {} is a file, but there are {} inputs: give a folder",
                    o.display(),
                    inputs.len()
                );
            }
        }
    }
    let background = parse_background(args.background.as_deref())?;
    let replace = args.replace.prepare(&args.run, inputs.len(), args.background.is_some())?;
    let dev = args.run.device()?;
    let t0 = Instant::now();
    let weights = MattingStore::open_default()?.resolve(args.model.as_deref())?;
    let model = MattingModel::load(weights, &dev).context("building the matting model")?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let replace = replace.map(|r| r.load(args.run.show())).transpose()?;

    let show = args.run.show();
    let bar = if show && many { ProgressBar::new(inputs.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for input in &inputs {
        bar.set_message(input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let output = output_for(input, args.out.as_deref(), many, "cutout");
        let mask_path = args.mask_out.as_deref().map(|m| output_for(input, Some(m), many, "mask"));
        let one = || -> anyhow::Result<serde_json::Value> {
            let t_in = Instant::now();
            let image = kiln_core::image::load_rgb(input)?;
            let background = match &background {
                Background::Image(bg) if args.fit_background => {
                    Background::Image(fit_background(bg, image.width(), image.height()))
                }
                other => other.clone(),
            };
            let opts = CutoutOptions { refine: args.refine, background };
            let out = cutout(&model, &image, &opts, &mut |_| {})?;
            let meta = serde_json::json!({
                "kind": "cutout",
                "source": input.file_name().map(|n| n.to_string_lossy().into_owned()),
                "model": model.name,
                "model_sha256": model.sha256,
                "arch": model.spec.arch_name(),
                "refine": args.refine,
                "background": args.background,
                "replace": args.replace.replace,
                "version": kiln_core::VERSION,
            });
            let chunks = [TextChunk::new("kiln", meta.to_string())];
            let mut replaced = None;
            if let Some(r) = &replace {
                let (img, info) = r.run(&image, &out.mask)?;
                write_png_atomic(&output, &img, &chunks)?;
                replaced = Some(info);
            } else {
                match &out.image {
                    CutoutImage::Rgba(img) => write_rgba_atomic(&output, img, &chunks)?,
                    CutoutImage::Rgb(img) => write_png_atomic(&output, img, &chunks)?,
                }
            }
            if let Some(m) = &mask_path {
                write_gray_atomic(m, &out.mask, &chunks)?;
            }
            if !args.run.json {
                bar.suspend(|| {
                    eprintln!(
                        "{} -> {} ({}x{}, {:.1} % subject, {:.2}s)",
                        input.display(),
                        output.display(),
                        image.width(),
                        image.height(),
                        out.coverage * 100.0,
                        out.timings.total
                    )
                });
            }
            Ok(serde_json::json!({
                "input": input,
                "output": output,
                "mask": mask_path,
                "width": image.width(),
                "height": image.height(),
                "coverage": out.coverage,
                "seconds": out.timings,
                "replace": replaced,
                "wall_seconds": t_in.elapsed().as_secs_f64(),
            }))
        };
        match one() {
            Ok(r) => reports.push(r),
            Err(e) => {
                // One input: its error is the command's, printed once by main.
                if !args.run.json && many {
                    bar.suspend(|| eprintln!("error: {}: {e:#}", input.display()));
                }
                failures.push(serde_json::json!({ "input": input, "error": format!("{e:#}") }));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.run.json {
        let obj = serde_json::json!({
            "outputs": reports,
            "errors": failures,
            "model": model.name,
            "model_sha256": model.sha256,
            "arch": model.spec.arch_name(),
            "device": device::name(&dev),
            "dtype": "f32",
            "load_seconds": load_seconds,
            "seconds": start.elapsed().as_secs_f64(),
            "peak_rss_bytes": peak_rss(),
        });
        println!("{obj}");
    }
    if !failures.is_empty() {
        if inputs.len() == 1 {
            bail!("{}", failures[0]["error"].as_str().unwrap_or("failed"));
        }
        bail!("{} of {} inputs failed", failures.len(), inputs.len());
    }
    Ok(())
}

/// `kiln models import`'s matting half: the matting models in `path` (none for paths that
/// cannot hold any).
pub fn import_matting(path: &Path, replace: bool) -> anyhow::Result<Vec<MattingEntry>> {
    if !MattingStore::may_hold(path) {
        return Ok(Vec::new());
    }
    Ok(MattingStore::open_default()?.import(path, replace)?)
}

pub fn print_imported_matting(entries: &[MattingEntry]) {
    for e in entries {
        println!(
            "imported {} ({} matting, {} params) from {}\n  sha256 {}",
            e.name, e.arch, e.params, e.source, e.sha256
        );
    }
}

/// Rows of `kiln models list` for matting models (SCALE is `-`), names padded to `width`.
pub fn print_matting(entries: &[MattingEntry], width: usize) {
    for e in entries {
        println!(
            "{:<width$}  {:<16}  {:>5}  {:>10}  {}",
            e.name,
            format!("{} (matting)", e.arch),
            "-",
            e.params,
            e.sha256
        );
    }
}
