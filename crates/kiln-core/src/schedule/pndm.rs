//! Pseudo numerical methods (Liu et al. 2022): diffusers' `PNDMScheduler`, both the PLMS-only
//! path (`skip_prk_steps: true`, what SD 1.x/2.x folders use) and the Runge-Kutta warm-up.
//!
//! Like diffusers, the solver is driven by a step counter, not the step index: a run that starts
//! part-way (img2img) warms up again from its first step.

use super::betas::{BetaConfig, BetaDefaults, LINEAR_DEFAULTS};
use super::config::{Prediction, SchedulerConfig, Spacing};
use super::ddim::{add_noise_vp, train_indices};
use super::param::{div, lin2, restore, upcast, vp_x0_eps};
use super::spacing::spaced_timesteps;
use super::{at, DenoisedFn, Scheduler, SchedulerKind};
use crate::error::{Error, Result};
use crate::rng::BatchRng;
use candle_core::Tensor;

const CLASS: &str = "PNDMScheduler";
const PNDM_ORDER: usize = 4;

/// PNDMScheduler has no rescale_betas_zero_snr argument: diffusers ignores the key.
pub(crate) const PNDM_BETA_DEFAULTS: BetaDefaults =
    BetaDefaults { accepts_rescale: false, ..LINEAR_DEFAULTS };

pub(crate) struct Pndm {
    timesteps: Vec<f64>,
    /// The Runge-Kutta part of `timesteps` (empty with skip_prk_steps).
    prk_timesteps: Vec<i64>,
    skip_prk_steps: bool,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    counter: usize,
    /// Past model outputs (diffusers' `ets`), at most four kept.
    ets: Vec<Tensor>,
    /// Runge-Kutta accumulator (diffusers' `cur_model_output`).
    rk_sum: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        let beta = BetaConfig::resolve(cfg, CLASS, &PNDM_BETA_DEFAULTS)?;
        let prediction = Prediction::parse(cfg, CLASS)?;
        if prediction == Prediction::Sample {
            return Err(cfg.unsupported(CLASS, "prediction_type `sample`"));
        }
        let spacing = Spacing::parse(cfg, CLASS, Spacing::Leading)?;
        let skip_prk_steps = cfg.skip_prk_steps.unwrap_or(false);
        let num_train = beta.num_train_timesteps;
        // diffusers' `_timesteps`, ascending.
        let mut base: Vec<i64> = spaced_timesteps(spacing, num_train, n, cfg.steps_offset.unwrap_or(0), true)
            .into_iter()
            .map(|t| t as i64)
            .collect();
        base.reverse();

