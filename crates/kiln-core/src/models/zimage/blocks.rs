//! Z-Image's building blocks with diffusers' key names: the single-stream transformer block
//! (optionally tanh-gated adaLN-modulated), its attention with per-head RMS norms, the
//! SwiGLU feed-forward, the final layer, the timestep embedder and the 3-axis RoPE tables.

use crate::error::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use kiln_kernels::{linear, linear_no_bias, Linear};

pub(crate) use crate::models::rope::Rope;

/// diffusers' RMSNorm (float32 statistics, then the weight).
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)?)
}

/// diffusers' ZImageTransformerBlock: pre-norm attention and SwiGLU feed-forward, each
/// post-normed too; with modulation, `x · (1 + scale)` in and a `tanh(gate)` on the residual.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    w1: Linear,
    w2: Linear,
    w3: Linear,
    attention_norm1: Tensor,
    attention_norm2: Tensor,
    ffn_norm1: Tensor,
    ffn_norm2: Tensor,
    modulation: Option<Linear>,
    heads: usize,
    eps: f64,
}

impl Block {
    pub(crate) fn new(dim: usize, heads: usize, eps: f64, modulated: bool, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / heads;
        let hidden = (dim as f64 / 3.0 * 8.0) as usize;
        let attn = vb.pp("attention");
        let ff = vb.pp("feed_forward");
        let norm = |name: &str| vb.pp(name).get(dim, "weight");
        Ok(Self {
            to_q: linear_no_bias(dim, dim, attn.pp("to_q"))?,
            to_k: linear_no_bias(dim, dim, attn.pp("to_k"))?,
            to_v: linear_no_bias(dim, dim, attn.pp("to_v"))?,
            to_out: linear_no_bias(dim, dim, attn.pp("to_out.0"))?,
            norm_q: attn.pp("norm_q").get(head_dim, "weight")?,
            norm_k: attn.pp("norm_k").get(head_dim, "weight")?,
            w1: linear_no_bias(dim, hidden, ff.pp("w1"))?,
            w2: linear_no_bias(hidden, dim, ff.pp("w2"))?,
            w3: linear_no_bias(dim, hidden, ff.pp("w3"))?,
            attention_norm1: norm("attention_norm1")?,
            attention_norm2: norm("attention_norm2")?,
            ffn_norm1: norm("ffn_norm1")?,
            ffn_norm2: norm("ffn_norm2")?,
            modulation: if modulated {
                Some(linear(dim.min(super::ADALN_DIM), 4 * dim, vb.pp("adaLN_modulation.0"))?)
            } else {
                None
            },
            heads,
            eps,
        })
    }

    /// `x` `[B, N, dim]`; `adaln` `[B, 256]` (the timestep embedding) for modulated blocks.
    pub(crate) fn forward(&self, x: &Tensor, rope: &Rope, adaln: Option<&Tensor>) -> Result<Tensor> {
        let eps = self.eps;
        let mods = match (&self.modulation, adaln) {
            (Some(lin), Some(c)) => {
                // No SiLU before this projection (unlike the final layer's).
                let m = lin.forward(c)?.unsqueeze(1)?.chunk(4, D::Minus1)?;
                Some(((&m[0] + 1.0)?, m[1].tanh()?, (&m[2] + 1.0)?, m[3].tanh()?))
            }
            _ => None,
        };
        let h = rms_norm(x, &self.attention_norm1, eps)?;
        let h = match &mods {
            Some((scale_msa, ..)) => h.broadcast_mul(scale_msa)?,
            None => h,
        };
        let a = rms_norm(&self.attention(&h, rope)?, &self.attention_norm2, eps)?;
        let x = match &mods {
            Some((_, gate_msa, ..)) => (x + a.broadcast_mul(gate_msa)?)?,
            None => (x + a)?,
        };
        let h = rms_norm(&x, &self.ffn_norm1, eps)?;
        let h = match &mods {
            Some((_, _, scale_mlp, _)) => h.broadcast_mul(scale_mlp)?,
            None => h,
        };
        let f = (self.w1.forward(&h)?.silu()? * self.w3.forward(&h)?)?;
        let f = rms_norm(&self.w2.forward(&f)?, &self.ffn_norm2, eps)?;
        Ok(match &mods {
            Some((.., gate_mlp)) => (x + f.broadcast_mul(gate_mlp)?)?,
            None => (x + f)?,
        })
    }

    /// Self-attention over the whole sequence (every token attends to every token).
    fn attention(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (h, d) = (self.heads, c / self.heads);
        let split = |t: Tensor| t.reshape((b, n, h, d));
        // diffusers' Attention builds its q/k RMS norms with eps 1e-5 whatever norm_eps says.
        let q = rms_norm(&split(self.to_q.forward(x)?)?, &self.norm_q, 1e-5)?;
        let k = rms_norm(&split(self.to_k.forward(x)?)?, &self.norm_k, 1e-5)?;
        let v = self.to_v.forward(x)?;
        let q = rope.apply(&q)?.reshape((b, n, c))?;
        let k = rope.apply(&k)?.reshape((b, n, c))?;
        let out = kiln_kernels::attention_bnc(&q, &k, &v, h, 1.0 / (d as f64).sqrt(), false)?;
        Ok(self.to_out.forward(&out)?)
    }
}

/// diffusers' FinalLayer: affine-free LayerNorm (eps 1e-6) · `(1 + linear(silu(c)))`, then the
/// projection to patch features.
#[derive(Debug, Clone)]
pub(crate) struct FinalLayer {
    modulation: Linear,
    linear: Linear,
}

impl FinalLayer {
    pub(crate) fn new(dim: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            modulation: linear(dim.min(super::ADALN_DIM), dim, vb.pp("adaLN_modulation.1"))?,
            linear: linear(dim, out, vb.pp("linear"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let ones = Tensor::ones(dim, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
        let normed = candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, 1e-6)?;
        let scale = (self.modulation.forward(&c.silu()?)? + 1.0)?.unsqueeze(1)?;
        Ok(self.linear.forward(&normed.broadcast_mul(&scale)?)?)
    }
}

/// diffusers' Z-Image TimestepEmbedder: a 256-wide `[cos, sin]` sinusoid (float32, max period
/// 10000) → linear (1024) → SiLU → linear.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

/// Width of the sinusoid and hidden width of the timestep MLP (fixed in diffusers).
const FREQ_DIM: usize = 256;
const MID_DIM: usize = 1024;

impl TimestepEmbedder {
    pub(crate) fn new(out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(FREQ_DIM, MID_DIM, vb.pp("mlp.0"))?,
            linear_2: linear(MID_DIM, out, vb.pp("mlp.2"))?,
        })
    }

    /// `t` per batch row (already times `t_scale`) → `[B, out]` in `dtype`.
    pub(crate) fn forward(&self, t: &[f32], dtype: DType, device: &Device) -> Result<Tensor> {
        let half = FREQ_DIM / 2;
        let neg_log = -(10000f64.ln() as f32);
        let freqs: Vec<f32> = (0..half).map(|k| (neg_log * k as f32 / half as f32).exp()).collect();
        let mut data = Vec::with_capacity(t.len() * FREQ_DIM);
        for &tv in t {
            let args: Vec<f64> = freqs.iter().map(|f| (tv * f) as f64).collect();
            data.extend(args.iter().map(|a| a.cos() as f32));
            data.extend(args.iter().map(|a| a.sin() as f32));
        }
        let emb = Tensor::from_vec(data, (t.len(), FREQ_DIM), device)?.to_dtype(dtype)?;
        Ok(self.linear_2.forward(&self.linear_1.forward(&emb)?.silu()?)?)
    }
}
