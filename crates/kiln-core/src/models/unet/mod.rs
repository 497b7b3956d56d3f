//! kiln's `UNet2DConditionModel`, matching diffusers 0.42: SD 1.x / 2.x / XL UNets (including
//! SDXL's text_time add-embedding, LCM's `time_cond_proj_dim` and 9-channel inpainting UNets),
//! built entirely from the diffusers config.json with diffusers' state-dict key names.

mod blocks;
mod config;
mod embeddings;
mod resnet;
mod transformer;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use kiln_kernels::{Conv2d, GroupNorm};

pub use config::{PerBlock, UNetConfig};
pub use embeddings::timestep_embedding;
pub use transformer::scaled_dot_product_attention;

use crate::error::{Error, Result};
use blocks::{DownBlock, MidBlock, UpBlock};
use config::TextTimePlan;
use embeddings::TimestepEmbedding;
use resnet::NormSpec;

/// Conditioning inputs of one UNet call.
#[derive(Debug, Clone, Copy)]
pub struct UNetCond<'a> {
    /// Text encoder hidden states, `[B, tokens, cross_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// SDXL text_time: pooled text embeddings, `[B, pooled_dim]`.
    pub text_embeds: Option<&'a Tensor>,
    /// SDXL text_time: `[B, 6]` (original h, w, crop top, left, target h, w).
    pub time_ids: Option<&'a Tensor>,
    /// Guidance embedding of `time_cond_proj_dim` UNets (LCM-distilled), `[B, time_cond_proj_dim]`.
    pub timestep_cond: Option<&'a Tensor>,
}

impl<'a> UNetCond<'a> {
    /// Conditioning with text hidden states only (SD 1.x / 2.x).
    pub fn text(encoder_hidden_states: &'a Tensor) -> Self {
        Self { encoder_hidden_states, text_embeds: None, time_ids: None, timestep_cond: None }
    }
}

/// SDXL's `add_time_proj` + `add_embedding`.
#[derive(Debug, Clone)]
struct TextTimeEmbedding {
    plan: TextTimePlan,
    add_embedding: TimestepEmbedding,
}

/// diffusers' `UNet2DConditionModel`; see the module docs.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    dtype: DType,
    conv_in: Conv2d,
    time_proj_dim: usize,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// Turns candle's VarBuilder shape error into [`Error::ShapeMismatch`] naming the tensor.
fn weight_error(err: Error) -> Error {
    fn shape_mismatch(e: &candle_core::Error) -> Option<Error> {
        match e {
            candle_core::Error::UnexpectedShape { msg, expected, got } => Some(Error::ShapeMismatch {
                name: msg.strip_prefix("shape mismatch for ").unwrap_or(msg).to_string(),
                expected: expected.dims().to_vec(),
                found: got.dims().to_vec(),
            }),
            candle_core::Error::WithBacktrace { inner, .. }
            | candle_core::Error::Context { inner, .. }
            | candle_core::Error::WithPath { inner, .. } => shape_mismatch(inner),
            _ => None,
        }
    }
    match &err {
        Error::Candle(e) => shape_mismatch(e).unwrap_or(err),
        _ => err,
    }
}