        let (prk_timesteps, plms_timesteps) = if skip_prk_steps {
            // concat(_t[:-1], _t[-2:-1], _t[-1:]) reversed: the second-to-last value twice.
            let len = base.len();
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < PNDM_ORDER {
                return Err(cfg.invalid(format!(
                    "PNDM's Runge-Kutta warm-up needs at least {PNDM_ORDER} steps (got {n}); \
                     use more steps or skip_prk_steps"
                )));
            }
            let half = (num_train / n / 2) as i64;
            let tail = &base[base.len() - PNDM_ORDER..];
            // repeat(2) + tile([0, half]) -> drop last -> repeat(2) -> drop first and last -> reverse
            let pairs: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..base.len() - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps: Vec<f64> = prk_timesteps.iter().chain(&plms_timesteps).map(|&t| t as f64).collect();
        let alphas_cumprod = beta.alphas_cumprod();
        train_indices(cfg, &timesteps, alphas_cumprod.len())?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            timesteps,
            prk_timesteps,
            skip_prk_steps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            step_ratio: (num_train / n) as i64,
            counter: 0,
            ets: Vec::new(),
            rk_sum: None,
            cur_sample: None,
        })
    }

    fn alpha_bar(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| Error::arg("timestep", format!("{t} is outside the training schedule")))
    }

    /// Formula (9) of the PNDM paper: from `sample` at `t` to `prev_t` along `model_output`.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, model_output: &Tensor) -> Result<Tensor> {
        let alpha_prod = self.alpha_bar(t)?;
        let alpha_prod_prev = self.alpha_bar(prev_t)?;
        let (beta_prod, beta_prod_prev) = (1.0 - alpha_prod, 1.0 - alpha_prod_prev);
        let eps = match self.prediction {
            Prediction::VPrediction => {
                lin2(alpha_prod.sqrt() as f64, model_output, beta_prod.sqrt() as f64, sample)?
            }
            _ => model_output.clone(),
        };
        // float32 scalars, as diffusers computes them on 0-d float32 tensors.
        let sample_coeff = (alpha_prod_prev / alpha_prod).sqrt();
        let denom = alpha_prod * beta_prod_prev.sqrt() + (alpha_prod * beta_prod * alpha_prod_prev).sqrt();
        let scaled = eps.affine((alpha_prod_prev - alpha_prod) as f64, 0.0)?;
        Ok((sample.affine(sample_coeff as f64, 0.0)? - div(&scaled, denom as f64)?)?)
    }

    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { self.step_ratio / 2 };
        let prev_t = t - diff_to_prev;
        let t = at(&self.prk_timesteps, self.counter / 4 * 4, "Runge-Kutta timesteps")?;
        let model_output = match self.counter % 4 {
            0 => {
                self.rk_sum = Some(accumulate(self.rk_sum.take(), model_output, 1.0 / 6.0)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            1 | 2 => {
                self.rk_sum = Some(accumulate(self.rk_sum.take(), model_output, 1.0 / 3.0)?);
                model_output.clone()
            }
            _ => accumulate(self.rk_sum.take(), model_output, 1.0 / 6.0)?,
        };
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::arg(
                "step index",
                "PNDM's linear multistep steps need the Runge-Kutta warm-up steps first",
            ));
        }
        let (mut t, mut prev_t) = (t, t - self.step_ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let mut sample = sample.clone();
        let e = &self.ets;
        let n = e.len();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().ok_or_else(|| {
                Error::arg("step index", "PNDM's second step needs the first step's sample")
            })?;
            div(&(model_output + &e[0])?, 2.0)?
        } else if n == 2 {
            div(&(e[1].affine(3.0, 0.0)? - &e[0])?, 2.0)?
        } else if n == 3 {
            let s = ((e[2].affine(23.0, 0.0)? - e[1].affine(16.0, 0.0)?)? + e[0].affine(5.0, 0.0)?)?;
            div(&s, 12.0)?
        } else if n >= 4 {
            let s = (((e[n - 1].affine(55.0, 0.0)? - e[n - 2].affine(59.0, 0.0)?)?
                + e[n - 3].affine(37.0, 0.0)?)?
                - e[n - 4].affine(9.0, 0.0)?)?;
            s.affine(1.0 / 24.0, 0.0)?
        } else {
            return Err(Error::arg("step index", "PNDM's multistep history is empty"));
        };
        let prev = self.prev_sample(&sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

/// `sum + weight * x`, starting from zero.
fn accumulate(sum: Option<Tensor>, x: &Tensor, weight: f64) -> Result<Tensor> {
    let term = x.affine(weight, 0.0)?;
    Ok(match sum {
        Some(s) => (s + term)?,
        None => term,
    })
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut BatchRng,
    ) -> Result<Tensor> {
        let t = at(&self.timesteps, i, "timesteps")? as i64;
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        self.step_f32(&m, t, &x, sample.dtype())
    }

    /// PNDM steps on eps alone; its x0 estimate is the one that eps implies at the sample's
    /// level. The transform is applied there and turned back into the model's parameterisation,
    /// so the multistep history holds the re-imposed outputs.
    fn step_with_denoised(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut BatchRng,
        denoised: &mut DenoisedFn<'_>,
    ) -> Result<Tensor> {
        let t = at(&self.timesteps, i, "timesteps")? as i64;
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let alpha_bar = self.alpha_bar(t)?;
        let (alpha, sigma) = (alpha_bar.sqrt() as f64, (1.0 - alpha_bar).sqrt() as f64);
        let (x0, _) = vp_x0_eps(self.prediction, &m, &x, alpha, sigma)?;
        let x0 = denoised(x0)?;
        let m = match self.prediction {
            Prediction::VPrediction => div(&(x.affine(alpha, 0.0)? - x0)?, sigma)?,
            _ => div(&(&x - x0.affine(alpha, 0.0)?)?, sigma)?,
        };
        self.step_f32(&m, t, &x, sample.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let t = at(&self.timesteps, i, "timesteps")? as i64;
        add_noise_vp(original, noise, self.alpha_bar(t)?)
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
    }
}

impl Pndm {
    /// One step on float32 model output and sample at timestep `t`, cast back to `dtype`.
    fn step_f32(&mut self, m: &Tensor, t: i64, x: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
        let prev = if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(m, t, x)?
        } else {
            self.step_plms(m, t, x)?
        };
        restore(prev, dtype)
    }
}
