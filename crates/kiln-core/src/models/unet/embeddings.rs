//! Timestep embeddings: diffusers' `get_timestep_embedding` (sinusoidal, computed in f32 as
//! torch does) and `TimestepEmbedding` (linear, SiLU, linear, with LCM's optional `cond_proj`).

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use crate::error::{Error, Result};

/// Sinusoidal embedding of each value in `timesteps`: a `[timesteps.len(), dim]` f32 tensor.
///
/// Follows diffusers' `get_timestep_embedding` (max_period 10000, scale 1) step by step in f32,
/// the precision torch uses there: `exp(-ln(10000) * i / (dim/2 - shift))`, times the timestep
/// rounded to f32, then `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`), zero-padded when
/// `dim` is odd.
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let neg_log_period = -(10000f64.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_log_period * i as f32) / denominator).exp()).collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args = freqs.iter().map(|f| t * f);
        let sin = args.clone().map(f32::sin);
        let cos = args.map(f32::cos);
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// diffusers' `TimestepEmbedding` with SiLU and no post-activation.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    cond_proj: Option<Linear>,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, out_dim: usize, cond_proj_dim: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let cond_proj = match cond_proj_dim {
            Some(d) => Some(candle_nn::linear_no_bias(d, in_dim, vb.pp("cond_proj"))?),
            None => None,
        };
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(out_dim, out_dim, vb.pp("linear_2"))?,
            cond_proj,
        })
    }

    /// `condition` is LCM's `timestep_cond`, projected and added to `sample` first.
    pub fn forward(&self, sample: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let sample = match (condition, &self.cond_proj) {
            (None, _) => sample.clone(),
            (Some(c), Some(proj)) => (sample + proj.forward(c)?)?,
            (Some(_), None) => {
                return Err(Error::arg(
                    "timestep_cond",
                    "this UNet has no time_cond_proj_dim, so it takes no timestep condition",
                ))
            }
        };
        let hidden = self.linear_1.forward(&sample)?.silu()?;
        Ok(self.linear_2.forward(&hidden)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_layout_matches_diffusers_formula() -> Result<()> {
        // dim 5: half 2, freqs [1, exp(-ln(1e4)/(2-1))] = [1, 1e-4], one zero pad.
        let t = timestep_embedding(&[2.0], 5, false, 1.0, &Device::Cpu)?.to_vec2::<f32>()?;
        let expected = [2f32.sin(), (2e-4f32).sin(), 2f32.cos(), (2e-4f32).cos(), 0.0];
        for (a, b) in t[0].iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{:?} vs {expected:?}", t[0]);
        }
        let flipped = timestep_embedding(&[2.0], 4, true, 1.0, &Device::Cpu)?.to_vec2::<f32>()?;
        assert!((flipped[0][0] - 2f32.cos()).abs() < 1e-6 && (flipped[0][2] - 2f32.sin()).abs() < 1e-6);
        Ok(())
    }
}
