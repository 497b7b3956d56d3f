//! kiln's Z-Image transformer, matching diffusers 0.42's `ZImageTransformer2DModel` (its basic,
//! text-to-image mode): 2×2 latent patches and Qwen3 caption features embedded to one width,
//! each stream padded to a multiple of 32 tokens with a learned pad token and refined on its
//! own (noise refiner: timestep-modulated; context refiner: not), then one single-stream
//! sequence `[image, caption]` through the modulated main blocks, with 3-axis RoPE: caption
//! token `i` at `(1 + i, 0, 0)`, image patch `(h, w)` at `(captions + 1, h, w)`, image padding
//! at the origin. The network predicts `-velocity` at time `1 - sigma`; [`Denoiser::predict`]
//! returns the velocity at the scheduler's timestep, as FLUX's does.

mod blocks;

use crate::error::{Error, Result};
use crate::models::denoiser::{Denoiser, DenoiserCond};
use crate::models::rope::AnglePrecision;
use blocks::{rms_norm, Block, FinalLayer, Rope, TimestepEmbedder};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use kiln_kernels::{linear, Linear};
use serde::Deserialize;
use std::any::Any;
use std::path::Path;

/// Modulation width: the timestep embedding is `min(dim, 256)` wide.
const ADALN_DIM: usize = 256;
/// Each stream is padded to a multiple of this many tokens.
const SEQ_MULTIPLE: usize = 32;

/// The fields of a diffusers `ZImageTransformer2DModel` config.json that kiln reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ZImageConfig {
    #[serde(default = "default_patch")]
    pub all_patch_size: Vec<usize>,
    #[serde(default = "default_f_patch")]
    pub all_f_patch_size: Vec<usize>,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_dim")]
    pub dim: usize,
    #[serde(default = "default_layers")]
    pub n_layers: usize,
    #[serde(default = "default_refiner_layers")]
    pub n_refiner_layers: usize,
    #[serde(default = "default_heads")]
    pub n_heads: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub qk_norm: bool,
    #[serde(default = "default_cap_dim")]
    pub cap_feat_dim: usize,
    #[serde(default)]
    pub siglip_feat_dim: Option<usize>,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_t_scale")]
    pub t_scale: f64,
    #[serde(default = "default_axes_dims")]
    pub axes_dims: Vec<usize>,
    #[serde(default = "default_axes_lens")]
    pub axes_lens: Vec<usize>,
}

fn default_patch() -> Vec<usize> {
    vec![2]
}
fn default_f_patch() -> Vec<usize> {
    vec![1]
}
fn default_in_channels() -> usize {
    16
}
fn default_dim() -> usize {
    3840
}
fn default_layers() -> usize {
    30
}
fn default_refiner_layers() -> usize {
    2
}
fn default_heads() -> usize {
    30
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_cap_dim() -> usize {
    2560
}
fn default_theta() -> f64 {
    256.0
}
fn default_t_scale() -> f64 {
    1000.0
}
fn default_axes_dims() -> Vec<usize> {
    vec![32, 48, 48]
}
fn default_axes_lens() -> Vec<usize> {
    vec![1024, 512, 512]
}

impl ZImageConfig {
    /// Checks the shapes the model relies on, naming the config file on error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        if !self.all_patch_size.contains(&2) || !self.all_f_patch_size.contains(&1) {
            return bad(format!(
                "all_patch_size {:?} / all_f_patch_size {:?}: kiln runs the 2x2 (frame 1) patching ZImagePipeline uses",
                self.all_patch_size, self.all_f_patch_size
            ));
        }
        if !self.qk_norm {
            return bad("qk_norm false is not supported (Z-Image normalises q and k)".into());
        }
        if self.n_heads == 0 || self.dim % self.n_heads != 0 {
            return bad(format!("dim {} is not a multiple of n_heads {}", self.dim, self.n_heads));
        }
        let head_dim = self.dim / self.n_heads;
        if self.axes_dims.len() != 3
            || self.axes_lens.len() != 3
            || self.axes_dims.iter().sum::<usize>() != head_dim
            || self.axes_dims.iter().any(|d| d % 2 != 0)
        {
            return bad(format!(
                "axes_dims {:?} / axes_lens {:?} must be 3 even axes summing to the head width {head_dim}",
                self.axes_dims, self.axes_lens
            ));
        }
        Ok(())
    }
}

/// diffusers' `ZImageTransformer2DModel`; see the module docs.
#[derive(Debug, Clone)]
pub struct ZImageTransformer {
    config: ZImageConfig,
    dtype: DType,
    x_embedder: Linear,
    x_pad_token: Tensor,
    cap_norm: Tensor,
    cap_linear: Linear,
    cap_pad_token: Tensor,
    t_embedder: TimestepEmbedder,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    layers: Vec<Block>,
    final_layer: FinalLayer,
}

