//! Latent consistency models (Luo et al. 2023): diffusers' `LCMScheduler`. Every step but the
//! last re-noises the denoised estimate with fresh noise; the last returns the denoised sample.

use super::betas::{BetaConfig, BetaDefaults};
use super::config::{Prediction, SchedulerConfig};
use super::ddim::{add_noise_vp, train_indices};
use super::param::{lin2, restore, upcast, vp_x0_eps};
use super::spacing::np_linspace;
use super::{at, step_noise, DenoisedFn, Scheduler, SchedulerKind};
use crate::error::Result;
use crate::rng::BatchRng;
use candle_core::Tensor;

const CLASS: &str = "LCMScheduler";

pub(crate) const LCM_BETA_DEFAULTS: BetaDefaults =
    BetaDefaults { beta_start: 0.00085, beta_end: 0.012, schedule: "scaled_linear", accepts_rescale: true };

pub(crate) struct Lcm {
    timesteps: Vec<f64>,
    train_steps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    clip_range: Option<f64>,
    timestep_scaling: f64,
}

impl Lcm {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        cfg.reject_flag(CLASS, "thresholding", cfg.thresholding)?;
        let beta = BetaConfig::resolve(cfg, CLASS, &LCM_BETA_DEFAULTS)?;
        let prediction = Prediction::parse(cfg, CLASS)?;
        let num_train = beta.num_train_timesteps;
        let original_steps = cfg.original_inference_steps.unwrap_or(50);
        if original_steps == 0 || original_steps > num_train {
            return Err(cfg.invalid(format!(
                "original_inference_steps {original_steps} must be between 1 and num_train_timesteps {num_train}"
            )));
        }
        if n > original_steps {
            return Err(crate::error::Error::arg(
                "steps",
                format!("{n}: LCM allows at most original_inference_steps ({original_steps}) steps"),
            ));
        }
        // The LCM training grid: every k-th timestep, k = T // original_steps, descending.
        let k = num_train / original_steps;
        let origin: Vec<usize> = (1..=original_steps).rev().map(|j| j * k - 1).collect();
        let timesteps: Vec<f64> = np_linspace(0.0, origin.len() as f64, n, false)
            .into_iter()
            .map(|x| origin.get(x.floor() as usize).copied().unwrap_or(0) as f64)
            .collect();
        let alphas_cumprod = beta.alphas_cumprod();
        let train_steps = train_indices(cfg, &timesteps, alphas_cumprod.len())?;
        Ok(Self {
            timesteps,
            train_steps,
            alphas_cumprod,
            prediction,
            clip_range: cfg.clip_sample.unwrap_or(false).then(|| cfg.clip_sample_range.unwrap_or(1.0)),
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
        })
    }

    /// Consistency-model boundary scalings (c_skip, c_out) with sigma_data = 0.5, in float32.
    fn boundary_scalings(&self, t: usize) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling as f32;
        let sigma_data2 = 0.25f32;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        (c_skip, c_out)
    }
}

impl Scheduler for Lcm {
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
        rng: &mut BatchRng,
        denoised: &mut DenoisedFn<'_>,
    ) -> Result<Tensor> {
        let t = at(&self.train_steps, i, "timesteps")?;
        let is_last = i + 1 == self.train_steps.len();
        let prev_t = if is_last { t } else { at(&self.train_steps, i + 1, "timesteps")? };
        let alpha_prod = self.alphas_cumprod[t];
        let alpha_prod_prev = self.alphas_cumprod[prev_t];
        let (c_skip, c_out) = self.boundary_scalings(t);
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let (x0, _) =
            vp_x0_eps(self.prediction, &m, &x, alpha_prod.sqrt() as f64, (1.0 - alpha_prod).sqrt() as f64)?;
        let x0 = match self.clip_range {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let clean = denoised(lin2(c_out as f64, &x0, c_skip as f64, &x)?)?;
        let prev = if is_last {
            clean
        } else {
            let noise = upcast(&step_noise(rng, sample)?)?;
            lin2(alpha_prod_prev.sqrt() as f64, &clean, (1.0 - alpha_prod_prev).sqrt() as f64, &noise)?
        };
        restore(prev, sample.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let t = at(&self.train_steps, i, "timesteps")?;
        add_noise_vp(original, noise, self.alphas_cumprod[t])
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }
}
