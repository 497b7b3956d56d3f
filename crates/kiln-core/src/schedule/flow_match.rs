//! Flow matching with Euler steps: diffusers' `FlowMatchEulerDiscreteScheduler` (FLUX.1, SD3,
//! Z-Image). The model predicts the velocity `v = noise - x0`; with `x_t = (1 - σ) x0 + σ noise`
//! one Euler step is `x + (σ_next - σ) v`.
//!
//! Sigmas come either from the pipeline (FluxPipeline passes `linspace(1, 1/n, n)`) or from the
//! scheduler's own spacing, then are shifted: statically (`shift`) or by the image's token count
//! (`use_dynamic_shifting`: `mu` interpolated between `base_shift` at `base_image_seq_len` and
//! `max_shift` at `max_image_seq_len`). Arithmetic follows diffusers' float32/float64 mix.

use super::config::SchedulerConfig;
use super::param::{restore, upcast};
use super::{at, DenoisedFn, Scheduler, SchedulerKind};
use crate::error::Result;
use crate::rng::BatchRng;
use candle_core::Tensor;

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// What the pipeline hands `set_timesteps` besides the step count.
#[derive(Debug, Clone, Default)]
pub struct FlowInputs {
    /// Packed image tokens (`(h/2)·(w/2)` latent patches): decides the dynamic shift.
    pub image_seq_len: Option<usize>,
    /// Sigmas the pipeline passes (float64, as numpy makes them), or None for the scheduler's own.
    pub sigmas: Option<Vec<f64>>,
}

impl FlowInputs {
    /// FluxPipeline's `np.linspace(1.0, 1 / n, n)`.
    pub fn linspace_to_inverse_steps(n: usize) -> Vec<f64> {
        let end = 1.0 / n as f64;
        if n == 1 {
            return vec![1.0];
        }
        let step = (end - 1.0) / (n - 1) as f64;
        // numpy's linspace: start + i * step, with the last value set to `stop` exactly.
        (0..n).map(|i| if i == n - 1 { end } else { 1.0 + i as f64 * step }).collect()
    }
}

/// diffusers' `calculate_shift`: mu for `image_seq_len` tokens (float64).
pub fn dynamic_shift_mu(cfg: &SchedulerConfig, image_seq_len: usize) -> f64 {
    let base_len = cfg.base_image_seq_len.unwrap_or(256) as f64;
    let max_len = cfg.max_image_seq_len.unwrap_or(4096) as f64;
    let base_shift = cfg.base_shift.unwrap_or(0.5);
    let max_shift = cfg.max_shift.unwrap_or(1.15);
    let m = (max_shift - base_shift) / (max_len - base_len);
    let b = base_shift - m * base_len;
    image_seq_len as f64 * m + b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeShift {
    Exponential,
    Linear,
}

pub(crate) struct FlowMatchEuler {
    timesteps: Vec<f64>,
    /// float32 values, one more than timesteps (the last is 0).
    sigmas: Vec<f64>,
}

impl FlowMatchEuler {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, inputs: &FlowInputs) -> Result<Self> {
        for (name, value) in [
            ("use_karras_sigmas", cfg.use_karras_sigmas),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("invert_sigmas", cfg.invert_sigmas),
            ("stochastic_sampling", cfg.stochastic_sampling),
        ] {
            cfg.reject_flag(CLASS, name, value)?;
        }
        if cfg.shift_terminal.is_some_and(|t| t != 0.0) {
            return Err(cfg.unsupported(CLASS, "`shift_terminal` is not implemented"));
        }
        let time_shift = match cfg.time_shift_type.as_deref().unwrap_or("exponential") {
            "exponential" => TimeShift::Exponential,
            "linear" => TimeShift::Linear,
            other => return Err(cfg.unsupported(CLASS, format!("time_shift_type `{other}`"))),
        };
        let train = cfg.num_train_timesteps.unwrap_or(1000);
        let shift = cfg.shift.unwrap_or(1.0);
        let dynamic = cfg.use_dynamic_shifting.unwrap_or(false);
        let static_shift_f32 = |s: f32| -> f32 {
            let k = shift as f32;
            k * s / (1.0 + (k - 1.0) * s)
        };
        let mu = if dynamic {
            let len = inputs.image_seq_len.ok_or_else(|| {
                cfg.invalid("use_dynamic_shifting needs the image size (the pipeline passes mu)")
            })?;
            Some(dynamic_shift_mu(cfg, len))
        } else {
            None
        };

        let sigmas: Vec<f32> = match &inputs.sigmas {
            // Pipeline sigmas: `np.array(sigmas).astype(np.float32)`, shifted in float32.
            Some(given) => {
                let s: Vec<f32> = given.iter().map(|&v| v as f32).collect();
                match mu {
                    Some(mu) => s.into_iter().map(|t| shift_f32(time_shift, mu, t)).collect(),
                    None => s.into_iter().map(static_shift_f32).collect(),
                }
            }
            // The scheduler's own: linspace over [sigma_max, sigma_min] of its training table
            // (already statically shifted in __init__ when not dynamic), in float64, shifted
            // (again, as diffusers does), then cast to float32.
            None => {
                let table_sigma = |t: usize| -> f32 {
                    let s = t as f32 / train as f32;
                    if dynamic {
                        s
                    } else {
                        static_shift_f32(s)
                    }
                };
                let (sigma_max, sigma_min) = (table_sigma(train) as f64, table_sigma(1) as f64);
                let (t_max, t_min) = (sigma_max * train as f64, sigma_min * train as f64);
                let ts = linspace(t_max, t_min, n);
                ts.into_iter()
                    .map(|t| {
                        let s = t / train as f64;
                        let shifted = match mu {
                            Some(mu) => shift_f64(time_shift, mu, s),
                            None => shift * s / (1.0 + (shift - 1.0) * s),
                        };
                        shifted as f32
                    })
                    .collect()
            }
        };
        if sigmas.len() != n {
            return Err(cfg.invalid(format!("{} sigmas for {n} steps", sigmas.len())));
        }
        let timesteps = sigmas.iter().map(|&s| (s * train as f32) as f64).collect();
        let mut sigmas: Vec<f64> = sigmas.into_iter().map(f64::from).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }
}

