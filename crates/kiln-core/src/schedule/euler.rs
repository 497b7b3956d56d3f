//! Euler (Karras et al. 2022, algorithm 2 without churn): diffusers' `EulerDiscreteScheduler`.

use super::betas::{BetaConfig, LINEAR_DEFAULTS};
use super::config::{FinalSigma, Prediction, SchedulerConfig, Spacing};
use super::param::{div, restore, upcast, ve_x0};
use super::sigmas::{exponential, input_scale_f32, interp, karras, log_sigmas, sigma_to_t, training_sigmas};
use super::spacing::spaced_timesteps;
use super::{at, DenoisedFn, Scheduler, SchedulerKind};
use crate::error::Result;
use crate::rng::BatchRng;
use candle_core::Tensor;

const CLASS: &str = "EulerDiscreteScheduler";

/// diffusers' Euler schedulers pin the last training alpha_bar to 2^-24 after zero-SNR rescaling
/// so that its sigma stays finite.
pub(crate) const ZERO_SNR_LAST_ALPHA_BAR: f32 = 1.0 / 16_777_216.0;

pub(crate) struct Euler {
    timesteps: Vec<f64>,
    /// float32 values, one more than timesteps (the last is 0 or sigma_min).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

/// diffusers' init_noise_sigma for the Euler schedulers: the largest sigma, or
/// sqrt(max^2 + 1) for `leading` spacing (float32 arithmetic).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f64], spacing: Spacing) -> f64 {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max as f64,
        Spacing::Leading => input_scale_f32(max) as f64,
    }
}

impl Euler {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        cfg.reject_flag(CLASS, "use_beta_sigmas", cfg.use_beta_sigmas)?;
        let beta = BetaConfig::resolve(cfg, CLASS, &LINEAR_DEFAULTS)?;
        let prediction = Prediction::parse(cfg, CLASS)?;
        let spacing = Spacing::parse(cfg, CLASS, Spacing::Linspace)?;
        let final_sigma = FinalSigma::parse(cfg, CLASS)?;
        match cfg.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => {}
            other => return Err(cfg.unsupported(CLASS, format!("interpolation_type `{other}`"))),
        }
        let continuous_v = match cfg.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => false,
            "continuous" => prediction == Prediction::VPrediction,
            other => return Err(cfg.unsupported(CLASS, format!("timestep_type `{other}`"))),
        };
        let use_karras = cfg.use_karras_sigmas.unwrap_or(false);
        let use_exponential = cfg.use_exponential_sigmas.unwrap_or(false);
        if use_karras && use_exponential {
            return Err(cfg.invalid("only one of use_karras_sigmas and use_exponential_sigmas can be set"));
        }

        let mut alphas_cumprod = beta.alphas_cumprod();
        if beta.rescale_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = ZERO_SNR_LAST_ALPHA_BAR;
            }
        }
        let table = training_sigmas(&alphas_cumprod);
        let logs = log_sigmas(&table);

        let steps_offset = cfg.steps_offset.unwrap_or(0);
        let mut timesteps: Vec<f64> =
            spaced_timesteps(spacing, beta.num_train_timesteps, n, steps_offset, false)
                .into_iter()
                .map(|t| t as f32 as f64)
                .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
        if use_karras || use_exponential {
            let sigma_min = cfg.sigma_min.unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
            let sigma_max = cfg.sigma_max.unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
            sigmas = if use_karras {
                karras(sigma_min, sigma_max, n)
            } else {
                exponential(sigma_min, sigma_max, n)
            };
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs) as f32 as f64).collect();
        }
        sigmas.push(match final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => table[0] as f64,
        });
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        if continuous_v {
            timesteps =
                sigmas[..sigmas.len() - 1].iter().map(|&s| (0.25f32 * (s as f32).ln()) as f64).collect();
        }
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, spacing);
        Ok(Self { timesteps, sigmas, init_noise_sigma, prediction })
    }
}

/// `sample / sqrt(sigma^2 + 1)` (k-diffusion input scaling), in float32.
pub(crate) fn scale_ve_input(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    let scaled = div(&upcast(sample)?, input_scale_f32(sigma as f32) as f64)?;
    restore(scaled, sample.dtype())
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        scale_ve_input(sample, at(&self.sigmas, i, "sigmas")?)
    }

    fn step_with_denoised(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut BatchRng,
        denoised: &mut DenoisedFn<'_>,
    ) -> Result<Tensor> {
        at(&self.timesteps, i, "timesteps")?;
        let sigma = at(&self.sigmas, i, "sigmas")?;
        let sigma_next = at(&self.sigmas, i + 1, "sigmas")?;
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let x0 = denoised(ve_x0(self.prediction, &m, &x, sigma)?)?;
        let derivative = div(&(&x - &x0)?, sigma)?;
        let dt = (sigma_next as f32 - sigma as f32) as f64;
        let prev = (&x + derivative.affine(dt, 0.0)?)?;
        restore(prev, model_output.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = at(&self.sigmas, i, "sigmas")?;
        let out = (upcast(original)? + upcast(noise)?.affine(sigma, 0.0)?)?;
        restore(out, original.dtype())
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}
