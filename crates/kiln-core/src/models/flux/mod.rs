//! kiln's FLUX.1 transformer, matching diffusers 0.42's `FluxTransformer2DModel`: 2×2-packed
//! latent tokens and T5 tokens embedded to one width, timestep (+ distilled guidance, dev) +
//! pooled CLIP embedding as the modulation signal, double-stream blocks, then single-stream
//! blocks over the joint sequence, with 3-axis RoPE (text ids are zero; image ids are (0, row,
//! column) of the packed grid). Built from the diffusers config.json with diffusers' key names.

mod blocks;

use crate::error::{Error, Result};
use crate::models::denoiser::{pack_2x2, unpack_2x2, Denoiser, DenoiserCond};
use crate::models::rope::AnglePrecision;
use crate::models::unet::timestep_embedding;
use blocks::{DoubleBlock, Mlp2, NormOut, Rope, SingleBlock};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use kiln_kernels::{linear, Linear};
use serde::Deserialize;
use std::any::Any;
use std::path::Path;

/// Width of the sinusoidal timestep / guidance projection (diffusers' `Timesteps(256, ...)`).
const TIME_PROJ_DIM: usize = 256;
const ROPE_THETA: f64 = 10000.0;

/// The fields of a diffusers `FluxTransformer2DModel` config.json that kiln reads.
#[derive(Debug, Clone, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_joint_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "default_pooled_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}
fn default_in_channels() -> usize {
    64
}
fn default_layers() -> usize {
    19
}
fn default_single_layers() -> usize {
    38
}
fn default_head_dim() -> usize {
    128
}
fn default_heads() -> usize {
    24
}
fn default_joint_dim() -> usize {
    4096
}
fn default_pooled_dim() -> usize {
    768
}
fn default_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxConfig {
    /// Checks the shapes the model relies on, naming the config file on error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        if self.patch_size != 1 {
            return bad(format!(
                "patch_size {} (FLUX.1 packs 2x2 latents outside the model: 1)",
                self.patch_size
            ));
        }
        if self.in_channels == 0 || self.in_channels % 4 != 0 {
            return bad(format!("in_channels {} is not 4 x the latent channels", self.in_channels));
        }
        if self.axes_dims_rope.len() != 3
            || self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
        {
            return bad(format!(
                "axes_dims_rope {:?} must be 3 axes summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return bad(format!("axes_dims_rope {:?} must be even", self.axes_dims_rope));
        }
        Ok(())
    }

    /// The model width: heads × head size.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// diffusers' `FluxTransformer2DModel`; see the module docs.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    config: FluxConfig,
    dtype: DType,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp2,
    guidance_embedder: Option<Mlp2>,
    text_embedder: Mlp2,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: NormOut,
    proj_out: Linear,
}

