//! DPM-Solver++(2M) (Lu et al. 2022): diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, with or without Karras sigmas.
//!
//! The multistep history starts empty at whichever index is stepped first (img2img starts
//! part-way), so the first step is first order, as in diffusers.

use super::betas::{BetaConfig, LINEAR_DEFAULTS};
use super::config::{FinalSigma, Prediction, SchedulerConfig, Spacing};
use super::param::{lin2, restore, upcast, vp_x0_eps};
use super::sigmas::{exponential, interp, karras, log_sigmas, sigma_to_t, training_sigmas};
use super::spacing::{np_arange, np_linspace, np_round};
use super::{at, DenoisedFn, Scheduler, SchedulerKind};
use crate::error::Result;
use crate::rng::BatchRng;
use candle_core::Tensor;

const CLASS: &str = "DPMSolverMultistepScheduler";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(crate) struct DpmPp2m {
    karras: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma: FinalSigma,
    /// The previous step's x0 prediction (diffusers' `model_outputs[-2]`).
    previous_x0: Option<Tensor>,
    /// Steps taken so far, capped at the order (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

/// (alpha_t, sigma_t) of the variance-preserving process for a k-diffusion sigma.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// log(alpha_t) - log(sigma_t): +inf at sigma = 0.
fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

impl DpmPp2m {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, use_karras: bool) -> Result<Self> {
        cfg.reject_flag(CLASS, "thresholding", cfg.thresholding)?;
        cfg.reject_flag(CLASS, "use_beta_sigmas", cfg.use_beta_sigmas)?;
        cfg.reject_flag(CLASS, "use_lu_lambdas", cfg.use_lu_lambdas)?;
        cfg.reject_flag(CLASS, "use_flow_sigmas", cfg.use_flow_sigmas)?;
        let use_exponential = cfg.use_exponential_sigmas.unwrap_or(false);
        if use_karras && use_exponential {
            return Err(cfg.invalid("only one of use_karras_sigmas and use_exponential_sigmas can be set"));
        }
        let beta = BetaConfig::resolve(cfg, CLASS, &LINEAR_DEFAULTS)?;
        let prediction = Prediction::parse(cfg, CLASS)?;
        if prediction == Prediction::Epsilon
            && matches!(cfg.variance_type.as_deref(), Some("learned") | Some("learned_range"))
        {
            return Err(cfg.unsupported(CLASS, "learned variance outputs (variance_type)"));
        }
        let solver_type = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the UniPC/DEIS solver names onto midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(cfg.unsupported(CLASS, format!("solver_type `{other}`"))),
        };
        let spacing = Spacing::parse(cfg, CLASS, Spacing::Linspace)?;
        let final_sigma = FinalSigma::parse(cfg, CLASS)?;
        let steps_offset = cfg.steps_offset.unwrap_or(0);
        let num_train = beta.num_train_timesteps;

        let mut alphas_cumprod = beta.alphas_cumprod();
        if beta.rescale_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = super::euler::ZERO_SNR_LAST_ALPHA_BAR;
            }
        }
        // Timesteps whose lambda falls below lambda_min_clipped are cut from the top.
        let lambda_min_clipped = cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        let clipped = alphas_cumprod
            .iter()
            .rev()
            .filter(|&&a| {
                let l = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                (l as f64) < lambda_min_clipped
            })
            .count();
        let last_timestep = num_train - clipped;

        let mut timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1, true)
                    .into_iter()
                    .map(np_round)
                    .collect();
                t.reverse();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n).rev().map(|k| (k * ratio) as f64 + steps_offset as f64).collect()
            }
            Spacing::Trailing => {
                let ratio = num_train as f64 / n as f64;
                np_arange(last_timestep as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) - 1.0).collect()
            }
        };

        let table = training_sigmas(&alphas_cumprod);
        let logs = log_sigmas(&table);
        let (table_min, table_max) = (table[0] as f64, table[table.len() - 1] as f64);
        let mut sigmas: Vec<f64> = if use_karras || use_exponential {
            // DPMSolverMultistepScheduler has no sigma_min/sigma_max options: the table's ends.
            let s = if use_karras {
                karras(table_min, table_max, n)
            } else {
                exponential(table_min, table_max, n)
            };
            let round = use_karras && beta.schedule != super::betas::BetaSchedule::SquaredCosCapV2;
            timesteps = s
                .iter()
                .map(|&sigma| {
                    let t = sigma_to_t(sigma, &logs);
                    // then cast to int64, which truncates
                    if round {
                        np_round(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            s
        } else {
            timesteps.iter().map(|&t| interp(t, &table)).collect()
        };
        sigmas.push(match final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => table_min,
        });
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        if timesteps.iter().any(|&t| t < 0.0 || t >= num_train as f64) {
            return Err(cfg.invalid(format!(
                "{n} steps with this spacing give timesteps outside 0..{num_train}; use fewer steps"
            )));
        }
        Ok(Self {
            karras: use_karras,
            timesteps,
            sigmas,
            prediction,
            solver_type,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_sigma,
            previous_x0: None,
            lower_order_nums: 0,
        })
    }

    /// diffusers' `convert_model_output` for dpmsolver++: the x0 prediction.
    fn x0(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        Ok(vp_x0_eps(self.prediction, model_output, sample, alpha_t, sigma_t)?.0)
    }
}

impl Scheduler for DpmPp2m {
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
        let len = self.timesteps.len();
        at(&self.timesteps, i, "timesteps")?;
        let sigma_s0 = at(&self.sigmas, i, "sigmas")?;
        let sigma_next = at(&self.sigmas, i + 1, "sigmas")?;
        let short = self.lower_order_final && len < 15;
        let lower_order_final =
            i == len - 1 && (self.euler_at_final || short || self.final_sigma == FinalSigma::Zero);
        let (x, m) = (upcast(sample)?, upcast(model_output)?);
        let x0 = denoised(self.x0(&m, &x, sigma_s0)?)?;

        let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
        let (alpha_s0, sigma_s0v) = alpha_sigma(sigma_s0);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0v);
        let h = lambda_t - lambda_s0;
        // exp(-h) - 1, which is -1 at the final sigma 0 (h = +inf).
        let phi = (-h).exp() - 1.0;

        let prev = match (&self.previous_x0, self.lower_order_nums >= 1 && !lower_order_final) {
            (Some(x0_prev), true) if i >= 1 => {
                let sigma_s1 = at(&self.sigmas, i - 1, "sigmas")?;
                let (alpha_s1, sigma_s1v) = alpha_sigma(sigma_s1);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1v);
                let r0 = h_0 / h;
                let d1 = (&x0 - x0_prev)?.affine(1.0 / r0, 0.0)?;
                let base = lin2(sigma_t / sigma_s0v, &x, -(alpha_t * phi), &x0)?;
                let d1_coeff = match self.solver_type {
                    SolverType::Midpoint => -0.5 * (alpha_t * phi),
                    SolverType::Heun => alpha_t * (phi / h + 1.0),
                };
                (base + d1.affine(d1_coeff, 0.0)?)?
            }
            _ => lin2(sigma_t / sigma_s0v, &x, -(alpha_t * phi), &x0)?,
        };
        self.previous_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        restore(prev, model_output.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(at(&self.sigmas, i, "sigmas")?);
        let out = lin2(alpha_t, &upcast(original)?, sigma_t, &upcast(noise)?)?;
        restore(out, original.dtype())
    }

    fn kind(&self) -> SchedulerKind {
        if self.karras {
            SchedulerKind::DpmPp2mKarras
        } else {
            SchedulerKind::DpmPp2m
        }
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}
