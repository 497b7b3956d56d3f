//! Running a job spec in-process: the engine over the project, and a sink that draws progress
//! on stderr. Every job subcommand builds a spec, runs it here and prints the result.

use crate::args::RunArgs;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::jobs::{Engine, EventSink, JobEvent, JobOutput, JobSpec, RunContext};
use kiln_core::library::Project;
use kiln_core::workflow::JobOptions;
use std::path::Path;
use std::sync::Arc;

/// Progress on stderr (hidden with --json / -q).
pub struct CliSink {
    bar: Option<ProgressBar>,
}

impl CliSink {
    pub fn new(show: bool) -> Self {
        Self {
            bar: show.then(|| {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar
            }),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl EventSink for CliSink {
    fn emit(&mut self, event: JobEvent) {
        let Some(bar) = &self.bar else { return };
        match event {
            JobEvent::Stage { stage } => bar.set_prefix(stage),
            JobEvent::Step { step, steps, seconds, .. } => {
                bar.set_prefix("denoising");
                bar.set_length(steps as u64);
                bar.set_position(step as u64);
                bar.set_message(format!("{seconds:.2} s/step"));
            }
            JobEvent::Tiles { done, total } => {
                bar.set_prefix("upscale tiles");
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
            _ => {}
        }
    }
}

/// The engine for `project` (None = $KILN_PROJECT or the current folder) on `run`'s device.
pub fn engine(project: Option<&Path>, run: &RunArgs, accept_drift: bool) -> anyhow::Result<Engine> {
    let options = JobOptions {
        device: run.device()?,
        dtype: run.explicit_dtype()?,
        accept_drift,
        show_progress: run.show(),
        text_encoders: run.text_encoders()?,
    };
    let project = Project::find(project)?;
    Ok(Engine::new(project, options, Arc::new(kiln_core::jobs::pool::ModelPool::new(None))))
}

/// Runs `spec` with a progress bar and prints its warnings on stderr.
pub fn run(engine: &Engine, spec: &JobSpec, run: &RunArgs) -> anyhow::Result<JobOutput> {
    let mut sink = CliSink::new(run.show());
    let result = engine.run(spec, &RunContext::default(), &mut sink);
    sink.finish();
    let out = result?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    Ok(out)
}

/// The asset ids among `inputs` (`asset:12`, `#12`, or a number that is not a file).
pub fn asset_ids(inputs: &[std::path::PathBuf]) -> anyhow::Result<Option<Vec<i64>>> {
    let ids: Vec<Option<i64>> = inputs
        .iter()
        .map(|p| match p.to_str().map(kiln_core::workflow::AssetRef::parse) {
            Some(kiln_core::workflow::AssetRef::Id(id)) => Some(id),
            _ => None,
        })
        .collect();
    match (ids.iter().all(Option::is_some), ids.iter().any(Option::is_some)) {
        (true, _) => Ok(Some(ids.into_iter().flatten().collect())),
        (false, true) => anyhow::bail!("give library assets (asset:ID) or image files, not both in one call"),
        (false, false) => Ok(None),
    }
}