impl FluxTransformer {
    pub fn new(config: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        let dim = config.inner_dim();
        let heads = config.num_attention_heads;
        let head_dim = config.attention_head_dim;
        let out_channels = config.out_channels.unwrap_or(config.in_channels);
        let tte = vb.pp("time_text_embed");
        let double_blocks = (0..config.num_layers)
            .map(|i| DoubleBlock::new(dim, heads, head_dim, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| SingleBlock::new(dim, heads, head_dim, vb.pp(format!("single_transformer_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            dtype: vb.dtype(),
            x_embedder: linear(config.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(config.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            timestep_embedder: Mlp2::new(TIME_PROJ_DIM, dim, tte.pp("timestep_embedder"))?,
            guidance_embedder: if config.guidance_embeds {
                Some(Mlp2::new(TIME_PROJ_DIM, dim, tte.pp("guidance_embedder"))?)
            } else {
                None
            },
            text_embedder: Mlp2::new(config.pooled_projection_dim, dim, tte.pp("text_embedder"))?,
            double_blocks,
            single_blocks,
            norm_out: NormOut::new(dim, vb.pp("norm_out"))?,
            proj_out: linear(dim, out_channels, vb.pp("proj_out"))?,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// diffusers' forward on packed tokens `[B, N, in_channels]` of an `h2`×`w2` patch grid,
    /// T5 tokens `[B, L, joint_attention_dim]`, pooled CLIP `[B, pooled_projection_dim]`, the
    /// scheduler timestep (0..1000) and the distilled guidance `[B]` (dev only).
    pub fn forward_packed(
        &self,
        tokens: &Tensor,
        grid: (usize, usize),
        text: &Tensor,
        pooled: &Tensor,
        timestep: f64,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let inputs = self.block_inputs(tokens, grid, text, pooled, timestep, guidance)?;
        let (mut txt, mut img) = (inputs.txt.clone(), inputs.img.clone());
        for i in 0..self.double_blocks.len() {
            (txt, img) = self.double_block(i, &img, &txt, &inputs)?;
        }
        let mut joint = Tensor::cat(&[&txt, &img], 1)?;
        for i in 0..self.single_blocks.len() {
            joint = self.single_block(i, &joint, &inputs)?;
        }
        let img = joint.narrow(1, txt.dim(1)?, img.dim(1)?)?;
        let img = self.norm_out.forward(&img, &inputs.temb)?;
        Ok(self.proj_out.forward(&img)?)
    }

    /// The embedded streams, modulation signal and RoPE that every block of one forward reads
    /// (public so that benchmarks can time blocks one at a time); arguments as [`Self::forward_packed`].
    pub fn block_inputs(
        &self,
        tokens: &Tensor,
        grid: (usize, usize),
        text: &Tensor,
        pooled: &Tensor,
        timestep: f64,
        guidance: Option<&Tensor>,
    ) -> Result<FluxBlockInputs> {
        let (b, n, _) = tokens.dims3()?;
        let device = tokens.device();
        let text_len = text.dim(1)?;
        let img = self.x_embedder.forward(&tokens.to_dtype(self.dtype)?)?;
        let txt = self.context_embedder.forward(&text.to_dtype(self.dtype)?)?;

        // FluxPipeline passes t / 1000 in the latents' dtype and the model multiplies by 1000,
        // each op rounding to that dtype.
        let round = |x: f32| round_to(self.dtype, x);
        let t = round(round(round(timestep as f32) / 1000.0) * 1000.0);
        let t_proj =
            timestep_embedding(&vec![t; b], TIME_PROJ_DIM, true, 0.0, device)?.to_dtype(self.dtype)?;
        let mut temb = self.timestep_embedder.forward(&t_proj)?;
        match (&self.guidance_embedder, guidance) {
            (Some(embedder), Some(g)) => {
                let g = g.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let g: Vec<f32> =
                    g.iter().map(|&v| round_to(self.dtype, round_to(self.dtype, v) * 1000.0)).collect();
                let g_proj =
                    timestep_embedding(&g, TIME_PROJ_DIM, true, 0.0, device)?.to_dtype(self.dtype)?;
                temb = (temb + embedder.forward(&g_proj)?)?;
            }
            (Some(_), None) => {
                return Err(Error::arg("guidance", "this FLUX transformer embeds guidance (guidance_embeds)"))
            }
            (None, _) => {}
        }
        let temb = (temb + self.text_embedder.forward(&pooled.to_dtype(self.dtype)?)?)?;

        let (h2, w2) = grid;
        if h2 * w2 != n {
            return Err(Error::arg("latents", format!("{n} tokens do not form a {h2}x{w2} grid")));
        }
        let mut ids = vec![[0f64; 3]; text_len];
        for r in 0..h2 {
            for c in 0..w2 {
                ids.push([0.0, r as f64, c as f64]);
            }
        }
        let rope = Rope::new(&ids, &self.config.axes_dims_rope, ROPE_THETA, AnglePrecision::F64, device)?;
        Ok(FluxBlockInputs { txt, img, temb, rope })
    }

    /// Double-stream block `i` on the (image, text) streams: the updated (text, image).
    pub fn double_block(
        &self,
        i: usize,
        img: &Tensor,
        txt: &Tensor,
        inputs: &FluxBlockInputs,
    ) -> Result<(Tensor, Tensor)> {
        self.double_blocks[i].forward(img, txt, &inputs.temb, &inputs.rope)
    }

    /// Single-stream block `i` on the joint `[text, image]` sequence.
    pub fn single_block(&self, i: usize, joint: &Tensor, inputs: &FluxBlockInputs) -> Result<Tensor> {
        self.single_blocks[i].forward(joint, &inputs.temb, &inputs.rope)
    }
}

/// What [`FluxTransformer::block_inputs`] returns: the embedded text and image streams before
/// the first block, the modulation signal and the joint sequence's RoPE.
#[derive(Debug, Clone)]
pub struct FluxBlockInputs {
    pub txt: Tensor,
    pub img: Tensor,
    pub temb: Tensor,
    rope: Rope,
}

/// `x` rounded to `dtype`, as torch rounds each op's result in half precision.
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl Denoiser for FluxTransformer {
    fn predict(&self, latents: &Tensor, timestep: f64, cond: &DenoiserCond) -> Result<Tensor> {
        let (_, c, h, w) = latents.dims4()?;
        if 4 * c != self.config.in_channels {
            return Err(Error::arg(
                "latents",
                format!(
                    "{c} channels; this FLUX transformer takes {} (packed 2x2)",
                    self.config.in_channels / 4
                ),
            ));
        }
        let pooled =
            cond.pooled.ok_or_else(|| Error::arg("pooled", "FLUX needs the pooled CLIP text embedding"))?;
        let tokens = pack_2x2(latents)?;
        let out =
            self.forward_packed(&tokens, (h / 2, w / 2), cond.tokens, pooled, timestep, cond.guidance)?;
        unpack_2x2(&out, h, w)
    }

    fn in_channels(&self) -> usize {
        self.config.in_channels / 4
    }

    fn patch_size(&self) -> usize {
        2
    }

    fn embeds_guidance(&self) -> bool {
        self.config.guidance_embeds
    }

    /// FluxPipeline: `torch.full([B], guidance_scale, dtype=float32)` when `guidance_embeds`.
    fn guidance_input(&self, g: f64, b: usize, device: &Device) -> Result<Option<Tensor>> {
        if !self.config.guidance_embeds {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(vec![g as f32; b], b, device)?))
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