impl ZImageTransformer {
    pub fn new(config: &ZImageConfig, vb: VarBuilder) -> Result<Self> {
        let (dim, heads, eps) = (config.dim, config.n_heads, config.norm_eps);
        let patch = 4 * config.in_channels;
        let blocks = |prefix: &str, n: usize, modulated: bool| -> Result<Vec<Block>> {
            (0..n).map(|i| Block::new(dim, heads, eps, modulated, vb.pp(format!("{prefix}.{i}")))).collect()
        };
        Ok(Self {
            config: config.clone(),
            dtype: vb.dtype(),
            x_embedder: linear(patch, dim, vb.pp("all_x_embedder.2-1"))?,
            x_pad_token: vb.get((1, dim), "x_pad_token")?,
            cap_norm: vb.pp("cap_embedder.0").get(config.cap_feat_dim, "weight")?,
            cap_linear: linear(config.cap_feat_dim, dim, vb.pp("cap_embedder.1"))?,
            cap_pad_token: vb.get((1, dim), "cap_pad_token")?,
            t_embedder: TimestepEmbedder::new(dim.min(ADALN_DIM), vb.pp("t_embedder"))?,
            noise_refiner: blocks("noise_refiner", config.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", config.n_refiner_layers, false)?,
            layers: blocks("layers", config.n_layers, true)?,
            final_layer: FinalLayer::new(dim, patch, vb.pp("all_final_layer.2-1"))?,
        })
    }

    pub fn config(&self) -> &ZImageConfig {
        &self.config
    }

    /// The network's own output (diffusers' `model_out`) for latents `[B, C, h, w]`, caption
    /// features `[B, L, cap_feat_dim]` (every token real) and the network time `t` in [0, 1]
    /// (`1 - sigma`), the same for the batch.
    pub fn forward(&self, latents: &Tensor, caption: &Tensor, t: f64) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        let (ht, wt) = (h / 2, w / 2);
        let inputs = self.block_inputs(latents, caption, t)?;
        let mut x = inputs.image.clone();
        for i in 0..self.noise_refiner.len() {
            x = self.block(ZImageBlock::NoiseRefiner, i, &x, &inputs)?;
        }
        let mut cap = inputs.caption.clone();
        for i in 0..self.context_refiner.len() {
            cap = self.block(ZImageBlock::ContextRefiner, i, &cap, &inputs)?;
        }
        let mut seq = Tensor::cat(&[&x, &cap], 1)?;
        for i in 0..self.layers.len() {
            seq = self.block(ZImageBlock::Main, i, &seq, &inputs)?;
        }
        let out = self.final_layer.forward(&seq, &inputs.adaln)?.narrow(1, 0, ht * wt)?;
        Ok(out.reshape((b, ht, wt, 2, 2, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, h, w))?)
    }

    /// The embedded, padded image and caption streams, the timestep embedding and the RoPE
    /// tables that the blocks of one forward read (public so that benchmarks can time blocks one
    /// at a time); arguments as [`Self::forward`].
    pub fn block_inputs(&self, latents: &Tensor, caption: &Tensor, t: f64) -> Result<ZImageBlockInputs> {
        let (b, c, h, w) = latents.dims4()?;
        let (ht, wt) = (h / 2, w / 2);
        let n_img = ht * wt;
        let n_cap = caption.dim(1)?;
        let (img_len, cap_len) = (round_up(n_img), round_up(n_cap));
        let device = latents.device();
        let axes = &self.config.axes_dims;
        let theta = self.config.rope_theta;
        // The position ids must index the RoPE tables (diffusers precomputes axes_lens rows).
        let lens = &self.config.axes_lens;
        if cap_len + 1 >= lens[0] || ht > lens[1] || wt > lens[2] {
            return Err(Error::arg(
                "size",
                format!(
                    "{cap_len} caption tokens and a {ht}x{wt} patch grid exceed the transformer's axes_lens {lens:?}"
                ),
            ));
        }

        // diffusers computes (1000 - t) / 1000 and then times t_scale in float32.
        let t_net = (t as f32) * self.config.t_scale as f32;
        let adaln = self.t_embedder.forward(&vec![t_net; b], self.dtype, device)?;

        // Image: patches with features ordered (row in patch, column in patch, channel).
        let x =
            latents.reshape((b, c, ht, 2, wt, 2))?.permute((0, 2, 4, 3, 5, 1))?.reshape((b, n_img, 4 * c))?;
        let image = pad_with(&self.x_embedder.forward(&x)?, &self.x_pad_token, img_len)?;
        let mut img_ids: Vec<[f64; 3]> = Vec::with_capacity(img_len);
        for i in 0..ht {
            for j in 0..wt {
                img_ids.push([(cap_len + 1) as f64, i as f64, j as f64]);
            }
        }
        img_ids.resize(img_len, [0.0; 3]);
        let img_rope = Rope::new(&img_ids, axes, theta, AnglePrecision::F32, device)?;

        // Caption: RMSNorm + linear, padded with its own learned token.
        let cap = rms_norm(caption, &self.cap_norm, self.config.norm_eps)?;
        let caption = pad_with(&self.cap_linear.forward(&cap)?, &self.cap_pad_token, cap_len)?;
        let cap_ids: Vec<[f64; 3]> = (0..cap_len).map(|i| [(1 + i) as f64, 0.0, 0.0]).collect();
        let cap_rope = Rope::new(&cap_ids, axes, theta, AnglePrecision::F32, device)?;
        let rope = img_rope.cat(&cap_rope)?;
        Ok(ZImageBlockInputs { image, caption, adaln, img_rope, cap_rope, rope })
    }

