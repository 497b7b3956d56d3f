//! The UNet's blocks: `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D`. A block without attention is the same struct with no
//! transformers, as the two diffusers classes differ only in that.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::{AttentionPlan, BlockPlan};
use super::resnet::{Downsample2D, NormSpec, ResnetBlock2D, Upsample2D};
use super::transformer::Transformer2DModel;
use crate::error::{Error, Result};

fn transformers(
    count: usize,
    channels: usize,
    norm: NormSpec,
    plan: Option<&AttentionPlan>,
    vb: &VarBuilder,
) -> Result<Vec<Transformer2DModel>> {
    match plan {
        None => Ok(Vec::new()),
        Some(p) => (0..count)
            .map(|i| Transformer2DModel::new(channels, norm.groups, p, vb.pp("attentions").pp(i.to_string())))
            .collect(),
    }
}

/// A down block: resnets (each followed by a transformer when it has attention), then an
/// optional strided-conv downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(
        plan: &BlockPlan,
        temb_channels: usize,
        norm: NormSpec,
        downsample_padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..plan.num_layers)
            .map(|i| {
                let in_c = if i == 0 { plan.in_channels } else { plan.out_channels };
                let vb = vb.pp("resnets").pp(i.to_string());
                ResnetBlock2D::new(in_c, plan.out_channels, temb_channels, norm, 1.0, vb)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions =
            transformers(plan.num_layers, plan.out_channels, norm, plan.attention.as_ref(), &vb)?;
        let downsampler = if plan.resample {
            Some(Downsample2D::new(plan.out_channels, downsample_padding, vb.pp("downsamplers").pp("0"))?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and the skip connections it adds (one per resnet, plus the
    /// downsampled output).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok((x, skips))
    }
}

/// `UNetMidBlock2DCrossAttn` (one layer): resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    pub fn new(
        channels: usize,
        plan: &AttentionPlan,
        temb_channels: usize,
        norm: NormSpec,
        output_scale_factor: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnet = |i: usize| {
            let vb = vb.pp("resnets").pp(i.to_string());
            ResnetBlock2D::new(channels, channels, temb_channels, norm, output_scale_factor, vb)
        };
        Ok(Self {
            resnet_in: resnet(0)?,
            attention: Transformer2DModel::new(channels, norm.groups, plan, vb.pp("attentions").pp("0"))?,
            resnet_out: resnet(1)?,
        })
    }

    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.resnet_in.forward(x, temb_act)?;
        let x = self.attention.forward(&x, context)?;
        self.resnet_out.forward(&x, temb_act)
    }
}

/// An up block: each resnet takes the running features concatenated with one skip connection
/// (last skip first), followed by a transformer when it has attention; then an optional
/// nearest-neighbour upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(plan: &BlockPlan, temb_channels: usize, norm: NormSpec, vb: VarBuilder) -> Result<Self> {
        let resnets = (0..plan.num_layers)
            .map(|i| {
                let skip_c = if i + 1 == plan.num_layers { plan.in_channels } else { plan.out_channels };
                let in_c = if i == 0 { plan.prev_output_channels } else { plan.out_channels };
                let vb = vb.pp("resnets").pp(i.to_string());
                ResnetBlock2D::new(in_c + skip_c, plan.out_channels, temb_channels, norm, 1.0, vb)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions =
            transformers(plan.num_layers, plan.out_channels, norm, plan.attention.as_ref(), &vb)?;
        let upsampler = if plan.resample {
            Some(Upsample2D::new(plan.out_channels, vb.pp("upsamplers").pp("0"))?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// How many skip connections this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip connections in the order the down path made them
    /// (`num_skips()` of them); `upsample_size` forces the upsampler's output size.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb_act: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        if skips.len() != self.resnets.len() {
            return Err(Error::arg(
                "skip connections",
                format!("up block needs {} but got {}", self.resnets.len(), skips.len()),
            ));
        }
        let mut x = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            x = Tensor::cat(&[&x, skip], 1)?;
            x = resnet.forward(&x, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}
