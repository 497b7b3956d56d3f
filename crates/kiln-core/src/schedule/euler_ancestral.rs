//! Euler ancestral: diffusers' `EulerAncestralDiscreteScheduler`. Each step draws fresh noise
//! (also on the last step, where its weight is zero), one draw per batch item per step.

use super::betas::{BetaConfig, LINEAR_DEFAULTS};
use super::config::{Prediction, SchedulerConfig, Spacing};
use super::euler::{euler_init_noise_sigma, scale_ve_input, ZERO_SNR_LAST_ALPHA_BAR};
use super::param::{div, restore, upcast, ve_x0};
use super::sigmas::{interp, training_sigmas};
use super::spacing::spaced_timesteps;
use super::{at, step_noise, DenoisedFn, Scheduler, SchedulerKind};
use crate::error::Result;
use crate::rng::BatchRng;
use candle_core::Tensor;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

pub(crate) struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerAncestral {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let beta = BetaConfig::resolve(cfg, CLASS, &LINEAR_DEFAULTS)?;
        let prediction = Prediction::parse(cfg, CLASS)?;
        if prediction == Prediction::Sample {
            // diffusers raises NotImplementedError for this combination.
            return Err(cfg.unsupported(CLASS, "prediction_type `sample`"));
        }
        let spacing = Spacing::parse(cfg, CLASS, Spacing::Linspace)?;
        let mut alphas_cumprod = beta.alphas_cumprod();
        if beta.rescale_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = ZERO_SNR_LAST_ALPHA_BAR;
            }
        }
        let table = training_sigmas(&alphas_cumprod);
        let steps_offset = cfg.steps_offset.unwrap_or(0);
        let timesteps: Vec<f64> = spaced_timesteps(spacing, beta.num_train_timesteps, n, steps_offset, false)
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table) as f32 as f64).collect();
        sigmas.push(0.0);
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, spacing);
        Ok(Self { timesteps, sigmas, init_noise_sigma, prediction })
    }
}

impl Scheduler for EulerAncestral {
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
        rng: &mut BatchRng,
        denoised: &mut DenoisedFn<'_>,
    ) -> Result<Tensor> {
        at(&self.timesteps, i, "timesteps")?;
        let sigma_from = at(&self.sigmas, i, "sigmas")? as f32;
        let sigma_to = at(&self.sigmas, i + 1, "sigmas")? as f32;
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let x0 = denoised(ve_x0(self.prediction, &m, &x, sigma_from as f64)?)?;
        // float32, in diffusers' order of operations.
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&x - &x0)?, sigma_from as f64)?;
        let dt = sigma_down - sigma_from;
        let prev = (&x + derivative.affine(dt as f64, 0.0)?)?;
        let noise = upcast(&step_noise(rng, model_output)?)?;
        let prev = (prev + noise.affine(sigma_up as f64, 0.0)?)?;
        restore(prev, model_output.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = at(&self.sigmas, i, "sigmas")?;
        let out = (upcast(original)? + upcast(noise)?.affine(sigma, 0.0)?)?;
        restore(out, original.dtype())
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}
