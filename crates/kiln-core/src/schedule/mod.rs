//! Schedulers, matching diffusers 0.42.1.
//!
//! As in stable-diffusion.cpp, the pieces are separate: the training noise schedule
//! ([`betas`]), timestep spacing ([`spacing`]) and sigma schedules ([`sigmas`]) are shared;
//! parameterisations (epsilon / v / sample → x0, eps) live in `param`; each solver has its own
//! file. All step maths run on tensors in float32 on the sample's device (the result is cast
//! back to the sample's dtype); schedule scalars are f64 computed from the same float32 tables
//! diffusers builds.
//!
//! A scheduler holds one run's multistep state; build a fresh one per run. The loop, as in
//! diffusers' pipelines (`start` = 0 for txt2img, [`strength_start`] for img2img):
//! ```text
//! let mut s = schedule::build(kind, &cfg, steps)?;
//! let mut x = if img2img { s.add_noise(&init, &rng.randn_like(&init)?, start)? }
//!             else { rng.randn(&shape, &dev, dtype)?.affine(s.init_noise_sigma(), 0.)? };
//! for i in start..s.timesteps().len() {          // PNDM has steps + 1 timesteps
//!     let out = unet(&s.scale_model_input(&x, i)?, s.timesteps()[i])?;
//!     x = s.step(&out, i, &x, &mut rng)?;
//! }
//! ```

pub mod betas;
pub mod config;
mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
pub mod flow_match;
mod lcm;
mod param;
mod pndm;
pub mod sigmas;
pub mod spacing;

pub use config::{FinalSigma, Prediction, SchedulerConfig, Spacing};
pub use flow_match::FlowInputs;

use crate::error::{Error, Result};
use crate::rng::BatchRng;
use candle_core::Tensor;

/// A configured scheduler for one run of `num_inference_steps`.
pub trait Scheduler: Send {
    /// diffusers' `scheduler.timesteps` after set_timesteps(n): what the UNet receives, in order.
    fn timesteps(&self) -> &[f64];
    /// diffusers' init_noise_sigma (multiplier for unit-normal initial latents).
    fn init_noise_sigma(&self) -> f64;
    /// diffusers' scale_model_input at absolute step index `i` (index into timesteps()).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;
    /// One solver step at absolute index i. `rng` supplies unit-normal draws (ancestral/LCM) in diffusers' order.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut BatchRng,
    ) -> Result<Tensor> {
        self.step_with_denoised(model_output, i, sample, rng, &mut Ok)
    }
    /// [`Scheduler::step`] with `denoised` applied to the solver's estimate of the clean sample
    /// (x0, or LCM's denoised sample) before the solver uses it: masked sampling re-imposes the
    /// known region there as well as on x_t. `denoised` gets and returns float32 tensors of the
    /// sample's shape. With the identity it equals `step` bit for bit (PNDM, which steps on eps,
    /// applies it to the x0 its eps implies and converts back, so it keeps a separate `step`).
    fn step_with_denoised(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut BatchRng,
        denoised: &mut DenoisedFn<'_>,
    ) -> Result<Tensor>;
    /// Whether [`Scheduler::step_with_denoised`] applies its transform (every solver here does;
    /// a future one without a clean-sample estimate returns false and ignores it).
    fn forms_denoised(&self) -> bool {
        true
    }
    /// diffusers' add_noise at index i (img2img noises the init latents to the first kept step).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor>;
    fn kind(&self) -> SchedulerKind;
    /// The sigma schedule (`scheduler.sigmas`, one longer than timesteps) for the sigma-based
    /// solvers (Euler, Euler ancestral, DPM-Solver); empty for the alpha-bar ones.
    fn sigmas(&self) -> &[f64] {
        &[]
    }
}

/// A transform of a solver's clean-sample estimate ([`Scheduler::step_with_denoised`]).
pub type DenoisedFn<'a> = dyn FnMut(Tensor) -> Result<Tensor> + 'a;

/// The solvers kiln offers, by CLI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    Lcm,
    Pndm,
    /// Flow matching (FLUX.1 and later transformer families); not for noise-prediction models.
    FlowEuler,
}

