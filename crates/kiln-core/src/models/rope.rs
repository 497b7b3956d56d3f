//! Multi-axis rotary position embedding for the transformer families (FLUX, Z-Image): per axis
//! of width `d`, frequencies `1 / theta^(2k / d)` in float64 times the position id, each
//! frequency repeated over its (interleaved) pair, the axes concatenated; applied in float32.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Where the angle is rounded before cos/sin: the pipelines differ in the last bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnglePrecision {
    /// cos/sin of the float64 angle, cast to float32 (diffusers' FluxPosEmbed).
    F64,
    /// The angle cast to float32 first (Z-Image's RopeEmbedder: `torch.polar` on a float32 table).
    F32,
}

/// Rotary tables `[1, N, 1, head_dim]` (cos, sin).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables for position ids `ids` (one `[a, b, c]` per token) over axes of `axes_dim`.
    pub(crate) fn new(
        ids: &[[f64; 3]],
        axes_dim: &[usize],
        theta: f64,
        precision: AnglePrecision,
        device: &Device,
    ) -> Result<Self> {
        let head_dim: usize = axes_dim.iter().sum();
        let mut cos = Vec::with_capacity(ids.len() * head_dim);
        let mut sin = Vec::with_capacity(ids.len() * head_dim);
        for id in ids {
            for (axis, &d) in axes_dim.iter().enumerate() {
                let pos = id.get(axis).copied().unwrap_or(0.0);
                for k in 0..d / 2 {
                    let freq = 1.0 / theta.powf((2 * k) as f64 / d as f64);
                    let angle = match precision {
                        AnglePrecision::F64 => pos * freq,
                        AnglePrecision::F32 => (pos * freq) as f32 as f64,
                    };
                    let (s, c) = (angle.sin() as f32, angle.cos() as f32);
                    cos.extend([c, c]);
                    sin.extend([s, s]);
                }
            }
        }
        let n = ids.len();
        Ok(Self {
            cos: Tensor::from_vec(cos, (1, n, 1, head_dim), device)?,
            sin: Tensor::from_vec(sin, (1, n, 1, head_dim), device)?,
        })
    }

    /// Both tables of `self` then `other` along the tokens.
    pub(crate) fn cat(&self, other: &Rope) -> Result<Self> {
        Ok(Self {
            cos: Tensor::cat(&[&self.cos, &other.cos], 1)?,
            sin: Tensor::cat(&[&self.sin, &other.sin], 1)?,
        })
    }

    /// diffusers' apply_rotary_emb (real form, pairs interleaved) on `[B, N, H, D]`, in float32.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, h, d) = x.dims4()?;
        let xf = x.to_dtype(DType::F32)?;
        let pairs = xf.reshape((b, n, h, d / 2, 2))?;
        let real = pairs.narrow(4, 0, 1)?;
        let imag = pairs.narrow(4, 1, 1)?;
        let rotated = Tensor::cat(&[&imag.neg()?, &real], 4)?.reshape((b, n, h, d))?;
        let out = (xf.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?)?;
        Ok(out.to_dtype(x.dtype())?)
    }
}
