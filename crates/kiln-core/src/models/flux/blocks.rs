//! FLUX.1's building blocks with diffusers' key names: the adaptive layer norms, the joint
//! (double-stream) and single-stream blocks, their attention with per-head RMS norms, and the
//! rotary position embedding over (text, row, column) ids.

use crate::error::Result;
use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;
use kiln_kernels::{linear, Linear};

pub(crate) use crate::models::rope::Rope;

/// LayerNorm without affine parameters (eps 1e-6), as every FLUX norm before modulation.
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let x = &x.contiguous()?;
    let ones = Tensor::ones(dim, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
    Ok(candle_nn::ops::layer_norm(x, &ones, &zeros, 1e-6)?)
}

/// `norm(x) * (1 + scale) + shift` with `[B, dim]` modulation broadcast over tokens.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let normed = layer_norm(x)?;
    Ok(normed.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)?)
}

/// `linear(silu(temb))` split into `n` `[B, dim]` chunks (diffusers' AdaLayerNorm* heads).
fn modulation(linear: &Linear, temb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let out = linear.forward(&temb.silu()?)?;
    Ok(out.chunk(n, D::Minus1)?)
}

/// diffusers' TimestepEmbedding / PixArtAlphaTextProjection: linear → SiLU → linear.
#[derive(Debug, Clone)]
pub(crate) struct Mlp2 {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp2 {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)?)
    }
}

/// q/k/v projections with per-head RMS norms on q and k (diffusers' FluxAttention inputs).
#[derive(Debug, Clone)]
struct Qkv {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
}

impl Qkv {
    fn new(dim: usize, head_dim: usize, names: [&str; 5], vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: linear(dim, dim, vb.pp(names[0]))?,
            to_k: linear(dim, dim, vb.pp(names[1]))?,
            to_v: linear(dim, dim, vb.pp(names[2]))?,
            norm_q: vb.pp(names[3]).get(head_dim, "weight")?,
            norm_k: vb.pp(names[4]).get(head_dim, "weight")?,
        })
    }

    /// `[B, N, H, D]` q (normed), k (normed), v.
    fn forward(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, n, c) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, n, heads, c / heads));
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(x)?)?;
        let v = split(self.to_v.forward(x)?)?;
        let q = candle_nn::ops::rms_norm(&q.contiguous()?, &self.norm_q, 1e-6)?;
        let k = candle_nn::ops::rms_norm(&k.contiguous()?, &self.norm_k, 1e-6)?;
        Ok((q, k, v))
    }
}

/// RoPE on q and k, then softmax attention over the joint sequence: `[B, N, H·D]`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let (b, n, h, d) = q.dims4()?;
    let q = rope.apply(q)?.reshape((b, n, h * d))?;
    let k = rope.apply(k)?.reshape((b, n, h * d))?;
    let v = v.reshape((b, n, h * d))?;
    let scale = 1.0 / (d as f64).sqrt();
    Ok(kiln_kernels::attention_bnc(&q, &k, &v, h, scale, false)?)
}

/// diffusers' FeedForward with `gelu-approximate`: `net.0.proj` → tanh-GELU → `net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: linear(dim, 4 * dim, vb.pp("net.0.proj"))?,
            out: linear(4 * dim, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.out.forward(&self.proj.forward(x)?.gelu()?)?)
    }
}

/// diffusers' FluxTransformerBlock: image and text streams with their own weights, attending
/// jointly (text tokens first).
#[derive(Debug, Clone)]
pub(crate) struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    img_qkv: Qkv,
    txt_qkv: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl DoubleBlock {
    pub(crate) fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("attn");
        Ok(Self {
            norm1: linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            norm1_context: linear(dim, 6 * dim, vb.pp("norm1_context.linear"))?,
            img_qkv: Qkv::new(dim, head_dim, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], &attn)?,
            txt_qkv: Qkv::new(
                dim,
                head_dim,
                ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
                &attn,
            )?,
            to_out: linear(dim, dim, attn.pp("to_out.0"))?,
            to_add_out: linear(dim, dim, attn.pp("to_add_out"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: FeedForward::new(dim, vb.pp("ff_context"))?,
            heads,
        })
    }

    /// Returns the updated (text, image) streams.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let m = modulation(&self.norm1, temb, 6)?;
        let c = modulation(&self.norm1_context, temb, 6)?;
        let norm_img = modulate(img, &m[0], &m[1])?;
        let norm_txt = modulate(txt, &c[0], &c[1])?;

        let (iq, ik, iv) = self.img_qkv.forward(&norm_img, self.heads)?;
        let (tq, tk, tv) = self.txt_qkv.forward(&norm_txt, self.heads)?;
        let q = Tensor::cat(&[&tq, &iq], 1)?;
        let k = Tensor::cat(&[&tk, &ik], 1)?;
        let v = Tensor::cat(&[&tv, &iv], 1)?;
        let joint = attend(&q, &k, &v, rope)?;
        let n_txt = txt.dim(1)?;
        let txt_attn = self.to_add_out.forward(&joint.narrow(1, 0, n_txt)?.contiguous()?)?;
        let img_attn = self.to_out.forward(&joint.narrow(1, n_txt, img.dim(1)?)?.contiguous()?)?;

        let gate = |g: &Tensor, x: &Tensor| -> Result<Tensor> { Ok(x.broadcast_mul(&g.unsqueeze(1)?)?) };
        let img = (img + gate(&m[2], &img_attn)?)?;
        let ff = self.ff.forward(&modulate(&img, &m[3], &m[4])?)?;
        let img = (&img + gate(&m[5], &ff)?)?;

        let txt = (txt + gate(&c[2], &txt_attn)?)?;
        let ff = self.ff_context.forward(&modulate(&txt, &c[3], &c[4])?)?;
        let txt = (&txt + gate(&c[5], &ff)?)?;
        Ok((clip_f16(txt)?, img))
    }
}

/// diffusers' FluxSingleTransformerBlock on the joint (text + image) sequence: attention and
/// MLP side by side from one modulated norm, one output projection.
#[derive(Debug, Clone)]
pub(crate) struct SingleBlock {
    norm: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    pub(crate) fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let mlp = 4 * dim;
        Ok(Self {
            norm: linear(dim, 3 * dim, vb.pp("norm.linear"))?,
            qkv: Qkv::new(dim, head_dim, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], &vb.pp("attn"))?,
            proj_mlp: linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: linear(dim + mlp, dim, vb.pp("proj_out"))?,
            heads,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope) -> Result<Tensor> {
        let m = modulation(&self.norm, temb, 3)?;
        let normed = modulate(x, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&normed)?.gelu()?;
        let (q, k, v) = self.qkv.forward(&normed, self.heads)?;
        let attn = attend(&q, &k, &v, rope)?;
        let out = self.proj_out.forward(&Tensor::cat(&[&attn, &mlp], 2)?)?;
        clip_f16((x + out.broadcast_mul(&m[2].unsqueeze(1)?)?)?)
    }
}

/// diffusers clamps f16 hidden states to the finite range after each block.
fn clip_f16(x: Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F16 {
        Ok(x.clamp(-65504f32, 65504f32)?)
    } else {
        Ok(x)
    }
}

/// diffusers' AdaLayerNormContinuous before `proj_out`: note scale comes before shift here.
#[derive(Debug, Clone)]
pub(crate) struct NormOut {
    linear: Linear,
}

impl NormOut {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear: linear(dim, 2 * dim, vb.pp("linear"))? })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = modulation(&self.linear, temb, 2)?;
        modulate(x, &m[1], &m[0])
    }
}
