//! A diffusers `scheduler_config.json`, kept as written: every field optional, so that a field
//! absent from the file takes the *target* scheduler class's default — what diffusers'
//! `XScheduler.from_config(other_config)` does. The solvers read fields through the accessors
//! here with their class's default.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The fields of a diffusers scheduler config that kiln's schedulers read. Unknown keys are
/// ignored; JSON `null` counts as absent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Where the config came from, for error messages.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    pub skip_prk_steps: Option<bool>,
    // Flow matching (FlowMatchEulerDiscreteScheduler).
    pub shift: Option<f64>,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: Option<usize>,
    pub max_image_seq_len: Option<usize>,
    pub time_shift_type: Option<String>,
    pub shift_terminal: Option<f64>,
    pub invert_sigmas: Option<bool>,
    pub stochastic_sampling: Option<bool>,
}

impl SchedulerConfig {
    /// Parses a scheduler config. Python's json writes `-Infinity`/`Infinity`/`NaN` (e.g. DPM's
    /// `lambda_min_clipped`), which JSON lacks; they are read as absent, i.e. as the default.
    pub fn from_json_str(text: &str, source: Option<&Path>) -> Result<Self> {
        let cleaned = replace_non_finite(text);
        let mut cfg: SchedulerConfig = serde_json::from_str(&cleaned).map_err(|e| {
            Error::config(
                source.map(Path::to_path_buf).unwrap_or_else(|| "scheduler config".into()),
                e.to_string(),
            )
        })?;
        cfg.source = source.map(Path::to_path_buf);
        Ok(cfg)
    }

    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        Self::from_json_str(&text, Some(path))
    }

    /// An [`Error::Config`] naming this config's file.
    pub(crate) fn invalid(&self, msg: impl Into<String>) -> Error {
        Error::config(self.source.clone().unwrap_or_else(|| "scheduler config".into()), msg)
    }

    /// An [`Error::Unsupported`] for a value kiln does not implement.
    pub(crate) fn unsupported(&self, class: &str, what: impl std::fmt::Display) -> Error {
        let from = match &self.source {
            Some(p) => format!(" (from {})", p.display()),
            None => String::new(),
        };
        Error::Unsupported(format!("{class}: {what}{from}"))
    }

    /// Fails when a boolean option kiln does not implement is switched on.
    pub(crate) fn reject_flag(&self, class: &str, name: &str, value: Option<bool>) -> Result<()> {
        if value == Some(true) {
            return Err(self.unsupported(class, format!("`{name}: true` is not implemented")));
        }
        Ok(())
    }
}

/// Replaces the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings with `null`.
fn replace_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// What the model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub(crate) fn parse(cfg: &SchedulerConfig, class: &str) -> Result<Self> {
        match cfg.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" | "original_sample" => Ok(Self::Sample),
            other => Err(cfg.unsupported(class, format!("prediction_type `{other}`"))),
        }
    }
}

/// How inference timesteps are spread over the training range (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    pub(crate) fn parse(cfg: &SchedulerConfig, class: &str, default: Spacing) -> Result<Self> {
        match cfg.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(Self::Leading),
            Some("trailing") => Ok(Self::Trailing),
            Some("linspace") => Ok(Self::Linspace),
            Some(other) => Err(cfg.unsupported(class, format!("timestep_spacing `{other}`"))),
        }
    }
}

/// The last sigma of a sigma schedule (diffusers' `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    Zero,
    SigmaMin,
}

impl FinalSigma {
    pub(crate) fn parse(cfg: &SchedulerConfig, class: &str) -> Result<Self> {
        match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => Ok(Self::Zero),
            "sigma_min" => Ok(Self::SigmaMin),
            other => Err(cfg.unsupported(class, format!("final_sigmas_type `{other}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_become_null_outside_strings() {
        let text = r#"{"lambda_min_clipped": -Infinity, "_class_name": "NaN Infinity", "sigma_max": NaN}"#;
        let cfg = SchedulerConfig::from_json_str(text, None).expect("parse");
        assert_eq!(cfg.lambda_min_clipped, None);
        assert_eq!(cfg.sigma_max, None);
        assert_eq!(cfg.class_name.as_deref(), Some("NaN Infinity"));
    }
}