impl SchedulerKind {
    /// Every kind, in CLI order.
    pub const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::Lcm,
        SchedulerKind::Pndm,
        SchedulerKind::FlowEuler,
    ];

    /// The CLI name (`--scheduler`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpmpp-2m",
            Self::DpmPp2mKarras => "dpmpp-2m-karras",
            Self::Lcm => "lcm",
            Self::Pndm => "pndm",
            Self::FlowEuler => "flow-euler",
        }
    }

    /// The diffusers class this kind reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPp2m | Self::DpmPp2mKarras => "DPMSolverMultistepScheduler",
            Self::Lcm => "LCMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::FlowEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// Whether the kind samples flow-matching (velocity) models rather than noise predictors.
    pub fn is_flow(self) -> bool {
        self == Self::FlowEuler
    }

    /// The kind for a model folder's own scheduler class (`_class_name` of its config).
    pub fn from_class(class_name: &str, cfg: &SchedulerConfig) -> Result<Self> {
        match class_name {
            "DDIMScheduler" => Ok(Self::Ddim),
            "EulerDiscreteScheduler" => Ok(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Ok(Self::EulerAncestral),
            "LCMScheduler" => Ok(Self::Lcm),
            "PNDMScheduler" => Ok(Self::Pndm),
            "FlowMatchEulerDiscreteScheduler" => Ok(Self::FlowEuler),
            "DPMSolverMultistepScheduler" => {
                // kiln's DPM kinds force dpmsolver++ of order 2; a folder asking for anything else
                // would silently get a different sampler.
                let algorithm = cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++");
                let order = cfg.solver_order.unwrap_or(2);
                if algorithm != "dpmsolver++" || order != 2 {
                    return Err(Error::Unsupported(format!(
                        "DPMSolverMultistepScheduler with algorithm_type `{algorithm}` and solver_order {order} \
                         (kiln implements dpmsolver++ of order 2); pass --scheduler dpmpp-2m or another of: {}",
                        valid_names()
                    )));
                }
                if cfg.use_karras_sigmas.unwrap_or(false) {
                    Ok(Self::DpmPp2mKarras)
                } else {
                    Ok(Self::DpmPp2m)
                }
            }
            other => Err(Error::Unsupported(format!(
                "scheduler class `{other}`; pass --scheduler with one of: {}",
                valid_names()
            ))),
        }
    }
}

fn valid_names() -> String {
    SchedulerKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::arg("scheduler", format!("`{s}`: expected one of {}", valid_names())))
    }
}

/// Builds `kind` from a (possibly other class's) config, as
/// `XScheduler.from_config(cfg).set_timesteps(num_inference_steps)`; the DPM kinds force
/// `algorithm_type="dpmsolver++"`, `solver_order=2` and `use_karras_sigmas` per kind.
pub fn build(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    build_with(kind, cfg, num_inference_steps, &FlowInputs::default())
}

/// [`build`] with what a flow-matching pipeline passes `set_timesteps` (its sigmas and the
/// image's token count for dynamic shifting); the other kinds ignore `flow`.
pub fn build_with(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
    flow: &FlowInputs,
) -> Result<Box<dyn Scheduler>> {
    let train = cfg.num_train_timesteps.unwrap_or(1000);
    if num_inference_steps == 0 || num_inference_steps > train {
        return Err(Error::arg(
            "steps",
            format!(
                "{num_inference_steps}: must be between 1 and the scheduler's num_train_timesteps ({train})"
            ),
        ));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(cfg, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(cfg, num_inference_steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(euler_ancestral::EulerAncestral::new(cfg, num_inference_steps)?)
        }
        SchedulerKind::DpmPp2m => Box::new(dpmpp_2m::DpmPp2m::new(cfg, num_inference_steps, false)?),
        SchedulerKind::DpmPp2mKarras => Box::new(dpmpp_2m::DpmPp2m::new(cfg, num_inference_steps, true)?),
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(cfg, num_inference_steps)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(cfg, num_inference_steps)?),
        SchedulerKind::FlowEuler => {
            Box::new(flow_match::FlowMatchEuler::new(cfg, num_inference_steps, flow)?)
        }
    })
}

/// The float32 `alphas_cumprod` table `kind`'s diffusers class builds from `cfg` (before the
/// Euler/DPM classes pin its last entry under zero-SNR rescaling).
pub fn alphas_cumprod(kind: SchedulerKind, cfg: &SchedulerConfig) -> Result<Vec<f32>> {
    let class = kind.diffusers_class();
    let defaults = match kind {
        SchedulerKind::Lcm => &lcm::LCM_BETA_DEFAULTS,
        SchedulerKind::Pndm => &pndm::PNDM_BETA_DEFAULTS,
        _ => &betas::LINEAR_DEFAULTS,
    };
    Ok(betas::BetaConfig::resolve(cfg, class, defaults)?.alphas_cumprod())
}

/// diffusers' img2img start index: `init_timestep = min(int(n * strength), n)`,
/// `t_start = max(n - init_timestep, 0)`, times the scheduler order (1 for all of kiln's).
pub fn strength_start(num_steps: usize, strength: f64) -> usize {
    let init = ((num_steps as f64 * strength) as usize).min(num_steps);
    num_steps.saturating_sub(init)
}

/// The timestep or sigma-table entry at `i`, or an error naming the index.
pub(crate) fn at<T: Copy>(table: &[T], i: usize, what: &str) -> Result<T> {
    table.get(i).copied().ok_or_else(|| {
        Error::arg("step index", format!("{i} is past the end of the {what} ({} entries)", table.len()))
    })
}

/// The noise each ancestral/consistency step draws, checked against the sample's batch.
pub(crate) fn step_noise(rng: &mut BatchRng, sample: &Tensor) -> Result<Tensor> {
    rng.randn_like(sample)
}
