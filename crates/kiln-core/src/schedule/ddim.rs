//! DDIM (Song et al. 2020), deterministic (eta = 0): diffusers' `DDIMScheduler`.

use super::betas::{BetaConfig, LINEAR_DEFAULTS};
use super::config::{Prediction, SchedulerConfig, Spacing};
use super::param::{lin2, restore, upcast, vp_x0_eps};
use super::spacing::spaced_timesteps;
use super::{at, DenoisedFn, Scheduler, SchedulerKind};
use crate::error::Result;
use crate::rng::BatchRng;
use candle_core::Tensor;

const CLASS: &str = "DDIMScheduler";

pub(crate) struct Ddim {
    timesteps: Vec<f64>,
    /// The same timesteps as training-table indices.
    train_steps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip_range: Option<f64>,
    /// `num_train_timesteps // num_inference_steps`: how far back each step goes.
    step_ratio: usize,
}

impl Ddim {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        cfg.reject_flag(CLASS, "thresholding", cfg.thresholding)?;
        let beta = BetaConfig::resolve(cfg, CLASS, &LINEAR_DEFAULTS)?;
        let prediction = Prediction::parse(cfg, CLASS)?;
        let spacing = Spacing::parse(cfg, CLASS, Spacing::Leading)?;
        let steps_offset = cfg.steps_offset.unwrap_or(0);
        let alphas_cumprod = beta.alphas_cumprod();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let clip_range = cfg.clip_sample.unwrap_or(true).then(|| cfg.clip_sample_range.unwrap_or(1.0));
        let timesteps = spaced_timesteps(spacing, beta.num_train_timesteps, n, steps_offset, true);
        let train_steps = train_indices(cfg, &timesteps, alphas_cumprod.len())?;
        Ok(Self {
            timesteps,
            train_steps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            clip_range,
            step_ratio: beta.num_train_timesteps / n,
        })
    }
}

/// Checks that integer timesteps index the training table (a `leading` spacing with a
/// steps_offset can run past its end).
pub(crate) fn train_indices(cfg: &SchedulerConfig, timesteps: &[f64], len: usize) -> Result<Vec<usize>> {
    timesteps
        .iter()
        .map(|&t| {
            if t >= 0.0 && (t as usize) < len {
                Ok(t as usize)
            } else {
                Err(cfg.invalid(format!(
                    "timestep {t} falls outside the {len} training timesteps; use fewer steps or another spacing"
                )))
            }
        })
        .collect()
}

/// `sqrt(alpha_bar) * original + sqrt(1 - alpha_bar) * noise`, the coefficients in float32.
pub(crate) fn add_noise_vp(original: &Tensor, noise: &Tensor, alpha_bar: f32) -> Result<Tensor> {
    let dtype = original.dtype();
    let out =
        lin2(alpha_bar.sqrt() as f64, &upcast(original)?, (1.0 - alpha_bar).sqrt() as f64, &upcast(noise)?)?;
    restore(out, dtype)
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step_with_denoised(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut BatchRng,
        denoised: &mut DenoisedFn<'_>,
    ) -> Result<Tensor> {
        let t = at(&self.train_steps, i, "timesteps")?;
        let alpha_prod = self.alphas_cumprod[t];
        let alpha_prod_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let (x0, eps) =
            vp_x0_eps(self.prediction, &m, &x, alpha_prod.sqrt() as f64, (1.0 - alpha_prod).sqrt() as f64)?;
        let x0 = match self.clip_range {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let x0 = denoised(x0)?;
        let direction = (1.0 - alpha_prod_prev).sqrt() as f64;
        let prev = lin2(alpha_prod_prev.sqrt() as f64, &x0, direction, &eps)?;
        restore(prev, sample.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let t = at(&self.train_steps, i, "timesteps")?;
        add_noise_vp(original, noise, self.alphas_cumprod[t])
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }
}