/// diffusers' `time_shift(mu, 1.0, t)` on a float32 array (Python scalars are weak: float32 maths).
fn shift_f32(kind: TimeShift, mu: f64, t: f32) -> f32 {
    let a = match kind {
        TimeShift::Exponential => mu.exp() as f32,
        TimeShift::Linear => mu as f32,
    };
    a / (a + (1.0 / t - 1.0))
}

/// The same on a float64 array.
fn shift_f64(kind: TimeShift, mu: f64, t: f64) -> f64 {
    let a = match kind {
        TimeShift::Exponential => mu.exp(),
        TimeShift::Linear => mu,
    };
    a / (a + (1.0 / t - 1.0))
}

/// numpy's float64 linspace.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { stop } else { start + i as f64 * step }).collect()
}

impl Scheduler for FlowMatchEuler {
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
        let sigma = at(&self.sigmas, i, "sigmas")?;
        let sigma_next = at(&self.sigmas, i + 1, "sigmas")?;
        let dt = (sigma_next as f32 - sigma as f32) as f64;
        let prev = (upcast(sample)? + upcast(model_output)?.affine(dt, 0.0)?)?;
        restore(prev, model_output.dtype())
    }

    /// The clean estimate is `x - σ v`; the transformed one gives back `v = (x - x0) / σ`.
    fn step_with_denoised(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut BatchRng,
        denoised: &mut DenoisedFn<'_>,
    ) -> Result<Tensor> {
        let sigma = at(&self.sigmas, i, "sigmas")?;
        let sigma_next = at(&self.sigmas, i + 1, "sigmas")?;
        let (x, v) = (upcast(sample)?, upcast(model_output)?);
        let x0 = denoised((&x - v.affine(sigma, 0.0)?)?)?;
        let prev = if sigma > 0.0 {
            let v = ((&x - x0)? / sigma)?;
            (&x + v.affine(sigma_next - sigma, 0.0)?)?
        } else {
            x0
        };
        restore(prev, model_output.dtype())
    }

    /// diffusers' `scale_noise`: `σ noise + (1 - σ) x0` at step `i`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = at(&self.sigmas, i, "sigmas")?;
        let out = (upcast(noise)?.affine(sigma, 0.0)? + upcast(original)?.affine(1.0 - sigma, 0.0)?)?;
        restore(out, original.dtype())
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::FlowEuler
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json, None).expect("config")
    }

    const DEV: &str = r#"{"base_image_seq_len":256,"base_shift":0.5,"max_image_seq_len":4096,
        "max_shift":1.15,"num_train_timesteps":1000,"shift":3.0,"use_dynamic_shifting":true}"#;

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{got:?} vs {want:?}");
        }
    }

    // Expected values printed by diffusers 0.42.1's FlowMatchEulerDiscreteScheduler.
    #[test]
    fn flux_dev_dynamic_shift_matches_diffusers() {
        // FLUX.1-dev's config, 4 steps at 96x64 (24 tokens), FluxPipeline's sigmas.
        let c = cfg(DEV);
        let mu = dynamic_shift_mu(&c, 24);
        assert!((mu - 0.460_729_166_666_666_7).abs() < 1e-12, "{mu}");
        let inputs =
            FlowInputs { image_seq_len: Some(24), sigmas: Some(FlowInputs::linspace_to_inverse_steps(4)) };
        let s = FlowMatchEuler::new(&c, 4, &inputs).expect("scheduler");
        close(&s.sigmas, &[1.0, 0.8262588381767273, 0.6131871938705444, 0.34572523832321167, 0.0]);
        close(&s.timesteps, &[1000.0, 826.2588500976562, 613.1871948242188, 345.7252502441406]);
        // The scheduler's own spacing (no pipeline sigmas).
        let own =
            FlowMatchEuler::new(&c, 4, &FlowInputs { image_seq_len: Some(24), sigmas: None }).expect("own");
        close(&own.sigmas, &[1.0, 0.7604916095733643, 0.44289538264274597, 0.0015843024011701345, 0.0]);
    }

    #[test]
    fn static_shift_matches_diffusers() {
        let c = cfg(&DEV.replace("\"use_dynamic_shifting\":true", "\"use_dynamic_shifting\":false"));
        let own = FlowMatchEuler::new(&c, 4, &FlowInputs::default()).expect("own");
        close(&own.sigmas, &[1.0, 0.857692301273346, 0.602150559425354, 0.008928571827709675, 0.0]);
        let given =
            FlowInputs { image_seq_len: None, sigmas: Some(FlowInputs::linspace_to_inverse_steps(4)) };
        let s = FlowMatchEuler::new(&c, 4, &given).expect("given");
        close(&s.sigmas, &[1.0, 0.8999999761581421, 0.75, 0.5, 0.0]);
    }

    #[test]
    fn dynamic_shift_needs_the_image_size() {
        let c = cfg(r#"{"use_dynamic_shifting":true}"#);
        assert!(FlowMatchEuler::new(&c, 4, &FlowInputs::default()).is_err());
    }
}