impl UNet2DConditionModel {
    /// Builds the UNet described by `cfg` from `vb` (diffusers' key names; the model runs in
    /// `vb`'s dtype). Refuses configs kiln does not implement with [`Error::Unsupported`] and
    /// wrongly shaped weights with [`Error::ShapeMismatch`].
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, vb).map_err(weight_error)
    }

    fn build(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let plan = cfg.plan()?;
        let norm = NormSpec { groups: plan.groups, eps: cfg.norm_eps };
        let ch0 = cfg.block_out_channels[0];
        let temb = plan.time_embed_dim;
        let conv_cfg = |k: usize| Conv2dConfig { padding: (k - 1) / 2, ..Default::default() };
        let conv_in = kiln_kernels::conv2d(
            cfg.in_channels,
            ch0,
            cfg.conv_in_kernel,
            conv_cfg(cfg.conv_in_kernel),
            vb.pp("conv_in"),
        )?;
        let time_embedding =
            TimestepEmbedding::new(ch0, temb, cfg.time_cond_proj_dim, vb.pp("time_embedding"))?;
        let text_time = match plan.text_time {
            Some(tt) => Some(TextTimeEmbedding {
                plan: tt,
                add_embedding: TimestepEmbedding::new(
                    tt.projection_input_dim,
                    temb,
                    None,
                    vb.pp("add_embedding"),
                )?,
            }),
            None => None,
        };
        let down_blocks = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, p)| {
                DownBlock::new(p, temb, norm, cfg.downsample_padding, vb.pp("down_blocks").pp(i.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_block = match &plan.mid {
            Some((channels, attn)) => Some(MidBlock::new(
                *channels,
                attn,
                temb,
                norm,
                cfg.mid_block_scale_factor,
                vb.pp("mid_block"),
            )?),
            None => None,
        };
        let up_blocks = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, p)| UpBlock::new(p, temb, norm, vb.pp("up_blocks").pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = kiln_kernels::group_norm(plan.groups, ch0, cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = kiln_kernels::conv2d(
            ch0,
            cfg.out_channels,
            cfg.conv_out_kernel,
            conv_cfg(cfg.conv_out_kernel),
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            config: cfg.clone(),
            dtype: vb.dtype(),
            conv_in,
            time_proj_dim: ch0,
            time_embedding,
            text_time,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn in_channels(&self) -> usize {
        self.config.in_channels
    }

    /// The dtype the model computes in (its weights' dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Time embedding `emb` of diffusers' forward: timestep, LCM condition and SDXL text_time.
    fn time_embed(&self, timestep: f64, batch: usize, cond: &UNetCond) -> Result<Tensor> {
        let device = cond.encoder_hidden_states.device();
        let (flip, shift) = (self.config.flip_sin_to_cos, self.config.freq_shift);
        // diffusers: a Python float timestep becomes a float64 tensor, then `.float()`.
        let t_emb =
            timestep_embedding(&vec![timestep as f32; batch], self.time_proj_dim, flip, shift, device)?
                .to_dtype(self.dtype)?;
        let timestep_cond = cond.timestep_cond.map(|c| c.to_dtype(self.dtype)).transpose()?;
        let emb = self.time_embedding.forward(&t_emb, timestep_cond.as_ref())?;
        let Some(text_time) = &self.text_time else {
            return Ok(emb);
        };
        let required = |t: Option<&'_ Tensor>, name: &str| {
            t.cloned()
                .ok_or_else(|| Error::arg(name, "required by this UNet (addition_embed_type \"text_time\")"))
        };
        let text_embeds = required(cond.text_embeds, "text_embeds")?;
        let time_ids = required(cond.time_ids, "time_ids")?;
        let ids_per_sample = match (text_embeds.dims(), time_ids.dims()) {
            ([b1, _], [b2, k]) if *b1 == batch && *b2 == batch => *k,
            (te, ti) => {
                return Err(Error::arg(
                    "text_embeds/time_ids",
                    format!("batch {batch} needs [{batch}, pooled] text_embeds and [{batch}, 6] time_ids, got {te:?} and {ti:?}"),
                ))
            }
        };
        let ids = time_ids.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let dim = text_time.plan.time_embed_dim;
        let time_embeds = timestep_embedding(&ids, dim, flip, shift, device)?
            .reshape((batch, ids_per_sample * dim))?
            .to_dtype(self.dtype)?;
        let add_embeds = Tensor::cat(&[&text_embeds.to_dtype(self.dtype)?, &time_embeds], 1)?;
        let expected = text_time.plan.projection_input_dim;
        if add_embeds.dim(1)? != expected {
            return Err(Error::arg(
                "text_embeds/time_ids",
                format!(
                    "pooled text embeds {:?} + time ids {:?} give {} features; this UNet's \
                     projection_class_embeddings_input_dim is {expected}",
                    text_embeds.dims(),
                    time_ids.dims(),
                    add_embeds.dim(1)?
                ),
            ));
        }
        Ok((emb + text_time.add_embedding.forward(&add_embeds, None)?)?)
    }

    /// Predicts the model output (noise or v) for a `[B, in_channels, H, W]` latent at
    /// `timestep` (the same for the whole batch). Inputs are cast to the model's dtype; the
    /// output is in the model's dtype.
    pub fn forward(&self, sample: &Tensor, timestep: f64, cond: &UNetCond) -> Result<Tensor> {
        let (batch, channels, height, width) = sample.dims4()?;
        if channels != self.config.in_channels {
            return Err(Error::arg(
                "sample",
                format!(
                    "has {channels} channels, this UNet takes {} ({:?})",
                    self.config.in_channels,
                    sample.dims()
                ),
            ));
        }
        let context = cond.encoder_hidden_states.to_dtype(self.dtype)?;
        if context.rank() != 3 || context.dim(0)? != batch {
            return Err(Error::arg(
                "encoder_hidden_states",
                format!("expected [{batch}, tokens, dim], got {:?}", context.dims()),
            ));
        }
        let mut sample = sample.to_dtype(self.dtype)?;
        if self.config.center_input_sample {
            sample = ((sample * 2.0)? - 1.0)?;
        }
        // Latents that are not a multiple of the overall down factor make each upsampler
        // target the next skip connection's size rather than exactly 2x (diffusers'
        // forward_upsample_size).
        let upsamplers = u32::try_from(self.up_blocks.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let forward_upsample_size = match 1usize.checked_shl(upsamplers) {
            Some(factor) => height % factor != 0 || width % factor != 0,
            None => true,
        };

        let emb = self.time_embed(timestep, batch, cond)?;
        let temb_act = emb.silu()?;

        let mut sample = self.conv_in.forward(&sample)?;
        let mut skips = vec![sample.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&sample, &temb_act, &context)?;
            sample = out;
            skips.extend(block_skips);
        }
        if let Some(mid) = &self.mid_block {
            sample = mid.forward(&sample, &temb_act, &context)?;
        }
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n = block.num_skips();
            let Some(split) = skips.len().checked_sub(n) else {
                return Err(Error::arg(
                    "skip connections",
                    format!("up block {i} needs {n}, {} left", skips.len()),
                ));
            };
            let block_skips = skips.split_off(split);
            let upsample_size = match skips.last() {
                Some(next) if i != last && forward_upsample_size => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            sample = block.forward(&sample, &block_skips, &temb_act, &context, upsample_size)?;
        }
        let sample = self.conv_norm_out.forward_silu(&sample)?;
        Ok(self.conv_out.forward(&sample)?)
    }
}
