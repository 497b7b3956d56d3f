//! Parameterisations: turning a model output into the predicted clean sample (x0) and noise
//! (eps), in the two forms diffusers uses, plus the small tensor helpers the solvers share.
//! Expressions follow diffusers' operation order so float32 rounding stays close to it.

use super::config::Prediction;
use crate::error::Result;
use candle_core::{DType, Tensor};

/// `a * x + b * y`.
pub(crate) fn lin2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

/// `x / d`, a true division as torch does with a scalar tensor (not a multiply by 1/d).
pub(crate) fn div(x: &Tensor, d: f64) -> Result<Tensor> {
    let d = Tensor::new(d as f32, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&d)?)
}

/// The solvers work in float32 whatever the latents' dtype (diffusers' k-diffusion style
/// schedulers upcast too); results are cast back by [`restore`].
pub(crate) fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// Casts a solver result back to the caller's dtype.
pub(crate) fn restore(t: Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?)
}

/// Variance-preserving form, `x_t = alpha * x0 + sigma * eps` (DDIM, PNDM, LCM, DPM-Solver):
/// `alpha` = sqrt(alpha_bar), `sigma` = sqrt(1 - alpha_bar). Returns (x0, eps).
pub(crate) fn vp_x0_eps(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f64,
    sigma: f64,
) -> Result<(Tensor, Tensor)> {
    match prediction {
        Prediction::Epsilon => {
            let x0 = div(&(sample - model_output.affine(sigma, 0.0)?)?, alpha)?;
            Ok((x0, model_output.clone()))
        }
        Prediction::Sample => {
            let eps = div(&(sample - model_output.affine(alpha, 0.0)?)?, sigma)?;
            Ok((model_output.clone(), eps))
        }
        Prediction::VPrediction => {
            let x0 = lin2(alpha, sample, -sigma, model_output)?;
            let eps = lin2(alpha, model_output, sigma, sample)?;
            Ok((x0, eps))
        }
    }
}

/// Variance-exploding (k-diffusion) form, `x = x0 + sigma * eps` with the model fed
/// `x / sqrt(sigma^2 + 1)` (Euler schedulers): the predicted x0.
pub(crate) fn ve_x0(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match prediction {
        Prediction::Epsilon => Ok((sample - model_output.affine(sigma, 0.0)?)?),
        Prediction::Sample => Ok(model_output.clone()),
        Prediction::VPrediction => {
            let sigma32 = sigma as f32;
            let c_out = -sigma32 / (sigma32 * sigma32 + 1.0).sqrt();
            let c_in = sigma32 * sigma32 + 1.0;
            Ok((model_output.affine(c_out as f64, 0.0)? + div(sample, c_in as f64)?)?)
        }
    }
}
