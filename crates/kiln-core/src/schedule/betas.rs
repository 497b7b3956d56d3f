//! The training noise schedule: betas and their cumulative alpha products.
//!
//! diffusers builds these as float32 torch tensors; the arithmetic here repeats torch's to the
//! bit: `torch.linspace` in float32 (one fused multiply-add per element, from whichever end is
//! nearer), `1 - betas` in float32, and `torch.cumprod`, which accumulates in double and stores
//! float32.

use super::config::SchedulerConfig;
use crate::error::Result;

/// Which beta schedule (diffusers' `beta_schedule`, or `trained_betas`).
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
    Trained(Vec<f64>),
}

/// The beta-related fields of a config, resolved with a class's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub schedule: BetaSchedule,
    /// Zero terminal SNR rescaling (only for classes whose constructor accepts it).
    pub rescale_zero_snr: bool,
}

/// Class-specific defaults for [`BetaConfig::resolve`].
pub(crate) struct BetaDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub schedule: &'static str,
    /// Whether the class has a `rescale_betas_zero_snr` argument (PNDM has none: ignored there).
    pub accepts_rescale: bool,
}

/// DDIM, Euler, Euler ancestral, DPM-Solver: `linear` from 1e-4 to 2e-2.
pub(crate) const LINEAR_DEFAULTS: BetaDefaults =
    BetaDefaults { beta_start: 0.0001, beta_end: 0.02, schedule: "linear", accepts_rescale: true };

impl BetaConfig {
    pub(crate) fn resolve(cfg: &SchedulerConfig, class: &str, defaults: &BetaDefaults) -> Result<Self> {
        let num_train_timesteps = cfg.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(
                cfg.invalid(format!("num_train_timesteps must be at least 2, got {num_train_timesteps}"))
            );
        }
        let schedule = match &cfg.trained_betas {
            Some(betas) => {
                if betas.len() != num_train_timesteps {
                    return Err(cfg.invalid(format!(
                        "trained_betas has {} values but num_train_timesteps is {num_train_timesteps}",
                        betas.len()
                    )));
                }
                BetaSchedule::Trained(betas.clone())
            }
            None => match cfg.beta_schedule.as_deref().unwrap_or(defaults.schedule) {
                "linear" => BetaSchedule::Linear,
                "scaled_linear" => BetaSchedule::ScaledLinear,
                "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
                other => return Err(cfg.unsupported(class, format!("beta_schedule `{other}`"))),
            },
        };
        Ok(Self {
            num_train_timesteps,
            beta_start: cfg.beta_start.unwrap_or(defaults.beta_start),
            beta_end: cfg.beta_end.unwrap_or(defaults.beta_end),
            schedule,
            rescale_zero_snr: defaults.accepts_rescale && cfg.rescale_betas_zero_snr.unwrap_or(false),
        })
    }

    /// Betas in float32, as diffusers' constructors make them.
    pub fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas = match &self.schedule {
            BetaSchedule::Linear => torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n),
            BetaSchedule::ScaledLinear => {
                // Python's `beta_start**0.5` is pow(), not sqrt().
                torch_linspace_f32(self.beta_start.powf(0.5) as f32, self.beta_end.powf(0.5) as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar_cosine(n),
            BetaSchedule::Trained(b) => b.iter().map(|&x| x as f32).collect(),
        };
        if self.rescale_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        }
    }

    /// `alphas_cumprod` in float32.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let alphas: Vec<f32> = self.betas().iter().map(|b| 1.0 - b).collect();
        cumprod_f32(&alphas)
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU: each element is one fused
/// multiply-add from the nearer end (the compiler contracts torch's `start + step * idx`).
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 vector: double accumulator, float32 results.
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar(n)` with the cosine transform and max_beta 0.999.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return betas.to_vec();
    };
    let scale = first / (first - last);
    for v in &mut sqrt_bar {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}