    /// Block `i` of one kind on `x`: the padded image stream (noise refiner), the padded caption
    /// (context refiner) or the joint `[image, caption]` sequence (main blocks).
    pub fn block(
        &self,
        kind: ZImageBlock,
        i: usize,
        x: &Tensor,
        inputs: &ZImageBlockInputs,
    ) -> Result<Tensor> {
        match kind {
            ZImageBlock::NoiseRefiner => {
                self.noise_refiner[i].forward(x, &inputs.img_rope, Some(&inputs.adaln))
            }
            ZImageBlock::ContextRefiner => self.context_refiner[i].forward(x, &inputs.cap_rope, None),
            ZImageBlock::Main => self.layers[i].forward(x, &inputs.rope, Some(&inputs.adaln)),
        }
    }
}

/// The three kinds of Z-Image block, for [`ZImageTransformer::block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZImageBlock {
    NoiseRefiner,
    ContextRefiner,
    Main,
}

/// What [`ZImageTransformer::block_inputs`] returns: the embedded image and caption streams
/// (each padded to a multiple of 32 tokens), the timestep embedding and the RoPE tables.
#[derive(Debug, Clone)]
pub struct ZImageBlockInputs {
    pub image: Tensor,
    pub caption: Tensor,
    pub adaln: Tensor,
    img_rope: Rope,
    cap_rope: Rope,
    rope: Rope,
}

/// Multiples of [`SEQ_MULTIPLE`] tokens.
fn round_up(n: usize) -> usize {
    n.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE
}

/// `x` `[B, n, dim]` followed by copies of `token` `[1, dim]` up to `len` tokens.
fn pad_with(x: &Tensor, token: &Tensor, len: usize) -> Result<Tensor> {
    let (b, n, dim) = x.dims3()?;
    if n == len {
        return Ok(x.clone());
    }
    let pad = token.to_dtype(x.dtype())?.reshape((1, 1, dim))?.broadcast_as((b, len - n, dim))?;
    Ok(Tensor::cat(&[x, &pad.contiguous()?], 1)?)
}

impl Denoiser for ZImageTransformer {
    /// Rows may carry captions of different lengths (`cond.token_lens`, zero-padded past them):
    /// rows of one length run together, as diffusers' batch with its attention mask computes.
    fn predict(&self, latents: &Tensor, timestep: f64, cond: &DenoiserCond) -> Result<Tensor> {
        let (b, c, _, _) = latents.dims4()?;
        if c != self.config.in_channels {
            return Err(Error::arg(
                "latents",
                format!("{c} channels; this Z-Image transformer takes {}", self.config.in_channels),
            ));
        }
        if cond.tokens.dim(2)? != self.config.cap_feat_dim {
            return Err(Error::arg(
                "text embeddings",
                format!(
                    "width {}; this Z-Image transformer takes cap_feat_dim {}",
                    cond.tokens.dim(2)?,
                    self.config.cap_feat_dim
                ),
            ));
        }
        // ZImagePipeline: the network time is (1000 - t) / 1000, and the velocity is -model_out.
        let t = ((1000.0 - timestep as f32) / 1000.0) as f64;
        let full = cond.tokens.dim(1)?;
        let lens: Vec<usize> = match cond.token_lens {
            Some(l) if l.len() == b => l.to_vec(),
            _ => vec![full; b],
        };
        let mut outs = Vec::with_capacity(b);
        let mut start = 0;
        while start < b {
            let len = lens[start];
            let mut end = start + 1;
            while end < b && lens[end] == len {
                end += 1;
            }
            let caption = cond.tokens.narrow(0, start, end - start)?.narrow(1, 0, len.clamp(1, full))?;
            outs.push(self.forward(&latents.narrow(0, start, end - start)?, &caption, t)?);
            start = end;
        }
        Ok(Tensor::cat(&outs, 0)?.neg()?)
    }

    fn in_channels(&self) -> usize {
        self.config.in_channels
    }

    fn patch_size(&self) -> usize {
        2
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_pad_to_multiples_of_32() {
        assert_eq!(round_up(1), 32);
        assert_eq!(round_up(32), 32);
        assert_eq!(round_up(33), 64);
    }
}
