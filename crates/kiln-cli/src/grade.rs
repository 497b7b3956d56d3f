//! `kiln grade`: colour grading with a 3D LUT (`.cube`), recorded in the output's metadata.

use std::path::PathBuf;

use crate::upscale::{expand_inputs, output_for};
use anyhow::bail;
use clap::Args;
use kiln_core::image::lut::{grade_file, Interpolation, Lut3d};
use kiln_core::jobs::spec::{GradeSpec, ImageRef, JobSpec};

#[derive(Args, Debug)]
pub struct GradeArgs {
    /// Input images (PNG, JPEG, WebP) or folders of them; or library assets (`asset:12`,
    /// `#12`), whose graded copies are recorded in the project as their children.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The 3D LUT (`.cube`, LUT_3D_SIZE 2–65).
    #[arg(long)]
    pub lut: PathBuf,
    /// How much of the grade to apply: 1 = the LUT's colours, 0 = none.
    #[arg(long, default_value_t = 1.0)]
    pub strength: f32,
    /// tetrahedral (smooth along the grey axis, as Resolve) or trilinear (as Pillow).
    #[arg(long, default_value = "tetrahedral")]
    pub interp: String,
    /// Output file (one input) or folder (several); default: `<stem>_graded.png` beside the input.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Project folder for asset inputs (default: $KILN_PROJECT or the current folder).
    #[arg(long)]
    pub project: Option<PathBuf>,
}

pub fn run(args: GradeArgs) -> anyhow::Result<()> {
    let interp: Interpolation = args.interp.parse()?;
    if !(0.0..=1.0).contains(&args.strength) {
        bail!("invalid --strength: {} must be in 0..=1", args.strength);
    }
    if let Some(ids) = crate::job::asset_ids(&args.inputs)? {
        return grade_assets(&args, &ids);
    }
    // The LUT and every output name are checked before anything is written.
    let lut = Lut3d::read(&args.lut)?;
    let inputs = expand_inputs(&args.inputs)?;
    let many = inputs.len() > 1;
    let mut outputs = std::collections::BTreeMap::new();
    for input in &inputs {
        let output = output_for(input, args.out.as_deref(), many, "graded");
        if let Some(first) = outputs.insert(output.clone(), input.clone()) {
            bail!(
                "{} and {} would both be written to {}",
                first.display(),
                input.display(),
                output.display()
            );
        }
        kiln_core::files::guard_target(&output)?;
    }
    let mut reports = Vec::new();
    for (output, input) in &outputs {
        let r = grade_file(&lut, &args.lut, input, output, interp, args.strength)?;
        if !args.json {
            eprintln!(
                "{} -> {} ({} at strength {})",
                input.display(),
                output.display(),
                args.lut.display(),
                args.strength
            );
        }
        reports.push(r);
    }
    if args.json {
        println!("{}", serde_json::json!({ "outputs": reports }));
    }
    Ok(())
}

/// Grades of library assets: each a grade job on the project, recorded as the asset's child.
fn grade_assets(args: &GradeArgs, ids: &[i64]) -> anyhow::Result<()> {
    if args.out.is_some() {
        bail!("--out is for image files; an asset's graded copy is written to the project's assets/graded/ and recorded");
    }
    let run = crate::args::RunArgs::quiet(args.json);
    let engine = crate::job::engine(args.project.as_deref(), &run, false)?;
    let mut results = Vec::new();
    for &id in ids {
        let spec = JobSpec::Grade(GradeSpec {
            image: ImageRef::Asset(id),
            lut: args.lut.clone(),
            strength: Some(args.strength),
            interp: Some(args.interp.clone()),
        });
        let out = crate::job::run(&engine, &spec, &run)?;
        if !args.json {
            eprintln!(
                "asset {id} -> asset {} {} ({} at strength {})",
                out.detail["asset_id"],
                out.detail["path"].as_str().unwrap_or_default(),
                args.lut.display(),
                args.strength
            );
        }
        results.push(out);
    }
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    }
    Ok(())
}
