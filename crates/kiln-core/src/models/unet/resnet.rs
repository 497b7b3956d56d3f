//! diffusers' `ResnetBlock2D` (time_embedding_norm "default"), `Downsample2D` (strided conv) and
//! `Upsample2D` (nearest interpolation + conv) as the UNet's blocks configure them.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};
use kiln_kernels::{Conv2d, GroupNorm};

use crate::error::Result;

/// Norm settings shared by every resnet of the UNet.
#[derive(Debug, Clone, Copy)]
pub struct NormSpec {
    pub groups: usize,
    pub eps: f64,
}

fn conv(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Ok(kiln_kernels::conv2d(in_c, out_c, kernel, cfg, vb)?)
}

/// `ResnetBlock2D`: norm, SiLU, conv, + projected time embedding, norm, SiLU, conv, + shortcut.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        temb_channels: usize,
        norm: NormSpec,
        output_scale_factor: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(conv(in_channels, out_channels, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: kiln_kernels::group_norm(norm.groups, in_channels, norm.eps, vb.pp("norm1"))?,
            conv1: conv(in_channels, out_channels, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: candle_nn::linear(temb_channels, out_channels, vb.pp("time_emb_proj"))?,
            norm2: kiln_kernels::group_norm(norm.groups, out_channels, norm.eps, vb.pp("norm2"))?,
            conv2: conv(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `temb_act` is SiLU(time embedding), `[B, temb_channels]`: every resnet applies the same
    /// activation to the same embedding, so the UNet computes it once.
    pub fn forward(&self, input: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let hidden = self.conv1.forward(&self.norm1.forward_silu(input)?)?;
        let temb = self.time_emb_proj.forward(temb_act)?.unsqueeze(2)?.unsqueeze(3)?;
        let hidden = hidden.broadcast_add(&temb)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(input)?,
            None => input.clone(),
        };
        // (conv2(h) + shortcut) / output_scale_factor in the conv's output pass.
        let hidden = self.norm2.forward_silu(&hidden)?;
        Ok(self.conv2.forward_add(&hidden, &shortcut, 1.0 / self.output_scale_factor)?)
    }
}

/// `Downsample2D(use_conv=True, name="op")`: 3x3 conv with stride 2. With padding 0 diffusers
/// pads one zero row/column at the bottom/right first.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            pad_bottom_right: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            Ok(self.conv.forward(&padded)?)
        } else {
            Ok(self.conv.forward(x)?)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour 2x (or to an explicit size) then 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv(channels, channels, 3, 1, 1, vb.pp("conv"))? })
    }

    /// `size` forces the output size (diffusers' `upsample_size`, used when the latent is not a
    /// multiple of the UNet's down factor).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        Ok(self.conv.forward(&x.upsample_nearest2d(th, tw)?)?)
    }
}
