//! diffusers' VAE `Encoder` and `Decoder` (vae.py), group-norm variant.

use super::blocks::{
    conv2d, group_norm, norm_conv, one_to_one, run_stages, Activation, BlockSpec, DownEncoderBlock2D,
    MidBlock2D, Norms, PlainNorms, Stage, UpDecoderBlock2D,
};
use super::VaeConfig;
use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use kiln_kernels::{Conv2d, GroupNorm};

/// Image → `2 * latent_channels` moments (mean and log-variance), before `quant_conv`.
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    /// `attention[i]`: whether down block `i` is an `AttnDownEncoderBlock2D`.
    pub(crate) fn new(cfg: &VaeConfig, act: Activation, attention: &[bool], vb: VarBuilder) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let first = channels.first().copied().unwrap_or_default();
        let last = channels.last().copied().unwrap_or_default();
        let conv_in = conv2d(cfg.in_channels, first, 3, 1, 1, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut cout = first;
        for (i, &block_out) in channels.iter().enumerate() {
            let cin = cout;
            cout = block_out;
            let spec = BlockSpec {
                layers: cfg.layers_per_block,
                cin,
                cout,
                groups,
                act,
                with_attention: attention.get(i).copied().unwrap_or(false),
                resample: i + 1 != channels.len(),
            };
            down_blocks.push(DownEncoderBlock2D::new(spec, vb.pp("down_blocks").pp(i))?);
        }
        let mid_block = MidBlock2D::new(last, groups, act, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out: group_norm(groups, last, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
            act,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = run_stages(&self.feature_stages(), xs, &mut PlainNorms)?;
        self.finish(&xs)
    }

    /// conv_in and the down blocks: everything local (convolutions and norms), which the tiled
    /// encoder runs tile by tile.
    pub(crate) fn feature_stages(&self) -> Vec<Stage<'_>> {
        let mut stages: Vec<Stage<'_>> = vec![one_to_one(|xs, _| Ok(self.conv_in.forward(xs)?))];
        for block in &self.down_blocks {
            block.stages(&mut stages);
        }
        stages
    }

    /// The mid block (with its whole-image attention), norm and conv_out, at latent resolution.
    pub(crate) fn finish(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.finish_windowed(xs, usize::MAX)?.0)
    }

    /// [`Self::finish`] with the mid block's attention over windows of at most `window`² latent
    /// pixels; also returns the number of windows.
    pub(crate) fn finish_windowed(&self, xs: &Tensor, window: usize) -> Result<(Tensor, usize)> {
        let (xs, windows) = self.mid_block.forward_windowed(xs.clone(), &mut PlainNorms, window)?;
        let out =
            norm_conv(&mut PlainNorms, (&self.conv_norm_out, Some(self.act)), &self.conv_out, &xs, None)?;
        Ok((out, windows))
    }
}

/// Latents (after `post_quant_conv`) → image.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    /// `attention[i]`: whether up block `i` is an `AttnUpDecoderBlock2D`.
    pub(crate) fn new(cfg: &VaeConfig, act: Activation, attention: &[bool], vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let first = cfg.block_out_channels.first().copied().unwrap_or_default();
        let last = reversed.first().copied().unwrap_or_default();
        let conv_in = conv2d(cfg.latent_channels, last, 3, 1, 1, vb.pp("conv_in"))?;
        let mid_block = MidBlock2D::new(last, groups, act, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut cout = last;
        for (i, &block_out) in reversed.iter().enumerate() {
            let cin = cout;
            cout = block_out;
            let spec = BlockSpec {
                // The decoder has one resnet more per block than the encoder.
                layers: cfg.layers_per_block + 1,
                cin,
                cout,
                groups,
                act,
                with_attention: attention.get(i).copied().unwrap_or(false),
                resample: i + 1 != reversed.len(),
            };
            up_blocks.push(UpDecoderBlock2D::new(spec, vb.pp("up_blocks").pp(i))?);
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, first, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(first, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            act,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.start(xs)?;
        run_stages(&self.render_stages(), &xs, &mut PlainNorms)
    }

    /// conv_in and the mid block (with its whole-image attention), at latent resolution.
    pub(crate) fn start(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.start_windowed(xs, usize::MAX)?.0)
    }

    /// [`Self::start`] with the mid block's attention over windows of at most `window`² latent
    /// pixels; also returns the number of windows.
    pub(crate) fn start_windowed(&self, xs: &Tensor, window: usize) -> Result<(Tensor, usize)> {
        let xs = self.conv_in.forward(xs)?;
        self.mid_block.forward_windowed(xs, &mut PlainNorms, window)
    }

    /// The up blocks, norm and conv_out: everything local, which the tiled decoder runs tile by tile.
    pub(crate) fn render_stages(&self) -> Vec<Stage<'_>> {
        let mut stages = Vec::new();
        for block in &self.up_blocks {
            block.stages(&mut stages);
        }
        stages.push(one_to_one(|xs: &Tensor, norms: &mut dyn Norms| {
            norm_conv(norms, (&self.conv_norm_out, Some(self.act)), &self.conv_out, xs, None)
        }));
        stages
    }
}
