//! diffusers' `Transformer2DModel` over continuous inputs, its `BasicTransformerBlock`
//! (self-attention, cross-attention, GEGLU feed-forward, pre-LayerNorm) and `Attention`.

use candle_core::{Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use kiln_kernels::{Conv2d, Epilogue, GroupNorm, Linear};

use super::config::AttentionPlan;
use crate::error::Result;

/// Plain scaled-dot-product attention over `[B, H, N, D]` query/key/value:
/// `softmax(q k^T * scale) v`. On CPU in f32, kiln's fused kernel (never materialises the score
/// matrix); elsewhere candle's ops, with half-precision scores going through the softmax in f32
/// (a sum over thousands of tokens loses too much in f16), matching torch's SDPA.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(kiln_kernels::attention(q, k, v, scale, false)?)
}

/// Loads `to_q`/`to_k`/`to_v`-style projections (no bias) as one layer computing them side by side.
fn fused_no_bias(in_dim: usize, out_dim: usize, names: &[&str], vb: &VarBuilder) -> Result<Linear> {
    let parts = names
        .iter()
        .map(|name| Ok((vb.pp(*name).get((out_dim, in_dim), "weight")?, None)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Linear::concat(&parts)?)
}

/// How q, k and v are projected: self-attention fuses all three into one gemm, cross-attention
/// fuses k and v (both read the text context).
#[derive(Debug, Clone)]
enum Projections {
    SelfAttention { qkv: Linear },
    CrossAttention { q: Linear, kv: Linear },
}

/// diffusers' `Attention` as used by `BasicTransformerBlock`: q/k/v without bias, to_out with.
/// The attention runs on the projections' `[B, N, heads * head_dim]` outputs directly.
#[derive(Debug, Clone)]
struct Attention {
    projections: Projections,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `context_dim: None` builds self-attention.
    fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let projections = match context_dim {
            None => Projections::SelfAttention {
                qkv: fused_no_bias(query_dim, inner, &["to_q", "to_k", "to_v"], &vb)?,
            },
            Some(context_dim) => Projections::CrossAttention {
                q: kiln_kernels::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
                kv: fused_no_bias(context_dim, inner, &["to_k", "to_v"], &vb)?,
            },
        };
        Ok(Self {
            projections,
            to_out: kiln_kernels::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
        })
    }

    /// `context` is used by cross-attention only.
    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let inner = self.heads * self.head_dim;
        let (q, k, v) = match &self.projections {
            Projections::SelfAttention { qkv } => {
                let qkv = qkv.forward(x)?;
                (qkv.narrow(2, 0, inner)?, qkv.narrow(2, inner, inner)?, qkv.narrow(2, 2 * inner, inner)?)
            }
            Projections::CrossAttention { q, kv } => {
                let kv = kv.forward(context)?;
                (q.forward(x)?, kv.narrow(2, 0, inner)?, kv.narrow(2, inner, inner)?)
            }
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = kiln_kernels::attention_bnc(&q, &k, &v, self.heads, scale, false)?;
        Ok(self.to_out.forward(&out)?)
    }
}

/// `FeedForward(activation_fn="geglu")`: `net.0` is GEGLU's projection to twice the inner
/// width, halves `hidden * gelu(gate)` (exact erf GELU, fused into the projection), `net.2`
/// projects back.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: kiln_kernels::linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            proj_out: kiln_kernels::linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.proj_out.forward(&self.proj_in.forward_with(x, Epilogue::Geglu)?)?)
    }
}

/// `BasicTransformerBlock` with norm_type "layer_norm" and cross-attention.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, plan: &AttentionPlan, vb: VarBuilder) -> Result<Self> {
        // diffusers' BasicTransformerBlock default norm_eps.
        let eps = 1e-5;
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, eps, vb.pp("norm1"))?,
            attn1: Attention::new(dim, None, plan.heads, plan.head_dim, vb.pp("attn1"))?,
            norm2: candle_nn::layer_norm(dim, eps, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                Some(plan.cross_attention_dim),
                plan.heads,
                plan.head_dim,
                vb.pp("attn2"),
            )?,
            norm3: candle_nn::layer_norm(dim, eps, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, context)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

/// `proj_in`/`proj_out`: Linear with `use_linear_projection`, else 1x1 Conv2d.
#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(in_dim: usize, out_dim: usize, linear: bool, vb: VarBuilder) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(kiln_kernels::linear(in_dim, out_dim, vb)?)
        } else {
            Projection::Conv(kiln_kernels::conv2d(in_dim, out_dim, 1, Default::default(), vb)?)
        })
    }
}

/// `Transformer2DModel` over a `[B, C, H, W]` feature map: group norm, project in, transformer
/// blocks over the H*W tokens, project out, add the input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(channels: usize, groups: usize, plan: &AttentionPlan, vb: VarBuilder) -> Result<Self> {
        let inner = plan.heads * plan.head_dim;
        let linear = plan.use_linear_projection;
        let blocks = (0..plan.transformer_layers)
            .map(|i| BasicTransformerBlock::new(inner, plan, vb.pp("transformer_blocks").pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            // Transformer2DModel's GroupNorm always uses eps 1e-6.
            norm: kiln_kernels::group_norm(groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(channels, inner, linear, vb.pp("proj_in"))?,
            blocks,
            proj_out: Projection::new(inner, channels, linear, vb.pp("proj_out"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // [B, C, H, W] -> [B, H*W, C]
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let channels = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, channels))?)
        };
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let channels = t.dim(2)?;
            Ok(t.reshape((b, h, w, channels))?.permute((0, 3, 1, 2))?.contiguous()?)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}
